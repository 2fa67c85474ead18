//! What every loss call takes: the dtype, the NCHW dimensions, and the
//! `pl_outputs` struct of its results; and the one function that turns
//! caller pointers into tensor views on the context's device.

use super::options::{self, check_aligned, released};
use super::status::pl_status;
use crate::backend::{check_disjoint, Span};
use crate::error::Error;
use crate::ops::LossOutputs;
use crate::tensor::{DType, Shape, TensorMut, TensorRef};
use crate::Device;
use std::ffi::c_void;

/// Element type of the tensors of a call.
pub type pl_dtype = i32;
/// IEEE binary32.
pub const PL_F32: pl_dtype = 0;
/// IEEE binary16.
pub const PL_F16: pl_dtype = 1;
/// bfloat16.
pub const PL_BF16: pl_dtype = 2;

/// How per-image values combine into a loss.
pub type pl_reduction = i32;
/// Mean over the batch.
pub const PL_REDUCTION_MEAN: pl_reduction = 0;
/// Sum over the batch.
pub const PL_REDUCTION_SUM: pl_reduction = 1;

/// Where a loss call writes. Initialise with `pl_outputs_init`, then set
/// the pointers wanted; all live on the context's device (host memory for
/// a CPU context, device memory for a CUDA one).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pl_outputs {
    /// sizeof(pl_outputs), as `pl_outputs_init` writes it.
    pub struct_size: usize,
    /// Required: one float, the loss.
    pub loss: *mut f32,
    /// Optional (NULL = not computed): dL/d(first input), same dtype and
    /// layout as that input.
    pub grad: *mut c_void,
    /// Optional (NULL = not written): n floats, each image's loss (the
    /// loss's weight applied, before the batch reduction).
    pub per_sample: *mut f32,
    /// Gradient accumulation: grad = beta * grad + dL/dx. Default 0: the
    /// old contents are not read (uninitialised memory is fine).
    pub beta: f32,
    /// Write 0 (as `pl_outputs_init` does).
    pub reserved: i32,
    /// Optional (NULL = not written): two floats, the perceptual and the
    /// style part of a perceptual loss, each weighted, summing to the loss;
    /// other losses refuse it. Added in the struct's second version: a
    /// caller built against the first passes a smaller struct_size and gets
    /// NULL here.
    pub parts: *mut f32,
}

released!(pl_outputs, since [parts], reserved reserved, last parts: *mut f32, {
    loss: std::ptr::null_mut(),
    grad: std::ptr::null_mut(),
    per_sample: std::ptr::null_mut(),
    beta: 0.0,
    reserved: 0,
    parts: std::ptr::null_mut(),
});

/// Writes the defaults to `out`: struct_size set, no pointers, beta 0.
///
/// # Safety
/// `out` must be NULL or a writable `pl_outputs`.
#[no_mangle]
pub unsafe extern "C" fn pl_outputs_init(out: *mut pl_outputs) -> pl_status {
    super::guard::guard(|| options::init(out, "out"))
}

pub(crate) fn dtype_of(d: pl_dtype) -> Result<DType, Error> {
    match d {
        PL_F32 => Ok(DType::F32),
        PL_F16 => Ok(DType::F16),
        PL_BF16 => Ok(DType::BF16),
        _ => Err(Error::arg(format!("unknown pl_dtype {d}"))),
    }
}

pub(crate) fn reduction_of(r: pl_reduction) -> Result<crate::Reduction, Error> {
    match r {
        PL_REDUCTION_MEAN => Ok(crate::Reduction::Mean),
        PL_REDUCTION_SUM => Ok(crate::Reduction::Sum),
        _ => Err(Error::arg(format!("unknown pl_reduction {r}"))),
    }
}

pub(crate) fn shape_of(n: i64, c: i64, h: i64, w: i64) -> Result<Shape, Error> {
    let dim = |v: i64, name: &str| {
        usize::try_from(v).map_err(|_| Error::shape(format!("{name} = {v} is negative")))
    };
    let shape = Shape::new(dim(n, "n")?, dim(c, "c")?, dim(h, "h")?, dim(w, "w")?);
    shape.numel()?;
    Ok(shape)
}

/// No host address space of a 64-bit platform reaches past 2^57 bytes
/// (x86-64 with 5-level paging: 2^56; AArch64: at most 2^52): a host
/// buffer said to end beyond it cannot exist, whatever its dimensions say.
const HOST_ADDRESS_END: u64 = 1 << 57;

/// Errors unless `bytes` bytes at host address `p` can exist.
pub(crate) fn check_host_span(p: u64, bytes: usize, what: &str) -> Result<(), Error> {
    match p.checked_add(bytes as u64) {
        Some(end) if end <= HOST_ADDRESS_END => Ok(()),
        _ => Err(Error::shape(format!(
            "{what} ({p:#x}) would span {bytes} bytes, past the end of any host address space; \
             do the dimensions match the buffer?"
        ))),
    }
}

/// The tensors of one call as views on the context's device.
pub(crate) struct CallViews<'a> {
    pub inputs: Vec<TensorRef<'a>>,
    pub outputs: LossOutputs<'a>,
}

