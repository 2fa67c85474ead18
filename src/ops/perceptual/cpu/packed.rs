//! Products C = A B whose A (a layer's transformed filters) is packed once,
//! when the filters are first used, and whose B (the transformed image
//! tiles) is read where it lies: a general matrix product packs both of
//! its operands on every call, which for VGG's per-image products cost
//! more time than the multiply-adds (docs/performance.md).
//!
//! A kernel holds a block of 6 rows of C in vector registers and runs
//! along k: per step one broadcast of each of the 6 packed A values, one
//! load of each vector of B's row, and a fused multiply-add for each
//! register. With AVX-512 a block is 64 columns (24 registers of 16
//! lanes); with AVX2 and FMA, 16 columns (12 registers of 8 lanes). The
//! driver walks k in slices of `KC` and A in strips of `MC_PANELS` panels,
//! so the slice of B a block reads stays in cache (the first level with
//! AVX2) and the strip of A in the second level while the columns go by;
//! C carries each sum from one slice to the next. Every element of C is
//! then one fused multiply-add chain in k order whatever the kernel or
//! the blocking, so results are the same run to run and on both
//! instruction sets. Without either the caller keeps the unpacked filters
//! and the general product.
//!
//! Where A has only a few rows (the tiles of a small image's deep layers)
//! the filters are B instead, packed once in panels of `NC` columns
//! ([`pack_columns`]) so that the product streams them in order, and A is
//! packed per call from the tiles ([`pack_transposed`]): see
//! [`product_packed`].

/// Rows of A, and of C, per kernel block.
const MR: usize = 6;

/// Steps of k per pass over a strip of C: a kernel's slice of B (`KC`
/// rows of its block's columns: 16 KiB with AVX2, in the first-level
/// cache; 64 KiB with AVX-512, in the second) stays in cache while every
/// panel of the strip reads it.
const KC: usize = 256;

/// Panels of A per strip: 96 rows by `KC`, 96 KiB, stay in the second-level
/// cache while the strip runs along all of C's columns.
const MC_PANELS: usize = 16;

/// Columns per panel of a packed B ([`pack_columns`]): one AVX-512 block,
/// four AVX2 ones.
pub(crate) const NC: usize = 64;

/// The vector kernels, by instruction set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// AVX-512F: blocks of 6 x 64.
    Avx512,
    /// AVX2 with FMA: blocks of 6 x 16.
    Avx2,
}

impl Kernel {
    /// The widest kernel this machine runs, if any.
    pub(crate) fn best() -> Option<Kernel> {
        [Kernel::Avx512, Kernel::Avx2]
            .into_iter()
            .find(|k| k.runs_here())
    }

    /// Whether this machine has the kernel's instructions.
    pub(crate) fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Kernel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                Kernel::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }

    /// Columns of C per kernel block.
    fn nr(self) -> usize {
        match self {
            Kernel::Avx512 => 64,
            Kernel::Avx2 => 16,
        }
    }
}

/// Whether this machine runs a packed kernel.
pub(crate) fn available() -> bool {
    Kernel::best().is_some()
}

/// A row stride of at least `n` floats for a B (or C) the kernels read
/// where it lies: a whole and odd number of 64-byte lines. Rows a power of
/// two apart (the 4096 tiles of a 128 x 128 image's first Winograd layer,
/// 16 KiB) all fall in one set of the caches, which then hold 8 of the
/// 256 rows a slice of k reads; an odd number of lines apart, successive
/// rows go to successive sets.
pub(crate) fn row_stride(n: usize) -> usize {
    let lines = n.div_ceil(16);
    (lines | 1) * 16
}

/// Floats of `m` x `k` packed: panels of MR rows, the last one padded with
/// zero rows.
pub(crate) fn packed_len(m: usize, k: usize) -> usize {
    m.div_ceil(MR) * MR * k
}

/// Row-major `a` (m x k, k > 0) packed into `out` (`packed_len` floats):
/// panel p holds rows p MR.. p MR + MR - 1, k-major, the MR values of one
/// k together.
pub(crate) fn pack(a: &[f32], (m, k): (usize, usize), out: &mut [f32]) {
    assert!(k > 0 && a.len() >= m * k && out.len() >= packed_len(m, k));
    for (p, panel) in out.chunks_exact_mut(MR * k).enumerate() {
        for kk in 0..k {
            for r in 0..MR {
                let row = p * MR + r;
                panel[kk * MR + r] = if row < m { a[row * k + kk] } else { 0.0 };
            }
        }
    }
}

