//! VGG perceptual loss; its formula is in [`PerceptualLoss`]'s
//! documentation.
//!
//! - `config.rs`: the options, and [`PerceptualSpec`](config::PerceptualSpec)
//!   (the options resolved against the network) that both backends read.
//! - `cpu/`: the reference, one image at a time (im2col + sgemm
//!   convolutions in f32, loss sums in f64); it keeps the last target's
//!   features.
//! - `cuda/`: the schedule of fused kernels and cuDNN convolutions, the
//!   per-shape plans that hold its buffers, and the launchers.

mod config;
pub(crate) mod cpu;
pub(crate) mod cuda;
mod resident;

pub use config::{InputNorm, PerceptualConfig, Tap};
pub use cuda::cost::{Card, Floor, PlanReport};

use super::LossOutputs;
use crate::backend::{self, DeviceIo, HostIo, Op, Values};
use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, Shape, TensorRef};
use crate::vgg::Vgg;
use config::PerceptualSpec;
use std::sync::{Arc, Mutex};

/// A perceptual loss over a shared, resident [`Vgg`].
///
/// loss = weight * sum_j w_j * D(phi_j(norm(pred)), phi_j(norm(target))),
/// phi_j the output of `features` module j (torchvision indexing), D the
/// mean over all N*C*H*W elements of (a-b)^2 (MSE) or |a-b| (MAE). The
/// per-sample value of image n is the same sum with D's mean taken over
/// that image alone, so the loss is the batch mean of the per-sample
/// values. The defaults are the seed article's: VGG16, taps [3, 8, 15,
/// 22] (relu1_2, relu2_2, relu3_3, relu4_3), MSE, unit weights, no
/// normalisation. The gradient is w.r.t. pred; target is a constant. A
/// 1-channel input is replicated to 3 channels (its gradient summed back).
///
/// With `criterion` Fro, a tap's D is instead the norm sqrt(sum (a-b)^2)
/// of the whole batch's difference there (BasicSR's `'fro'`): not a mean,
/// so each image's value is its own norm and the batch's is not their
/// mean.
///
/// **Style terms** (`style_taps`): for each, G(phi) = F F^T / (C H W) is the
/// C x C Gram matrix of one image's C x HW feature map F, accumulated in f32
/// whatever the dtype, and the style part is
/// style_weight * sum_j s_j * D_style(G_j(pred), G_j(target)), D_style the
/// mean over all N*C*C entries of the squared (Mse) or absolute (Mae)
/// difference, or the norm of the whole N x C x C difference (Fro). The
/// loss is the perceptual part plus the style part (BasicSR's
/// `PerceptualLoss` returns the two, as [`LossOutputs::with_parts`]
/// does); the network runs once over pred and once over target for both,
/// and the gradient is that of the sum. `taps` may be empty: a style loss
/// alone. A Fro term's gradient at a zero difference is 0. On the CPU a
/// Fro term with the gradient runs the forward twice (the norm is needed
/// first); on CUDA a Fro term takes two launches (the norm, then the
/// gradient) and needs the batch in one chunk. On CUDA the Grams are the crate's own tiled
/// kernels (f32 sums, split along the pixels of large maps and added in a
/// fixed order, so bit-identical run to run), computed in the forward pass
/// right after their layer, whose output is then stored rather than fused
/// into the pool.
///
/// Style transfer's loss, the style image kept by the loss so that each
/// step gives only the image being optimised:
///
/// ```
/// use perceptual_loss::*;
/// # fn main() -> perceptual_loss::Result<()> {
/// # let weights = seeded_safetensors(VggArch::Vgg16, 0)?; // stand-in for a real file
/// let vgg = Vgg::load(&Device::cpu(), WeightsSource::Bytes(&weights), VggArch::Vgg16, DType::F32)?;
/// let config = PerceptualConfig {
///     taps: vec![],                                   // Gram terms alone
///     style_taps: vec!["relu1_2".into(), "relu2_2".into()],
///     style_weight: 1e5,
///     ..Default::default()
/// };
/// let style = PerceptualLoss::new(vgg, &config)?;
/// let s = Shape::new(1, 3, 32, 32);
/// let style_image = vec![0.5f32; 3 * 32 * 32];
/// style.set_target(&TensorRef::host(&style_image, s)?)?;    // copied: the buffer may go
/// let image = vec![0.25f32; 3 * 32 * 32];
/// let (mut value, mut grad, mut parts) = (0f32, vec![0f32; 3 * 32 * 32], [0f32; 2]);
/// style.compute_resident(
///     &TensorRef::host(&image, s)?,
///     LossOutputs::new(TensorMut::scalar(&mut value))
///         .with_grad(TensorMut::host(&mut grad, s)?)
///         .with_parts(TensorMut::host(&mut parts, Shape::flat(2))?),
/// )?;
/// assert_eq!(parts, [0.0, value]); // no perceptual terms: all style
/// # Ok(())
/// # }
/// ```
///
/// Clones share the
/// caches of both backends, and calls through them are serialised where
/// they touch a cache. On CUDA the plans (buffers and cuDNN algorithms)
/// of the 4 most recently used kinds of call (an input shape, with its
/// target passed or kept) are kept; a fifth frees the least recently used
/// one's buffers. On the CPU the last target's tap
/// features are kept (up to 64 MiB) while its bytes stay the same, so
/// loops against one target (feature inversion, style) run the target
/// through the network once.
#[derive(Debug, Clone)]
pub struct PerceptualLoss {
    op: Arc<Perceptual>,
}