/// Views over caller pointers: device addresses for a CUDA context (the
/// loss call checks them against their allocations), host slices for the
/// A view of one input (`what` in messages) outside a loss call, such as a
/// target to keep: `ptr` checked as `views` checks a call's inputs.
///
/// # Safety
/// `ptr` must address `shape` elements of `dtype` on `device`.
pub(crate) unsafe fn input_view<'a>(
    device: &Device,
    ptr: *const c_void,
    (dtype, shape): (DType, Shape),
    what: &str,
) -> Result<TensorRef<'a>, Error> {
    if ptr.is_null() {
        return Err(Error::arg(format!("{what} is NULL")));
    }
    let bytes = shape.bytes(dtype).map_err(|e| e.context(what))?;
    match device.ordinal() {
        Some(ordinal) => Ok(TensorRef::from_raw_cuda(ptr as u64, ordinal, dtype, shape)),
        None => {
            check_aligned(ptr, dtype.size(), what)?;
            check_host_span(ptr as u64, bytes, what)?;
            TensorRef::from_raw_host(ptr.cast(), dtype, shape)
        }
    }
}

/// CPU after checking alignment and that no output overlaps an input or
/// another output (overlapping `&` and `&mut` slices would be undefined
/// behaviour).
///
/// # Safety
/// Each input and `out.grad` must address `shape` elements of `dtype`,
/// `out.loss` one f32, `out.per_sample` n f32 and `out.parts` two, on the
/// context's device,
/// valid for the call.
pub(crate) unsafe fn views<'a>(
    device: &Device,
    inputs: &[(*const c_void, &'static str)],
    dtype: DType,
    shape: Shape,
    out: *const pl_outputs,
) -> Result<CallViews<'a>, Error> {
    for &(p, what) in inputs {
        if p.is_null() {
            return Err(Error::arg(format!("{what} is NULL")));
        }
    }
    if out.is_null() {
        return Err(Error::arg(
            "out is NULL; pass a pl_outputs with at least its loss pointer set",
        ));
    }
    let out = options::read(out, "out")?;
    if out.loss.is_null() {
        return Err(Error::arg("out.loss is NULL"));
    }
    let names: Vec<&str> = inputs.iter().map(|i| i.1).collect();
    let bytes = shape
        .bytes(dtype)
        .map_err(|e| e.context(&names.join(" and ")))?;
    // (pointer, bytes, alignment, name) of each output asked for.
    let outputs: Vec<(*mut c_void, usize, usize, &str)> = [
        (out.loss.cast(), 4, 4, "out.loss"),
        (out.grad, bytes, dtype.size(), "out.grad"),
        (out.per_sample.cast(), shape.n * 4, 4, "out.per_sample"),
        (out.parts.cast(), 2 * 4, 4, "out.parts"),
    ]
    .into_iter()
    .filter(|o| !o.0.is_null())
    .collect();
    let cuda = device.ordinal();
    if cuda.is_none() {
        // Device pointers are checked by the loss call; host ones here.
        let mut input_spans: Vec<Span> = Vec::new();
        for &(p, what) in inputs {
            check_aligned(p, dtype.size(), what)?;
            check_host_span(p as u64, bytes, what)?;
            input_spans.push((p as u64, bytes, what));
        }
        let mut output_spans: Vec<Span> = Vec::new();
        for &(p, len, align, what) in &outputs {
            check_aligned(p.cast_const(), align, what)?;
            check_host_span(p as u64, len, what)?;
            output_spans.push((p as u64, len, what));
        }
        check_disjoint(&input_spans, &output_spans)?;
    }
    let view_in = |p: *const c_void| match cuda {
        Some(ordinal) => Ok(TensorRef::from_raw_cuda(p as u64, ordinal, dtype, shape)),
        None => TensorRef::from_raw_host(p.cast(), dtype, shape),
    };
    let view_out = |p: *mut c_void, dtype: DType, shape: Shape| match cuda {
        Some(ordinal) => Ok(TensorMut::from_raw_cuda(p as u64, ordinal, dtype, shape)),
        None => TensorMut::from_raw_host(p.cast(), dtype, shape),
    };
    let inputs = inputs
        .iter()
        .map(|&(p, _)| view_in(p))
        .collect::<Result<Vec<_>, Error>>()?;
    let mut outputs = LossOutputs::new(view_out(out.loss.cast(), DType::F32, Shape::flat(1))?)
        .accumulate(out.beta);
    if !out.grad.is_null() {
        outputs = outputs.with_grad(view_out(out.grad, dtype, shape)?);
    }
    if !out.per_sample.is_null() {
        let per_sample = view_out(out.per_sample.cast(), DType::F32, Shape::flat(shape.n))?;
        outputs = outputs.with_per_sample(per_sample);
    }
    if !out.parts.is_null() {
        outputs = outputs.with_parts(view_out(out.parts.cast(), DType::F32, Shape::flat(2))?);
    }
    Ok(CallViews { inputs, outputs })
}
