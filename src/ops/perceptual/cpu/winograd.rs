//! 3x3 convolutions (stride 1, padding 1) of one CHW image by Winograd's
//! minimal filtering F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for
//! Convolutional Neural Networks"): the output in 2x2 tiles, each from the
//! 4x4 input patch around it. Patches and filters are taken to a 4x4
//! transform domain (V = B^T d B, U = G g G^T) where the convolution is 16
//! independent channel products M = U V, one per transform position, and
//! each tile comes back as A^T M A. 16 multiply-adds per channel pair and
//! tile instead of 36, and no unfolded columns.
//!
//! The input gradient is the same convolution of the output gradient with
//! the filters flipped and their channels swapped.
//!
//! Each channel product has one operand packed once, with the filters:
//! with many tiles, the filters are its rows (out_c x in_c) and the tiles
//! its columns, read where they lie; with few (the 8 x 8 maps of a 64 x 64
//! image: 16 tiles), the tiles are its rows, packed per call, and the
//! filters its columns ([`Products`]).

use super::gemm::{each_part, sgemm_batch};
use super::layers::set_len;
use super::packed;
use crate::error::Result;
use crate::vgg::ConvWeights;

/// Transform positions per tile.
const POSITIONS: usize = 16;

/// Values (patches and products, in the transform domain) per band of
/// tiles: 16 MiB whatever the image, as the unfolded columns it replaces.
const BAND_ELEMENTS: usize = 1 << 22;

/// Channels below which the unfolded product is used instead (the first
/// layer's 3 input channels, its 3-channel input gradient): the 16 channel
/// products would be too thin to run at speed.
const MIN_CHANNELS: usize = 16;

/// Tiles below which the tiles, not the filters, are the packed rows of
/// the channel products. With the filters as rows, the tiles are the
/// columns of a kernel block (64 with AVX-512), and a few tiles leave most
/// of its lanes idle: on VGG's 8 x 8 layers of a 64 x 64 image (16 tiles)
/// the products ran slower than the unfolded convolution's with 9/4 of
/// the multiply-adds, which those layers then used. With the tiles as rows
/// (blocks of 6) and the filters as columns streamed in order, the
/// product kernel's share of a 1x3x64x64 VGG16 call fell by a quarter
/// (docs/performance.md, 2026-12-02). Without the packed kernels such a
/// convolution is unfolded.
const FEW_TILES: usize = 32;

/// How a convolution's 16 channel products run: which operand is packed
/// once with the filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Products {
    /// The filters are the rows (packed by `packed::pack`), the tiles the
    /// columns, read where they lie.
    FilterRows,
    /// The filters are the columns (packed by `packed::pack_columns`), the
    /// few tiles the rows, packed per call.
    TileRows,
}

/// How a convolution of `in_c` -> `out_c` channels over h x w runs here,
/// if it does (else it is unfolded).
pub(crate) fn products(in_c: usize, out_c: usize, h: usize, w: usize) -> Option<Products> {
    let few = h.div_ceil(2) * w.div_ceil(2) < FEW_TILES;
    match (in_c.min(out_c) >= MIN_CHANNELS, few, packed::available()) {
        (false, ..) => None,
        (true, false, _) => Some(Products::FilterRows),
        (true, true, true) => Some(Products::TileRows),
        (true, true, false) => None,
    }
}

