//! The backward steps: relu_backward, unpool, input_grad.

use super::*;
use crate::ops::feature::Criterion;
use crate::ops::perceptual::config::InputNorm;
use crate::ops::perceptual::cpu::{self, layers};
use crate::ops::perceptual::cuda::schedule::*;
use crate::tensor::{DType, Shape};
use crate::vgg::{Pooling, INPUT_CHANNELS};

/// The reference of a ReLU's backward on CHW gradients: + `before`,
/// `layers::relu_backward`, + `after`, rounded to `dtype`.
fn relu_backward_ref(
    g: &[f32],
    before: Option<&[f32]>,
    mask: &[bool],
    after: Option<&[f32]>,
    dtype: DType,
) -> Vec<f32> {
    let mut v = g.to_vec();
    if let Some(b) = before {
        v.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    }
    layers::relu_backward(&mut v, mask);
    if let Some(b) = after {
        v.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    }
    v.into_iter().map(|x| round_to(dtype, x)).collect()
}

#[test]
fn relu_backward_matches_layers_relu_backward() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(17);
    for dtype in DTYPES {
        for (with_before, with_after) in [(true, true), (false, false), (true, false)] {
            let n = 3;
            let dims = (16, 3, 5);
            let per = dims.0 * dims.1 * dims.2;
            let g = rng.values(n * per, dtype);
            let (before, after) = (rng.values(n * per, dtype), rng.values(n * per, dtype));
            let mask: Vec<bool> = (0..n * per).map(|_| rng.below(2) == 1).collect();
            let v = dtype.size();
            let mut arena = Arena::new(&[n * per * v, n * per * v, n * per / 8 + 4, n * per * v]);
            arena.put(0, dtype, &g);
            arena.put(1, dtype, &before);
            arena.put_bytes(2, &pack_bits(&mask));
            arena.put(3, dtype, &after);
            let mut setup = Setup::new(dtype, Pooling::Max, Criterion::Mse, None);
            setup.call.io.shape = Shape::new(n, 3, 1, 1);
            let step = ReluBackward {
                layer: 1,
                g: 0,
                relu: ReluGrad {
                    before: with_before.then_some(1),
                    mask: 2,
                    after: with_after.then_some(3),
                },
                dims,
            };
            setup.run(emu, &arena, Step::ReluBackward(step));
            let chw = |x: &[f32]| to_chw(x, n, dims);
            let mask_chw = bools(&chw(&flags(&mask)));
            let (g, b, a) = (chw(&g), chw(&before), chw(&after));
            let want = relu_backward_ref(
                &g,
                with_before.then_some(&b[..]),
                &mask_chw,
                with_after.then_some(&a[..]),
                dtype,
            );
            let got = chw(&arena.get(0, dtype, n * per));
            // Sums of two or three terms may cancel: relative to their size.
            let size: Vec<f32> = (0..n * per)
                .map(|i| g[i].abs() + b[i].abs() + a[i].abs())
                .collect();
            let what = format!(
                "relu_backward before={with_before} after={with_after} {}",
                dtype.name()
            );
            assert_each(&what, &got, &want, &size, tolerance(dtype));
        }
    }
}

