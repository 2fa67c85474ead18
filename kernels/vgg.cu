/*
 * VGG helper kernels for the perceptual loss; cuDNN does the convolutions.
 *
 * Forward (pred and target batched as 2N images, NHWC, compute dtype):
 * preprocess -> [conv (cuDNN) -> bias+ReLU (+mask)] ... -> bias+ReLU+pool
 * in one pass (+mask, +argmax; pool alone where H or W is odd), and at each
 * tap one fused pass computing the distance and the tap's gradient.
 * Backward (pred half only): grad_step (tap adds and the ReLU mask in one
 * pass), unpool (with the ReLU before it in the same pass), conv
 * backward-data (cuDNN), and input_grad, which writes the caller's
 * gradient in its dtype and NCHW layout.
 *
 * All are memory-bound elementwise passes: grid-stride loops, one read and
 * one write per element, dtype switches that are uniform across the grid.
 * The tap loss uses the same deterministic two-stage reduction as the other
 * losses (common.cuh), so the loss is bit-identical run to run.
 */
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_preprocess(pl_k_preprocess_params p) {
    const int64_t hw = p.h * p.w, count = 2 * p.n * hw * p.cpad;
    PL_FOR_EACH(idx, count) {
        int64_t pix = pl_div(idx, p.cpad), ch = idx - pix * p.cpad;
        int64_t img = pl_div(pix, hw), ij = pix - img * hw;
        float v = 0.0f;  // padding channels stay zero
        if (ch < 3) {
            const void *src = img < p.n ? p.pred : p.target;
            int64_t n = img < p.n ? img : img - p.n;
            int64_t sc = p.c == 1 ? 0 : ch;
            v = pl_load(src, p.in_dtype, (n * p.c + sc) * hw + ij) * p.scale[ch] + p.shift[ch];
        }
        pl_store(p.out, p.out_dtype, idx, v);
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_bias_act(pl_k_bias_act_params p) {
    // Whole warps walk aligned groups of 32 elements so that one ballot
    // makes one mask word.
    const int lane = threadIdx.x & 31;
    const int64_t warps = (int64_t)gridDim.x * PL_WARPS;
    for (int64_t base = ((int64_t)blockIdx.x * PL_WARPS + (threadIdx.x >> 5)) * 32; base < p.count; base += warps * 32) {
        int64_t idx = base + lane;
        bool valid = idx < p.count, positive = false;
        if (valid) {
            float v = pl_load(p.x, p.dtype, idx);
            if (p.bias) v += p.bias[pl_mod(idx, p.c)];
            if (p.relu && !(v > 0.0f) && v == v) v = 0.0f;  // NaN propagates, as in PyTorch
            positive = v > 0.0f;
            pl_store(p.x, p.dtype, idx, v);
        }
        unsigned int word = __ballot_sync(0xffffffffu, valid && positive);
        if (p.mask && lane == 0 && base < p.pred_count) p.mask[base / 32] = word;
    }
}

/* 2x2 window -> pooled value; for max, the first maximum wins and NaN
 * propagates (PyTorch's rule), and `best` is its position (row-major). */
__device__ __forceinline__ float pool_window(const float v[4], bool avg, int &best) {
    best = 0;
    if (avg) return 0.25f * ((v[0] + v[1]) + (v[2] + v[3]));
    for (int k = 1; k < 4; ++k)
        if (v[k] > v[best] || (v[k] != v[k] && v[best] == v[best])) best = k;
    return v[best];
}

/* Stores the 2-bit argmax of a warp's 32 consecutive outputs, starting at
 * `base` (a multiple of 32); every lane of the warp must call it. */
__device__ __forceinline__ void store_argmax(uint32_t *argmax, int64_t base, bool active, int best) {
    unsigned int lo = __ballot_sync(0xffffffffu, active && (best & 1));
    unsigned int hi = __ballot_sync(0xffffffffu, active && (best & 2));
    if ((threadIdx.x & 31) == 0) {
        argmax[base / 16] = lo;
        argmax[base / 16 + 1] = hi;
    }
}

__device__ __forceinline__ int load_argmax(const uint32_t *argmax, int64_t o) {
    const int64_t word = (o >> 5) * 2;
    const int bit = (int)(o & 31);
    return (int)((argmax[word] >> bit) & 1u) | (int)(((argmax[word + 1] >> bit) & 1u) << 1);
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_pool(pl_k_pool_params p) {
    // Warp-aligned groups of 32 outputs, so the argmax packs by ballot.
    const int lane = threadIdx.x & 31;
    const int64_t oh = p.h / 2, ow = p.w / 2, count = p.images * oh * ow * p.c;
    const int64_t pred_count = p.pred_images * oh * ow * p.c;
    const int64_t warps = (int64_t)gridDim.x * PL_WARPS;
    for (int64_t base = ((int64_t)blockIdx.x * PL_WARPS + (threadIdx.x >> 5)) * 32; base < count; base += warps * 32) {
        int64_t idx = base + lane;
        int best = 0;
        if (idx < count) {
            int64_t rest = pl_div(idx, p.c), ch = idx - rest * p.c;
            int64_t next = pl_div(rest, ow), j = rest - next * ow;
            int64_t img = pl_div(next, oh), i = next - img * oh;
            const int64_t row = p.w * p.c;
            int64_t at = ((img * p.h + 2 * i) * p.w + 2 * j) * p.c + ch;
            float v[4] = {pl_load(p.x, p.dtype, at), pl_load(p.x, p.dtype, at + p.c),
                          pl_load(p.x, p.dtype, at + row), pl_load(p.x, p.dtype, at + row + p.c)};
            pl_store(p.y, p.dtype, idx, pool_window(v, p.avg, best));
        }
        if (p.argmax && base < pred_count) store_argmax(p.argmax, base, idx < pred_count, best);
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_bias_act_pool(pl_k_bias_act_pool_params p) {
    // Whole warps walk aligned groups of 32 pooled outputs: with C a
    // multiple of 32 they are 32 channels of one pixel, so each of the 4
    // window positions is 32 consecutive, aligned inputs, and one ballot
    // per position makes one mask word.
    const int lane = threadIdx.x & 31;
    const int64_t oh = p.h / 2, ow = p.w / 2, count = p.images * oh * ow * p.c;
    const int64_t warps = (int64_t)gridDim.x * PL_WARPS;
    for (int64_t base = ((int64_t)blockIdx.x * PL_WARPS + (threadIdx.x >> 5)) * 32; base < count; base += warps * 32) {
        int64_t idx = base + lane;  // count is a multiple of 32: every lane is in range
        int64_t rest = pl_div(idx, p.c), ch = idx - rest * p.c;
        int64_t next = pl_div(rest, ow), j = rest - next * ow;
        int64_t img = pl_div(next, oh), i = next - img * oh;
        const bool pred = img < p.pred_images;  // uniform across the warp
        const float b = p.bias ? p.bias[ch] : 0.0f;
        float v[4];
        for (int q = 0; q < 4; ++q) {
            int64_t at = ((img * p.h + 2 * i + (q >> 1)) * p.w + 2 * j + (q & 1)) * p.c + ch;
            float x = pl_load(p.x, p.dtype, at) + b;
            if (!(x > 0.0f) && x == x) x = 0.0f;  // NaN propagates, as in PyTorch
            // Rounded as stored, so the pooled value is the pool of the stored ReLU output.
            x = pl_round(x, p.dtype);
            if (p.keep) pl_store(p.x, p.dtype, at, x);
            unsigned int word = __ballot_sync(0xffffffffu, x > 0.0f);
            if (p.mask && pred && lane == 0) p.mask[at >> 5] = word;
            v[q] = x;
        }
        int best;
        pl_store(p.y, p.dtype, idx, pool_window(v, p.avg, best));
        if (p.argmax && pred) store_argmax(p.argmax, base, true, best);
    }
}

/* Last block of a tap: per-image means, then the weighted batch mean. */
__device__ __forceinline__ void tap_finish(const pl_k_tap_params &p) {
    double total = 0.0;
    for (int64_t n = threadIdx.x; n < p.n; n += PL_BLOCK) {
        double mean = pl_image_sum(p.reduce, n, p.blocks_per_image) / (double)p.per_image;
        if (p.reduce.per_sample) {
            float v = (float)(p.weight * mean);
            p.reduce.per_sample[n] = p.accumulate_per_sample ? p.reduce.per_sample[n] + v : v;
        }
        total += mean;
    }
    total = pl_block_sum(total);
    if (threadIdx.x == 0) {
        float v = (float)(total * p.weight / (double)p.batch);
        *p.reduce.loss = p.accumulate ? *p.reduce.loss + v : v;
    }
    pl_reset_counter(p.reduce);
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_tap(pl_k_tap_params p) {
    const bool mse = p.criterion == PL_K_MSE;
    // d(weight * mean over the batch of mean_image D) / d a
    const float scale = (float)((double)p.weight / ((double)p.batch * (double)p.per_image));
    const int64_t begin = blockIdx.x * p.per_block;
    const int64_t end = min(p.per_image, begin + p.per_block);
    const int64_t target_offset = p.n * p.per_image;
    for (int64_t n = blockIdx.y; n < p.n; n += gridDim.y) {
        double acc = 0.0;
        for (int64_t k = begin + threadIdx.x; k < end; k += PL_BLOCK) {
            int64_t i = n * p.per_image + k;
            float d = pl_load(p.x, p.dtype, i) - pl_load(p.x, p.dtype, target_offset + i);
            acc += (double)(mse ? d * d : fabsf(d));
            if (p.grad) {
                float g = mse ? 2.0f * d : (d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : (d == d ? 0.0f : d)));
                pl_store(p.grad, p.dtype, i, g * scale);
            }
        }
        double block_sum = pl_block_sum(acc);
        unsigned int total = (unsigned int)(p.blocks_per_image * p.n);
        if (pl_publish_partial(p.reduce, n * p.blocks_per_image + blockIdx.x, block_sum, total)) tap_finish(p);
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_grad_step(pl_k_grad_step_params p) {
    PL_FOR_EACH(i, p.count) {
        float v = pl_load(p.g, p.dtype, i);
        if (p.before) v += pl_load(p.before, p.dtype, i);
        if (p.mask && !((p.mask[i >> 5] >> (i & 31)) & 1u)) v = 0.0f;
        if (p.after) v += pl_load(p.after, p.dtype, i);
        pl_store(p.g, p.dtype, i, v);
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_unpool(pl_k_unpool_params p) {
    // One thread per input element gathers from its window's output: no atomics.
    const int64_t oh = p.h / 2, ow = p.w / 2, count = p.n * p.h * p.w * p.c;
    PL_FOR_EACH(idx, count) {
        int64_t rest = pl_div(idx, p.c), ch = idx - rest * p.c;
        int64_t next = pl_div(rest, p.w), j = rest - next * p.w;
        int64_t img = pl_div(next, p.h), i = next - img * p.h;
        float v = 0.0f;  // rows and columns the floor dropped get no gradient
        if (i / 2 < oh && j / 2 < ow) {
            int64_t o = ((img * oh + i / 2) * ow + j / 2) * p.c + ch;
            int pos = (int)((i & 1) * 2 + (j & 1));
            if (!p.argmax || load_argmax(p.argmax, o) == pos) {
                v = pl_load(p.gy, p.dtype, o);
                if (p.before) v += pl_load(p.before, p.dtype, o);
                if (!p.argmax) v *= 0.25f;
            }
        }
        // The ReLU before the pool, as pl_vgg_grad_step would do it.
        if (p.relu_before) v += pl_load(p.relu_before, p.dtype, idx);
        if (p.mask && !((p.mask[idx >> 5] >> (idx & 31)) & 1u)) v = 0.0f;
        if (p.after) v += pl_load(p.after, p.dtype, idx);
        pl_store(p.gx, p.dtype, idx, v);
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_input_grad(pl_k_input_grad_params p) {
    const int64_t hw = p.h * p.w, count = p.n * p.c * hw;
    PL_FOR_EACH(idx, count) {
        int64_t rest = pl_div(idx, hw), ij = idx - rest * hw;
        int64_t n = pl_div(rest, p.c), ch = rest - n * p.c;
        const int64_t at = (n * hw + ij) * p.cpad;
        float v;
        if (p.c == 1) {  // the gray channel fed all three
            v = pl_load(p.g, p.g_dtype, at) * p.scale[0] + pl_load(p.g, p.g_dtype, at + 1) * p.scale[1] +
                pl_load(p.g, p.g_dtype, at + 2) * p.scale[2];
        } else {
            v = pl_load(p.g, p.g_dtype, at + ch) * p.scale[ch];
        }
        if (p.beta != 0.0f) v = fmaf(p.beta, pl_load(p.grad, p.out_dtype, idx), v);
        pl_store(p.grad, p.out_dtype, idx, v);
    }
}
