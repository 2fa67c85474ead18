//! A target kept by the loss (`set_target`), for calls that give only
//! pred: style transfer, feature inversion and texture synthesis compare
//! many predictions with one fixed target.
//!
//! `set_target` keeps what the loss needs, so the caller may change or
//! free the target's memory as soon as it returns: the target's tap
//! features (and Grams), computed once by a forward over the target alone.
//! Later calls run the network over pred alone, half the forward work of
//! a call with its target. On CUDA they live on the device in the compute
//! dtype (Grams in f32), outside `memory_budget`; the chunks of a call
//! are sized by the budget for pred alone.
//!
//! A target of one image serves a batch of any size (each pred image is
//! compared with it, from the one copy); otherwise pred must have the
//! target's batch size. C, H, W and the dtype must be the target's.
//!
//! On CUDA the kept features are read by calls on any stream of the
//! device, so replacing or dropping a kept target waits for the whole
//! device. The target's features come from a batch of the target alone,
//! where cuDNN may choose other algorithms than for [pred; target]: the
//! results agree with passing the target to rounding, not always to the
//! bit.

use super::cpu::{self, TargetCache};
use super::cuda::DeviceTarget;
use super::{Perceptual, PerceptualSpec};
use crate::backend::{DeviceIo, HostIo, Op, Values};
use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, PerDType, Shape, Storage, TensorRef};
use std::sync::Arc;

/// The kept target of a loss.
pub(crate) struct Resident {
    shape: Shape,
    dtype: DType,
    held: Held,
}

/// Where the kept target lives: its tap features (and Grams), image by
/// image.
enum Held {
    Host(Arc<cpu::TapFeatures>),
    Device(Arc<DeviceTarget>),
}

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Resident({} {})", self.dtype.name(), self.shape)
    }
}

impl Resident {
    /// Keeps `target` for `op`'s later calls on `device`.
    pub(crate) fn new(
        op: &Perceptual,
        device: &Device,
        target: &TensorRef<'_>,
    ) -> Result<Resident> {
        let s = target.shape;
        s.numel()?;
        op.check_shape(s)?;
        if op.spec.check_finite {
            crate::finite::check_tensor(device, target, "target")?;
        }
        let held = match (device.cuda_device(), &target.storage) {
            (None, Storage::Host(_)) => Held::Host(Arc::new(
                target.dtype.dispatch(HostFeatures { op, target })?,
            )),
            (Some(dev), Storage::Cuda { ptr, ordinal }) if *ordinal == dev.ordinal() => {
                let bytes = s.bytes(target.dtype)?;
                dev.check_buffer(*ptr, bytes, target.dtype.size(), "target")?;
                dev.refuse_in_capture(|| {
                    "set_target allocates, plans and waits for the target's forward".into()
                })?;
                let io = DeviceIo {
                    shape: s,
                    dtype: target.dtype,
                    inputs: [*ptr, 0],
                    grad: None,
                    beta: 0.0,
                    loss: 0,
                    per_sample: None,
                    parts: None,
                };
                // Done before set_target returns: the caller may reuse the
                // memory at once.
                Held::Device(Arc::new(op.device.keep(dev, &op.vgg, &op.spec, &io)?))
            }
            _ => {
                return Err(Error::DeviceMismatch(format!(
                    "the target must be on the loss's device ({device:?})"
                )))
            }
        };
        Ok(Resident {
            shape: s,
            dtype: target.dtype,
            held,
        })
    }

    /// An error unless `pred` can be compared with the kept target.
    fn check(&self, pred: &TensorRef<'_>) -> Result<()> {
        let (p, t) = (pred.shape, self.shape);
        let same_image = (p.c, p.h, p.w) == (t.c, t.h, t.w);
        if !same_image || (t.n != 1 && t.n != p.n) || pred.dtype != self.dtype {
            return Err(Error::arg(format!(
                "pred {} {p} does not match the kept target {} {t} (same C, H, W and dtype, and \
                 the target's batch size or a target of one image)",
                pred.dtype.name(),
                self.dtype.name()
            )));
        }
        Ok(())
    }

    /// The kept target on `dev`.
    fn on_device(&self, dev: &CudaDevice) -> Result<&Arc<DeviceTarget>> {
        let Held::Device(target) = &self.held else {
            return Err(Error::DeviceMismatch(
                "the target was kept on the CPU; this call runs on CUDA".into(),
            ));
        };
        if target.ordinal != dev.ordinal() {
            return Err(Error::DeviceMismatch(format!(
                "the target was kept on CUDA device {}, the call runs on {}",
                target.ordinal,
                dev.ordinal()
            )));
        }
        Ok(target)
    }
}

/// The target's features, computed in its element type.
struct HostFeatures<'a, 't> {
    op: &'a Perceptual,
    target: &'a TensorRef<'t>,
}

impl PerDType for HostFeatures<'_, '_> {
    type Output = Result<cpu::TapFeatures>;

    fn run<T: Element>(self) -> Self::Output {
        let values = (self.target.host_values::<T>())
            .ok_or_else(|| Error::Internal("a host target without host values".into()))?;
        let net = cpu::HostNet {
            layers: self.op.vgg.layers(),
            weights: self.op.vgg.host_weights()?,
        };
        TargetCache::features_of(net, &self.op.spec, values, self.target.shape)
    }
}

/// A call against the kept target: pred is its only input.
pub(crate) struct ResidentCall<'a> {
    pub op: &'a Perceptual,
    pub target: &'a Resident,
}

impl ResidentCall<'_> {
    fn spec(&self) -> &PerceptualSpec {
        &self.op.spec
    }
}

impl Op<1> for ResidentCall<'_> {
    fn checks_finite(&self) -> bool {
        self.spec().check_finite
    }

    fn has_parts(&self) -> bool {
        true
    }

    fn check_shape(&self, s: Shape) -> Result<()> {
        self.op.check_shape(s)
    }

    fn check_input(&self, pred: &TensorRef<'_>) -> Result<()> {
        self.target.check(pred)
    }

    fn cpu<T: Element>(&self, io: HostIo<'_, T, 1>) -> Result<Values> {
        let Held::Host(features) = &self.target.held else {
            return Err(Error::DeviceMismatch(
                "the target was kept on CUDA; this call runs on the CPU".into(),
            ));
        };
        let net = cpu::HostNet {
            layers: self.op.vgg.layers(),
            weights: self.op.vgg.host_weights()?,
        };
        cpu::with_features(net, self.spec(), io, features)
    }

    fn cuda(&self, dev: &CudaDevice, io: DeviceIo<1>) -> Result<()> {
        let target = self.target.on_device(dev)?;
        let io = DeviceIo {
            shape: io.shape,
            dtype: io.dtype,
            inputs: [io.inputs[0], 0],
            grad: io.grad,
            beta: io.beta,
            loss: io.loss,
            per_sample: io.per_sample,
            parts: io.parts,
        };
        let op = self.op;
        op.device.queue(dev, &op.vgg, &op.spec, &io, Some(target))
    }
}
