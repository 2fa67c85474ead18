//! The forward steps but the taps: preprocess, bias_act, bias_act_pool, pool.

use super::*;
use crate::ops::feature::Criterion;
use crate::ops::perceptual::config::InputNorm;
use crate::ops::perceptual::cpu;
use crate::ops::perceptual::cuda::schedule::*;
use crate::tensor::{DType, Shape};
use crate::vgg::{Pooling, INPUT_CHANNELS};

#[test]
fn preprocess_matches_cpu_preprocess() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(11);
    for (in_dtype, compute) in [
        (DType::F32, DType::F32),
        (DType::F16, DType::BF16),
        (DType::BF16, DType::F16),
        (DType::F32, DType::BF16),
    ] {
        for (c, norm) in [(3, InputNorm::Imagenet), (1, InputNorm::ImagenetFromPm1)] {
            let s = Shape::new(2, c, 5, 7);
            let hw = s.h * s.w;
            let (pred, target) = (
                rng.values(s.n * c * hw, in_dtype),
                rng.values(s.n * c * hw, in_dtype),
            );
            let out_dims = (INPUT_CHANNELS, s.h, s.w);
            let mut arena = Arena::new(&[
                s.n * c * hw * in_dtype.size(),
                s.n * c * hw * in_dtype.size(),
                2 * s.n * hw * INPUT_CHANNELS * compute.size(),
            ]);
            arena.put(0, in_dtype, &pred);
            arena.put(1, in_dtype, &target);
            let mut setup = Setup::new(compute, Pooling::Max, Criterion::Mse, None);
            setup.spec.norm = norm;
            setup.call.io.shape = s;
            setup.call.io.dtype = in_dtype;
            setup.call.io.inputs = [arena.addr(0), arena.addr(1)];
            setup.run(
                emu,
                &arena,
                Step::Preprocess(Preprocess {
                    out: 2,
                    pairs: true,
                }),
            );
            // cpu::preprocess per image of pred, then of target, padded to 8 channels.
            let mut want = Vec::new();
            let mut scale = Vec::new();
            for image in pred.chunks_exact(c * hw).chain(target.chunks_exact(c * hw)) {
                let planes = cpu::preprocess(image, c, hw, norm).unwrap();
                let mut padded = vec![0.0; INPUT_CHANNELS * hw];
                let mut size = vec![0.0; INPUT_CHANNELS * hw];
                for ch in 0..3 {
                    let (a, b) = norm.affine(ch);
                    for p in 0..hw {
                        padded[ch * hw + p] = round_to(compute, planes[ch * hw + p]);
                        let x = image[if c == 1 { p } else { ch * hw + p }];
                        size[ch * hw + p] = ((x as f64 * a).abs() + b.abs()) as f32;
                    }
                }
                want.extend(to_nhwc(&padded, 1, out_dims));
                scale.extend(to_nhwc(&size, 1, out_dims));
            }
            let got = arena.get(2, compute, want.len());
            let what = format!("preprocess {s} {} -> {}", in_dtype.name(), compute.name());
            assert_each(&what, &got, &want, &scale, tolerance(compute));
        }
    }
}

#[test]
fn bias_act_matches_add_bias_and_relu() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(12);
    for dtype in DTYPES {
        for (relu, count, pred) in [(true, 3, 2), (false, 2, 2), (true, 2, 0)] {
            let dims = (16, 5, 3);
            let (c, h, w) = dims;
            let per = c * h * w;
            let x = rng.values(count * per, dtype);
            let bias = rng.uniform(c, -0.5, 0.5);
            let mut arena = Arena::new(&[count * per * dtype.size(), pred * per / 8 + 4]);
            arena.put(0, dtype, &x);
            let setup = Setup::new(dtype, Pooling::Max, Criterion::Mse, Some(&bias));
            let mask = (relu && pred > 0).then_some(1);
            let images = whole(0, count);
            let step = BiasAct {
                layer: 0,
                x: images,
                pred,
                bias: Some(0),
                relu,
                mask,
                dims,
            };
            setup.run(emu, &arena, Step::BiasAct(step));
            let chw = to_chw(&x, count, dims);
            let (want, want_mask) = bias_relu(&chw, count, dims, &bias, relu, dtype);
            let got = to_chw(&arena.get(0, dtype, count * per), count, dims);
            let what = format!("bias_act relu={relu} {} images {}", count, dtype.name());
            assert_each(&what, &got, &want, &[], tolerance(dtype));
            if mask.is_some() {
                let bits = mask_of(&arena, 1, pred * per);
                let want_bits = bools(&to_nhwc(&flags(&want_mask), count, dims)[..pred * per]);
                assert_eq!(bits, want_bits, "{what}: mask");
            }
        }
    }
}

