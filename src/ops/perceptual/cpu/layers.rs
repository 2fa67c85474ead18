//! VGG building blocks on one CHW image, f32: 3x3 convolution (im2col +
//! sgemm) and its input gradient, the bias, ReLU, and 2x2 pooling with its
//! gradient. The CUDA steps' tests compose these into the reference of
//! each fused kernel.

use super::gemm::sgemm;
use crate::vgg::{ConvWeights, Pooling};

/// Sets `v`'s length to `len`; contents are unspecified (every caller
/// overwrites them), so no time goes into clearing.
fn set_len(v: &mut Vec<f32>, len: usize) {
    v.truncate(len);
    v.resize(len, 0.0);
}

/// Unfolded elements per band of output rows: the im2col buffer stays
/// within 16 MiB (it would take 604 MB at the first layers of a 512x512
/// image unbanded) and in cache while the product reads it.
const BAND_ELEMENTS: usize = 1 << 22;

/// Output rows per band for an unfolding of `k` rows over a `h` x `w`
/// image: bands of equal height, as few as the budget allows.
fn band_rows(k: usize, h: usize, w: usize) -> usize {
    let bands = (k * h * w).div_ceil(BAND_ELEMENTS).clamp(1, h);
    h.div_ceil(bands)
}

/// Calls `f(row, kx, i, source)` for every unfolded row of output rows
/// `rows` of a C x H x W image: unfolded row `row` = (c, ky, kx), output
/// row `i`, and the image row (c, i + ky - 1) it reads as an index among
/// the C x H rows, None in the padding.
fn for_each_unfolded_row(
    c: usize,
    h: usize,
    rows: std::ops::Range<usize>,
    mut f: impl FnMut(usize, usize, usize, Option<usize>),
) {
    for ch in 0..c {
        for ky in 0..3 {
            for kx in 0..3 {
                for i in rows.clone() {
                    let si = (i + ky).checked_sub(1).filter(|&si| si < h);
                    f((ch * 3 + ky) * 3 + kx, kx, i, si.map(|si| ch * h + si));
                }
            }
        }
    }
}

/// Unfolds output rows `rows` of a C x H x W image into rows (c, ky, kx)
/// and columns (i, j) of `cols`, with zeros where the 3x3 window hangs
/// over the padding.
fn im2col(
    x: &[f32],
    (c, h, w): (usize, usize, usize),
    rows: std::ops::Range<usize>,
    cols: &mut Vec<f32>,
) {
    let width = rows.len() * w;
    set_len(cols, c * 9 * width);
    let first = rows.start;
    for_each_unfolded_row(c, h, rows, |row, kx, i, src_row| {
        let dst = &mut cols[row * width + (i - first) * w..][..w];
        let Some(src_row) = src_row else {
            dst.fill(0.0);
            return;
        };
        let src = &x[src_row * w..][..w];
        // Column j reads source column j + kx - 1.
        match kx {
            0 => {
                dst[0] = 0.0;
                dst[1..].copy_from_slice(&src[..w - 1]);
            }
            1 => dst.copy_from_slice(src),
            _ => {
                dst[..w - 1].copy_from_slice(&src[1..]);
                dst[w - 1] = 0.0;
            }
        }
    });
}

/// The adjoint of `im2col`: adds each column entry of the band back to
/// its pixel of `dx`.
fn col2im(
    cols: &[f32],
    (c, h, w): (usize, usize, usize),
    rows: std::ops::Range<usize>,
    dx: &mut [f32],
) {
    let width = rows.len() * w;
    let first = rows.start;
    for_each_unfolded_row(c, h, rows, |row, kx, i, src_row| {
        let Some(src_row) = src_row else { return };
        let src = &cols[row * width + (i - first) * w..][..w];
        let dst = &mut dx[src_row * w..][..w];
        let (dst, src) = match kx {
            0 => (&mut dst[..w - 1], &src[1..]),
            1 => (dst, src),
            _ => (&mut dst[1..], &src[..w - 1]),
        };
        dst.iter_mut().zip(src).for_each(|(d, v)| *d += v);
    });
}

/// out = conv3x3(x) + bias, padding 1; x is in_c x h x w, out out_c x h x w.
/// Computed in bands of output rows (see `BAND_ELEMENTS`).
pub(crate) fn conv(
    x: &[f32],
    h: usize,
    w: usize,
    p: &ConvWeights,
    out: &mut Vec<f32>,
    cols: &mut Vec<f32>,
) {
    let (hw, k) = (h * w, p.in_c * 9);
    set_len(out, p.out_c * hw);
    let band = band_rows(k, h, w);
    for first in (0..h).step_by(band) {
        let rows = first..(first + band).min(h);
        let width = rows.len() * w;
        im2col(x, (p.in_c, h, w), rows, cols);
        sgemm(
            (p.out_c, k, width),
            &p.weight,
            false,
            (cols, width),
            (&mut out[first * w..], hw),
        );
    }
    add_bias(out, &p.bias, hw);
}

/// Adds `bias[c]` to every value of plane `c` (of `hw` values) of `x`.
pub(crate) fn add_bias(x: &mut [f32], bias: &[f32], hw: usize) {
    for (plane, b) in x.chunks_exact_mut(hw).zip(bias) {
        plane.iter_mut().for_each(|v| *v += b);
    }
}

