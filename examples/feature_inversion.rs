//! The main job: shows the gradients working. Starting from noise, an image
//! is optimised with Adam so that its VGG16 features match a target image's
//! (perceptual loss plus a little TV), on the best device. Every few steps
//! the image is written as PNG, and at the end the loss curve as SVG.
//!
//! `cargo run --release --example feature_inversion -- [--target img.png]
//!  [--weights vgg16.safetensors] [--size 64] [--steps 120] [--out inversion]`
//!
//! Without `--weights` it uses seeded stand-in weights, so the image comes
//! to match the features of a random network; real runs use weights
//! exported from torchvision with `scripts/export_vgg.py`.

use indicatif::{ProgressBar, ProgressStyle};
use perceptual_loss::images::{load_rgb, save_png};
use perceptual_loss::{
    seeded_safetensors, DType, Device, Error, LossOutputs, PerceptualConfig, PerceptualLoss,
    Result, Shape, Tap, TensorMut, TensorRef, TvConfig, TvLoss, Vgg, VggArch, WeightsSource,
};
use std::path::PathBuf;
use std::time::Instant;

struct Args {
    target: Option<PathBuf>,
    weights: Option<PathBuf>,
    size: usize,
    steps: usize,
    out: PathBuf,
}

fn args() -> Result<Args> {
    let mut a = Args {
        target: None,
        weights: None,
        size: 64,
        steps: 120,
        out: "inversion".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| Error::InvalidArgument(format!("{flag} needs a value")))
        };
        let number = |v: String| {
            v.parse::<usize>()
                .map_err(|_| Error::InvalidArgument(format!("not a number: {v}")))
        };
        match flag.as_str() {
            "--target" => a.target = Some(value()?.into()),
            "--weights" => a.weights = Some(value()?.into()),
            "--size" => a.size = number(value()?)?.max(16),
            "--steps" => a.steps = number(value()?)?.max(1),
            "--out" => a.out = value()?.into(),
            other => return Err(Error::InvalidArgument(format!("unknown option {other}"))),
        }
    }
    Ok(a)
}

/// A colourful target: rings and stripes.
fn generated_target(size: usize) -> Vec<f32> {
    let mut img = vec![0f32; 3 * size * size];
    for i in 0..size {
        for j in 0..size {
            let (y, x) = (i as f32 / size as f32 - 0.5, j as f32 / size as f32 - 0.5);
            let r = (x * x + y * y).sqrt();
            let px = [
                0.5 + 0.5 * (r * 40.0).sin(),
                0.5 + 0.5 * (x * 25.0).cos(),
                0.5 + 0.5 * ((x + y) * 15.0).sin(),
            ];
            for c in 0..3 {
                img[(c * size + i) * size + j] = px[c];
            }
        }
    }
    img
}

/// The loss curve as an SVG polyline, log-scaled.
fn svg(losses: &[f32]) -> String {
    let (w, h, pad) = (640.0, 360.0, 40.0);
    let logs: Vec<f64> = losses
        .iter()
        .map(|&l| (l.max(1e-12) as f64).log10())
        .collect();
    let (lo, hi) = logs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let span = (hi - lo).max(1e-9);
    let points: Vec<String> = logs
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let x = pad + (w - 2.0 * pad) * k as f64 / (logs.len().max(2) - 1) as f64;
            let y = pad + (h - 2.0 * pad) * (hi - v) / span;
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{pad}\" y=\"24\" font-family=\"sans-serif\" font-size=\"14\">loss (log scale): {:.4e} at step 1, {:.4e} at step {}</text>\n\
         <polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n</svg>\n",
        losses.first().copied().unwrap_or(0.0),
        losses.last().copied().unwrap_or(0.0),
        losses.len(),
        points.join(" ")
    )
}

/// Adam on a flat parameter vector.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    fn step(&mut self, x: &mut [f32], g: &[f32], lr: f32) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        self.t += 1;
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for i in 0..x.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            x[i] = (x[i] - lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + eps)).clamp(0.0, 1.0);
        }
    }
}

