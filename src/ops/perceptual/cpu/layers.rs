//! VGG building blocks on one CHW image, f32: 3x3 convolution (Winograd's
//! F(2x2, 3x3), `winograd.rs`, or im2col + sgemm for few channels) and its
//! input gradient, the bias, ReLU, and 2x2 pooling with its gradient. The CUDA steps' tests compose these into the reference of
//! each fused kernel. Every buffer whose size follows the image is
//! allocated fallibly; the unfolded columns stay within a fixed bound (plus
//! each row's padding to an odd number of cache lines).

use super::gemm::sgemm;
use super::{packed, winograd};
use crate::error::{Error, Result};
use crate::fallible;
use crate::vgg::{ConvWeights, Pooling};
use std::ops::Range;

/// Sets `v`'s length to `len`; contents are unspecified (every caller
/// overwrites them), so no time goes into clearing.
pub(super) fn set_len(v: &mut Vec<f32>, len: usize, what: &str) -> Result<()> {
    v.truncate(len);
    fallible::resize(v, len, 0.0, what)
}

/// Unfolded elements per band of output pixels: the im2col buffer stays
/// within 16 MiB whatever the image's shape (unbanded it would take 604 MB
/// at the first layers of a 512x512 image, and 9.7 GB for one row of 4M
/// pixels), and in cache while the product reads it.
const BAND_ELEMENTS: usize = 1 << 22;

/// Output pixels per band for an unfolding of `k` rows over `hw` pixels:
/// bands of equal size (but the last), as few as the bound allows.
fn band_pixels(k: usize, hw: usize) -> usize {
    let bands = k.saturating_mul(hw).div_ceil(BAND_ELEMENTS).clamp(1, hw);
    hw.div_ceil(bands)
}

/// Output columns `j0..j1` of one image row, at `offset` in a band, read
/// from the source row at columns `j + shift`.
#[derive(Clone, Copy)]
struct Segment {
    j0: usize,
    j1: usize,
    offset: usize,
    shift: isize,
    width: usize,
}

impl Segment {
    /// The positions `t` (0 = column j0) whose source column lies in the
    /// image, and the first source column.
    fn valid(self) -> (Range<usize>, usize) {
        let start = self.j0 as isize + self.shift;
        let len = (self.j1 - self.j0) as isize;
        let lo = (-start).clamp(0, len);
        let hi = (self.width as isize - start).clamp(lo, len);
        (lo as usize..hi as usize, (start + lo) as usize)
    }
}

/// Calls `f(row, segment, source)` for every unfolded row and every run
/// of output pixels `pixels` within one image row of a C x H x W image:
/// unfolded row `row` = (c, ky, kx); `source` is the image row
/// (c, i + ky - 1) the segment of output row i reads, as an index among
/// the C x H rows, None in the padding; the segment reads it at columns
/// shifted by kx - 1.
fn for_each_segment(
    (c, h, w): (usize, usize, usize),
    pixels: Range<usize>,
    mut f: impl FnMut(usize, Segment, Option<usize>),
) {
    for ch in 0..c {
        for ky in 0..3 {
            for kx in 0..3 {
                let mut p = pixels.start;
                while p < pixels.end {
                    let (i, j0) = (p / w, p % w);
                    let j1 = w.min(j0 + pixels.end - p);
                    let si = (i + ky).checked_sub(1).filter(|&si| si < h);
                    let segment = Segment {
                        j0,
                        j1,
                        offset: p - pixels.start,
                        shift: kx as isize - 1,
                        width: w,
                    };
                    f((ch * 3 + ky) * 3 + kx, segment, si.map(|si| ch * h + si));
                    p += j1 - j0;
                }
            }
        }
    }
}

/// The row stride of unfolded columns for a band of `width` pixels: padded
/// where the packed product reads them (see `packed::row_stride`).
fn cols_stride(width: usize) -> usize {
    match packed::available() {
        true => packed::row_stride(width),
        false => width,
    }
}

