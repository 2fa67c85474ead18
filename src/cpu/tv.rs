//! Total-variation loss and gradient, every variant, in f64.

use super::{sign, store_grad};
use crate::loss::tv::{TvConfig, TvVariant};
use crate::tensor::{Element, Shape};

/// Loss and per-image scores (already multiplied by the user's weight).
pub(crate) struct TvValues {
    pub loss: f64,
    pub per_sample: Vec<f64>,
}

/// (phi(d), dphi/dd) of one difference `d` with the variant's `coef`.
type Term = fn(f64, f64) -> (f64, f64);

/// The term of the variants whose terms are separable; `None` for
/// isotropic, whose terms couple the two directions.
fn separable_term(variant: TvVariant) -> Option<Term> {
    match variant {
        TvVariant::Article => Some(|d, coef| (coef * d * d, 2.0 * coef * d)),
        TvVariant::L1 => Some(|d, _| (d.abs(), sign(d))),
        TvVariant::L2Squared | TvVariant::L2 => Some(|d, _| (d * d, 2.0 * d)),
        TvVariant::Isotropic => None,
    }
}

/// `grad`, when given, receives `beta * grad + dL/dx`.
pub(crate) fn tv<T: Element>(
    x: &[T],
    grad: Option<(&mut [T], f32)>,
    s: Shape,
    cfg: &TvConfig,
    batch_scale: f64,
) -> TvValues {
    let (c, h, w) = (s.c, s.h, s.w);
    let image = c * h * w;
    let weight = cfg.weight as f64;
    let coef_h = 2.0 / (c * (h - 1).max(1) * w) as f64;
    let coef_w = 2.0 / (c * h * (w - 1).max(1)) as f64;
    let eps = cfg.eps as f64;
    let mut grad = grad;
    let mut per_sample = Vec::with_capacity(s.n);
    let mut g = vec![0.0f64; if grad.is_some() { image } else { 0 }];
    let want_grad = grad.is_some();

    for n in 0..s.n {
        let xi = &x[n * image..(n + 1) * image];
        let at = |ch: usize, i: usize, j: usize| xi[(ch * h + i) * w + j].to_f64();
        g.iter_mut().for_each(|v| *v = 0.0);
        let mut sum = 0.0f64;
        if let Some(phi) = separable_term(cfg.variant) {
            // Adds phi(d) for d = x[to] - x[from] and its derivative to both pixels.
            let mut term = |d: f64, coef: f64, from: usize, to: usize, g: &mut [f64]| {
                let (value, slope) = phi(d, coef);
                sum += value;
                if want_grad {
                    g[to] += slope;
                    g[from] -= slope;
                }
            };
            for ch in 0..c {
                for i in 0..h {
                    for j in 0..w {
                        let idx = (ch * h + i) * w + j;
                        if i + 1 < h {
                            term(
                                at(ch, i + 1, j) - at(ch, i, j),
                                coef_h,
                                idx,
                                idx + w,
                                &mut g,
                            );
                        }
                        if j + 1 < w {
                            term(
                                at(ch, i, j + 1) - at(ch, i, j),
                                coef_w,
                                idx,
                                idx + 1,
                                &mut g,
                            );
                        }
                    }
                }
            }
        } else {
            // Terms live on the (H-1) x (W-1) region and couple both directions.
            for ch in 0..c {
                for i in 0..h.saturating_sub(1) {
                    for j in 0..w.saturating_sub(1) {
                        let idx = (ch * h + i) * w + j;
                        let dh = at(ch, i + 1, j) - at(ch, i, j);
                        let dw = at(ch, i, j + 1) - at(ch, i, j);
                        let t = (dh * dh + dw * dw + eps).sqrt();
                        sum += t;
                        if want_grad && t != 0.0 {
                            g[idx + w] += dh / t;
                            g[idx + 1] += dw / t;
                            g[idx] -= (dh + dw) / t;
                        }
                    }
                }
            }
        }
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
        if let Some((out, beta)) = grad.as_mut() {
            for (slot, v) in out[n * image..(n + 1) * image].iter_mut().zip(&g) {
                store_grad(slot, grad_scale * v, *beta);
            }
        }
    }
    let loss = per_sample.iter().sum::<f64>() * batch_scale;
    TvValues { loss, per_sample }
}
