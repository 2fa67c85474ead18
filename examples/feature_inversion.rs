//! The main job: shows the gradients working. Starting from noise, an image
//! is optimised with Adam so that its VGG16 features match a target image's
//! (perceptual loss plus a little TV), on the best device. The starting
//! noise and then every few steps the image is written as PNG
//! (`step_0000.png` on), and at the end the loss curve as SVG.
//!
//! `cargo run --release --example feature_inversion -- [--target img.png]
//!  [--weights vgg16.safetensors] [--size 64] [--steps 120] [--out inversion]
//!  [--style style.png|generated]`
//!
//! With `--style` it is style transfer instead: the image matches the
//! target's relu3_3 features (the content) and the style image's Gram
//! matrices at relu1_2, relu2_2 and relu3_3, the style image kept by its
//! loss (`set_target`) so that each step runs the network over the image
//! alone for that term.
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
    /// A style image, or "generated".
    style: Option<String>,
    weights: Option<PathBuf>,
    size: usize,
    steps: usize,
    out: PathBuf,
}

fn args() -> Result<Args> {
    let mut a = Args {
        target: None,
        style: None,
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
            "--style" => a.style = Some(value()?),
            "--weights" => a.weights = Some(value()?.into()),
            "--size" => a.size = number(value()?)?.max(16),
            "--steps" => a.steps = number(value()?)?.max(1),
            "--out" => a.out = value()?.into(),
            other => return Err(Error::InvalidArgument(format!("unknown option {other}"))),
        }
    }
    Ok(a)
}

/// A style image of `shape`: a file, or diagonal stripes for "generated".
fn style_image(spec: &str, shape: Shape) -> Result<Vec<f32>> {
    if spec != "generated" {
        let (s, v) = load_rgb(std::path::Path::new(spec))?;
        if (s.h, s.w) != (shape.h, shape.w) {
            return Err(Error::InvalidShape(format!(
                "the style image is {}x{}; use one of the target's size, {}x{}",
                s.w, s.h, shape.w, shape.h
            )));
        }
        return Ok(v);
    }
    let (h, w) = (shape.h, shape.w);
    let mut img = vec![0f32; 3 * h * w];
    for i in 0..h {
        for j in 0..w {
            let band = ((i + 2 * j) / 5) % 3;
            for c in 0..3 {
                img[(c * h + i) * w + j] = if c == band { 0.9 } else { 0.15 };
            }
        }
    }
    Ok(img)
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

/// The SVG canvas and the margins around its plot area, which hold the
/// tick labels and the axis titles.
const SVG_W: f64 = 640.0;
const SVG_H: f64 = 400.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 56.0;

/// The loss curve as SVG: loss after each number of steps, on a log axis.
fn svg(losses: &[f32]) -> String {
    // Clamped so that a zero, infinite or NaN loss still has a place on the
    // axis (NaN at the top) instead of making the SVG invalid.
    let logs: Vec<f64> = losses
        .iter()
        .map(|&l| {
            let l = if l.is_nan() { f32::MAX } else { l };
            (l.clamp(1e-12, f32::MAX) as f64).log10()
        })
        .collect();
    let (lo, hi) = logs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (y_ticks, last) = (log_ticks(lo, hi), logs.len() - 1);
    let (y_lo, y_hi) = (y_ticks[0].0, y_ticks[y_ticks.len() - 1].0);
    let x = |step: usize| LEFT + (SVG_W - LEFT - RIGHT) * step as f64 / last.max(1) as f64;
    let y = |log: f64| TOP + (SVG_H - TOP - BOTTOM) * (y_hi - log) / (y_hi - y_lo);
    let (x0, x1, y0, y1) = (x(0), x(last.max(1)), y(y_lo), y(y_hi));
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{SVG_W}\" height=\"{SVG_H}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"24\" font-size=\"14\">loss: {:.4e} at step 0, {:.4e} at step {last}</text>\n",
        losses[0], losses[last]
    );
    for step in step_ticks(last) {
        let xs = x(step);
        out += &format!(
            "<line x1=\"{xs:.1}\" y1=\"{y1:.1}\" x2=\"{xs:.1}\" y2=\"{y0:.1}\" stroke=\"#e5e5e5\"/>\n\
             <line x1=\"{xs:.1}\" y1=\"{y0:.1}\" x2=\"{xs:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
             <text x=\"{xs:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{step}</text>\n",
            y0 + 5.0,
            y0 + 19.0
        );
    }
    for (log, label) in &y_ticks {
        let ys = y(*log);
        out += &format!(
            "<line x1=\"{x0:.1}\" y1=\"{ys:.1}\" x2=\"{x1:.1}\" y2=\"{ys:.1}\" stroke=\"#e5e5e5\"/>\n\
             <line x1=\"{:.1}\" y1=\"{ys:.1}\" x2=\"{x0:.1}\" y2=\"{ys:.1}\" stroke=\"black\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>\n",
            x0 - 5.0,
            x0 - 8.0,
            ys + 4.0
        );
    }
    let points: Vec<String> = logs
        .iter()
        .enumerate()
        .map(|(step, &log)| format!("{:.1},{:.1}", x(step), y(log)))
        .collect();
    out + &format!(
        "<polyline fill=\"none\" stroke=\"black\" points=\"{x0:.1},{y1:.1} {x0:.1},{y0:.1} {x1:.1},{y0:.1}\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">step (Adam updates)</text>\n\
         <text transform=\"translate(18,{:.1}) rotate(-90)\" text-anchor=\"middle\">loss (log scale)</text>\n\
         <polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n</svg>\n",
        (x0 + x1) / 2.0,
        SVG_H - 14.0,
        (y0 + y1) / 2.0,
        points.join(" ")
    )
}

