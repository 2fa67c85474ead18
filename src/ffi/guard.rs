//! The panic guard every entry point runs its body in: an error becomes a
//! status and a message, a panic becomes `PL_ERR_PANIC`; nothing unwinds
//! into the caller.

use super::status::{pl_status, set_last_error, status_of, PL_ERR_PANIC, PL_OK};
use crate::error::Error;
use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The text of a caught panic.
fn panic_message(panic: Box<dyn Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `body`, turning an error or a panic into a status and a message.
pub(crate) fn guard(body: impl FnOnce() -> Result<(), Error>) -> pl_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => PL_OK,
        Ok(Err(e)) => {
            set_last_error(&e.to_string());
            status_of(&e)
        }
        Err(panic) => {
            set_last_error(&format!(
                "panic inside the library: {}",
                panic_message(panic)
            ));
            PL_ERR_PANIC
        }
    }
}

/// Runs `body` of a function that returns nothing (the destroy functions):
/// a panic is caught and left as this thread's last error.
pub(crate) fn guard_void(body: impl FnOnce()) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(body)) {
        set_last_error(&format!(
            "panic inside the library: {}",
            panic_message(panic)
        ));
    }
}
