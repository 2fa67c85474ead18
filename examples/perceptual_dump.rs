//! Computes a perceptual loss and its gradient on the best device and
//! writes inputs, config and results to a safetensors file, for
//! `scripts/torch_reference.py` to recompute with PyTorch.
//!
//! `cargo run --release --example perceptual_dump -- WEIGHTS OUT [--cpu] [--dtype f32|f16|bf16] [--preset article|basicsr]`
//!
//! WEIGHTS is a safetensors file, or `seeded` for the stand-in weights.

use perceptual_loss::half::{bf16, f16};
use perceptual_loss::{
    Criterion, DType, Device, Element, Error, InputNorm, LossOutputs, PerceptualConfig,
    PerceptualLoss, Result, Shape, Tap, TensorMut, TensorRef, Vgg, VggArch, WeightsSource,
};
use safetensors::{tensor::TensorView, Dtype};
use std::collections::HashMap;

struct Args {
    weights: String,
    out: String,
    cpu: bool,
    dtype: DType,
    preset: String,
}

fn args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let usage = || {
        Error::InvalidArgument("usage: perceptual_dump WEIGHTS OUT [--cpu] [--dtype f32|f16|bf16] [--preset article|basicsr]".into())
    };
    let (weights, out) = (it.next().ok_or_else(usage)?, it.next().ok_or_else(usage)?);
    let mut a = Args {
        weights,
        out,
        cpu: false,
        dtype: DType::F32,
        preset: "article".into(),
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--cpu" => a.cpu = true,
            "--dtype" => {
                a.dtype = match it.next().as_deref() {
                    Some("f32") => DType::F32,
                    Some("f16") => DType::F16,
                    Some("bf16") => DType::BF16,
                    _ => return Err(usage()),
                }
            }
            "--preset" => a.preset = it.next().ok_or_else(usage)?,
            _ => return Err(usage()),
        }
    }
    Ok(a)
}

/// The configurations the PyTorch script knows how to rebuild.
fn preset(name: &str) -> Result<(VggArch, PerceptualConfig)> {
    match name {
        "article" => Ok((VggArch::Vgg16, PerceptualConfig::default())),
        // Real-ESRGAN style: VGG19 pre-activation conv taps, L1, ImageNet input norm.
        "basicsr" => Ok((
            VggArch::Vgg19,
            PerceptualConfig {
                taps: ["conv1_2", "conv2_2", "conv3_4", "conv4_4", "conv5_4"]
                    .into_iter()
                    .map(Tap::from)
                    .collect(),
                tap_weights: vec![0.1, 0.1, 1.0, 1.0, 1.0],
                criterion: Criterion::Mae,
                input_norm: InputNorm::Imagenet,
                ..Default::default()
            },
        )),
        _ => Err(Error::InvalidArgument(format!("unknown preset {name}"))),
    }
}

fn convert<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x as f64)).collect()
}

fn run<T: Element>(
    device: &Device,
    loss: &PerceptualLoss,
    pred: &[f32],
    target: &[f32],
    s: Shape,
) -> Result<(f32, Vec<f64>)> {
    let (p, t) = (convert::<T>(pred), convert::<T>(target));
    let n = pred.len();
    let err = |e: perceptual_loss::cudarc::driver::DriverError| Error::Cuda(e.to_string());
    match device.cuda_stream() {
        None => {
            let mut g = vec![T::from_f64(0.0); n];
            let mut value = 0f32;
            loss.compute(
                &TensorRef::host(&p, s)?,
                &TensorRef::host(&t, s)?,
                LossOutputs::new(TensorMut::scalar(&mut value))
                    .with_grad(TensorMut::host(&mut g, s)?),
            )?;
            Ok((value, g.iter().map(|v| v.to_f64()).collect()))
        }
        Some(st) => {
            let (pd, td) = (
                st.clone_htod(&p).map_err(err)?,
                st.clone_htod(&t).map_err(err)?,
            );
            let mut gd = st.clone_htod(&vec![T::from_f64(0.0); n]).map_err(err)?;
            let mut ld = st.alloc_zeros::<f32>(1).map_err(err)?;
            loss.compute(
                &TensorRef::cuda(&pd, s)?,
                &TensorRef::cuda(&td, s)?,
                LossOutputs::new(TensorMut::cuda(&mut ld, Shape::flat(1))?)
                    .with_grad(TensorMut::cuda(&mut gd, s)?),
            )?;
            let value = st.clone_dtoh(&ld).map_err(err)?[0];
            Ok((
                value,
                st.clone_dtoh(&gd)
                    .map_err(err)?
                    .iter()
                    .map(|v| v.to_f64())
                    .collect(),
            ))
        }
    }
}

fn main() -> Result<()> {
    let a = args()?;
    let device = if a.cpu { Device::cpu() } else { Device::best() };
    let (arch, cfg) = preset(&a.preset)?;
    let seeded;
    let source = if a.weights == "seeded" {
        seeded = perceptual_loss::seeded_safetensors(arch, 0)?;
        WeightsSource::Bytes(&seeded)
    } else {
        WeightsSource::Path(a.weights.as_ref())
    };
    let vgg = Vgg::load(&device, source, arch, a.dtype)?;
    let loss = PerceptualLoss::new(vgg, &cfg)?;
    let s = Shape::new(2, 3, 64, 48);
    let n = s.n * s.c * s.h * s.w;
    let pred: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1009) as f32 / 1009.0)
        .collect();
    let target: Vec<f32> = (0..n)
        .map(|i| ((i * 104_729) % 997) as f32 / 997.0)
        .collect();
    let (value, grad) = match a.dtype {
        DType::F32 => run::<f32>(&device, &loss, &pred, &target, s)?,
        DType::F16 => run::<f16>(&device, &loss, &pred, &target, s)?,
        DType::BF16 => run::<bf16>(&device, &loss, &pred, &target, s)?,
    };
    // Inputs are stored as the f32 values of what the loss saw (rounded to dtype).
    let seen = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|&x| {
                let y = match a.dtype {
                    DType::F32 => x,
                    DType::F16 => f16::from_f32(x).to_f32(),
                    DType::BF16 => bf16::from_f32(x).to_f32(),
                };
                y.to_le_bytes()
            })
            .collect()
    };
    let (pb, tb) = (seen(&pred), seen(&target));
    let gb: Vec<u8> = grad
        .iter()
        .flat_map(|&g| (g as f32).to_le_bytes())
        .collect();
    let lb = value.to_le_bytes().to_vec();
    let shape = vec![s.n, s.c, s.h, s.w];
    let tensors = vec![
        (
            "pred",
            TensorView::new(Dtype::F32, shape.clone(), &pb).unwrap(),
        ),
        (
            "target",
            TensorView::new(Dtype::F32, shape.clone(), &tb).unwrap(),
        ),
        ("grad", TensorView::new(Dtype::F32, shape, &gb).unwrap()),
        ("loss", TensorView::new(Dtype::F32, vec![1], &lb).unwrap()),
    ];
    let meta: HashMap<String, String> = [
        ("preset", a.preset.clone()),
        ("dtype", a.dtype.name().to_string()),
        ("device", device.name()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let file = safetensors::serialize(tensors, Some(meta)).map_err(|e| Error::Io(e.to_string()))?;
    std::fs::write(&a.out, file).map_err(|e| Error::Io(format!("{}: {e}", a.out)))?;
    println!(
        "{} on {}: loss {value} written to {}",
        a.preset,
        device.name(),
        a.out
    );
    Ok(())
}
