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

/// Row-major `a` (m x k) packed into `out` (`packed_len` floats): panel
/// p holds rows p MR.. p MR + MR - 1, k-major, the MR values of one k
/// together.
pub(crate) fn pack(a: &[f32], (m, k): (usize, usize), out: &mut [f32]) {
    for (p, panel) in out.chunks_exact_mut(MR * k).enumerate() {
        for kk in 0..k {
            for r in 0..MR {
                let row = p * MR + r;
                panel[kk * MR + r] = if row < m { a[row * k + kk] } else { 0.0 };
            }
        }
    }
}

/// C (m x n, rows `ldc` apart) = A B: A packed by [`pack`] from m x k, B
/// k x n with rows `ldb` apart. Only where [`available`].
pub(crate) fn product(
    a: &[f32],
    (m, k, n): (usize, usize, usize),
    (b, ldb): (&[f32], usize),
    (c, ldc): (&mut [f32], usize),
) {
    assert!(a.len() >= packed_len(m, k) && available());
    assert!(n == 0 || (ldb >= n && b.len() >= (k - 1) * ldb + n));
    assert!(n == 0 || m == 0 || (ldc >= n && c.len() >= (m - 1) * ldc + n));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512 is present (asserted), and the asserts bound every
    // access the blocks make.
    unsafe {
        avx512::product(a, (m, k, n), (b, ldb), (c, ldc))
    }
}

/// [`product`] with the columns of C shared among the cores (in whole
/// kernel blocks), for one large product.
pub(crate) fn product_on_cores(
    a: &[f32],
    (m, k, n): (usize, usize, usize),
    (b, ldb): (&[f32], usize),
    (c, ldc): (&mut [f32], usize),
) {
    let parts = crate::ops::cores()
        .min(m * k * n / super::gemm::MIN_PART)
        .min(n / NR)
        .max(1);
    if parts == 1 {
        return product(a, (m, k, n), (b, ldb), (c, ldc));
    }
    assert!(m == 0 || (ldc >= n && c.len() >= (m - 1) * ldc + n));
    let block = n.div_ceil(parts).next_multiple_of(NR);
    let c_at = c.as_mut_ptr() as usize;
    let run = |j0: usize| {
        let cols = block.min(n - j0);
        let len = if m == 0 { 0 } else { (m - 1) * ldc + cols };
        // SAFETY: within `c` (asserted above); the parts' columns are
        // disjoint, so no element is written by two of them.
        let c = unsafe { std::slice::from_raw_parts_mut((c_at as *mut f32).add(j0), len) };
        product(a, (m, k, cols), (&b[j0..], ldb), (c, ldc));
    };
    std::thread::scope(|scope| {
        for j0 in (block..n).step_by(block) {
            scope.spawn(move || run(j0));
        }
        run(0);
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// See [`super::product`].
    ///
    /// # Safety
    /// AVX-512F is present; the operands hold what the caller asserted.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product(
        a: &[f32],
        (m, k, n): (usize, usize, usize),
        (b, ldb): (&[f32], usize),
        (c, ldc): (&mut [f32], usize),
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
                block(
                    panel,
                    k,
                    b.as_ptr().add(j0),
                    ldb,
                    masks,
                    rows,
                    c.as_mut_ptr().add(p * MR * ldc + j0),
                    ldc,
                );
            }
        }
    }

    /// One MR x NR block of C from a panel of A and k rows of B from `b`.
    ///
    /// # Safety
    /// As [`product`]: `rows` <= MR rows of C and the masked lanes of B's
    /// rows lie inside the operands.
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
            let row = b.add(kk * ldb);
            let bv: [__m512; 4] =
                std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], row.add(16 * v)));
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
                _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), masks[v], *slot);
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
        for (m, k, n, ldb, ldc) in [
            (13, 37, 150, 160, 151),
            (6, 1, 64, 64, 64),
            (1, 8, 5, 9, 7),
            (64, 64, 16, 16, 16),
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
