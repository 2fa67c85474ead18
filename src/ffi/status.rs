//! Status codes, the thread-local last-error message, and the version
//! queries.

use crate::error::Error;
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};

/// Result of every call: `PL_OK` (0) or an error code.
pub type pl_status = i32;
/// Success.
pub const PL_OK: pl_status = 0;
/// An argument is wrong (NULL, misaligned, out of range, inconsistent).
pub const PL_ERR_INVALID_ARGUMENT: pl_status = 1;
/// A dimension is negative, zero or too small for the formula, or a size
/// (in elements or bytes) cannot exist.
pub const PL_ERR_INVALID_SHAPE: pl_status = 2;
/// No CUDA driver, no device, or a bad ordinal.
pub const PL_ERR_NO_CUDA: pl_status = 3;
/// A pointer is on another device than the context.
pub const PL_ERR_DEVICE_MISMATCH: pl_status = 4;
/// A CUDA driver, NVRTC, cuDNN or launch error.
pub const PL_ERR_CUDA: pl_status = 5;
/// A broken invariant inside the library; please report it.
pub const PL_ERR_INTERNAL: pl_status = 6;
/// A weights file is malformed (the message names the tensor).
pub const PL_ERR_INVALID_WEIGHTS: pl_status = 7;
/// A file could not be read.
pub const PL_ERR_IO: pl_status = 8;
/// A panic inside the library, caught at the boundary; please report it.
/// The handles involved may be left in an unknown state: destroy them.
pub const PL_ERR_PANIC: pl_status = 9;

/// Memory could not be had (host, device, or the memory budget); the
/// message says what and how much. Nothing was written; a later call may
/// succeed.
pub const PL_ERR_OUT_OF_MEMORY: pl_status = 10;

/// The major version of this C ABI. A program compiled against one major
/// version must not run against a library of another: compare it with
/// `pl_abi_version()` at start-up. Within a major version, options structs
/// only grow (see `struct_size`), so an older program keeps working with
/// a newer library.
pub const PL_ABI_VERSION: u32 = 2;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `msg` as this thread's last error.
pub(crate) fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // try_with: a call from another thread-local's destructor finds this
    // one gone, and must not panic outside the guard.
    let _ = LAST_ERROR.try_with(|e| {
        if let Ok(mut slot) = e.try_borrow_mut() {
            *slot = c;
        }
    });
}

/// The status code of an error.
pub(crate) fn status_of(err: &Error) -> pl_status {
    match err {
        Error::InvalidArgument(_) => PL_ERR_INVALID_ARGUMENT,
        Error::InvalidShape(_) => PL_ERR_INVALID_SHAPE,
        Error::NoCuda(_) => PL_ERR_NO_CUDA,
        Error::DeviceMismatch(_) => PL_ERR_DEVICE_MISMATCH,
        Error::Cuda(_) => PL_ERR_CUDA,
        Error::Internal(_) => PL_ERR_INTERNAL,
        Error::InvalidWeights(_) => PL_ERR_INVALID_WEIGHTS,
        Error::Io(_) => PL_ERR_IO,
        Error::OutOfMemory(_) => PL_ERR_OUT_OF_MEMORY,
    }
}

/// The library version, e.g. "0.1.0". Never NULL.
#[no_mangle]
pub extern "C" fn pl_version() -> *const c_char {
    static VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

/// The major version of the C ABI this library implements
/// (`PL_ABI_VERSION` of the header it was built with).
#[no_mangle]
pub extern "C" fn pl_abi_version() -> u32 {
    PL_ABI_VERSION
}

/// The message of the last failed call on this thread ("" if none). Never
/// NULL; valid until the next failing call on this thread.
#[no_mangle]
pub extern "C" fn pl_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|e| e.try_borrow().map(|m| m.as_ptr()).ok())
        .ok()
        .flatten()
        .unwrap_or(c"".as_ptr())
}
