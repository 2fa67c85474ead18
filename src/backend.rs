//! The seam between the losses and the two backends.
//!
//! Every loss implements [`Op`]: a CPU method, generic over the element
//! type, that evaluates the formula and writes the gradient, and a CUDA
//! method that queues kernels on device addresses. [`run`] is the only
//! place a call is routed. It checks what every loss shares (inputs of one
//! shape and dtype, the outputs' dtypes and shapes, memory on the
//! computing device, no output overlapping an input), then picks the
//! backend from the [`Device`] and, on the CPU, the element type from the
//! inputs' dtype ([`DType::dispatch`]).
//!
//! A loss therefore never matches on the device or the dtype itself: it
//! validates its options when it is built, states its shape rules in
//! [`Op::check_shape`], and calls `run`.

use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use crate::finite;
use crate::ops::LossOutputs;
use crate::tensor::{DType, Element, PerDType, Shape, Storage, TensorMut, TensorRef};

/// One loss over `N` same-shape inputs (the first is the one the gradient
/// is taken for), with a CPU and a CUDA implementation.
pub(crate) trait Op<const N: usize> {
    /// The loss's own rules for the inputs' shape (checked after the
    /// inputs are found to match and to have a countable number of
    /// elements, before the outputs); none by default.
    fn check_shape(&self, _shape: Shape) -> Result<()> {
        Ok(())
    }

    /// The loss's own rules for the first input beyond its shape (checked
    /// with the shape); none by default.
    fn check_input(&self, _first: &TensorRef<'_>) -> Result<()> {
        Ok(())
    }

    /// Whether the loss has two parts (perceptual, style) a call can ask
    /// for with [`LossOutputs::with_parts`]; none by default.
    fn has_parts(&self) -> bool {
        false
    }

    /// Whether a non-finite input is an error (the loss's `check_finite`
    /// option), checked by [`run`] before any work.
    fn checks_finite(&self) -> bool {
        false
    }

    /// Evaluates the loss on the host in `T`: returns the values and, when
    /// `io.grad` is given, writes `beta * grad + dL/dx` through it.
    fn cpu<T: Element>(&self, io: HostIo<'_, T, N>) -> Result<Values>;

    /// Queues the loss on `dev`'s stream; the loss, gradient and per-sample
    /// values are written on the device, without waiting.
    fn cuda(&self, dev: &CudaDevice, io: DeviceIo<N>) -> Result<()>;
}

/// What a CPU evaluation returns; [`run`] writes it to the outputs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Values {
    /// The loss (the user's weight and the batch reduction applied).
    pub loss: f64,
    /// Each image's loss, the weight applied, before the batch reduction.
    pub per_sample: Vec<f64>,
    /// A loss of two parts (perceptual, style), each weighted, summing to
    /// `loss`; `None` for a loss of one part.
    pub parts: Option<[f64; 2]>,
}

/// A CPU call: the inputs as `T` and, when asked for, the gradient.
pub(crate) struct HostIo<'a, T, const N: usize> {
    pub shape: Shape,
    pub inputs: [&'a [T]; N],
    pub grad: Option<HostGrad<'a, T>>,
}

/// The gradient a CPU call writes: `values = beta * values + dL/dx`.
pub(crate) struct HostGrad<'a, T> {
    pub values: &'a mut [T],
    pub beta: f32,
}

impl<T: Element> HostGrad<'_, T> {
    /// Writes `beta * old + value` at `i`, rounded to T; the old value is
    /// not read when beta is 0.
    pub fn store(&mut self, i: usize, value: f64) {
        self.values[i] = self.blended(i, value);
    }

    /// What [`store`](Self::store) would write at `i`, without writing it.
    pub fn blended(&self, i: usize, value: f64) -> T {
        match self.beta {
            0.0 => T::from_f64(value),
            beta => T::from_f64(beta as f64 * self.values[i].to_f64() + value),
        }
    }

    /// The elements in `range`, with the same beta.
    pub fn part(&mut self, range: std::ops::Range<usize>) -> HostGrad<'_, T> {
        HostGrad {
            values: &mut self.values[range],
            beta: self.beta,
        }
    }
}