/// `a` (rows x cols, row-major) transposed into `out` (cols x rows).
pub(crate) fn transpose(a: &[f32], (rows, cols): (usize, usize), out: &mut [f32]) {
    let out = &mut out[..rows * cols];
    for (r, row) in a[..rows * cols].chunks_exact(cols).enumerate() {
        (0..cols).for_each(|c| out[c * rows + r] = row[c]);
    }
}

/// Floats of `k` x `n` packed by columns: panels of `NC` columns, the last
/// one padded with zero columns.
pub(crate) fn packed_columns_len(k: usize, n: usize) -> usize {
    n.div_ceil(NC) * NC * k
}

/// Row-major `b` (k x n) packed into `out` (`packed_columns_len` floats):
/// panel q holds columns q NC.. q NC + NC - 1, row by row, NC values a
/// row, so a product reading B panel by panel reads it in order.
pub(crate) fn pack_columns(b: &[f32], (k, n): (usize, usize), out: &mut [f32]) {
    assert!(b.len() >= k * n && out.len() >= packed_columns_len(k, n));
    for (q, panel) in out
        .chunks_exact_mut(NC * k)
        .take(n.div_ceil(NC))
        .enumerate()
    {
        for (kk, row) in panel.chunks_exact_mut(NC).enumerate() {
            let cols = (n - q * NC).min(NC);
            row[..cols].copy_from_slice(&b[kk * n + q * NC..][..cols]);
            row[cols..].fill(0.0);
        }
    }
}

/// A = V^T packed as [`pack`] packs it (m x k, k > 0), from `v` (k x m,
/// rows `ld` apart): the A of a product whose rows are the columns of V.
pub(crate) fn pack_transposed((v, ld): (&[f32], usize), (m, k): (usize, usize), out: &mut [f32]) {
    assert!(k > 0 && ld >= m && v.len() >= (k - 1) * ld + m && out.len() >= packed_len(m, k));
    for (p, panel) in out
        .chunks_exact_mut(MR * k)
        .take(m.div_ceil(MR))
        .enumerate()
    {
        let rows = (m - p * MR).min(MR);
        for (kk, values) in panel.chunks_exact_mut(MR).enumerate() {
            values[..rows].copy_from_slice(&v[kk * ld + p * MR..][..rows]);
            values[rows..].fill(0.0);
        }
    }
}

/// Panics unless `kernel` runs here and the operands of C (m x n, rows
/// `ldc` apart) = A B hold what the product reads and writes: A packed
/// from m x k (k > 0), B k x n with rows `ldb` apart (`None`: B packed
/// by columns).
fn check(
    kernel: Kernel,
    a: &[f32],
    (m, k, n): (usize, usize, usize),
    b: (&[f32], Option<usize>),
    (c, ldc): (&[f32], usize),
) {
    assert!(k > 0 && a.len() >= packed_len(m, k) && kernel.runs_here());
    match b {
        (b, Some(ldb)) => assert!(n == 0 || (ldb >= n && b.len() >= (k - 1) * ldb + n)),
        (b, None) => assert!(b.len() >= packed_columns_len(k, n) && NC.is_multiple_of(kernel.nr())),
    }
    assert!(n == 0 || m == 0 || (ldc >= n && c.len() >= (m - 1) * ldc + n));
}

/// The best kernel, which the callers made sure of through [`available`].
fn best() -> Kernel {
    Kernel::best().expect("a packed product on a machine without its instructions")
}

/// C (m x n, rows `ldc` apart) = A B: A packed by [`pack`] from m x k, B
/// k x n with rows `ldb` apart. On one thread; only where [`available`].
pub(crate) fn product(
    a: &[f32],
    shape: (usize, usize, usize),
    b: (&[f32], usize),
    c: (&mut [f32], usize),
) {
    product_with(best(), a, shape, b, c)
}

/// [`product`] with a chosen kernel, which must run here.
pub(crate) fn product_with(
    kernel: Kernel,
    a: &[f32],
    shape: (usize, usize, usize),
    (b, ldb): (&[f32], usize),
    (c, ldc): (&mut [f32], usize),
) {
    check(kernel, a, shape, (b, Some(ldb)), (c, ldc));
    // SAFETY: checked above: the kernel's instructions are present and the
    // operands hold every element the product touches.
    unsafe { raw(kernel, a, shape, (b.as_ptr(), ldb), (c.as_mut_ptr(), ldc)) }
}

