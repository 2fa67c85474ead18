/*
 * Helpers shared by every kernel family: dtype conversion and the
 * deterministic two-stage reduction.
 *
 * No CUDA headers are included so that NVRTC (which has none) compiles the
 * same source as nvcc. f16 and bf16 are carried as raw 16-bit patterns and
 * converted with the same rounding (round to nearest even) as the `half`
 * crate the CPU backend uses.
 */
#pragma once
#include "pl_kernel_abi.h"

#define PL_BLOCK 256
#define PL_WARPS (PL_BLOCK / 32)

struct pl_f16 { unsigned short bits; };
struct pl_bf16 { unsigned short bits; };

__device__ __forceinline__ float pl_to_f32(float v) { return v; }
__device__ __forceinline__ float pl_to_f32(pl_f16 v) {
#ifdef PL_HOST_EMULATION  /* kernels/host: the compiler's own IEEE binary16 */
    _Float16 h;
    memcpy(&h, &v.bits, 2);
    return (float)h;
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
#endif
}
__device__ __forceinline__ float pl_to_f32(pl_bf16 v) {
    return __uint_as_float(((unsigned int)v.bits) << 16);
}

template <typename T> __device__ __forceinline__ T pl_from_f32(float v);
template <> __device__ __forceinline__ float pl_from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ pl_f16 pl_from_f32<pl_f16>(float v) {
    pl_f16 h;
#ifdef PL_HOST_EMULATION
    _Float16 r = (_Float16)v;  // round to nearest even, as cvt.rn
    memcpy(&h.bits, &r, 2);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
#endif
    return h;
}
template <> __device__ __forceinline__ pl_bf16 pl_from_f32<pl_bf16>(float v) {
    unsigned int u = __float_as_uint(v);
    pl_bf16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (unsigned short)((u >> 16) | 0x40u);  // keep NaN a (quiet) NaN
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);                // round to nearest even
        b.bits = (unsigned short)(u >> 16);
    }
    return b;
}

/* Element i of a buffer whose dtype is only known at run time (the VGG
 * kernels take it as a parameter: the branch is uniform across the grid). */
__device__ __forceinline__ float pl_load(const void *p, int dtype, int64_t i) {
    switch (dtype) {
    case PL_K_F16: return pl_to_f32(static_cast<const pl_f16 *>(p)[i]);
    case PL_K_BF16: return pl_to_f32(static_cast<const pl_bf16 *>(p)[i]);
    default: return static_cast<const float *>(p)[i];
    }
}

__device__ __forceinline__ void pl_store(void *p, int dtype, int64_t i, float v) {
    switch (dtype) {
    case PL_K_F16: static_cast<pl_f16 *>(p)[i] = pl_from_f32<pl_f16>(v); break;
    case PL_K_BF16: static_cast<pl_bf16 *>(p)[i] = pl_from_f32<pl_bf16>(v); break;
    default: static_cast<float *>(p)[i] = v;
    }
}

/* The VGG passes give each thread PL_VEC consecutive elements: one 16-byte
 * access for the 16-bit dtypes, two for f32. Element counts and channel
 * counts are multiples of PL_VEC and buffers are 16-byte aligned. */
#define PL_VEC 8

__device__ __forceinline__ float pl_half_to_f32(unsigned int bits, int dtype) {
    if (dtype == PL_K_F16) {
        pl_f16 h;
        h.bits = (unsigned short)bits;
        return pl_to_f32(h);
    }
    pl_bf16 b;
    b.bits = (unsigned short)bits;
    return pl_to_f32(b);
}

__device__ __forceinline__ unsigned int pl_f32_to_half(float v, int dtype) {
    return dtype == PL_K_F16 ? pl_from_f32<pl_f16>(v).bits : pl_from_f32<pl_bf16>(v).bits;
}