/// The loss and the state each backend keeps for it.
#[derive(Debug)]
struct Perceptual {
    vgg: Arc<Vgg>,
    spec: PerceptualSpec,
    host: cpu::TargetCache,
    device: cuda::Plans,
    /// The target `set_target` kept.
    resident: Mutex<Option<Arc<resident::Resident>>>,
}

impl Op<2> for Perceptual {
    fn checks_finite(&self) -> bool {
        self.spec.check_finite
    }

    fn has_parts(&self) -> bool {
        true
    }

    /// 1 or 3 channels, and every pool before the deepest tap halves H and
    /// W (floor): the image must keep at least one pixel.
    fn check_shape(&self, s: Shape) -> Result<()> {
        if s.c != 1 && s.c != 3 {
            return Err(Error::shape(format!(
                "VGG takes 3 channels (or 1, replicated), got {s}"
            )));
        }
        let pools = self.spec.pools(self.vgg.layers());
        if s.h >> pools == 0 || s.w >> pools == 0 {
            return Err(Error::shape(format!(
                "{s} is too small: the deepest tap follows {pools} poolings, which need H and W of at least {}",
                1usize << pools
            )));
        }
        // Every activation of the batch [pred; target] (the device pads the
        // input to 8 channels) must have a size that fits an allocation, so
        // that no buffer size derived from the shape can wrap.
        let layers = &self.vgg.layers()[..=self.spec.deepest()];
        let input = (crate::vgg::INPUT_CHANNELS, s.h, s.w);
        let dims = std::iter::once(input).chain(crate::vgg::output_dims(layers, input));
        for ((c, h, w), name) in
            dims.zip(std::iter::once("input").chain(layers.iter().map(|l| l.name.as_str())))
        {
            crate::tensor::bytes_for(&[2, s.n, c, h, w], 4, || {
                format!("{s}: the {name} activation of [pred; target]")
            })?;
        }
        Ok(())
    }

    fn cpu<T: Element>(&self, io: HostIo<'_, T, 2>) -> Result<Values> {
        let net = cpu::HostNet {
            layers: self.vgg.layers(),
            weights: self.vgg.host_weights()?,
        };
        self.host.evaluate(net, &self.spec, io)
    }

    fn cuda(&self, dev: &CudaDevice, io: DeviceIo<2>) -> Result<()> {
        self.device.queue(dev, &self.vgg, &self.spec, &io, None)
    }
}

#[cfg(test)]
impl PerceptualLoss {
    /// A CPU loss over seeded weights, for the unit tests.
    pub(crate) fn seeded(arch: crate::vgg::VggArch, config: &PerceptualConfig) -> PerceptualLoss {
        let bytes = crate::vgg::seeded_safetensors(arch, 9).expect("seeded weights");
        let source = crate::vgg::WeightsSource::Bytes(&bytes);
        let vgg = Vgg::load(&Device::cpu(), source, arch, crate::DType::F32).expect("seeded VGG");
        PerceptualLoss::new(vgg, config).expect("a valid config")
    }

