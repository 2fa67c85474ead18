//! TV loss on the CPU backend against hand-derived values, the reference
//! formulas of docs/design.md (tests/common) and finite differences.

mod common;

use common::{assert_close, assert_rel, finite_diff, formula, numel, tv_configs, tv_loss, Rng};
use perceptual_loss::half::{bf16, f16};
use perceptual_loss::{
    Device, Element, Error, LossOutputs, Reduction, Shape, TensorMut, TensorRef, TvConfig, TvLoss,
    TvVariant,
};

struct Out {
    loss: f32,
    grad: Vec<f32>,
    per_sample: Vec<f32>,
}

fn run(cfg: TvConfig, x: &[f32], s: Shape) -> Out {
    let mut loss = f32::NAN;
    let mut grad = vec![f32::NAN; x.len()]; // poisoned: every element must be written
    let mut per_sample = vec![f32::NAN; s.n];
    TvLoss::new(cfg)
        .unwrap()
        .compute(
            &Device::cpu(),
            &TensorRef::host(x, s).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut loss))
                .with_grad(TensorMut::host(&mut grad, s).unwrap())
                .with_per_sample(TensorMut::host(&mut per_sample, Shape::flat(s.n)).unwrap()),
        )
        .unwrap();
    Out {
        loss,
        grad,
        per_sample,
    }
}

const SHAPES: [Shape; 5] = [
    Shape::new(1, 1, 2, 2),
    Shape::new(3, 5, 7, 11),
    Shape::new(2, 3, 4, 33),
    Shape::new(1, 2, 9, 65),
    Shape::new(2, 1, 3, 2),
];

#[test]
fn article_matches_hand_derived_example() {
    // dh: 6, 9, 12, 15, 18, 21 -> 1251; dw: 1, 2, 4, 5, 7, 8 -> 159; 6 of each.
    let x = [1., 2., 4., 7., 11., 16., 22., 29., 37.];
    let out = run(TvConfig::default(), &x, Shape::new(1, 1, 3, 3));
    assert_eq!(out.loss, 470.0);
    // dL/dx = (2 * 2 / 6) * (sum of differences leaving minus entering each pixel).
    // Pixel (0,0): -(dh 6) - (dw 1) = -7 -> -14/3.
    // Pixel (1,1): +dh(0,1)=9 - dh(1,1)=18 + dw(1,0)=4 - dw(1,1)=5 = -10 -> -20/3.
    // Pixel (2,2): +dh(1,2)=21 + dw(2,1)=8 = 29 -> 58/3.
    let k = 4.0 / 6.0;
    assert_rel(out.grad[0] as f64, -7.0 * k, 1e-6, "grad (0,0)");
    assert_rel(out.grad[4] as f64, -10.0 * k, 1e-6, "grad (1,1)");
    assert_rel(out.grad[8] as f64, 29.0 * k, 1e-6, "grad (2,2)");
}

#[test]
fn article_divides_by_batch_size() {
    // Two copies of the example image: the article divides the sum by N.
    let img = [1., 2., 4., 7., 11., 16., 22., 29., 37.];
    let x: Vec<f32> = img.iter().chain(&img).copied().collect();
    let out = run(TvConfig::default(), &x, Shape::new(2, 1, 3, 3));
    assert_eq!(out.loss, 470.0);
    assert_eq!(out.per_sample, vec![470.0, 470.0]);
}

#[test]
fn l1_and_l2_variants_match_hand_values() {
    // 1x1x2x2 [[0, 1], [3, 7]]: dh = 3, 6; dw = 1, 4.
    let x = [0., 1., 3., 7.];
    let s = Shape::new(1, 1, 2, 2);
    let v = |variant| run(TvConfig::new(variant), &x, s).loss;
    assert_eq!(v(TvVariant::L1), 14.0);
    assert_eq!(v(TvVariant::L2Squared), 62.0);
    assert_rel(v(TvVariant::L2) as f64, 62f64.sqrt(), 1e-7, "l2");
    // Isotropic: one term at (0,0): sqrt(3^2 + 1^2).
    assert_rel(
        v(TvVariant::Isotropic) as f64,
        10f64.sqrt(),
        1e-7,
        "isotropic",
    );
}

