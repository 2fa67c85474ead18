//! One LPIPS term on the host, in f64: the reference of the
//! `pl_vgg_lpips_tap` kernel, and LPIPS's distance at each tap of the CPU
//! backend.

use crate::error::Result;

/// LPIPS's epsilon in n(f) = f / (|f| + eps).
pub(crate) const EPS: f64 = 1e-10;

/// What a term's per-pixel slopes are multiplied by in its gradient.
#[derive(Clone, Copy)]
pub(crate) enum Scale<'a> {
    /// One factor for every pixel (the distance: a mean over pixels).
    All(f64),
    /// A factor per pixel (the spatial map's incoming gradient, brought
    /// back to the layer's resolution).
    Pixels(&'a [f64]),
}

impl Scale<'_> {
    fn at(self, p: usize) -> f64 {
        match self {
            Scale::All(s) => s,
            Scale::Pixels(s) => s[p],
        }
    }
}

/// The sum over the `m` pixels of one image's CHW features `f` and `t` (C
/// x M) of sum_c w_c (n(f)_c - n(t)_c)^2, n the unit normalisation over
/// each pixel's channels. `grad`, when given, receives the derivative of
/// the sum of each pixel's value times its `scale` w.r.t. f: with g_c = 2
/// w_c d_c and a = |f| + eps, g_c / a - f_c (sum_k g_k f_k) / (|f| a^2);
/// 0 at a pixel whose features are all 0 (where the reference's autograd
/// gives NaN).
pub(crate) fn tap_sum(
    f: &[f32],
    t: &[f32],
    (c, m): (usize, usize),
    w: &[f32],
    grad: Option<&mut [f32]>,
    scale: Scale<'_>,
) -> f64 {
    // Channel by channel over all pixels (the CHW rows are contiguous),
    // each pixel's sums gathered over the channels in order.
    let mut sf = vec![0.0f64; m];
    let mut st = vec![0.0f64; m];
    for ch in 0..c {
        let (fr, tr) = (&f[ch * m..(ch + 1) * m], &t[ch * m..(ch + 1) * m]);
        for p in 0..m {
            sf[p] += (fr[p] as f64).powi(2);
            st[p] += (tr[p] as f64).powi(2);
        }
    }
    sf.iter_mut().for_each(|v| *v = v.sqrt());
    st.iter_mut().for_each(|v| *v = v.sqrt());
    // d_c = f_c / a_f - t_c / a_t; the value and sum_c g_c f_c per pixel.
    let mut value = vec![0.0f64; m];
    let mut dot = vec![0.0f64; m];
    let want_grad = grad.is_some();
    for ch in 0..c {
        let (fr, tr) = (&f[ch * m..(ch + 1) * m], &t[ch * m..(ch + 1) * m]);
        let wc = w[ch] as f64;
        for p in 0..m {
            let d = fr[p] as f64 / (sf[p] + EPS) - tr[p] as f64 / (st[p] + EPS);
            value[p] += wc * d * d;
            if want_grad {
                dot[p] += 2.0 * wc * d * scale.at(p) * fr[p] as f64;
            }
        }
    }
    if let Some(out) = grad {
        for ch in 0..c {
            let (fr, tr) = (&f[ch * m..(ch + 1) * m], &t[ch * m..(ch + 1) * m]);
            let wc = w[ch] as f64;
            let row = &mut out[ch * m..(ch + 1) * m];
            for p in 0..m {
                let (sp, af) = (sf[p], sf[p] + EPS);
                let d = fr[p] as f64 / af - tr[p] as f64 / (st[p] + EPS);
                let g = 2.0 * wc * d * scale.at(p);
                row[p] = match sp > 0.0 {
                    true => (g / af - fr[p] as f64 * dot[p] / (sp * af * af)) as f32,
                    false => 0.0,
                };
            }
        }
    }
    value.iter().sum()
}

