//! Launcher for kernels/tv.cu.

use super::abi::{
    pl_k_tv_params, pl_k_tv_pass_PL_K_TV_PASS_FUSED, pl_k_tv_pass_PL_K_TV_PASS_GRAD,
    pl_k_tv_pass_PL_K_TV_PASS_LOSS,
};
use super::{kernel_dtype, kernels, launch};
use crate::device::CudaDevice;
use crate::error::Result;
use crate::loss::tv::{TvCall, TvVariant};

/// Blocks in flight the grid aims for, split over the images. Fixed (not
/// derived from the GPU) so the reduction order, and so the loss bits,
/// depend only on the shape.
const TARGET_BLOCKS: usize = 2048;
const MAX_GRID_Y: usize = 65535;

pub(crate) fn tv(dev: &CudaDevice, call: &TvCall<'_>) -> Result<()> {
    let s = call.shape;
    let _range = super::nvtx::range(|| format!("tv {:?} {s}", call.config.variant));
    let rows = s.c * s.h;
    let rows_per_block = rows.div_ceil(TARGET_BLOCKS.div_ceil(s.n).min(rows));
    // Recomputed so that no block is left without rows.
    let blocks_per_image = rows.div_ceil(rows_per_block);
    let ws = dev.workspace(s.n, blocks_per_image * s.n)?;
    let mut reduce = ws.reduce;
    reduce.loss = call.loss as *mut f32;
    reduce.per_sample = call.per_sample.unwrap_or(0) as *mut f32;

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
        launch(dev, &kernels::TV, "pl_tv", call.dtype, grid, &params)?;
        if call.grad.is_none() {
            return Ok(());
        }
        params.pass = pl_k_tv_pass_PL_K_TV_PASS_GRAD as i32;
    }
    launch(dev, &kernels::TV, "pl_tv", call.dtype, grid, &params)
}
