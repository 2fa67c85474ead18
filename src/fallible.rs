//! Allocations whose size depends on the caller's input, as error values:
//! a request the host cannot meet is [`Error::OutOfMemory`] naming what
//! it was for and how many bytes, never an abort of the caller's process.

use crate::error::{Error, Result};

fn bytes_of<T>(len: usize) -> usize {
    len.saturating_mul(std::mem::size_of::<T>())
}

/// Room for `len` more elements in `v`, or an error.
pub(crate) fn reserve<T>(v: &mut Vec<T>, len: usize, what: &str) -> Result<()> {
    v.try_reserve_exact(len)
        .map_err(|_| Error::oom(what, bytes_of::<T>(len)))
}

/// `len` copies of `value`.
pub(crate) fn filled<T: Clone>(len: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    reserve(&mut v, len, what)?;
    v.resize(len, value);
    Ok(v)
}

/// An empty vector with room for `len` elements.
pub(crate) fn with_capacity<T>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    reserve(&mut v, len, what)?;
    Ok(v)
}

/// `v` resized to `len`, new elements `value`.
pub(crate) fn resize<T: Clone>(v: &mut Vec<T>, len: usize, value: T, what: &str) -> Result<()> {
    if len > v.len() {
        reserve(v, len - v.len(), what)?;
    }
    v.resize(len, value);
    Ok(())
}

/// A copy of `values`.
pub(crate) fn copied<T: Clone>(values: &[T], what: &str) -> Result<Vec<T>> {
    let mut v = with_capacity(values.len(), what)?;
    v.extend_from_slice(values);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_impossible_request_is_an_error_naming_it() {
        let e = filled(usize::MAX / 4, 0u64, "the test buffer").unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
        let text = e.to_string();
        assert!(text.contains("the test buffer"), "{text}");
        assert!(text.contains(&format!("{} bytes", usize::MAX)), "{text}");
        // And the next request works.
        assert_eq!(filled(3, 1u8, "a small buffer").unwrap(), vec![1, 1, 1]);
    }
}
