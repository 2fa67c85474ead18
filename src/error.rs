//! One error type for the whole crate: every failure is a value, never a panic.

use std::fmt;

/// Everything that can go wrong in a loss call, a device operation or a load.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// An argument is wrong: a shape, a dtype, a size or an option. The text
    /// names the argument and says what was expected.
    InvalidArgument(String),
    /// A dimension is zero, or the element count or byte size overflows.
    InvalidShape(String),
    /// No usable CUDA device: no driver library, no device, or a bad ordinal.
    NoCuda(String),
    /// A tensor lives on another device than the one asked to compute.
    DeviceMismatch(String),
    /// A CUDA driver, NVRTC, cuDNN or kernel launch call failed.
    Cuda(String),
    /// A weights file is malformed: the text names the tensor.
    InvalidWeights(String),
    /// A file could not be read.
    Io(String),
    /// Memory for a computation could not be had: a host allocation
    /// failed, or a CUDA allocation or plan does not fit the device or the
    /// memory budget. The text says what was being allocated and how much;
    /// nothing was written, and a later call may succeed.
    OutOfMemory(String),
    /// Something inside the library went wrong (a caught panic, a broken
    /// invariant); please report it.
    Internal(String),
}

impl Error {
    pub(crate) fn arg(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    pub(crate) fn shape(msg: impl Into<String>) -> Self {
        Error::InvalidShape(msg.into())
    }

    pub(crate) fn cuda(context: &str, err: impl fmt::Display) -> Self {
        Error::Cuda(format!("{context}: {err}"))
    }

    /// The same error, its message prefixed with `what` (an argument's
    /// name, say).
    pub(crate) fn context(self, what: &str) -> Self {
        let with = |m: String| format!("{what}: {m}");
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(with(m)),
            Error::InvalidShape(m) => Error::InvalidShape(with(m)),
            Error::NoCuda(m) => Error::NoCuda(with(m)),
            Error::DeviceMismatch(m) => Error::DeviceMismatch(with(m)),
            Error::Cuda(m) => Error::Cuda(with(m)),
            Error::InvalidWeights(m) => Error::InvalidWeights(with(m)),
            Error::Io(m) => Error::Io(with(m)),
            Error::OutOfMemory(m) => Error::OutOfMemory(with(m)),
            Error::Internal(m) => Error::Internal(with(m)),
        }
    }

    /// A failed allocation of `bytes` bytes for `what`.
    pub(crate) fn oom(what: &str, bytes: usize) -> Self {
        Error::OutOfMemory(format!("allocating {bytes} bytes for {what} failed"))
    }

    /// A failed CUDA allocation of `bytes` bytes for `what`: out of memory
    /// when the driver says so, a CUDA error otherwise.
    pub(crate) fn cuda_alloc(what: &str, bytes: usize, err: cudarc::driver::DriverError) -> Self {
        use cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY;
        match err.0 {
            CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory(format!(
                "allocating {bytes} bytes of device memory for {what} failed"
            )),
            _ => Error::cuda(&format!("allocating {bytes} bytes for {what}"), err),
        }
    }

    /// A mutex or lock that an earlier panic left poisoned.
    pub(crate) fn poisoned() -> Self {
        Error::Internal("a lock was poisoned by an earlier panic".into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::InvalidShape(m) => write!(f, "invalid shape: {m}"),
            Error::NoCuda(m) => write!(f, "no CUDA device: {m}"),
            Error::DeviceMismatch(m) => write!(f, "device mismatch: {m}"),
            Error::Cuda(m) => write!(f, "CUDA error: {m}"),
            Error::InvalidWeights(m) => write!(f, "invalid weights: {m}"),
            Error::Io(m) => write!(f, "I/O error: {m}"),
            Error::OutOfMemory(m) => write!(f, "out of memory: {m}"),
            Error::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
