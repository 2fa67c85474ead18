//! Total-variation loss and gradient on the CPU, every variant, in f64.
//!
//! Each plane (one channel of one image) is read once, a row at a time, in
//! gather form: the slopes of a row's vertical differences are kept for the
//! next row, so every gradient element is written once and complete. Planes
//! are split across the cores; each plane's sum is its own, and the sums
//! are added in plane order afterwards, so the loss has the same bits for
//! any number of threads. The tests compare with f64 formulas written in
//! the scatter form (`tests/common`), which share no indexing with this.

use super::config::{TvConfig, TvVariant};
use crate::backend::{HostGrad, Values};
use crate::error::{Error, Result};
use crate::fallible;
use crate::ops::{cores, sign};
use crate::tensor::{Element, Shape};

/// Below this many elements per thread a call stays on one thread: a
/// thread costs tens of microseconds to start.
const MIN_PART: usize = 1 << 22;

/// Where one plane's gradient goes: `beta * old + scale * dTV/dx`.
struct PlaneGrad<'a, T> {
    values: &'a mut [T],
    beta: f32,
    scale: f64,
}

impl<T: Element> PlaneGrad<'_, T> {
    /// Writes row `i` from `raw`, its unscaled gradient.
    #[inline(always)]
    fn store_row(&mut self, i: usize, raw: &[f64]) {
        let w = raw.len();
        let out = &mut self.values[i * w..(i + 1) * w];
        let scale = self.scale;
        // Two loops, so that neither tests beta per element.
        match self.beta {
            0.0 => out
                .iter_mut()
                .zip(raw)
                .for_each(|(o, r)| *o = T::from_f64(scale * r)),
            beta => out.iter_mut().zip(raw).for_each(|(o, r)| {
                *o = T::from_f64(beta as f64 * o.to_f64() + scale * r);
            }),
        }
    }
}

/// One row's unscaled gradient into `out`: what reaches each element from
/// above (`above`) and from the left (`right[j - 1]`), less `here[j]`.
#[inline(always)]
fn combine(out: &mut [f64], above: &[f64], here: impl Fn(usize) -> f64, right: &[f64]) {
    out[0] = above[0] - here(0);
    let rest = out[1..].iter_mut().zip(&above[1..]).zip(right);
    for (j, ((o, a), left)) in rest.enumerate() {
        *o = a + left - here(j + 1);
    }
}

/// Independent partial sums, added in a fixed order at the end: the
/// compiler may not reorder one f64 sum, but it keeps these lanes in vector
/// registers, and the result has the same bits on every run and with any
/// vector width.
const LANES: usize = 8;

/// Adds `f(a[j], b[j])`'s value for every j into `acc` (lane j % LANES)
/// and stores its slope at `out[j]`. Fixed-size chunks let the compiler
/// drop the bounds checks and vectorise.
#[inline(always)]
fn accumulate(
    acc: &mut [f64; LANES],
    a: &[f64],
    b: &[f64],
    out: &mut [f64],
    f: impl Fn(f64, f64) -> (f64, f64),
) {
    let n = out.len();
    let (a, b) = (&a[..n], &b[..n]);
    let mut chunks = out.chunks_exact_mut(LANES);
    for ((o, a), b) in (&mut chunks)
        .zip(a.chunks_exact(LANES))
        .zip(b.chunks_exact(LANES))
    {
        for l in 0..LANES {
            let (value, slope) = f(a[l], b[l]);
            o[l] = slope;
            acc[l] += value;
        }
    }
    let full = n - n % LANES;
    for (l, o) in chunks.into_remainder().iter_mut().enumerate() {
        let (value, slope) = f(a[full + l], b[full + l]);
        *o = slope;
        acc[l] += value;
    }
}

/// Rows of one plane as f64, and the difference slopes of the row being
/// written and of the one above it.
struct Rows {
    row: Vec<f64>,
    below: Vec<f64>,
    down: Vec<f64>,
    right: Vec<f64>,
    prev: Vec<f64>,
    out: Vec<f64>,
}

impl Rows {
    fn new(w: usize) -> Result<Rows> {
        let row = || fallible::filled(w, 0.0f64, "a TV row");
        Ok(Rows {
            row: row()?,
            below: row()?,
            down: row()?,
            right: row()?,
            prev: row()?,
            out: row()?,
        })
    }
}

#[inline(always)]
fn load<T: Element>(dst: &mut [f64], src: &[T]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f64());
}

