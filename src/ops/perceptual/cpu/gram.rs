//! Gram matrices of one image's features and their gradient, f32 products
//! accumulated by sgemm in f32 (never in half precision, whatever the
//! input dtype): the style loss's reference.
//!
//! F is the C x M feature map (M = H W, CHW layout), G = F F^T / (C M).

use super::gemm::sgemm;
use crate::error::Result;
use crate::fallible;

/// G = F F^T / (C M) of `f` (C x M), C x C row-major.
pub(crate) fn gram(f: &[f32], c: usize, m: usize) -> Result<Vec<f32>> {
    // sgemm reads B row-major, so F^T is laid out once (M x C).
    let mut ft = fallible::filled(c * m, 0f32, "a transposed feature map")?;
    for (ch, row) in f.chunks_exact(m).enumerate() {
        for (p, &v) in row.iter().enumerate() {
            ft[p * c + ch] = v;
        }
    }
    let mut g = fallible::filled(c * c, 0f32, "a Gram matrix")?;
    sgemm((c, m, c), f, false, (&ft, c), (&mut g, c));
    let scale = 1.0 / (c * m) as f32;
    g.iter_mut().for_each(|v| *v *= scale);
    Ok(g)
}

/// dL/dF (C x M) from `e` = dL/dG (C x C) for G = F F^T / (C M):
/// (E + E^T) F / (C M). Written into `out`.
pub(crate) fn gram_backward(
    e: &[f32],
    f: &[f32],
    c: usize,
    m: usize,
    out: &mut [f32],
) -> Result<()> {
    let scale = 1.0 / (c * m) as f32;
    let mut sym = fallible::filled(c * c, 0f32, "a Gram gradient")?;
    for i in 0..c {
        for j in 0..c {
            sym[i * c + j] = (e[i * c + j] + e[j * c + i]) * scale;
        }
    }
    sgemm((c, c, m), &sym, false, (f, m), (out, m));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(c: usize, m: usize) -> Vec<f32> {
        (0..c * m)
            .map(|i| ((i * 31 % 53) as f32 / 26.0 - 1.0).max(0.0))
            .collect()
    }

    /// Against the definition, summed in f64.
    #[test]
    fn gram_is_the_scaled_product_of_the_map_with_itself() {
        for (c, m) in [(3, 5), (64, 70), (17, 1)] {
            let f = features(c, m);
            let g = gram(&f, c, m).unwrap();
            for i in 0..c {
                for j in 0..c {
                    let want: f64 = (0..m)
                        .map(|p| f[i * m + p] as f64 * f[j * m + p] as f64)
                        .sum::<f64>()
                        / (c * m) as f64;
                    let got = g[i * c + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "{c}x{m} ({i},{j})"
                    );
                }
            }
        }
    }

    /// Central differences of L = sum E .* G(F), for an E that is not
    /// symmetric (so the transpose term is exercised).
    #[test]
    fn gram_backward_matches_finite_differences() {
        let (c, m) = (4, 6);
        let f = features(c, m);
        let e: Vec<f32> = (0..c * c).map(|i| (i as f32 * 0.37).sin()).collect();
        let loss = |f: &[f32]| -> f64 {
            let g = gram(f, c, m).unwrap();
            g.iter().zip(&e).map(|(&a, &b)| a as f64 * b as f64).sum()
        };
        let mut got = vec![0f32; c * m];
        gram_backward(&e, &f, c, m, &mut got).unwrap();
        for k in 0..c * m {
            let h = 1e-2f32;
            let (mut up, mut down) = (f.clone(), f.clone());
            up[k] += h;
            down[k] -= h;
            let want = (loss(&up) - loss(&down)) / (2.0 * h as f64);
            assert!(
                (got[k] as f64 - want).abs() < 1e-4,
                "{k}: {} vs {want}",
                got[k]
            );
        }
    }
}
