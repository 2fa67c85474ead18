//! Launcher for kernels/feature.cu.

use super::config::Criterion;
use crate::backend::DeviceIo;
use crate::cuda::abi::*;
use crate::cuda::{kernel_dtype, kernels, nvtx, BlockSplit, Gpu, BLOCK};
use crate::error::Result;

/// Elements per thread the grid aims for, and its cap on blocks; both
/// fixed so the reduction order depends only on the shape.
const ELEMS_PER_THREAD: usize = 8;
const MAX_BLOCKS: usize = 1024;

/// The kernels' number for a criterion (`pl_k_criterion`); Fro only
/// `pl_vgg_tap_loss` takes (the feature loss refuses it when built).
pub(crate) fn criterion_id(criterion: Criterion) -> i32 {
    (match criterion {
        Criterion::Mse => pl_k_criterion_PL_K_MSE,
        Criterion::Mae => pl_k_criterion_PL_K_MAE,
        Criterion::Fro => pl_k_criterion_PL_K_FRO,
    }) as i32
}

/// Queues the distance of `io.inputs[0]` from `io.inputs[1]` on `dev`.
pub(crate) fn launch(
    dev: &impl Gpu,
    criterion: Criterion,
    weight: f32,
    io: &DeviceIo<2>,
) -> Result<()> {
    let s = io.shape;
    let _range = nvtx::range(|| format!("feature {criterion:?} {s}"));
    let criterion_id = criterion_id(criterion);
    let per_image = s.image_len();
    let split = BlockSplit::new(
        s.n,
        per_image,
        BLOCK as usize * ELEMS_PER_THREAD,
        MAX_BLOCKS,
    )?;
    dev.with_reduce(0, split.blocks(s.n), |mut reduce| {
        reduce.loss = io.loss as *mut f32;
        reduce.per_sample = io.per_sample.unwrap_or(0) as *mut f32;
        let params = pl_k_feature_params {
            a: io.inputs[0] as *const _,
            b: io.inputs[1] as *const _,
            grad: io.grad.unwrap_or(0) as *mut _,
            reduce,
            n: s.n as i64,
            per_image: per_image as i64,
            per_block: split.per_block as i64,
            blocks_per_image: split.blocks_per_image as i32,
            dtype: kernel_dtype(io.dtype),
            criterion: criterion_id,
            weight,
            beta: io.beta,
            reserved: 0,
        };
        dev.launch(
            &kernels::FEATURE,
            "pl_feature",
            io.dtype,
            split.grid,
            &params,
        )
    })
}

#[cfg(test)]
mod tests {
    //! The feature-distance kernel run by the host emulator against the CPU backend.

    use super::*;
    use crate::backend::HostGrad;
    use crate::cuda::emulator::{addr, addr_mut, assert_matches_cpu, values, Emulator};
    use crate::tensor::{Element, Shape};
    use half::{bf16, f16};

    fn check<T: Element>(criterion: Criterion, s: Shape, tol: f64) {
        let Some(emu) = Emulator::get() else { return };
        let count = s.n * s.image_len();
        let (a, b) = (values::<T>(count, 4), values::<T>(count, 5));
        let old = values::<T>(count, 6);
        let (weight, beta) = (1.5, 1.0);
        let (mut grad, mut want_grad) = (old.clone(), old);
        let want_out = HostGrad {
            values: &mut want_grad,
            beta,
        };
        let want = crate::ops::feature::cpu::evaluate(criterion, weight, &a, &b, Some(want_out), s)
            .unwrap();
        let (mut loss, mut per_sample) = (f32::NAN, vec![f32::NAN; s.n]);
        let io = DeviceIo {
            shape: s,
            dtype: T::DTYPE,
            inputs: [addr(&a), addr(&b)],
            grad: Some(addr_mut(&mut grad)),
            beta,
            loss: &mut loss as *mut f32 as u64,
            per_sample: Some(addr_mut(&mut per_sample)),
            parts: None,
        };
        launch(emu, criterion, weight, &io).unwrap();
        let what = format!("{criterion:?} {s} {}", T::DTYPE.name());
        let got = (loss, &per_sample[..], &grad[..]);
        assert_matches_cpu(&what, got, &want, &want_grad, tol);
    }

    #[test]
    fn both_criteria_in_every_dtype_match_the_cpu() {
        for criterion in [Criterion::Mse, Criterion::Mae] {
            // One block, several per image, a partial last block, many images.
            check::<f32>(criterion, Shape::new(1, 1, 10, 10), 1e-5);
            check::<f32>(criterion, Shape::new(2, 3, 61, 101), 1e-5);
            check::<f32>(criterion, Shape::new(7, 1, 3, 5), 1e-5);
            check::<f16>(criterion, Shape::new(2, 5, 20, 25), 2e-3);
            check::<bf16>(criterion, Shape::new(3, 1, 30, 33), 1e-2);
        }
    }
}
