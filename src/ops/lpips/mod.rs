//! LPIPS (version 0.1, VGG16), as richzhang/PerceptualSimilarity defines
//! it; the formula is in [`Lpips`]'s documentation.
//!
//! LPIPS is a perceptual loss over fixed taps with its own distance, so it
//! runs on the perceptual loss's machinery (both backends): the spec's
//! `lpips` weights make each perceptual tap an LPIPS term. `cpu.rs` has
//! the term's reference; `kernels/vgg.cu` `pl_vgg_lpips_tap` its kernel.
//!
//! - `weights`: the five per-channel "lin" weights, embedded (converted
//!   from the `lpips` package by scripts/export_lpips_weights.py; licence
//!   in assets/lpips/LICENSE) or read from a safetensors file.

pub(crate) mod cpu;
pub(crate) mod cuda;
mod spatial;

pub use spatial::LpipsMaps;

use super::perceptual::{InputNorm, PerceptualConfig, PerceptualLoss};
use super::LossOutputs;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Shape, TensorRef};
use crate::vgg::{Vgg, VggArch};
use std::sync::Arc;

/// The VGG16 layers LPIPS compares: relu1_2, relu2_2, relu3_3, relu4_3,
/// relu5_3.
pub const LPIPS_TAPS: [usize; 5] = [3, 8, 15, 22, 29];

/// Channels of each LPIPS layer.
const CHANNELS: [usize; 5] = [64, 128, 256, 512, 512];

/// The v0.1 VGG lin weights of the `lpips` package, as safetensors.
const V0_1: &[u8] = include_bytes!("../../../assets/lpips/vgg-v0.1.safetensors");

/// The largest lin weights file read: the real one is about 6 KB.
const MAX_FILE: u64 = 1 << 20;

/// LPIPS's per-channel weights w_{l,c} of its five layers (the 1x1 "lin"
/// convolutions, no bias), non-negative and finite.
#[derive(Debug, Clone, PartialEq)]
pub struct LinWeights {
    /// All five layers' weights, one after the other.
    values: Vec<f32>,
}

impl LinWeights {
    /// The v0.1 VGG weights the `lpips` package ships (BSD-2-Clause, see
    /// assets/lpips/LICENSE), embedded in the crate.
    pub fn v0_1() -> LinWeights {
        // Parsed once (every default config takes them); the embedded file
        // is checked by a unit test.
        static PARSED: std::sync::OnceLock<LinWeights> = std::sync::OnceLock::new();
        PARSED
            .get_or_init(|| {
                LinWeights::from_safetensors(V0_1).expect("the embedded LPIPS weights are valid")
            })
            .clone()
    }

    /// All weights 1: the plain sum over channels (`lin=False`).
    pub fn ones() -> LinWeights {
        LinWeights {
            values: vec![1.0; CHANNELS.iter().sum()],
        }
    }