    /// The CUDA backend's caches.
    pub(crate) fn device_plans(&self) -> &cuda::Plans {
        &self.op.device
    }
}

impl PerceptualLoss {
    /// Resolves and checks `config` against `vgg`: every tap exists and is
    /// loaded, taps are distinct, one weight per tap, finite weights.
    pub fn new(vgg: Arc<Vgg>, config: &PerceptualConfig) -> Result<Self> {
        let spec = PerceptualSpec::resolve(config, &vgg)?;
        Ok(PerceptualLoss {
            op: Arc::new(Perceptual {
                vgg,
                spec,
                host: Default::default(),
                device: Default::default(),
                resident: Mutex::new(None),
            }),
        })
    }

    /// An LPIPS metric: `config` with every tap an LPIPS term of `lin`
    /// (`crate::Lpips` builds it).
    pub(crate) fn with_lpips(
        vgg: Arc<Vgg>,
        config: &PerceptualConfig,
        lin: Arc<crate::ops::lpips::LinWeights>,
    ) -> Result<Self> {
        let mut spec = PerceptualSpec::resolve(config, &vgg)?;
        spec.lpips = Some(lin);
        Ok(PerceptualLoss {
            op: Arc::new(Perceptual {
                vgg,
                spec,
                host: Default::default(),
                device: Default::default(),
                resident: Mutex::new(None),
            }),
        })
    }

    /// The network this loss runs.
    pub fn vgg(&self) -> &Arc<Vgg> {
        &self.op.vgg
    }

    /// The resolved configuration.
    pub(crate) fn spec(&self) -> &PerceptualSpec {
        &self.op.spec
    }

    /// The loss's rules for an input shape (as a call checks them).
    pub(crate) fn check_shape(&self, s: Shape) -> Result<()> {
        self.op.check_shape(s)
    }

    /// An error unless `device` is the network's (any of its streams).
    pub(crate) fn check_device(&self, device: &Device) -> Result<()> {
        if device.ordinal() != self.vgg().device().ordinal() {
            return Err(Error::DeviceMismatch(format!(
                "the network lives on {:?}, the call asks for {device:?}",
                self.vgg().device()
            )));
        }
        Ok(())
    }

    /// Queues an LPIPS call on `dev` that also writes the spatial map's
    /// terms or takes their gradient (`terms`).
    pub(crate) fn queue_with_terms(
        &self,
        dev: &CudaDevice,
        io: &DeviceIo<2>,
        terms: cuda::MapTerms,
    ) -> Result<()> {
        let op = &self.op;
        op.device
            .queue_with_terms(dev, &op.vgg, &op.spec, io, terms)
    }

    /// The tapped module indices, ascending.
    pub fn taps(&self) -> Vec<usize> {
        self.op.spec.taps.iter().map(|t| t.0).collect()
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
        self.compute_on(self.vgg().device(), pred, target, out)
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
        out: LossOutputs<'_>,
    ) -> Result<()> {
        self.check_device(device)?;
        backend::run(
            self.op.as_ref(),
            device,
            [(pred, "pred"), (target, "target")],
            out,
        )
    }

    /// Convenience: the loss value, waiting for the device.
    pub fn value(&self, pred: &TensorRef<'_>, target: &TensorRef<'_>) -> Result<f32> {
        super::value_on(self.vgg().device(), |loss| {
            self.compute(pred, target, LossOutputs::new(loss))
        })
    }

    /// Keeps `target` (on the network's device, N x 1 or 3 x H x W) for
    /// [`compute_resident`](Self::compute_resident), replacing a target
    /// kept before. The target's tap features (and Grams) are computed now
    /// and kept, so later calls run the network over pred alone (half the
    /// forward work); the caller may change or free `target`'s memory as
    /// soon as this returns. Shared by the loss's clones. On CUDA they stay
    /// on the device in the compute dtype (Grams in f32), outside
    /// `memory_budget`, and agree with passing the target to rounding (the
    /// target's batch may get other cuDNN algorithms); the target's forward
    /// is queued on the network's stream and waited for: the target must be
    /// written by work that is done or queued there
    /// ([`set_target_on`](Self::set_target_on) takes another stream).
    pub fn set_target(&self, target: &TensorRef<'_>) -> Result<()> {
        self.set_target_on(self.vgg().device(), target)
    }

