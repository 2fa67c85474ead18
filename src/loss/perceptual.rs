//! VGG perceptual loss (DESIGN.md section 3).
//!
//! loss = weight * sum_j w_j * D(phi_j(norm(pred)), phi_j(norm(target))),
//! phi_j the output of `features` module j (torchvision indexing), D the
//! mean over all N*C*H*W elements of (a-b)^2 (MSE) or |a-b| (MAE). The
//! defaults are the seed article's: VGG16, taps [3, 8, 15, 22] (relu1_2,
//! relu2_2, relu3_3, relu4_3), MSE, unit weights, no normalisation. The
//! gradient is w.r.t. pred; target is a constant. A 1-channel input is
//! replicated to 3 channels (its gradient summed back).

use super::recent::Recent;
use super::{check_weight, cuda_in, host_in, host_scalar, LossOutputs};
use crate::cpu::perceptual::{TapFeatures, Target};
use crate::cuda::perceptual::PerceptualCall;
use crate::cuda::shape_plan::ShapePlan;
use crate::device::CudaDevice;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::loss::feature::Criterion;
use crate::tensor::{DType, Element, Shape, TensorRef};
use crate::vgg::{Module, Pooling, Vgg};
use half::{bf16, f16};
use std::sync::Arc;
use std::sync::Mutex;

/// A tapped module: by torchvision index or by name (`"relu3_3"`, `"conv5_4"`, `"pool2"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Tap {
    /// Module index in `features`.
    Index(usize),
    /// Module name.
    Name(String),
}

impl From<usize> for Tap {
    fn from(i: usize) -> Self {
        Tap::Index(i)
    }
}

impl From<&str> for Tap {
    fn from(s: &str) -> Self {
        Tap::Name(s.to_string())
    }
}

/// How inputs are normalised before VGG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum InputNorm {
    /// Used as given (the article's default).
    #[default]
    None,
    /// ImageNet mean/std for inputs in [0, 1].
    Imagenet,
    /// Inputs in [-1, 1]: mapped by (x + 1) / 2, then ImageNet mean/std.
    ImagenetFromPm1,
}

const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

impl InputNorm {
    /// (scale, shift) with normalised = x * scale + shift, for channel `c`.
    pub(crate) fn affine(self, c: usize) -> (f64, f64) {
        match self {
            InputNorm::None => (1.0, 0.0),
            InputNorm::Imagenet => (1.0 / STD[c], -MEAN[c] / STD[c]),
            InputNorm::ImagenetFromPm1 => (0.5 / STD[c], (0.5 - MEAN[c]) / STD[c]),
        }
    }
}

/// Configuration of a [`PerceptualLoss`]; `Default` is the article's.
#[derive(Debug, Clone, PartialEq)]
pub struct PerceptualConfig {
    /// Tapped modules, compared at their outputs; default [3, 8, 15, 22].
    pub taps: Vec<Tap>,
    /// One weight per tap; empty means all 1.
    pub tap_weights: Vec<f32>,
    /// MSE (default) or MAE.
    pub criterion: Criterion,
    /// Input normalisation; default none.
    pub input_norm: InputNorm,
    /// Max (default) or average pooling.
    pub pooling: Pooling,
    /// Overall weight; default 1.
    pub weight: f32,
    /// On CUDA, run at most this many images at a time (pred and target
    /// each), so device memory follows the chunk instead of the batch;
    /// `None` runs the whole batch at once. The loss is the same.
    pub max_chunk_images: Option<usize>,
    /// On CUDA, the device bytes one call may hold for its buffers and the
    /// cuDNN workspace: the batch runs in the largest chunks whose buffers
    /// fit, and convolution algorithms are chosen within the bytes left.
    /// `None`: no limit (the workspace is capped at 256 MiB). A call whose
    /// single image does not fit is an error. No effect on the CPU.
    pub memory_budget: Option<usize>,
    /// Lets f32 convolutions on CUDA use TF32 tensor cores (faster, about
    /// 1e-3 relative error); default off. No effect on f16/bf16 or the CPU.
    pub allow_tf32: bool,
}

