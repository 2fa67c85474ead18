/*
 * Total-variation loss and its gradient, every variant of docs/design.md
 * ("Total variation"). The CPU reference is src/ops/tv/cpu.rs; the
 * launcher src/ops/tv/cuda.rs.
 *
 * Grid: (blocks_per_image, min(N, 65535)); each block owns a contiguous run
 * of the C*H rows of one image and its threads walk the columns, so row i+1
 * read for the vertical difference is the row the block reads next (it comes
 * from cache, and x is read from DRAM about once). Each thread writes the
 * gradient of its own pixels by gathering the differences that touch them:
 * one write per element, no atomics.
 *
 * Loss: terms in f32, per-thread and block sums in f64, one f64 partial per block, and
 * the last block sums each image's partials in order (pl_publish_partial).
 * The grid depends only on the shape, so the loss is bit-identical run to run.
 *
 * Passes (pl_k_tv_pass): FUSED computes loss and gradient in one read of x;
 * l2 (sqrt of a per-image sum) needs the sum before any gradient, so it runs
 * LOSS (which leaves image_scale = dL/dS per image) and then GRAD.
 */
#include "common.cuh"

struct TvShape {
    int64_t c, h, w;
    float coef_h, coef_w;  // per-term weights of the article variant
};

/* d(term)/d(difference) for the separable variants; the l2 variants use the
 * derivative of the squared sum and are scaled per image afterwards. */
__device__ __forceinline__ float tv_dphi(int variant, float d, float coef) {
    switch (variant) {
    case PL_K_TV_ARTICLE: return 2.0f * coef * d;
    case PL_K_TV_L1: return d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : (d == d ? 0.0f : d));
    default: return 2.0f * d;  // l2_squared, l2
    }
}

__device__ __forceinline__ float tv_phi(int variant, float d, float coef) {
    switch (variant) {
    case PL_K_TV_ARTICLE: return coef * d * d;
    case PL_K_TV_L1: return fabsf(d);
    default: return d * d;
    }
}

/* Gradient of sqrt(dh^2 + dw^2 + eps) w.r.t. (dh, dw), zero where the root is 0. */
__device__ __forceinline__ float tv_iso_scale(float dh, float dw, float eps) {
    float t = sqrtf(fmaf(dh, dh, fmaf(dw, dw, eps)));
    return t != 0.0f ? 1.0f / t : 0.0f;  // NaN still propagates
}

/* Loss terms owned by pixel (i, j) and, when wanted, dL/dx there. */
template <typename T>
__device__ __forceinline__ double tv_pixel(const pl_k_tv_params &p, const T *plane, const TvShape &s,
                                           int64_t i, int64_t j, bool want_loss, bool want_grad,
                                           float &grad) {
    const int64_t w = s.w;
    const T *row = plane + i * w;
    const bool up = i > 0, down = i + 1 < s.h, left = j > 0, right = j + 1 < w;
    float x = pl_to_f32(row[j]);
    float x_down = down ? pl_to_f32(row[j + w]) : x;
    float x_right = right ? pl_to_f32(row[j + 1]) : x;
    float dh = x_down - x, dw = x_right - x;  // 0 where the neighbour is missing
    double loss = 0.0;

    if (p.variant == PL_K_TV_ISOTROPIC) {
        // Terms live on the (H-1) x (W-1) region; pixel (i, j) owns term (i, j).
        bool own = down && right;
        if (want_loss && own) loss = sqrtf(fmaf(dh, dh, fmaf(dw, dw, p.eps)));
        if (want_grad) {
            float g = 0.0f;
            if (own) g -= (dh + dw) * tv_iso_scale(dh, dw, p.eps);
            if (up && right) {  // term (i-1, j): x(i,j) is its lower neighbour
                float xu = pl_to_f32(row[j - w]);
                float dh_u = x - xu, dw_u = pl_to_f32(row[j - w + 1]) - xu;
                g += dh_u * tv_iso_scale(dh_u, dw_u, p.eps);
            }
            if (left && down) {  // term (i, j-1): x(i,j) is its right neighbour
                float xl = pl_to_f32(row[j - 1]);
                float dh_l = pl_to_f32(row[j - 1 + w]) - xl, dw_l = x - xl;
                g += dw_l * tv_iso_scale(dh_l, dw_l, p.eps);
            }
            grad = g;
        }
        return loss;
    }

    if (want_loss) {
        if (down) loss += (double)tv_phi(p.variant, dh, s.coef_h);
        if (right) loss += (double)tv_phi(p.variant, dw, s.coef_w);
    }
    if (want_grad) {
        float g = 0.0f;
        if (down) g -= tv_dphi(p.variant, dh, s.coef_h);
        if (right) g -= tv_dphi(p.variant, dw, s.coef_w);
        if (up) g += tv_dphi(p.variant, x - pl_to_f32(row[j - w]), s.coef_h);
        if (left) g += tv_dphi(p.variant, x - pl_to_f32(row[j - 1]), s.coef_w);
        grad = g;
    }
    return loss;
}

