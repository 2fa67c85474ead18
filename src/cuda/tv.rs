//! Launcher for kernels/tv.cu.

use super::abi::{
    pl_k_tv_params, pl_k_tv_pass_PL_K_TV_PASS_FUSED, pl_k_tv_pass_PL_K_TV_PASS_GRAD,
    pl_k_tv_pass_PL_K_TV_PASS_LOSS,
};
use super::{kernel_dtype, kernels, Gpu};
use crate::error::Result;
use crate::loss::tv::{TvCall, TvVariant};

/// Blocks in flight the grid aims for, split over the images. Fixed (not
/// derived from the GPU) so the reduction order, and so the loss bits,
/// depend only on the shape.
const TARGET_BLOCKS: usize = 2048;
const MAX_GRID_Y: usize = 65535;

pub(crate) fn tv(dev: &impl Gpu, call: &TvCall<'_>) -> Result<()> {
    let s = call.shape;
    let _range = super::nvtx::range(|| format!("tv {:?} {s}", call.config.variant));
    let rows = s.c * s.h;
    let rows_per_block = rows.div_ceil(TARGET_BLOCKS.div_ceil(s.n).min(rows));
    // Recomputed so that no block is left without rows.
    let blocks_per_image = rows.div_ceil(rows_per_block);
    dev.with_reduce(s.n, blocks_per_image * s.n, |mut reduce| {
        reduce.loss = call.loss as *mut f32;
        reduce.per_sample = call.per_sample.unwrap_or(0) as *mut f32;
        launch_tv(dev, call, reduce, rows_per_block, blocks_per_image)
    })
}

fn launch_tv(
    dev: &impl Gpu,
    call: &TvCall<'_>,
    reduce: super::abi::pl_k_reduce,
    rows_per_block: usize,
    blocks_per_image: usize,
) -> Result<()> {
    let s = call.shape;
    let variant = call.config.variant;
    let mut params = pl_k_tv_params {
        x: call.x as *const _,
        grad: call.grad.unwrap_or(0) as *mut _,
        reduce,
        n: s.n as i64,
        c: s.c as i64,
        h: s.h as i64,
        w: s.w as i64,
        rows_per_block: rows_per_block as i64,
        dtype: kernel_dtype(call.dtype),
        variant: variant.kernel_id(),
        pass: pl_k_tv_pass_PL_K_TV_PASS_FUSED as i32,
        blocks_per_image: blocks_per_image as i32,
        weight: call.config.weight,
        batch_scale: call.batch_scale(),
        beta: call.beta,
        eps: call.config.eps,
    };
    let grid = (blocks_per_image as u32, s.n.min(MAX_GRID_Y) as u32);
    if variant == TvVariant::L2 {
        // The gradient needs each image's sum first: a loss pass, then a
        // gradient pass scaled by the per-image factor the first one left.
        params.pass = pl_k_tv_pass_PL_K_TV_PASS_LOSS as i32;
        dev.launch(&kernels::TV, "pl_tv", call.dtype, grid, &params)?;
        if call.grad.is_none() {
            return Ok(());
        }
        params.pass = pl_k_tv_pass_PL_K_TV_PASS_GRAD as i32;
    }
    dev.launch(&kernels::TV, "pl_tv", call.dtype, grid, &params)
}

#[cfg(test)]
mod tests {
    //! The TV kernel run by the host emulator against the CPU backend.

    use super::*;
    use crate::cuda::emulator::{addr, addr_mut, assert_close, values, Emulator};
    use crate::loss::tv::{Reduction, TvConfig};
    use crate::tensor::{Element, Shape};
    use half::{bf16, f16};

    fn check<T: Element>(config: TvConfig, s: Shape, tol: f64) {
        let Some(emu) = Emulator::get() else { return };
        let x = values::<T>(s.n * s.c * s.h * s.w, 7);
        let old = values::<T>(x.len(), 8);
        let beta = 0.5;
        let (mut grad, mut want_grad) = (old.clone(), old.clone());
        let (mut loss, mut per_sample) = (f32::NAN, vec![f32::NAN; s.n]);
        let batch_scale = match config.reduction {
            Reduction::Mean => 1.0 / s.n as f64,
            Reduction::Sum => 1.0,
        };
        let want = crate::cpu::tv::tv(&x, Some((&mut want_grad, beta)), s, &config, batch_scale);
        let call = TvCall {
            config: &config,
            shape: s,
            dtype: T::DTYPE,
            x: addr(&x),
            grad: Some(addr_mut(&mut grad)),
            beta,
            loss: &mut loss as *mut f32 as u64,
            per_sample: Some(addr_mut(&mut per_sample)),
        };
        tv(emu, &call).unwrap();
        let what = format!("{:?} {s} {}", config.variant, T::DTYPE.name());
        assert!(
            (loss as f64 - want.loss).abs() <= tol * want.loss.abs().max(1e-30),
            "{what}: loss {loss} vs {}",
            want.loss
        );
        let want_per: Vec<f32> = want.per_sample.iter().map(|&v| v as f32).collect();
        assert_close(&format!("{what} per sample"), &per_sample, &want_per, tol);
        assert_close(&format!("{what} gradient"), &grad, &want_grad, tol);
    }

    #[test]
    fn every_variant_and_dtype_matches_the_cpu() {
        use crate::loss::tv::TvVariant::*;
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