/// dx = conv3x3^T(dout): the gradient w.r.t. the convolution's input, in
/// bands of output rows.
pub(crate) fn conv_backward(
    dout: &[f32],
    h: usize,
    w: usize,
    p: &ConvWeights,
    dx: &mut Vec<f32>,
    cols: &mut Vec<f32>,
) {
    let (hw, k) = (h * w, p.in_c * 9);
    dx.clear();
    dx.resize(p.in_c * hw, 0.0);
    let band = band_rows(k, h, w);
    for first in (0..h).step_by(band) {
        let rows = first..(first + band).min(h);
        let width = rows.len() * w;
        set_len(cols, k * width);
        sgemm(
            (k, p.out_c, width),
            &p.weight,
            true,
            (&dout[first * w..], hw),
            (cols, width),
        );
        col2im(cols, (p.in_c, h, w), rows, dx);
    }
}

/// In-place ReLU; `mask` (when given) records which outputs are positive.
pub(crate) fn relu(x: &mut [f32], mask: Option<&mut Vec<bool>>) {
    x.iter_mut()
        .for_each(|v| *v = if *v > 0.0 || v.is_nan() { *v } else { 0.0 });
    if let Some(m) = mask {
        m.clear();
        m.extend(x.iter().map(|&v| v > 0.0));
    }
}

/// ReLU's gradient: zero where the output was not positive.
pub(crate) fn relu_backward(g: &mut [f32], mask: &[bool]) {
    g.iter_mut().zip(mask).for_each(|(v, &m)| {
        if !m {
            *v = 0.0
        }
    });
}

/// 2x2 stride-2 pooling, floor mode. For max-pooling `argmax` (when given)
/// records the window position (0..4, row-major) of each output; the first
/// maximum wins and NaN propagates, as in PyTorch.
pub(crate) fn pool(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    kind: Pooling,
    out: &mut Vec<f32>,
    mut argmax: Option<&mut Vec<u8>>,
) {
    let (oh, ow) = (h / 2, w / 2);
    out.clear();
    if let Some(a) = argmax.as_deref_mut() {
        a.clear();
    }
    for ch in 0..c {
        let plane = &x[ch * h * w..(ch + 1) * h * w];
        for i in 0..oh {
            for j in 0..ow {
                let win = [(0, 0), (0, 1), (1, 0), (1, 1)]
                    .map(|(di, dj)| plane[(2 * i + di) * w + 2 * j + dj]);
                match kind {
                    Pooling::Max => {
                        let mut best = 0;
                        for (k, &v) in win.iter().enumerate().skip(1) {
                            if v > win[best] || (v.is_nan() && !win[best].is_nan()) {
                                best = k;
                            }
                        }
                        out.push(win[best]);
                        if let Some(a) = argmax.as_deref_mut() {
                            a.push(best as u8);
                        }
                    }
                    Pooling::Avg => out.push(win.iter().sum::<f32>() * 0.25),
                }
            }
        }
    }
}

/// Pooling's gradient w.r.t. its c x h x w input (rows/columns dropped by
/// the floor get 0).
pub(crate) fn pool_backward(
    g: &[f32],
    c: usize,
    h: usize,
    w: usize,
    kind: Pooling,
    argmax: &[u8],
    dx: &mut Vec<f32>,
) {
    let (oh, ow) = (h / 2, w / 2);
    dx.clear();
    dx.resize(c * h * w, 0.0);
    for ch in 0..c {
        for i in 0..oh {
            for j in 0..ow {
                let o = (ch * oh + i) * ow + j;
                let at = |k: usize| ch * h * w + (2 * i + k / 2) * w + 2 * j + k % 2;
                match kind {
                    Pooling::Max => dx[at(argmax[o] as usize)] = g[o],
                    Pooling::Avg => (0..4).for_each(|k| dx[at(k)] = 0.25 * g[o]),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
            .collect()
    }

    /// The banded convolution and its input gradient against direct f64
    /// sums, on an image large enough for unequal bands (51 + 50 rows).
    #[test]
    fn banded_convolution_matches_direct_sums() {
        let (in_c, out_c, h, w) = (64, 8, 101, 80);
        assert!(
            band_rows(in_c * 9, h, w) < h,
            "the test needs several bands"
        );
        let p = ConvWeights {
            in_c,
            out_c,
            weight: values(out_c * in_c * 9, 1),
            bias: values(out_c, 2),
        };
        let x = values(in_c * h * w, 3);
        let dout = values(out_c * h * w, 4);
        let (mut out, mut dx, mut cols) = (Vec::new(), Vec::new(), Vec::new());
        conv(&x, h, w, &p, &mut out, &mut cols);
        conv_backward(&dout, h, w, &p, &mut dx, &mut cols);
        // Every (o, c, ky, kx, output pixel, input pixel) pair of the
        // padded 3x3 convolution.
        let mut want_out: Vec<f64> = (0..out_c * h * w)
            .map(|i| p.bias[i / (h * w)] as f64)
            .collect();
        let mut want_dx = vec![0f64; in_c * h * w];
        for o in 0..out_c {
            for c in 0..in_c {
                for t in 0..9 {
                    let wt = p.weight[(o * in_c + c) * 9 + t] as f64;
                    for i in 0..h {
                        for j in 0..w {
                            let (si, sj) =
                                ((i + t / 3).wrapping_sub(1), (j + t % 3).wrapping_sub(1));
                            if si < h && sj < w {
                                let (po, pi) = ((o * h + i) * w + j, (c * h + si) * w + sj);
                                want_out[po] += wt * x[pi] as f64;
                                want_dx[pi] += wt * dout[po] as f64;
                            }
                        }
                    }
                }
            }
        }
        for (what, got, want) in [("out", &out, &want_out), ("dx", &dx, &want_dx)] {
            for (idx, (g, e)) in got.iter().zip(want.iter()).enumerate() {
                assert!(
                    (*g as f64 - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{what}[{idx}]: {g} vs {e}"
                );
            }
        }
    }
}