impl Default for PerceptualConfig {
    fn default() -> Self {
        PerceptualConfig {
            taps: [3, 8, 15, 22].into_iter().map(Tap::Index).collect(),
            tap_weights: Vec::new(),
            criterion: Criterion::Mse,
            input_norm: InputNorm::None,
            pooling: Pooling::Max,
            weight: 1.0,
            max_chunk_images: None,
            memory_budget: None,
            allow_tf32: false,
        }
    }
}

/// A validated configuration, resolved against the loaded network.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// (module index, tap weight), ascending by index.
    pub taps: Vec<(usize, f64)>,
    pub criterion: Criterion,
    pub norm: InputNorm,
    pub pooling: Pooling,
    pub weight: f64,
    pub tf32: bool,
    pub chunk: Option<usize>,
    pub budget: Option<usize>,
}

impl Plan {
    pub fn deepest(&self) -> usize {
        self.taps.last().map_or(0, |t| t.0)
    }

    pub fn tap_weight(&self, index: usize) -> Option<f64> {
        self.taps.iter().find(|t| t.0 == index).map(|t| t.1)
    }
}

/// A perceptual loss over a shared, resident [`Vgg`]. Clones share the
/// CUDA plans (buffers per input shape), and calls through them are
/// serialised. The plans of the 4 most recently used input shapes are
/// kept; a fifth shape frees the least recently used one's buffers. On
/// the CPU the last target's tap features are kept (up to 64 MiB) while
/// its bytes stay the same, so loops against one target (feature
/// inversion, style) run the target through the network once.
#[derive(Debug, Clone)]
pub struct PerceptualLoss {
    vgg: Arc<Vgg>,
    plan: Plan,
    shapes: Arc<ShapePlans>,
    targets: Arc<Mutex<Option<TargetCache>>>,
}

/// CUDA buffers and cuDNN plans for the most recently used input shapes,
/// and the chunk size chosen for each (batch shape, compute dtype).
struct ShapePlans {
    plans: Mutex<Recent<ShapePlan>>,
    chunks: Mutex<Recent<((Shape, DType), usize)>>,
}

/// The last CPU target and its tap features, reused while the target is
/// unchanged.
struct TargetCache {
    shape: Shape,
    dtype: DType,
    input: Vec<u8>,
    features: Arc<TapFeatures>,
}

impl std::fmt::Debug for TargetCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TargetCache({} {})", self.dtype.name(), self.shape)
    }
}

/// Largest target (input plus features) the CPU path keeps between calls.
const TARGET_CACHE_BYTES: usize = 64 << 20;

/// Input shapes whose CUDA buffers a loss keeps (per loss and its clones).
const KEPT_SHAPES: usize = 4;

impl Default for ShapePlans {
    fn default() -> Self {
        ShapePlans {
            plans: Mutex::new(Recent::new(KEPT_SHAPES)),
            chunks: Mutex::new(Recent::new(64)),
        }
    }
}

impl std::fmt::Debug for ShapePlans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.plans.lock().map(|p| p.len()).unwrap_or(0);
        write!(f, "ShapePlans({n})")
    }
}

#[cfg(test)]
impl PerceptualLoss {
    /// A CPU loss over seeded weights, for the unit tests.
    pub(crate) fn seeded(arch: crate::vgg::VggArch, config: &PerceptualConfig) -> PerceptualLoss {
        let bytes = crate::vgg::seeded_safetensors(arch, 9).expect("seeded weights");
        let source = crate::vgg::WeightsSource::Bytes(&bytes);
        let vgg = Vgg::load(&Device::cpu(), source, arch, DType::F32).expect("seeded VGG");
        PerceptualLoss::new(vgg, config).expect("a valid config")
    }
}