#[test]
fn every_variant_matches_the_formulas_on_odd_shapes() {
    let mut rng = Rng::new(1);
    for s in SHAPES {
        let x = rng.vec(numel(s), -1.0, 1.0);
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for cfg in tv_configs() {
            let out = run(cfg, &x, s);
            let mean = cfg.reduction == Reduction::Mean;
            let want = tv_loss(formula(&cfg), &x64, s, cfg.weight as f64, mean);
            assert_rel(out.loss as f64, want, 1e-6, &format!("{cfg:?} {s}"));
            let image = numel(s) / s.n;
            let per: Vec<f64> = (0..s.n)
                .map(|n| {
                    let one = Shape::new(1, s.c, s.h, s.w);
                    tv_loss(
                        formula(&cfg),
                        &x64[n * image..(n + 1) * image],
                        one,
                        cfg.weight as f64,
                        true,
                    )
                })
                .collect();
            let got: Vec<f64> = out.per_sample.iter().map(|&v| v as f64).collect();
            assert_close(&got, &per, 1e-6, 0.0, &format!("per-sample {cfg:?} {s}"));
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng::new(2);
    for s in SHAPES {
        let x = rng.vec(numel(s), -1.0, 1.0);
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for cfg in tv_configs() {
            let mean = cfg.reduction == Reduction::Mean;
            let fd = finite_diff(&x64, 1e-6, |p| {
                tv_loss(formula(&cfg), p, s, cfg.weight as f64, mean)
            });
            let got: Vec<f64> = run(cfg, &x, s).grad.iter().map(|&v| v as f64).collect();
            let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert_close(&got, &fd, 1e-4, 1e-5 * scale, &format!("grad {cfg:?} {s}"));
        }
    }
}

#[test]
fn constant_and_identical_inputs_give_zero_and_no_nan() {
    let s = Shape::new(2, 3, 4, 5);
    let x = vec![0.25f32; numel(s)];
    for cfg in tv_configs() {
        let out = run(cfg, &x, s);
        let eps_floor = if cfg.variant == TvVariant::Isotropic {
            cfg.eps
        } else {
            0.0
        };
        if eps_floor == 0.0 {
            assert_eq!(out.loss, 0.0, "{cfg:?}");
        }
        assert!(
            out.grad.iter().all(|&g| g == 0.0),
            "{cfg:?}: gradient of a constant image must be 0"
        );
    }
}

/// Loss and gradient (as f64) of `x` rounded to T.
fn run_typed<T: Element>(cfg: TvConfig, x: &[f32], s: Shape) -> (f32, Vec<f64>) {
    let xt: Vec<T> = x.iter().map(|&v| T::from_f64(v as f64)).collect();
    let mut g: Vec<T> = vec![T::from_f64(f64::NAN); x.len()];
    let mut loss = 0f32;
    TvLoss::new(cfg)
        .unwrap()
        .compute(
            &Device::cpu(),
            &TensorRef::host(&xt, s).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut loss))
                .with_grad(TensorMut::host(&mut g, s).unwrap()),
        )
        .unwrap();
    (loss, g.iter().map(|v| v.to_f64()).collect())
}

/// The f16/bf16 loss equals the f32 loss of the same rounded values; the
/// gradient matches it to the output type's precision.
fn check_half<T: Element>(cfg: TvConfig, x32: &[f32], s: Shape) {
    let rounded: Vec<f32> = x32
        .iter()
        .map(|&v| T::from_f64(v as f64).to_f64() as f32)
        .collect();
    let reference = run(cfg, &rounded, s);
    let (loss, grad) = run_typed::<T>(cfg, x32, s);
    let name = T::DTYPE.name();
    assert_rel(
        loss as f64,
        reference.loss as f64,
        1e-6,
        &format!("{name} loss {cfg:?}"),
    );
    let want: Vec<f64> = reference.grad.iter().map(|&v| v as f64).collect();
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert_close(
        &grad,
        &want,
        1e-2,
        1e-3 * scale,
        &format!("{name} grad {cfg:?}"),
    );
}

#[test]
fn half_precision_inputs_and_gradients() {
    let mut rng = Rng::new(3);
    let s = Shape::new(2, 3, 5, 9);
    let x32 = rng.vec(numel(s), -1.0, 1.0);
    for cfg in tv_configs() {
        check_half::<f16>(cfg, &x32, s);
        check_half::<bf16>(cfg, &x32, s);
    }
}

