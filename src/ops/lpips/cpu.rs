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