/// Runs one plane a row at a time and returns its sum; with `g`, writes
/// each row's gradient once complete: what reaches each element from above
/// (the row above's `down`) and from the left, less what leaves it.
/// `slopes(row, below, down, right, lanes)` fills, for a row and the one
/// below it (`None` on the last row), the slopes of the differences
/// leaving each element downwards and to the right (0 where there is
/// none), adding their values to the lanes.
#[inline(always)]
fn plane_rows<T: Element>(
    x: &[T],
    (h, w): (usize, usize),
    rows: &mut Rows,
    mut g: Option<PlaneGrad<'_, T>>,
    mut slopes: impl FnMut(&[f64], Option<&[f64]>, &mut [f64], &mut [f64], &mut [f64; LANES]),
) -> f64 {
    let Rows {
        row,
        below,
        down,
        right,
        prev,
        out,
    } = rows;
    let mut acc = [0.0; LANES];
    prev.fill(0.0);
    load(row, &x[..w]);
    for i in 0..h {
        let has_below = i + 1 < h;
        if has_below {
            load(below, &x[(i + 1) * w..(i + 2) * w]);
        }
        slopes(row, has_below.then_some(&below[..]), down, right, &mut acc);
        if let Some(g) = g.as_mut() {
            let (d, rt) = (&down[..w], &right[..w]);
            combine(out, prev, |j| d[j] + rt[j], rt);
            g.store_row(i, out);
        }
        std::mem::swap(prev, down);
        std::mem::swap(row, below);
    }
    acc.iter().sum()
}

/// The sum of phi over one plane's vertical and horizontal differences,
/// and its gradient. `phi(d, k)` is (value, slope), `k` the direction's
/// coefficient.
#[inline(always)]
fn separable_plane<T: Element>(
    x: &[T],
    (h, w): (usize, usize),
    (kh, kw): (f64, f64),
    rows: &mut Rows,
    g: Option<PlaneGrad<'_, T>>,
    phi: impl Fn(f64, f64) -> (f64, f64),
) -> f64 {
    plane_rows(x, (h, w), rows, g, |row, below, down, right, acc| {
        match below {
            Some(b) => accumulate(acc, b, row, down, |b, r| phi(b - r, kh)),
            None => down.fill(0.0),
        }
        accumulate(acc, &row[1..], row, &mut right[..w - 1], |next, r| {
            phi(next - r, kw)
        });
        right[w - 1] = 0.0; // no difference leaves the last column
    })
}

/// One plane's isotropic sum of sqrt(dh^2 + dw^2 + eps) over the
/// (H-1) x (W-1) positions with both differences, and its gradient: each
/// position sends dh/t down and dw/t right (nothing where the root is 0).
#[inline(always)]
fn isotropic_plane<T: Element>(
    x: &[T],
    (h, w): (usize, usize),
    eps: f64,
    rows: &mut Rows,
    g: Option<PlaneGrad<'_, T>>,
) -> f64 {
    plane_rows(x, (h, w), rows, g, |row, below, down, right, acc| {
        down.fill(0.0);
        right.fill(0.0);
        let Some(b) = below else { return };
        // The root couples both directions; it is not worth the chunked
        // form of `accumulate` (lane j % LANES, as there).
        for j in 0..w - 1 {
            let dh = b[j] - row[j];
            let dw = row[j + 1] - row[j];
            let t = (dh * dh + dw * dw + eps).sqrt();
            acc[j % LANES] += t;
            if t != 0.0 {
                down[j] = dh / t;
                right[j] = dw / t;
            }
        }
    })
}

