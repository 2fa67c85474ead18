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

use super::gemm::{each_part, sgemm_batch};
use super::packed;
use crate::error::Result;
use crate::fallible;
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

/// Tiles below which the unfolded product is used instead. The 16
/// transformed filters are 16/9 of the filters, and on a few tiles (VGG's
/// 8 x 8 layers of a 64 x 64 image) reading them costs more than the
/// multiply-adds saved. Chosen when each product still packed both of its
/// operands per call: a 1x3x64x64 VGG16 call took 44 ms with every layer
/// here, 34 ms from 32 tiles on, 36 ms with none (2 cores, AVX-512). Both
/// paths now read filters packed once (`layers::Prepared`); re-checked
/// then on a 2-core AMD EPYC, thresholds of 16 and 4 tiles made LPIPS at
/// 1x3x64x64 about 10% and 15% slower (fastest of 15 calls).
const MIN_TILES: usize = 32;

/// Whether a convolution of `in_c` -> `out_c` channels over h x w runs here.
pub(crate) fn suits(in_c: usize, out_c: usize, h: usize, w: usize) -> bool {
    in_c.min(out_c) >= MIN_CHANNELS && h.div_ceil(2) * w.div_ceil(2) >= MIN_TILES
}

/// The filters of `p` (out_c x in_c x 3 x 3) in the transform domain, as
/// 16 matrices of out_c x in_c (position-major), U = G g G^T with G =
/// [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]: packed for
/// the packed product where the machine runs it, else row-major. With
/// `backward`, of the flipped filters with in and out swapped: the input
/// gradient's convolution.
pub(crate) fn filters(p: &ConvWeights, backward: bool) -> Vec<f32> {
    let (rows, cols) = match backward {
        true => (p.in_c, p.out_c),
        false => (p.out_c, p.in_c),
    };
    let u = row_major_filters(p, backward);
    if !packed::available() {
        return u;
    }
    let len = packed::packed_len(rows, cols);
    let mut out = vec![0f32; POSITIONS * len];
    for (plain, dst) in u.chunks_exact(rows * cols).zip(out.chunks_exact_mut(len)) {
        packed::pack(plain, (rows, cols), dst);
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
/// transformed filters are `u` (from [`filters`]); `scratch` holds the
/// transform domain of a band of tiles.
pub(crate) fn conv(
    x: &[f32],
    (in_c, out_c): (usize, usize),
    (h, w): (usize, usize),
    u: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<()> {
    let (tiles_h, tiles_w) = (h.div_ceil(2), w.div_ceil(2));
    // A band is whole rows of tiles, as many as the bound allows, or part
    // of one row when a row alone is over it.
    let per_tile = POSITIONS * (in_c + out_c);
    let band_tiles = (BAND_ELEMENTS / per_tile).max(1);
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
            scratch.clear();
            fallible::resize(scratch, per_tile * tiles, 0.0, "Winograd tiles")?;
            let (v, m) = scratch.split_at_mut(POSITIONS * in_c * tiles);
            transform_input(x, in_c, (h, w), &band, v);
            let shape = (out_c, in_c, tiles);
            if packed::available() {
                let len = packed::packed_len(out_c, in_c);
                each_part(m, POSITIONS, out_c * in_c * tiles, |pos, m_pos| {
                    let u = &u[pos * len..][..len];
                    let v = &v[pos * in_c * tiles..][..in_c * tiles];
                    packed::product(u, shape, (v, tiles), (m_pos, tiles));
                });
            } else {
                sgemm_batch(POSITIONS, shape, u, v, m);
            }
            transform_output(m, out_c, (h, w), &band, out);
        }
    }
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

/// V (16 x in_c x tiles) of the tiles of `band`: each tile's 4x4 patch
/// from row 2 ti - 1 and column 2 tj - 1 (zero outside the image), B^T d B.
/// The column transform B^T runs along whole rows (four input rows make
/// four transformed ones, in vector lanes), then the row transform along
/// each tile's four columns of them.
fn transform_input(x: &[f32], in_c: usize, (h, w): (usize, usize), band: &Band, v: &mut [f32]) {
    let (tiles, ncols) = (band.tiles(), band.cols.len());
    // The image columns the band's tiles read, from 2 tj0 - 1, with zeros
    // past either side of the image: four per tile, overlapping by two.
    let width = 2 * ncols + 2;
    let first = 2 * band.cols.start as isize - 1;
    let (lo, hi) = (
        (-first).max(0) as usize,
        (w as isize - first).clamp(0, width as isize) as usize,
    );
    let mut padded = [0, 1, 2, 3].map(|_| vec![0f32; width]);
    let mut t = [0, 1, 2, 3].map(|_| vec![0f32; width]);
    for c in 0..in_c {
        let plane = &x[c * h * w..(c + 1) * h * w];
        for (band_row, ti) in band.rows.clone().enumerate() {
            for (dy, row) in padded.iter_mut().enumerate() {
                let i = (2 * ti + dy).checked_sub(1).filter(|&i| i < h);
                match i {
                    Some(i) if lo < hi => {
                        let src = (first + lo as isize) as usize;
                        row[lo..hi].copy_from_slice(&plane[i * w + src..][..hi - lo]);
                        row[..lo].fill(0.0);
                        row[hi..].fill(0.0);
                    }
                    _ => row.fill(0.0),
                }
            }
            let [r0, r1, r2, r3] = &padded;
            let [t0, t1, t2, t3] = &mut t;
            for j in 0..width {
                let col = bt([r0[j], r1[j], r2[j], r3[j]]);
                (t0[j], t1[j], t2[j], t3[j]) = (col[0], col[1], col[2], col[3]);
            }
            let first_tile = band_row * ncols;
            for (y, row) in t.iter().enumerate() {
                // The four positions (y, 0..3) of every tile of this row.
                let at = |xx: usize| ((y * 4 + xx) * in_c + c) * tiles + first_tile;
                let (o0, o1, o2, o3) = (at(0), at(1), at(2), at(3));
                for tj in 0..ncols {
                    let q = &row[2 * tj..2 * tj + 4];
                    let [a, b, cc, d] = bt([q[0], q[1], q[2], q[3]]);
                    v[o0 + tj] = a;
                    v[o1 + tj] = b;
                    v[o2 + tj] = cc;
                    v[o3 + tj] = d;
                }
            }
        }
    }
}

/// Each tile of M (16 x out_c x tiles) of `band` back to its 2x2 outputs,
/// A^T M A, into `out` (out_c x h x w), dropping what lies past the
/// image: the column transform A^T along each tile row's 16 runs (one per
/// position, contiguous over the tiles), then the row transform into two
/// image rows.
fn transform_output(m: &[f32], out_c: usize, (h, w): (usize, usize), band: &Band, out: &mut [f32]) {
    let (tiles, ncols) = (band.tiles(), band.cols.len());
    // The image columns the band's tiles write.
    let j0 = 2 * band.cols.start;
    let cols = (2 * ncols).min(w - j0);
    // s[4 r + x]: row r of A^T M at column x, for every tile of a row.
    let mut s = [0, 1, 2, 3, 4, 5, 6, 7].map(|_| vec![0f32; ncols]);
    let mut line = vec![0f32; 2 * ncols];
    for o in 0..out_c {
        let plane = &mut out[o * h * w..(o + 1) * h * w];
        for (band_row, ti) in band.rows.clone().enumerate() {
            let first_tile = band_row * ncols;
            let run = |pos: usize| &m[(pos * out_c + o) * tiles + first_tile..][..ncols];
            for x in 0..4 {
                let (m0, m1, m2, m3) = (run(x), run(4 + x), run(8 + x), run(12 + x));
                let (lo, hi) = s.split_at_mut(4);
                let (s0, s1) = (&mut lo[x], &mut hi[x]);
                for tj in 0..ncols {
                    let [a, b] = at([m0[tj], m1[tj], m2[tj], m3[tj]]);
                    s0[tj] = a;
                    s1[tj] = b;
                }
            }
            for r in 0..2 {
                let i = 2 * ti + r;
                if i >= h {
                    continue;
                }
                let [s0, s1, s2, s3] = [&s[4 * r], &s[4 * r + 1], &s[4 * r + 2], &s[4 * r + 3]];
                for tj in 0..ncols {
                    let [a, b] = at([s0[tj], s1[tj], s2[tj], s3[tj]]);
                    line[2 * tj] = a;
                    line[2 * tj + 1] = b;
                }
                plane[i * w + j0..][..cols].copy_from_slice(&line[..cols]);
            }
        }
    }
}
