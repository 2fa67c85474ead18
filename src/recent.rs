//! A small most-recently-used list: the per-shape CUDA plans of a loss and
//! the per-stream devices of a C context are kept in one, so a service
//! that sees many input shapes (or streams) holds the memory of a few, not
//! of every one it has met.

use crate::error::Result;

/// At most `cap` values, most recently used first.
pub(crate) struct Recent<T> {
    items: Vec<T>,
    cap: usize,
}

impl<T> Recent<T> {
    pub(crate) fn new(cap: usize) -> Self {
        Recent {
            items: Vec::new(),
            cap: cap.max(1),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Removes and returns the value `matches` picks, if any.
    pub(crate) fn take(&mut self, matches: impl Fn(&T) -> bool) -> Option<T> {
        let k = self.items.iter().position(matches)?;
        Some(self.items.remove(k))
    }

    /// Adds `item` as the most recent, dropping the least recently used
    /// value if full.
    pub(crate) fn push(&mut self, item: T) {
        if self.items.len() == self.cap {
            self.items.pop();
        }
        self.items.insert(0, item);
    }

    /// Drops every value.
    pub(crate) fn clear(&mut self) {
        self.items.clear();
    }

    /// The value `matches` picks or, when there is none, the one `make`
    /// builds (after dropping the least recently used value if full, so
    /// its memory is free first); either becomes the most recent.
    pub(crate) fn get_or_try_insert(
        &mut self,
        matches: impl Fn(&T) -> bool,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<&mut T> {
        let item = match self.take(matches) {
            Some(item) => item,
            None => {
                if self.items.len() == self.cap {
                    self.items.pop();
                }
                make()?
            }
        };
        self.items.insert(0, item);
        Ok(&mut self.items[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn keeps_the_most_recent_and_builds_only_what_is_missing() {
        let mut r = Recent::new(2);
        let mut built = Vec::new();
        let mut get = |r: &mut Recent<u32>, key: u32| {
            *r.get_or_try_insert(
                |&v| v == key,
                || {
                    built.push(key);
                    Ok(key)
                },
            )
            .unwrap()
        };
        assert_eq!(get(&mut r, 1), 1);
        assert_eq!(get(&mut r, 2), 2);
        assert_eq!(get(&mut r, 1), 1); // a hit: 1 is now the most recent
        assert_eq!(get(&mut r, 3), 3); // full: 2, the least recent, goes
        assert_eq!(get(&mut r, 1), 1);
        assert_eq!(get(&mut r, 2), 2); // rebuilt
        assert_eq!(built, vec![1, 2, 3, 2]);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn a_failed_build_leaves_no_entry() {
        let mut r: Recent<u32> = Recent::new(2);
        let err = r.get_or_try_insert(|_| false, || Err(Error::arg("no")));
        assert!(err.is_err());
        assert_eq!(r.len(), 0);
    }
}