/// Ticks from 0 to `last` at a 1-2-5 stride, at most seven of them.
fn step_ticks(last: usize) -> Vec<usize> {
    let wanted = last.div_ceil(6).max(1);
    let stride = (0..)
        .flat_map(|p| [1, 2, 5].map(|m| m * 10usize.pow(p)))
        .find(|&s| s >= wanted)
        .unwrap_or(wanted);
    (0..=last).step_by(stride).collect()
}

/// Ticks on a log10 axis covering [lo, hi] (log10 values), as (log10
/// value, label): 1, 2, 5 in each decade over up to two decades, powers of
/// ten beyond. The first and last ticks enclose [lo, hi], so they are also
/// the axis ends.
fn log_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let (d0, d1) = (lo.floor() as i32, hi.floor() as i32 + 1);
    let decades = d1 - d0;
    let ticks: Vec<(u32, i32)> = if decades <= 2 {
        let all: Vec<(u32, i32)> = (d0..d1)
            .flat_map(|d| [1, 2, 5].map(|m| (m, d)))
            .chain([(1, d1)])
            .collect();
        let log = |&(m, d): &(u32, i32)| d as f64 + (m as f64).log10();
        let first = all.iter().rposition(|t| log(t) <= lo).unwrap_or(0);
        let end = all[first + 1..]
            .iter()
            .position(|t| log(t) >= hi)
            .map_or(all.len() - 1, |k| first + 1 + k);
        all[first..=end].to_vec()
    } else {
        // At most seven powers of ten, the last at or above hi.
        let decades = decades as usize;
        let stride = decades.div_ceil(6);
        let top = d0 + (stride * decades.div_ceil(stride)) as i32;
        (d0..=top).step_by(stride).map(|d| (1, d)).collect()
    };
    ticks
        .into_iter()
        .map(|(m, d)| (d as f64 + (m as f64).log10(), tick_label(m, d)))
        .collect()
}

/// m x 10^d written plainly (0.05, 2, 100), or as 1e-6 beyond three places.
fn tick_label(m: u32, d: i32) -> String {
    match d {
        0..=3 => format!("{m}{}", "0".repeat(d as usize)),
        -3..=-1 => format!("0.{}{m}", "0".repeat((-d - 1) as usize)),
        _ => format!("{m}e{d}"),
    }
}

/// The taps matched here: the crate's default ones without the deepest.
const TAPS: [&str; 3] = ["relu1_2", "relu2_2", "relu3_3"];

