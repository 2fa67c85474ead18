//! `pl_feature_loss`: the feature distance (MSE / MAE) between two
//! same-shape tensors.

use super::args::{dtype_of, pl_dtype, pl_outputs, shape_of, views};
use super::context::pl_context;
use super::guard::guard;
use super::handle::borrow;
use super::options::{self, released};
use super::status::pl_status;
use crate::error::Error;
use crate::{Criterion, FeatureLoss};
use std::ffi::c_void;

/// A feature distance.
pub type pl_criterion = i32;
/// Mean squared error (the default).
pub const PL_MSE: pl_criterion = 0;
/// Mean absolute error.
pub const PL_MAE: pl_criterion = 1;
/// The Frobenius norm of the whole batch's difference (BasicSR's 'fro'):
/// perceptual and style terms only.
pub const PL_FRO: pl_criterion = 2;

pub(crate) fn criterion_of(c: pl_criterion) -> Result<Criterion, Error> {
    match c {
        PL_MSE => Ok(Criterion::Mse),
        PL_MAE => Ok(Criterion::Mae),
        PL_FRO => Ok(Criterion::Fro),
        v => Err(Error::arg(format!("unknown pl_criterion {v}"))),
    }
}

/// Feature distance options. Initialise with `pl_feature_config_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pl_feature_config {
    /// sizeof(pl_feature_config), as `pl_feature_config_init` writes it.
    pub struct_size: usize,
    /// PL_MSE (default) or PL_MAE.
    pub criterion: pl_criterion,
    /// Multiplies the loss and the gradient; default 1.
    pub weight: f32,
    /// Nonzero: a NaN or infinite input is an error naming the first such
    /// element (one more pass; on CUDA the call then waits). Default 0.
    pub check_finite: i32,
    /// Write 0 (as `pl_feature_config_init` does).
    pub reserved: i32,
}

released!(pl_feature_config, reserved reserved, last reserved: i32, {
    criterion: PL_MSE,
    weight: 1.0,
    check_finite: 0,
    reserved: 0,
});

/// Writes the defaults to `config`: MSE, weight 1.
///
/// # Safety
/// `config` must be NULL or a writable `pl_feature_config`.
#[no_mangle]
pub unsafe extern "C" fn pl_feature_config_init(config: *mut pl_feature_config) -> pl_status {
    guard(|| options::init(config, "config"))
}

/// The distance of `a` from the constant `b` (contiguous NCHW, same shape
/// and dtype; `config` NULL = the defaults): weight * the mean over all
/// elements of (a-b)^2 (MSE) or |a-b| (MAE). As `out` asks, also dL/da and
/// each image's weight * mean. On a CUDA context every pointer is device
/// memory and the call returns once the work is queued.
///
/// # Safety
/// `ctx` must be a live context; `a`, `b` and `out->grad` must address
/// n*c*h*w elements, `out->loss` one float and `out->per_sample` n floats
/// on the context's device; `config` must be NULL or valid and `out` valid.
#[no_mangle]
pub unsafe extern "C" fn pl_feature_loss(
    ctx: *mut pl_context,
    config: *const pl_feature_config,
    a: *const c_void,
    b: *const c_void,
    dtype: pl_dtype,
    n: i64,
    c: i64,
    h: i64,
    w: i64,
    out: *const pl_outputs,
) -> pl_status {
    guard(|| {
        let ctx = borrow(ctx, "ctx")?;
        let config = options::read(config, "config")?;
        let loss = FeatureLoss::new(criterion_of(config.criterion)?, config.weight)?
            .with_check_finite(config.check_finite != 0);
        let (dtype, shape) = (dtype_of(dtype)?, shape_of(n, c, h, w)?);
        let device = ctx.streams.current()?;
        let call = views(&device, &[(a, "a"), (b, "b")], dtype, shape, out)?;
        loss.compute(&device, &call.inputs[0], &call.inputs[1], call.outputs)
    })
}
