//! One LPIPS term on the host, in f64: the reference of the
//! `pl_vgg_lpips_tap` kernel, and LPIPS's distance at each tap of the CPU
//! backend.

/// LPIPS's epsilon in n(f) = f / (|f| + eps).
pub(crate) const EPS: f64 = 1e-10;

/// The sum over the `m` pixels of one image's CHW features `f` and `t` (C
/// x M) of sum_c w_c (n(f)_c - n(t)_c)^2, n the unit normalisation over
/// each pixel's channels. `grad`, when given, receives `scale` times the
/// sum's derivative w.r.t. f: with g_c = 2 w_c d_c and a = |f| + eps,
/// g_c / a - f_c (sum_k g_k f_k) / (|f| a^2); 0 at a pixel whose features
/// are all 0 (where the reference's autograd gives NaN).
pub(crate) fn tap_sum(
    f: &[f32],
    t: &[f32],
    (c, m): (usize, usize),
    w: &[f32],
    grad: Option<&mut [f32]>,
    scale: f64,
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
                dot[p] += 2.0 * wc * d * scale * fr[p] as f64;
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
                let g = 2.0 * wc * d * scale;
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

/// `map` (h x w) bilinearly resized to `out_h` x `out_w` and added to
/// `out`, as PyTorch's `interpolate(mode='bilinear', align_corners=False)`
/// samples: source = (dst + 0.5) * in / out - 0.5, clamped at 0.
pub(crate) fn add_upsampled(
    map: &[f64],
    (h, w): (usize, usize),
    out: &mut [f64],
    (out_h, out_w): (usize, usize),
) {
    let taps = |dst: usize, n_in: usize, n_out: usize| -> (usize, usize, f64) {
        let src = ((dst as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_in - 1);
        (i0, (i0 + 1).min(n_in - 1), src - i0 as f64)
    };
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
        tap_sum(&f, &t, (c, m), &w, Some(&mut grad), 1.0);
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
                let fd = (tap_sum(&up, &t, (c, m), &w, None, 1.0)
                    - tap_sum(&down, &t, (c, m), &w, None, 1.0))
                    / (2.0 * h as f64);
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

    #[test]
    fn the_value_is_the_weighted_distance_of_unit_vectors() {
        // Two pixels, two channels: (3, 4) vs (0, 2) -> (0.6, 0.8) vs (0, 1).
        let f = [3.0, 0.0, 4.0, 0.0];
        let t = [0.0, 1.0, 2.0, 1.0];
        let w = [2.0, 0.5];
        let got = tap_sum(&f, &t, (2, 2), &w, None, 1.0);
        // pixel 0: 2 * 0.36 + 0.5 * 0.04; pixel 1: f = 0 -> n(f) = 0,
        // n(t) = (1, 1) / sqrt 2: 2 * 0.5 + 0.5 * 0.5.
        let want = 2.0 * 0.36 + 0.5 * 0.04 + 2.0 * 0.5 + 0.5 * 0.5;
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }
}
