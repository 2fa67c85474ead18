/*
 * Feature distance between two same-shape tensors: MSE = mean (a-b)^2 and
 * MAE = mean |a-b|, with the gradient w.r.t. a fused into the same pass
 * (a and b read once, the gradient written once). The gradient of MAE at
 * a == b is 0. The perceptual loss calls this at every tapped layer.
 *
 * Grid-stride loop over a grid fixed by the element count, f32 terms, f64
 * per-thread sums and partials and a last-block final sum: bit-identical run to run.
 */
#include "common.cuh"

template <typename T>
__device__ void feature_kernel(pl_k_feature_params p) {
    const T *a = static_cast<const T *>(p.a);
    const T *b = static_cast<const T *>(p.b);
    T *grad = static_cast<T *>(p.grad);
    const bool mse = p.criterion == PL_K_MSE;
    const float scale = (float)((double)p.weight / (double)p.count);
    const int64_t stride = (int64_t)gridDim.x * PL_BLOCK;

    double acc = 0.0;
    for (int64_t i = (int64_t)blockIdx.x * PL_BLOCK + threadIdx.x; i < p.count; i += stride) {
        float d = pl_to_f32(a[i]) - pl_to_f32(b[i]);
        acc += (double)(mse ? d * d : fabsf(d));
        if (grad) {
            float g = mse ? 2.0f * d : (d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : (d == d ? 0.0f : d)));
            pl_store_grad(grad, i, g * scale, p.beta);
        }
    }
    double block_sum = pl_block_sum(acc);
    if (pl_publish_partial(p.reduce, blockIdx.x, block_sum, gridDim.x)) {
        double total = 0.0;
        for (int64_t k = threadIdx.x; k < gridDim.x; k += PL_BLOCK)
            total += pl_load_partial(p.reduce.partials, k);
        total = pl_block_sum(total);
        if (threadIdx.x == 0) *p.reduce.loss = (float)(total * p.weight / (double)p.count);
        pl_reset_counter(p.reduce);
    }
}

PL_INSTANTIATE(pl_feature, pl_k_feature_params, feature_kernel)
