//! Tensor descriptions: element types, NCHW shapes, and borrowed views of
//! host or CUDA memory that the loss calls read and write.
//!
//! A view never owns memory. Host views borrow a slice; CUDA views borrow a
//! `cudarc` slice (or wrap a raw device address, for the C ABI). Work on a
//! CUDA view is queued on the computing [`Device`](crate::Device)'s stream:
//! the memory must be ready on that stream and stay alive until the stream
//! has finished with it. Allocating it on [`Device::cuda_stream`](crate::Device::cuda_stream)
//! gives both for free.

use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::{bf16, f16};

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Lower-case name, as in error messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Runs `f` with the element type of `self`: the crate's one fan-out
    /// from a run-time dtype to a compile-time type.
    pub(crate) fn dispatch<F: PerDType>(self, f: F) -> F::Output {
        match self {
            DType::F32 => f.run::<f32>(),
            DType::F16 => f.run::<f16>(),
            DType::BF16 => f.run::<bf16>(),
        }
    }
}

/// A computation written once for every element type, called by
/// [`DType::dispatch`] with the type a run-time dtype names.
pub(crate) trait PerDType {
    /// What the computation returns.
    type Output;
    /// The computation in element type `T`.
    fn run<T: Element>(self) -> Self::Output;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A floating-point type the losses accept: `f32`, [`half::f16`], [`half::bf16`].
pub trait Element:
    Copy + Send + Sync + 'static + sealed::Sealed + cudarc::driver::DeviceRepr
{
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Exact widening.
    fn to_f64(self) -> f64;
    /// Rounds to the nearest representable value (ties to even).
    fn from_f64(v: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline]
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    #[inline]
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline]
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    #[inline]
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}

/// The bytes of `values`, as the device reads them (little-endian).
pub(crate) fn as_bytes<T: Element>(values: &[T]) -> &[u8] {
    // SAFETY: f32, f16 and bf16 are plain bits without padding.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

/// The bytes of `values`, writable.
pub(crate) fn as_bytes_mut<T: Element>(values: &mut [T]) -> &mut [u8] {
    let len = std::mem::size_of_val(values);
    // SAFETY: as for `as_bytes`; every bit pattern is a valid value.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast(), len) }
}

/// An N x C x H x W shape (contiguous, row-major). Flat data such as a loss
/// value or per-sample losses uses [`Shape::flat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
}

impl Shape {
    /// An NCHW shape.
    pub const fn new(n: usize, c: usize, h: usize, w: usize) -> Self {
        Shape { n, c, h, w }
    }

    /// `len` elements in a row, as `len x 1 x 1 x 1`.
    pub const fn flat(len: usize) -> Self {
        Shape::new(len, 1, 1, 1)
    }

    /// Number of elements; an error if a dimension is zero or the count
    /// overflows (it must also fit an `i64`, the kernels' index type).
    pub fn numel(&self) -> Result<usize> {
        if self.n == 0 || self.c == 0 || self.h == 0 || self.w == 0 {
            return Err(Error::shape(format!("{self} has a zero dimension")));
        }
        self.n
            .checked_mul(self.c)
            .and_then(|v| v.checked_mul(self.h))
            .and_then(|v| v.checked_mul(self.w))
            .filter(|&v| i64::try_from(v).is_ok())
            .ok_or_else(|| Error::shape(format!("{self} has too many elements")))
    }

    /// Number of bytes at `dtype`, with the same checks as [`Shape::numel`];
    /// also an error when they would not fit one allocation (`isize::MAX`).
    pub fn bytes(&self, dtype: DType) -> Result<usize> {
        self.numel()?;
        let dims = [self.n, self.c, self.h, self.w];
        bytes_for(&dims, dtype.size(), || {
            format!("{self} of {}", dtype.name())
        })
    }

    /// Elements of one image (C x H x W).
    pub(crate) fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }
}

