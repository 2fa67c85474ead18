//! Total-variation loss; its formulas are in [`TvLoss`]'s documentation.
//!
//! `cpu.rs` evaluates the table in f64; `cuda.rs` launches
//! `kernels/tv.cu`, one fused pass per call (two for `L2`).

mod config;
pub(crate) mod cpu;
pub(crate) mod cuda;

pub use config::{Reduction, TvConfig, TvVariant};

use super::{check_weight, LossOutputs};
use crate::backend::{self, DeviceIo, HostIo, Op, Values};
use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use crate::tensor::{Element, Shape, TensorRef};

/// A total-variation loss. Holds no device state: one value may be used
/// from many threads and on many devices.
///
/// With `dh = x[n,c,i+1,j] - x[n,c,i,j]` and `dw = x[n,c,i,j+1] - x[n,c,i,j]`:
///
/// | variant | per-image score s_n | batch |
/// |---|---|---|
/// | `Article` (default) | 2 (sum dh^2 / (C(H-1)W) + sum dw^2 / (CH(W-1))) | mean only |
/// | `L1` | sum abs(dh) + sum abs(dw) | mean or sum |
/// | `L2Squared` | sum dh^2 + sum dw^2 | mean or sum |
/// | `L2` | sqrt(sum dh^2 + sum dw^2) | mean or sum |
/// | `Isotropic` | sum over i < H-1, j < W-1 of sqrt(dh^2 + dw^2 + eps) | mean or sum |
///
/// loss = weight * reduction over n of s_n; the per-sample values are
/// weight * s_n. Gradients are exact; where a square root or an absolute
/// value has no derivative (a zero argument) the gradient is 0. NaN or
/// infinite inputs propagate into the loss and gradient as IEEE
/// arithmetic says, as in PyTorch, unless [`TvConfig::check_finite`] makes
/// them an error.
#[derive(Debug, Clone)]
pub struct TvLoss {
    config: TvConfig,
}

impl TvLoss {
    /// Checks the configuration.
    pub fn new(config: TvConfig) -> Result<Self> {
        check_weight("weight", config.weight)?;
        if !(config.eps.is_finite() && config.eps >= 0.0) {
            return Err(Error::arg(format!(
                "eps must be finite and >= 0, got {}",
                config.eps
            )));
        }
        if config.variant == TvVariant::Article && config.reduction != Reduction::Mean {
            return Err(Error::arg(
                "the article variant is defined with a batch mean only",
            ));
        }
        Ok(TvLoss { config })
    }

    /// The configuration.
    pub fn config(&self) -> &TvConfig {
        &self.config
    }

    /// Computes the loss (and, as `out` asks, the gradient and per-sample
    /// losses) of `x` on `device`. On CUDA the work is queued on the
    /// device's stream and this returns without waiting.
    pub fn compute(&self, device: &Device, x: &TensorRef<'_>, out: LossOutputs<'_>) -> Result<()> {
        backend::run(self, device, [(x, "x")], out)
    }

    /// Convenience: the loss value of `x`, waiting for the device. Copies
    /// through a small device buffer on CUDA.
    pub fn value(&self, device: &Device, x: &TensorRef<'_>) -> Result<f32> {
        super::value_on(device, |loss| {
            self.compute(device, x, LossOutputs::new(loss))
        })
    }
}

impl Op<1> for TvLoss {
    fn checks_finite(&self) -> bool {
        self.config.check_finite
    }

    fn check_shape(&self, shape: Shape) -> Result<()> {
        if self.config.variant == TvVariant::Article && (shape.h < 2 || shape.w < 2) {
            return Err(Error::shape(format!(
                "the article TV divides by H-1 and W-1: H and W must be at least 2, got {shape}"
            )));
        }
        Ok(())
    }

    fn cpu<T: Element>(&self, io: HostIo<'_, T, 1>) -> Result<Values> {
        cpu::evaluate(&self.config, io.inputs[0], io.grad, io.shape)
    }

    fn cuda(&self, dev: &CudaDevice, io: DeviceIo<1>) -> Result<()> {
        cuda::launch(dev, &self.config, &io)
    }
}
