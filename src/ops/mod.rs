//! The losses. Each lives in one folder: `config.rs` (its options, plain
//! data both backends read), `cpu.rs` (the reference, in f64 where the
//! formula is evaluated), `cuda.rs` (the launcher of its kernels) and
//! `mod.rs` (the formula, the loss object and its [`Op`](crate::backend::Op)
//! implementation, which `backend::run` routes to a backend).

pub mod feature;
pub mod lpips;
pub(crate) mod parts;
pub mod perceptual;
pub mod tv;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Shape, TensorMut};

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
    pub(crate) parts: Option<TensorMut<'a>>,
}

impl<'a> LossOutputs<'a> {
    /// Only the loss value (no gradient work is done).
    pub fn new(loss: TensorMut<'a>) -> Self {
        LossOutputs {
            loss,
            grad: None,
            beta: 0.0,
            per_sample: None,
            parts: None,
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

    /// Also write the two parts of a perceptual loss with style terms as
    /// two f32: (perceptual, style), each with its weight, summing to the
    /// loss (the second is 0 without style taps, the first without
    /// perceptual taps). Other losses refuse it.
    pub fn with_parts(mut self, parts: TensorMut<'a>) -> Self {
        self.parts = Some(parts);
        self
    }

    /// Checks what every loss shares: an f32 scalar loss, `n` f32
    /// per-sample values, a gradient shaped like the input, and a finite
    /// beta.
    pub(crate) fn validate(&self, input_dtype: DType, input_shape: Shape) -> Result<()> {
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
            let images = input_shape.n;
            if p.dtype != DType::F32 || p.shape.numel()? != images {
                return Err(Error::arg(format!(
                    "per-sample output must be {images} f32 values, got {} of shape {}",
                    p.dtype.name(),
                    p.shape
                )));
            }
        }
        if let Some(p) = &self.parts {
            if p.dtype != DType::F32 || p.shape.numel()? != 2 {
                return Err(Error::arg(format!(
                    "parts output must be 2 f32 values, got {} of shape {}",
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

pub(crate) fn check_weight(what: &str, weight: f32) -> Result<()> {
    if !weight.is_finite() {
        return Err(Error::arg(format!("{what} must be finite, got {weight}")));
    }
    Ok(())
}

/// The machine's cores, which the CPU backend splits its work across.
pub(crate) fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The derivative of |d| every absolute-value term uses: its sign, 0 at 0,
/// NaN for NaN.
pub(crate) fn sign(d: f64) -> f64 {
    if d == 0.0 {
        0.0
    } else {
        d.signum()
    }
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
        .map_err(|e| Error::cuda_alloc("the loss buffer", 4, e))?;
    compute(TensorMut::cuda(&mut buf, Shape::flat(1))?)?;
    let host = stream
        .clone_dtoh(&buf)
        .map_err(|e| Error::cuda("reading the loss", e))?;
    stream
        .synchronize()
        .map_err(|e| Error::cuda("synchronizing the stream", e))?;
    Ok(host[0])
}
