//! Kept targets (`set_target`) on the CPU: a call against a kept target
//! gives the bits of the same call with the target passed; the target is
//! copied (changing its memory afterwards changes nothing); a one-image
//! target serves any batch; mismatches and a missing target are errors.

mod common;

use common::vgg::Net;
use common::Rng;
use perceptual_loss::{
    DType, LossOutputs, Lpips, LpipsConfig, PerceptualConfig, PerceptualLoss, Shape, Tap,
    TensorMut, TensorRef, VggArch,
};
use safetensors::Dtype;

/// Loss, per-sample values, parts and gradient, as bits.
type Bits = (u32, Vec<u32>, [u32; 2], Vec<u32>);

fn outputs<'a>(s: Shape, slots: &'a mut (f32, Vec<f32>, [f32; 2], Vec<f32>)) -> LossOutputs<'a> {
    let (loss, per, parts, grad) = slots;
    LossOutputs::new(TensorMut::scalar(loss))
        .with_grad(TensorMut::host(grad, s).unwrap())
        .with_per_sample(TensorMut::host(per, Shape::flat(s.n)).unwrap())
        .with_parts(TensorMut::host(parts, Shape::flat(2)).unwrap())
}

fn slots(s: Shape) -> (f32, Vec<f32>, [f32; 2], Vec<f32>) {
    (
        f32::NAN,
        vec![f32::NAN; s.n],
        [f32::NAN; 2],
        vec![f32::NAN; s.n * s.c * s.h * s.w],
    )
}

fn bits(v: &(f32, Vec<f32>, [f32; 2], Vec<f32>)) -> Bits {
    (
        v.0.to_bits(),
        v.1.iter().map(|x| x.to_bits()).collect(),
        v.2.map(f32::to_bits),
        v.3.iter().map(|x| x.to_bits()).collect(),
    )
}

fn explicit(loss: &PerceptualLoss, pred: &[f32], target: &[f32], s: Shape) -> Bits {
    let mut out = slots(s);
    let o = outputs(s, &mut out);
    loss.compute(
        &TensorRef::host(pred, s).unwrap(),
        &TensorRef::host(target, s).unwrap(),
        o,
    )
    .unwrap();
    bits(&out)
}

fn resident(loss: &PerceptualLoss, pred: &[f32], s: Shape) -> Bits {
    let mut out = slots(s);
    let o = outputs(s, &mut out);
    loss.compute_resident(&TensorRef::host(pred, s).unwrap(), o)
        .unwrap();
    bits(&out)
}

fn loss_with(config: &PerceptualConfig) -> PerceptualLoss {
    let bytes = Net::random(VggArch::Vgg16, 81).export_safetensors(Dtype::F32, "", |_| false);
    PerceptualLoss::new(common::cpu_vgg(&bytes, VggArch::Vgg16, DType::F32), config).unwrap()
}

fn style_and_content() -> PerceptualConfig {
    PerceptualConfig {
        taps: vec![Tap::from("relu2_2")],
        style_taps: ["relu1_2", "relu2_2", "relu3_3"].map(Tap::from).to_vec(),
        style_weight: 1e3,
        ..Default::default()
    }
}

#[test]
fn a_kept_target_gives_the_bits_of_a_passed_one_and_is_a_copy() {
    let loss = loss_with(&style_and_content());
    let s = Shape::new(2, 3, 16, 12);
    let len = s.n * 3 * 16 * 12;
    let mut rng = Rng::new(82);
    let (pred, mut target) = (rng.vec(len, 0.0, 1.0), rng.vec(len, 0.0, 1.0));
    let want = explicit(&loss, &pred, &target, s);
    loss.set_target(&TensorRef::host(&target, s).unwrap())
        .unwrap();
    target.iter_mut().for_each(|v| *v = 1.0 - *v); // the caller reuses its memory
    assert_eq!(resident(&loss, &pred, s), want);
    // A clone shares the kept target; an explicit target still works.
    assert_eq!(resident(&loss.clone(), &pred, s), want);
    assert_ne!(explicit(&loss, &pred, &target, s), want);
    loss.clear_target().unwrap();
    let mut out = slots(s);
    let e = loss
        .compute_resident(&TensorRef::host(&pred, s).unwrap(), outputs(s, &mut out))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no kept target"), "{e}");
}