/// A CUDA call: device addresses, each checked against its allocation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceIo<const N: usize> {
    pub shape: Shape,
    pub dtype: DType,
    pub inputs: [u64; N],
    pub grad: Option<u64>,
    pub beta: f32,
    /// One f32.
    pub loss: u64,
    /// `shape.n` f32, when asked for.
    pub per_sample: Option<u64>,
    /// Two f32, when asked for (a loss with parts).
    pub parts: Option<u64>,
}

/// An input of a call and its name in messages.
pub(crate) type Input<'t, 'a> = (&'t TensorRef<'a>, &'static str);

/// Runs `op` on `device`: the one place a loss call is routed to a backend.
pub(crate) fn run<const N: usize>(
    op: &impl Op<N>,
    device: &Device,
    inputs: [Input<'_, '_>; N],
    out: LossOutputs<'_>,
) -> Result<()> {
    let (first, first_name) = inputs[0];
    let (shape, dtype) = (first.shape, first.dtype);
    for &(t, name) in &inputs[1..] {
        if t.shape != shape || t.dtype != dtype {
            return Err(Error::arg(format!(
                "{first_name} and {name} must have one shape and dtype, got {} {shape} and {} {}",
                dtype.name(),
                t.dtype.name(),
                t.shape
            )));
        }
    }
    shape.numel()?;
    op.check_shape(shape)?;
    op.check_input(first)?;
    out.validate(dtype, shape)?;
    if out.parts.is_some() && !op.has_parts() {
        return Err(Error::arg(
            "this loss has one part; parts are the perceptual loss's (perceptual, style)",
        ));
    }
    match device.cuda_device() {
        None => dtype.dispatch(OnHost { op, inputs, out }),
        Some(dev) => {
            let io = device_io(dev, &inputs, &out)?;
            if op.checks_finite() {
                dev.refuse_in_capture(|| {
                    "check_finite waits for the device to read its result (turn it off for \
                     captured calls)"
                        .into()
                })?;
                let first = finite::first_on_device(dev, &io.inputs, dtype, shape.numel()?)?;
                if let Some((input, index, value)) = first {
                    return Err(finite::error(inputs[input].1, shape, index, value));
                }
            }
            op.cuda(dev, io)
        }
    }
}

/// A CPU call waiting for its element type.
struct OnHost<'o, 't, 'a, O, const N: usize> {
    op: &'o O,
    inputs: [Input<'t, 'a>; N],
    out: LossOutputs<'a>,
}

impl<O: Op<N>, const N: usize> PerDType for OnHost<'_, '_, '_, O, N> {
    type Output = Result<()>;

    fn run<T: Element>(self) -> Result<()> {
        let OnHost {
            op,
            inputs,
            mut out,
        } = self;
        let shape = inputs[0].0.shape;
        let mut values = [&[][..]; N];
        for (slot, (t, name)) in values.iter_mut().zip(inputs) {
            *slot = t.host_values::<T>().ok_or_else(|| on_cpu(name))?;
            if op.checks_finite() {
                if let Some(index) = finite::first_on_host(slot) {
                    return Err(finite::error(name, shape, index, slot[index].to_f64()));
                }
            }
        }
        let beta = out.beta;
        let grad = match out.grad.as_mut() {
            Some(g) => Some(HostGrad {
                values: g.host_values::<T>().ok_or_else(|| on_cpu("gradient"))?,
                beta,
            }),
            None => None,
        };
        let result = op.cpu(HostIo {
            shape,
            inputs: values,
            grad,
        })?;
        host_f32(&mut out.loss, "loss output")?[0] = result.loss as f32;
        if let Some(p) = out.parts.as_mut() {
            let parts = result.parts.unwrap_or([result.loss, 0.0]);
            for (slot, v) in host_f32(p, "parts output")?.iter_mut().zip(parts) {
                *slot = v as f32;
            }
        }
        if let Some(p) = out.per_sample.as_mut() {
            for (slot, v) in host_f32(p, "per-sample output")?
                .iter_mut()
                .zip(&result.per_sample)
            {
                *slot = *v as f32;
            }
        }
        Ok(())
    }
}