    /// [`set_target`](Self::set_target), running the target's forward on
    /// another stream of the network's device.
    pub fn set_target_on(&self, device: &Device, target: &TensorRef<'_>) -> Result<()> {
        self.check_device(device)?;
        let kept = resident::Resident::new(&self.op, device, target)?;
        *self.op.resident.lock().map_err(|_| Error::poisoned())? = Some(Arc::new(kept));
        Ok(())
    }

    /// Drops the kept target (and its memory); calls with an explicit
    /// target work either way.
    pub fn clear_target(&self) -> Result<()> {
        *self.op.resident.lock().map_err(|_| Error::poisoned())? = None;
        Ok(())
    }

    /// The loss of `pred` against the kept target: pred has the target's
    /// C, H, W and dtype, and its batch size, or any batch size for a
    /// target of one image (each pred image is compared with it). An error
    /// without a kept target.
    pub fn compute_resident(&self, pred: &TensorRef<'_>, out: LossOutputs<'_>) -> Result<()> {
        self.compute_resident_on(self.vgg().device(), pred, out)
    }

    /// [`compute_resident`](Self::compute_resident) on another stream of
    /// the network's device.
    pub fn compute_resident_on(
        &self,
        device: &Device,
        pred: &TensorRef<'_>,
        out: LossOutputs<'_>,
    ) -> Result<()> {
        self.check_device(device)?;
        let target = self
            .op
            .resident
            .lock()
            .map_err(|_| Error::poisoned())?
            .clone();
        let target = target.ok_or_else(|| {
            Error::arg("no kept target: call set_target first, or pass the target")
        })?;
        let call = resident::ResidentCall {
            op: &self.op,
            target: &target,
        };
        backend::run(&call, device, [(pred, "pred")], out)
    }

    /// What a CUDA call on `shape` with inputs of `dtype` costs (with the
    /// gradient when `want_grad`): kernel launches, cuDNN calls, the bytes
    /// the crate's own kernels move and the convolutions' FLOPs, counted
    /// from the call's schedule, so it needs no GPU (a CPU network reports
    /// what its weights would cost on CUDA, in their compute dtype).
    /// [`PlanReport::floor`] turns it into a time floor on a card.
    pub fn plan_report(&self, shape: Shape, dtype: DType, want_grad: bool) -> Result<PlanReport> {
        self.report((shape, cuda::Batch::Pairs), dtype, want_grad)
    }

    /// [`plan_report`](Self::plan_report) of a
    /// [`compute_resident`](Self::compute_resident) call with pred of
    /// `shape`: the network runs over pred alone, and its taps read the
    /// kept target (counted as `shape.n` images).
    pub fn resident_plan_report(
        &self,
        shape: Shape,
        dtype: DType,
        want_grad: bool,
    ) -> Result<PlanReport> {
        self.report((shape, cuda::Batch::Pred), dtype, want_grad)
    }

    fn report(
        &self,
        call: (Shape, cuda::Batch),
        dtype: DType,
        want_grad: bool,
    ) -> Result<PlanReport> {
        call.0.numel()?;
        self.op.check_shape(call.0)?;
        let dtypes = (dtype, self.vgg().compute_dtype());
        cuda::cost::report(self.vgg().layers(), &self.op.spec, call, dtypes, want_grad)
    }

    /// How many whole calls this loss holds CUDA graphs of
    /// ([`PerceptualConfig::cuda_graphs`]): 0 on the CPU, before a shape's
    /// second call, and where capturing failed (the calls then run without
    /// graphs, and `PERCEPTUAL_LOSS_LOG_PLANS=1` says why).
    pub fn cuda_graphs_held(&self) -> Result<usize> {
        self.op.device.graphs_held()
    }

    /// Device bytes of the buffers and cuDNN workspace a CUDA call on
    /// `shape` with its target passed holds (for one chunk when chunked;
    /// built now if not yet seen); `None` on the CPU. A call against a kept
    /// target has a plan of its own (about half of this), and the kept
    /// target's features are not counted here.
    pub fn plan_footprint(&self, shape: Shape) -> Result<Option<usize>> {
        let Some(dev) = self.vgg().device().cuda_device() else {
            return Ok(None);
        };
        shape.numel()?;
        self.op.check_shape(shape)?;
        let op = &self.op;
        Ok(Some(op.device.footprint(dev, &op.vgg, &op.spec, shape)?))
    }
}