#[test]
fn a_one_image_target_serves_every_batch_size() {
    let loss = loss_with(&style_and_content());
    let one = Shape::new(1, 3, 16, 16);
    let mut rng = Rng::new(83);
    let target = rng.vec(3 * 16 * 16, 0.0, 1.0);
    loss.set_target(&TensorRef::host(&target, one).unwrap())
        .unwrap();
    for n in [1, 3] {
        let s = Shape::new(n, 3, 16, 16);
        let pred = rng.vec(n * 3 * 16 * 16, 0.0, 1.0);
        let repeated: Vec<f32> = (0..n).flat_map(|_| target.iter().copied()).collect();
        assert_eq!(
            resident(&loss, &pred, s),
            explicit(&loss, &pred, &repeated, s),
            "n = {n}"
        );
    }
}

#[test]
fn mismatched_preds_are_errors() {
    let loss = loss_with(&PerceptualConfig::default());
    let s = Shape::new(2, 3, 16, 16);
    let target = vec![0.5f32; 2 * 3 * 16 * 16];
    loss.set_target(&TensorRef::host(&target, s).unwrap())
        .unwrap();
    let mut value = 0f32;
    let mut call = |pred: TensorRef<'_>| {
        loss.compute_resident(&pred, LossOutputs::new(TensorMut::scalar(&mut value)))
            .unwrap_err()
            .to_string()
    };
    let three = vec![0.5f32; 3 * 3 * 16 * 16];
    let e = call(TensorRef::host(&three, Shape::new(3, 3, 16, 16)).unwrap());
    assert!(e.contains("does not match the kept target"), "{e}");
    let other = vec![0.5f32; 2 * 3 * 16 * 20];
    let e = call(TensorRef::host(&other, Shape::new(2, 3, 16, 20)).unwrap());
    assert!(e.contains("does not match the kept target"), "{e}");
    let half = vec![perceptual_loss::half::bf16::from_f32(0.5); 2 * 3 * 16 * 16];
    let e = call(TensorRef::host(&half, s).unwrap());
    assert!(e.contains("bf16"), "{e}");
    let tiny = vec![0.5f32; 3 * 4 * 4];
    let e = loss
        .set_target(&TensorRef::host(&tiny, Shape::new(1, 3, 4, 4)).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("too small"), "{e}");
}

#[test]
fn check_finite_covers_the_kept_target() {
    let loss = loss_with(&PerceptualConfig {
        check_finite: true,
        ..Default::default()
    });
    let s = Shape::new(1, 3, 16, 16);
    let mut target = vec![0.5f32; 3 * 16 * 16];
    target[77] = f32::NAN;
    let e = loss
        .set_target(&TensorRef::host(&target, s).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("target") && e.contains("NaN"), "{e}");
}

#[test]
fn lpips_keeps_its_target_too() {
    let bytes = Net::random(VggArch::Vgg16, 84).export_safetensors(Dtype::F32, "", |_| false);
    let vgg = common::cpu_vgg(&bytes, VggArch::Vgg16, DType::F32);
    let lpips = Lpips::new(vgg, &LpipsConfig::default()).unwrap();
    let s = Shape::new(2, 3, 16, 16);
    let mut rng = Rng::new(85);
    let (pred, target) = (rng.vec(2 * 768, -1.0, 1.0), rng.vec(2 * 768, -1.0, 1.0));
    let (p, t) = (
        TensorRef::host(&pred, s).unwrap(),
        TensorRef::host(&target, s).unwrap(),
    );
    let want = lpips.value(&p, &t).unwrap();
    lpips.set_target(&t).unwrap();
    let mut got = f32::NAN;
    lpips
        .compute_resident(&p, LossOutputs::new(TensorMut::scalar(&mut got)))
        .unwrap();
    assert_eq!(got.to_bits(), want.to_bits());
}