#[test]
fn gradient_accumulates_with_beta() {
    let mut rng = Rng::new(4);
    let s = Shape::new(2, 2, 6, 7);
    let x = rng.vec(numel(s), -1.0, 1.0);
    let fresh = run(TvConfig::default(), &x, s).grad;
    let old = rng.vec(numel(s), -1.0, 1.0);
    let mut grad = old.clone();
    let mut loss = 0f32;
    TvLoss::new(TvConfig::default())
        .unwrap()
        .compute(
            &Device::cpu(),
            &TensorRef::host(&x, s).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut loss))
                .with_grad(TensorMut::host(&mut grad, s).unwrap())
                .accumulate(0.5),
        )
        .unwrap();
    let want: Vec<f64> = old
        .iter()
        .zip(&fresh)
        .map(|(o, f)| 0.5 * *o as f64 + *f as f64)
        .collect();
    let got: Vec<f64> = grad.iter().map(|&v| v as f64).collect();
    assert_close(&got, &want, 1e-6, 1e-7, "accumulated gradient");
}

#[test]
fn non_finite_inputs_propagate() {
    let s = Shape::new(1, 1, 3, 3);
    let mut x = vec![0.5f32; 9];
    x[4] = f32::NAN;
    for cfg in tv_configs() {
        let out = run(cfg, &x, s);
        assert!(out.loss.is_nan(), "{cfg:?}: NaN input must give a NaN loss");
        assert!(
            out.grad[4].is_nan(),
            "{cfg:?}: NaN pixel must have a NaN gradient"
        );
    }
    x[4] = f32::INFINITY;
    assert_eq!(run(TvConfig::new(TvVariant::L1), &x, s).loss, f32::INFINITY);
}

fn err_of(cfg: TvConfig, x: &[f32], s: Shape) -> Error {
    let mut loss = 0f32;
    let tv = match TvLoss::new(cfg) {
        Ok(tv) => tv,
        Err(e) => return e,
    };
    let x = match TensorRef::host(x, s) {
        Ok(x) => x,
        Err(e) => return e,
    };
    tv.compute(
        &Device::cpu(),
        &x,
        LossOutputs::new(TensorMut::scalar(&mut loss)),
    )
    .unwrap_err()
}

#[test]
fn bad_input_is_a_clear_error() {
    let x = vec![0f32; 64];
    // The article divides by H-1 and W-1.
    assert!(matches!(
        err_of(TvConfig::default(), &x[..8], Shape::new(1, 1, 1, 8)),
        Error::InvalidShape(_)
    ));
    assert!(matches!(
        err_of(TvConfig::default(), &x[..8], Shape::new(1, 1, 8, 1)),
        Error::InvalidShape(_)
    ));
    // Variants that do not divide accept a single row.
    let mut loss = 1f32;
    TvLoss::new(TvConfig::new(TvVariant::L1))
        .unwrap()
        .compute(
            &Device::cpu(),
            &TensorRef::host(&x[..8], Shape::new(1, 1, 1, 8)).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut loss)),
        )
        .unwrap();
    assert_eq!(loss, 0.0);
    // Zero-size, length mismatch and overflowing shapes.
    assert!(matches!(
        TensorRef::host(&x[..0], Shape::new(0, 1, 4, 4)),
        Err(Error::InvalidShape(_))
    ));
    assert!(matches!(
        TensorRef::host(&x, Shape::new(1, 1, 4, 4)),
        Err(Error::InvalidShape(_))
    ));
    assert!(matches!(
        Shape::new(usize::MAX, 2, 2, 2).numel(),
        Err(Error::InvalidShape(_))
    ));
    assert!(matches!(
        Shape::new(1 << 31, 1 << 31, 4, 1).numel(),
        Err(Error::InvalidShape(_))
    ));
    // Bad configs.
    assert!(matches!(
        err_of(
            TvConfig {
                weight: f32::NAN,
                ..Default::default()
            },
            &x,
            Shape::new(1, 1, 8, 8)
        ),
        Error::InvalidArgument(_)
    ));
    assert!(matches!(
        err_of(
            TvConfig {
                eps: -1.0,
                ..Default::default()
            },
            &x,
            Shape::new(1, 1, 8, 8)
        ),
        Error::InvalidArgument(_)
    ));
    assert!(matches!(
        err_of(
            TvConfig {
                reduction: Reduction::Sum,
                ..Default::default()
            },
            &x,
            Shape::new(1, 1, 8, 8)
        ),
        Error::InvalidArgument(_)
    ));
}