/* Elements i .. i+PL_VEC-1 of a buffer of `dtype`, i a multiple of PL_VEC. */
__device__ __forceinline__ void pl_load8(const void *p, int dtype, int64_t i, float v[PL_VEC]) {
    if (dtype == PL_K_F32) {
        const float4 *q = reinterpret_cast<const float4 *>(static_cast<const float *>(p) + i);
        const float4 a = q[0], b = q[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        return;
    }
    const uint4 u = *reinterpret_cast<const uint4 *>(static_cast<const unsigned short *>(p) + i);
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
    for (int k = 0; k < 4; ++k) {
        v[2 * k] = pl_half_to_f32(w[k] & 0xffffu, dtype);
        v[2 * k + 1] = pl_half_to_f32(w[k] >> 16, dtype);
    }
}

__device__ __forceinline__ void pl_store8(void *p, int dtype, int64_t i, const float v[PL_VEC]) {
    if (dtype == PL_K_F32) {
        float4 *q = reinterpret_cast<float4 *>(static_cast<float *>(p) + i);
        float4 a, b;
        a.x = v[0]; a.y = v[1]; a.z = v[2]; a.w = v[3];
        b.x = v[4]; b.y = v[5]; b.z = v[6]; b.w = v[7];
        q[0] = a;
        q[1] = b;
        return;
    }
    unsigned int w[4];
    for (int k = 0; k < 4; ++k) w[k] = pl_f32_to_half(v[2 * k], dtype) | (pl_f32_to_half(v[2 * k + 1], dtype) << 16);
    uint4 u;
    u.x = w[0]; u.y = w[1]; u.z = w[2]; u.w = w[3];
    *reinterpret_cast<uint4 *>(static_cast<unsigned short *>(p) + i) = u;
}

/* v rounded to dtype, as a store and a load would leave it. */
__device__ __forceinline__ float pl_round(float v, int dtype) {
    switch (dtype) {
    case PL_K_F16: return pl_to_f32(pl_from_f32<pl_f16>(v));
    case PL_K_BF16: return pl_to_f32(pl_from_f32<pl_bf16>(v));
    default: return v;
    }
}

/* a / b and a % b for non-negative a and positive b: 32-bit arithmetic
 * when a fits (the usual case; a 64-bit division is a called subroutine of
 * ~70 instructions), 64-bit otherwise. */
__device__ __forceinline__ int64_t pl_div(int64_t a, int64_t b) {
    return (a <= 0xffffffffLL && b <= 0xffffffffLL) ? (int64_t)((uint32_t)a / (uint32_t)b) : a / b;
}
__device__ __forceinline__ int64_t pl_mod(int64_t a, int64_t b) {
    return (a <= 0xffffffffLL && b <= 0xffffffffLL) ? (int64_t)((uint32_t)a % (uint32_t)b) : a % b;
}

/* Grid-stride loop over [0, count). */
#define PL_FOR_EACH(i, count) \
    for (int64_t i = (int64_t)blockIdx.x * PL_BLOCK + threadIdx.x; i < (count); i += (int64_t)gridDim.x * PL_BLOCK)

/* Writes beta * old + value in T; old is not read when beta == 0, so a
 * poisoned or uninitialised gradient buffer is fully overwritten. */
template <typename T>
__device__ __forceinline__ void pl_store_grad(T *grad, int64_t i, float value, float beta) {
    if (beta != 0.0f) value = fmaf(beta, pl_to_f32(grad[i]), value);
    grad[i] = pl_from_f32<T>(value);
}

/* Sum over the block in a fixed shuffle/tree order, so the result does not
 * depend on scheduling. Every thread must call it; thread 0 gets the sum. */
__device__ __forceinline__ double pl_block_sum(double v) {
    __shared__ double warp_sums[PL_WARPS];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();  // warp_sums complete before the first warp reads them
    v = (threadIdx.x < PL_WARPS) ? warp_sums[threadIdx.x] : 0.0;
    if (warp == 0) {
        for (int off = PL_WARPS / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    }
    __syncthreads();  // warp_sums may be reused by the next call
    return v;
}

/* Stores this block's partial, then reports whether this block is the last
 * of `total_blocks` to finish. Only the integer counter is atomic; the float
 * sum is done afterwards by that last block in a fixed order. */
__device__ __forceinline__ bool pl_publish_partial(const pl_k_reduce &r, int64_t slot,
                                                   double block_sum, unsigned int total_blocks) {
    __shared__ bool is_last;
    if (threadIdx.x == 0) {
        r.partials[slot] = block_sum;
        __threadfence();  // partial visible device-wide before the count says so
        unsigned int done = atomicAdd(r.counter, 1u);
        is_last = (done == total_blocks - 1);
    }
    __syncthreads();  // every thread sees is_last
    if (is_last) __threadfence();  // order the partial reads after the count
    return is_last;
}

/* A caller's address as the launch gave it: itself, or with a call table
 * its slot's base plus its offset (pl_kernel_abi.h). */
template <typename P> __device__ __forceinline__ P *pl_call_addr(const unsigned long long *call, P *raw) {
    const unsigned long long v = (unsigned long long)raw;
    if (!call || v == 0ull) return raw;
    const unsigned long long offset = v & ((1ull << PL_K_CALL_SLOT_SHIFT) - 1ull);
    return (P *)(call[(v >> PL_K_CALL_SLOT_SHIFT) - 1ull] + offset);
}

/* Last block only: the counter goes back to zero for the next launch. */
__device__ __forceinline__ void pl_reset_counter(const pl_k_reduce &r) {
    if (threadIdx.x == 0) *r.counter = 0u;
}

/* Reads a partial written by another block (bypasses the non-coherent L1). */
__device__ __forceinline__ double pl_load_partial(const double *p, int64_t i) {
    return __ldcg(p + i);
}

/* Image n's sum: its blocks' partials (laid out [image][block]) in order. */
__device__ __forceinline__ double pl_image_sum(const pl_k_reduce &r, int64_t n, int blocks_per_image) {
    double s = 0.0;
    for (int b = 0; b < blocks_per_image; ++b) s += pl_load_partial(r.partials, n * blocks_per_image + b);
    return s;
}

/* Last block of a reduction over images: image i's mean is its partials'
 * sum over `per_image` elements. Writes (or, with accumulate_per_sample,
 * adds) weight * mean per image, and weight * (sum of the means) / batch as
 * the loss (added to it with accumulate), then resets the counter. Every
 * thread of the block must call it. */
__device__ __forceinline__ void pl_finish_means(const pl_k_reduce &r, int64_t n, int blocks_per_image,
                                                int64_t per_image, float weight, int64_t batch,
                                                bool accumulate, bool accumulate_per_sample) {
    double total = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += PL_BLOCK) {
        double mean = pl_image_sum(r, i, blocks_per_image) / (double)per_image;
        if (r.per_sample) {
            float v = (float)(weight * mean);
            r.per_sample[i] = accumulate_per_sample ? r.per_sample[i] + v : v;
        }
        total += mean;
    }
    total = pl_block_sum(total);
    if (threadIdx.x == 0) {
        float v = (float)(total * weight / (double)batch);
        *r.loss = accumulate ? *r.loss + v : v;
    }
    pl_reset_counter(r);
}

/* Last block of a Fro reduction over n images: each image's value is
 * weight * its own norm, the loss weight * the norm of the whole batch
 * (written, or added to with accumulate), and norm_scale receives
 * weight / (2 norm) for the gradient pass (0 when the norm is 0). */
__device__ __forceinline__ void pl_finish_norms(const pl_k_reduce &r, int64_t n, int blocks_per_image, float weight,
                                                bool accumulate, bool accumulate_per_sample, float *norm_scale) {
    double total = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += PL_BLOCK) {
        double sum = pl_image_sum(r, i, blocks_per_image);
        if (r.per_sample) {
            float v = (float)(weight * sqrt(sum));
            r.per_sample[i] = accumulate_per_sample ? r.per_sample[i] + v : v;
        }
        total += sum;
    }
    total = pl_block_sum(total);
    if (threadIdx.x == 0) {
        double norm = sqrt(total);
        float v = (float)(weight * norm);
        *r.loss = accumulate ? *r.loss + v : v;
        *norm_scale = norm > 0.0 ? (float)(weight / (2.0 * norm)) : 0.0f;
    }
    pl_reset_counter(r);
}

/* The feature distance of a difference d = a - b: d^2 (MSE) or |d| (MAE),
 * and its derivative: 2d, or sign(d) with 0 at 0 and NaN kept. */
__device__ __forceinline__ double pl_distance(float d, bool mse) { return (double)(mse ? d * d : fabsf(d)); }
__device__ __forceinline__ float pl_distance_slope(float d, bool mse) {
    return mse ? 2.0f * d : (d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : (d == d ? 0.0f : d)));
}

/* Instantiates an extern "C" entry point per dtype: NAME_f32, NAME_f16, NAME_bf16. */
#define PL_INSTANTIATE(NAME, PARAMS, BODY)                                                     \
    extern "C" __global__ void __launch_bounds__(PL_BLOCK) NAME##_f32(PARAMS p) { BODY<float>(p); } \
    extern "C" __global__ void __launch_bounds__(PL_BLOCK) NAME##_f16(PARAMS p) { BODY<pl_f16>(p); } \
    extern "C" __global__ void __launch_bounds__(PL_BLOCK) NAME##_bf16(PARAMS p) { BODY<pl_bf16>(p); }
