//! Layer buffers kept between calls, with the network they serve.
//!
//! A forward or backward pass over one image needs three buffers of up to
//! a layer's size (the values, the next layer's, a convolution's scratch):
//! 16 MB each for a 256 x 256 image. Freshly allocated on every call they
//! come from the system as new pages, which it zeroes on first touch: on a
//! 2-core machine that kernel work was about a tenth of a 1x3x256x256
//! call's samples. So the passes take them from here and give them back.
//! The network keeps at most [`KEPT`] of them (what two passes at once,
//! one a core, use), freed with it.

use std::sync::Mutex;

/// Buffers kept at most.
const KEPT: usize = 6;

/// The free buffers of one network's host passes.
#[derive(Debug, Default)]
pub(crate) struct Buffers {
    free: Mutex<Vec<Vec<f32>>>,
}

impl Buffers {
    /// The largest buffer kept, of any length and content (the passes
    /// size and write it before reading it), or a new empty one.
    pub(crate) fn take(&self) -> Vec<f32> {
        let Ok(mut free) = self.free.lock() else {
            return Vec::new();
        };
        let largest = (0..free.len()).max_by_key(|&i| free[i].capacity());
        largest.map_or_else(Vec::new, |i| free.swap_remove(i))
    }

    /// Keeps `v` for a later [`take`](Self::take) unless [`KEPT`] are kept.
    pub(crate) fn give(&self, v: Vec<f32>) {
        if v.capacity() == 0 {
            return;
        }
        if let Ok(mut free) = self.free.lock() {
            if free.len() < KEPT {
                free.push(v);
            }
        }
    }
}

/// A copy of the network is a new one: it starts with no buffers.
impl Clone for Buffers {
    fn clone(&self) -> Buffers {
        Buffers::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_with_their_memory_and_at_most_kept_stay() {
        let b = Buffers::default();
        assert_eq!(b.take().capacity(), 0);
        let v = vec![1f32; 1000];
        let at = v.as_ptr();
        b.give(v);
        b.give(vec![0f32; 10]);
        let again = b.take();
        assert_eq!(
            (again.as_ptr(), again.len()),
            (at, 1000),
            "the largest first"
        );
        assert_eq!(b.take().len(), 10);
        for _ in 0..KEPT + 3 {
            b.give(vec![0f32; 10]);
        }
        b.give(Vec::new());
        assert_eq!(b.free.lock().unwrap().len(), KEPT);
        assert_eq!(b.clone().free.lock().unwrap().len(), 0);
    }
}
