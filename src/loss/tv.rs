//! Total-variation loss (DESIGN.md section 3, reference/ANCHORS.md).
//!
//! With dh = x[n,c,i+1,j] - x[n,c,i,j] and dw = x[n,c,i,j+1] - x[n,c,i,j]:
//!
//! | variant | per-image score s_n | batch |
//! |---|---|---|
//! | `Article` (default) | 2 (sum dh^2 / (C(H-1)W) + sum dw^2 / (CH(W-1))) | mean only |
//! | `L1` | sum abs(dh) + sum abs(dw) | mean or sum |
//! | `L2Squared` | sum dh^2 + sum dw^2 | mean or sum |
//! | `L2` | sqrt(sum dh^2 + sum dw^2) | mean or sum |
//! | `Isotropic` | sum over i < H-1, j < W-1 of sqrt(dh^2 + dw^2 + eps) | mean or sum |
//!
//! loss = weight * reduction over n of s_n. Gradients are exact; where a
//! square root or an absolute value has no derivative (a zero argument) the
//! gradient is 0. NaN or infinite inputs are not rejected: they propagate
//! into the loss and gradient as IEEE arithmetic says, as in PyTorch.

use super::{check_weight, cuda_in, host_in, host_scalar, LossOutputs};
use crate::cpu;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, Shape, TensorRef};
use half::{bf16, f16};

/// Which total-variation formula (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TvVariant {
    /// The seed article's `TV_Loss` exactly (always a batch mean).
    Article,
    /// Anisotropic L1 (piq `norm_type='l1'`).
    L1,
    /// Squared L2 (piq `norm_type='l2_squared'`).
    L2Squared,
    /// Per-image L2 norm of all differences (piq `norm_type='l2'`).
    L2,
    /// Per-pixel isotropic TV, sqrt(dh^2 + dw^2 + eps).
    Isotropic,
}

impl TvVariant {
    pub(crate) fn kernel_id(self) -> i32 {
        use crate::cuda::abi::*;
        (match self {
            TvVariant::Article => pl_k_tv_variant_PL_K_TV_ARTICLE,
            TvVariant::L1 => pl_k_tv_variant_PL_K_TV_L1,
            TvVariant::L2Squared => pl_k_tv_variant_PL_K_TV_L2_SQUARED,
            TvVariant::L2 => pl_k_tv_variant_PL_K_TV_L2,
            TvVariant::Isotropic => pl_k_tv_variant_PL_K_TV_ISOTROPIC,
        }) as i32
    }
}

/// How per-image scores combine into the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// Mean over the batch.
    Mean,
    /// Sum over the batch.
    Sum,
}

/// Configuration of a [`TvLoss`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TvConfig {
    /// The formula; default [`TvVariant::Article`].
    pub variant: TvVariant,
    /// Batch reduction; default mean. `Article` accepts only `Mean`.
    pub reduction: Reduction,
    /// Multiplies the loss and gradient; default 1.
    pub weight: f32,
    /// Added inside the isotropic square root; default 0 (the gradient is
    /// then 0 where dh = dw = 0). Ignored by the other variants.
    pub eps: f32,
}

impl Default for TvConfig {
    fn default() -> Self {
        TvConfig {
            variant: TvVariant::Article,
            reduction: Reduction::Mean,
            weight: 1.0,
            eps: 0.0,
        }
    }
}

impl TvConfig {
    /// `variant` with a mean reduction and unit weight.
    pub fn new(variant: TvVariant) -> Self {
        TvConfig {
            variant,
            ..Default::default()
        }
    }
}

/// A total-variation loss. Holds no device state: one value may be used
/// from many threads and on many devices.
#[derive(Debug, Clone)]
pub struct TvLoss {
    config: TvConfig,
}

/// A validated CUDA call: device addresses and the numbers the kernel needs.
pub(crate) struct TvCall<'c> {
    pub config: &'c TvConfig,
    pub shape: Shape,
    pub dtype: DType,
    pub x: u64,
    pub grad: Option<u64>,
    pub beta: f32,
    pub loss: u64,
    pub per_sample: Option<u64>,
}

impl TvCall<'_> {
    pub fn batch_scale(&self) -> f32 {
        batch_scale(self.config, self.shape) as f32
    }
}

fn batch_scale(config: &TvConfig, shape: Shape) -> f64 {
    match config.reduction {
        Reduction::Mean => 1.0 / shape.n as f64,
        Reduction::Sum => 1.0,
    }
}

impl TvLoss {
    /// Checks the configuration.
    pub fn new(config: TvConfig) -> Result<Self> {
        check_weight(config.weight)?;
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
    pub fn compute(
        &self,
        device: &Device,
        x: &TensorRef<'_>,
        mut out: LossOutputs<'_>,
    ) -> Result<()> {
        let shape = x.shape;
        shape.numel()?;
        if self.config.variant == TvVariant::Article && (shape.h < 2 || shape.w < 2) {
            return Err(Error::shape(format!(
                "the article TV divides by H-1 and W-1: H and W must be at least 2, got {shape}"
            )));
        }
        out.validate(x.dtype, shape, shape.n)?;

        let Some(dev) = device.cuda_device() else {
            return match x.dtype {
                DType::F32 => self.cpu::<f32>(x, &mut out),
                DType::F16 => self.cpu::<f16>(x, &mut out),
                DType::BF16 => self.cpu::<bf16>(x, &mut out),
            };
        };
        let bytes = shape.bytes(x.dtype)?;
        let xp = cuda_in(dev, x, "x")?;
        let o = out.cuda_addresses(dev, &[(xp, "x")], bytes)?;
        let call = TvCall {
            config: &self.config,
            shape,
            dtype: x.dtype,
            x: xp,
            grad: o.grad,
            beta: out.beta,
            loss: o.loss,
            per_sample: o.per_sample,
        };
        crate::cuda::tv::tv(dev, &call)
    }

    /// Convenience: the loss value of `x`, waiting for the device. Copies
    /// through a small device buffer on CUDA.
    pub fn value(&self, device: &Device, x: &TensorRef<'_>) -> Result<f32> {
        super::value_on(device, |loss| {
            self.compute(device, x, LossOutputs::new(loss))
        })
    }

    fn cpu<T: Element>(&self, x: &TensorRef<'_>, out: &mut LossOutputs<'_>) -> Result<()> {
        let xs = host_in::<T>(x, "x")?;
        let grad = out.host_grad::<T>()?;
        let values = cpu::tv::tv(
            xs,
            grad,
            x.shape,
            &self.config,
            batch_scale(&self.config, x.shape),
        );
        host_scalar(&mut out.loss, "loss output")?[0] = values.loss as f32;
        if let Some(p) = out.per_sample.as_mut() {
            for (slot, v) in host_scalar(p, "per-sample output")?
                .iter_mut()
                .zip(&values.per_sample)
            {
                *slot = *v as f32;
            }
        }
        Ok(())
    }
}