#[test]
fn bias_act_pool_matches_add_bias_relu_and_pool() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(13);
    for dtype in DTYPES {
        for kind in [Pooling::Max, Pooling::Avg] {
            let (count, pred) = (3, 2);
            let (c, h, w) = EVEN;
            let pooled = (c, h / 2, w / 2);
            let (per, per_out) = (c * h * w, c * h / 2 * (w / 2));
            let x = rng.values(count * per, dtype);
            let bias = rng.uniform(c, -0.5, 0.5);
            let mut arena = Arena::new(&[
                count * per * dtype.size(),
                count * per_out * dtype.size(),
                pred * per / 8 + 4,
                pred * per_out / 4 + 8,
            ]);
            arena.put(0, dtype, &x);
            let setup = Setup::new(dtype, kind, Criterion::Mse, Some(&bias));
            let max = kind == Pooling::Max;
            let step = BiasActPool {
                layer: 0,
                x: whole(0, count),
                y: whole(1, count),
                pred,
                bias: Some(0),
                mask: Some(2),
                argmax: max.then_some(3),
                input: EVEN,
            };
            setup.run(emu, &arena, Step::BiasActPool(step));
            let (act, mask) = bias_relu(&to_chw(&x, count, EVEN), count, EVEN, &bias, true, dtype);
            let (want, argmax) = pool_ref(&act, count, EVEN, kind, dtype);
            let got = to_chw(&arena.get(1, dtype, count * per_out), count, pooled);
            let what = format!("bias_act_pool {kind:?} {}", dtype.name());
            assert_each(&what, &got, &want, &[], tolerance(dtype));
            let bits = mask_of(&arena, 2, pred * per);
            let want_bits = bools(&to_nhwc(&flags(&mask), count, EVEN)[..pred * per]);
            assert_eq!(bits, want_bits, "{what}: mask");
            if max {
                let got = argmax_of(&arena, 3, pred * per_out);
                let want = argmax_nhwc(&argmax, count, pooled);
                assert_eq!(got, want[..pred * per_out], "{what}: argmax");
            }
        }
    }
}

#[test]
fn pool_matches_layers_pool_on_odd_sizes() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(14);
    for dtype in DTYPES {
        for kind in [Pooling::Max, Pooling::Avg] {
            let (count, pred) = (3, 1);
            let (c, h, w) = ODD;
            let pooled = (c, h / 2, w / 2);
            let (per, per_out) = (c * h * w, c * (h / 2) * (w / 2));
            let x = rng.values(count * per, dtype);
            let mut arena = Arena::new(&[
                count * per * dtype.size(),
                count * per_out * dtype.size(),
                pred * per_out / 4 + 8,
            ]);
            arena.put(0, dtype, &x);
            let max = kind == Pooling::Max;
            let step = Pool {
                layer: 4,
                x: whole(0, count),
                y: whole(1, count),
                pred,
                argmax: max.then_some(2),
                input: ODD,
            };
            Setup::new(dtype, kind, Criterion::Mse, None).run(emu, &arena, Step::Pool(step));
            let (want, argmax) = pool_ref(&to_chw(&x, count, ODD), count, ODD, kind, dtype);
            let got = to_chw(&arena.get(1, dtype, count * per_out), count, pooled);
            let what = format!("pool {kind:?} {}", dtype.name());
            assert_each(&what, &got, &want, &[], tolerance(dtype));
            if max {
                let got = argmax_of(&arena, 2, pred * per_out);
                let want = argmax_nhwc(&argmax, count, pooled);
                assert_eq!(got, want[..pred * per_out], "{what}: argmax");
            }
        }
    }
}
