/*
 * LPIPS's spatial map (lpips.LPIPS(spatial=True)) from the per-pixel terms
 * pl_vgg_lpips_tap leaves, each layer's terms resized bilinearly to the
 * input's size and summed; the adjoint of that resize, which brings
 * dL/dmap back to each layer's pixels for the tap's gradient; and each
 * layer's mean (retPerLayer=True). The CPU references are add_upsampled,
 * upsampled_grad and the layer means in src/ops/lpips/; the launchers are
 * in src/ops/lpips/cuda.rs.
 *
 * Every output value is computed by one thread (or, for a mean, one block)
 * in a fixed order, so the results are bit-identical run to run.
 */
#include "common.cuh"

#define PL_LPIPS_LAYERS 5

/* The two source indices along one axis of n_in samples that destination
 * dst of n_out reads, and the second one's weight, as PyTorch's bilinear
 * interpolation with align_corners=False computes them in f32. */
__device__ __forceinline__ void pl_bilinear_taps(int64_t dst, int64_t n_in, int64_t n_out, int64_t *i0,
                                                 int64_t *i1, float *lambda) {
    const float scale = (float)n_in / (float)n_out;
    const float src = fmaxf(scale * ((float)dst + 0.5f) - 0.5f, 0.0f);
    const int64_t lo = min((int64_t)src, n_in - 1);  // src >= 0: truncation is floor
    *i0 = lo;
    *i1 = min(lo + 1, n_in - 1);
    *lambda = src - (float)lo;
}

/* How much destination dst reads source i along one axis (0 when not). */
__device__ __forceinline__ float pl_bilinear_weight(int64_t dst, int64_t i, int64_t n_in, int64_t n_out) {
    int64_t i0, i1;
    float l;
    pl_bilinear_taps(dst, n_in, n_out, &i0, &i1, &l);
    return (i0 == i ? 1.0f - l : 0.0f) + (i1 == i ? l : 0.0f);
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_lpips_upsample(pl_k_lpips_maps_params p) {
    const int64_t hw = p.h * p.w;
    PL_FOR_EACH(i, p.n * hw) {
        const int64_t img = pl_div(i, hw), rem = i - img * hw;
        const int64_t y = pl_div(rem, p.w), x = rem - y * p.w;
        float acc = 0.0f;
        for (int k = 0; k < PL_LPIPS_LAYERS; ++k) {
            const int64_t lh = p.layer_h[k], lw = p.layer_w[k];
            const float *m = p.src + img * p.map_stride + p.offset[k];
            int64_t y0, y1, x0, x1;
            float ly, lx;
            pl_bilinear_taps(y, lh, p.h, &y0, &y1, &ly);
            pl_bilinear_taps(x, lw, p.w, &x0, &x1, &lx);
            const float top = m[y0 * lw + x0] * (1.0f - lx) + m[y0 * lw + x1] * lx;
            const float bottom = m[y1 * lw + x0] * (1.0f - lx) + m[y1 * lw + x1] * lx;
            acc += top * (1.0f - ly) + bottom * ly;
        }
        p.dst[i] = acc;
    }
}

/* The destinations along one axis of n_out that can read source i of n_in:
 * those whose first source index is i - 1 or i, widened by one on each
 * side for rounding (pl_bilinear_weight decides exactly). */
__device__ __forceinline__ void pl_readers(int64_t i, int64_t n_in, int64_t n_out, int64_t *lo, int64_t *hi) {
    const double ratio = (double)n_out / (double)n_in;
    *lo = max((int64_t)0, (int64_t)floor(((double)i - 0.5) * ratio - 0.5) - 1);
    *hi = min(n_out - 1, (int64_t)ceil(((double)i + 1.5) * ratio - 0.5) + 1);
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_lpips_upsample_adjoint(pl_k_lpips_maps_params p) {
    // One thread per layer pixel, gathering the map gradient of every
    // output that reads it: no two threads write one value, no atomics.
    const int64_t hw = p.h * p.w;
    PL_FOR_EACH(i, p.n * p.map_stride) {
        const int64_t img = pl_div(i, p.map_stride), at = i - img * p.map_stride;
        int k = 0;
        while (k + 1 < PL_LPIPS_LAYERS && at >= p.offset[k + 1]) ++k;
        const int64_t lh = p.layer_h[k], lw = p.layer_w[k], pix = at - p.offset[k];
        const int64_t yi = pl_div(pix, lw), xi = pix - yi * lw;
        int64_t ylo, yhi, xlo, xhi;
        pl_readers(yi, lh, p.h, &ylo, &yhi);
        pl_readers(xi, lw, p.w, &xlo, &xhi);
        const float *g = p.src + img * hw;
        double acc = 0.0;
        for (int64_t y = ylo; y <= yhi; ++y) {
            const float wy = pl_bilinear_weight(y, yi, lh, p.h);
            if (wy == 0.0f) continue;
            for (int64_t x = xlo; x <= xhi; ++x) {
                const float wx = pl_bilinear_weight(x, xi, lw, p.w);
                if (wx != 0.0f) acc += (double)g[y * p.w + x] * (double)(wy * wx);
            }
        }
        p.dst[i] = (float)acc;
    }
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK) pl_lpips_layer_means(pl_k_lpips_maps_params p) {
    // Grid (layers, images): one block sums one layer of one image.
    const int k = blockIdx.x;
    const int64_t count = p.layer_h[k] * p.layer_w[k];
    for (int64_t img = blockIdx.y; img < p.n; img += gridDim.y) {
        const float *m = p.src + img * p.map_stride + p.offset[k];
        double acc = 0.0;
        for (int64_t j = threadIdx.x; j < count; j += PL_BLOCK) acc += (double)m[j];
        const double total = pl_block_sum(acc);
        if (threadIdx.x == 0) p.dst[img * PL_LPIPS_LAYERS + k] = (float)(total / (double)count);
    }
}
