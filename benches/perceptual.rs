//! Perceptual loss timing: VGG16 taps [3, 8, 15, 22], forward + backward.
//!
//! CPU: 1x3x64x64 f32 (the fallback's target: well under a second on two
//! cores). Weights are seeded random (timing does not depend on them).
//!
//! `cargo bench --bench perceptual`

use perceptual_loss::{
    DType, Device, LossOutputs, PerceptualConfig, PerceptualLoss, Shape, TensorMut, TensorRef, Vgg,
    VggArch, WeightsSource,
};
use safetensors::{tensor::TensorView, Dtype};
use std::time::Instant;

/// A VGG16 `features` safetensors image with small deterministic weights.
fn weights() -> Vec<u8> {
    let cfg = [
        64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
    ];
    let (mut blobs, mut index, mut in_c) = (Vec::new(), 0, 3);
    for c in cfg {
        if c == 0 {
            index += 1;
            continue;
        }
        let n = c * in_c * 9;
        let w: Vec<u8> = (0..n)
            .flat_map(|i| ((((i * 7919) % 2001) as f32 / 1000.0 - 1.0) * 0.05).to_le_bytes())
            .collect();
        blobs.push((format!("features.{index}.weight"), vec![c, in_c, 3, 3], w));
        blobs.push((format!("features.{index}.bias"), vec![c], vec![0u8; c * 4]));
        index += 2;
        in_c = c;
    }
    let views: Vec<(String, TensorView)> = blobs
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let bytes = weights();
    let vgg = Vgg::load(
        &Device::cpu(),
        WeightsSource::Bytes(&bytes),
        VggArch::Vgg16,
        DType::F32,
    )
    .unwrap();
    let loss = PerceptualLoss::new(vgg, &PerceptualConfig::default()).unwrap();
    let s = Shape::new(1, 3, 64, 64);
    let n = s.n * s.c * s.h * s.w;
    let pred: Vec<f32> = (0..n).map(|i| (i % 251) as f32 / 251.0).collect();
    let target: Vec<f32> = (0..n).map(|i| (i % 241) as f32 / 241.0).collect();
    let mut grad = vec![0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut run = |with_grad: bool| {
        let mut value = 0f32;
        let mut out = LossOutputs::new(TensorMut::scalar(&mut value));
        if with_grad {
            out = out.with_grad(TensorMut::host(&mut grad, s).unwrap());
        }
        let t = Instant::now();
        loss.compute(
            &TensorRef::host(&pred, s).unwrap(),
            &TensorRef::host(&target, s).unwrap(),
            out,
        )
        .unwrap();
        t.elapsed().as_secs_f64() * 1e3
    };
    run(true);
    let fwd_bwd = median((0..5).map(|_| run(true)).collect());
    let fwd = median((0..5).map(|_| run(false)).collect());
    println!("| perceptual VGG16 [3,8,15,22], CPU ({threads} threads) | median ms |");
    println!("|---|---|");
    println!("| {s} f32 forward + backward | {fwd_bwd:.1} |");
    println!("| {s} f32 forward only | {fwd:.1} |");
}