/// C (m x n, rows `ldc` apart) = A B: A packed by [`pack`] (or
/// [`pack_transposed`]) from m x k, B by [`pack_columns`] from k x n. On
/// one thread; only where [`available`]. B is read once, panel by panel
/// in order, and A once per slice of k of each kernel block of columns: A
/// of a few rows stays in cache. Each element of C is the same
/// multiply-add chain as in [`product`], so the two give the same bits.
pub(crate) fn product_packed(
    a: &[f32],
    shape: (usize, usize, usize),
    b: &[f32],
    c: (&mut [f32], usize),
) {
    product_packed_with(best(), a, shape, b, c)
}

/// [`product_packed`] with a chosen kernel, which must run here.
pub(crate) fn product_packed_with(
    kernel: Kernel,
    a: &[f32],
    (m, k, n): (usize, usize, usize),
    b: &[f32],
    (c, ldc): (&mut [f32], usize),
) {
    check(kernel, a, (m, k, n), (b, None), (c, ldc));
    let (nr, panels) = (kernel.nr(), m.div_ceil(MR));
    for j0 in (0..n).step_by(nr) {
        let b_panel = &b[(j0 / NC) * NC * k + j0 % NC..];
        for k0 in (0..k).step_by(KC) {
            for p in 0..panels {
                let block = Block {
                    panel: a[p * MR * k + k0 * MR..].as_ptr(),
                    kc: KC.min(k - k0),
                    b: b_panel[k0 * NC..].as_ptr(),
                    ldb: NC,
                    cols: (n - j0).min(nr),
                    rows: (m - p * MR).min(MR),
                    c: c[p * MR * ldc + j0..].as_mut_ptr(),
                    ldc,
                    carry: k0 > 0,
                };
                // SAFETY: the kernel's instructions are present (checked);
                // the block's panel of A, its kc rows of B's panel (NC
                // apart, all within the padded panel) and its rows of C
                // lie inside the operands, which hold what `check` and
                // the packed lengths ask.
                unsafe { run_block(kernel, &block) };
            }
        }
    }
}

/// [`product`] with C shared among the cores in blocks of whole kernel
/// blocks: of columns, or of rows where C has few columns (the deep layers
/// of a small image).
pub(crate) fn product_on_cores(
    a: &[f32],
    (m, k, n): (usize, usize, usize),
    (b, ldb): (&[f32], usize),
    (c, ldc): (&mut [f32], usize),
) {
    let kernel = best();
    check(kernel, a, (m, k, n), (b, Some(ldb)), (c, ldc));
    let by_columns = n >= m;
    let (len, unit) = if by_columns {
        (n, kernel.nr())
    } else {
        (m, MR)
    };
    let parts = crate::ops::cores()
        .min(m * k * n / super::gemm::MIN_PART)
        .min(len / unit)
        .max(1);
    let block = len.div_ceil(parts).next_multiple_of(unit);
    let (b_at, c_at) = (b.as_ptr() as usize, c.as_mut_ptr() as usize);
    let run = |start: usize| {
        let size = block.min(len - start);
        let (b, c) = (b_at as *const f32, c_at as *mut f32);
        // SAFETY: checked above for the whole product; each part computes
        // its own rows or columns of C (a block of whole panels of A), so
        // no element is written by two parts.
        unsafe {
            match by_columns {
                true => raw(
                    kernel,
                    a,
                    (m, k, size),
                    (b.add(start), ldb),
                    (c.add(start), ldc),
                ),
                false => {
                    let a = &a[start * k..];
                    raw(kernel, a, (size, k, n), (b, ldb), (c.add(start * ldc), ldc))
                }
            }
        }
    };
    crate::ops::parts::run_parts(len.div_ceil(block), &|t| run(t * block));
}

/// One kernel block: `rows` (<= MR) rows and `cols` (<= the kernel's
/// width) columns of C from `kc` steps of a panel of A and of B's rows.
/// With `carry`, the block adds to what C holds (the sums of the earlier
/// slices of k); else it starts from zero.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Block {
    panel: *const f32,
    kc: usize,
    b: *const f32,
    ldb: usize,
    cols: usize,
    rows: usize,
    c: *mut f32,
    ldc: usize,
    carry: bool,
}