    /// Weights from safetensors bytes with keys `lin0`..`lin4`, of shapes
    /// (1, C, 1, 1) (or (C,)) for C = 64, 128, 256, 512, 512, in f32, f16
    /// or bf16; negative or non-finite weights are refused.
    pub fn from_safetensors(bytes: &[u8]) -> Result<LinWeights> {
        let bad = |m: String| Error::InvalidWeights(format!("LPIPS lin weights: {m}"));
        let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let mut values = Vec::with_capacity(CHANNELS.iter().sum());
        for (k, &c) in CHANNELS.iter().enumerate() {
            let name = format!("lin{k}");
            let t = file
                .tensor(&name)
                .map_err(|_| bad(format!("no tensor {name}")))?;
            let shape = t.shape();
            if shape != [1, c, 1, 1] && shape != [c] {
                return Err(bad(format!(
                    "{name} has shape {shape:?}; it must be [1, {c}, 1, 1]"
                )));
            }
            let data = t.data();
            let layer: Vec<f32> = match t.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                safetensors::Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                safetensors::Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                d => return Err(bad(format!("{name} is {d:?}; use F32, F16 or BF16"))),
            };
            if let Some((i, v)) = layer
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
            {
                return Err(bad(format!(
                    "{name}[{i}] is {v}; LPIPS channel weights are finite and non-negative"
                )));
            }
            values.extend(layer);
        }
        Ok(LinWeights { values })
    }

    /// Weights from a safetensors file (see [`from_safetensors`](Self::from_safetensors)).
    pub fn from_file(path: &std::path::Path) -> Result<LinWeights> {
        let io = |e: std::io::Error| Error::Io(format!("reading {}: {e}", path.display()));
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_FILE {
            return Err(Error::InvalidWeights(format!(
                "LPIPS lin weights {} are {len} bytes; the file is about 6 KB",
                path.display()
            )));
        }
        LinWeights::from_safetensors(&std::fs::read(path).map_err(io)?)
    }

    /// The weights of layer `k` (0..5).
    pub fn layer(&self, k: usize) -> &[f32] {
        let start: usize = CHANNELS[..k].iter().sum();
        &self.values[start..start + CHANNELS[k]]
    }

    /// All five layers' weights, one after the other.
    pub(crate) fn all(&self) -> &[f32] {
        &self.values
    }

    /// Where layer `k`'s weights start in [`all`](Self::all).
    pub(crate) fn offset(k: usize) -> usize {
        CHANNELS[..k].iter().sum()
    }
}

/// Options of an [`Lpips`] metric; `Default` is `lpips.LPIPS(net='vgg')`.
#[derive(Debug, Clone, PartialEq)]
pub struct LpipsConfig {
    /// Inputs in [0, 1] (mapped to [-1, 1] first, LPIPS's
    /// `normalize=True`); default false: inputs in [-1, 1].
    pub normalize: bool,
    /// The per-channel weights: the v0.1 weights by default,
    /// [`LinWeights::ones`] for `lin=False`.
    pub lin: LinWeights,
    /// Multiplies every distance and the gradient; default 1.
    pub weight: f32,
    /// As [`PerceptualConfig::max_chunk_images`].
    pub max_chunk_images: Option<usize>,
    /// As [`PerceptualConfig::memory_budget`].
    pub memory_budget: Option<usize>,
    /// As [`PerceptualConfig::allow_tf32`].
    pub allow_tf32: bool,
    /// As [`PerceptualConfig::check_finite`].
    pub check_finite: bool,
    /// As [`PerceptualConfig::cuda_graphs`] (the spatial map never uses
    /// graphs).
    pub cuda_graphs: bool,
}

impl Default for LpipsConfig {
    fn default() -> Self {
        LpipsConfig {
            normalize: false,
            lin: LinWeights::v0_1(),
            weight: 1.0,
            max_chunk_images: None,
            memory_budget: None,
            allow_tf32: false,
            check_finite: false,
            cuda_graphs: false,
        }
    }
}

