//! The steps that take a tap: tap_loss and bias_act_pool_tap.

use super::*;
use crate::ops::feature::Criterion;
use crate::ops::perceptual::cuda::schedule::*;
use crate::tensor::{DType, Shape};
use crate::vgg::Pooling;

use crate::backend::HostGrad;
use crate::ops::feature::cpu::distance_sum;

/// A tap's expected values: loss, per-image values and the gradient of
/// `f_pred` (CHW f32, rounded to `dtype`) against `f_target`, by
/// `feature::cpu::distance_sum` per image.
struct TapWant {
    loss: f64,
    per_sample: Vec<f64>,
    grad: Vec<f32>,
}

fn tap_ref(
    f_pred: &[f32],
    f_target: &[f32],
    n: usize,
    criterion: Criterion,
    weight: f32,
    batch: usize,
    dtype: DType,
) -> TapWant {
    let per = f_pred.len() / n;
    let scale = weight as f64 / (batch * per) as f64;
    let mut grad = vec![0f32; f_pred.len()];
    let mut per_sample = Vec::new();
    let mut total = 0.0;
    for i in 0..n {
        let r = i * per..(i + 1) * per;
        let g = HostGrad {
            values: &mut grad[r.clone()],
            beta: 0.0,
        };
        let sum = distance_sum(criterion, &f_pred[r.clone()], &f_target[r], Some(g), scale);
        per_sample.push(weight as f64 * sum / per as f64);
        total += sum / per as f64;
    }
    TapWant {
        loss: total * weight as f64 / batch as f64,
        per_sample,
        grad: grad.into_iter().map(|g| round_to(dtype, g)).collect(),
    }
}

/// Loss and per-sample outputs of a tap step, on the host, with old
/// values for the accumulating case.
struct TapOut {
    loss: f32,
    per_sample: Vec<f32>,
}

/// Asserts a tap's loss and per-image values (added to the old ones when
/// it accumulates) and its gradient (CHW, in `dtype`) match `want`.
fn assert_tap(
    what: &str,
    (got, grad, dtype): (&TapOut, &[f32], DType),
    want: &TapWant,
    (old_loss, old_per): (f32, &[f32]),
    accumulate: bool,
) {
    let tol = tolerance(dtype);
    assert_each(&format!("{what}: gradient"), grad, &want.grad, &[], tol);
    let base = if accumulate { old_loss as f64 } else { 0.0 };
    let want_loss = (base + want.loss) as f32;
    assert_each(
        &format!("{what}: loss"),
        &[got.loss],
        &[want_loss],
        &[],
        1e-5,
    );
    let want_per: Vec<f32> = want
        .per_sample
        .iter()
        .zip(old_per)
        .map(|(v, old)| (*v + if accumulate { *old as f64 } else { 0.0 }) as f32)
        .collect();
    assert_each(
        &format!("{what}: per sample"),
        &got.per_sample,
        &want_per,
        &[],
        1e-5,
    );
}

#[test]
fn tap_loss_matches_the_feature_distance() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(15);
    for dtype in DTYPES {
        for (criterion, in_place, accumulate) in
            [(Criterion::Mse, false, false), (Criterion::Mae, true, true)]
        {
            let (n, batch) = (3, 5); // a chunk of 3 images of a batch of 5
            let dims = (24, 5, 7);
            let per = dims.0 * dims.1 * dims.2;
            let (a, b) = (rng.values(n * per, dtype), rng.values(n * per, dtype));
            let mut arena = Arena::new(&[
                n * per * dtype.size(),
                n * per * dtype.size(),
                n * per * dtype.size(),
            ]);
            arena.put(0, dtype, &a);
            arena.put(1, dtype, &b);
            let old_per = rng.uniform(n, 0.0, 1.0);
            let mut out = TapOut {
                loss: 0.25,
                per_sample: old_per.clone(),
            };
            let mut setup = Setup::new(dtype, Pooling::Max, criterion, None);
            setup.call.io.shape = Shape::new(n, 3, 1, 1);
            setup.call.io.loss = &mut out.loss as *mut f32 as u64;
            setup.call.io.per_sample = Some(out.per_sample.as_mut_ptr() as u64);
            setup.call.batch = batch;
            let grad = if in_place { 0 } else { 2 };
            let weight = 0.75;
            let images = |buf| Images {
                buf,
                offset: 0,
                count: n,
            };
            let tap = TapTerm {
                grad: Some(grad),
                weight,
                accumulate,
                first: !accumulate,
                part: 0,
                part_accumulate: accumulate,
                norm: None,
            };
            let step = TapLoss {
                layer: 3,
                pred: images(0),
                target: images(1),
                dims,
                tap,
            };
            setup.run(emu, &arena, Step::TapLoss(step));
            let want = tap_ref(
                &to_chw(&a, n, dims),
                &to_chw(&b, n, dims),
                n,
                criterion,
                weight as f32,
                batch,
                dtype,
            );
            let what = format!(
                "tap_loss {criterion:?} in_place={in_place} {}",
                dtype.name()
            );
            let got = to_chw(&arena.get(grad, dtype, n * per), n, dims);
            let old = (0.25, &old_per[..]);
            assert_tap(&what, (&out, &got, dtype), &want, old, accumulate);
        }
    }
}

