//! Single-precision matrix product for the CPU convolutions, split across
//! the machine's cores.
//!
//! Each part is one single-threaded `matrixmultiply::sgemm` on a block of
//! rows or columns of the output. The split goes along the larger operand
//! (the weights for deep layers, the unfolded image for shallow ones), so
//! only the smaller one is packed once per part. This scales better on few
//! cores than matrixmultiply's own thread pool, which split the 64x64 VGG
//! benchmark's products with 1.3x on two cores (this split: see
//! docs/performance.md).

use crate::ops::cores;
use crate::ops::parts::run_parts;
use std::sync::Mutex;

/// Below this many multiply-adds per part a product is not split: handing
/// a part to another core and waiting for it costs microseconds.
pub(crate) const MIN_PART: usize = 1 << 21;

/// A matrix operand: base address and row/column strides in elements.
#[derive(Clone, Copy)]
struct Operand {
    ptr: usize,
    rs: isize,
    cs: isize,
}

impl Operand {
    /// The block that starts `rows` rows and `cols` columns in.
    fn at(self, rows: usize, cols: usize) -> Operand {
        let offset = rows as isize * self.rs + cols as isize * self.cs;
        Operand {
            ptr: self.ptr + (offset * 4) as usize,
            ..self
        }
    }
}

/// C (m x n) = A (m x k) B (k x n), one thread.
///
/// # Safety
/// The operands hold their blocks at the given strides; C's block is
/// written by no one else meanwhile.
unsafe fn part(m: usize, k: usize, n: usize, a: Operand, b: Operand, c: Operand) {
    matrixmultiply::sgemm(
        m,
        k,
        n,
        1.0,
        a.ptr as *const f32,
        a.rs,
        a.cs,
        b.ptr as *const f32,
        b.rs,
        b.cs,
        0.0,
        c.ptr as *mut f32,
        c.rs,
        c.cs,
    );
}

/// Whether a row-major matrix of `rows` x `cols` with row stride `ld`
/// fits in `len` elements.
fn fits(len: usize, rows: usize, cols: usize, ld: usize) -> bool {
    ld >= cols && (rows == 0 || cols == 0 || len >= (rows - 1) * ld + cols)
}

/// C = A B with row-major A (m x k), B (k x n, rows `ldb` apart) and C
/// (m x n, rows `ldc` apart); `a_t` reads A transposed from a row-major
/// k x m array.
pub(crate) fn sgemm(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    a_t: bool,
    (b, ldb): (&[f32], usize),
    (c, ldc): (&mut [f32], usize),
) {
    assert!(a.len() >= m * k && fits(b.len(), k, n, ldb) && fits(c.len(), m, n, ldc));
    let (rs, cs) = if a_t {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let a = Operand {
        ptr: a.as_ptr() as usize,
        rs,
        cs,
    };
    let b = Operand {
        ptr: b.as_ptr() as usize,
        rs: ldb as isize,
        cs: 1,
    };
    let c = Operand {
        ptr: c.as_mut_ptr() as usize,
        rs: ldc as isize,
        cs: 1,
    };
    // Split the output along the dimension of the larger operand, in
    // blocks that are multiples of 16 (the microkernels' widths).
    let along_rows = m * k >= k * n;
    let len = if along_rows { m } else { n };
    let parts = cores().min((m * k * n) / MIN_PART).min(len / 16).max(1);
    let block = len.div_ceil(parts).next_multiple_of(16);
    let run = |start: usize| {
        let size = block.min(len - start);
        // SAFETY: the asserts above bound every block; blocks of C are
        // disjoint between parts.
        unsafe {
            if along_rows {
                part(size, k, n, a.at(start, 0), b, c.at(start, 0));
            } else {
                part(m, k, size, a, b.at(0, start), c.at(0, start));
            }
        }
    };
    run_parts(len.div_ceil(block), &|t| run(t * block));
}

/// Runs `f(i, c_i)` for the `count` equal parts c_i of `c`, each of
/// `work` multiply-adds, shared among the cores (each part on one thread).
pub(crate) fn each_part(
    c: &mut [f32],
    count: usize,
    work: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    let len = c.len() / count.max(1);
    let parts = cores()
        .min(count.saturating_mul(work) / MIN_PART)
        .min(count)
        .max(1);
    let per_thread = count.div_ceil(parts);
    // One uncontended lock per part hands each its own block of c.
    let chunks: Vec<Mutex<&mut [f32]>> = (c.chunks_mut(per_thread * len.max(1)))
        .map(Mutex::new)
        .collect();
    run_parts(chunks.len(), &|t| {
        let mut chunk = chunks[t].lock().unwrap_or_else(|e| e.into_inner());
        for (i, c_i) in chunk.chunks_mut(len.max(1)).enumerate() {
            f(t * per_thread + i, c_i);
        }
    });
}

/// C_i = A_i B_i for `count` products of one shape, each operand the
/// i-th of `count` contiguous row-major matrices (A m x k, B k x n, C m x
/// n), on one thread each.
pub(crate) fn sgemm_batch(
    count: usize,
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) {
    assert!(a.len() >= count * m * k && b.len() >= count * k * n && c.len() == count * m * n);
    each_part(c, count, m * k * n, |i, c_i| {
        let at = |base: &[f32], len: usize, rs: usize| Operand {
            ptr: base[i * len..].as_ptr() as usize,
            rs: rs as isize,
            cs: 1,
        };
        let c_op = Operand {
            ptr: c_i.as_mut_ptr() as usize,
            rs: n as isize,
            cs: 1,
        };
        // SAFETY: the assert bounds every product's operands; c_i is this
        // product's alone.
        unsafe { part(m, k, n, at(a, m * k, k), at(b, k * n, n), c_op) };
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a float64 triple loop, for shapes that split along rows,
    /// along columns, and not at all, with and without a transposed A.
    #[test]
    fn matches_a_plain_product() {
        for (m, k, n) in [(512, 300, 64), (64, 27, 4096), (5, 7, 3), (130, 9, 2000)] {
            for a_t in [false, true] {
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                    .collect();
                let b: Vec<f32> = (0..k * n)
                    .map(|i| ((i * 53) % 97) as f32 / 48.0 - 1.0)
                    .collect();
                let mut c = vec![f32::NAN; m * n];
                sgemm((m, k, n), &a, a_t, (&b, n), (&mut c, n));
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|l| {
                                let av = if a_t { a[l * m + i] } else { a[i * k + l] };
                                av as f64 * b[l * n + j] as f64
                            })
                            .sum();
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{m}x{k}x{n} a_t={a_t} at ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