/// Each pixel's sum_c w_c (n(f)_c - n(t)_c)^2 (what [`tap_sum`] adds up),
/// in f64, for the spatial map.
pub(crate) fn pixel_values(f: &[f32], t: &[f32], (c, m): (usize, usize), w: &[f32]) -> Vec<f64> {
    let norms = |x: &[f32]| -> Vec<f64> {
        let mut s = vec![0.0f64; m];
        for row in x.chunks_exact(m).take(c) {
            s.iter_mut()
                .zip(row)
                .for_each(|(a, &v)| *a += (v as f64).powi(2));
        }
        s.into_iter().map(|v| v.sqrt() + EPS).collect()
    };
    let (af, at) = (norms(f), norms(t));
    let mut value = vec![0.0f64; m];
    for ch in 0..c {
        let (fr, tr) = (&f[ch * m..(ch + 1) * m], &t[ch * m..(ch + 1) * m]);
        for p in 0..m {
            let d = fr[p] as f64 / af[p] - tr[p] as f64 / at[p];
            value[p] += w[ch] as f64 * d * d;
        }
    }
    value
}

/// The two source indices along one axis of `n_in` samples that
/// destination `dst` of `n_out` reads, and the second one's weight, as
/// PyTorch's `interpolate(mode='bilinear', align_corners=False)` samples:
/// source = (dst + 0.5) * in / out - 0.5, clamped at 0.
fn taps(dst: usize, n_in: usize, n_out: usize) -> (usize, usize, f64) {
    let src = ((dst as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(n_in - 1);
    (i0, (i0 + 1).min(n_in - 1), src - i0 as f64)
}

/// `map` (h x w) bilinearly resized to `out_h` x `out_w` (see [`taps`])
/// and added to `out`.
pub(crate) fn add_upsampled(
    map: &[f64],
    (h, w): (usize, usize),
    out: &mut [f64],
    (out_h, out_w): (usize, usize),
) {
    for y in 0..out_h {
        let (y0, y1, ly) = taps(y, h, out_h);
        for x in 0..out_w {
            let (x0, x1, lx) = taps(x, w, out_w);
            let top = map[y0 * w + x0] * (1.0 - lx) + map[y0 * w + x1] * lx;
            let bottom = map[y1 * w + x0] * (1.0 - lx) + map[y1 * w + x1] * lx;
            out[y * out_w + x] += top * (1.0 - ly) + bottom * ly;
        }
    }
}

/// The adjoint of [`add_upsampled`]: `g_out` (out_h x out_w), the
/// gradient of the resized map, brought back to the map's `h` x `w` (each
/// source pixel gets the gradients of the outputs that read it, times the
/// weight they read it with).
pub(crate) fn upsampled_grad(
    g_out: &[f64],
    (out_h, out_w): (usize, usize),
    (h, w): (usize, usize),
) -> Result<Vec<f64>> {
    let mut g = crate::fallible::filled(h * w, 0.0, "a layer's share of the map's gradient")?;
    for y in 0..out_h {
        let (y0, y1, ly) = taps(y, h, out_h);
        for x in 0..out_w {
            let (x0, x1, lx) = taps(x, w, out_w);
            let v = g_out[y * out_w + x];
            g[y0 * w + x0] += v * (1.0 - ly) * (1.0 - lx);
            g[y0 * w + x1] += v * (1.0 - ly) * lx;
            g[y1 * w + x0] += v * ly * (1.0 - lx);
            g[y1 * w + x1] += v * ly * lx;
        }
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Central differences of the sum, on features with a zero pixel.
    #[test]
    fn the_gradient_matches_finite_differences_and_is_zero_at_a_zero_pixel() {
        let (c, m) = (5, 4);
        let mut f: Vec<f32> = (0..c * m)
            .map(|i| ((i * 7 % 11) as f32 / 5.0 - 0.8).max(0.0))
            .collect();
        for ch in 0..c {
            f[ch * m + 2] = 0.0; // pixel 2: all channels 0
        }
        let t: Vec<f32> = (0..c * m).map(|i| (i * 5 % 13) as f32 / 13.0).collect();
        let w: Vec<f32> = (0..c).map(|k| 0.2 + k as f32 * 0.1).collect();
        let mut grad = vec![f32::NAN; c * m];
        tap_sum(&f, &t, (c, m), &w, Some(&mut grad), Scale::All(1.0));
        for p in 0..m {
            for ch in 0..c {
                let k = ch * m + p;
                if p == 2 {
                    assert_eq!(grad[k], 0.0);
                    continue;
                }
                let h = 1e-3f32;
                let (mut up, mut down) = (f.clone(), f.clone());
                up[k] += h;
                down[k] -= h;
                let sum = |x: &[f32]| tap_sum(x, &t, (c, m), &w, None, Scale::All(1.0));
                let fd = (sum(&up) - sum(&down)) / (2.0 * h as f64);
                assert!(
                    (grad[k] as f64 - fd).abs() < 1e-3 * (1.0 + fd.abs()),
                    "{k}: {} vs {fd}",
                    grad[k]
                );
            }
        }
    }

    /// PyTorch's `interpolate([[1, 2], [3, 4]], size=(4, 4), mode='bilinear',
    /// align_corners=False)`, and a 1-pixel map spread everywhere.
    #[test]
    fn resizing_matches_pytorchs_bilinear_interpolation() {
        let mut out = vec![0.0; 16];
        add_upsampled(&[1.0, 2.0, 3.0, 4.0], (2, 2), &mut out, (4, 4));
        let want = [
            1.0, 1.25, 1.75, 2.0, 1.5, 1.75, 2.25, 2.5, 2.5, 2.75, 3.25, 3.5, 3.0, 3.25, 3.75, 4.0,
        ];
        assert_eq!(out, want);
        let mut out = vec![1.0; 6];
        add_upsampled(&[0.5], (1, 1), &mut out, (2, 3));
        assert_eq!(out, vec![1.5; 6]);
    }

    /// <upsample(x), g> = <x, upsampled_grad(g)> for any x and g: the
    /// adjoint, for a 3x5 map resized to 7x4 (down along one axis, up along
    /// the other).
    #[test]
    fn the_resize_gradient_is_its_adjoint() {
        let x: Vec<f64> = (0..15).map(|i| (i * 7 % 5) as f64 - 1.5).collect();
        let g: Vec<f64> = (0..28).map(|i| (i * 3 % 11) as f64 / 4.0 - 1.0).collect();
        let mut up = vec![0.0; 28];
        add_upsampled(&x, (3, 5), &mut up, (7, 4));
        let lhs: f64 = up.iter().zip(&g).map(|(a, b)| a * b).sum();
        let back = upsampled_grad(&g, (7, 4), (3, 5)).unwrap();
        let rhs: f64 = x.iter().zip(&back).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-12, "{lhs} vs {rhs}");
    }

    /// Per-pixel scales weight each pixel's gradient: scales of 1 and 0
    /// give the gradient of the first pixel's value alone.
    #[test]
    fn pixel_scales_weight_each_pixel() {
        let (c, m) = (3, 2);
        let f = [0.5, 1.0, -0.2, 0.3, 0.9, 0.4];
        let t = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6];
        let w = [1.0, 0.5, 2.0];
        let mut both = vec![0f32; 6];
        tap_sum(&f, &t, (c, m), &w, Some(&mut both), Scale::All(1.0));
        let mut first = vec![0f32; 6];
        tap_sum(
            &f,
            &t,
            (c, m),
            &w,
            Some(&mut first),
            Scale::Pixels(&[1.0, 0.0]),
        );
        for ch in 0..c {
            assert_eq!(first[ch * m], both[ch * m]);
            assert_eq!(first[ch * m + 1], 0.0);
        }
    }

    #[test]
    fn the_value_is_the_weighted_distance_of_unit_vectors() {
        // Two pixels, two channels: (3, 4) vs (0, 2) -> (0.6, 0.8) vs (0, 1).
        let f = [3.0, 0.0, 4.0, 0.0];
        let t = [0.0, 1.0, 2.0, 1.0];
        let w = [2.0, 0.5];
        let got = tap_sum(&f, &t, (2, 2), &w, None, Scale::All(1.0));
        // pixel 0: 2 * 0.36 + 0.5 * 0.04; pixel 1: f = 0 -> n(f) = 0,
        // n(t) = (1, 1) / sqrt 2: 2 * 0.5 + 0.5 * 0.5.
        let want = 2.0 * 0.36 + 0.5 * 0.04 + 2.0 * 0.5 + 0.5 * 0.5;
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }
}