impl PerceptualLoss {
    /// Resolves and checks `config` against `vgg`: every tap exists and is
    /// loaded, taps are distinct, one weight per tap, finite weights.
    pub fn new(vgg: Arc<Vgg>, config: &PerceptualConfig) -> Result<Self> {
        check_weight(config.weight)?;
        if config.max_chunk_images == Some(0) {
            return Err(Error::arg("max_chunk_images must be at least 1"));
        }
        if config.taps.is_empty() {
            return Err(Error::arg("a perceptual loss needs at least one tap"));
        }
        if !config.tap_weights.is_empty() && config.tap_weights.len() != config.taps.len() {
            return Err(Error::arg(format!(
                "{} taps but {} tap weights",
                config.taps.len(),
                config.tap_weights.len()
            )));
        }
        let arch = vgg.arch();
        let mut taps = Vec::with_capacity(config.taps.len());
        for (k, tap) in config.taps.iter().enumerate() {
            let index = match tap {
                Tap::Index(i) => arch.resolve(&i.to_string())?,
                Tap::Name(n) => arch.resolve(n)?,
            };
            if index > vgg.depth() {
                return Err(Error::arg(format!(
                    "tap {} ({index}) is deeper than the loaded weights (up to module {}, {})",
                    arch.layer_name(index).unwrap_or_default(),
                    vgg.depth(),
                    arch.layer_name(vgg.depth()).unwrap_or_default()
                )));
            }
            let w = config.tap_weights.get(k).copied().unwrap_or(1.0);
            check_weight(w)?;
            if taps.iter().any(|&(i, _)| i == index) {
                return Err(Error::arg(format!("tap {index} is listed twice")));
            }
            taps.push((index, w as f64));
        }
        taps.sort_by_key(|t| t.0);
        let plan = Plan {
            taps,
            criterion: config.criterion,
            norm: config.input_norm,
            pooling: config.pooling,
            weight: config.weight as f64,
            tf32: config.allow_tf32,
            chunk: config.max_chunk_images,
            budget: config.memory_budget,
        };
        Ok(PerceptualLoss {
            vgg,
            plan,
            shapes: Default::default(),
            targets: Default::default(),
        })
    }

    /// The resolved configuration.
    #[cfg(test)]
    pub(crate) fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The network this loss runs.
    pub fn vgg(&self) -> &Arc<Vgg> {
        &self.vgg
    }

    /// The tapped module indices, ascending.
    pub fn taps(&self) -> Vec<usize> {
        self.plan.taps.iter().map(|t| t.0).collect()
    }

    /// Computes the loss of `pred` against `target` (same shape and dtype,
    /// N x 1 or 3 x H x W) on the network's device; the gradient w.r.t.
    /// pred only when `out` asks for it (otherwise nothing is kept for
    /// backward). Per-sample values are each image's loss.
    pub fn compute(
        &self,
        pred: &TensorRef<'_>,
        target: &TensorRef<'_>,
        out: LossOutputs<'_>,
    ) -> Result<()> {
        self.compute_on(self.vgg.device(), pred, target, out)
    }

    /// [`compute`](Self::compute) on another stream of the network's
    /// device (`device` must be the same GPU, or the CPU for a CPU
    /// network). Each stream gets its own buffers, so streams never share
    /// scratch memory.
    pub fn compute_on(
        &self,
        device: &Device,
        pred: &TensorRef<'_>,
        target: &TensorRef<'_>,
        mut out: LossOutputs<'_>,
    ) -> Result<()> {
        if device.ordinal() != self.vgg.device().ordinal() {
            return Err(Error::DeviceMismatch(format!(
                "the network lives on {:?}, the call asks for {device:?}",
                self.vgg.device()
            )));
        }
        let s = pred.shape;
        if target.shape != s || target.dtype != pred.dtype {
            return Err(Error::arg(format!(
                "pred and target must have one shape and dtype, got {} {} and {} {}",
                pred.dtype.name(),
                s,
                target.dtype.name(),
                target.shape
            )));
        }
        s.numel()?;
        if s.c != 1 && s.c != 3 {
            return Err(Error::shape(format!(
                "VGG takes 3 channels (or 1, replicated), got {s}"
            )));
        }
        self.check_size(s)?;
        out.validate(pred.dtype, s, s.n)?;
        if let Some(dev) = device.cuda_device() {
            return self.cuda(dev, pred, target, &out);
        }
        match pred.dtype {
            DType::F32 => self.cpu::<f32>(pred, target, &mut out),
            DType::F16 => self.cpu::<f16>(pred, target, &mut out),
            DType::BF16 => self.cpu::<bf16>(pred, target, &mut out),
        }
    }

    /// Convenience: the loss value, waiting for the device.
    pub fn value(&self, pred: &TensorRef<'_>, target: &TensorRef<'_>) -> Result<f32> {
        super::value_on(self.vgg.device(), |loss| {
            self.compute(pred, target, LossOutputs::new(loss))
        })
    }

