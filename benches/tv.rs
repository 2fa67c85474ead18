//! TV and feature-distance throughput.
//!
//! GPU: 16x3x1024x1024 f32 (192 MiB), forward + backward, each repetition
//! timed with CUDA events; prints the median and the achieved bandwidth
//! (x read once + gradient written once) against the 4.3 TB/s copy ceiling
//! measured on an H200 (see the README). CPU: a small image, wall clock.
//!
//! `cargo bench --bench tv` (the GPU part is skipped without a device).

mod common;

use common::{median, time_gpu};
use perceptual_loss::{
    Criterion, Device, FeatureLoss, LossOutputs, Shape, TensorMut, TensorRef, TvConfig, TvLoss,
    TvVariant,
};
use std::time::Instant;

const REPS: usize = 50;
const CEILING_GBS: f64 = 4300.0;

struct Row {
    what: String,
    ms: f64,
    bytes: f64,
}

fn gpu_rows(dev: &Device) -> Vec<Row> {
    let st = dev.cuda_stream().unwrap().clone();
    let s = Shape::new(16, 3, 1024, 1024);
    let n = s.n * s.c * s.h * s.w;
    let host: Vec<f32> = (0..n)
        .map(|i| ((i * 2_654_435_761usize) % 1000) as f32 / 1000.0)
        .collect();
    let x = st.clone_htod(&host).unwrap();
    let y = st.clone_htod(&host[..n / 2].repeat(2)).unwrap();
    let mut grad = st.alloc_zeros::<f32>(n).unwrap();
    let mut loss = st.alloc_zeros::<f32>(1).unwrap();
    let bytes = (n * 4) as f64;
    let mut rows = Vec::new();
    for variant in [
        TvVariant::Article,
        TvVariant::L1,
        TvVariant::L2,
        TvVariant::Isotropic,
    ] {
        let tv = TvLoss::new(TvConfig::new(variant)).unwrap();
        let ms = time_gpu(dev, REPS, || {
            let out = LossOutputs::new(TensorMut::cuda(&mut loss, Shape::flat(1)).unwrap())
                .with_grad(TensorMut::cuda(&mut grad, s).unwrap());
            tv.compute(dev, &TensorRef::cuda(&x, s).unwrap(), out)
                .unwrap();
        });
        // L2 reads x twice (sum first, then the scaled gradient).
        let reads = if variant == TvVariant::L2 { 2.0 } else { 1.0 };
        rows.push(Row {
            what: format!("tv {variant:?} {s} f32 fwd+bwd"),
            ms,
            bytes: bytes * (reads + 1.0),
        });
    }
    let tv = TvLoss::new(TvConfig::default()).unwrap();
    let ms = time_gpu(dev, REPS, || {
        let out = LossOutputs::new(TensorMut::cuda(&mut loss, Shape::flat(1)).unwrap());
        tv.compute(dev, &TensorRef::cuda(&x, s).unwrap(), out)
            .unwrap();
    });
    rows.push(Row {
        what: format!("tv Article {s} f32 forward only"),
        ms,
        bytes,
    });
    let mse = FeatureLoss::new(Criterion::Mse, 1.0).unwrap();
    let ms = time_gpu(dev, REPS, || {
        let out = LossOutputs::new(TensorMut::cuda(&mut loss, Shape::flat(1)).unwrap())
            .with_grad(TensorMut::cuda(&mut grad, s).unwrap());
        mse.compute(
            dev,
            &TensorRef::cuda(&x, s).unwrap(),
            &TensorRef::cuda(&y, s).unwrap(),
            out,
        )
        .unwrap();
    });
    rows.push(Row {
        what: format!("feature MSE {s} f32 fwd+bwd"),
        ms,
        bytes: bytes * 3.0,
    });
    rows
}

fn cpu_row() -> Row {
    let s = Shape::new(1, 3, 256, 256);
    let n = s.n * s.c * s.h * s.w;
    let x: Vec<f32> = (0..n).map(|i| (i % 97) as f32 / 97.0).collect();
    let mut grad = vec![0f32; n];
    let tv = TvLoss::new(TvConfig::default()).unwrap();
    let samples = (0..10)
        .map(|_| {
            let mut loss = 0f32;
            let t = Instant::now();
            let out = LossOutputs::new(TensorMut::scalar(&mut loss))
                .with_grad(TensorMut::host(&mut grad, s).unwrap());
            tv.compute(&Device::cpu(), &TensorRef::host(&x, s).unwrap(), out)
                .unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    Row {
        what: format!("tv Article {s} f32 fwd+bwd (CPU)"),
        ms: median(samples),
        bytes: (n * 8) as f64,
    }
}

fn main() {
    let mut rows = vec![cpu_row()];
    match Device::cuda(0) {
        Ok(dev) => {
            println!("device: {}", dev.name());
            rows.extend(gpu_rows(&dev));
        }
        Err(e) => println!("skipped: no CUDA device ({e})"),
    }
    println!("\n| benchmark | median ms | GB/s | % of {CEILING_GBS} GB/s |");
    println!("|---|---|---|---|");
    for r in rows {
        let gbs = r.bytes / (r.ms * 1e-3) / 1e9;
        let share = if r.what.contains("CPU") {
            "-".to_string()
        } else {
            format!("{:.0}%", 100.0 * gbs / CEILING_GBS)
        };
        println!("| {} | {:.4} | {:.0} | {share} |", r.what, r.ms, gbs);
    }
}
