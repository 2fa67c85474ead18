//! `pl_tv_loss`: the total-variation loss (docs/design.md, "Total
//! variation").

use super::args::PL_REDUCTION_MEAN;
use super::args::{dtype_of, pl_dtype, pl_outputs, pl_reduction, reduction_of};
use super::args::{shape_of, views};
use super::context::pl_context;
use super::guard::guard;
use super::handle::borrow;
use super::options::{self, released};
use super::status::pl_status;
use crate::error::Error;
use crate::{TvConfig, TvLoss, TvVariant};
use std::ffi::c_void;

/// Total-variation formula.
pub type pl_tv_variant = i32;
/// The seed article's TV loss (batch mean only).
pub const PL_TV_ARTICLE: pl_tv_variant = 0;
/// Anisotropic L1: sum |dh| + sum |dw| per image.
pub const PL_TV_L1: pl_tv_variant = 1;
/// Squared L2: sum dh^2 + sum dw^2 per image.
pub const PL_TV_L2_SQUARED: pl_tv_variant = 2;
/// The L2 norm of all of an image's differences.
pub const PL_TV_L2: pl_tv_variant = 3;
/// Isotropic: the sum of sqrt(dh^2 + dw^2 + eps) per pixel.
pub const PL_TV_ISOTROPIC: pl_tv_variant = 4;

/// Total-variation options. Initialise with `pl_tv_config_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pl_tv_config {
    /// sizeof(pl_tv_config), as `pl_tv_config_init` writes it.
    pub struct_size: usize,
    /// The formula; default PL_TV_ARTICLE.
    pub variant: pl_tv_variant,
    /// Over the batch; default PL_REDUCTION_MEAN (the only one the article
    /// variant takes).
    pub reduction: pl_reduction,
    /// Multiplies the loss and the gradient; default 1.
    pub weight: f32,
    /// Added inside the isotropic square root; default 0 (the gradient is
    /// then 0 where dh = dw = 0). Ignored by the other variants.
    pub eps: f32,
    /// Nonzero: a NaN or infinite input is an error naming the first such
    /// element (one more pass; on CUDA the call then waits). Default 0.
    pub check_finite: i32,
    /// Write 0 (as `pl_tv_config_init` does).
    pub reserved: i32,
}

released!(pl_tv_config, reserved reserved, last reserved: i32, {
    variant: PL_TV_ARTICLE,
    reduction: PL_REDUCTION_MEAN,
    weight: 1.0,
    eps: 0.0,
    check_finite: 0,
    reserved: 0,
});

fn tv_config(c: &pl_tv_config) -> Result<TvConfig, Error> {
    let variant = match c.variant {
        PL_TV_ARTICLE => TvVariant::Article,
        PL_TV_L1 => TvVariant::L1,
        PL_TV_L2_SQUARED => TvVariant::L2Squared,
        PL_TV_L2 => TvVariant::L2,
        PL_TV_ISOTROPIC => TvVariant::Isotropic,
        v => return Err(Error::arg(format!("unknown pl_tv_variant {v}"))),
    };
    Ok(TvConfig {
        variant,
        reduction: reduction_of(c.reduction)?,
        weight: c.weight,
        eps: c.eps,
        check_finite: c.check_finite != 0,
    })
}

/// Writes the defaults to `config`: the article variant, a batch mean,
/// weight 1, eps 0.
///
/// # Safety
/// `config` must be NULL or a writable `pl_tv_config`.
#[no_mangle]
pub unsafe extern "C" fn pl_tv_config_init(config: *mut pl_tv_config) -> pl_status {
    guard(|| options::init(config, "config"))
}

/// Total-variation loss of the contiguous NCHW tensor `x` (`config` NULL =
/// the defaults). Writes the loss and, as `out` asks, dL/dx (in `dtype`
/// and x's layout) and each image's loss. On a CUDA context every pointer
/// is device memory and the call returns once the work is queued;
/// `pl_context_synchronize` waits for it. The article variant needs
/// h, w >= 2. In PL_F16 the gradient of a mean over many elements can fall
/// below half precision's normal range (about 6e-5): scale it with the
/// weight.
///
/// # Safety
/// `ctx` must be a live context; `x` and `out->grad` must address n*c*h*w
/// elements, `out->loss` one float and `out->per_sample` n floats on the
/// context's device; `config` must be NULL or valid and `out` valid.
#[no_mangle]
pub unsafe extern "C" fn pl_tv_loss(
    ctx: *mut pl_context,
    config: *const pl_tv_config,
    x: *const c_void,
    dtype: pl_dtype,
    n: i64,
    c: i64,
    h: i64,
    w: i64,
    out: *const pl_outputs,
) -> pl_status {
    guard(|| {
        let ctx = borrow(ctx, "ctx")?;
        let tv = TvLoss::new(tv_config(&options::read(config, "config")?)?)?;
        let (dtype, shape) = (dtype_of(dtype)?, shape_of(n, c, h, w)?);
        let device = ctx.streams.current()?;
        let call = views(&device, &[(x, "x")], dtype, shape, out)?;
        tv.compute(&device, &call.inputs[0], call.outputs)
    })
}