/// Unfolds output pixels `pixels` of a C x H x W image into rows (c, ky,
/// kx), `ld` apart, and columns (the pixels) of `cols`, with zeros where
/// the 3x3 window hangs over the padding.
fn im2col(
    x: &[f32],
    dims: (usize, usize, usize),
    pixels: Range<usize>,
    (cols, ld): (&mut Vec<f32>, usize),
) -> Result<()> {
    set_len(cols, dims.0 * 9 * ld, "unfolded convolution columns")?;
    let w = dims.2;
    for_each_segment(dims, pixels, |row, seg, source| {
        let dst = &mut cols[row * ld + seg.offset..][..seg.j1 - seg.j0];
        let Some(source) = source else {
            dst.fill(0.0);
            return;
        };
        let (valid, from) = seg.valid();
        let src = &x[source * w + from..][..valid.len()];
        dst[..valid.start].fill(0.0);
        dst[valid.clone()].copy_from_slice(src);
        dst[valid.end..].fill(0.0);
    });
    Ok(())
}

/// The adjoint of `im2col`: adds each column entry of the band (rows `ld`
/// apart) back to its pixel of `dx`.
fn col2im(
    (cols, ld): (&[f32], usize),
    dims: (usize, usize, usize),
    pixels: Range<usize>,
    dx: &mut [f32],
) {
    let w = dims.2;
    for_each_segment(dims, pixels, |row, seg, source| {
        let Some(source) = source else { return };
        let (valid, from) = seg.valid();
        let src = &cols[row * ld + seg.offset + valid.start..][..valid.len()];
        let dst = &mut dx[source * w + from..][..valid.len()];
        dst.iter_mut().zip(src).for_each(|(d, v)| *d += v);
    });
}

/// The filters of a convolution as a product takes them, kept in its
/// `ConvWeights::prepared` once made.
#[derive(Clone, Copy)]
enum Prepared {
    /// Winograd's transformed filters, forward and for the input gradient,
    /// as the rows of its products (many tiles)...
    Winograd = 0,
    WinogradBackward = 1,
    /// ...and as their columns (few tiles).
    WinogradColumns = 4,
    WinogradColumnsBackward = 5,
    /// The filters (out_c x 9 in_c) and their transpose, packed for
    /// `packed::product` (where the machine runs it).
    Packed = 2,
    PackedTransposed = 3,
}

impl Prepared {
    /// Winograd's filters for `products`, forward or `backward`.
    fn winograd(products: winograd::Products, backward: bool) -> Prepared {
        match (products, backward) {
            (winograd::Products::FilterRows, false) => Prepared::Winograd,
            (winograd::Products::FilterRows, true) => Prepared::WinogradBackward,
            (winograd::Products::TileRows, false) => Prepared::WinogradColumns,
            (winograd::Products::TileRows, true) => Prepared::WinogradColumnsBackward,
        }
    }

    fn of(self, p: &ConvWeights) -> &[f32] {
        use winograd::Products::{FilterRows, TileRows};
        p.prepared[self as usize].get_or_init(|| match self {
            Prepared::Winograd => winograd::filters(p, false, FilterRows),
            Prepared::WinogradBackward => winograd::filters(p, true, FilterRows),
            Prepared::WinogradColumns => winograd::filters(p, false, TileRows),
            Prepared::WinogradColumnsBackward => winograd::filters(p, true, TileRows),
            Prepared::Packed => pack_filters(p, false),
            Prepared::PackedTransposed => pack_filters(p, true),
        })
    }
}

/// `p`'s filters (out_c x 9 in_c), or their transpose, packed.
fn pack_filters(p: &ConvWeights, transposed: bool) -> Vec<f32> {
    let k = p.in_c * 9;
    let (rows, cols, a) = match transposed {
        false => (p.out_c, k, p.weight.clone()),
        true => {
            let mut t = vec![0f32; k * p.out_c];
            packed::transpose(&p.weight, (p.out_c, k), &mut t);
            (k, p.out_c, t)
        }
    };
    let mut out = vec![0f32; packed::packed_len(rows, cols)];
    packed::pack(&a, (rows, cols), &mut out);
    out
}