/// Says which taps this demo uses where they differ from the crate's
/// default, so that its losses are not taken for the default loss's.
fn say_taps() {
    let default: Vec<String> = PerceptualConfig::default()
        .taps
        .iter()
        .map(|t| match t {
            Tap::Index(i) => VggArch::Vgg16
                .layer_name(*i)
                .unwrap_or_else(|| i.to_string()),
            Tap::Name(n) => n.clone(),
        })
        .collect();
    if default != TAPS {
        println!(
            "taps: {} (the crate's default is {}): the deepest taps cost the most per step, \
             and this demo should take seconds on a CPU",
            TAPS.join(", "),
            default.join(", ")
        );
    }
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
    let taps: &[&str] = if a.style.is_some() {
        &["relu3_3"]
    } else {
        &TAPS
    };
    if a.style.is_none() {
        say_taps();
    }
    let config = PerceptualConfig {
        taps: taps.iter().map(|&t| Tap::from(t)).collect(),
        ..Default::default()
    };
    let perceptual = PerceptualLoss::new(vgg.clone(), &config)?;
    let style = match &a.style {
        None => None,
        Some(spec) => {
            let image = style_image(spec, shape)?;
            let style = PerceptualLoss::new(
                vgg,
                &PerceptualConfig {
                    taps: vec![],
                    style_taps: STYLE_TAPS.into_iter().map(Tap::from).collect(),
                    style_weight: STYLE_WEIGHT,
                    ..Default::default()
                },
            )?;
            keep_target(&device, &style, &image, shape)?;
            std::fs::create_dir_all(&a.out)
                .map_err(|e| Error::Io(format!("{}: {e}", a.out.display())))?;
            save_png(&a.out.join("style.png"), &image, shape, 0)?;
            println!(
                "style transfer: content relu3_3 of the target, style Grams at {} of the style image (kept by its loss)",
                STYLE_TAPS.join(", ")
            );
            Some(style)
        }
    };
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
    // Step k is the image after k updates: step 0 is the starting noise, and
    // the loss is also measured after the last update, so that each saved
    // image has its point on the curve.
    for step in 0..=a.steps {
        let losses_now = compute(
            &device,
            (&perceptual, style.as_ref(), &tv),
            &x,
            &target,
            shape,
            &mut grad,
        )?;
        let (p, t) = (losses_now.0 + losses_now.1, losses_now.2);
        losses.push(p + t);
        if step % every == 0 || step == a.steps {
            save_png(&a.out.join(format!("step_{step:04}.png")), &x, shape, 0)?;
        }
        if step < a.steps {
            adam.step(&mut x, &grad, 0.05);
            bar.set_message(format!("perceptual {p:.4e}  tv {t:.3e}"));
            bar.inc(1);
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

/// The style layers and weight of `--style`.
const STYLE_TAPS: [&str; 3] = ["relu1_2", "relu2_2", "relu3_3"];
const STYLE_WEIGHT: f32 = 1e4;

/// Has `loss` keep the style image (copied from a device buffer on CUDA).
fn keep_target(device: &Device, loss: &PerceptualLoss, image: &[f32], s: Shape) -> Result<()> {
    match device.cuda_stream() {
        None => loss.set_target(&TensorRef::host(image, s)?),
        Some(st) => {
            let d = (st.clone_htod(image)).map_err(|e| Error::Cuda(e.to_string()))?;
            loss.set_target(&TensorRef::cuda(&d, s)?)
        }
    }
}

/// Perceptual, style (against its kept target, when given) and TV losses
/// of `x`, with their summed gradient in `grad`.
fn compute(
    device: &Device,
    (perceptual, style, tv): (&PerceptualLoss, Option<&PerceptualLoss>, &TvLoss),
    x: &[f32],
    target: &[f32],
    s: Shape,
    grad: &mut [f32],
) -> Result<(f32, f32, f32)> {
    let (mut p, mut st_loss, mut t) = (0f32, 0f32, 0f32);
    match device.cuda_stream() {
        None => {
            let (xr, tr) = (TensorRef::host(x, s)?, TensorRef::host(target, s)?);
            perceptual.compute(
                &xr,
                &tr,
                LossOutputs::new(TensorMut::scalar(&mut p)).with_grad(TensorMut::host(grad, s)?),
            )?;
            if let Some(style) = style {
                style.compute_resident(
                    &xr,
                    LossOutputs::new(TensorMut::scalar(&mut st_loss))
                        .with_grad(TensorMut::host(grad, s)?)
                        .accumulate(1.0),
                )?;
            }
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
            let (mut pd, mut sd, mut tvd) = (
                st.alloc_zeros::<f32>(1).map_err(err)?,
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
            if let Some(style) = style {
                style.compute_resident(
                    &xr,
                    LossOutputs::new(TensorMut::cuda(&mut sd, Shape::flat(1))?)
                        .with_grad(TensorMut::cuda(&mut gd, s)?)
                        .accumulate(1.0),
                )?;
            }
            tv.compute(
                device,
                &xr,
                LossOutputs::new(TensorMut::cuda(&mut tvd, Shape::flat(1))?)
                    .with_grad(TensorMut::cuda(&mut gd, s)?)
                    .accumulate(1.0),
            )?;
            st.memcpy_dtoh(&gd, grad).map_err(err)?;
            p = st.clone_dtoh(&pd).map_err(err)?[0];
            st_loss = st.clone_dtoh(&sd).map_err(err)?[0];
            t = st.clone_dtoh(&tvd).map_err(err)?[0];
        }
    }
    Ok((p, st_loss, t))
}
