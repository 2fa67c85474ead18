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
            Error::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