/// out = conv3x3(x) + bias, padding 1; x is in_c x h x w, out out_c x h x w.
/// Computed in bands of output pixels (see `BAND_ELEMENTS`), or of tiles.
pub(crate) fn conv(
    x: &[f32],
    h: usize,
    w: usize,
    p: &ConvWeights,
    out: &mut Vec<f32>,
    cols: &mut Vec<f32>,
) -> Result<()> {
    let (hw, k) = (h * w, p.in_c * 9);
    set_len(out, p.out_c * hw, "a convolution's output")?;
    if let Some(products) = winograd::products(p.in_c, p.out_c, h, w) {
        let u = Prepared::winograd(products, false).of(p);
        winograd::conv(x, (p.in_c, p.out_c), (h, w), (u, products), out, cols)?;
        add_bias(out, &p.bias, hw);
        return Ok(());
    }
    let band = band_pixels(k, hw);
    for first in (0..hw).step_by(band) {
        let pixels = first..(first + band).min(hw);
        let (width, ld) = (pixels.len(), cols_stride(pixels.len()));
        im2col(x, (p.in_c, h, w), pixels, (cols, ld))?;
        let c = (&mut out[first..], hw);
        match packed::available() {
            true => {
                let a = Prepared::Packed.of(p);
                packed::product_on_cores(a, (p.out_c, k, width), (cols, ld), c)
            }
            false => sgemm((p.out_c, k, width), &p.weight, false, (cols, ld), c),
        }
    }
    add_bias(out, &p.bias, hw);
    Ok(())
}

/// Adds `bias[c]` to every value of plane `c` (of `hw` values) of `x`.
pub(crate) fn add_bias(x: &mut [f32], bias: &[f32], hw: usize) {
    for (plane, b) in x.chunks_exact_mut(hw).zip(bias) {
        plane.iter_mut().for_each(|v| *v += b);
    }
}

/// dx = conv3x3^T(dout): the gradient w.r.t. the convolution's input, in
/// bands of output pixels.
pub(crate) fn conv_backward(
    dout: &[f32],
    h: usize,
    w: usize,
    p: &ConvWeights,
    dx: &mut Vec<f32>,
    cols: &mut Vec<f32>,
) -> Result<()> {
    let (hw, k) = (h * w, p.in_c * 9);
    if let Some(products) = winograd::products(p.in_c, p.out_c, h, w) {
        // Every value is written: what the buffer held can stay.
        set_len(dx, p.in_c * hw, "a convolution's input gradient")?;
        let u = (Prepared::winograd(products, true).of(p), products);
        return winograd::conv(dout, (p.out_c, p.in_c), (h, w), u, dx, cols);
    }
    // col2im adds each band's columns in.
    dx.clear();
    fallible::resize(dx, p.in_c * hw, 0.0, "a convolution's input gradient")?;
    let band = band_pixels(k, hw);
    for first in (0..hw).step_by(band) {
        let pixels = first..(first + band).min(hw);
        let (width, ld) = (pixels.len(), cols_stride(pixels.len()));
        set_len(cols, k * ld, "unfolded convolution columns")?;
        let b = (&dout[first..], hw);
        match packed::available() {
            true => {
                let a = Prepared::PackedTransposed.of(p);
                packed::product_on_cores(a, (k, p.out_c, width), b, (cols, ld))
            }
            false => sgemm((k, p.out_c, width), &p.weight, true, b, (cols, ld)),
        }
        col2im((cols, ld), (p.in_c, h, w), pixels, dx);
    }
    Ok(())
}

/// In-place ReLU; `mask` (when given) records which outputs are positive.
pub(crate) fn relu(x: &mut [f32], mask: Option<&mut Vec<bool>>) -> Result<()> {
    x.iter_mut()
        .for_each(|v| *v = if *v > 0.0 || v.is_nan() { *v } else { 0.0 });
    if let Some(m) = mask {
        m.clear();
        fallible::reserve(m, x.len(), "a ReLU mask")?;
        m.extend(x.iter().map(|&v| v > 0.0));
    }
    Ok(())
}