    /// Device bytes of the buffers and cuDNN workspace a CUDA call on
    /// `shape` holds (for one chunk when chunked; built now if not yet
    /// seen); `None` on the CPU.
    pub fn plan_footprint(&self, shape: Shape) -> Result<Option<usize>> {
        let Some(dev) = self.vgg.device().cuda_device() else {
            return Ok(None);
        };
        self.check_size(shape)?;
        let chunk = Shape {
            n: self.cuda_chunk_images(dev, shape)?,
            ..shape
        };
        self.with_shape_plan(dev, chunk, |_, sp| Ok(Some(sp.footprint)))
    }

    /// Images per chunk on CUDA: `max_chunk_images`, lowered until the
    /// buffers fit the memory budget and then until `plans(k)` (building
    /// the plan of a k-image chunk) succeeds: cuDNN's workspace comes out
    /// of what the buffers leave. Decided once per shape.
    pub(crate) fn chunk_images(
        &self,
        s: Shape,
        compute: DType,
        mut plans: impl FnMut(usize) -> Result<()>,
    ) -> Result<usize> {
        let cap = self.plan.chunk.unwrap_or(s.n).min(s.n);
        let Some(budget) = self.plan.budget else {
            return Ok(cap);
        };
        let mut chunks = self.shapes.chunks.lock().map_err(|_| Error::poisoned())?;
        let key = (s, compute);
        let chosen = chunks.get_or_try_insert(
            |(k, _)| *k == key,
            || {
                let bytes = |k: usize| {
                    crate::cuda::shape_plan::buffer_bytes(
                        self.vgg.layers(),
                        &self.plan,
                        (k, s.h, s.w),
                        compute,
                    )
                };
                let one = bytes(1);
                if one > budget {
                    return Err(Error::arg(format!(
                        "the memory budget of {budget} bytes is below the {one} bytes of buffers one {}x{} image needs",
                        s.h, s.w
                    )));
                }
                // Buffers grow about linearly with the images: start there,
                // then step to the largest count that fits.
                let mut k = (budget / one).clamp(1, cap);
                while k > 1 && bytes(k) > budget {
                    k -= 1;
                }
                while k < cap && bytes(k + 1) <= budget {
                    k += 1;
                }
                loop {
                    match plans(k) {
                        Ok(()) => return Ok((key, k)),
                        Err(e) if k == 1 => return Err(e),
                        Err(_) => k -= 1,
                    }
                }
            },
        )?;
        Ok(chosen.1)
    }

    fn cuda_chunk_images(&self, dev: &CudaDevice, s: Shape) -> Result<usize> {
        self.chunk_images(s, self.vgg.compute_dtype(), |k| {
            self.with_shape_plan(dev, Shape { n: k, ..s }, |_, _| Ok(()))
        })
    }

    /// Runs `f` with the device's cuDNN handle and the plan for `shape`.
    fn with_shape_plan<R>(
        &self,
        dev: &CudaDevice,
        shape: Shape,
        f: impl FnOnce(&crate::cuda::cudnn::Handle, &mut ShapePlan) -> Result<R>,
    ) -> Result<R> {
        dev.with_cudnn(|handle| {
            let mut plans = self.shapes.plans.lock().map_err(|_| Error::poisoned())?;
            let compute = self.vgg.compute_dtype();
            let plan = plans.get_or_try_insert(
                |p| p.matches(dev, shape, compute, self.plan.tf32),
                || ShapePlan::new(dev, handle, self.vgg.layers(), &self.plan, shape, compute),
            )?;
            f(handle, plan)
        })
    }

    fn cuda(
        &self,
        dev: &CudaDevice,
        pred: &TensorRef<'_>,
        target: &TensorRef<'_>,
        out: &LossOutputs<'_>,
    ) -> Result<()> {
        let s = pred.shape;
        let bytes = s.bytes(pred.dtype)?;
        let (p, t) = (cuda_in(dev, pred, "pred")?, cuda_in(dev, target, "target")?);
        let o = out.cuda_addresses(dev, &[(p, "pred"), (t, "target")], bytes)?;
        let weights = self
            .vgg
            .cuda_weights()
            .ok_or_else(|| Error::Internal("CUDA weights missing".into()))?;
        let whole = PerceptualCall {
            batch: s.n,
            accumulate: false,
            pred: p,
            target: t,
            dtype: pred.dtype,
            shape: s,
            grad: o.grad,
            beta: out.beta,
            loss: o.loss,
            per_sample: o.per_sample,
        };
        for call in whole.chunks(self.cuda_chunk_images(dev, s)?) {
            self.with_shape_plan(dev, call.shape, |handle, sp| {
                sp.run(dev, handle, weights, self.vgg.layers(), &self.plan, &call)
            })?;
        }
        Ok(())
    }