/// The filters of `p` (out_c x in_c x 3 x 3) in the transform domain, as
/// 16 matrices of out_c x in_c (position-major), U = G g G^T with G =
/// [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]], as
/// `products` reads them: packed as rows or, transposed (in_c x out_c),
/// as columns where the machine runs the packed product, else row-major.
/// With `backward`, of the flipped filters with in and out swapped: the
/// input gradient's convolution.
pub(crate) fn filters(p: &ConvWeights, backward: bool, products: Products) -> Vec<f32> {
    let (rows, cols) = match backward {
        true => (p.in_c, p.out_c),
        false => (p.out_c, p.in_c),
    };
    let u = row_major_filters(p, backward);
    if !packed::available() {
        return u;
    }
    let len = match products {
        Products::FilterRows => packed::packed_len(rows, cols),
        Products::TileRows => packed::packed_columns_len(cols, rows),
    };
    let mut out = vec![0f32; POSITIONS * len];
    let mut transposed = vec![0f32; rows * cols];
    for (plain, dst) in u.chunks_exact(rows * cols).zip(out.chunks_exact_mut(len)) {
        match products {
            Products::FilterRows => packed::pack(plain, (rows, cols), dst),
            Products::TileRows => {
                packed::transpose(plain, (rows, cols), &mut transposed);
                packed::pack_columns(&transposed, (cols, rows), dst);
            }
        }
    }
    out
}

/// [`filters`], row-major.
fn row_major_filters(p: &ConvWeights, backward: bool) -> Vec<f32> {
    let (rows, cols) = if backward {
        (p.in_c, p.out_c)
    } else {
        (p.out_c, p.in_c)
    };
    let mut u = vec![0f32; POSITIONS * rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let (o, i) = if backward { (c, r) } else { (r, c) };
            let g = &p.weight[(o * p.in_c + i) * 9..][..9];
            // The backward filter at (ky, kx) is the forward one at
            // (2 - ky, 2 - kx).
            let at = |ky: usize, kx: usize| -> f64 {
                match backward {
                    true => g[(2 - ky) * 3 + (2 - kx)] as f64,
                    false => g[ky * 3 + kx] as f64,
                }
            };
            // G g (4 x 3), then (G g) G^T (4 x 4).
            let by_kx = [0, 1, 2].map(|kx| g_rows([at(0, kx), at(1, kx), at(2, kx)]));
            let gg = [0, 1, 2, 3].map(|y| by_kx.map(|col| col[y]));
            for (y, row) in gg.iter().enumerate() {
                for (x, v) in g_rows(*row).into_iter().enumerate() {
                    u[((y * 4 + x) * rows + r) * cols + c] = v as f32;
                }
            }
        }
    }
    u
}

/// G v for a 3-vector v.
fn g_rows([a, b, c]: [f64; 3]) -> [f64; 4] {
    [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]
}

/// B^T v for a 4-vector v, B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1,
/// 0], [0, 1, 0, -1]].
fn bt([a, b, c, d]: [f32; 4]) -> [f32; 4] {
    [a - c, b + c, c - b, b - d]
}

/// A^T v for a 4-vector v, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
fn at([a, b, c, d]: [f32; 4]) -> [f32; 2] {
    [a + b + c, b - c - d]
}

