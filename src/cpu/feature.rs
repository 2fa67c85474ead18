//! Feature distance (MSE / MAE) and its gradient w.r.t. `a`, in f64.

use super::{sign, store_grad};
use crate::loss::feature::Criterion;
use crate::tensor::Element;

/// Returns `weight * mean(D(a - b))`; `grad`, when given, receives
/// `beta * grad + dL/da`.
pub(crate) fn feature<T: Element>(
    a: &[T],
    b: &[T],
    grad: Option<(&mut [T], f32)>,
    criterion: Criterion,
    weight: f32,
) -> f64 {
    let scale = weight as f64 / a.len() as f64;
    let mut sum = 0.0f64;
    let mut grad = grad;
    for (i, (&ai, &bi)) in a.iter().zip(b).enumerate() {
        let d = ai.to_f64() - bi.to_f64();
        let (value, slope) = match criterion {
            Criterion::Mse => (d * d, 2.0 * d),
            Criterion::Mae => (d.abs(), sign(d)),
        };
        sum += value;
        if let Some((g, beta)) = grad.as_mut() {
            store_grad(&mut g[i], scale * slope, *beta);
        }
    }
    sum * scale
}
