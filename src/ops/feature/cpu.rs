//! Feature distance (MSE / MAE) and its gradient w.r.t. `a`, in f64: the
//! reference for kernels/feature.cu, and the distance at every tap of the
//! perceptual loss on the CPU.

use super::config::Criterion;
use crate::backend::{HostGrad, Values};
use crate::error::Result;
use crate::fallible;
use crate::ops::sign;
use crate::tensor::{Element, Shape};

/// D(d) and dD/dd for a difference d.
fn term(criterion: Criterion, d: f64) -> (f64, f64) {
    match criterion {
        // Fro's terms are squares too; the norm is taken of their sum.
        Criterion::Mse | Criterion::Fro => (d * d, 2.0 * d),
        Criterion::Mae => (d.abs(), sign(d)),
    }
}

/// The sum of D(a - b) over the elements; `grad`, when given, receives
/// `scale * dD/da` (after `beta` times its old value).
pub(crate) fn distance_sum<A: Element, G: Element>(
    criterion: Criterion,
    a: &[A],
    b: &[A],
    mut grad: Option<HostGrad<'_, G>>,
    scale: f64,
) -> f64 {
    let mut sum = 0.0f64;
    for (i, (&ai, &bi)) in a.iter().zip(b).enumerate() {
        let (value, slope) = term(criterion, ai.to_f64() - bi.to_f64());
        sum += value;
        if let Some(g) = grad.as_mut() {
            g.store(i, scale * slope);
        }
    }
    sum
}

/// `weight * mean(D(a - b))` over all elements, each image's
/// `weight * mean(D)`, and, when asked for, `beta * grad + dL/da`.
pub(crate) fn evaluate<T: Element>(
    criterion: Criterion,
    weight: f32,
    a: &[T],
    b: &[T],
    mut grad: Option<HostGrad<'_, T>>,
    s: Shape,
) -> Result<Values> {
    let image = s.image_len();
    let scale = weight as f64 / (s.n * image) as f64;
    let mut sums = fallible::with_capacity(s.n, "per-image distances")?;
    for n in 0..s.n {
        let range = n * image..(n + 1) * image;
        let g = grad.as_mut().map(|g| g.part(range.clone()));
        sums.push(distance_sum(
            criterion,
            &a[range.clone()],
            &b[range],
            g,
            scale,
        ));
    }
    let loss = sums.iter().sum::<f64>() * scale;
    // Each image's sum becomes its value in place (no second vector).
    for sum in &mut sums {
        *sum = weight as f64 * *sum / image as f64;
    }
    Ok(Values {
        loss,
        per_sample: sums,
        parts: None,
    })
}
