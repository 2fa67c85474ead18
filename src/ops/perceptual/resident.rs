//! A target kept by the loss (`set_target`), for calls that give only
//! pred: style transfer, feature inversion and texture synthesis compare
//! many predictions with one fixed target.
//!
//! `set_target` copies what the loss needs, so the caller may change or
//! free the target's memory as soon as it returns. On the CPU that is the
//! target's tap features (and Grams), computed once; later calls run the
//! network over pred alone. On CUDA it is a device copy of the target
//! images, which each call runs beside pred as with an explicit target
//! (the same bits as passing it), so the saving there is the caller's
//! upload, not yet the target's half of the forward pass.
//!
//! A target of one image serves a batch of any size (each pred image is
//! compared with it); otherwise pred must have the target's batch size.
//! C, H, W and the dtype must be the target's.
//!
//! On CUDA the copies are read by calls on any stream of the device, so
//! replacing or dropping a kept target waits for the whole device. A
//! one-image target serving a batch of N is repeated to N images on the
//! device (memory outside `memory_budget`).

use super::cpu::{self, TargetCache};
use super::{Perceptual, PerceptualSpec};
use crate::backend::{DeviceIo, HostIo, Op, Values};
use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, PerDType, Shape, Storage, TensorRef};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::sync::{Arc, Mutex};

/// The kept target of a loss.
pub(crate) struct Resident {
    shape: Shape,
    dtype: DType,
    held: Held,
}

/// Where the kept target lives.
enum Held {
    /// Its tap features (and Grams), image by image.
    Host(Arc<cpu::TapFeatures>),
    /// A copy of its images on a device, and that copy repeated to the
    /// last batch size a one-image target served.
    Device {
        ordinal: usize,
        images: CudaSlice<u8>,
        repeated: Mutex<Option<(usize, CudaSlice<u8>)>>,
    },
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
            check_finite(device, target)?;
        }
        let held = match (device.cuda_device(), &target.storage) {
            (None, Storage::Host(_)) => Held::Host(Arc::new(
                target.dtype.dispatch(HostFeatures { op, target })?,
            )),
            (Some(dev), Storage::Cuda { ptr, ordinal }) if *ordinal == dev.ordinal() => {
                let bytes = s.bytes(target.dtype)?;
                dev.check_buffer(*ptr, bytes, target.dtype.size(), "target")?;
                dev.refuse_in_capture(|| "set_target allocates and waits for its copy".into())?;
                let st = dev.stream();
                let mut images = (st.alloc_zeros::<u8>(bytes))
                    .map_err(|e| Error::cuda_alloc("the kept target", bytes, e))?;
                let (dst, _guard) = images.device_ptr_mut(st);
                // SAFETY: both ranges hold `bytes` bytes on this device (the
                // source checked against its allocation above).
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(dst, *ptr, bytes, st.cu_stream())
                }
                .map_err(|e| Error::cuda("copying the target", e))?;
                drop(_guard);
                // Copied before set_target returns: the caller may reuse
                // the memory at once.
                dev.synchronize()?;
                Held::Device {
                    ordinal: dev.ordinal(),
                    images,
                    repeated: Mutex::new(None),
                }
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

    /// The device address of the target's images for a batch of `n`
    /// (the one-image target repeated when needed).
    fn device_images(&self, dev: &CudaDevice, n: usize) -> Result<u64> {
        let Held::Device {
            ordinal,
            images,
            repeated,
        } = &self.held
        else {
            return Err(Error::DeviceMismatch(
                "the target was kept on the CPU; this call runs on CUDA".into(),
            ));
        };
        if *ordinal != dev.ordinal() {
            return Err(Error::DeviceMismatch(format!(
                "the target was kept on CUDA device {ordinal}, the call runs on {}",
                dev.ordinal()
            )));
        }
        let st = dev.stream();
        if self.shape.n == n {
            return Ok(images.device_ptr(st).0);
        }
        let mut repeated = repeated.lock().map_err(|_| Error::poisoned())?;
        if let Some((_, buf)) = repeated.as_ref().filter(|(count, _)| *count == n) {
            return Ok(buf.device_ptr(st).0);
        }
        dev.refuse_in_capture(|| {
            format!("the kept target is repeated for a batch of {n} on the first such call (make one before capturing)")
        })?;
        let image = self.shape.bytes(self.dtype)?;
        let bytes = image
            .checked_mul(n)
            .ok_or_else(|| Error::shape(format!("{n} copies of the target do not fit")))?;
        let mut buf = (st.alloc_zeros::<u8>(bytes))
            .map_err(|e| Error::cuda_alloc("the repeated target", bytes, e))?;
        {
            let src = images.device_ptr(st).0;
            let (dst, _guard) = buf.device_ptr_mut(st);
            for k in 0..n {
                // SAFETY: image k of the new buffer, and the one image.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        dst + (k * image) as u64,
                        src,
                        image,
                        st.cu_stream(),
                    )
                }
                .map_err(|e| Error::cuda("repeating the target", e))?;
            }
        }
        // Complete before any stream reads it; and a buffer it replaces may
        // still be read by another stream's queued work.
        dev.synchronize()?;
        let addr = buf.device_ptr(st).0;
        if let Some((_, old)) = repeated.replace((n, buf)) {
            wait_then_free(old);
        }
        Ok(addr)
    }
}

/// Frees a kept buffer once no stream can still be reading it: calls on
/// any stream of the device may have queued reads of a kept target, so
/// the whole device is waited for (replacing or dropping a kept target is
/// rare; a call's own work is never waited for).
fn wait_then_free(buf: CudaSlice<u8>) {
    // A failed wait leaves the buffer allocated rather than freed under
    // a reader.
    if buf.context().synchronize().is_err() {
        std::mem::forget(buf);
    }
}

impl Drop for Resident {
    /// A kept device target is freed only once no stream can be reading it
    /// (see [`wait_then_free`]).
    fn drop(&mut self) {
        if let Held::Device { images, .. } = &self.held {
            let _ = images.context().synchronize();
        }
    }
}

/// An error naming the first NaN or infinite element of `target`.
fn check_finite(device: &Device, target: &TensorRef<'_>) -> Result<()> {
    struct OnHost<'a, 't>(&'a TensorRef<'t>);
    impl PerDType for OnHost<'_, '_> {
        type Output = Option<(usize, f64)>;
        fn run<T: Element>(self) -> Self::Output {
            let values = self.0.host_values::<T>()?;
            crate::finite::first_on_host(values).map(|i| (i, values[i].to_f64()))
        }
    }
    let s = target.shape;
    let first = match (device.cuda_device(), &target.storage) {
        (Some(dev), Storage::Cuda { ptr, .. }) => {
            let found = crate::finite::first_on_device(dev, &[*ptr], target.dtype, s.numel()?)?;
            found.map(|(_, index, value)| (index, value))
        }
        _ => target.dtype.dispatch(OnHost(target)),
    };
    match first {
        Some((index, value)) => Err(crate::finite::error("target", s, index, value)),
        None => Ok(()),
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
        let target = self.target.device_images(dev, io.shape.n)?;
        let io = DeviceIo {
            shape: io.shape,
            dtype: io.dtype,
            inputs: [io.inputs[0], target],
            grad: io.grad,
            beta: io.beta,
            loss: io.loss,
            per_sample: io.per_sample,
            parts: io.parts,
        };
        self.op.cuda(dev, io)
    }
}