/// LPIPS v0.1 over a VGG16 trunk (the same weights file as the perceptual
/// loss).
///
/// d(x0, x1) = weight * sum_l mean_{h,w} sum_c w_{l,c} (n(phi_l(s(x0)))_c -
/// n(phi_l(s(x1)))_c)^2, with phi_l the VGG16 output at relu1_2, relu2_2,
/// relu3_3, relu4_3 and relu5_3; s LPIPS's ScalingLayer (after 2x - 1 with
/// `normalize`); n(f) = f / (sqrt(sum_c f_c^2) + 1e-10) over the channels
/// of each pixel; w the lin weights. The per-sample values are each image's
/// distance; the loss is their mean. The gradient is w.r.t. pred (x0);
/// where a pixel's features are all 0 the gradient there is 0 (the
/// reference's autograd gives NaN: the norm's derivative at 0).
///
/// ```
/// use perceptual_loss::*;
/// # fn main() -> perceptual_loss::Result<()> {
/// # let weights = seeded_safetensors(VggArch::Vgg16, 0)?; // stand-in for a real file
/// let vgg = Vgg::load(&Device::cpu(), WeightsSource::Bytes(&weights), VggArch::Vgg16, DType::F32)?;
/// let lpips = Lpips::new(vgg, &LpipsConfig::default())?; // v0.1 lin weights, inputs in [-1, 1]
/// let s = Shape::new(2, 3, 32, 32);
/// let (a, b) = (vec![0.1f32; 2 * 3 * 32 * 32], vec![-0.3f32; 2 * 3 * 32 * 32]);
/// let (mut mean, mut distances) = (0f32, [0f32; 2]);
/// lpips.compute(
///     &TensorRef::host(&a, s)?,
///     &TensorRef::host(&b, s)?,
///     LossOutputs::new(TensorMut::scalar(&mut mean))
///         .with_per_sample(TensorMut::host(&mut distances, Shape::flat(2))?),
/// )?;
/// assert_eq!(distances[0], distances[1]); // the same pair twice
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Lpips {
    loss: PerceptualLoss,
}

impl Lpips {
    /// LPIPS over `vgg`, which must be VGG16 loaded to relu5_3 (module 29)
    /// at least.
    pub fn new(vgg: Arc<Vgg>, config: &LpipsConfig) -> Result<Self> {
        if vgg.arch() != VggArch::Vgg16 {
            return Err(Error::arg(format!(
                "LPIPS v0.1 runs VGG16; the network given is {:?}",
                vgg.arch()
            )));
        }
        let base = PerceptualConfig {
            taps: LPIPS_TAPS.into_iter().map(Into::into).collect(),
            input_norm: match config.normalize {
                true => InputNorm::LpipsScalingFromUnit,
                false => InputNorm::LpipsScaling,
            },
            weight: config.weight,
            max_chunk_images: config.max_chunk_images,
            memory_budget: config.memory_budget,
            allow_tf32: config.allow_tf32,
            check_finite: config.check_finite,
            cuda_graphs: config.cuda_graphs,
            ..Default::default()
        };
        let loss = PerceptualLoss::with_lpips(vgg, &base, Arc::new(config.lin.clone()))?;
        Ok(Lpips { loss })
    }

    /// The network this metric runs.
    pub fn vgg(&self) -> &Arc<Vgg> {
        self.loss.vgg()
    }

    /// The perceptual loss it is (its taps are LPIPS terms).
    pub(crate) fn perceptual(&self) -> &PerceptualLoss {
        &self.loss
    }

    /// The perceptual loss it is, as one: same calls, same values (its
    /// taps are LPIPS terms), for code that takes a `PerceptualLoss`.
    pub fn perceptual_loss(&self) -> PerceptualLoss {
        self.loss.clone()
    }

    /// The distances of `pred` to `target` (same shape and dtype, N x 1 or
    /// 3 x H x W, H and W of at least 16): the loss is their mean, the
    /// per-sample values each image's distance; the gradient w.r.t. pred
    /// when `out` asks for it.
    pub fn compute(
        &self,
        pred: &TensorRef<'_>,
        target: &TensorRef<'_>,
        out: LossOutputs<'_>,
    ) -> Result<()> {
        self.loss.compute(pred, target, out)
    }

    /// [`compute`](Self::compute) on another stream of the network's device.
    pub fn compute_on(
        &self,
        device: &Device,
        pred: &TensorRef<'_>,
        target: &TensorRef<'_>,
        out: LossOutputs<'_>,
    ) -> Result<()> {
        self.loss.compute_on(device, pred, target, out)
    }

    /// Keeps `target` for [`compute_resident`](Self::compute_resident)
    /// (see [`PerceptualLoss::set_target`]).
    pub fn set_target(&self, target: &TensorRef<'_>) -> Result<()> {
        self.loss.set_target(target)
    }