#[test]
fn unpool_matches_layers_pool_backward_and_the_relu_before() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(18);
    for dtype in DTYPES {
        for (kind, relu, dims) in [
            (Pooling::Max, true, ODD),
            (Pooling::Avg, false, EVEN),
            (Pooling::Max, false, EVEN),
        ] {
            let n = 2;
            let (c, h, w) = dims;
            let pooled = (c, h / 2, w / 2);
            let (per, per_out) = (c * h * w, c * (h / 2) * (w / 2));
            let gy = rng.values(n * per_out, dtype);
            let before = rng.values(n * per_out, dtype);
            let argmax: Vec<u8> = (0..n * per_out).map(|_| rng.below(4) as u8).collect();
            let relu_before = rng.values(n * per, dtype);
            let after = rng.values(n * per, dtype);
            let mask: Vec<bool> = (0..n * per).map(|_| rng.below(2) == 1).collect();
            let v = dtype.size();
            let mut arena = Arena::new(&[
                n * per_out * v,
                n * per_out * v,
                n * per * v,
                n * per_out / 4 + 8,
                n * per * v,
                n * per / 8 + 4,
                n * per * v,
            ]);
            arena.put(0, dtype, &gy);
            arena.put(1, dtype, &before);
            arena.put_bytes(3, &pack_argmax(&argmax));
            arena.put(4, dtype, &relu_before);
            arena.put_bytes(5, &pack_bits(&mask));
            arena.put(6, dtype, &after);
            let mut setup = Setup::new(dtype, kind, Criterion::Mse, None);
            setup.call.io.shape = Shape::new(n, 3, 1, 1);
            let max = kind == Pooling::Max;
            let step = Unpool {
                layer: 4,
                gy: 0,
                gx: 2,
                before: Some(1),
                argmax: max.then_some(3),
                relu: relu.then_some(ReluGrad {
                    before: Some(4),
                    mask: 5,
                    after: Some(6),
                }),
                input: dims,
            };
            setup.run(emu, &arena, Step::Unpool(step));
            // + before, layers::pool_backward per image, then the ReLU.
            let argmax_chw: Vec<u8> = to_chw(&flags_u8(&argmax), n, pooled)
                .iter()
                .map(|&v| v as u8)
                .collect();
            let unpool = |gy: &[f32]| {
                let g = to_chw(gy, n, pooled);
                let mut out = Vec::new();
                for i in 0..n {
                    let r = i * per_out..(i + 1) * per_out;
                    let mut dx = Vec::new();
                    layers::pool_backward(&g[r.clone()], c, h, w, kind, &argmax_chw[r], &mut dx)
                        .unwrap();
                    out.extend(dx);
                }
                out
            };
            let summed: Vec<f32> = gy.iter().zip(&before).map(|(a, b)| a + b).collect();
            let unpooled = unpool(&summed);
            let chw = |x: &[f32]| to_chw(x, n, dims);
            let (rb, af) = (chw(&relu_before), chw(&after));
            let want = if relu {
                let m = bools(&chw(&flags(&mask)));
                relu_backward_ref(&unpooled, Some(&rb), &m, Some(&af), dtype)
            } else {
                unpooled.iter().map(|&x| round_to(dtype, x)).collect()
            };
            // The size of what each element sums: |gy| + |before| unpooled
            // the same way, and the ReLU's terms.
            let magnitude: Vec<f32> = gy
                .iter()
                .zip(&before)
                .map(|(a, b)| a.abs() + b.abs())
                .collect();
            let size: Vec<f32> = unpool(&magnitude)
                .iter()
                .enumerate()
                .map(|(i, u)| u + if relu { rb[i].abs() + af[i].abs() } else { 0.0 })
                .collect();
            let got = chw(&arena.get(2, dtype, n * per));
            let what = format!("unpool {kind:?} relu={relu} {dims:?} {}", dtype.name());
            assert_each(&what, &got, &want, &size, tolerance(dtype));
        }
    }
}

#[test]
fn input_grad_matches_cpu_input_grad() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(19);
    for (compute, out_dtype) in [
        (DType::F32, DType::F32),
        (DType::BF16, DType::F32),
        (DType::F16, DType::F16),
        (DType::BF16, DType::BF16),
    ] {
        for (c, norm, beta) in [
            (3, InputNorm::Imagenet, 0.5),
            (1, InputNorm::ImagenetFromPm1, 0.0),
        ] {
            let s = Shape::new(2, c, 5, 3);
            let hw = s.h * s.w;
            let g_dims = (INPUT_CHANNELS, s.h, s.w);
            let g = rng.values(s.n * hw * INPUT_CHANNELS, compute);
            let old = rng.values(s.n * c * hw, out_dtype);
            let mut arena = Arena::new(&[
                s.n * hw * INPUT_CHANNELS * compute.size(),
                s.n * c * hw * out_dtype.size(),
            ]);
            arena.put(0, compute, &g);
            arena.put(1, out_dtype, &old);
            let mut setup = Setup::new(compute, Pooling::Max, Criterion::Mse, None);
            setup.spec.norm = norm;
            setup.call.io.shape = s;
            setup.call.io.dtype = out_dtype;
            setup.call.io.grad = Some(arena.addr(1));
            setup.call.io.beta = beta;
            setup.run(emu, &arena, Step::InputGrad(InputGrad { g: 0 }));
            let g_chw = to_chw(&g, s.n, g_dims);
            let mut want = Vec::new();
            let mut size = Vec::new();
            for i in 0..s.n {
                let image = &g_chw[i * INPUT_CHANNELS * hw..(i + 1) * INPUT_CHANNELS * hw];
                for ch in 0..c {
                    for p in 0..hw {
                        let v = cpu::input_grad(image, c, hw, norm, ch, p);
                        let o = old[(i * c + ch) * hw + p] as f64;
                        want.push(round_to(out_dtype, (beta as f64 * o + v) as f32));
                        let terms: f64 = (0..3)
                            .map(|k| (image[k * hw + p] as f64 * norm.affine(k).0).abs())
                            .sum();
                        size.push((terms + (beta as f64 * o).abs()) as f32);
                    }
                }
            }
            let got = arena.get(1, out_dtype, s.n * c * hw);
            let what = format!(
                "input_grad c={c} {} -> {}",
                compute.name(),
                out_dtype.name()
            );
            assert_each(&what, &got, &want, &size, tolerance(out_dtype));
        }
    }
}
