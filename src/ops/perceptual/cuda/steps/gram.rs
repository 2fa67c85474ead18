//! Launchers of the style steps. References: `cpu::gram::gram` and
//! `cpu::gram::gram_backward` for the Gram steps, `feature::cpu::
//! distance_sum` for the Grams' distance; `tests/gram.rs` compares them.

use super::{Exec, VEC};
use crate::cuda::abi::*;
use crate::cuda::{grid_for, Gpu};
use crate::error::Result;
use crate::ops::perceptual::cuda::convs::Convs;
use crate::ops::perceptual::cuda::schedule::*;

/// Blocks along one dimension of a Gram launch's grid (the kernels loop
/// over the rest).
const MAX_GRID: usize = 65535;

impl Gram {
    /// `pl_vgg_gram`, then `pl_vgg_gram_sum` when split into slices.
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let (c, h, w) = self.dims;
        let (n, m) = (self.pred.count, h * w);
        let count = n + self.target.map_or(0, |t| t.count);
        let tiles = c.div_ceil(32);
        let out = match self.partial {
            Some(partial) => x.at(partial),
            None => x.at(self.out),
        };
        let scale = 1.0 / (c * m) as f32;
        let p = pl_k_gram_params {
            x: x.span(self.pred) as *const _,
            x2: x.span(self.target.unwrap_or(self.pred)) as *const _,
            out: out as *mut f32,
            count: count as i64,
            split: n as i64,
            m: m as i64,
            rows_per_slice: m.div_ceil(self.slices).next_multiple_of(32) as i64,
            c: c as i32,
            slices: self.slices as i32,
            dtype: x.compute(),
            scale,
        };
        let grid = (
            (tiles * tiles) as u32,
            (count * self.slices).min(MAX_GRID) as u32,
        );
        x.kernel("pl_vgg_gram", grid, &p)?;
        if self.partial.is_none() {
            return Ok(());
        }
        let len = count * c * c;
        let sum = pl_k_gram_sum_params {
            partial: out as *const f32,
            out: x.at(self.out) as *mut f32,
            len: len as i64,
            slices: self.slices as i32,
            scale,
        };
        x.kernel("pl_vgg_gram_sum", grid_for(len), &sum)
    }
}

impl GramLoss {
    /// `pl_vgg_tap_loss` over the f32 Grams: pred's first, target's after
    /// them or kept.
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let per_image = self.c * self.c;
        let pred = x.at(self.grams);
        let target = match self.target {
            Some(kept) => x.at(kept),
            None => pred + (x.call.io.shape.n * per_image * 4) as u64,
        };
        let inputs = (pred, target, x.opt(self.tap.grad));
        let tap = (&self.tap, x.spec.style_criterion);
        x.with_tap(inputs, (per_image, VEC), tap, |mut tap, grid| {
            tap.dtype = pl_k_dtype_PL_K_F32 as i32;
            x.kernel("pl_vgg_tap_loss", grid, &tap)
        })
    }
}

impl GramBackward {
    /// `pl_vgg_gram_backward`.
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let (c, h, w) = self.dims;
        let (n, m) = (self.x.count, h * w);
        let p = pl_k_gram_backward_params {
            e: x.at(self.e) as *const f32,
            x: x.span(self.x) as *const _,
            grad: x.at(self.grad) as *mut _,
            n: n as i64,
            m: m as i64,
            c: c as i32,
            dtype: x.compute(),
            scale: 1.0 / (c * m) as f32,
            accumulate: self.accumulate as i32,
        };
        let tiles = m.div_ceil(32) * c.div_ceil(32);
        let grid = (tiles.min(MAX_GRID) as u32, n.min(MAX_GRID) as u32);
        x.kernel("pl_vgg_gram_backward", grid, &p)
    }
}
