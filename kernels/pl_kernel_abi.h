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
typedef unsigned char uint8_t;
#else
#include <stdint.h>
#endif

/* Element type of a caller tensor. Values match the C ABI's pl_dtype. */
typedef enum pl_k_dtype {
    PL_K_F32 = 0,
    PL_K_F16 = 1,
    PL_K_BF16 = 2
} pl_k_dtype;

/* Total-variation formula (docs/design.md, "Total variation"). */
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
    PL_K_MAE = 1,
    /* The norm of the whole batch's difference: two launches, the first
     * (grad NULL) reducing and writing norm_scale, the second (grad set)
     * writing the gradient from it (pl_vgg_tap_loss only). */
    PL_K_FRO = 2
} pl_k_criterion;

/*
 * A call replayed from a CUDA graph reads the caller's tensors through a
 * call table: device memory of PL_K_CALL_SLOTS addresses, one per slot
 * below, that pl_vgg_call_table fills before each replay. The graph
 * bakes each caller address as its slot and an offset,
 * ((slot + 1) << PL_K_CALL_SLOT_SHIFT) | offset (real device addresses
 * never reach those bits), and the `call` member of the struct that holds
 * it points at the table; a plain launch passes `call` NULL and real
 * addresses. 0 is NULL either way.
 */
typedef enum pl_k_call_slot {
    PL_K_CALL_PRED = 0,
    PL_K_CALL_TARGET = 1,
    PL_K_CALL_GRAD = 2,
    PL_K_CALL_LOSS = 3,
    PL_K_CALL_PER_SAMPLE = 4,
    PL_K_CALL_PARTS = 5,
    PL_K_CALL_SLOTS = 6
} pl_k_call_slot;

typedef enum pl_k_call_encoding {
    PL_K_CALL_SLOT_SHIFT = 56
} pl_k_call_encoding;

/* Where pl_vgg_publish finds the parts and the per-sample values in the
 * graph's own outputs, in floats: [loss][parts[2]][pad][per_sample[n]]. */
typedef enum pl_k_publish_layout {
    PL_K_PUBLISH_PARTS_AT = 1,
    PL_K_PUBLISH_PER_SAMPLE_AT = 4
} pl_k_publish_layout;

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
    const void *a;        /* the tensor the gradient is taken for, [N][per_image] */
    const void *b;        /* the constant target, same shape and dtype */
    void *grad;           /* dL/da in a's dtype, or NULL */
    pl_k_reduce reduce;   /* per_sample may be NULL */
    int64_t n;            /* images */
    int64_t per_image;    /* C*H*W */
    int64_t per_block;    /* elements of one image per block; set by the host */
    int32_t blocks_per_image;
    int32_t dtype;        /* pl_k_dtype */
    int32_t criterion;    /* pl_k_criterion */
    float weight;         /* user weight; the 1/count of the mean is applied inside */
    float beta;           /* grad = beta * grad + dL/da; 0 means grad is not read */
    int32_t reserved;
} pl_k_feature_params;

/*
 * VGG helper kernels (kernels/vgg.cu). Activations are NHWC in the compute
 * dtype, with pred images first and target images after them in one batch
 * of 2N; channel counts are multiples of 8 (the input is padded to 8) and
 * buffers 16-byte aligned, as the 8-wide accesses need. Only the pred
 * half keeps what backward needs: a 1-bit ReLU mask
 * (bit k of word k/32, elements in NHWC order) and a 2-bit pool argmax
 * (0..3, row-major in the 2x2 window): for the outputs 32k..32k+31, word 2k
 * holds the low bits and word 2k+1 the high bits.
 */

/* Caller NCHW pred/target -> normalised NHWC batch, channels zero-padded. */
typedef struct pl_k_preprocess_params {
    const void *pred;
    const void *target;   /* NULL: the batch is the pred images alone */
    void *out;            /* [2N][H][W][cpad], or [N][H][W][cpad] */
    int64_t n, h, w;
    int32_t c;            /* 1 (replicated) or 3 */
    int32_t cpad;         /* channels of out, >= 3 */
    int32_t in_dtype;     /* pl_k_dtype of pred/target */
    int32_t out_dtype;    /* the compute dtype */
    float scale[3];       /* normalised = x * scale + shift */
    float shift[3];
    const unsigned long long *call;  /* NULL, or the call table of pred/target */
} pl_k_preprocess_params;

