//! The rule every options struct of the C ABI follows, so that it can grow
//! without breaking compiled callers.
//!
//! 1. The struct starts with `size_t struct_size`, which the caller sets to
//!    `sizeof` the struct it was compiled with; its `pl_*_init` function
//!    writes that and every default, so zero never has to mean "default".
//! 2. New fields are only ever appended, and each released version ends
//!    without padding, so every version has its own size.
//! 3. The library accepts the size of any version it knows, reads that
//!    prefix and takes the defaults for the fields after it (an older
//!    caller), and rejects any other size (a newer caller, or a struct
//!    never initialised) with a message naming both.
//! 4. Passing NULL for an options struct means all defaults.
//!
//! Struct-size fields were chosen over builder handles with setters: a C
//! caller fills one plain struct (designated initialisers, stack memory),
//! the header documents every option in one place, and the ctypes binding
//! mirrors it field for field, while growth stays as safe.

use crate::error::Error;

/// An options struct of the C ABI.
///
/// # Safety
/// The type is `#[repr(C)]`, starts with a `usize` struct size, holds only
/// plain data (integers, floats, raw pointers) and `SIZES` lists the
/// sizes of its released versions, the current one last.
pub(crate) unsafe trait Options: Copy {
    /// The C type name, for messages.
    const NAME: &'static str;
    /// `sizeof` of every released version, oldest first; the last is the
    /// current `size_of::<Self>()`.
    const SIZES: &'static [usize];
    /// Every field's default, `struct_size` the current size.
    fn defaults() -> Self;
    /// The `reserved` field, which must hold 0; 0 for a struct without one.
    fn reserved(&self) -> i32 {
        0
    }
}

/// Implements [`Options`] for a struct: its C name, its size, its
/// defaults (`struct_size` filled in), its `reserved` field when that ends
/// it, and a compile-time check that its last field ends it (no trailing
/// padding). A struct that grew names the first field of each later
/// version with `since [field, ...]`: each earlier version ends where
/// such a field begins.
macro_rules! released {
    (@impl $ty:ident, [$($since:ident),*], $last:ident: $last_ty:ty,
        { $($field:ident: $value:expr),* } $(, $reserved:ident)?) => {
        // SAFETY: repr(C), struct_size first, plain data; each earlier
        // version is a prefix ending where a later version's fields start.
        unsafe impl $crate::ffi::options::Options for $ty {
            const NAME: &'static str = stringify!($ty);
            const SIZES: &'static [usize] =
                &[$(std::mem::offset_of!($ty, $since),)* std::mem::size_of::<$ty>()];
            fn defaults() -> Self {
                $ty {
                    struct_size: std::mem::size_of::<$ty>(),
                    $($field: $value),*
                }
            }
            $(fn reserved(&self) -> i32 {
                self.$reserved
            })?
        }
        const _: () = assert!(
            std::mem::size_of::<$ty>()
                == std::mem::offset_of!($ty, $last) + std::mem::size_of::<$last_ty>()
                && std::mem::size_of::<$ty>() % 8 == 0
                $(&& std::mem::offset_of!($ty, $since) % 8 == 0)*,
            "a version of an options struct must end without padding",
        );
    };
    ($ty:ident, $(since [$($since:ident),*],)? $(reserved $reserved:ident,)?
        last $last:ident: $last_ty:ty, { $($field:ident: $value:expr),* $(,)? }) => {
        $crate::ffi::options::released!(@impl $ty, [$($($since),*)?], $last: $last_ty,
            { $($field: $value),* } $(, $reserved)?);
    };
}
pub(crate) use released;

