//! The CPU backend: a direct transcription of the formulas in f64. It is the
//! oracle every GPU test compares against, and the fallback without a GPU.
//! It is written in the scatter form (each difference pushes its gradient to
//! the pixels it touches) while the CUDA kernels gather, so the two share no
//! indexing code.

pub(crate) mod feature;
mod gemm;
pub(crate) mod perceptual;
pub(crate) mod tv;
pub(crate) mod vgg;

use crate::tensor::Element;

/// Writes `beta * old + value` rounded to T; `old` is not read when beta == 0.
pub(crate) fn store_grad<T: Element>(slot: &mut T, value: f64, beta: f32) {
    let v = if beta == 0.0 {
        value
    } else {
        beta as f64 * slot.to_f64() + value
    };
    *slot = T::from_f64(v);
}

/// Derivative of |d|: its sign, 0 at 0, NaN for NaN.
pub(crate) fn sign(d: f64) -> f64 {
    if d == 0.0 {
        0.0
    } else {
        d.signum()
    }
}