/// ReLU's gradient: zero where the output was not positive. (A select,
/// not a conditional store: it runs in vector lanes.)
pub(crate) fn relu_backward(g: &mut [f32], mask: &[bool]) {
    g.iter_mut()
        .zip(mask)
        .for_each(|(v, &m)| *v = if m { *v } else { 0.0 });
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
) -> Result<()> {
    let (oh, ow) = (h / 2, w / 2);
    if x.len() < c * h * w {
        return Err(Error::Internal(
            "a pool's input is shorter than its shape".into(),
        ));
    }
    // Every value is written (by index, in loops the compiler can run in
    // vector lanes: each window's maximum is a chain of selects).
    set_len(out, c * oh * ow, "a pool's output")?;
    if let Some(a) = argmax.as_deref_mut() {
        a.clear();
        fallible::resize(a, c * oh * ow, 0, "a pool's argmax")?;
    }
    for (ch, plane) in x.chunks_exact(h * w).take(c).enumerate() {
        for i in 0..oh {
            let (top, bottom) = (
                &plane[2 * i * w..][..2 * ow],
                &plane[(2 * i + 1) * w..][..2 * ow],
            );
            let o = (ch * oh + i) * ow;
            let dst = &mut out[o..o + ow];
            let win = |j: usize| [top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]];
            match (kind, argmax.as_deref_mut()) {
                (Pooling::Max, Some(a)) => {
                    let a = &mut a[o..o + ow];
                    for j in 0..ow {
                        (a[j], dst[j]) = first_max(win(j));
                    }
                }
                (Pooling::Max, None) => (0..ow).for_each(|j| dst[j] = first_max(win(j)).1),
                (Pooling::Avg, _) => {
                    (0..ow).for_each(|j| dst[j] = win(j).iter().sum::<f32>() * 0.25)
                }
            }
        }
    }
    Ok(())
}