#[test]
fn bias_act_pool_tap_matches_bias_relu_pool_and_the_distance() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(16);
    for dtype in DTYPES {
        for (kind, criterion, in_place) in [
            (Pooling::Max, Criterion::Mse, true),
            (Pooling::Avg, Criterion::Mae, false),
        ] {
            let n = 2;
            let (c, h, w) = EVEN;
            let pooled = (c, h / 2, w / 2);
            let (per, per_out) = (c * h * w, c * (h / 2) * (w / 2));
            let (a, b) = (rng.values(n * per, dtype), rng.values(n * per, dtype));
            let bias = rng.uniform(c, -0.5, 0.5);
            let v = dtype.size();
            let mut arena = Arena::new(&[
                n * per * v,
                n * per * v,
                2 * n * per_out * v,
                n * per / 8 + 4,
                n * per_out / 4 + 8,
                n * per * v,
            ]);
            arena.put(0, dtype, &a);
            arena.put(1, dtype, &b);
            let mut out = TapOut {
                loss: f32::NAN,
                per_sample: vec![f32::NAN; n],
            };
            let mut setup = Setup::new(dtype, kind, criterion, Some(&bias));
            setup.call.io.shape = Shape::new(n, 3, 1, 1);
            setup.call.io.loss = &mut out.loss as *mut f32 as u64;
            setup.call.io.per_sample = Some(out.per_sample.as_mut_ptr() as u64);
            setup.call.batch = n;
            let max = kind == Pooling::Max;
            let grad = if in_place { 0 } else { 5 };
            let images = |buf, offset| Images {
                buf,
                offset,
                count: n,
            };
            let weight = 1.5;
            let step = BiasActPoolTap {
                layer: 3,
                pred: images(0, 0),
                target: images(1, 0),
                y_pred: images(2, 0),
                y_target: Some(images(2, n * per_out)),
                bias: Some(0),
                mask: Some(3),
                argmax: max.then_some(4),
                input: EVEN,
                tap: TapTerm {
                    grad: Some(grad),
                    weight,
                    accumulate: false,
                    first: true,
                    part: 0,
                    part_accumulate: false,
                    norm: None,
                },
            };
            setup.run(emu, &arena, Step::BiasActPoolTap(step));
            let (fa, mask) = bias_relu(&to_chw(&a, n, EVEN), n, EVEN, &bias, true, dtype);
            let (fb, _) = bias_relu(&to_chw(&b, n, EVEN), n, EVEN, &bias, true, dtype);
            let want = tap_ref(&fa, &fb, n, criterion, weight as f32, n, dtype);
            let what = format!("bias_act_pool_tap {kind:?} {criterion:?} {}", dtype.name());
            let got = to_chw(&arena.get(grad, dtype, n * per), n, EVEN);
            assert_tap(&what, (&out, &got, dtype), &want, (0.0, &[0.0; 2]), false);
            let (ya, argmax) = pool_ref(&fa, n, EVEN, kind, dtype);
            let (yb, _) = pool_ref(&fb, n, EVEN, kind, dtype);
            let y = arena.get(2, dtype, 2 * n * per_out);
            let (got_a, got_b) = y.split_at(n * per_out);
            assert_each(
                &format!("{what}: pooled pred"),
                &to_chw(got_a, n, pooled),
                &ya,
                &[],
                tolerance(dtype),
            );
            assert_each(
                &format!("{what}: pooled target"),
                &to_chw(got_b, n, pooled),
                &yb,
                &[],
                tolerance(dtype),
            );
            let bits = mask_of(&arena, 3, n * per);
            assert_eq!(
                bits,
                bools(&to_nhwc(&flags(&mask), n, EVEN)),
                "{what}: mask"
            );
            if max {
                let got =
                    unpack_argmax(&arena.get_bytes(4, argmax_bytes(n * per_out)), n * per_out);
                assert_eq!(got, argmax_nhwc(&argmax, n, pooled), "{what}: argmax");
            }
        }
    }
}