/// Reads the options at `ptr` (parameter `param`): the defaults for NULL,
/// else the version its `struct_size` names, later fields defaulted.
///
/// # Safety
/// `ptr` must be NULL or address `struct_size` readable bytes.
pub(crate) unsafe fn read<O: Options>(ptr: *const O, param: &str) -> Result<O, Error> {
    if ptr.is_null() {
        return Ok(O::defaults());
    }
    check_aligned(ptr.cast(), std::mem::align_of::<O>(), param)?;
    let size = ptr.cast::<usize>().read();
    if !O::SIZES.contains(&size) {
        return Err(Error::arg(format!(
            "{param}: struct_size is {size}, which is not the size of a {} this library knows \
             ({:?}); set it to sizeof({}), as {}_init does",
            O::NAME,
            O::SIZES,
            O::NAME,
            O::NAME,
        )));
    }
    let mut value = O::defaults();
    // SAFETY: `size` is at most size_of::<O>() (the last of SIZES) and the
    // caller vouches for `size` readable bytes; O is plain data.
    std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), (&mut value as *mut O).cast::<u8>(), size);
    match value.reserved() {
        0 => Ok(value),
        r => Err(Error::arg(format!(
            "{param}.reserved is {r}; write 0 (the init function does)"
        ))),
    }
}

/// Errors unless `p` (parameter `what`) is a multiple of `align`.
pub(crate) fn check_aligned(
    p: *const std::ffi::c_void,
    align: usize,
    what: &str,
) -> Result<(), Error> {
    match (p as usize).is_multiple_of(align) {
        true => Ok(()),
        false => Err(Error::arg(format!(
            "{what} ({p:?}) is not aligned to {align} bytes"
        ))),
    }
}

/// Writes the defaults of `O` to `ptr` (parameter `param`).
///
/// # Safety
/// `ptr` must be NULL or address a writable `O`.
pub(crate) unsafe fn init<O: Options>(ptr: *mut O, param: &str) -> Result<(), Error> {
    let out = super::handle::out_param(ptr, param)?;
    *out = O::defaults();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Version 2 of a struct that gained `b` after version 1 ended at `a2`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Grown {
        struct_size: usize,
        a: f32,
        a2: f32,
        b: f64,
    }

    const V1: usize = offset_of!(Grown, b);

    unsafe impl Options for Grown {
        const NAME: &'static str = "pl_grown_options";
        const SIZES: &'static [usize] = &[V1, size_of::<Grown>()];
        fn defaults() -> Self {
            Grown {
                struct_size: size_of::<Grown>(),
                a: 1.0,
                a2: 2.0,
                b: 3.0,
            }
        }
    }

    #[test]
    fn an_older_struct_gets_the_defaults_of_the_fields_it_lacks() {
        // An old caller's struct: version 1, followed by bytes it does not own.
        let old = Grown {
            struct_size: V1,
            a: 5.0,
            a2: 6.0,
            b: f64::NAN,
        };
        let got = unsafe { read(&old, "opts") }.unwrap();
        assert_eq!((got.a, got.a2, got.b), (5.0, 6.0, 3.0));
        let new = Grown {
            b: 7.0,
            ..Grown::defaults()
        };
        assert_eq!(unsafe { read(&new, "opts") }.unwrap(), new);
        assert_eq!(
            unsafe { read(std::ptr::null::<Grown>(), "opts") }.unwrap(),
            Grown::defaults()
        );
    }

    #[test]
    fn an_unknown_size_is_refused_with_both_sizes_named() {
        for size in [0, 8, V1 + 4, size_of::<Grown>() + 8] {
            let bad = Grown {
                struct_size: size,
                ..Grown::defaults()
            };
            let e = unsafe { read(&bad, "opts") }.unwrap_err().to_string();
            assert!(e.contains(&format!("struct_size is {size}")), "{e}");
            assert!(e.contains("pl_grown_options"), "{e}");
            assert!(e.contains(&format!("{}", size_of::<Grown>())), "{e}");
        }
    }

    #[test]
    fn init_writes_the_defaults() {
        let mut g = Grown {
            struct_size: 0,
            a: 0.0,
            a2: 0.0,
            b: 0.0,
        };
        unsafe { init(&mut g, "opts") }.unwrap();
        assert_eq!(g, Grown::defaults());
        assert!(unsafe { init(std::ptr::null_mut::<Grown>(), "opts") }.is_err());
    }
}
