//! Feature MSE/MAE on the CPU backend against hand values and finite differences.

mod common;

use common::{assert_close, assert_rel, finite_diff, Rng};
use perceptual_loss::half::bf16;
use perceptual_loss::{
    Criterion, Device, Error, FeatureLoss, LossOutputs, Shape, TensorMut, TensorRef,
};

fn run(criterion: Criterion, weight: f32, a: &[f32], b: &[f32], s: Shape) -> (f32, Vec<f32>) {
    let mut loss = f32::NAN;
    let mut grad = vec![f32::NAN; a.len()];
    FeatureLoss::new(criterion, weight)
        .unwrap()
        .compute(
            &Device::cpu(),
            &TensorRef::host(a, s).unwrap(),
            &TensorRef::host(b, s).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut loss))
                .with_grad(TensorMut::host(&mut grad, s).unwrap()),
        )
        .unwrap();
    (loss, grad)
}

fn reference(criterion: Criterion, weight: f64, a: &[f64], b: &[f64]) -> f64 {
    let d = a.iter().zip(b).map(|(x, y)| x - y);
    let sum: f64 = match criterion {
        Criterion::Mse => d.map(|v| v * v).sum(),
        Criterion::Mae => d.map(f64::abs).sum(),
        Criterion::Fro => unreachable!("the feature loss refuses Fro"),
    };
    weight * sum / a.len() as f64
}

#[test]
fn hand_derived_values() {
    let s = Shape::new(1, 1, 1, 4);
    let a = [1.0, 2.0, 3.0, 4.0];
    let b = [0.0, 4.0, 3.0, 1.0]; // differences 1, -2, 0, 3
    let (mse, g) = run(Criterion::Mse, 1.0, &a, &b, s);
    assert_eq!(mse, 14.0 / 4.0);
    assert_eq!(g, vec![0.5, -1.0, 0.0, 1.5]); // 2 d / 4
    let (mae, g) = run(Criterion::Mae, 2.0, &a, &b, s);
    assert_eq!(mae, 2.0 * 6.0 / 4.0);
    assert_eq!(g, vec![0.5, -0.5, 0.0, 0.5]); // 2 sign(d) / 4, 0 where a == b
}

#[test]
fn random_values_and_gradients_match_reference() {
    let mut rng = Rng::new(11);
    for s in [
        Shape::new(1, 1, 2, 2),
        Shape::new(3, 5, 7, 11),
        Shape::new(2, 16, 3, 33),
    ] {
        let n = s.n * s.c * s.h * s.w;
        let a = rng.vec(n, -2.0, 2.0);
        let b = rng.vec(n, -2.0, 2.0);
        let (a64, b64): (Vec<f64>, Vec<f64>) = (
            a.iter().map(|&v| v as f64).collect(),
            b.iter().map(|&v| v as f64).collect(),
        );
        for criterion in [Criterion::Mse, Criterion::Mae] {
            let (loss, grad) = run(criterion, 0.7, &a, &b, s);
            assert_rel(
                loss as f64,
                reference(criterion, 0.7, &a64, &b64),
                1e-6,
                &format!("{criterion:?} {s}"),
            );
            let fd = finite_diff(&a64, 1e-6, |p| reference(criterion, 0.7, p, &b64));
            let got: Vec<f64> = grad.iter().map(|&v| v as f64).collect();
            let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert_close(
                &got,
                &fd,
                1e-4,
                1e-5 * scale,
                &format!("grad {criterion:?} {s}"),
            );
        }
    }
}

#[test]
fn identical_inputs_give_zero_loss_and_gradient() {
    let s = Shape::new(2, 3, 4, 4);
    let a = Rng::new(12).vec(96, -1.0, 1.0);
    for criterion in [Criterion::Mse, Criterion::Mae] {
        let (loss, grad) = run(criterion, 1.0, &a, &a, s);
        assert_eq!(loss, 0.0);
        assert!(grad.iter().all(|&g| g == 0.0));
    }
}

#[test]
fn bf16_inputs() {
    let s = Shape::new(1, 4, 5, 6);
    let mut rng = Rng::new(13);
    let a: Vec<bf16> = rng
        .vec(120, -1.0, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let b: Vec<bf16> = rng
        .vec(120, -1.0, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let mut loss = 0f32;
    let mut grad = vec![bf16::NAN; 120];
    FeatureLoss::new(Criterion::Mse, 1.0)
        .unwrap()
        .compute(
            &Device::cpu(),
            &TensorRef::host(&a, s).unwrap(),
            &TensorRef::host(&b, s).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut loss))
                .with_grad(TensorMut::host(&mut grad, s).unwrap()),
        )
        .unwrap();
    let (a64, b64): (Vec<f64>, Vec<f64>) = (
        a.iter().map(|v| v.to_f64()).collect(),
        b.iter().map(|v| v.to_f64()).collect(),
    );
    assert_rel(
        loss as f64,
        reference(Criterion::Mse, 1.0, &a64, &b64),
        1e-6,
        "bf16 mse",
    );
    let want: Vec<f64> = a64
        .iter()
        .zip(&b64)
        .map(|(x, y)| 2.0 * (x - y) / 120.0)
        .collect();
    let got: Vec<f64> = grad.iter().map(|v| v.to_f64()).collect();
    assert_close(&got, &want, 1e-2, 1e-6, "bf16 grad");
}

#[test]
fn the_fro_criterion_is_refused_by_name() {
    let e = FeatureLoss::new(Criterion::Fro, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Fro") && e.contains("perceptual"), "{e}");
}

#[test]
fn mismatched_inputs_are_errors() {
    let a = vec![0f32; 16];
    let b = vec![0f32; 16];
    let b16 = vec![bf16::ZERO; 16];
    let mut loss = 0f32;
    let f = FeatureLoss::new(Criterion::Mse, 1.0).unwrap();
    let e = f
        .compute(
            &Device::cpu(),
            &TensorRef::host(&a, Shape::new(1, 1, 4, 4)).unwrap(),
            &TensorRef::host(&b, Shape::new(1, 1, 2, 8)).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut loss)),
        )
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let e = f
        .compute(
            &Device::cpu(),
            &TensorRef::host(&a, Shape::new(1, 1, 4, 4)).unwrap(),
            &TensorRef::host(&b16, Shape::new(1, 1, 4, 4)).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut loss)),
        )
        .unwrap_err();
    assert!(e.to_string().contains("dtype"), "{e}");
    assert!(matches!(
        FeatureLoss::new(Criterion::Mae, f32::INFINITY),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn handles_are_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Device>();
    shareable::<FeatureLoss>();
    shareable::<perceptual_loss::TvLoss>();
    shareable::<perceptual_loss::Vgg>();
    shareable::<perceptual_loss::PerceptualLoss>();
}
