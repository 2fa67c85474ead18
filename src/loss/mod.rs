//! Loss objects: validated configs plus the dispatch to a backend.

pub mod feature;
pub mod perceptual;
mod recent;
pub mod tv;

use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, HostMut, Shape, Storage, TensorMut, TensorRef};

/// Where a loss call writes its results.
///
/// The loss is one f32 on the computing device (a host `f32` for the CPU).
/// The gradient, when asked for, has the input's shape and dtype and
/// receives `beta * grad + dL/dx`; with the default `beta = 0` the old
/// contents are never read, so uninitialised memory is fine.
#[derive(Debug)]
pub struct LossOutputs<'a> {
    pub(crate) loss: TensorMut<'a>,
    pub(crate) grad: Option<TensorMut<'a>>,
    pub(crate) beta: f32,
    pub(crate) per_sample: Option<TensorMut<'a>>,
}

impl<'a> LossOutputs<'a> {
    /// Only the loss value (no gradient work is done).
    pub fn new(loss: TensorMut<'a>) -> Self {
        LossOutputs {
            loss,
            grad: None,
            beta: 0.0,
            per_sample: None,
        }
    }

    /// Also write the gradient w.r.t. the input into `grad`.
    pub fn with_grad(mut self, grad: TensorMut<'a>) -> Self {
        self.grad = Some(grad);
        self
    }

    /// Accumulate the gradient: `grad = beta * grad + dL/dx` (`beta = 1`
    /// adds to it). Has no effect without [`with_grad`](Self::with_grad).
    pub fn accumulate(mut self, beta: f32) -> Self {
        self.beta = beta;
        self
    }

    /// Also write each image's loss (the user's weight applied, before the
    /// batch reduction) as `n` f32 values.
    pub fn with_per_sample(mut self, per_sample: TensorMut<'a>) -> Self {
        self.per_sample = Some(per_sample);
        self
    }

    /// The gradient slice and beta for the CPU backend, when one is asked for.
    pub(crate) fn host_grad<T: Element>(&mut self) -> Result<Option<(&mut [T], f32)>> {
        let beta = self.beta;
        match self.grad.as_mut() {
            Some(g) => Ok(Some((
                host_out(g, "gradient")?
                    .typed::<T>()
                    .ok_or_else(dtype_bug)?,
                beta,
            ))),
            None => Ok(None),
        }
    }

    /// Device addresses of the outputs, each checked against its
    /// allocation, and the gradient against every input (`bytes` each).
    pub(crate) fn cuda_addresses(
        &self,
        dev: &CudaDevice,
        inputs: &[(u64, &str)],
        bytes: usize,
    ) -> Result<CudaOutputs> {
        let grad = match &self.grad {
            Some(g) => {
                let gp = cuda_out(dev, g, "gradient")?;
                for &(p, name) in inputs {
                    no_overlap((p, bytes), (gp, bytes), &format!("{name} and the gradient"))?;
                }
                Some(gp)
            }
            None => None,
        };
        let per_sample = match &self.per_sample {
            Some(p) => Some(cuda_out(dev, p, "per-sample output")?),
            None => None,
        };
        Ok(CudaOutputs {
            loss: cuda_out(dev, &self.loss, "loss output")?,
            grad,
            per_sample,
        })
    }

    /// Checks what every loss shares: an f32 scalar loss, f32 per-sample
    /// values, a gradient shaped like `input`, and a finite beta.
    pub(crate) fn validate(
        &self,
        input_dtype: DType,
        input_shape: Shape,
        images: usize,
    ) -> Result<()> {
        if self.loss.dtype != DType::F32 || self.loss.shape.numel()? != 1 {
            return Err(Error::arg(format!(
                "loss output must be one f32, got {} of shape {}",
                self.loss.dtype.name(),
                self.loss.shape
            )));
        }
        if let Some(g) = &self.grad {
            if g.dtype != input_dtype || g.shape != input_shape {
                return Err(Error::arg(format!(
                    "gradient must match the input ({} {}), got {} {}",
                    input_dtype.name(),
                    input_shape,
                    g.dtype.name(),
                    g.shape
                )));
            }
        }
        if let Some(p) = &self.per_sample {
            if p.dtype != DType::F32 || p.shape.numel()? != images {
                return Err(Error::arg(format!(
                    "per-sample output must be {images} f32 values, got {} of shape {}",
                    p.dtype.name(),
                    p.shape
                )));
            }
        }
        if !self.beta.is_finite() {
            return Err(Error::arg(format!(
                "gradient accumulation beta must be finite, got {}",
                self.beta
            )));
        }
        Ok(())
    }
}