/// The product on raw operands, in slices of k and strips of A (see the
/// module's comment).
///
/// # Safety
/// The kernel's instructions are present, and the operands hold what
/// [`check`] asks of them.
unsafe fn raw(
    kernel: Kernel,
    a: &[f32],
    (m, k, n): (usize, usize, usize),
    (b, ldb): (*const f32, usize),
    (c, ldc): (*mut f32, usize),
) {
    let (nr, panels) = (kernel.nr(), m.div_ceil(MR));
    for k0 in (0..k).step_by(KC) {
        for p0 in (0..panels).step_by(MC_PANELS) {
            for j0 in (0..n).step_by(nr) {
                for p in p0..(p0 + MC_PANELS).min(panels) {
                    let block = Block {
                        panel: a.as_ptr().add(p * MR * k + k0 * MR),
                        kc: KC.min(k - k0),
                        b: b.add(k0 * ldb + j0),
                        ldb,
                        cols: (n - j0).min(nr),
                        rows: (m - p * MR).min(MR),
                        c: c.add(p * MR * ldc + j0),
                        ldc,
                        carry: k0 > 0,
                    };
                    run_block(kernel, &block);
                }
            }
        }
    }
}

/// One block by `kernel`.
///
/// # Safety
/// As [`raw`], for the block's operands.
unsafe fn run_block(kernel: Kernel, block: &Block) {
    #[cfg(target_arch = "x86_64")]
    match kernel {
        Kernel::Avx512 => x86::avx512_block(block),
        Kernel::Avx2 => x86::avx2_block(block),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kernel, block);
        unreachable!("the packed product runs on x86-64 only");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Block, MR};
    use std::arch::x86_64::*;

    /// A block with AVX-512F: 6 x 64, four masked vectors of 16 lanes a
    /// row.
    ///
    /// # Safety
    /// AVX-512F is present; the block's masked lanes lie inside the
    /// operands. The addresses of vectors whose lanes are all masked off
    /// are formed with wrapping arithmetic (they may lie past the
    /// operands; nothing is read or written there).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512_block(blk: &Block) {
        let masks: [__mmask16; 4] = std::array::from_fn(|v| {
            let lanes = blk.cols.saturating_sub(16 * v).min(16);
            ((1u32 << lanes) - 1) as __mmask16
        });
        let c_at = |r: usize, v: usize| blk.c.wrapping_add(r * blk.ldc + 16 * v);
        let mut acc = [[_mm512_setzero_ps(); 4]; MR];
        if blk.carry {
            for (r, acc_row) in acc.iter_mut().enumerate().take(blk.rows) {
                for (v, slot) in acc_row.iter_mut().enumerate() {
                    *slot = _mm512_maskz_loadu_ps(masks[v], c_at(r, v));
                }
            }
        }
        for kk in 0..blk.kc {
            let row = blk.b.wrapping_add(kk * blk.ldb);
            let bv: [__m512; 4] =
                std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], row.wrapping_add(16 * v)));
            let a = blk.panel.add(kk * MR);
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r));
                for (v, slot) in acc_row.iter_mut().enumerate() {
                    *slot = _mm512_fmadd_ps(av, bv[v], *slot);
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate().take(blk.rows) {
            for (v, slot) in acc_row.iter().enumerate() {
                _mm512_mask_storeu_ps(c_at(r, v), masks[v], *slot);
            }
        }
    }

    /// A block with AVX2 and FMA: 6 x 16, two vectors of 8 lanes a row;
    /// a block narrower than 16 columns reads and writes through lane
    /// masks, a whole one without.
    ///
    /// # Safety
    /// AVX2 and FMA are present; as [`avx512_block`] for the operands.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2_block(blk: &Block) {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let masks: [__m256i; 2] = std::array::from_fn(|v| {
            let lanes = blk.cols.saturating_sub(8 * v).min(8) as i32;
            _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), lane)
        });
        let whole = blk.cols == 16;
        let load = |at: *const f32, v: usize| match whole {
            true => _mm256_loadu_ps(at),
            false => _mm256_maskload_ps(at, masks[v]),
        };
        let c_at = |r: usize, v: usize| blk.c.wrapping_add(r * blk.ldc + 8 * v);
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        if blk.carry {
            for (r, acc_row) in acc.iter_mut().enumerate().take(blk.rows) {
                for (v, slot) in acc_row.iter_mut().enumerate() {
                    *slot = load(c_at(r, v), v);
                }
            }
        }
        for kk in 0..blk.kc {
            let row = blk.b.wrapping_add(kk * blk.ldb);
            let bv: [__m256; 2] = std::array::from_fn(|v| load(row.wrapping_add(8 * v), v));
            let a = blk.panel.add(kk * MR);
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(r));
                for (v, slot) in acc_row.iter_mut().enumerate() {
                    *slot = _mm256_fmadd_ps(av, bv[v], *slot);
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate().take(blk.rows) {
            for (v, slot) in acc_row.iter().enumerate() {
                match whole {
                    true => _mm256_storeu_ps(c_at(r, v), *slot),
                    false => _mm256_maskstore_ps(c_at(r, v), masks[v], *slot),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Padded strides hold a row and are a whole, odd number of lines.
    #[test]
    fn row_strides_are_an_odd_number_of_lines() {
        for n in (0..600).chain([4096, 16384, 65536 + 5]) {
            let ld = row_stride(n);
            assert!(
                ld >= n && ld.is_multiple_of(16) && !(ld / 16).is_multiple_of(2),
                "{n}: {ld}"
            );
            assert!(ld < n + 32, "{n}: {ld} pads by less than two lines");
        }
    }

    /// Every kernel this machine runs against a float64 product, for
    /// shapes with partial panels and partial column blocks, strided B and
    /// C, k = 1, and k over several slices with A over several strips; and
    /// the kernels against each other, bit for bit (one multiply-add chain
    /// per element whatever the kernel).
    #[test]
    fn matches_a_plain_product() {
        let kernels: Vec<Kernel> = [Kernel::Avx512, Kernel::Avx2]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect();
        if kernels.is_empty() {
            crate::skipped::report_skip("no AVX2 or AVX-512 on this machine (the packed product)");
            return;
        }
        // (600, 128, 70) and (8, 64, 9000) are large enough for
        // product_on_cores to split them: along the rows (n < m), and
        // along the columns. (100, 700, 37) takes three slices of k
        // (the last partial) and two strips of A.
        for (m, k, n, ldb, ldc) in [
            (13, 37, 150, 160, 151),
            (6, 1, 64, 64, 64),
            (1, 8, 5, 9, 7),
            (64, 64, 16, 16, 16),
            (600, 128, 70, 70, 80),
            (8, 64, 9000, 9000, 9000),
            (100, 700, 37, 40, 45),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let b: Vec<f32> = (0..k * ldb)
                .map(|i| ((i * 13 % 97) as f32 - 48.0) / 30.0)
                .collect();
            let mut packed = vec![f32::NAN; packed_len(m, k)];
            pack(&a, (m, k), &mut packed);
            let mut split = vec![7.0f32; (m - 1) * ldc + n];
            product_on_cores(&packed, (m, k, n), (&b, ldb), (&mut split, ldc));
            // B row-major (k x n) packed by columns, and A packed from its
            // transpose (k x m, rows m + 3 apart).
            let dense: Vec<f32> = (0..k * n).map(|i| b[i / n * ldb + i % n]).collect();
            let mut b_panels = vec![f32::NAN; packed_columns_len(k, n)];
            pack_columns(&dense, (k, n), &mut b_panels);
            let a_t: Vec<f32> = (0..k * (m + 3))
                .map(|i| match i % (m + 3) {
                    row if row < m => a[row * k + i / (m + 3)],
                    _ => f32::NAN,
                })
                .collect();
            let mut from_t = vec![f32::NAN; packed_len(m, k)];
            pack_transposed((&a_t, m + 3), (m, k), &mut from_t);
            assert!(from_t == packed, "{m}x{k}: A packed from its transpose");
            for &kernel in &kernels {
                let mut c = vec![7.0f32; split.len()];
                product_with(kernel, &packed, (m, k, n), (&b, ldb), (&mut c, ldc));
                assert!(
                    c == split,
                    "{m}x{k}x{n} {kernel:?}: against the split on the best kernel"
                );
                let mut c = vec![7.0f32; split.len()];
                product_packed_with(kernel, &packed, (m, k, n), &b_panels, (&mut c, ldc));
                assert!(
                    c == split,
                    "{m}x{k}x{n} {kernel:?}: B packed by columns against the split"
                );
            }
            for i in 0..m {
                for j in 0..ldc.min(split.len() - i * ldc) {
                    let got = split[i * ldc + j];
                    if j >= n {
                        assert_eq!(got, 7.0, "({i}, {j}) past n written");
                        continue;
                    }
                    let want: f64 = (0..k)
                        .map(|kk| a[i * k + kk] as f64 * b[kk * ldb + j] as f64)
                        .sum();
                    assert!(
                        (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
