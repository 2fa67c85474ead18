//! Total-variation loss and gradient, every variant, in f64: the
//! reference the CUDA kernel is tested against. Written in the scatter form
//! (each difference pushes its gradient to the two pixels it touches) while
//! the kernel gathers, so the two share no indexing code.

use super::config::{TvConfig, TvVariant};
use crate::backend::{HostGrad, Values};
use crate::error::Result;
use crate::fallible;
use crate::ops::sign;
use crate::tensor::{Element, Shape};

/// One image's sum of phi(d) over the vertical and horizontal differences
/// d = x[to] - x[from], with dphi/dd added to `to` and taken from `from` in
/// `g` (when not empty). `phi(d, coef)` is (value, slope); each variant
/// passes its own closure, so the loop is compiled per variant.
fn separable_sum(
    x: impl Fn(usize) -> f64,
    g: &mut [f64],
    (c, h, w): (usize, usize, usize),
    (coef_h, coef_w): (f64, f64),
    phi: impl Fn(f64, f64) -> (f64, f64),
) -> f64 {
    let mut sum = 0.0;
    let mut term = |d: f64, coef: f64, from: usize, to: usize| {
        let (value, slope) = phi(d, coef);
        sum += value;
        if !g.is_empty() {
            g[to] += slope;
            g[from] -= slope;
        }
    };
    for ch in 0..c {
        for i in 0..h {
            for j in 0..w {
                let idx = (ch * h + i) * w + j;
                if i + 1 < h {
                    term(x(idx + w) - x(idx), coef_h, idx, idx + w);
                }
                if j + 1 < w {
                    term(x(idx + 1) - x(idx), coef_w, idx, idx + 1);
                }
            }
        }
    }
    sum
}

/// One image's isotropic sum: its terms live on the (H-1) x (W-1) region
/// and couple both directions.
fn isotropic_sum(
    x: impl Fn(usize) -> f64,
    g: &mut [f64],
    (c, h, w): (usize, usize, usize),
    eps: f64,
) -> f64 {
    let mut sum = 0.0;
    for ch in 0..c {
        for i in 0..h.saturating_sub(1) {
            for j in 0..w.saturating_sub(1) {
                let idx = (ch * h + i) * w + j;
                let dh = x(idx + w) - x(idx);
                let dw = x(idx + 1) - x(idx);
                let t = (dh * dh + dw * dw + eps).sqrt();
                sum += t;
                if !g.is_empty() && t != 0.0 {
                    g[idx + w] += dh / t;
                    g[idx + 1] += dw / t;
                    g[idx] -= (dh + dw) / t;
                }
            }
        }
    }
    sum
}

/// The loss of `x` and its per-image values; `grad`, when given, receives
/// `beta * grad + dL/dx`.
pub(crate) fn evaluate<T: Element>(
    cfg: &TvConfig,
    x: &[T],
    grad: Option<HostGrad<'_, T>>,
    s: Shape,
) -> Result<Values> {
    let (c, h, w) = (s.c, s.h, s.w);
    let image = s.image_len();
    let weight = cfg.weight as f64;
    let batch_scale = cfg.reduction.batch_scale(s.n);
    let coef_h = 2.0 / (c * (h - 1).max(1) * w) as f64;
    let coef_w = 2.0 / (c * h * (w - 1).max(1)) as f64;
    let mut grad = grad;
    let mut per_sample = fallible::with_capacity(s.n, "per-image TV values")?;
    let g_len = if grad.is_some() { image } else { 0 };
    let mut g = fallible::filled(g_len, 0.0f64, "one image's TV gradient (f64)")?;

    for n in 0..s.n {
        let xi = &x[n * image..(n + 1) * image];
        let at = |idx: usize| xi[idx].to_f64();
        g.iter_mut().for_each(|v| *v = 0.0);
        let dims = (c, h, w);
        let coefs = (coef_h, coef_w);
        let sum = match cfg.variant {
            TvVariant::Article => {
                separable_sum(at, &mut g, dims, coefs, |d, k| (k * d * d, 2.0 * k * d))
            }
            TvVariant::L1 => separable_sum(at, &mut g, dims, coefs, |d, _| (d.abs(), sign(d))),
            TvVariant::L2Squared | TvVariant::L2 => {
                separable_sum(at, &mut g, dims, coefs, |d, _| (d * d, 2.0 * d))
            }
            TvVariant::Isotropic => isotropic_sum(at, &mut g, dims, cfg.eps as f64),
        };
        let (score, grad_scale) = match cfg.variant {
            TvVariant::L2 => {
                let root = sum.sqrt();
                let scale = if root != 0.0 {
                    weight * batch_scale / (2.0 * root)
                } else {
                    0.0
                };
                (root, scale)
            }
            _ => (sum, weight * batch_scale),
        };
        per_sample.push(weight * score);
        if let Some(out) = grad.as_mut() {
            for (k, v) in g.iter().enumerate() {
                out.store(n * image + k, grad_scale * v);
            }
        }
    }
    let loss = per_sample.iter().sum::<f64>() * batch_scale;
    Ok(Values { loss, per_sample })
}
