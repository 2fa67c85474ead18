/*
 * Feature distance between two same-shape N x (C*H*W) tensors: MSE = mean
 * (a-b)^2 and MAE = mean |a-b|, per image and over the batch, with the
 * gradient w.r.t. a fused into the same pass (a and b read once, the
 * gradient written once). The gradient of MAE at a == b is 0. The CPU
 * reference is src/ops/feature/cpu.rs; the launcher src/ops/feature/cuda.rs.
 *
 * Grid: (blocks_per_image, min(N, 65535)); each block owns a contiguous run
 * of per_block elements of one image. f32 terms, f64 per-thread sums and
 * block partials, and the last block sums each image's partials in order
 * (pl_finish_means): the grid depends only on the shape, so the loss is
 * bit-identical run to run.
 */
#include "common.cuh"

template <typename T>
__device__ void feature_kernel(pl_k_feature_params p) {
    const bool mse = p.criterion == PL_K_MSE;
    // d(weight * mean over all N * per_image elements) / d a
    const float scale = (float)((double)p.weight / ((double)p.n * (double)p.per_image));
    const int64_t begin = blockIdx.x * p.per_block;
    const int64_t end = min(p.per_image, begin + p.per_block);
    for (int64_t n = blockIdx.y; n < p.n; n += gridDim.y) {
        const T *a = static_cast<const T *>(p.a) + n * p.per_image;
        const T *b = static_cast<const T *>(p.b) + n * p.per_image;
        T *grad = p.grad ? static_cast<T *>(p.grad) + n * p.per_image : nullptr;
        double acc = 0.0;
        for (int64_t i = begin + threadIdx.x; i < end; i += PL_BLOCK) {
            const float d = pl_to_f32(a[i]) - pl_to_f32(b[i]);
            acc += pl_distance(d, mse);
            if (grad) pl_store_grad(grad, i, pl_distance_slope(d, mse) * scale, p.beta);
        }
        double block_sum = pl_block_sum(acc);
        unsigned int total = (unsigned int)(p.blocks_per_image * p.n);
        if (pl_publish_partial(p.reduce, n * p.blocks_per_image + blockIdx.x, block_sum, total))
            pl_finish_means(p.reduce, p.n, p.blocks_per_image, p.per_image, p.weight, p.n, false, false);
    }
}

PL_INSTANTIATE(pl_feature, pl_k_feature_params, feature_kernel)