/// The bytes of an array of `dims` elements of `elem` bytes each: the one
/// size check every derived buffer goes through, so that no size wraps or
/// exceeds what one allocation can hold (`isize::MAX`). The error names
/// `what()` (built only then: sizes are checked on every call).
pub(crate) fn bytes_for(
    dims: &[usize],
    elem: usize,
    what: impl FnOnce() -> String,
) -> Result<usize> {
    dims.iter()
        .try_fold(elem, |acc, &d| acc.checked_mul(d))
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| {
            Error::shape(format!(
                "{} would take more than {} bytes, more than any allocation can hold",
                what(),
                isize::MAX
            ))
        })
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {}, {}, {}]", self.n, self.c, self.h, self.w)
    }
}

impl From<[usize; 4]> for Shape {
    fn from(d: [usize; 4]) -> Self {
        Shape::new(d[0], d[1], d[2], d[3])
    }
}

/// Where a view's elements live: host bytes (`B` is `&[u8]` or
/// `&mut [u8]`), or a device address on CUDA device `ordinal`.
#[derive(Debug)]
pub(crate) enum Storage<B> {
    Host(B),
    Cuda { ptr: u64, ordinal: usize },
}

/// A read-only view of a contiguous NCHW tensor on the host or a CUDA device.
#[derive(Debug)]
pub struct TensorRef<'a> {
    pub(crate) storage: Storage<&'a [u8]>,
    pub(crate) dtype: DType,
    pub(crate) shape: Shape,
}

/// A writable view of a contiguous NCHW tensor on the host or a CUDA device.
#[derive(Debug)]
pub struct TensorMut<'a> {
    pub(crate) storage: Storage<&'a mut [u8]>,
    pub(crate) dtype: DType,
    pub(crate) shape: Shape,
}

fn check_len(len: usize, shape: Shape, what: &str) -> Result<()> {
    let numel = shape.numel()?;
    if len != numel {
        return Err(Error::shape(format!(
            "{what} holds {len} elements but shape {shape} needs {numel}"
        )));
    }
    Ok(())
}

/// The elements of host bytes viewed as `dtype`, as `T`; `None` when `T`
/// is another type. Equal dtypes mean equal types: `Element` is sealed and
/// each of its three types has its own `DTYPE`.
fn typed<T: Element>(bytes: &[u8], dtype: DType) -> Option<&[T]> {
    let aligned = bytes.as_ptr().align_offset(std::mem::align_of::<T>()) == 0;
    // SAFETY: the bytes were viewed from `[T]` (or checked for alignment
    // and length by the C ABI), and T has no invalid bit patterns.
    (T::DTYPE == dtype && aligned).then(|| unsafe {
        std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / dtype.size())
    })
}

fn typed_mut<T: Element>(bytes: &mut [u8], dtype: DType) -> Option<&mut [T]> {
    let aligned = bytes.as_ptr().align_offset(std::mem::align_of::<T>()) == 0;
    // SAFETY: as for `typed`; the borrow is unique.
    (T::DTYPE == dtype && aligned).then(|| unsafe {
        std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), bytes.len() / dtype.size())
    })
}

impl<'a> TensorRef<'a> {
    /// Views host memory; `data.len()` must equal the shape's element count.
    pub fn host<T: Element>(data: &'a [T], shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        check_len(data.len(), shape, "host slice")?;
        Ok(TensorRef {
            storage: Storage::Host(as_bytes(data)),
            dtype: T::DTYPE,
            shape,
        })
    }

    /// Views host bytes holding `shape` elements of `dtype`.
    ///
    /// # Safety
    /// `ptr` must address `shape.bytes(dtype)` readable bytes, aligned to
    /// `dtype.size()`, that nothing writes while the view lives.
    pub(crate) unsafe fn from_raw_host(ptr: *const u8, dtype: DType, shape: Shape) -> Result<Self> {
        let bytes = std::slice::from_raw_parts(ptr, shape.bytes(dtype)?);
        Ok(TensorRef {
            storage: Storage::Host(bytes),
            dtype,
            shape,
        })
    }