/// Where a CUDA call writes: device addresses.
pub(crate) struct CudaOutputs {
    pub loss: u64,
    pub grad: Option<u64>,
    pub per_sample: Option<u64>,
}

/// Device address of an input on `dev`, checked against its allocation.
pub(crate) fn cuda_in(dev: &CudaDevice, t: &TensorRef<'_>, what: &str) -> Result<u64> {
    match t.storage {
        Storage::Cuda { ptr, ordinal } => cuda_checked(dev, ptr, ordinal, t.dtype, t.shape, what),
        Storage::Host(_) => Err(host_on_cuda(what)),
    }
}

/// Device address of an output on `dev`, checked against its allocation.
fn cuda_out(dev: &CudaDevice, t: &TensorMut<'_>, what: &str) -> Result<u64> {
    match t.storage {
        Storage::Cuda { ptr, ordinal } => cuda_checked(dev, ptr, ordinal, t.dtype, t.shape, what),
        Storage::Host(_) => Err(host_on_cuda(what)),
    }
}

fn cuda_checked(
    dev: &CudaDevice,
    ptr: u64,
    ordinal: usize,
    dtype: DType,
    shape: Shape,
    what: &str,
) -> Result<u64> {
    if ordinal != dev.ordinal() {
        return Err(Error::DeviceMismatch(format!(
            "{what} is on CUDA device {ordinal}, the computation on device {}",
            dev.ordinal()
        )));
    }
    dev.check_buffer(ptr, shape.bytes(dtype)?, dtype.size(), what)?;
    Ok(ptr)
}

fn host_on_cuda(what: &str) -> Error {
    Error::DeviceMismatch(format!("{what} is host memory but the device is CUDA"))
}

/// The elements of a host input as `T` (its validated dtype).
pub(crate) fn host_in<'t, T: Element>(t: &'t TensorRef<'_>, what: &str) -> Result<&'t [T]> {
    match &t.storage {
        Storage::Host(h) => h.typed::<T>().ok_or_else(dtype_bug),
        Storage::Cuda { .. } => Err(cuda_on_host(what)),
    }
}

fn dtype_bug() -> Error {
    Error::Internal("a validated dtype did not match its data".into())
}

pub(crate) fn host_out<'t, 'a>(
    t: &'t mut TensorMut<'a>,
    what: &str,
) -> Result<&'t mut HostMut<'a>> {
    match &mut t.storage {
        Storage::Host(h) => Ok(h),
        Storage::Cuda { .. } => Err(cuda_on_host(what)),
    }
}

fn cuda_on_host(what: &str) -> Error {
    Error::DeviceMismatch(format!("{what} is CUDA memory but the device is the CPU"))
}

/// The one f32 a CPU loss call writes.
pub(crate) fn host_scalar<'t>(t: &'t mut TensorMut<'_>, what: &str) -> Result<&'t mut [f32]> {
    match host_out(t, what)? {
        HostMut::F32(s) => Ok(s),
        _ => Err(Error::arg(format!("{what} must be f32"))),
    }
}

/// Errors when two device ranges overlap (an output aliasing an input would
/// be read after it is overwritten).
pub(crate) fn no_overlap(a: (u64, usize), b: (u64, usize), what: &str) -> Result<()> {
    let (a0, a1) = (a.0, a.0.saturating_add(a.1 as u64));
    let (b0, b1) = (b.0, b.0.saturating_add(b.1 as u64));
    if a0 < b1 && b0 < a1 {
        return Err(Error::arg(format!(
            "{what} overlap; in-place computation is not supported"
        )));
    }
    Ok(())
}

pub(crate) fn check_weight(weight: f32) -> Result<()> {
    if !weight.is_finite() {
        return Err(Error::arg(format!("weight must be finite, got {weight}")));
    }
    Ok(())
}

/// Runs `compute` with a one-float loss buffer on `device` and returns the
/// value, waiting for the device.
pub(crate) fn value_on(
    device: &Device,
    compute: impl FnOnce(TensorMut<'_>) -> Result<()>,
) -> Result<f32> {
    let Some(stream) = device.cuda_stream() else {
        let mut value = 0.0f32;
        compute(TensorMut::scalar(&mut value))?;
        return Ok(value);
    };
    let mut buf = stream
        .alloc_zeros::<f32>(1)
        .map_err(|e| Error::cuda("allocating the loss buffer", e))?;
    compute(TensorMut::cuda(&mut buf, Shape::flat(1))?)?;
    let host = stream
        .clone_dtoh(&buf)
        .map_err(|e| Error::cuda("reading the loss", e))?;
    stream
        .synchronize()
        .map_err(|e| Error::cuda("synchronizing the stream", e))?;
    Ok(host[0])
}
