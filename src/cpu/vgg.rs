//! VGG building blocks on one CHW image, f32: 3x3 convolution (im2col +
//! sgemm) and its input gradient, ReLU, and 2x2 pooling with its gradient.

use super::gemm::sgemm;
use crate::vgg::{ConvWeights, Pooling};

/// Sets `v`'s length to `len`; contents are unspecified (every caller
/// overwrites them), so no time goes into clearing.
fn set_len(v: &mut Vec<f32>, len: usize) {
    v.truncate(len);
    v.resize(len, 0.0);
}

/// Calls `f(row, kx, i, source)` for every row of the im2col unfolding of
/// a C x H x W image: output row `i` of unfolded row `row` = (c, ky, kx),
/// and the image row (c, i + ky - 1) it reads as an index among the C x H
/// rows, None in the padding.
fn for_each_unfolded_row(
    c: usize,
    h: usize,
    mut f: impl FnMut(usize, usize, usize, Option<usize>),
) {
    for ch in 0..c {
        for ky in 0..3 {
            for kx in 0..3 {
                for i in 0..h {
                    let si = (i + ky).checked_sub(1).filter(|&si| si < h);
                    f((ch * 3 + ky) * 3 + kx, kx, i, si.map(|si| ch * h + si));
                }
            }
        }
    }
}

/// Unfolds a C x H x W image into rows (c, ky, kx) and columns (i, j),
/// with zeros where the 3x3 window hangs over the padding.
fn im2col(x: &[f32], c: usize, h: usize, w: usize, cols: &mut Vec<f32>) {
    set_len(cols, c * 9 * h * w);
    for_each_unfolded_row(c, h, |row, kx, i, src_row| {
        let dst = &mut cols[(row * h + i) * w..][..w];
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

/// The adjoint of `im2col`: adds each column entry back to its pixel.
fn col2im(cols: &[f32], c: usize, h: usize, w: usize, dx: &mut Vec<f32>) {
    dx.clear();
    dx.resize(c * h * w, 0.0);
    for_each_unfolded_row(c, h, |row, kx, i, src_row| {
        let Some(src_row) = src_row else { return };
        let src = &cols[(row * h + i) * w..][..w];
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
pub(crate) fn conv(
    x: &[f32],
    h: usize,
    w: usize,
    p: &ConvWeights,
    out: &mut Vec<f32>,
    cols: &mut Vec<f32>,
) {
    im2col(x, p.in_c, h, w, cols);
    set_len(out, p.out_c * h * w);
    sgemm(p.out_c, p.in_c * 9, h * w, &p.weight, false, cols, out);
    for (plane, b) in out.chunks_exact_mut(h * w).zip(&p.bias) {
        plane.iter_mut().for_each(|v| *v += b);
    }
}

/// dx = conv3x3^T(dout): the gradient w.r.t. the convolution's input.
pub(crate) fn conv_backward(
    dout: &[f32],
    h: usize,
    w: usize,
    p: &ConvWeights,
    dx: &mut Vec<f32>,
    cols: &mut Vec<f32>,
) {
    set_len(cols, p.in_c * 9 * h * w);
    sgemm(p.in_c * 9, p.out_c, h * w, &p.weight, true, dout, cols);
    col2im(cols, p.in_c, h, w, dx);
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