fn host_f32<'t>(t: &'t mut TensorMut<'_>, what: &str) -> Result<&'t mut [f32]> {
    t.host_values::<f32>().ok_or_else(|| on_cpu(what))
}

/// Why a validated view is not host data of the expected type: it is
/// device memory (the dtypes were checked before).
fn on_cpu(what: &str) -> Error {
    Error::DeviceMismatch(format!("{what} is CUDA memory but the device is the CPU"))
}

/// The device addresses of a CUDA call, each checked against its
/// allocation, and the outputs against every input and each other.
fn device_io<const N: usize>(
    dev: &CudaDevice,
    inputs: &[Input<'_, '_>; N],
    out: &LossOutputs<'_>,
) -> Result<DeviceIo<N>> {
    let (shape, dtype) = (inputs[0].0.shape, inputs[0].0.dtype);
    let mut addrs = [0u64; N];
    let mut input_spans = Vec::with_capacity(N);
    for (slot, &(t, name)) in addrs.iter_mut().zip(inputs) {
        let span = device_span(dev, &t.storage, t.dtype, t.shape, name)?;
        *slot = span.0;
        input_spans.push(span);
    }
    let mut output_spans = Vec::new();
    let mut output = |t: &TensorMut<'_>, name: &'static str| -> Result<u64> {
        let span = device_span(dev, &t.storage, t.dtype, t.shape, name)?;
        output_spans.push(span);
        Ok(span.0)
    };
    let loss = output(&out.loss, "loss output")?;
    let grad = out
        .grad
        .as_ref()
        .map(|g| output(g, "gradient"))
        .transpose()?;
    let per_sample = (out.per_sample.as_ref())
        .map(|p| output(p, "per-sample output"))
        .transpose()?;
    let parts = (out.parts.as_ref())
        .map(|p| output(p, "parts output"))
        .transpose()?;
    check_disjoint(&input_spans, &output_spans)?;
    Ok(DeviceIo {
        shape,
        dtype,
        inputs: addrs,
        grad,
        beta: out.beta,
        loss,
        per_sample,
        parts,
    })
}

/// The address range of a view on `dev`, checked against its allocation.
pub(crate) fn device_span<'n, B>(
    dev: &CudaDevice,
    storage: &Storage<B>,
    dtype: DType,
    shape: Shape,
    what: &'n str,
) -> Result<Span<'n>> {
    let Storage::Cuda { ptr, ordinal } = *storage else {
        return Err(Error::DeviceMismatch(format!(
            "{what} is host memory but the device is CUDA"
        )));
    };
    if ordinal != dev.ordinal() {
        return Err(Error::DeviceMismatch(format!(
            "{what} is on CUDA device {ordinal}, the computation on device {}",
            dev.ordinal()
        )));
    }
    let bytes = shape.bytes(dtype)?;
    dev.check_buffer(ptr, bytes, dtype.size(), what)?;
    Ok((ptr, bytes, what))
}

/// An address range: (start, bytes, name in messages).
pub(crate) type Span<'n> = (u64, usize, &'n str);

/// Errors when an output overlaps an input or another output (an output
/// aliasing an input would be read after it is overwritten; two aliasing
/// outputs would overwrite each other).
pub(crate) fn check_disjoint(inputs: &[Span<'_>], outputs: &[Span<'_>]) -> Result<()> {
    let end = |(p, len, _): Span<'_>| p.saturating_add(len as u64);
    for (k, &o) in outputs.iter().enumerate() {
        for &other in inputs.iter().chain(&outputs[k + 1..]) {
            if o.0 < end(other) && other.0 < end(o) {
                return Err(Error::arg(format!(
                    "{} and {} overlap; in-place computation is not supported",
                    other.2, o.2
                )));
            }
        }
    }
    Ok(())
}