/// One plane's sum, writing its gradient scaled by `scale` when `g` is
/// given. Compiled twice on x86-64: for the baseline (SSE2) and for AVX2,
/// chosen at run time; the lanes make both give the same bits.
fn plane<T: Element>(
    cfg: &TvConfig,
    x: &[T],
    s: Shape,
    rows: &mut Rows,
    g: Option<PlaneGrad<'_, T>>,
) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { plane_avx2(cfg, x, s, rows, g) };
    }
    plane_body(cfg, x, s, rows, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn plane_avx2<T: Element>(
    cfg: &TvConfig,
    x: &[T],
    s: Shape,
    rows: &mut Rows,
    g: Option<PlaneGrad<'_, T>>,
) -> f64 {
    plane_body(cfg, x, s, rows, g)
}

#[inline(always)]
fn plane_body<T: Element>(
    cfg: &TvConfig,
    x: &[T],
    s: Shape,
    rows: &mut Rows,
    g: Option<PlaneGrad<'_, T>>,
) -> f64 {
    let dims = (s.h, s.w);
    // The article's per-direction means; the other variants plain sums.
    let k = (
        2.0 / (s.c * (s.h - 1).max(1) * s.w) as f64,
        2.0 / (s.c * s.h * (s.w - 1).max(1)) as f64,
    );
    match cfg.variant {
        TvVariant::Article => separable_plane(x, dims, k, rows, g, |d, k| (k * d * d, 2.0 * k * d)),
        TvVariant::L1 => separable_plane(x, dims, k, rows, g, |d, _| (d.abs(), sign(d))),
        TvVariant::L2Squared | TvVariant::L2 => {
            separable_plane(x, dims, k, rows, g, |d, _| (d * d, 2.0 * d))
        }
        TvVariant::Isotropic => isotropic_plane(x, dims, cfg.eps as f64, rows, g),
    }
}

/// The loss of `x` and its per-image values; `grad`, when given, receives
/// `beta * grad + dL/dx`.
pub(crate) fn evaluate<T: Element>(
    cfg: &TvConfig,
    x: &[T],
    mut grad: Option<HostGrad<'_, T>>,
    s: Shape,
) -> Result<Values> {
    let weight = cfg.weight as f64;
    let batch_scale = cfg.reduction.batch_scale(s.n);
    // L2's gradient scale needs its image's root, so its sums come first
    // and its gradient in a second pass; the others write it at once.
    let l2 = cfg.variant == TvVariant::L2;
    let scale = vec![weight * batch_scale; s.n];
    let first_grad = if l2 { None } else { grad.as_mut() };
    let sums = run(cfg, x, s, first_grad, &scale)?;
    let score: Vec<f64> = sums
        .chunks_exact(s.c)
        .map(|planes| planes.iter().sum::<f64>())
        .map(|sum| if l2 { sum.sqrt() } else { sum })
        .collect();
    if let (true, Some(g)) = (l2, grad.as_mut()) {
        let root_scale = |root: f64| {
            if root != 0.0 {
                weight * batch_scale / (2.0 * root)
            } else {
                0.0
            }
        };
        let scale: Vec<f64> = score.iter().map(|&root| root_scale(root)).collect();
        run(cfg, x, s, Some(g), &scale)?;
    }
    let mut per_sample = fallible::with_capacity(s.n, "per-image TV values")?;
    per_sample.extend(score.iter().map(|v| weight * v));
    let loss = per_sample.iter().sum::<f64>() * batch_scale;
    Ok(Values {
        loss,
        per_sample,
        parts: None,
    })
}

/// Every plane's sum, in plane order, writing image n's gradient scaled by
/// `scale[n]` when `grad` is given. Consecutive runs of planes go to up to
/// all cores, each with the gradient planes it alone writes.
fn run<T: Element>(
    cfg: &TvConfig,
    x: &[T],
    s: Shape,
    grad: Option<&mut HostGrad<'_, T>>,
    scale: &[f64],
) -> Result<Vec<f64>> {
    let plane_len = s.h * s.w;
    let planes = s.n * s.c;
    let mut sums = fallible::filled(planes, 0.0f64, "per-plane TV sums")?;
    let mut grads: Vec<Option<&mut [T]>> =
        fallible::with_capacity(planes, "per-plane TV gradients")?;
    let beta = grad.as_ref().map_or(0.0, |g| g.beta);
    match grad {
        Some(g) => grads.extend(g.values.chunks_exact_mut(plane_len).map(Some)),
        None => grads.extend((0..planes).map(|_| None)),
    }
    let parts = cores()
        .min(planes)
        .min((planes * plane_len / MIN_PART).max(1));
    let per = planes.div_ceil(parts);
    let work = |first: usize, sums: &mut [f64], grads: &mut [Option<&mut [T]>]| -> Result<()> {
        let mut rows = Rows::new(s.w)?;
        for (k, (sum, g)) in sums.iter_mut().zip(grads.iter_mut()).enumerate() {
            let p = first + k;
            let g = g.take().map(|values| PlaneGrad {
                values,
                beta,
                scale: scale[p / s.c],
            });
            *sum = plane(cfg, &x[p * plane_len..(p + 1) * plane_len], s, &mut rows, g);
        }
        Ok(())
    };
    if parts == 1 {
        work(0, &mut sums, &mut grads)?;
        return Ok(sums);
    }
    let parts = sums.chunks_mut(per).zip(grads.chunks_mut(per)).enumerate();
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .map(|(k, (sums, grads))| scope.spawn(move || work(k * per, sums, grads)))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Error::Internal("a TV worker thread panicked".into())))
        })
    })?;
    Ok(sums)
}
