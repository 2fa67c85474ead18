//! Launcher for kernels/feature.cu.

use super::abi::pl_k_feature_params;
use super::{kernel_dtype, kernels, Gpu, BLOCK};
use crate::error::Result;
use crate::loss::feature::FeatureCall;

/// Elements per thread the grid aims for, and its cap; both fixed so the
/// reduction order depends only on the element count.
const ELEMS_PER_THREAD: usize = 8;
const MAX_BLOCKS: usize = 1024;

pub(crate) fn feature(dev: &impl Gpu, call: &FeatureCall) -> Result<()> {
    let _range = super::nvtx::range(|| format!("feature {:?} {}", call.criterion, call.count));
    let blocks = call
        .count
        .div_ceil(BLOCK as usize * ELEMS_PER_THREAD)
        .clamp(1, MAX_BLOCKS);
    dev.with_reduce(0, blocks, |mut reduce| {
        reduce.loss = call.loss as *mut f32;
        let params = pl_k_feature_params {
            a: call.a as *const _,
            b: call.b as *const _,
            grad: call.grad.unwrap_or(0) as *mut _,
            reduce,
            count: call.count as i64,
            dtype: kernel_dtype(call.dtype),
            criterion: call.criterion.kernel_id(),
            weight: call.weight,
            beta: call.beta,
        };
        dev.launch(
            &kernels::FEATURE,
            "pl_feature",
            call.dtype,
            (blocks as u32, 1),
            &params,
        )
    })
}

#[cfg(test)]
mod tests {
    //! The feature-distance kernel run by the host emulator against the CPU backend.

    use super::*;
    use crate::cuda::emulator::{addr, addr_mut, assert_close, values, Emulator};
    use crate::loss::feature::Criterion;
    use crate::tensor::Element;
    use half::{bf16, f16};

    fn check<T: Element>(criterion: Criterion, count: usize, tol: f64) {
        let Some(emu) = Emulator::get() else { return };
        let (a, b) = (values::<T>(count, 4), values::<T>(count, 5));
        let old = values::<T>(count, 6);
        let (weight, beta) = (1.5, 1.0);
        let (mut grad, mut want_grad) = (old.clone(), old);
        let want =
            crate::cpu::feature::feature(&a, &b, Some((&mut want_grad, beta)), criterion, weight);
        let mut loss = f32::NAN;
        let call = FeatureCall {
            criterion,
            weight,
            dtype: T::DTYPE,
            count,
            a: addr(&a),
            b: addr(&b),
            grad: Some(addr_mut(&mut grad)),
            beta,
            loss: &mut loss as *mut f32 as u64,
        };
        feature(emu, &call).unwrap();
        let what = format!("{criterion:?} {count} {}", T::DTYPE.name());
        assert!(
            (loss as f64 - want).abs() <= tol * want.abs(),
            "{what}: loss {loss} vs {want}"
        );
        assert_close(&format!("{what} gradient"), &grad, &want_grad, tol);
    }

    #[test]
    fn both_criteria_in_every_dtype_match_the_cpu() {
        for criterion in [Criterion::Mse, Criterion::Mae] {
            // One block, several, and a partial last block.
            check::<f32>(criterion, 100, 1e-5);
            check::<f32>(criterion, 9 * 2048 + 13, 1e-5);
            check::<f16>(criterion, 5000, 2e-3);
            check::<bf16>(criterion, 3000, 1e-2);
        }
    }
}