/// The position (0..4, row-major) of a 2x2 window's maximum and its value:
/// the first maximum, or the first NaN where there is one (the value NaN,
/// as PyTorch gives).
#[inline(always)]
fn first_max(win: [f32; 4]) -> (u8, f32) {
    let (mut at, mut best) = (0, win[0]);
    for (k, &v) in (1..).zip(&win[1..]) {
        let take = v > best || (v.is_nan() && !best.is_nan());
        (at, best) = if take { (k, v) } else { (at, best) };
    }
    (at, best)
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
) -> Result<()> {
    let (oh, ow) = (h / 2, w / 2);
    dx.clear();
    fallible::resize(dx, c * h * w, 0.0, "a pool's input gradient")?;
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
    Ok(())
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

    /// Hand-worked 2x2 pools of a 3 x 7 plane (the floor drops its last
    /// row and column), into buffers holding stale values: the first of
    /// equal maxima wins (-0 before +0), NaN wins from where it first is,
    /// and every value of each output (the gradient's dropped row and
    /// column too) is written.
    #[test]
    fn pools_and_their_gradients_match_hand_worked_windows() {
        let nan = f32::NAN;
        #[rustfmt::skip]
        let x = [
            1.0, 3.0, -0.0, 0.0, 5.0, nan, 9.0,
            3.0, 2.0, 0.0, -1.0, 7.0, nan, 9.0,
            9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0,
        ];
        let (mut out, mut argmax) = (vec![7f32; 40], vec![9u8; 40]);
        pool(&x, 1, 3, 7, Pooling::Max, &mut out, Some(&mut argmax)).unwrap();
        assert_eq!(argmax, [1, 0, 1]);
        assert_eq!(
            (out.len(), out[0], out[1].to_bits()),
            (3, 3.0, (-0f32).to_bits())
        );
        assert!(out[2].is_nan());
        let mut without = vec![7f32; 2];
        pool(&x, 1, 3, 7, Pooling::Max, &mut without, None).unwrap();
        assert_eq!(without[..2], out[..2]);
        pool(&x, 1, 3, 7, Pooling::Avg, &mut out, None).unwrap();
        assert_eq!(out[..2], [2.25, -0.25]);
        assert!(out[2].is_nan());
        let mut dx = vec![7f32; 50];
        pool_backward(&[1.0, 2.0, 4.0], 1, 3, 7, Pooling::Max, &argmax, &mut dx).unwrap();
        #[rustfmt::skip]
        let want = [
            0.0, 1.0, 2.0, 0.0, 0.0, 4.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        assert_eq!(dx, want);
        pool_backward(&[4.0, 8.0, 12.0], 1, 3, 7, Pooling::Avg, &[], &mut dx).unwrap();
        #[rustfmt::skip]
        let want = [
            1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 0.0,
            1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        assert_eq!(dx, want);
        // ReLU's gradient keeps what the mask marks, whatever it is.
        let mut g = [nan, -2.0, 3.0, nan];
        relu_backward(&mut g, &[false, true, false, true]);
        assert_eq!((g[0], g[1], g[2]), (0.0, -2.0, 0.0));
        assert!(g[3].is_nan());
    }

    /// The banded convolution and its input gradient against direct f64
    /// sums, on images large enough for several bands: one whose bands
    /// split rows (101 x 80: two bands of 4040 pixels), and one row of
    /// 10000 pixels (two bands of 5000).
    #[test]
    fn banded_convolution_matches_direct_sums() {
        for (in_c, out_c, h, w) in [(64, 8, 101, 80), (64, 4, 1, 10_000usize)] {
            let bands = (h * w).div_ceil(band_pixels(in_c * 9, h * w));
            assert!(bands > 1, "the test needs several bands");
            check_against_direct_sums(in_c, out_c, h, w);
        }
    }

    /// The Winograd path (16 channels or more on both sides) with the
    /// filters as the products' rows (32 tiles or more): odd and even sizes
    /// (tiles that hang past the image), one row, an image of several bands
    /// of tile rows (64 + 64 channels at 200 x 180: 100 x 90 tiles, 22 rows
    /// of tiles a band), and rows longer than a band (16 + 16 channels:
    /// 8192 tiles a band, rows of 10,000); and, where the packed product
    /// runs, with the tiles as the rows (fewer than 32): 16 tiles of 8 x 8
    /// (two and three panels of 6), one tile of 1 x 1, an odd 5 x 7 (12
    /// tiles) and 3 x 9 (10), and channels past one or two panels of 64
    /// columns (70, 130) or short of one (24).
    #[test]
    fn winograd_convolution_matches_direct_sums() {
        use winograd::Products::{FilterRows, TileRows};
        for (in_c, out_c, h, w, products) in [
            (16, 24, 13, 11, FilterRows),
            (32, 16, 16, 16, FilterRows),
            (24, 16, 1, 77, FilterRows),
            (64, 64, 200, 180, FilterRows),
            (16, 16, 3, 20_000, FilterRows),
            (64, 70, 8, 8, TileRows),
            (130, 24, 8, 8, TileRows),
            (16, 16, 1, 1, TileRows),
            (24, 40, 5, 7, TileRows),
            (40, 16, 3, 9, TileRows),
        ] {
            let got = winograd::products(in_c, out_c, h, w);
            match (products, packed::available()) {
                (TileRows, false) => assert_eq!(got, None, "unfolded without the packed product"),
                _ => assert_eq!(got, Some(products)),
            }
            check_against_direct_sums(in_c, out_c, h, w);
        }
    }

    fn check_against_direct_sums(in_c: usize, out_c: usize, h: usize, w: usize) {
        let p = ConvWeights {
            in_c,
            out_c,
            weight: values(out_c * in_c * 9, 1),
            bias: values(out_c, 2),
            prepared: Default::default(),
        };
        let x = values(in_c * h * w, 3);
        let dout = values(out_c * h * w, 4);
        let (mut out, mut dx, mut cols) = (Vec::new(), Vec::new(), Vec::new());
        conv(&x, h, w, &p, &mut out, &mut cols).unwrap();
        conv_backward(&dout, h, w, &p, &mut dx, &mut cols).unwrap();
        // The bound, with each unfolded row padded by up to 31 floats
        // (`cols_stride`) and the last band's rounding.
        assert!(
            cols.len() <= BAND_ELEMENTS + in_c * 9 * 32,
            "the band bound"
        );
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
                    "{h}x{w} {what}[{idx}]: {g} vs {e}"
                );
            }
        }
    }
}