fn main() -> Result<()> {
    let a = args()?;
    let device = Device::best();
    let (shape, target) = match &a.target {
        Some(p) => load_rgb(p)?,
        None => (Shape::new(1, 3, a.size, a.size), generated_target(a.size)),
    };
    let (bytes, source) = match &a.weights {
        Some(p) => (
            std::fs::read(p).map_err(|e| Error::Io(format!("{}: {e}", p.display())))?,
            p.display().to_string(),
        ),
        None => (
            seeded_safetensors(VggArch::Vgg16, 0)?,
            "seeded stand-in weights (real runs: --weights from scripts/export_vgg.py)".into(),
        ),
    };
    println!(
        "device: {}; image {shape}; weights: {source}",
        device.name()
    );
    let vgg = Vgg::load(
        &device,
        WeightsSource::Bytes(&bytes),
        VggArch::Vgg16,
        DType::F32,
    )?;
    let config = PerceptualConfig {
        taps: ["relu1_2", "relu2_2", "relu3_3"]
            .into_iter()
            .map(Tap::from)
            .collect(),
        ..Default::default()
    };
    let perceptual = PerceptualLoss::new(vgg, &config)?;
    let tv = TvLoss::new(TvConfig {
        weight: 1e-3,
        ..Default::default()
    })?;

    let n = target.len();
    let mut state = 0x853c_49e6_748f_ea9bu64;
    let mut x: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    std::fs::create_dir_all(&a.out).map_err(|e| Error::Io(format!("{}: {e}", a.out.display())))?;
    save_png(&a.out.join("target.png"), &target, shape, 0)?;

    let mut adam = Adam {
        m: vec![0.0; n],
        v: vec![0.0; n],
        t: 0,
    };
    let mut grad = vec![0f32; n];
    let mut losses = Vec::with_capacity(a.steps);
    let bar = ProgressBar::new(a.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let every = (a.steps / 6).max(1);
    for step in 1..=a.steps {
        let (p, t) = compute(&device, &perceptual, &tv, &x, &target, shape, &mut grad)?;
        losses.push(p + t);
        adam.step(&mut x, &grad, 0.05);
        bar.set_message(format!("perceptual {p:.4e}  tv {t:.3e}"));
        bar.inc(1);
        if step % every == 0 || step == a.steps {
            save_png(&a.out.join(format!("step_{step:04}.png")), &x, shape, 0)?;
        }
    }
    bar.finish_and_clear();
    std::fs::write(a.out.join("loss.svg"), svg(&losses)).map_err(|e| Error::Io(e.to_string()))?;
    println!(
        "{} steps in {:.1} s: loss {:.4e} -> {:.4e}; images and loss.svg in {}",
        a.steps,
        started.elapsed().as_secs_f64(),
        losses[0],
        losses[losses.len() - 1],
        a.out.display()
    );
    Ok(())
}

/// Perceptual and TV losses of `x`, with their summed gradient in `grad`.
fn compute(
    device: &Device,
    perceptual: &PerceptualLoss,
    tv: &TvLoss,
    x: &[f32],
    target: &[f32],
    s: Shape,
    grad: &mut [f32],
) -> Result<(f32, f32)> {
    let (mut p, mut t) = (0f32, 0f32);
    match device.cuda_stream() {
        None => {
            let (xr, tr) = (TensorRef::host(x, s)?, TensorRef::host(target, s)?);
            perceptual.compute(
                &xr,
                &tr,
                LossOutputs::new(TensorMut::scalar(&mut p)).with_grad(TensorMut::host(grad, s)?),
            )?;
            // TV's gradient is added to the perceptual one (beta = 1).
            tv.compute(
                device,
                &xr,
                LossOutputs::new(TensorMut::scalar(&mut t))
                    .with_grad(TensorMut::host(grad, s)?)
                    .accumulate(1.0),
            )?;
        }
        Some(st) => {
            let err = |e: perceptual_loss::cudarc::driver::DriverError| Error::Cuda(e.to_string());
            let (xd, td) = (
                st.clone_htod(x).map_err(err)?,
                st.clone_htod(target).map_err(err)?,
            );
            let mut gd = st.alloc_zeros::<f32>(x.len()).map_err(err)?;
            let (mut pd, mut tvd) = (
                st.alloc_zeros::<f32>(1).map_err(err)?,
                st.alloc_zeros::<f32>(1).map_err(err)?,
            );
            let (xr, tr) = (TensorRef::cuda(&xd, s)?, TensorRef::cuda(&td, s)?);
            perceptual.compute(
                &xr,
                &tr,
                LossOutputs::new(TensorMut::cuda(&mut pd, Shape::flat(1))?)
                    .with_grad(TensorMut::cuda(&mut gd, s)?),
            )?;
            tv.compute(
                device,
                &xr,
                LossOutputs::new(TensorMut::cuda(&mut tvd, Shape::flat(1))?)
                    .with_grad(TensorMut::cuda(&mut gd, s)?)
                    .accumulate(1.0),
            )?;
            st.memcpy_dtoh(&gd, grad).map_err(err)?;
            p = st.clone_dtoh(&pd).map_err(err)?[0];
            t = st.clone_dtoh(&tvd).map_err(err)?[0];
        }
    }
    Ok((p, t))
}
