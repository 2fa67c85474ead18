//! The main job: TV, feature and VGG16 perceptual losses with gradients on
//! generated images, on the best device (CUDA device 0 when usable, else
//! the CPU), printing values and timings.
//!
//! `cargo run --release --example losses [-- --weights vgg16.safetensors]`
//!
//! Without `--weights` the perceptual loss uses seeded stand-in weights
//! (`seeded_safetensors`); real runs use weights exported from torchvision
//! with `scripts/export_vgg.py`.

use perceptual_loss::cudarc::driver::{CudaSlice, CudaStream};
use perceptual_loss::{
    seeded_safetensors, Criterion, DType, Device, Error, FeatureLoss, LossOutputs,
    PerceptualConfig, PerceptualLoss, Reduction, Result, Shape, TensorMut, TensorRef, TvConfig,
    TvLoss, TvVariant, Vgg, VggArch, WeightsSource,
};
use std::sync::Arc;
use std::time::Instant;

/// A smooth colour ramp, and the same ramp with deterministic speckle noise.
fn images(s: Shape) -> (Vec<f32>, Vec<f32>) {
    let mut clean = Vec::with_capacity(s.n * s.c * s.h * s.w);
    for n in 0..s.n {
        for c in 0..s.c {
            for i in 0..s.h {
                for j in 0..s.w {
                    let u = i as f32 / s.h as f32;
                    let v = j as f32 / s.w as f32;
                    clean.push(0.5 + 0.4 * ((u * 3.0 + c as f32) + v * (1.0 + n as f32)).sin());
                }
            }
        }
    }
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noisy = clean
        .iter()
        .map(|&p| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            p + ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect();
    (clean, noisy)
}

/// A loss call: (pred, target, outputs).
type LossCall<'f> = &'f dyn Fn(TensorRef, TensorRef, LossOutputs) -> Result<()>;

/// Inputs and outputs resident where the device computes, so timing covers
/// the loss call and reading back the results.
enum Buffers {
    Host {
        shape: Shape,
        pred: Vec<f32>,
        target: Vec<f32>,
        grad: Vec<f32>,
    },
    Cuda {
        shape: Shape,
        stream: Arc<CudaStream>,
        pred: CudaSlice<f32>,
        target: CudaSlice<f32>,
        grad: CudaSlice<f32>,
        loss: CudaSlice<f32>,
    },
}

fn cuda_err(e: impl std::fmt::Display) -> Error {
    Error::Cuda(e.to_string())
}

impl Buffers {
    fn new(device: &Device, shape: Shape, pred: Vec<f32>, target: Vec<f32>) -> Result<Self> {
        let n = pred.len();
        Ok(match device.cuda_stream() {
            None => Buffers::Host {
                shape,
                pred,
                target,
                grad: vec![0.0; n],
            },
            Some(stream) => Buffers::Cuda {
                shape,
                pred: stream.clone_htod(&pred).map_err(cuda_err)?,
                target: stream.clone_htod(&target).map_err(cuda_err)?,
                grad: stream.alloc_zeros(n).map_err(cuda_err)?,
                loss: stream.alloc_zeros(1).map_err(cuda_err)?,
                stream: stream.clone(),
            },
        })
    }

    /// Runs `call` and returns the loss and the gradient's L2 norm.
    fn run(&mut self, call: LossCall) -> Result<(f32, f32)> {
        let norm = |g: &[f32]| g.iter().map(|v| v * v).sum::<f32>().sqrt();
        match self {
            Buffers::Host {
                shape,
                pred,
                target,
                grad,
            } => {
                let mut loss = 0f32;
                let out = LossOutputs::new(TensorMut::scalar(&mut loss))
                    .with_grad(TensorMut::host(grad, *shape)?);
                call(
                    TensorRef::host(pred, *shape)?,
                    TensorRef::host(target, *shape)?,
                    out,
                )?;
                Ok((loss, norm(grad)))
            }
            Buffers::Cuda {
                shape,
                stream,
                pred,
                target,
                grad,
                loss,
            } => {
                let out = LossOutputs::new(TensorMut::cuda(loss, Shape::flat(1))?)
                    .with_grad(TensorMut::cuda(grad, *shape)?);
                call(
                    TensorRef::cuda(pred, *shape)?,
                    TensorRef::cuda(target, *shape)?,
                    out,
                )?;
                let value = stream.clone_dtoh(loss).map_err(cuda_err)?[0];
                Ok((value, norm(&stream.clone_dtoh(grad).map_err(cuda_err)?)))
            }
        }
    }
}

fn main() -> Result<()> {
    let device = Device::best();
    let s = if device.cuda_stream().is_some() {
        Shape::new(8, 3, 512, 512)
    } else {
        Shape::new(2, 3, 128, 128)
    };
    println!(
        "device: {} ({:?}), images {s} f32",
        device.name(),
        device.kind()
    );
    let (clean, noisy) = images(s);
    let mut bufs = Buffers::new(&device, s, noisy, clean)?;

    println!("\n| loss | value | gradient L2 norm | ms (incl. copy back) |");
    println!("|---|---|---|---|");
    let mut report = |name: String, call: LossCall| -> Result<()> {
        bufs.run(call)?; // warm-up: loads kernels, sizes scratch memory
        let t = Instant::now();
        let (loss, norm) = bufs.run(call)?;
        println!(
            "| {name} | {loss:.6} | {norm:.6} | {:.3} |",
            t.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    };
    for (variant, reduction) in [
        (TvVariant::Article, Reduction::Mean),
        (TvVariant::L1, Reduction::Mean),
        (TvVariant::L2Squared, Reduction::Sum),
        (TvVariant::L2, Reduction::Mean),
        (TvVariant::Isotropic, Reduction::Mean),
    ] {
        let tv = TvLoss::new(TvConfig {
            variant,
            reduction,
            ..Default::default()
        })?;
        report(
            format!("tv {variant:?} ({reduction:?}) of the noisy image"),
            &|p, _t, out| tv.compute(&device, &p, out),
        )?;
    }
    for criterion in [Criterion::Mse, Criterion::Mae] {
        let f = FeatureLoss::new(criterion, 1.0)?;
        report(format!("{criterion:?} noisy vs clean"), &|p, t, out| {
            f.compute(&device, &p, &t, out)
        })?;
    }

    let args: Vec<String> = std::env::args().collect();
    let (bytes, source) = match args.iter().position(|a| a == "--weights") {
        Some(i) => {
            let path = args
                .get(i + 1)
                .ok_or_else(|| Error::InvalidArgument("--weights needs a path".into()))?;
            (
                std::fs::read(path).map_err(|e| Error::Io(format!("{path}: {e}")))?,
                path.clone(),
            )
        }
        None => (
            seeded_safetensors(VggArch::Vgg16, 0)?,
            "seeded stand-in weights; real runs pass --weights".to_string(),
        ),
    };
    let compute = if device.cuda_stream().is_some() {
        DType::BF16
    } else {
        DType::F32
    };
    let vgg = Vgg::load(
        &device,
        WeightsSource::Bytes(&bytes),
        VggArch::Vgg16,
        compute,
    )?;
    let perceptual = PerceptualLoss::new(vgg, &PerceptualConfig::default())?;
    report(
        format!(
            "perceptual VGG16 relu1_2..relu4_3, {} ({source})",
            compute.name()
        ),
        &|p, t, out| perceptual.compute(&p, &t, out),
    )?;
    Ok(())
}