#[test]
fn lpips_tap_matches_the_lpips_term() {
    use crate::ops::lpips::cpu::{tap_sum, Scale};
    use crate::ops::lpips::LinWeights;
    use std::sync::Arc;
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(17);
    let lin = LinWeights::v0_1();
    for dtype in DTYPES {
        for (k, in_place) in [(0, false), (3, true)] {
            let (n, batch) = (2, 3);
            let c = [64, 128, 256, 512, 512][k];
            let dims = (c, 3, 5);
            let (m, per) = (15, c * 15);
            // ReLU-like features, with one all-zero pixel in pred.
            let relu = |v: Vec<f32>| v.into_iter().map(|x| x.max(0.0)).collect::<Vec<f32>>();
            let mut a = relu(rng.values(n * per, dtype));
            a[4 * c..5 * c].fill(0.0);
            let b = relu(rng.values(n * per, dtype));
            let mut arena = Arena::new(&[n * per * dtype.size(); 3]);
            arena.put(0, dtype, &a);
            arena.put(1, dtype, &b);
            let mut out = TapOut {
                loss: f32::NAN,
                per_sample: vec![f32::NAN; n],
            };
            let mut setup = Setup::new(dtype, Pooling::Max, Criterion::Mse, None);
            // Tap k of LPIPS's five: its weights start at the k-th offset.
            setup.spec.taps = crate::ops::lpips::LPIPS_TAPS
                .iter()
                .map(|&t| (t, 1.0))
                .collect();
            setup.spec.lpips = Some(Arc::new(lin.clone()));
            setup.lpips = lin.all().as_ptr() as u64;
            setup.call.io.shape = Shape::new(n, 3, 1, 1);
            setup.call.io.loss = &mut out.loss as *mut f32 as u64;
            setup.call.io.per_sample = Some(out.per_sample.as_mut_ptr() as u64);
            setup.call.batch = batch;
            let grad = if in_place { 0 } else { 2 };
            let weight = 0.75;
            let tap = TapTerm {
                grad: Some(grad),
                weight,
                accumulate: false,
                first: true,
                part: 0,
                part_accumulate: false,
                norm: None,
            };
            let step = TapLoss {
                layer: crate::ops::lpips::LPIPS_TAPS[k],
                pred: whole(0, n),
                target: whole(1, n),
                dims,
                tap,
            };
            setup.run(emu, &arena, Step::TapLoss(step));
            let (fa, fb) = (to_chw(&a, n, dims), to_chw(&b, n, dims));
            let scale = weight / (batch * m) as f64;
            let (mut want_grad, mut per_sample, mut total) = (vec![0f32; n * per], Vec::new(), 0.0);
            for i in 0..n {
                let r = i * per..(i + 1) * per;
                let g = &mut want_grad[r.clone()];
                let sum = tap_sum(
                    &fa[r.clone()],
                    &fb[r],
                    (c, m),
                    lin.layer(k),
                    Some(g),
                    Scale::All(scale),
                );
                per_sample.push(weight * sum / m as f64);
                total += sum / m as f64;
            }
            let want = TapWant {
                loss: total * weight / batch as f64,
                per_sample,
                grad: want_grad.into_iter().map(|g| round_to(dtype, g)).collect(),
            };
            let what = format!("lpips_tap {k} in_place={in_place} {}", dtype.name());
            let got = to_chw(&arena.get(grad, dtype, n * per), n, dims);
            let zero_pixel = (0..c).map(|ch| got[ch * m + 4]);
            assert!(
                zero_pixel.into_iter().all(|g| g == 0.0),
                "{what}: a zero pixel's gradient"
            );
            // The gradient relative to its largest element (a pixel's terms
            // cancel in the dot product).
            let top = want.grad.iter().fold(0f32, |t, g| t.max(g.abs()));
            let tol = tolerance(dtype).max(1e-4);
            assert_each(
                &format!("{what}: gradient"),
                &got,
                &want.grad,
                &vec![top; got.len()],
                tol,
            );
            assert_each(
                &format!("{what}: loss"),
                &[out.loss],
                &[want.loss as f32],
                &[],
                1e-5,
            );
            let want_per: Vec<f32> = want.per_sample.iter().map(|&v| v as f32).collect();
            assert_each(
                &format!("{what}: per sample"),
                &out.per_sample,
                &want_per,
                &[],
                1e-5,
            );
        }
    }
}
