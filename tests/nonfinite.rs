//! What NaN and infinite inputs do, exactly as docs/design.md states it
//! ("Non-finite inputs"), and `check_finite`, which makes them an error
//! naming the input and the first offending element. On the CPU; the GPU
//! tests check the same on a device.

mod common;

use common::{numel, Rng};
use perceptual_loss::ffi::*;
use perceptual_loss::{
    seeded_safetensors, Criterion, DType, Device, FeatureLoss, LossOutputs, PerceptualConfig,
    PerceptualLoss, Shape, TensorMut, TensorRef, TvConfig, TvLoss, TvVariant, VggArch,
};

/// Loss, per-image values and gradient of a CPU call.
struct Out {
    loss: f32,
    per_sample: Vec<f32>,
    grad: Vec<f32>,
}

fn call(
    s: Shape,
    f: impl FnOnce(LossOutputs<'_>) -> perceptual_loss::Result<()>,
) -> perceptual_loss::Result<Out> {
    let (mut loss, mut per_sample, mut grad) =
        (f32::NAN, vec![f32::NAN; s.n], vec![f32::NAN; numel(s)]);
    f(LossOutputs::new(TensorMut::scalar(&mut loss))
        .with_per_sample(TensorMut::host(&mut per_sample, Shape::flat(s.n))?)
        .with_grad(TensorMut::host(&mut grad, s)?))?;
    Ok(Out {
        loss,
        per_sample,
        grad,
    })
}

fn tv(config: TvConfig, x: &[f32], s: Shape) -> perceptual_loss::Result<Out> {
    let loss = TvLoss::new(config)?;
    call(s, |out| {
        loss.compute(&Device::cpu(), &TensorRef::host(x, s)?, out)
    })
}

/// The elements of image `n` whose gradient is not finite, as (row, column)
/// of channel `c`.
fn non_finite(out: &Out, s: Shape, n: usize, c: usize) -> Vec<(usize, usize)> {
    let plane = &out.grad[(n * s.c + c) * s.h * s.w..][..s.h * s.w];
    (0..s.h * s.w)
        .filter(|&p| !plane[p].is_finite())
        .map(|p| (p / s.w, p % s.w))
        .collect()
}

#[test]
fn tv_confines_a_nan_to_its_image_and_its_neighbours() {
    let s = Shape::new(3, 2, 6, 7);
    let mut x = Rng::new(1).vec(numel(s), -1.0, 1.0);
    // Image 1, channel 1, row 2, column 3.
    let at = (s.c + 1) * s.h * s.w + 2 * s.w + 3;
    x[at] = f32::NAN;
    for variant in [
        TvVariant::Article,
        TvVariant::L1,
        TvVariant::L2Squared,
        TvVariant::L2,
        TvVariant::Isotropic,
    ] {
        let out = tv(TvConfig::new(variant), &x, s).unwrap();
        assert!(out.loss.is_nan(), "{variant:?}");
        assert!(
            out.per_sample[1].is_nan()
                && out.per_sample[0].is_finite()
                && out.per_sample[2].is_finite()
        );
        for n in [0, 2] {
            let image = s.c * s.h * s.w;
            assert!(out.grad[n * image..][..image].iter().all(|g| g.is_finite()));
        }
        let bad = non_finite(&out, s, 1, 1);
        if variant == TvVariant::L2 {
            // The norm of the whole image is NaN, and with it every slope.
            assert_eq!(bad.len(), s.h * s.w);
            assert_eq!(
                non_finite(&out, s, 1, 0).len(),
                s.h * s.w,
                "the other channel too"
            );
            continue;
        }
        assert!(
            non_finite(&out, s, 1, 0).is_empty(),
            "{variant:?}: the other channel"
        );
        match variant {
            // The pixel and the four whose differences include it.
            TvVariant::Isotropic => {
                assert!(
                    bad.iter()
                        .all(|&(i, j)| i.abs_diff(2) <= 1 && j.abs_diff(3) <= 1),
                    "{bad:?}"
                );
                assert!(bad.contains(&(2, 3)));
            }
            _ => assert_eq!(
                bad,
                vec![(1, 3), (2, 2), (2, 3), (2, 4), (3, 3)],
                "{variant:?}"
            ),
        }
    }
    // With check_finite: an error naming the input and the element.
    let config = TvConfig {
        check_finite: true,
        ..TvConfig::new(TvVariant::L1)
    };
    let e = tv(config, &x, s).err().unwrap().to_string();
    assert!(
        e.contains(&format!("x holds a non-finite value (NaN) at element {at} (image 1, channel 1, row 2, column 3)")),
        "{e}"
    );
    x[at] = 0.5;
    assert!(
        tv(config, &x, s).unwrap().loss.is_finite(),
        "a finite input passes"
    );
}

#[test]
fn the_feature_distance_keeps_a_non_finite_value_to_its_element() {
    let s = Shape::new(2, 1, 3, 4);
    let (a, mut b) = (
        Rng::new(2).vec(numel(s), -1.0, 1.0),
        Rng::new(3).vec(numel(s), -1.0, 1.0),
    );
    b[17] = f32::INFINITY; // image 1
    let run = |criterion, b: &[f32], check| {
        let loss = FeatureLoss::new(criterion, 1.0)
            .unwrap()
            .with_check_finite(check);
        call(s, |out| {
            loss.compute(
                &Device::cpu(),
                &TensorRef::host(&a, s)?,
                &TensorRef::host(b, s)?,
                out,
            )
        })
    };
    let mse = run(Criterion::Mse, &b, false).unwrap();
    assert_eq!(mse.loss, f32::INFINITY);
    assert!(mse.per_sample[0].is_finite() && mse.per_sample[1] == f32::INFINITY);
    let bad: Vec<usize> = (0..mse.grad.len())
        .filter(|&i| !mse.grad[i].is_finite())
        .collect();
    assert_eq!(bad, vec![17], "MSE: only the element, -Inf");
    assert_eq!(mse.grad[17], f32::NEG_INFINITY);
    // MAE's slope is the sign: finite even at an infinite difference.
    let mae = run(Criterion::Mae, &b, false).unwrap();
    assert_eq!(mae.loss, f32::INFINITY);
    assert!(mae.grad.iter().all(|g| g.is_finite()));
    assert_eq!(mae.grad[17], -1.0 / 24.0);
    b[17] = f32::NAN;
    let nan = run(Criterion::Mae, &b, false).unwrap();
    assert!(nan.loss.is_nan() && nan.grad[17].is_nan() && nan.grad[16].is_finite());
    let e = run(Criterion::Mse, &b, true).err().unwrap().to_string();
    assert!(
        e.contains("b holds a non-finite value (NaN) at element 17 (image 1"),
        "{e}"
    );
}

#[test]
fn the_perceptual_loss_keeps_a_non_finite_image_to_itself() {
    let bytes = seeded_safetensors(VggArch::Vgg16, 6).unwrap();
    let vgg = common::cpu_vgg(&bytes, VggArch::Vgg16, DType::F32);
    let s = Shape::new(3, 3, 16, 16);
    let mut rng = Rng::new(7);
    let (pred, target) = (rng.vec(numel(s), 0.0, 1.0), rng.vec(numel(s), 0.0, 1.0));
    let run = |pred: &[f32], target: &[f32], taps: &[&str], check_finite| {
        let config = PerceptualConfig {
            taps: taps.iter().map(|&t| t.into()).collect(),
            check_finite,
            ..Default::default()
        };
        let loss = PerceptualLoss::new(vgg.clone(), &config).unwrap();
        call(s, |out| {
            loss.compute(
                &TensorRef::host(pred, s)?,
                &TensorRef::host(target, s)?,
                out,
            )
        })
    };
    let per = s.c * s.h * s.w;
    let relus = ["relu1_2", "relu2_2", "relu3_3"];
    // (where the bad value is, its image, the taps, whether that image's
    // gradient stays finite)
    let cases = [
        // A NaN feature's ReLU passes no gradient (as in PyTorch, where
        // NaN > 0 is false): with ReLU taps the gradient stays finite.
        (true, 1, &relus[..], true),
        // A tap before a ReLU sends the NaN back to the input.
        (true, 1, &["conv2_2"][..], false),
        // An infinite target gives an infinite tap gradient on finite pred
        // features: it reaches the input.
        (false, 2, &relus[..], false),
    ];
    for (in_pred, image, taps, grad_finite) in cases {
        let (mut p, mut t) = (pred.clone(), target.clone());
        let at = image * per + 100;
        if in_pred {
            p[at] = f32::NAN;
        } else {
            t[at] = f32::INFINITY;
        }
        let what = format!("in_pred {in_pred} {taps:?}");
        let out = run(&p, &t, taps, false).unwrap();
        assert!(!out.loss.is_finite(), "{what}: {}", out.loss);
        for n in 0..s.n {
            let grad = &out.grad[n * per..][..per];
            if n == image {
                assert!(
                    !out.per_sample[n].is_finite(),
                    "{what}: {}",
                    out.per_sample[n]
                );
                assert_eq!(
                    grad.iter().all(|g| g.is_finite()),
                    grad_finite,
                    "{what}: the image's gradient"
                );
            } else {
                assert!(out.per_sample[n].is_finite(), "{what}: image {n}");
                assert!(
                    grad.iter().all(|g| g.is_finite()),
                    "{what}: image {n}'s gradient is finite"
                );
            }
        }
        let e = run(&p, &t, taps, true).err().unwrap().to_string();
        let (name, value) = if in_pred {
            ("pred", "NaN")
        } else {
            ("target", "inf")
        };
        assert!(
            e.contains(&format!("{name} holds a non-finite value ({value}) at element {at} (image {image}, channel 0, row 6, column 4)")),
            "{e}"
        );
    }
    assert!(run(&pred, &target, &relus, true).unwrap().loss.is_finite());
}

#[test]
fn check_finite_through_the_c_abi() {
    unsafe {
        let ctx = common::cpu_context();
        let mut x = [0.5f32; 12];
        x[7] = f32::NEG_INFINITY;
        let mut loss = -1.0f32;
        let out = common::outputs(&mut loss, std::ptr::null_mut());
        let mut config = std::mem::zeroed();
        pl_tv_config_init(&mut config);
        config.variant = PL_TV_L1;
        config.reduction = PL_REDUCTION_SUM;
        assert_eq!(
            pl_tv_loss(ctx, &config, x.as_ptr().cast(), PL_F32, 1, 1, 3, 4, &out),
            PL_OK
        );
        assert_eq!(loss, f32::INFINITY);
        config.check_finite = 1;
        let st = pl_tv_loss(ctx, &config, x.as_ptr().cast(), PL_F32, 1, 1, 3, 4, &out);
        assert_eq!(st, PL_ERR_INVALID_ARGUMENT);
        let e = common::last_error();
        assert!(
            e.contains("x holds a non-finite value (-inf) at element 7"),
            "{e}"
        );
        pl_context_destroy(ctx);
    }
}
