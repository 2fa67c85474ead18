//! Layer buffers kept between calls, with the network they serve.
//!
//! A forward or backward pass over one image needs three buffers of up to
//! a layer's size (the values, the next layer's, a convolution's scratch):
//! 16 MB each for a 256 x 256 image. Freshly allocated on every call they
//! come from the system as new pages, which it zeroes on first touch: on a
//! 2-core machine that kernel work was about a tenth of a 1x3x256x256
//! call's samples. So the passes take them from here and give them back.
//! The network keeps the largest it is given, at most [`KEPT`] (what two
//! passes at once, one a core, hold) and at most [`KEPT_BYTES`] in all,
//! freed with it.

use std::sync::Mutex;

/// Buffers kept at most.
const KEPT: usize = 6;

/// Bytes kept at most: a network that once ran a large image does not hold
/// six of its layers for ever (at 512 x 512 a layer of 64 channels is 64
/// MiB).
const KEPT_BYTES: usize = 256 << 20;

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

    /// Keeps `v` for a later [`take`](Self::take) if it is among the
    /// largest [`KEPT`] within [`KEPT_BYTES`] (a small buffer given back
    /// must not push out a layer-sized one); else drops it, or the
    /// smaller ones it displaces.
    pub(crate) fn give(&self, v: Vec<f32>) {
        if v.capacity() == 0 || v.capacity() * 4 > KEPT_BYTES {
            return;
        }
        let Ok(mut free) = self.free.lock() else {
            return;
        };
        free.push(v);
        free.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
        let bytes = |free: &[Vec<f32>]| free.iter().map(|b| b.capacity() * 4).sum::<usize>();
        while free.len() > KEPT || bytes(&free) > KEPT_BYTES {
            free.pop();
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
        // The largest stay: small ones given back later do not push them out.
        b.give(vec![0f32; 1000]);
        for _ in 0..KEPT + 3 {
            b.give(vec![0f32; 10]);
        }
        b.give(Vec::new());
        let lens = |b: &Buffers| {
            b.free
                .lock()
                .unwrap()
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>()
        };
        assert_eq!(lens(&b)[..2], [1000, 10]);
        assert_eq!(lens(&b).len(), KEPT);
        assert_eq!(b.clone().free.lock().unwrap().len(), 0);
        // Nor more than KEPT_BYTES in all: a buffer over it is not kept.
        b.give(vec![0f32; KEPT_BYTES / 4 + 1]);
        assert_eq!(lens(&b)[0], 1000);
    }
}
