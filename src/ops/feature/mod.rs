//! Feature distance between two same-shape tensors, the building block of
//! the perceptual loss at each tapped layer; its formula is in
//! [`FeatureLoss`]'s documentation.
//!
//! `cpu.rs` evaluates it in f64 (and serves the perceptual loss's taps on
//! the CPU); `cuda.rs` launches `kernels/feature.cu`, one fused pass.

mod config;
pub(crate) mod cpu;
pub(crate) mod cuda;

pub use config::Criterion;

use super::{check_weight, LossOutputs};
use crate::backend::{self, DeviceIo, HostIo, Op, Values};
use crate::device::{CudaDevice, Device};
use crate::error::Result;
use crate::tensor::{Element, TensorRef};

/// MSE or MAE between a prediction and a constant target, with the gradient
/// w.r.t. the prediction. Holds no device state.
///
/// With m_n the mean over image n's C*H*W elements:
///
/// | criterion | per-image value | loss | dL/da |
/// |---|---|---|---|
/// | `Mse` | weight * m_n((a - b)^2) | mean over n | weight * 2 (a - b) / (N C H W) |
/// | `Mae` | weight * m_n(abs(a - b)) | mean over n | weight * sign(a - b) / (N C H W), 0 at a == b |
///
/// The loss is the mean over all N*C*H*W elements (every image has the
/// same count). The target `b` is a constant: no gradient is taken for
/// it. NaN or infinite inputs propagate as IEEE arithmetic says, unless
/// [`FeatureLoss::with_check_finite`] makes them an error.
#[derive(Debug, Clone)]
pub struct FeatureLoss {
    criterion: Criterion,
    weight: f32,
    check_finite: bool,
}

impl FeatureLoss {
    /// A feature distance with a weight multiplying loss and gradient.
    pub fn new(criterion: Criterion, weight: f32) -> Result<Self> {
        check_weight("weight", weight)?;
        if criterion == Criterion::Fro {
            return Err(crate::Error::arg(
                "the feature loss takes Mse or Mae; Fro is a criterion of the perceptual and \
                 style losses",
            ));
        }
        Ok(FeatureLoss {
            criterion,
            weight,
            check_finite: false,
        })
    }

    /// The same loss, making a NaN or infinite input an error naming the
    /// first such element when `on` (see [`TvConfig::check_finite`](crate::TvConfig::check_finite)).
    pub fn with_check_finite(mut self, on: bool) -> Self {
        self.check_finite = on;
        self
    }

    /// The criterion.
    pub fn criterion(&self) -> Criterion {
        self.criterion
    }

    /// The weight.
    pub fn weight(&self) -> f32 {
        self.weight
    }

    /// Computes the distance of `a` from `b` (same shape and dtype) on
    /// `device`, and, as `out` asks, dL/da and each image's value.
    pub fn compute(
        &self,
        device: &Device,
        a: &TensorRef<'_>,
        b: &TensorRef<'_>,
        out: LossOutputs<'_>,
    ) -> Result<()> {
        backend::run(self, device, [(a, "a"), (b, "b")], out)
    }

    /// Convenience: the distance value, waiting for the device.
    pub fn value(&self, device: &Device, a: &TensorRef<'_>, b: &TensorRef<'_>) -> Result<f32> {
        super::value_on(device, |loss| {
            self.compute(device, a, b, LossOutputs::new(loss))
        })
    }
}

impl Op<2> for FeatureLoss {
    fn checks_finite(&self) -> bool {
        self.check_finite
    }

    fn cpu<T: Element>(&self, io: HostIo<'_, T, 2>) -> Result<Values> {
        let [a, b] = io.inputs;
        cpu::evaluate(self.criterion, self.weight, a, b, io.grad, io.shape)
    }

    fn cuda(&self, dev: &CudaDevice, io: DeviceIo<2>) -> Result<()> {
        cuda::launch(dev, self.criterion, self.weight, &io)
    }
}
