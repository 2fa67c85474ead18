//! Launcher for kernels/tv.cu.

use super::config::{TvConfig, TvVariant};
use crate::backend::DeviceIo;
use crate::cuda::abi::*;
use crate::cuda::{kernel_dtype, kernels, nvtx, BlockSplit, Gpu};
use crate::error::Result;

/// Blocks in flight the grid aims for, split over the images. Fixed (not
/// derived from the GPU) so the reduction order, and so the loss bits,
/// depend only on the shape.
const TARGET_BLOCKS: usize = 2048;

/// The kernel's number for a variant (`pl_k_tv_variant`).
fn variant_id(variant: TvVariant) -> i32 {
    (match variant {
        TvVariant::Article => pl_k_tv_variant_PL_K_TV_ARTICLE,
        TvVariant::L1 => pl_k_tv_variant_PL_K_TV_L1,
        TvVariant::L2Squared => pl_k_tv_variant_PL_K_TV_L2_SQUARED,
        TvVariant::L2 => pl_k_tv_variant_PL_K_TV_L2,
        TvVariant::Isotropic => pl_k_tv_variant_PL_K_TV_ISOTROPIC,
    }) as i32
}

/// Queues the TV loss of `io.inputs[0]` on `dev`.
pub(crate) fn launch(dev: &impl Gpu, config: &TvConfig, io: &DeviceIo<1>) -> Result<()> {
    let s = io.shape;
    let _range = nvtx::range(|| format!("tv {:?} {s}", config.variant));
    // Work units are rows.
    let split = BlockSplit::new(s.n, s.c * s.h, 1, TARGET_BLOCKS)?;
    dev.with_reduce(s.n, split.blocks(s.n), |mut reduce| {
        reduce.loss = io.loss as *mut f32;
        reduce.per_sample = io.per_sample.unwrap_or(0) as *mut f32;
        let mut params = pl_k_tv_params {
            x: io.inputs[0] as *const _,
            grad: io.grad.unwrap_or(0) as *mut _,
            reduce,
            n: s.n as i64,
            c: s.c as i64,
            h: s.h as i64,
            w: s.w as i64,
            rows_per_block: split.per_block as i64,
            dtype: kernel_dtype(io.dtype),
            variant: variant_id(config.variant),
            pass: pl_k_tv_pass_PL_K_TV_PASS_FUSED as i32,
            blocks_per_image: split.blocks_per_image as i32,
            weight: config.weight,
            batch_scale: config.reduction.batch_scale(s.n) as f32,
            beta: io.beta,
            eps: config.eps,
        };
        let grid = split.grid;
        if config.variant == TvVariant::L2 {
            // The gradient needs each image's sum first: a loss pass, then a
            // gradient pass scaled by the per-image factor the first one left.
            params.pass = pl_k_tv_pass_PL_K_TV_PASS_LOSS as i32;
            dev.launch(&kernels::TV, "pl_tv", io.dtype, grid, &params)?;
            if io.grad.is_none() {
                return Ok(());
            }
            params.pass = pl_k_tv_pass_PL_K_TV_PASS_GRAD as i32;
        }
        dev.launch(&kernels::TV, "pl_tv", io.dtype, grid, &params)
    })
}

#[cfg(test)]
mod tests {
    //! The TV kernel run by the host emulator against the CPU backend.

    use super::*;
    use crate::backend::HostGrad;
    use crate::cuda::emulator::{addr, addr_mut, assert_matches_cpu, values, Emulator};
    use crate::ops::tv::config::Reduction;
    use crate::tensor::{Element, Shape};
    use half::{bf16, f16};

    fn check<T: Element>(config: TvConfig, s: Shape, tol: f64) {
        let Some(emu) = Emulator::get() else { return };
        let x = values::<T>(s.n * s.image_len(), 7);
        let old = values::<T>(x.len(), 8);
        let beta = 0.5;
        let (mut grad, mut want_grad) = (old.clone(), old.clone());
        let (mut loss, mut per_sample) = (f32::NAN, vec![f32::NAN; s.n]);
        let want_out = HostGrad {
            values: &mut want_grad,
            beta,
        };
        let want = crate::ops::tv::cpu::evaluate(&config, &x, Some(want_out), s).unwrap();
        let io = DeviceIo {
            shape: s,
            dtype: T::DTYPE,
            inputs: [addr(&x)],
            grad: Some(addr_mut(&mut grad)),
            beta,
            loss: &mut loss as *mut f32 as u64,
            per_sample: Some(addr_mut(&mut per_sample)),
            parts: None,
        };
        launch(emu, &config, &io).unwrap();
        let what = format!("{:?} {s} {}", config.variant, T::DTYPE.name());
        let got = (loss, &per_sample[..], &grad[..]);
        assert_matches_cpu(&what, got, &want, &want_grad, tol);
    }

    #[test]
    fn every_variant_and_dtype_matches_the_cpu() {
        use TvVariant::*;
        for variant in [Article, L1, L2Squared, L2, Isotropic] {
            let mut config = TvConfig::new(variant);
            config.weight = 0.75;
            if variant != Article {
                config.reduction = Reduction::Sum;
            }
            // Several row blocks per image, odd sizes, and one image per grid row.
            check::<f32>(config, Shape::new(2, 3, 9, 13), 1e-5);
            check::<f16>(config, Shape::new(1, 2, 5, 40), 2e-3);
            check::<bf16>(config, Shape::new(3, 1, 7, 6), 1e-2);
        }
    }
}
