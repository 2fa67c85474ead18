/*
 * The opt-in input check of every loss (check_finite): the smallest index
 * of a NaN or an infinity in a tensor, by an integer atomic minimum (so the
 * answer is the same whatever the order blocks run in). The host reference
 * and the launcher are in src/finite.rs.
 */
#include "common.cuh"

template <typename T>
__device__ void first_nonfinite(pl_k_check_params p) {
    const T *x = static_cast<const T *>(p.x);
    PL_FOR_EACH(i, p.count) {
        const float v = pl_to_f32(x[i]);
        if (!(v - v == 0.0f)) atomicMin(p.first, (unsigned long long)i);  // NaN and +-Inf
    }
}

PL_INSTANTIATE(pl_first_nonfinite, pl_k_check_params, first_nonfinite)
