//! Typed casts between the opaque handles C sees and the Rust values
//! behind them, all in one place: a NULL handle is an error naming the
//! parameter and its type, a handle is created by `give` and freed once by
//! `destroy`.

use crate::error::Error;

/// A Rust type that C sees only as an opaque pointer.
pub(crate) trait Handle: Sized {
    /// The C type name, for messages.
    const NAME: &'static str;
}

/// The value behind handle `ptr` (parameter `param`).
///
/// # Safety
/// `ptr` must be NULL or a live handle of type `H` from [`give`].
pub(crate) unsafe fn borrow<'a, H: Handle>(ptr: *const H, param: &str) -> Result<&'a H, Error> {
    ptr.as_ref()
        .ok_or_else(|| Error::arg(format!("{param} (a {} handle) is NULL", H::NAME)))
}

/// Checks an output parameter before any work is done.
///
/// # Safety
/// `out` must be NULL or writable.
pub(crate) unsafe fn out_param<'a, T>(out: *mut T, param: &str) -> Result<&'a mut T, Error> {
    out.as_mut()
        .ok_or_else(|| Error::arg(format!("{param} is NULL")))
}

/// Moves `value` to the heap and hands its pointer to C through `out`.
pub(crate) fn give<H: Handle>(value: H, out: &mut *mut H) {
    *out = Box::into_raw(Box::new(value));
}

/// Frees a handle from [`give`]; NULL is ignored.
///
/// # Safety
/// `ptr` must be NULL or a live handle of type `H`, not used again.
pub(crate) unsafe fn destroy<H: Handle>(ptr: *mut H) {
    if !ptr.is_null() {
        super::guard::guard_void(|| drop(Box::from_raw(ptr)));
    }
}