/* Last block: per-image scores in a fixed order, then the batch loss. */
__device__ __forceinline__ void tv_finish(const pl_k_tv_params &p) {
    double total = 0.0;
    for (int64_t n = threadIdx.x; n < p.n; n += PL_BLOCK) {
        double s = pl_image_sum(p.reduce, n, p.blocks_per_image);
        double score = s;
        if (p.variant == PL_K_TV_L2) {
            score = sqrt(s);
            // dL/dS for the gradient pass; the root's gradient is 0 at S = 0.
            p.reduce.image_scale[n] =
                score != 0.0 ? (double)p.weight * p.batch_scale / (2.0 * score) : 0.0;
        }
        if (p.reduce.per_sample) p.reduce.per_sample[n] = (float)(p.weight * score);
        total += score;
    }
    total = pl_block_sum(total);
    if (threadIdx.x == 0) *p.reduce.loss = (float)(total * p.weight * p.batch_scale);
    pl_reset_counter(p.reduce);
}

template <typename T>
__device__ void tv_kernel(pl_k_tv_params p) {
    const T *x = static_cast<const T *>(p.x);
    T *grad = static_cast<T *>(p.grad);
    TvShape s;
    s.c = p.c;
    s.h = p.h;
    s.w = p.w;
    // The article divides each direction's sum by its own element count.
    s.coef_h = p.h > 1 ? (float)(2.0 / ((double)p.c * (p.h - 1) * p.w)) : 0.0f;
    s.coef_w = p.w > 1 ? (float)(2.0 / ((double)p.c * p.h * (p.w - 1))) : 0.0f;

    const bool want_loss = p.pass != PL_K_TV_PASS_GRAD;
    const bool want_grad = grad != nullptr && p.pass != PL_K_TV_PASS_LOSS;
    const int64_t rows = p.c * p.h, plane_size = p.h * p.w;
    // rows_per_block comes from the host: a 64-bit division here is a
    // called subroutine that makes ptxas spill.
    const int64_t row_begin = blockIdx.x * p.rows_per_block;
    const int64_t row_end = min(rows, row_begin + p.rows_per_block);

    for (int64_t n = blockIdx.y; n < p.n; n += gridDim.y) {
        float grad_scale = p.weight * p.batch_scale;
        if (p.pass == PL_K_TV_PASS_GRAD) grad_scale = (float)p.reduce.image_scale[n];
        double acc = 0.0;
        // Row r of the image is row i of channel ch, stepped along with r.
        int64_t ch = row_begin / p.h, i = row_begin - ch * p.h;
        for (int64_t r = row_begin; r < row_end; ++r) {
            int64_t plane_off = (n * p.c + ch) * plane_size;
            for (int64_t j = threadIdx.x; j < p.w; j += PL_BLOCK) {
                float g = 0.0f;
                acc += tv_pixel<T>(p, x + plane_off, s, i, j, want_loss, want_grad, g);
                if (want_grad) pl_store_grad(grad, plane_off + i * p.w + j, g * grad_scale, p.beta);
            }
            if (++i == p.h) {
                i = 0;
                ++ch;
            }
        }
        if (want_loss) {
            double block_sum = pl_block_sum(acc);
            unsigned int total = (unsigned int)(p.blocks_per_image * p.n);
            if (pl_publish_partial(p.reduce, n * p.blocks_per_image + blockIdx.x, block_sum, total))
                tv_finish(p);
        }
    }
}

PL_INSTANTIATE(pl_tv, pl_k_tv_params, tv_kernel)