/// out (`out_c` x h x w) = the convolution of `x` (`in_c` x h x w) whose
/// transformed filters are `u` (from [`filters`] for `products`);
/// `scratch` holds the transform domain of a band of tiles.
pub(crate) fn conv(
    x: &[f32],
    (in_c, out_c): (usize, usize),
    (h, w): (usize, usize),
    (u, products): (&[f32], Products),
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<()> {
    if products == Products::TileRows {
        return conv_by_tile_rows(x, (in_c, out_c), (h, w), u, out, scratch);
    }
    let (tiles_h, tiles_w) = (h.div_ceil(2), w.div_ceil(2));
    // A band is whole rows of tiles, as many as the bound allows, or part
    // of one row when a row alone is over it. Rows of the band's matrices
    // are padded to an odd number of lines (`packed::row_stride`); a band
    // of at most an odd number of whole lines of tiles stays within the
    // bound padded. (Below one line of tiles, more than 16384 channels, a
    // band of one line is over the bound: VGG has at most 1024.)
    let per_tile = POSITIONS * (in_c + out_c);
    let cap = BAND_ELEMENTS / per_tile;
    let band_tiles = match cap / 16 {
        0 => cap.max(1),
        lines => (lines - 1 + lines % 2) * 16,
    };
    let cols_per_band = band_tiles.min(tiles_w);
    let rows_per_band = (band_tiles / tiles_w).clamp(1, tiles_h);
    for first_row in (0..tiles_h).step_by(rows_per_band) {
        let rows = first_row..(first_row + rows_per_band).min(tiles_h);
        for first_col in (0..tiles_w).step_by(cols_per_band) {
            let band = Band {
                rows: rows.clone(),
                cols: first_col..(first_col + cols_per_band).min(tiles_w),
            };
            let tiles = band.tiles();
            // Rows of V and M are `ld` apart; the general product of the
            // fallback takes them contiguous.
            let ld = match packed::available() {
                true => packed::row_stride(tiles),
                false => tiles,
            };
            // Every element the band reads is written first: no clearing.
            set_len(scratch, per_tile * ld, "Winograd tiles")?;
            let (v, m) = scratch.split_at_mut(POSITIONS * in_c * ld);
            transform_input(x, in_c, (h, w), &band, (v, ld));
            let shape = (out_c, in_c, tiles);
            if packed::available() {
                let len = packed::packed_len(out_c, in_c);
                each_part(m, POSITIONS, out_c * in_c * tiles, |pos, m_pos| {
                    let u = &u[pos * len..][..len];
                    let v = &v[pos * in_c * ld..][..in_c * ld];
                    packed::product(u, shape, (v, ld), (m_pos, ld));
                });
            } else {
                sgemm_batch(POSITIONS, shape, u, v, m);
            }
            transform_output((m, ld, out_c * ld), out_c, (h, w), &band, out);
        }
    }
    Ok(())
}

/// [`conv`] of an image of few tiles (one band), the tiles as the rows of
/// each channel product: per position, V^T (tiles x in_c) packed, times
/// the filters' columns, gives M^T (tiles x out_c), turned back to M
/// (out_c x tiles) for the output transform. The positions' M, packed V^T
/// and M^T lie together, one position's work apart.
fn conv_by_tile_rows(
    x: &[f32],
    (in_c, out_c): (usize, usize),
    (h, w): (usize, usize),
    u: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<()> {
    let band = Band {
        rows: 0..h.div_ceil(2),
        cols: 0..w.div_ceil(2),
    };
    let tiles = band.tiles();
    let (m_len, a_len) = (out_c * tiles, packed::packed_len(tiles, in_c));
    let per_position = m_len + a_len + tiles * out_c;
    let v_len = POSITIONS * in_c * tiles;
    // Every element the products read is written first: no clearing.
    set_len(scratch, v_len + POSITIONS * per_position, "Winograd tiles")?;
    let (v, work) = scratch.split_at_mut(v_len);
    transform_input(x, in_c, (h, w), &band, (v, tiles));
    let b_len = packed::packed_columns_len(in_c, out_c);
    each_part(work, POSITIONS, out_c * in_c * tiles, |pos, work| {
        let (m, rest) = work.split_at_mut(m_len);
        let (a, m_t) = rest.split_at_mut(a_len);
        let v = &v[pos * in_c * tiles..][..in_c * tiles];
        packed::pack_transposed((v, tiles), (tiles, in_c), a);
        let u = &u[pos * b_len..][..b_len];
        packed::product_packed(a, (tiles, in_c, out_c), u, (m_t, out_c));
        packed::transpose(m_t, (tiles, out_c), m);
    });
    transform_output((work, tiles, per_position), out_c, (h, w), &band, out);
    Ok(())
}

/// The tiles a band covers: rows x columns of tiles, row by row.
struct Band {
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

impl Band {
    fn tiles(&self) -> usize {
        self.rows.len() * self.cols.len()
    }
}

/// Values a transform writes below which it stays on one core: handing
/// channels to another core and waiting for it costs microseconds.
const MIN_SPLIT: usize = 1 << 16;

/// `f(channels)` for contiguous ranges of channels covering 0..`count`,
/// shared among the cores when the transform writes `values` in all.
fn channels_on_cores(count: usize, values: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let parts = crate::ops::cores()
        .min(count)
        .min(values / MIN_SPLIT)
        .max(1);
    let per = count.div_ceil(parts);
    crate::ops::parts::run_parts(count.div_ceil(per), &|t| {
        f(t * per..((t + 1) * per).min(count))
    });
}

/// V (16 x in_c rows of the band's tiles, `ld` apart) of the tiles of
/// `band`: each tile's 4x4 patch from row 2 ti - 1 and column 2 tj - 1
/// (zero outside the image), B^T d B; the channels shared among the cores.
fn transform_input(
    x: &[f32],
    in_c: usize,
    (h, w): (usize, usize),
    band: &Band,
    (v, ld): (&mut [f32], usize),
) {
    let tiles = band.tiles();
    assert!(tiles <= ld && v.len() >= POSITIONS * in_c * ld);
    let v_at = v.as_mut_ptr() as usize;
    channels_on_cores(in_c, POSITIONS * in_c * tiles, |channels| {
        let mut scratch = InputRows::new(band);
        for c in channels {
            // SAFETY: row (pos, c) of V lies inside `v` (asserted above),
            // and the 16 rows of channel c are written by this part alone:
            // the parts' channel ranges are disjoint.
            let rows: [&mut [f32]; POSITIONS] = std::array::from_fn(|pos| unsafe {
                let at = (v_at as *mut f32).add((pos * in_c + c) * ld);
                std::slice::from_raw_parts_mut(at, tiles)
            });
            scratch.channel(&x[c * h * w..(c + 1) * h * w], (h, w), band, rows);
        }
    });
}

/// One part's rows for [`transform_input`]: the even and odd columns of
/// four image rows, and their column transforms.
struct InputRows {
    even: [Vec<f32>; 4],
    odd: [Vec<f32>; 4],
    t_even: [Vec<f32>; 4],
    t_odd: [Vec<f32>; 4],
}

impl InputRows {
    fn new(band: &Band) -> InputRows {
        let half = band.cols.len() + 1;
        let four = || [0, 1, 2, 3].map(|_| vec![0f32; half]);
        InputRows {
            even: four(),
            odd: four(),
            t_even: four(),
            t_odd: four(),
        }
    }

    /// The 16 transformed rows (one per position, over the band's tiles)
    /// of one channel's `plane`. The column transform B^T runs along whole
    /// rows (four input rows make four transformed ones), then the row
    /// transform along each tile's four columns of them. Both run on the
    /// rows' even and odd columns apart, so that every loop reads and
    /// writes consecutive values (in vector lanes): tile tj's columns are
    /// even[tj], odd[tj], even[tj + 1], odd[tj + 1]. A tile row's last two
    /// image rows are the next one's first two: those are split once.
    fn channel(
        &mut self,
        plane: &[f32],
        (h, w): (usize, usize),
        band: &Band,
        mut v: [&mut [f32]; POSITIONS],
    ) {
        let ncols = band.cols.len();
        // The image columns the band's tiles read, from 2 tj0 - 1, with
        // zeros past either side of the image: four per tile, overlapping
        // by two; the even ones (from 2 tj0 - 1) and the odd ones (from
        // 2 tj0).
        let half = ncols + 1;
        let first = 2 * band.cols.start as isize - 1;
        for (band_row, ti) in band.rows.clone().enumerate() {
            let fresh = match band_row {
                0 => 0..4,
                _ => {
                    for split in [&mut self.even, &mut self.odd] {
                        split.swap(0, 2);
                        split.swap(1, 3);
                    }
                    2..4
                }
            };
            for dy in fresh {
                let i = (2 * ti + dy).checked_sub(1).filter(|&i| i < h);
                let row = i.map(|i| &plane[i * w..(i + 1) * w]);
                every_other(row, first, &mut self.even[dy][..half]);
                every_other(row, first + 1, &mut self.odd[dy][..half]);
            }
            for (rows, out) in [(&self.even, &mut self.t_even), (&self.odd, &mut self.t_odd)] {
                let [t0, t1, t2, t3] = out.each_mut().map(|t| &mut t[..half]);
                bt_columns(rows.each_ref().map(|r| &r[..half]), t0, t1, t2, t3);
            }
            let first_tile = band_row * ncols;
            for y in 0..4 {
                let (e, o) = (&self.t_even[y][..half], &self.t_odd[y][..half]);
                // The four positions (y, 0..3) of every tile of this row.
                let [v0, v1, v2, v3]: &mut [&mut [f32]; 4] = (&mut v[4 * y..4 * y + 4])
                    .try_into()
                    .expect("four positions a row");
                let [v0, v1, v2, v3] = [v0, v1, v2, v3].map(|v| &mut v[first_tile..][..ncols]);
                bt_tiles((e, o), v0, v1, v2, v3);
            }
        }
    }
}

// The transforms' loops. Each is a function of its own with its outputs
// as `&mut` parameters, which the compiler knows alias nothing else, and
// every slice cut to the loop's length: so it can run them in vector lanes
// (written inline in the passes, the outputs might have overlapped the
// inputs for all it knew, and the loops ran one value at a time).

/// out[k] = row[start + 2k], 0 where that column lies outside the row
/// (or everywhere for a row of padding, `None`).
fn every_other(row: Option<&[f32]>, start: isize, out: &mut [f32]) {
    let Some(row) = row else {
        return out.fill(0.0);
    };
    // The k whose column lies in the row: start + 2k in 0..len.
    let n = out.len() as isize;
    let lo = ((-start + 1) / 2).clamp(0, n) as usize;
    let hi = ((row.len() as isize - start + 1) / 2).clamp(lo as isize, n) as usize;
    out[..lo].fill(0.0);
    out[hi..].fill(0.0);
    if lo < hi {
        let from = (start + 2 * lo as isize) as usize;
        strided_copy(&row[from..from + 2 * (hi - lo) - 1], &mut out[lo..hi]);
    }
}

/// out[k] = src[2k].
fn strided_copy(src: &[f32], out: &mut [f32]) {
    let n = out.len();
    let src = &src[..2 * n - 1];
    for k in 0..n {
        out[k] = src[2 * k];
    }
}

/// B^T down the columns of four rows `r`: t0..t3[j] = B^T (r0..r3[j]).
fn bt_columns(r: [&[f32]; 4], t0: &mut [f32], t1: &mut [f32], t2: &mut [f32], t3: &mut [f32]) {
    let n = t0.len();
    let [r0, r1, r2, r3] = r.map(|r| &r[..n]);
    let (t1, t2, t3) = (&mut t1[..n], &mut t2[..n], &mut t3[..n]);
    for j in 0..n {
        [t0[j], t1[j], t2[j], t3[j]] = bt([r0[j], r1[j], r2[j], r3[j]]);
    }
}

/// B^T along each tile's four columns of one row, given as its even and
/// odd columns: v0..v3[tj] = B^T (e[tj], o[tj], e[tj + 1], o[tj + 1]).
fn bt_tiles(
    (e, o): (&[f32], &[f32]),
    v0: &mut [f32],
    v1: &mut [f32],
    v2: &mut [f32],
    v3: &mut [f32],
) {
    let n = v0.len();
    let (e, o) = (&e[..n + 1], &o[..n + 1]);
    let (v1, v2, v3) = (&mut v1[..n], &mut v2[..n], &mut v3[..n]);
    for tj in 0..n {
        [v0[tj], v1[tj], v2[tj], v3[tj]] = bt([e[tj], o[tj], e[tj + 1], o[tj + 1]]);
    }
}

/// A^T down four runs of M: s0, s1[tj] = A^T (m0..m3[tj]).
fn at_columns(m: [&[f32]; 4], s0: &mut [f32], s1: &mut [f32]) {
    let n = s0.len();
    let [m0, m1, m2, m3] = m.map(|m| &m[..n]);
    let s1 = &mut s1[..n];
    for tj in 0..n {
        [s0[tj], s1[tj]] = at([m0[tj], m1[tj], m2[tj], m3[tj]]);
    }
}

/// A^T along each tile's four values of the rows `s`, into its two
/// output columns: line[2 tj], line[2 tj + 1] = A^T (s0..s3[tj]).
fn at_tiles(s: [&[f32]; 4], line: &mut [f32]) {
    let n = line.len() / 2;
    let [s0, s1, s2, s3] = s.map(|s| &s[..n]);
    let line = &mut line[..2 * n];
    for tj in 0..n {
        [line[2 * tj], line[2 * tj + 1]] = at([s0[tj], s1[tj], s2[tj], s3[tj]]);
    }
}

/// Each tile of M (16 matrices `stride` apart, of out_c rows of the band's
/// tiles, `ld` apart) of `band` back to its 2x2 outputs, A^T M A, into
/// `out` (out_c x h x w), dropping what lies past the image; the channels
/// shared among the cores.
fn transform_output(
    (m, ld, stride): (&[f32], usize, usize),
    out_c: usize,
    (h, w): (usize, usize),
    band: &Band,
    out: &mut [f32],
) {
    assert!(out.len() >= out_c * h * w);
    let out_at = out.as_mut_ptr() as usize;
    channels_on_cores(out_c, out_c * 4 * band.tiles(), |channels| {
        let ncols = band.cols.len();
        // s[4 r + x]: row r of A^T M at column x, for every tile of a row.
        let mut s = [0, 1, 2, 3, 4, 5, 6, 7].map(|_| vec![0f32; ncols]);
        let mut line = vec![0f32; 2 * ncols];
        for o in channels {
            // SAFETY: plane o lies inside `out` (asserted above) and is
            // written by this part alone: the parts' channels are disjoint.
            let plane = unsafe {
                let at = (out_at as *mut f32).add(o * h * w);
                std::slice::from_raw_parts_mut(at, h * w)
            };
            let runs = |pos: usize| &m[pos * stride + o * ld..][..band.tiles()];
            output_channel(runs, (h, w), band, (&mut s, &mut line), plane);
        }
    });
}

/// One output channel of [`transform_output`] from its 16 runs of M (one
/// per position, over the band's tiles): the column transform A^T along
/// each tile row's runs, then the row transform into two image rows.
fn output_channel<'m>(
    runs: impl Fn(usize) -> &'m [f32],
    (h, w): (usize, usize),
    band: &Band,
    (s, line): (&mut [Vec<f32>; 8], &mut [f32]),
    plane: &mut [f32],
) {
    let ncols = band.cols.len();
    // The image columns the band's tiles write.
    let j0 = 2 * band.cols.start;
    let cols = (2 * ncols).min(w - j0);
    for (band_row, ti) in band.rows.clone().enumerate() {
        let first_tile = band_row * ncols;
        let run = |pos: usize| &runs(pos)[first_tile..][..ncols];
        for x in 0..4 {
            let m = [run(x), run(4 + x), run(8 + x), run(12 + x)];
            let (lo, hi) = s.split_at_mut(4);
            at_columns(m, &mut lo[x][..ncols], &mut hi[x][..ncols]);
        }
        for r in 0..2 {
            let i = 2 * ti + r;
            if i >= h {
                continue;
            }
            let s = [0, 1, 2, 3].map(|k| &s[4 * r + k][..ncols]);
            let dst = &mut plane[i * w + j0..][..cols];
            // Straight into the image row, but for a last tile that hangs
            // past it.
            match cols == 2 * ncols {
                true => at_tiles(s, dst),
                false => {
                    at_tiles(s, &mut line[..2 * ncols]);
                    dst.copy_from_slice(&line[..cols]);
                }
            }
        }
    }
}