    /// The target's tap features on the CPU: those of the previous call
    /// when the target is the same (same shape and bytes), as in
    /// feature-inversion and style loops; computed and kept when small
    /// enough; `None` for a target too large to keep (the loss then
    /// computes them one image at a time).
    fn target_features<T: Element>(
        &self,
        net: crate::cpu::perceptual::Net<'_>,
        target: &[T],
        s: Shape,
    ) -> Result<Option<Arc<TapFeatures>>> {
        // SAFETY: f32, f16 and bf16 are plain bits: any byte view is valid.
        let bytes = unsafe {
            std::slice::from_raw_parts(target.as_ptr().cast::<u8>(), std::mem::size_of_val(target))
        };
        if let Some(c) = self.targets.lock().map_err(|_| Error::poisoned())?.as_ref() {
            if c.shape == s && c.dtype == T::DTYPE && c.input == bytes {
                return Ok(Some(c.features.clone()));
            }
        }
        let dims = crate::cuda::schedule::layer_dims(self.vgg.layers(), s.h, s.w);
        let per_image: usize = self
            .plan
            .taps
            .iter()
            .map(|&(k, _)| dims[k].0 * dims[k].1 * dims[k].2)
            .sum();
        if s.n * per_image * 4 + bytes.len() > TARGET_CACHE_BYTES {
            return Ok(None);
        }
        // Computed without the lock: other threads' calls go on meanwhile.
        let features = Arc::new(crate::cpu::perceptual::target_features(
            net, &self.plan, target, s,
        ));
        *self.targets.lock().map_err(|_| Error::poisoned())? = Some(TargetCache {
            shape: s,
            dtype: T::DTYPE,
            input: bytes.to_vec(),
            features: features.clone(),
        });
        Ok(Some(features))
    }

    /// Every pool before the deepest tap halves H and W (floor): the image
    /// must keep at least one pixel.
    fn check_size(&self, s: Shape) -> Result<()> {
        let pools = self.vgg.layers()[..=self.plan.deepest()]
            .iter()
            .filter(|l| l.module == Module::Pool)
            .count() as u32;
        if s.h >> pools == 0 || s.w >> pools == 0 {
            return Err(Error::shape(format!(
                "{s} is too small: the deepest tap follows {pools} poolings, which need H and W of at least {}",
                1usize << pools
            )));
        }
        Ok(())
    }

    fn cpu<T: Element>(
        &self,
        pred: &TensorRef<'_>,
        target: &TensorRef<'_>,
        out: &mut LossOutputs<'_>,
    ) -> Result<()> {
        let p = host_in::<T>(pred, "pred")?;
        let t = host_in::<T>(target, "target")?;
        let mut per_sample = vec![0.0; pred.shape.n];
        let grad = out.host_grad::<T>()?;
        let convs = self
            .vgg
            .host_convs()
            .ok_or_else(|| Error::Internal("host weights missing".into()))?;
        let net = crate::cpu::perceptual::Net {
            layers: self.vgg.layers(),
            convs,
        };
        let features = self.target_features(net, t, target.shape)?;
        let target = match &features {
            Some(f) => Target::Features(f),
            None => Target::Images(t),
        };
        let loss = crate::cpu::perceptual::perceptual(
            net,
            &self.plan,
            p,
            target,
            pred.shape,
            grad,
            &mut per_sample,
        );
        host_scalar(&mut out.loss, "loss output")?[0] = loss as f32;
        if let Some(ps) = out.per_sample.as_mut() {
            for (slot, v) in host_scalar(ps, "per-sample output")?
                .iter_mut()
                .zip(&per_sample)
            {
                *slot = *v as f32;
            }
        }
        Ok(())
    }
}