#[test]
fn bad_outputs_are_clear_errors_and_nothing_is_written() {
    let s = Shape::new(1, 1, 4, 4);
    let x = vec![1f32; 16];
    let tv = TvLoss::new(TvConfig::default()).unwrap();
    let xr = TensorRef::host(&x, s).unwrap();
    let mut loss = -7f32;
    // Gradient of the wrong shape.
    let mut grad = vec![-7f32; 15];
    let e = tv
        .compute(
            &Device::cpu(),
            &xr,
            LossOutputs::new(TensorMut::scalar(&mut loss))
                .with_grad(TensorMut::host(&mut grad, Shape::new(1, 1, 3, 5)).unwrap()),
        )
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_eq!(loss, -7.0);
    assert!(grad.iter().all(|&g| g == -7.0));
    // Gradient of the wrong dtype.
    let mut grad16 = vec![f16::ZERO; 16];
    let e = tv
        .compute(
            &Device::cpu(),
            &xr,
            LossOutputs::new(TensorMut::scalar(&mut loss))
                .with_grad(TensorMut::host(&mut grad16, s).unwrap()),
        )
        .unwrap_err();
    assert!(e.to_string().contains("gradient must match"), "{e}");
    // Loss output that is not one f32.
    let mut two = [0f32; 2];
    let e = tv
        .compute(
            &Device::cpu(),
            &xr,
            LossOutputs::new(TensorMut::host(&mut two, Shape::flat(2)).unwrap()),
        )
        .unwrap_err();
    assert!(e.to_string().contains("loss output"), "{e}");
    // Per-sample output of the wrong length; non-finite beta.
    let mut per = [0f32; 3];
    let e = tv
        .compute(
            &Device::cpu(),
            &xr,
            LossOutputs::new(TensorMut::scalar(&mut loss))
                .with_per_sample(TensorMut::host(&mut per, Shape::flat(3)).unwrap()),
        )
        .unwrap_err();
    assert!(e.to_string().contains("per-sample"), "{e}");
    let mut g = vec![0f32; 16];
    let e = tv
        .compute(
            &Device::cpu(),
            &xr,
            LossOutputs::new(TensorMut::scalar(&mut loss))
                .with_grad(TensorMut::host(&mut g, s).unwrap())
                .accumulate(f32::INFINITY),
        )
        .unwrap_err();
    assert!(e.to_string().contains("beta"), "{e}");
    assert_eq!(loss, -7.0, "no output is written on error");
}

#[test]
fn same_input_gives_bit_identical_loss() {
    let mut rng = Rng::new(5);
    let s = Shape::new(4, 3, 16, 17);
    let x = rng.vec(numel(s), -1.0, 1.0);
    for cfg in tv_configs() {
        let a = run(cfg, &x, s);
        let b = run(cfg, &x, s);
        assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    }
}

/// A batch large enough that its planes are split across threads gives,
/// bit for bit, what each image gives alone on one thread: every image's
/// value and gradient, and the loss as the same fixed-order sum.
#[test]
fn a_batch_split_across_threads_gives_the_bits_of_its_images_alone() {
    let mut rng = Rng::new(11);
    let s = Shape::new(3, 1, 2048, 1500); // 9.2M elements: two threads or more
    let x = rng.vec(numel(s), -1.0, 1.0);
    let one = Shape::new(1, s.c, s.h, s.w);
    for cfg in [
        TvConfig::default(),
        TvConfig {
            variant: TvVariant::L2,
            reduction: Reduction::Sum,
            ..Default::default()
        },
        TvConfig {
            variant: TvVariant::Isotropic,
            ..Default::default()
        },
    ] {
        let batch = run(cfg, &x, s);
        let mut total = 0.0f64;
        for (n, image) in x.chunks_exact(numel(one)).enumerate() {
            let alone = run(cfg, image, one);
            assert_eq!(batch.per_sample[n].to_bits(), alone.per_sample[0].to_bits());
            total += alone.per_sample[0] as f64;
            // A mean over the batch scales each image's gradient by 1/N.
            let scale = if cfg.reduction == Reduction::Sum {
                1.0
            } else {
                1.0 / s.n as f32
            };
            let got = &batch.grad[n * numel(one)..(n + 1) * numel(one)];
            for (k, (&g, &a)) in got.iter().zip(&alone.grad).enumerate() {
                assert!(
                    (g - a * scale).abs() <= 1e-6 * a.abs().max(1e-30) * 4.0,
                    "{cfg:?} image {n} element {k}: {g} vs {}",
                    a * scale
                );
            }
        }
        let reduced = if cfg.reduction == Reduction::Sum {
            total
        } else {
            total / s.n as f64
        };
        assert_rel(batch.loss as f64, reduced, 1e-6, "the batch loss");
    }
}