/* x = act(x + bias) in place over [2N][HW][C]; mask of the pred half. */
typedef struct pl_k_bias_act_params {
    void *x;
    const float *bias;    /* [C] or NULL */
    uint32_t *mask;       /* pred half's ReLU mask, or NULL */
    int64_t count;        /* 2N*H*W*C */
    int64_t pred_count;   /* N*H*W*C */
    int32_t c;
    int32_t dtype;
    int32_t relu;         /* 0 or 1 */
    int32_t reserved;
} pl_k_bias_act_params;

/* 2x2 stride-2 pooling (floor) of [2N][H][W][C]; argmax of the pred half. */
typedef struct pl_k_pool_params {
    const void *x;
    void *y;              /* [2N][H/2][W/2][C] */
    uint32_t *argmax;     /* pred half, or NULL; max-pooling only */
    int64_t images;       /* 2N */
    int64_t pred_images;  /* N; N*(H/2)*(W/2)*C is a multiple of 32 */
    int64_t h, w;
    int32_t c;
    int32_t dtype;
    int32_t avg;          /* 0 max, 1 average */
    int32_t reserved;
} pl_k_pool_params;

/* Fused ReLU layer and the 2x2 pooling after it, over [2N][H][W][C] with
 * H and W even: x + bias, ReLU, the pred half's mask, then the pooled
 * output and argmax. The ReLU output itself is not stored. */
typedef struct pl_k_bias_act_pool_params {
    const void *x;
    void *y;              /* [2N][H/2][W/2][C] */
    const float *bias;    /* [C] or NULL */
    uint32_t *mask;       /* pred half's ReLU mask, or NULL */
    uint32_t *argmax;     /* pred half, or NULL; max-pooling only */
    int64_t images;       /* 2N */
    int64_t pred_images;  /* N */
    int64_t h, w;
    int32_t c;
    int32_t dtype;
    int32_t avg;          /* 0 max, 1 average */
    int32_t reserved;
} pl_k_bias_act_pool_params;

/* Feature distance at a tap between the pred and target images of one
 * activation, with the gradient for the pred images. The loss is written
 * (accumulate = 0) or added to (1); so are the per-image values, with
 * their own flag: a later chunk of a batch adds to the loss but writes
 * its own images' values first. */
typedef struct pl_k_tap_loss_params {
    const void *x;        /* the pred images, [N][per_image] */
    const void *target;   /* the target images, [N][per_image], or one image
                             when target_shared */
    void *grad;           /* [N][per_image] in dtype, or NULL */
    float *norm_scale;    /* PL_K_FRO: weight / (2 |D|), 0 for D = 0; else NULL */
    pl_k_reduce reduce;   /* per_sample may be NULL */
    int64_t n;            /* images in this launch */
    int64_t batch;        /* images the loss averages over (n, or more when chunked) */
    int64_t per_image;    /* H*W*C */
    int64_t per_block;    /* work units of one image per block (pl_vgg_tap_loss:
                             8 elements); set by the host */
    int32_t blocks_per_image;
    int32_t dtype;
    int32_t criterion;    /* pl_k_criterion */
    int32_t accumulate;
    float weight;         /* tap weight times the overall weight */
    int32_t accumulate_per_sample;
    int32_t target_shared; /* 1: one target image serves every pred image */
} pl_k_tap_loss_params;

/* A tapped ReLU layer, the 2x2 pooling after it and the tap, in one pass
 * (H and W even): the pred and target images are read once; the pred
 * mask, both pooled outputs (pred's alone against a kept target), the pred
 * argmax, the tap's loss and its gradient are written; the ReLU output is
 * not stored. */