    /// [`set_target`](Self::set_target) on another stream.
    pub fn set_target_on(&self, device: &Device, target: &TensorRef<'_>) -> Result<()> {
        self.loss.set_target_on(device, target)
    }

    /// Drops the kept target.
    pub fn clear_target(&self) -> Result<()> {
        self.loss.clear_target()
    }

    /// The distances of `pred` to the kept target (see
    /// [`PerceptualLoss::compute_resident`]).
    pub fn compute_resident(&self, pred: &TensorRef<'_>, out: LossOutputs<'_>) -> Result<()> {
        self.loss.compute_resident(pred, out)
    }

    /// [`compute_resident`](Self::compute_resident) on another stream.
    pub fn compute_resident_on(
        &self,
        device: &Device,
        pred: &TensorRef<'_>,
        out: LossOutputs<'_>,
    ) -> Result<()> {
        self.loss.compute_resident_on(device, pred, out)
    }

    /// Convenience: the mean distance, waiting for the device.
    pub fn value(&self, pred: &TensorRef<'_>, target: &TensorRef<'_>) -> Result<f32> {
        self.loss.value(pred, target)
    }

    /// What a CUDA call costs (see [`PerceptualLoss::plan_report`]).
    pub fn plan_report(
        &self,
        shape: Shape,
        dtype: DType,
        want_grad: bool,
    ) -> Result<super::perceptual::PlanReport> {
        self.loss.plan_report(shape, dtype, want_grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_weights_are_the_lpips_v0_1_ones() {
        let w = LinWeights::v0_1();
        assert_eq!(w.all().len(), 1472);
        // First and last values of lin0 and lin4 as the package ships them
        // (torch.load of lpips/weights/v0.1/vgg.pth).
        let (lo0, hi0) = w
            .layer(0)
            .iter()
            .fold((f32::MAX, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
        assert_eq!((lo0, hi0), (0.021017654, 1.2828162));
        let (lo4, hi4) = w
            .layer(4)
            .iter()
            .fold((f32::MAX, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
        assert_eq!((lo4, hi4), (0.019278834, 0.45843714));
    }

    #[test]
    fn bad_lin_weights_are_refused_by_name() {
        let write = |tensors: Vec<(String, Vec<usize>, Vec<f32>)>| {
            let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
                .into_iter()
                .map(|(n, s, v)| (n, v.iter().flat_map(|x| x.to_le_bytes()).collect(), s))
                .collect();
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
                .iter()
                .map(|(n, b, s)| {
                    let view =
                        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
                    (n.clone(), view.unwrap())
                })
                .collect();
            safetensors::serialize(views, None).unwrap()
        };
        let good = || -> Vec<(String, Vec<usize>, Vec<f32>)> {
            CHANNELS
                .iter()
                .enumerate()
                .map(|(k, &c)| (format!("lin{k}"), vec![1, c, 1, 1], vec![0.5; c]))
                .collect()
        };
        assert!(LinWeights::from_safetensors(&write(good())).is_ok());
        let mut negative = good();
        negative[2].2[7] = -0.1;
        let e = LinWeights::from_safetensors(&write(negative))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin2[7] is -0.1") && e.contains("non-negative"),
            "{e}"
        );
        let mut shape = good();
        shape[1].1 = vec![1, 64, 1, 1];
        shape[1].2.truncate(64);
        let e = LinWeights::from_safetensors(&write(shape))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin1 has shape [1, 64, 1, 1]") && e.contains("[1, 128, 1, 1]"),
            "{e}"
        );
        let mut missing = good();
        missing.pop();
        let e = LinWeights::from_safetensors(&write(missing))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no tensor lin4"), "{e}");
        let mut nan = good();
        nan[0].2[0] = f32::NAN;
        assert!(LinWeights::from_safetensors(&write(nan)).is_err());
        let e = LinWeights::from_safetensors(b"not a file")
            .unwrap_err()
            .to_string();
        assert!(e.contains("LPIPS lin weights"), "{e}");
    }
}
