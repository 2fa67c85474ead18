/*
 * Launch parameters shared by the CUDA kernels and the Rust launchers.
 *
 * This is the single definition of every struct and enum that crosses the
 * host/device boundary. The Rust side (src/cuda/abi.rs) is generated from
 * this file with bindgen (scripts/gen-bindings.sh) and checked in; CI
 * regenerates it and fails on any difference.
 *
 * Every pointer is a device address. Every struct is passed by value as the
 * kernel's only argument, so the layout must be identical on both sides:
 * fixed-width integers, no bitfields, 8-byte members first.
 */
#ifndef PL_KERNEL_ABI_H
#define PL_KERNEL_ABI_H

#ifdef __CUDACC_RTC__
/* NVRTC has no system headers: define the fixed-width types it needs. */
typedef long long int64_t;
typedef int int32_t;
typedef unsigned int uint32_t;
#else
#include <stdint.h>
#endif

/* Element type of a caller tensor. Values match the C ABI's pl_dtype. */
typedef enum pl_k_dtype {
    PL_K_F32 = 0,
    PL_K_F16 = 1,
    PL_K_BF16 = 2
} pl_k_dtype;

/* Total-variation formula (see DESIGN.md section 3 and ANCHORS.md). */
typedef enum pl_k_tv_variant {
    PL_K_TV_ARTICLE = 0,
    PL_K_TV_L1 = 1,
    PL_K_TV_L2_SQUARED = 2,
    PL_K_TV_L2 = 3,
    PL_K_TV_ISOTROPIC = 4
} pl_k_tv_variant;

/* What one launch of the TV kernel does. */
typedef enum pl_k_tv_pass {
    /* Loss partials and the gradient in one read of x (every variant but l2). */
    PL_K_TV_PASS_FUSED = 0,
    /* Loss partials only; for l2 it also leaves the per-image gradient scale. */
    PL_K_TV_PASS_LOSS = 1,
    /* Gradient only, scaled per image by workspace.image_scale (l2's second pass). */
    PL_K_TV_PASS_GRAD = 2
} pl_k_tv_pass;

/* Feature distance criterion. */
typedef enum pl_k_criterion {
    PL_K_MSE = 0,
    PL_K_MAE = 1
} pl_k_criterion;

/*
 * Scratch memory for the deterministic two-stage reduction. Each block
 * writes one f64 partial; the last block to finish (counted with an integer
 * atomic) sums the partials in a fixed order, writes the loss and resets
 * `counter` to zero for the next launch on the same stream.
 */
typedef struct pl_k_reduce {
    double *partials;     /* one per block, laid out [image][block] */
    double *image_scale;  /* per image, used by multi-pass variants */
    uint32_t *counter;    /* zero before and after every launch */
    float *loss;          /* one float: the reduced, scaled loss */
    float *per_sample;    /* NULL or one float per image */
} pl_k_reduce;

typedef struct pl_k_tv_params {
    const void *x;        /* N x C x H x W, contiguous, dtype below */
    void *grad;           /* same shape and dtype, or NULL for no gradient */
    pl_k_reduce reduce;
    int64_t n, c, h, w;
    int64_t rows_per_block;  /* of the C*H rows of an image; set by the host */
    int32_t dtype;        /* pl_k_dtype */
    int32_t variant;      /* pl_k_tv_variant */
    int32_t pass;         /* pl_k_tv_pass */
    int32_t blocks_per_image;
    float weight;         /* the user's weight */
    float batch_scale;    /* batch reduction: 1/N for mean, 1 for sum */
    float beta;           /* grad = beta * grad + dL/dx; 0 means grad is not read */
    float eps;            /* inside the square root of the isotropic variant */
} pl_k_tv_params;

typedef struct pl_k_feature_params {
    const void *a;        /* the tensor the gradient is taken for */
    const void *b;        /* the constant target, same shape and dtype */
    void *grad;           /* dL/da in a's dtype, or NULL */
    pl_k_reduce reduce;
    int64_t count;        /* number of elements */
    int32_t dtype;        /* pl_k_dtype */
    int32_t criterion;    /* pl_k_criterion */
    float weight;         /* user weight; the 1/count of the mean is applied inside */
    float beta;           /* grad = beta * grad + dL/da; 0 means grad is not read */
} pl_k_feature_params;

#endif /* PL_KERNEL_ABI_H */