    /// Views a CUDA allocation; its length must equal the shape's element count.
    pub fn cuda<T: Element>(data: &'a CudaSlice<T>, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        check_len(data.len(), shape, "CUDA slice")?;
        let (ptr, _sync) = data.device_ptr(data.stream());
        Ok(TensorRef {
            storage: Storage::Cuda {
                ptr,
                ordinal: data.ordinal(),
            },
            dtype: T::DTYPE,
            shape,
        })
    }

    /// Wraps a raw device address.
    ///
    /// # Safety
    /// `ptr` must address at least `shape.numel() * dtype.size()` readable
    /// bytes on CUDA device `ordinal`, valid until the computing stream has
    /// finished with them.
    pub unsafe fn from_raw_cuda(
        ptr: u64,
        ordinal: usize,
        dtype: DType,
        shape: impl Into<Shape>,
    ) -> Self {
        TensorRef {
            storage: Storage::Cuda { ptr, ordinal },
            dtype,
            shape: shape.into(),
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The host elements as `T`; `None` for device memory or another type.
    pub(crate) fn host_values<T: Element>(&self) -> Option<&[T]> {
        match self.storage {
            Storage::Host(bytes) => typed(bytes, self.dtype),
            Storage::Cuda { .. } => None,
        }
    }
}

impl<'a> TensorMut<'a> {
    /// Views writable host memory; `data.len()` must equal the shape's element count.
    pub fn host<T: Element>(data: &'a mut [T], shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        check_len(data.len(), shape, "host slice")?;
        Ok(TensorMut {
            storage: Storage::Host(as_bytes_mut(data)),
            dtype: T::DTYPE,
            shape,
        })
    }

    /// Views writable host bytes holding `shape` elements of `dtype`.
    ///
    /// # Safety
    /// `ptr` must address `shape.bytes(dtype)` writable bytes, aligned to
    /// `dtype.size()`, that nothing else reads or writes while the view lives.
    pub(crate) unsafe fn from_raw_host(ptr: *mut u8, dtype: DType, shape: Shape) -> Result<Self> {
        let bytes = std::slice::from_raw_parts_mut(ptr, shape.bytes(dtype)?);
        Ok(TensorMut {
            storage: Storage::Host(bytes),
            dtype,
            shape,
        })
    }

    /// Views a writable CUDA allocation; its length must equal the shape's element count.
    pub fn cuda<T: Element>(data: &'a mut CudaSlice<T>, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        check_len(data.len(), shape, "CUDA slice")?;
        let ordinal = data.ordinal();
        let stream = data.stream().clone();
        let (ptr, _sync) = data.device_ptr_mut(&stream);
        Ok(TensorMut {
            storage: Storage::Cuda { ptr, ordinal },
            dtype: T::DTYPE,
            shape,
        })
    }

    /// A one-element f32 view for a loss value.
    pub fn scalar(value: &'a mut f32) -> Self {
        TensorMut {
            storage: Storage::Host(as_bytes_mut(std::slice::from_mut(value))),
            dtype: DType::F32,
            shape: Shape::flat(1),
        }
    }

    /// Wraps a raw device address.
    ///
    /// # Safety
    /// `ptr` must address at least `shape.numel() * dtype.size()` writable
    /// bytes on CUDA device `ordinal` that nothing else reads or writes until
    /// the computing stream has finished with them.
    pub unsafe fn from_raw_cuda(
        ptr: u64,
        ordinal: usize,
        dtype: DType,
        shape: impl Into<Shape>,
    ) -> Self {
        TensorMut {
            storage: Storage::Cuda { ptr, ordinal },
            dtype,
            shape: shape.into(),
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The host elements as `T`; `None` for device memory or another type.
    pub(crate) fn host_values<T: Element>(&mut self) -> Option<&mut [T]> {
        match &mut self.storage {
            Storage::Host(bytes) => typed_mut(bytes, self.dtype),
            Storage::Cuda { .. } => None,
        }
    }
}
