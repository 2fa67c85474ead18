//! Products C = A B whose A (a layer's transformed filters) is packed once,
//! when the filters are first used, and whose B (the transformed image
//! tiles) is read where it lies: a general matrix product packs both of
//! its operands on every call, which for VGG's per-image products cost
//! more time than the multiply-adds (docs/performance.md).
//!
//! The kernel holds a block of 6 rows x 64 columns of C in 24 AVX-512
//! registers and runs along k: per step one broadcast of each of the 6
//! packed A values, four 16-lane loads of B's row, 24 fused multiply-adds.
//! Sums run in a fixed order, so results are the same run to run. Without
//! AVX-512 the caller keeps the unpacked filters and the general product.

/// Rows of A, and of C, per kernel block.
const MR: usize = 6;

/// Columns of C per kernel block (four 16-lane vectors).
const NR: usize = 64;

/// Whether this machine runs the packed kernel.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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

/// An error unless the operands of C (m x n, rows `ldc` apart) = A B hold
/// what the product reads and writes: A packed from m x k (k > 0), B k x n
/// with rows `ldb` apart.
fn check(
    a: &[f32],
    (m, k, n): (usize, usize, usize),
    (b, ldb): (&[f32], usize),
    (c, ldc): (&[f32], usize),
) {
    assert!(k > 0 && a.len() >= packed_len(m, k) && available());
    assert!(n == 0 || (ldb >= n && b.len() >= (k - 1) * ldb + n));
    assert!(n == 0 || m == 0 || (ldc >= n && c.len() >= (m - 1) * ldc + n));
}

/// C (m x n, rows `ldc` apart) = A B: A packed by [`pack`] from m x k, B
/// k x n with rows `ldb` apart. On one thread; only where [`available`].
pub(crate) fn product(
    a: &[f32],
    shape: (usize, usize, usize),
    (b, ldb): (&[f32], usize),
    (c, ldc): (&mut [f32], usize),
) {
    check(a, shape, (b, ldb), (c, ldc));
    // SAFETY: checked above: AVX-512 is present and the operands hold
    // every element the product touches.
    unsafe { raw(a, shape, (b.as_ptr(), ldb), (c.as_mut_ptr(), ldc)) }
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
    check(a, (m, k, n), (b, ldb), (c, ldc));
    let by_columns = n >= m;
    let (len, unit) = if by_columns { (n, NR) } else { (m, MR) };
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
                true => raw(a, (m, k, size), (b.add(start), ldb), (c.add(start), ldc)),
                false => {
                    let a = &a[start * k..];
                    raw(a, (size, k, n), (b, ldb), (c.add(start * ldc), ldc))
                }
            }
        }
    };
    crate::ops::parts::run_parts(len.div_ceil(block), &|t| run(t * block));
}

/// The product on raw operands.
///
/// # Safety
/// AVX-512 is present, and the operands hold what [`check`] asks of them.
unsafe fn raw(
    a: &[f32],
    shape: (usize, usize, usize),
    b: (*const f32, usize),
    c: (*mut f32, usize),
) {
    #[cfg(target_arch = "x86_64")]
    avx512::product(a, shape, b, c);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, shape, b, c);
        unreachable!("the packed product runs on x86-64 only");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// See [`super::product`].
    ///
    /// # Safety
    /// AVX-512F is present; the operands hold what the caller checked.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product(
        a: &[f32],
        (m, k, n): (usize, usize, usize),
        (b, ldb): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
    ) {
        for j0 in (0..n).step_by(NR) {
            // Lanes of each of the four vectors that lie inside C.
            let cols = (n - j0).min(NR);
            let masks: [__mmask16; 4] = std::array::from_fn(|v| {
                let lanes = cols.saturating_sub(16 * v).min(16);
                ((1u32 << lanes) - 1) as __mmask16
            });
            for p in 0..m.div_ceil(MR) {
                let panel = a.as_ptr().add(p * MR * k);
                let rows = (m - p * MR).min(MR);
                let c = c.add(p * MR * ldc + j0);
                block(panel, k, b.add(j0), ldb, masks, rows, c, ldc);
            }
        }
    }

    /// One MR x NR block of C from a panel of A and k rows of B from `b`.
    ///
    /// # Safety
    /// As [`product`]: `rows` <= MR rows of C and the masked lanes of B's
    /// rows lie inside the operands. The addresses of vectors whose lanes
    /// are all masked off are formed with wrapping arithmetic (they may lie
    /// past the operands; nothing is read or written there).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        panel: *const f32,
        k: usize,
        b: *const f32,
        ldb: usize,
        masks: [__mmask16; 4],
        rows: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; MR];
        for kk in 0..k {
            let row = b.wrapping_add(kk * ldb);
            let bv: [__m512; 4] =
                std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], row.wrapping_add(16 * v)));
            let a = panel.add(kk * MR);
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r));
                for (v, slot) in acc_row.iter_mut().enumerate() {
                    *slot = _mm512_fmadd_ps(av, bv[v], *slot);
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate().take(rows) {
            for (v, slot) in acc_row.iter().enumerate() {
                let at = c.wrapping_add(r * ldc + 16 * v);
                _mm512_mask_storeu_ps(at, masks[v], *slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a float64 product, for shapes with partial panels and
    /// partial column blocks, strided B and C, and k = 1.
    #[test]
    fn matches_a_plain_product() {
        if !available() {
            crate::skipped::report_skip("no AVX-512 on this machine (the packed product)");
            return;
        }
        // The last two are large enough for product_on_cores to split
        // them: along the rows (n < m), and along the columns.
        for (m, k, n, ldb, ldc) in [
            (13, 37, 150, 160, 151),
            (6, 1, 64, 64, 64),
            (1, 8, 5, 9, 7),
            (64, 64, 16, 16, 16),
            (600, 128, 70, 70, 80),
            (8, 64, 9000, 9000, 9000),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let b: Vec<f32> = (0..k * ldb)
                .map(|i| ((i * 13 % 97) as f32 - 48.0) / 30.0)
                .collect();
            let mut packed = vec![f32::NAN; packed_len(m, k)];
            pack(&a, (m, k), &mut packed);
            let mut c = vec![7.0f32; (m - 1) * ldc + n];
            product(&packed, (m, k, n), (&b, ldb), (&mut c, ldc));
            let mut split = vec![7.0f32; c.len()];
            product_on_cores(&packed, (m, k, n), (&b, ldb), (&mut split, ldc));
            assert!(c == split, "{m}x{k}x{n}: split across the cores");
            for i in 0..m {
                for j in 0..ldc.min(c.len() - i * ldc) {
                    let got = c[i * ldc + j];
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
