/*
 * VGG helper kernels for the perceptual loss; cuDNN does the convolutions.
 * One kernel per step kind of the schedule (src/ops/perceptual/cuda/
 * schedule/steps.rs), launched by src/ops/perceptual/cuda/steps/ and tested
 * step by step against the CPU layers they replace (src/ops/perceptual/cuda/steps/tests/).
 *
 * Forward (pred and target batched as 2N images, NHWC, compute dtype):
 * preprocess -> [conv (cuDNN) -> bias_act (+mask)] ... -> bias_act_pool
 * in one pass (+mask, +argmax; pool alone where H or W is odd), and at each
 * tap tap_loss computing the distance and the tap's gradient; a tapped ReLU
 * before a pool runs ReLU, pool and tap in one pass (bias_act_pool_tap).
 * Backward (pred half only): relu_backward (tap adds and the ReLU mask in
 * one pass), unpool (with the ReLU before it in the same pass), conv
 * backward-data (cuDNN), and input_grad, which writes the caller's
 * gradient in its dtype and NCHW layout.
 * A style tap takes the Gram matrices of pred and target (gram, and
 * gram_sum when split along the pixels), compares them with tap_loss in
 * f32, and turns dL/dG into the tap's feature gradient (gram_backward)
 * before the next layer runs, so backward sees it like any tap's.
 * Against a kept target (set_target) the batch is pred alone: the taps read
 * the target's features (or Grams) kept by an earlier forward over the
 * target alone, which copied them out (copy).
 *
 * All are memory-bound elementwise passes: grid-stride loops, one read and
 * one write per element, PL_VEC elements per thread in 16-byte accesses,
 * dtype switches that are uniform across the grid.
 * The tap loss uses the same deterministic two-stage reduction as the other
 * losses (common.cuh), so the loss is bit-identical run to run.
 */
#include "common.cuh"

/* One pixel per thread: its 1 or 3 channels are read from planes that
 * neighbouring threads read at neighbouring addresses, and its cpad
 * channels are written at once (one 16-byte store for 16-bit dtypes). */
extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_preprocess(pl_k_preprocess_params p) {
    const int64_t hw = p.h * p.w;
    const void *pred = pl_call_addr(p.call, p.pred), *target = pl_call_addr(p.call, p.target);
    PL_FOR_EACH(pix, (target ? 2 : 1) * p.n * hw) {
        const int64_t img = pl_div(pix, hw), ij = pix - img * hw;
        const void *src = img < p.n ? pred : target;
        const int64_t n = img < p.n ? img : img - p.n;
        float v[PL_VEC] = {};  // padding channels stay zero
        for (int ch = 0; ch < 3; ++ch) {
            const int64_t sc = p.c == 1 ? 0 : ch;
            v[ch] = pl_load(src, p.in_dtype, (n * p.c + sc) * hw + ij) * p.scale[ch] + p.shift[ch];
        }
        if (p.cpad == PL_VEC) {
            pl_store8(p.out, p.out_dtype, pix * PL_VEC, v);
        } else {
            for (int ch = 0; ch < p.cpad; ++ch) pl_store(p.out, p.out_dtype, pix * p.cpad + ch, ch < 3 ? v[ch] : 0.0f);
        }
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_bias_act(pl_k_bias_act_params p) {
    // PL_VEC consecutive channels of one pixel per thread; their mask bits
    // are one byte (bit k of word k/32 is bit k%8 of byte k/8).
    uint8_t *mask = reinterpret_cast<uint8_t *>(p.mask);
    PL_FOR_EACH(t, p.count / PL_VEC) {
        const int64_t i = t * PL_VEC, ch = p.bias ? pl_mod(i, p.c) : 0;
        float v[PL_VEC];
        pl_load8(p.x, p.dtype, i, v);
        unsigned int bits = 0;
        for (int k = 0; k < PL_VEC; ++k) {
            if (p.bias) v[k] += p.bias[ch + k];
            if (p.relu && !(v[k] > 0.0f) && v[k] == v[k]) v[k] = 0.0f;  // NaN propagates, as in PyTorch
            // The mask of the stored value, as PyTorch's ReLU backward sees it.
            bits |= (unsigned int)(pl_round(v[k], p.dtype) > 0.0f) << k;
        }
        pl_store8(p.x, p.dtype, i, v);
        if (mask && i < p.pred_count) mask[t] = (uint8_t)bits;
    }
}

/* 2x2 window -> pooled value; for max, the first maximum wins and NaN
 * propagates (PyTorch's rule), and `best` is its position (row-major). */
__device__ __forceinline__ float pool_window(const float v[4], bool avg, int &best) {
    best = 0;
    if (avg) return 0.25f * ((v[0] + v[1]) + (v[2] + v[3]));
    float m = v[0];  // kept in a register: no indexing by `best`
    for (int k = 1; k < 4; ++k) {
        if (v[k] > m || (v[k] != v[k] && m == m)) {
            m = v[k];
            best = k;
        }
    }
    return m;
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

/* Last block of a tap: per-image means, then the weighted batch mean. */
__device__ __forceinline__ void tap_finish(const pl_k_tap_loss_params &p) {
    pl_finish_means(p.reduce, p.n, p.blocks_per_image, p.per_image, p.weight, p.batch, p.accumulate,
                    p.accumulate_per_sample);
}

/* x + bias, ReLU, rounded as stored (so a pool of these is the pool of the
 * stored ReLU output), over one thread's PL_VEC channels from `ch`; returns
 * their mask bits. NaN propagates, as in PyTorch. */
__device__ __forceinline__ unsigned int relu8(float x[PL_VEC], const float *bias, int64_t ch, int dtype) {
    unsigned int bits = 0;
    for (int k = 0; k < PL_VEC; ++k) {
        float v = x[k] + (bias ? bias[ch + k] : 0.0f);
        if (!(v > 0.0f) && v == v) v = 0.0f;
        v = pl_round(v, dtype);
        bits |= (unsigned int)(v > 0.0f) << k;
        x[k] = v;
    }
    return bits;
}

/* A 2x2 pool of PL_VEC channels, folded in one window position q (0..3,
 * row-major) at a time: the running max and its argmax bits (first maximum
 * wins, NaN propagates, as pool_window), or the average's row sums in
 * pool_window's order. */
struct Pool8 {
    float m[PL_VEC], row[PL_VEC];
    unsigned int lo, hi;
};

__device__ __forceinline__ void pool8_add(Pool8 &a, int q, const float v[PL_VEC], bool avg) {
    if (q == 0) a.lo = a.hi = 0;
    for (int k = 0; k < PL_VEC; ++k) {
        if (avg) {
            a.row[k] = (q & 1) ? a.row[k] + v[k] : v[k];
            if (q == 1) a.m[k] = a.row[k];  // m keeps the first row's sum
        } else if (q == 0 || v[k] > a.m[k] || (v[k] != v[k] && a.m[k] == a.m[k])) {
            a.m[k] = v[k];
            a.lo = (a.lo & ~(1u << k)) | (unsigned int)(q & 1) << k;
            a.hi = (a.hi & ~(1u << k)) | (unsigned int)(q >> 1) << k;
        }
    }
}

/* Stores the pooled values at output `idx` and, when `argmax` is given,
 * their argmax bits: byte (idx % 32) / 8 of the low word 2 (idx / 32) and
 * of the high word after it. */
__device__ __forceinline__ void pool8_store(const Pool8 &a, bool avg, void *y, int dtype, int64_t idx, uint8_t *argmax) {
    float out[PL_VEC];
    for (int k = 0; k < PL_VEC; ++k) out[k] = avg ? 0.25f * (a.m[k] + a.row[k]) : a.m[k];
    pl_store8(y, dtype, idx, out);
    if (argmax) {
        const int64_t byte = (idx >> 5) * 8 + ((idx & 31) >> 3);
        argmax[byte] = (uint8_t)a.lo;
        argmax[byte + 4] = (uint8_t)a.hi;
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_bias_act_pool(pl_k_bias_act_pool_params p) {
    // PL_VEC consecutive channels of one pooled pixel per thread. Mask
    // bits and argmax bits of those channels are one byte each (see
    // pl_kernel_abi.h for both layouts).
    uint8_t *mask = reinterpret_cast<uint8_t *>(p.mask);
    uint8_t *argmax = reinterpret_cast<uint8_t *>(p.argmax);
    const int64_t oh = p.h / 2, ow = p.w / 2, count = p.images * oh * ow * p.c;
    PL_FOR_EACH(t, count / PL_VEC) {
        const int64_t idx = t * PL_VEC;
        int64_t rest = pl_div(idx, p.c), ch = idx - rest * p.c;
        int64_t next = pl_div(rest, ow), j = rest - next * ow;
        int64_t img = pl_div(next, oh), i = next - img * oh;
        const bool pred = img < p.pred_images;
        Pool8 acc;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int64_t at = ((img * p.h + 2 * i + (q >> 1)) * p.w + 2 * j + (q & 1)) * p.c + ch;
            float x[PL_VEC];
            pl_load8(p.x, p.dtype, at, x);
            const unsigned int bits = relu8(x, p.bias, ch, p.dtype);
            if (mask && pred) mask[at / PL_VEC] = (uint8_t)bits;
            pool8_add(acc, q, x, p.avg);
        }
        pool8_store(acc, p.avg, p.y, p.dtype, idx, pred ? argmax : nullptr);
    }
}

/* The pooling kind is a template argument: max-pooling then keeps no row
 * sums and average pooling no argmax in registers. So is a kept target
 * (KEPT), read as the ReLU output it was stored as, and not pooled: the
 * pass over [pred; target] keeps its registers. */
template <bool AVG, bool KEPT>
__device__ __forceinline__ void bias_act_pool_tap(const pl_k_bias_act_pool_tap_params &p) {
    // The tap's grid and reduction (see pl_vgg_tap_loss), over units of PL_VEC
    // channels of one pooled pixel: each thread reads the 2x2 window of
    // pred and of target once, and from it writes the pred mask, both
    // pooled outputs (pred's alone when KEPT), the pred argmax, and the
    // tap's distance and gradient at all four positions. The ReLU output
    // itself is never stored.
    const pl_k_tap_loss_params &t = p.tap;
    uint8_t *mask = reinterpret_cast<uint8_t *>(p.mask);
    uint8_t *argmax = reinterpret_cast<uint8_t *>(p.argmax);
    const bool mse = t.criterion == PL_K_MSE;
    const float scale = (float)((double)t.weight / ((double)t.batch * (double)t.per_image));
    const int64_t oh = p.h / 2, ow = p.w / 2, groups = p.c / PL_VEC, units = groups * oh * ow;
    const int64_t pooled = units * PL_VEC;  // pooled values per image
    const int64_t begin = blockIdx.x * t.per_block;
    const int64_t end = min(units, begin + t.per_block);
    for (int64_t n = blockIdx.y; n < t.n; n += gridDim.y) {
        double sum = 0.0;
        // A shared kept target is one image: its index runs behind pred's.
        const int64_t behind = KEPT && t.target_shared ? n * t.per_image : 0;
        for (int64_t u = begin + threadIdx.x; u < end; u += PL_BLOCK) {
            int64_t pix = pl_div(u, groups), ch = (u - pix * groups) * PL_VEC;
            int64_t i = pl_div(pix, ow), j = pix - i * ow;
            Pool8 pa, ta;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int64_t at = n * t.per_image + ((2 * i + (q >> 1)) * p.w + 2 * j + (q & 1)) * p.c + ch;
                float a[PL_VEC], b[PL_VEC];
                pl_load8(t.x, t.dtype, at, a);
                pl_load8(t.target, t.dtype, at - behind, b);
                const unsigned int bits = relu8(a, p.bias, ch, t.dtype);
                if (mask) mask[at / PL_VEC] = (uint8_t)bits;
                pool8_add(pa, q, a, AVG);
                if (!KEPT) {
                    relu8(b, p.bias, ch, t.dtype);
                    pool8_add(ta, q, b, AVG);
                }
                for (int k = 0; k < PL_VEC; ++k) {
                    const float d = a[k] - b[k];
                    sum += pl_distance(d, mse);
                    a[k] = pl_distance_slope(d, mse) * scale;
                }
                // The same thread read these pred values: writing over them is safe.
                if (t.grad) pl_store8(t.grad, t.dtype, at, a);
            }
            const int64_t o = n * pooled + pix * p.c + ch;
            pool8_store(pa, AVG, p.y, t.dtype, o, argmax);
            if (!KEPT) pool8_store(ta, AVG, p.y_target, t.dtype, o, nullptr);
        }
        double block_sum = pl_block_sum(sum);
        unsigned int total = (unsigned int)(t.blocks_per_image * t.n);
        if (pl_publish_partial(t.reduce, n * t.blocks_per_image + blockIdx.x, block_sum, total)) tap_finish(t);
    }
}

/* Three blocks per SM: about 80 registers a thread without spilling
 * (ptxas), where the unconstrained build takes ~110 and fits only two. */
extern "C" __global__ void __launch_bounds__(PL_BLOCK, 3) pl_vgg_bias_act_pool_tap(pl_k_bias_act_pool_tap_params p) {
    if (p.target_kept) {
        if (p.avg) {
            bias_act_pool_tap<true, true>(p);
        } else {
            bias_act_pool_tap<false, true>(p);
        }
    } else if (p.avg) {
        bias_act_pool_tap<true, false>(p);
    } else {
        bias_act_pool_tap<false, false>(p);
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_tap_loss(pl_k_tap_loss_params p) {
    const bool fro = p.criterion == PL_K_FRO, mse = p.criterion == PL_K_MSE || fro;
    // d(weight * mean over the batch of mean_image D) / d a; for Fro the
    // first launch's weight / (2 |D|), read by the second
    const float scale = fro ? (p.grad ? *p.norm_scale : 0.0f)
                            : (float)((double)p.weight / ((double)p.batch * (double)p.per_image));
    // per_block counts vectors of PL_VEC elements; per_image is a multiple of PL_VEC
    const int64_t begin = blockIdx.x * p.per_block * PL_VEC;
    const int64_t end = min(p.per_image, begin + p.per_block * PL_VEC);
    if (fro && p.grad) {
        // The Fro gradient launch: no reduction.
        for (int64_t n = blockIdx.y; n < p.n; n += gridDim.y) {
            const int64_t behind = p.target_shared ? n * p.per_image : 0;
            for (int64_t k = begin + threadIdx.x * PL_VEC; k < end; k += PL_BLOCK * PL_VEC) {
                const int64_t i = n * p.per_image + k;
                float a[PL_VEC], b[PL_VEC];
                pl_load8(p.x, p.dtype, i, a);
                pl_load8(p.target, p.dtype, i - behind, b);
                for (int e = 0; e < PL_VEC; ++e) a[e] = 2.0f * (a[e] - b[e]) * scale;
                pl_store8(p.grad, p.dtype, i, a);
            }
        }
        return;
    }
    for (int64_t n = blockIdx.y; n < p.n; n += gridDim.y) {
        double acc = 0.0;
        // A shared target is one image: its index runs behind pred's.
        const int64_t behind = p.target_shared ? n * p.per_image : 0;
        for (int64_t k = begin + threadIdx.x * PL_VEC; k < end; k += PL_BLOCK * PL_VEC) {
            const int64_t i = n * p.per_image + k;
            float a[PL_VEC], b[PL_VEC];
            pl_load8(p.x, p.dtype, i, a);
            pl_load8(p.target, p.dtype, i - behind, b);
            for (int e = 0; e < PL_VEC; ++e) {
                const float d = a[e] - b[e];
                acc += pl_distance(d, mse);
                a[e] = pl_distance_slope(d, mse) * scale;
            }
            if (p.grad) pl_store8(p.grad, p.dtype, i, a);
        }
        double block_sum = pl_block_sum(acc);
        unsigned int total = (unsigned int)(p.blocks_per_image * p.n);
        if (pl_publish_partial(p.reduce, n * p.blocks_per_image + blockIdx.x, block_sum, total)) {
            if (fro) {
                pl_finish_norms(p.reduce, p.n, p.blocks_per_image, p.weight, p.accumulate, p.accumulate_per_sample,
                                p.norm_scale);
            } else {
                tap_finish(p);
            }
        }
    }
}

/* g = (g + before) * mask + after over PL_VEC elements from i; each term optional. */
__device__ __forceinline__ void relu_grad(float g[PL_VEC], const void *before, const uint8_t *mask, const void *after,
                                          int dtype, int64_t i) {
    float t[PL_VEC];
    if (before) {
        pl_load8(before, dtype, i, t);
        for (int k = 0; k < PL_VEC; ++k) g[k] += t[k];
    }
    if (mask) {
        const unsigned int bits = mask[i / PL_VEC];
        for (int k = 0; k < PL_VEC; ++k)
            if (!((bits >> k) & 1u)) g[k] = 0.0f;
    }
    if (after) {
        pl_load8(after, dtype, i, t);
        for (int k = 0; k < PL_VEC; ++k) g[k] += t[k];
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_relu_backward(pl_k_relu_backward_params p) {
    const uint8_t *mask = reinterpret_cast<const uint8_t *>(p.mask);
    PL_FOR_EACH(t, p.count / PL_VEC) {
        float g[PL_VEC];
        pl_load8(p.g, p.dtype, t * PL_VEC, g);
        relu_grad(g, p.before, mask, p.after, p.dtype, t * PL_VEC);
        pl_store8(p.g, p.dtype, t * PL_VEC, g);
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_unpool(pl_k_unpool_params p) {
    // PL_VEC channels of one input pixel per thread gather from their
    // window's output: no atomics.
    const uint32_t *argmax = p.argmax;
    const int64_t oh = p.h / 2, ow = p.w / 2, count = p.n * p.h * p.w * p.c;
    PL_FOR_EACH(t, count / PL_VEC) {
        const int64_t idx = t * PL_VEC;
        int64_t rest = pl_div(idx, p.c), ch = idx - rest * p.c;
        int64_t next = pl_div(rest, p.w), j = rest - next * p.w;
        int64_t img = pl_div(next, p.h), i = next - img * p.h;
        float v[PL_VEC] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // rows and columns the floor dropped get none
        if (i / 2 < oh && j / 2 < ow) {
            const int64_t o = ((img * oh + i / 2) * ow + j / 2) * p.c + ch;
            const unsigned int pos = (unsigned int)((i & 1) * 2 + (j & 1));
            float b[PL_VEC];
            pl_load8(p.gy, p.dtype, o, v);
            if (p.before) {
                pl_load8(p.before, p.dtype, o, b);
                for (int k = 0; k < PL_VEC; ++k) v[k] += b[k];
            }
            if (argmax) {
                const int64_t word = (o >> 5) * 2;
                const int shift = (int)(o & 31);
                const unsigned int lo = argmax[word] >> shift, hi = argmax[word + 1] >> shift;
                for (int k = 0; k < PL_VEC; ++k)
                    if ((((lo >> k) & 1u) | (((hi >> k) & 1u) << 1)) != pos) v[k] = 0.0f;
            } else {
                for (int k = 0; k < PL_VEC; ++k) v[k] *= 0.25f;
            }
        }
        // The ReLU before the pool, as pl_vgg_relu_backward would do it.
        relu_grad(v, p.relu_before, reinterpret_cast<const uint8_t *>(p.mask), p.after, p.dtype, idx);
        pl_store8(p.gx, p.dtype, idx, v);
    }
}

/* One pixel per thread: its cpad gradient channels are read at once (one
 * 16-byte load for 16-bit dtypes) and its c outputs written to planes that
 * neighbouring threads write at neighbouring addresses. */
extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_input_grad(pl_k_input_grad_params p) {
    const int64_t hw = p.h * p.w;
    void *grad = pl_call_addr(p.call, p.grad);
    PL_FOR_EACH(pix, p.n * hw) {
        const int64_t n = pl_div(pix, hw), ij = pix - n * hw;
        float g[PL_VEC];
        if (p.cpad == PL_VEC) {
            pl_load8(p.g, p.g_dtype, pix * PL_VEC, g);
        } else {
            for (int ch = 0; ch < 3; ++ch) g[ch] = pl_load(p.g, p.g_dtype, pix * p.cpad + ch);
        }
        for (int ch = 0; ch < p.c; ++ch) {
            // The gray channel fed all three.
            float v = p.c == 1 ? g[0] * p.scale[0] + g[1] * p.scale[1] + g[2] * p.scale[2] : g[ch] * p.scale[ch];
            const int64_t idx = (n * p.c + ch) * hw + ij;
            if (p.beta != 0.0f) v = fmaf(p.beta, pl_load(grad, p.out_dtype, idx), v);
            pl_store(grad, p.out_dtype, idx, v);
        }
    }
}

/* Tiles of 32 x 32: one warp's lanes take one channel each (coalesced
 * loads of a pixel's channels), the 8 warps 4 rows each. */
#define PL_GT 32

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_gram(pl_k_gram_params p) {
    // Rows of F: a[q][i] = F[r + q][ti * 32 + i], b likewise for tile tj.
    // G[i][j] and G[j][i] add the same products in the same order, so the
    // matrix is symmetric to the bit.
    __shared__ float a[PL_GT][PL_GT + 1], b[PL_GT][PL_GT + 1];
    const int tiles = (p.c + PL_GT - 1) / PL_GT;
    const int ti = blockIdx.x / tiles, tj = blockIdx.x - ti * tiles;
    const int tx = threadIdx.x % PL_GT, ty = threadIdx.x / PL_GT;
    const int ci = ti * PL_GT + tx, cj = tj * PL_GT + tx;
    for (int64_t z = blockIdx.y; z < p.count * p.slices; z += gridDim.y) {
        const int64_t img = pl_div(z, p.slices), slice = z - img * p.slices;
        const bool first = img < p.split;
        const void *src = first ? p.x : p.x2;
        const int64_t base = (first ? img : img - p.split) * p.m * p.c;
        const int64_t r0 = slice * p.rows_per_slice, r1 = min(p.m, r0 + p.rows_per_slice);
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int64_t r = r0; r < r1; r += PL_GT) {
            for (int k = 0; k < 4; ++k) {
                const int row = ty + 8 * k;
                const int64_t at = base + (r + row) * p.c;
                const bool in = r + row < r1;
                a[row][tx] = in && ci < p.c ? pl_load(src, p.dtype, at + ci) : 0.0f;
                b[row][tx] = in && cj < p.c ? pl_load(src, p.dtype, at + cj) : 0.0f;
            }
            __syncthreads();
            for (int q = 0; q < PL_GT; ++q) {
                const float bj = b[q][tx];
                for (int k = 0; k < 4; ++k) acc[k] = fmaf(a[q][ty * 4 + k], bj, acc[k]);
            }
            __syncthreads();
        }
        const float scale = p.slices == 1 ? p.scale : 1.0f;
        for (int k = 0; k < 4; ++k) {
            const int i = ti * PL_GT + ty * 4 + k;
            if (i < p.c && cj < p.c) p.out[((slice * p.count + img) * p.c + i) * p.c + cj] = acc[k] * scale;
        }
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_gram_sum(pl_k_gram_sum_params p) {
    PL_FOR_EACH(i, p.len) {
        float sum = 0.0f;
        for (int k = 0; k < p.slices; ++k) sum += p.partial[k * p.len + i];
        p.out[i] = sum * p.scale;
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_gram_backward(pl_k_gram_backward_params p) {
    // A 32-pixel x 32-channel tile of dF per block: f[q][j] = F[pixel q][j0 + j],
    // s[j][c] = (E + E^T)[c][j0 + j], summed over j in f32.
    __shared__ float f[PL_GT][PL_GT + 1], s[PL_GT][PL_GT + 1];
    const int ctiles = (p.c + PL_GT - 1) / PL_GT;
    const int64_t tiles = pl_div(p.m + PL_GT - 1, PL_GT) * ctiles;
    const int tx = threadIdx.x % PL_GT, ty = threadIdx.x / PL_GT;
    for (int64_t img = blockIdx.y; img < p.n; img += gridDim.y) {
        const float *e = p.e + img * p.c * p.c;
        for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
            const int64_t pt = pl_div(t, ctiles);
            const int cc = (int)(t - pt * ctiles) * PL_GT + tx;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int j0 = 0; j0 < p.c; j0 += PL_GT) {
                for (int k = 0; k < 4; ++k) {
                    const int row = ty + 8 * k;
                    const int64_t pix = pt * PL_GT + row;
                    const int j = j0 + tx, jj = j0 + row;
                    f[row][tx] = pix < p.m && j < p.c ? pl_load(p.x, p.dtype, (img * p.m + pix) * p.c + j) : 0.0f;
                    s[row][tx] = jj < p.c && cc < p.c ? e[cc * p.c + jj] + e[jj * p.c + cc] : 0.0f;
                }
                __syncthreads();
                for (int q = 0; q < PL_GT; ++q) {
                    const float sv = s[q][tx];
                    for (int k = 0; k < 4; ++k) acc[k] = fmaf(f[ty * 4 + k][q], sv, acc[k]);
                }
                __syncthreads();
            }
            for (int k = 0; k < 4; ++k) {
                const int64_t pix = pt * PL_GT + ty * 4 + k;
                if (pix >= p.m || cc >= p.c) continue;
                const int64_t idx = (img * p.m + pix) * p.c + cc;
                float v = acc[k] * p.scale;
                if (p.accumulate) v += pl_load(p.grad, p.dtype, idx);
                pl_store(p.grad, p.dtype, idx, v);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_parts_total(pl_k_parts_params p) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    for (int k = 0; k < 2; ++k)
        if (!p.present[k]) p.parts[k] = 0.0f;
    *p.loss = p.parts[0] + p.parts[1];
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_call_table(pl_k_call_table_params p) {
    if (blockIdx.x == 0 && threadIdx.x < PL_K_CALL_SLOTS) p.table[threadIdx.x] = p.addrs[threadIdx.x];
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_publish(pl_k_publish_params p) {
    if (blockIdx.x != 0) return;
    float *per_sample = pl_call_addr(p.call, p.per_sample);
    if (per_sample)
        for (int64_t i = threadIdx.x; i < p.n; i += PL_BLOCK) per_sample[i] = p.from[PL_K_PUBLISH_PER_SAMPLE_AT + i];
    if (threadIdx.x != 0) return;
    *pl_call_addr(p.call, p.loss) = p.from[0];
    float *parts = pl_call_addr(p.call, p.parts);
    if (parts) parts[0] = p.from[PL_K_PUBLISH_PARTS_AT], parts[1] = p.from[PL_K_PUBLISH_PARTS_AT + 1];
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_copy(pl_k_copy_params p) {
    PL_FOR_EACH(t, p.count / PL_VEC) {
        float v[PL_VEC];
        pl_load8(p.src, p.dtype, t * PL_VEC, v);
        pl_store8(p.dst, p.dtype, t * PL_VEC, v);
    }
}

/* Sum over a warp's lanes, the same in every lane (a fixed butterfly). */
__device__ __forceinline__ float pl_warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

#define PL_LPIPS_MAX_C 512

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_vgg_lpips_tap(pl_k_lpips_tap_params p) {
    // One warp per pixel, its lanes over the channels (lane + 32 k): a
    // pixel's channels are contiguous in NHWC. The warp reads all of them
    // before it writes the gradient, so grad may be x itself.
    const pl_k_tap_loss_params &t = p.tap;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, per_lane = p.c / 32;
    const float scale = (float)((double)t.weight / ((double)t.batch * (double)t.per_image));
    const int64_t begin = blockIdx.x * t.per_block, end = min(t.per_image, begin + t.per_block);
    for (int64_t n = blockIdx.y; n < t.n; n += gridDim.y) {
        double acc = 0.0;
        // A shared target is one image: its index runs behind pred's.
        const int64_t behind = t.target_shared ? n * t.per_image * p.c : 0;
        for (int64_t pix = begin + warp; pix < end; pix += PL_WARPS) {
            const int64_t base = (n * t.per_image + pix) * p.c;
            float a[PL_LPIPS_MAX_C / 32], b[PL_LPIPS_MAX_C / 32];
            float sa = 0.0f, sb = 0.0f;
            for (int k = 0; k < per_lane; ++k) {
                a[k] = pl_load(t.x, t.dtype, base + lane + 32 * k);
                b[k] = pl_load(t.target, t.dtype, base - behind + lane + 32 * k);
                sa = fmaf(a[k], a[k], sa);
                sb = fmaf(b[k], b[k], sb);
            }
            const float na = sqrtf(pl_warp_sum(sa)), nb = sqrtf(pl_warp_sum(sb));
            const float ia = 1.0f / (na + 1e-10f), ib = 1.0f / (nb + 1e-10f);
            float v = 0.0f, dot = 0.0f;
            for (int k = 0; k < per_lane; ++k) {
                const float w = p.lin[lane + 32 * k], d = a[k] * ia - b[k] * ib;
                v = fmaf(w * d, d, v);
                b[k] = 2.0f * w * d;  // dv/dn(x)
                dot = fmaf(b[k], a[k], dot);
            }
            v = pl_warp_sum(v);
            dot = pl_warp_sum(dot);
            if (lane == 0) acc += (double)v;
            if (p.map && lane == 0) p.map[n * p.map_stride + pix] = t.weight * v;
            if (!t.grad) continue;
            // The spatial map's gradient takes this pixel's share of dL/dmap
            // in place of the mean's weight / (batch * pixels).
            const float s = p.pixel_scale ? t.weight * p.pixel_scale[n * p.map_stride + pix] : scale;
            for (int k = 0; k < per_lane; ++k) {
                const float g = na > 0.0f ? s * (b[k] * ia - a[k] * dot * ia * ia / na) : 0.0f;
                pl_store(t.grad, t.dtype, base + lane + 32 * k, g);
            }
        }
        double block_sum = pl_block_sum(acc);
        unsigned int total = (unsigned int)(t.blocks_per_image * t.n);
        if (pl_publish_partial(t.reduce, n * t.blocks_per_image + blockIdx.x, block_sum, total)) tap_finish(t);
    }
}
