//! The Gram steps: gram (with and without slices) and gram_backward,
//! against `cpu::gram` on the same (rounded) features.

use super::*;
use crate::ops::perceptual::cpu::gram::{gram, gram_backward};

/// Channel counts that fill 32-wide tiles, and one that does not.
const CASES: [(usize, usize, usize); 2] = [(64, 5, 9), (40, 3, 7)];

#[test]
fn gram_matches_the_cpu_gram_and_is_symmetric_to_the_bit() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(31);
    for dtype in DTYPES {
        for dims in CASES {
            for slices in [1, 2] {
                let (c, h, w) = dims;
                let (n, m) = (2, h * w);
                let per = c * m;
                let (p, t) = (rng.values(n * per, dtype), rng.values(n * per, dtype));
                let grams = 2 * n * c * c * 4;
                let v = dtype.size();
                let mut arena = Arena::new(&[n * per * v, n * per * v, grams, slices * grams]);
                arena.put(0, dtype, &p);
                arena.put(1, dtype, &t);
                let step = Gram {
                    layer: 3,
                    pred: whole(0, n),
                    target: Some(whole(1, n)),
                    dims,
                    slices,
                    partial: (slices > 1).then_some(3),
                    out: 2,
                };
                let setup = Setup::new(dtype, Pooling::Max, Criterion::Mse, None);
                setup.run(emu, &arena, Step::Gram(step));
                let got = arena.get(2, DType::F32, 2 * n * c * c);
                let what = format!("gram {} {dims:?} slices {slices}", dtype.name());
                let chw: Vec<f32> = [to_chw(&p, n, dims), to_chw(&t, n, dims)].concat();
                for (k, image) in chw.chunks_exact(per).enumerate() {
                    let want = gram(image, c, m).unwrap();
                    // Relative to the size of the products summed.
                    let abs: Vec<f32> = image.iter().map(|v| v.abs()).collect();
                    let scale = gram(&abs, c, m).unwrap();
                    let g = &got[k * c * c..(k + 1) * c * c];
                    assert_each(&format!("{what} image {k}"), g, &want, &scale, 1e-5);
                    for i in 0..c {
                        for j in 0..c {
                            assert_eq!(g[i * c + j].to_bits(), g[j * c + i].to_bits(), "{what}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn gram_backward_matches_the_cpu_gradient() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(32);
    for dtype in DTYPES {
        for dims in CASES {
            for accumulate in [false, true] {
                let (c, h, w) = dims;
                let (n, m) = (2, h * w);
                let per = c * m;
                let f = rng.values(n * per, dtype);
                // Not symmetric, so the transpose term counts.
                let e = rng.uniform(n * c * c, -1.0, 1.0);
                let old = rng.values(n * per, dtype);
                let v = dtype.size();
                let mut arena = Arena::new(&[n * c * c * 4, n * per * v, n * per * v]);
                arena.put(0, DType::F32, &e);
                arena.put(1, dtype, &f);
                arena.put(2, dtype, &old);
                let step = GramBackward {
                    layer: 3,
                    e: 0,
                    x: whole(1, n),
                    dims,
                    grad: 2,
                    accumulate,
                };
                let setup = Setup::new(dtype, Pooling::Max, Criterion::Mse, None);
                setup.run(emu, &arena, Step::GramBackward(step));
                let got = to_chw(&arena.get(2, dtype, n * per), n, dims);
                let (f, old) = (to_chw(&f, n, dims), to_chw(&old, n, dims));
                let what = format!(
                    "gram_backward {} {dims:?} accumulate {accumulate}",
                    dtype.name()
                );
                for k in 0..n {
                    let r = k * per..(k + 1) * per;
                    let mut want = vec![0f32; per];
                    gram_backward(
                        &e[k * c * c..(k + 1) * c * c],
                        &f[r.clone()],
                        c,
                        m,
                        &mut want,
                    )
                    .unwrap();
                    let abs_e: Vec<f32> = e[k * c * c..(k + 1) * c * c]
                        .iter()
                        .map(|v| v.abs())
                        .collect();
                    let abs_f: Vec<f32> = f[r.clone()].iter().map(|v| v.abs()).collect();
                    let mut scale = vec![0f32; per];
                    gram_backward(&abs_e, &abs_f, c, m, &mut scale).unwrap();
                    if accumulate {
                        for (i, (w, s)) in want.iter_mut().zip(&mut scale).enumerate() {
                            *w += old[r.start + i];
                            *s += old[r.start + i].abs();
                        }
                    }
                    let want: Vec<f32> = want.into_iter().map(|v| round_to(dtype, v)).collect();
                    let tol = tolerance(dtype).max(1e-5);
                    assert_each(&format!("{what} image {k}"), &got[r], &want, &scale, tol);
                }
            }
        }
    }
}
