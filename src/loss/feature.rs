//! Feature distance between two same-shape tensors, the building block of
//! the perceptual loss at each tapped layer.
//!
//! MSE: loss = weight * mean((a - b)^2), dL/da = weight * 2 (a - b) / count.
//! MAE: loss = weight * mean(|a - b|), dL/da = weight * sign(a - b) / count,
//! 0 where a == b. The target `b` is a constant: no gradient is taken for it.
//! NaN or infinite inputs propagate as IEEE arithmetic says.

use super::{check_weight, cuda_in, host_in, host_scalar, LossOutputs};
use crate::cpu;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, TensorRef};
use half::{bf16, f16};

/// The distance between features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Criterion {
    /// Mean squared error (default).
    #[default]
    Mse,
    /// Mean absolute error.
    Mae,
}

impl Criterion {
    pub(crate) fn kernel_id(self) -> i32 {
        use crate::cuda::abi::*;
        (match self {
            Criterion::Mse => pl_k_criterion_PL_K_MSE,
            Criterion::Mae => pl_k_criterion_PL_K_MAE,
        }) as i32
    }
}

/// MSE or MAE between a prediction and a constant target, with the gradient
/// w.r.t. the prediction. Holds no device state.
#[derive(Debug, Clone)]
pub struct FeatureLoss {
    criterion: Criterion,
    weight: f32,
}

/// A validated CUDA call.
pub(crate) struct FeatureCall {
    pub criterion: Criterion,
    pub weight: f32,
    pub dtype: DType,
    pub count: usize,
    pub a: u64,
    pub b: u64,
    pub grad: Option<u64>,
    pub beta: f32,
    pub loss: u64,
}

impl FeatureLoss {
    /// A feature distance with a weight multiplying loss and gradient.
    pub fn new(criterion: Criterion, weight: f32) -> Result<Self> {
        check_weight(weight)?;
        Ok(FeatureLoss { criterion, weight })
    }

    /// The criterion.
    pub fn criterion(&self) -> Criterion {
        self.criterion
    }

    /// Computes the distance of `a` from `b` (same shape and dtype) on
    /// `device`, and dL/da when `out` asks for it. Per-sample output is not
    /// supported (the mean runs over all elements).
    pub fn compute(
        &self,
        device: &Device,
        a: &TensorRef<'_>,
        b: &TensorRef<'_>,
        mut out: LossOutputs<'_>,
    ) -> Result<()> {
        if a.shape != b.shape || a.dtype != b.dtype {
            return Err(Error::arg(format!(
                "a and b must have one shape and dtype, got {} {} and {} {}",
                a.dtype.name(),
                a.shape,
                b.dtype.name(),
                b.shape
            )));
        }
        let count = a.shape.numel()?;
        if out.per_sample.is_some() {
            return Err(Error::arg("the feature distance has no per-sample output"));
        }
        out.validate(a.dtype, a.shape, a.shape.n)?;

        let Some(dev) = device.cuda_device() else {
            return match a.dtype {
                DType::F32 => self.cpu::<f32>(a, b, &mut out),
                DType::F16 => self.cpu::<f16>(a, b, &mut out),
                DType::BF16 => self.cpu::<bf16>(a, b, &mut out),
            };
        };
        let bytes = a.shape.bytes(a.dtype)?;
        let (ap, bp) = (cuda_in(dev, a, "a")?, cuda_in(dev, b, "b")?);
        let o = out.cuda_addresses(dev, &[(ap, "a"), (bp, "b")], bytes)?;
        let call = FeatureCall {
            criterion: self.criterion,
            weight: self.weight,
            dtype: a.dtype,
            count,
            a: ap,
            b: bp,
            grad: o.grad,
            beta: out.beta,
            loss: o.loss,
        };
        crate::cuda::feature::feature(dev, &call)
    }

    /// Convenience: the distance value, waiting for the device.
    pub fn value(&self, device: &Device, a: &TensorRef<'_>, b: &TensorRef<'_>) -> Result<f32> {
        super::value_on(device, |loss| {
            self.compute(device, a, b, LossOutputs::new(loss))
        })
    }

    fn cpu<T: Element>(
        &self,
        a: &TensorRef<'_>,
        b: &TensorRef<'_>,
        out: &mut LossOutputs<'_>,
    ) -> Result<()> {
        let a_s = host_in::<T>(a, "a")?;
        let b_s = host_in::<T>(b, "b")?;
        let grad = out.host_grad::<T>()?;
        let loss = cpu::feature::feature(a_s, b_s, grad, self.criterion, self.weight);
        host_scalar(&mut out.loss, "loss output")?[0] = loss as f32;
        Ok(())
    }
}