typedef struct pl_k_bias_act_pool_tap_params {
    pl_k_tap_loss_params tap;  /* x and target: the ReLU's input (before the bias);
                             grad may be x itself (written in place);
                             per_image = C*H*W; per_block counts units of
                             8 channels of one pooled pixel */
    void *y;              /* pooled pred images, [N][H/2][W/2][C] */
    void *y_target;       /* pooled target images; unused when target_kept */
    const float *bias;    /* [C] or NULL */
    uint32_t *mask;       /* pred ReLU mask, or NULL */
    uint32_t *argmax;     /* pred argmax, or NULL; max-pooling only */
    int64_t h, w;
    int32_t c;
    int32_t avg;          /* 0 max, 1 average */
    int32_t target_kept;  /* 1: tap.target is a kept target's ReLU output
                             (no bias, ReLU or pooling of it) */
    int32_t reserved;
} pl_k_bias_act_pool_tap_params;

/* dst = src over `count` values of dtype (a multiple of 8): a kept
 * target's features. */
typedef struct pl_k_copy_params {
    const void *src;
    void *dst;
    int64_t count;
    int32_t dtype;
    int32_t reserved;
} pl_k_copy_params;

/* One backward step over [N][HW][C] in place:
 * g = (g + before) * mask + after, each term optional (NULL). */
typedef struct pl_k_relu_backward_params {
    void *g;
    const void *before;   /* tap gradient at this module's output */
    const uint32_t *mask; /* ReLU mask; NULL for none */
    const void *after;    /* tap gradient at the previous module's output */
    int64_t count;
    int32_t dtype;
    int32_t reserved;
} pl_k_relu_backward_params;

/* Gradient through 2x2 pooling: [N][H/2][W/2][C] (+ before) -> [N][H][W][C],
 * and, when the pool follows a ReLU, through that ReLU in the same pass:
 * gx = (unpooled + relu_before) * mask + after. */
typedef struct pl_k_unpool_params {
    const void *gy;
    const void *before;   /* tap gradient at the pool output, or NULL */
    void *gx;
    const uint32_t *argmax; /* max-pooling; NULL for average */
    const void *relu_before; /* tap gradient at the ReLU output, or NULL */
    const uint32_t *mask; /* the ReLU's mask, or NULL for no ReLU */
    const void *after;    /* tap gradient at the ReLU's input, or NULL */
    int64_t n, h, w;      /* of gx */
    int32_t c;
    int32_t dtype;
} pl_k_unpool_params;

/* dL/dx of the caller: NHWC [N][H][W][cpad] -> NCHW in the caller's dtype,
 * through the normalisation (and the grayscale replication). */
typedef struct pl_k_input_grad_params {
    const void *g;
    void *grad;
    int64_t n, h, w;
    int32_t c;            /* 1 or 3 */
    int32_t cpad;
    int32_t g_dtype;
    int32_t out_dtype;
    float scale[3];
    float beta;           /* grad = beta * grad + dL/dx; 0: grad not read */
    int32_t reserved;
    const unsigned long long *call;  /* NULL, or the call table of grad */
} pl_k_input_grad_params;

/* Gram matrices G = F^T F * scale of `count` images of NHWC features
 * [M][C] (the style loss's G = F F^T / (C H W) of the CHW map), summed in
 * f32 over 32 x 32 tiles of G. Each tile's rows are split into `slices`
 * runs of `rows_per_slice` pixels (a multiple of 32): with one slice `out`
 * receives the scaled Grams [count][C][C]; with more, the unscaled
 * partial sums [slice][count][C][C], which pl_vgg_gram_sum adds in slice
 * order. Images 0..split-1 are read from x, the others from x2. */
typedef struct pl_k_gram_params {
    const void *x;
    const void *x2;
    float *out;
    int64_t count;
    int64_t split;
    int64_t m;            /* pixels per image */
    int64_t rows_per_slice;
    int32_t c;
    int32_t slices;
    int32_t dtype;
    float scale;          /* 1 / (C M) */
} pl_k_gram_params;

/* out[i] = scale * sum over slices k, in order, of partial[k][i]. */
typedef struct pl_k_gram_sum_params {
    const float *partial;
    float *out;
    int64_t len;          /* count * C * C */
    int32_t slices;
    float scale;
} pl_k_gram_sum_params;

