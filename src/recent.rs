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

    /// The values, most recent first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }

    /// Removes and returns the value `matches` picks, if any.
    pub(crate) fn take(&mut self, matches: impl Fn(&T) -> bool) -> Option<T> {
        let k = self.items.iter().position(matches)?;
        Some(self.items.remove(k))
    }

    /// Whether a value `matches` picks is kept.
    pub(crate) fn contains(&self, matches: impl Fn(&T) -> bool) -> bool {
        self.items.iter().any(matches)
    }

    /// Adds `item` as the most recent, dropping the least recently used
    /// value that `keep` does not hold on to (one a captured CUDA graph
    /// still uses) if full: with every value kept, the list grows past its
    /// cap.
    pub(crate) fn push_keeping(&mut self, item: T, keep: impl Fn(&T) -> bool) {
        self.make_room(keep);
        self.items.insert(0, item);
    }

    fn make_room(&mut self, keep: impl Fn(&T) -> bool) {
        if self.items.len() >= self.cap {
            if let Some(k) = self.items.iter().rposition(|t| !keep(t)) {
                self.items.remove(k);
            }
        }
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
        self.get_or_try_insert_keeping(matches, |_| false, make)
    }

    /// [`get_or_try_insert`](Self::get_or_try_insert), never dropping a
    /// value `keep` holds on to.
    pub(crate) fn get_or_try_insert_keeping(
        &mut self,
        matches: impl Fn(&T) -> bool,
        keep: impl Fn(&T) -> bool,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<&mut T> {
        let item = match self.take(matches) {
            Some(item) => item,
            None => {
                self.make_room(keep);
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

    #[test]
    fn kept_values_are_never_dropped() {
        let mut r = Recent::new(2);
        let keep = |v: &u32| v.is_multiple_of(2); // even values are "captured"
        for v in [2, 4, 1, 3, 5] {
            r.push_keeping(v, keep);
        }
        // 2 and 4 stay; each odd value pushed out the odd one before it.
        assert!(r.contains(|&v| v == 2) && r.contains(|&v| v == 4));
        assert!(r.contains(|&v| v == 5) && !r.contains(|&v| v == 3));
        assert_eq!(r.len(), 3, "grown past its cap of 2 for the kept values");
        let got = *r
            .get_or_try_insert_keeping(|&v| v == 7, keep, || Ok(7))
            .unwrap();
        assert_eq!(got, 7);
        assert!(!r.contains(|&v| v == 5), "the one value it could drop went");
        assert_eq!(r.len(), 3);
    }
}