/* dL/dF of n images of NHWC features [M][C] from dL/dG [n][C][C] (f32)
 * for G = F^T F * scale: F (E + E^T) * scale, stored into grad in dtype,
 * or added to what grad holds when `accumulate`. */
typedef struct pl_k_gram_backward_params {
    const float *e;
    const void *x;
    void *grad;
    int64_t n;
    int64_t m;
    int32_t c;
    int32_t dtype;
    float scale;
    int32_t accumulate;
} pl_k_gram_backward_params;

/* One LPIPS term: per pixel of [n][M][C] features, sum_c w_c (x_c / (|x| +
 * 1e-10) - y_c / (|y| + 1e-10))^2, |.| the norm over the pixel's
 * channels; the per-image mean over pixels times the weight, and its
 * gradient w.r.t. x (0 at a pixel whose x is all 0). tap.per_image is M
 * (the mean is over pixels) and tap.per_block counts pixels; c is a
 * multiple of 32, at most 512. */
typedef struct pl_k_lpips_tap_params {
    pl_k_tap_loss_params tap;
    const float *lin;     /* [C] */
    /* The spatial map's terms (NULL without): each pixel's value times
     * tap.weight, stored at map[n * map_stride + pixel]. */
    float *map;
    /* With it, the gradient is that of sum over pixels of
     * pixel_scale[n * map_stride + pixel] * tap.weight * value (dL/dmap
     * brought back to this layer), in place of the weighted mean's. */
    const float *pixel_scale;
    int64_t map_stride;
    int32_t c;
    int32_t reserved;
} pl_k_lpips_tap_params;

/* LPIPS's spatial map from its layers' per-pixel terms, and back. Each
 * image's terms are map_stride floats apart: layer k's layer_h[k] x
 * layer_w[k] values from offset[k]. The map is h x w per image, each
 * layer resized bilinearly (align_corners=False, PyTorch's source index
 * (dst + 0.5) * in / out - 0.5, clamped at 0) and summed.
 * pl_lpips_upsample: terms (src) -> map (dst); pl_lpips_upsample_adjoint:
 * dL/dmap (src) -> dL/dterms (dst), the adjoint, gathered per term;
 * pl_lpips_layer_means: terms (src) -> dst[n][5], each layer's mean
 * (its distance). */
typedef struct pl_k_lpips_maps_params {
    const float *src;
    float *dst;
    int64_t n;
    int64_t h;
    int64_t w;
    int64_t map_stride;
    int64_t layer_h[5];
    int64_t layer_w[5];
    int64_t offset[5];
} pl_k_lpips_maps_params;

/* The end of a call asked for its parts: a part without terms is 0, and
 * the loss is the sum of the two. */
typedef struct pl_k_parts_params {
    float *parts;         /* [2]: perceptual, style */
    float *loss;
    int32_t present[2];   /* whether each part has terms */
} pl_k_parts_params;

/* Before a replay: the call's addresses, by slot, into its call table. */
typedef struct pl_k_call_table_params {
    unsigned long long *table;
    unsigned long long addrs[PL_K_CALL_SLOTS];
} pl_k_call_table_params;

/* The end of a call replayed from a CUDA graph: its taps left the loss,
 * the parts and the per-sample values in the graph's own memory, and this
 * copies them to the caller's outputs through the call table. */
typedef struct pl_k_publish_params {
    const float *from;    /* the graph's outputs (pl_k_publish_layout) */
    float *loss;          /* call-table addresses (pl_k_call_slot) */
    float *per_sample;    /* NULL when not asked for */
    float *parts;         /* NULL when not asked for */
    const unsigned long long *call;
    int64_t n;
} pl_k_publish_params;

/* The first non-finite element of a tensor (kernels/check.cu): `first`
 * holds the smallest index of a NaN or an infinity, or stays as it was
 * (set to all ones by the host) when there is none. An integer minimum:
 * the result does not depend on the order blocks run in. */
typedef struct pl_k_check_params {
    const void *x;
    unsigned long long *first;
    int64_t count;
} pl_k_check_params;

#endif /* PL_KERNEL_ABI_H */
