//! What one input shape needs on the device, built once and reused: the
//! cuDNN plan of every convolution, the one allocation that holds every
//! buffer of the schedule (laid out by `layout.rs`) and the cuDNN
//! workspace. Also the `Convs` seam between the schedule's executor and
//! cuDNN, which the emulator tests fill with a direct convolution.

use super::cudnn::{ConvPlan, Handle, Scratch, WorkspaceLimit, MAX_WORKSPACE};
use super::device_weights::DeviceWeights;
use super::layout::Layout;
use super::perceptual::{perceptual, Net, PerceptualCall};
use super::schedule::{layer_dims, schedule, Step, INPUT_CHANNELS};
use super::step_times::StepTimes;
use crate::device::CudaDevice;
use crate::error::{Error, Result};
use crate::loss::perceptual::Plan;
use crate::tensor::{DType, Shape};
use crate::vgg::{Layer, Module};
use cudarc::driver::{CudaSlice, DevicePtr};

fn stream_id(dev: &CudaDevice) -> usize {
    dev.stream().cu_stream() as usize
}

fn addr<T>(s: &CudaSlice<T>, dev: &CudaDevice) -> u64 {
    s.device_ptr(dev.stream()).0
}

fn alloc(dev: &CudaDevice, bytes: usize, what: &str) -> Result<CudaSlice<u8>> {
    // SAFETY: every buffer is written before it is read (the schedule).
    unsafe { dev.stream().alloc::<u8>(bytes.max(256)) }
        .map_err(|e| Error::cuda(&format!("allocating {what} ({bytes} bytes)"), e))
}

/// The convolutions of a schedule: cuDNN on the device, a direct loop in
/// the emulator tests. Addresses are device addresses in NHWC; filters KRSC.
pub(crate) trait Convs {
    /// `y = conv_k(x)` over `images` images (the 2N batch or one half).
    ///
    /// # Safety
    /// Every address holds the planned shape of layer `k`.
    unsafe fn forward(&self, k: usize, images: usize, x: u64, weight: u64, y: u64) -> Result<()>;
    /// `dx = conv_k^T(dy)` over the pred half.
    ///
    /// # Safety
    /// As for `forward`.
    unsafe fn backward_data(&self, k: usize, weight: u64, dy: u64, dx: u64) -> Result<()>;
}

/// cuDNN with the plan's algorithms and workspace.
struct Cudnn<'a> {
    handle: &'a Handle,
    plans: &'a [Option<ConvPlan>],
    workspace: u64,
}

impl Cudnn<'_> {
    fn plan(&self, k: usize) -> Result<&ConvPlan> {
        self.plans[k]
            .as_ref()
            .ok_or_else(|| Error::Internal("no plan for a convolution".into()))
    }
}

impl Convs for Cudnn<'_> {
    unsafe fn forward(&self, k: usize, images: usize, x: u64, weight: u64, y: u64) -> Result<()> {
        let plan = self.plan(k)?;
        if plan.forward_images != images {
            return Err(Error::Internal(format!(
                "layer {k} planned for {} images, called with {images}",
                plan.forward_images
            )));
        }
        plan.forward(self.handle, x, weight, y, self.workspace)
    }

    unsafe fn backward_data(&self, k: usize, weight: u64, dy: u64, dx: u64) -> Result<()> {
        self.plan(k)?
            .backward_data(self.handle, weight, dy, dx, self.workspace)
    }
}

/// Bytes of the buffers (not the cuDNN workspace) a call on `n` image
/// pairs of `h` x `w` holds.
pub(crate) fn buffer_bytes(
    layers: &[Layer],
    plan: &Plan,
    (n, h, w): (usize, usize, usize),
    compute: DType,
) -> usize {
    Layout::new(
        &schedule(layers, plan, (n, h, w), true, false),
        compute.size(),
    )
    .bytes
}

/// With PERCEPTUAL_LOSS_CUDNN_BENCHMARK=1, a new plan times cuDNN's
/// algorithms on the device and takes the fastest deterministic one (as
/// `torch.backends.cudnn.benchmark` does); otherwise cuDNN's heuristics
/// choose, which plans instantly but may pick a slower kernel. Read at
/// each new plan, so it reaches the Rust, C and Python interfaces alike.
/// While planning, the timing holds scratch for the largest layer's input
/// and output and a workspace, briefly and outside any memory budget.
fn benchmark_algorithms() -> bool {
    super::env_flag("PERCEPTUAL_LOSS_CUDNN_BENCHMARK")
}

/// Everything one input shape needs, allocated once.
pub(crate) struct ShapePlan {
    /// (input shape, compute dtype, TF32, stream): buffers belong to one stream.
    key: (Shape, DType, bool, usize),
    convs: Vec<Option<ConvPlan>>,
    /// Every buffer of the schedule, at `layout`'s offsets.
    arena: CudaSlice<u8>,
    layout: Layout,
    workspace: CudaSlice<u8>,
    /// Device bytes held by this plan.
    pub footprint: usize,
}

/// With PERCEPTUAL_LOSS_LOG_PLANS=1, every new plan is described on stderr:
/// the cuDNN algorithms chosen per convolution (`timed` on the device, or
/// from the heuristics) and the memory it takes.
fn log_plan(
    layers: &[Layer],
    (convs, timed): (&[Option<ConvPlan>], bool),
    (s, compute): (Shape, DType),
    (dims, buffers, workspace): (&[(usize, usize, usize)], usize, usize),
) {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    eprintln!(
        "perceptual plan for {s} computing in {} (cuDNN {}, algorithms {}): buffers {:.1} MiB, cuDNN workspace {:.1} MiB",
        compute.name(),
        super::cudnn::version(),
        if timed { "timed" } else { "from heuristics" },
        mib(buffers),
        mib(workspace)
    );
    for ((layer, conv), (c, h, w)) in layers.iter().zip(convs).zip(dims) {
        if let Some(conv) = conv {
            eprintln!(
                "  {} ({c} channels, {h}x{w}, {} images forward): {}",
                layer.name,
                conv.forward_images,
                conv.describe()
            );
        }
    }
}

impl ShapePlan {
    pub(crate) fn matches(&self, dev: &CudaDevice, s: Shape, dtype: DType, tf32: bool) -> bool {
        self.key == (s, dtype, tf32, stream_id(dev))
    }

    pub(crate) fn new(
        dev: &CudaDevice,
        handle: &Handle,
        layers: &[Layer],
        plan: &Plan,
        s: Shape,
        compute: DType,
    ) -> Result<Self> {
        let layers = &layers[..=plan.deepest()];
        let dims = layer_dims(layers, s.h, s.w);
        // The call with the gradient uses every buffer a forward-only call
        // does, and has every convolution at its batch.
        let sched = schedule(layers, plan, (s.n, s.h, s.w), true, false);
        let forward_images = |k: usize| {
            sched.steps.iter().find_map(|step| match step {
                Step::ConvForward { k: at, x, .. } if *at == k => Some(x.count),
                _ => None,
            })
        };
        let layout = Layout::new(&sched, compute.size());
        // The workspace gets what the budget leaves after the buffers (its
        // allocation is at least 256 bytes).
        let limit = WorkspaceLimit {
            preferred: MAX_WORKSPACE,
            most: plan.budget.map(|b| b.saturating_sub(layout.bytes + 256)),
        };
        let convs_at = || {
            let mut in_c = INPUT_CHANNELS;
            layers
                .iter()
                .zip(&dims)
                .enumerate()
                .map(move |(k, (layer, &(c, h, w)))| {
                    let conv = match (layer.module, forward_images(k)) {
                        (Module::Conv { out_c, .. }, Some(images)) => {
                            Some((images, (in_c, out_c, h, w)))
                        }
                        _ => None,
                    };
                    in_c = c;
                    conv
                })
        };
        // Held only while planning: cuDNN times its algorithms on it.
        let scratch = benchmark_algorithms()
            .then(|| {
                let data = convs_at()
                    .flatten()
                    .map(|(images, dims)| ConvPlan::scratch_bytes(compute, images, dims))
                    .max()?;
                Some((
                    alloc(dev, data, "algorithm timing scratch").ok()?,
                    alloc(dev, limit.preferred_bytes(), "algorithm timing workspace").ok()?,
                ))
            })
            .flatten();
        let scratch_addrs = scratch.as_ref().map(|(data, ws)| Scratch {
            data: addr(data, dev),
            workspace: addr(ws, dev),
            workspace_bytes: limit.preferred_bytes(),
        });
        let mut convs = Vec::new();
        let mut workspace = 0;
        for conv in convs_at() {
            convs.push(match conv {
                Some((images, dims)) => {
                    let conv_plan = |scratch| {
                        ConvPlan::new(
                            handle,
                            compute,
                            (images, s.n),
                            dims,
                            plan.tf32,
                            limit,
                            scratch,
                        )
                    };
                    // Timing that finds nothing usable falls back to the heuristics.
                    let p = conv_plan(scratch_addrs).or_else(|e| match scratch_addrs {
                        Some(_) => conv_plan(None),
                        None => Err(e),
                    })?;
                    workspace = workspace.max(p.workspace);
                    Some(p)
                }
                None => None,
            });
        }
        drop(scratch);
        if super::env_flag("PERCEPTUAL_LOSS_LOG_PLANS") {
            log_plan(
                layers,
                (&convs, scratch_addrs.is_some()),
                (s, compute),
                (&dims, layout.bytes, workspace),
            );
        }
        let arena = alloc(dev, layout.bytes, "activations and gradients")?;
        let workspace = alloc(dev, workspace, "cuDNN workspace")?;
        Ok(ShapePlan {
            key: (s, compute, plan.tf32, stream_id(dev)),
            convs,
            footprint: layout.bytes.max(256) + workspace.len(),
            arena,
            layout,
            workspace,
        })
    }

    /// Queues `call` on `dev`'s stream.
    pub(crate) fn run(
        &mut self,
        dev: &CudaDevice,
        handle: &Handle,
        weights: &DeviceWeights,
        layers: &[Layer],
        plan: &Plan,
        call: &PerceptualCall,
    ) -> Result<()> {
        let cudnn = Cudnn {
            handle,
            plans: &self.convs,
            workspace: addr(&self.workspace, dev),
        };
        let net = Net {
            layers,
            weights: &weights.addrs(dev),
            compute: weights.dtype,
        };
        let mut times = StepTimes::start(dev)?;
        perceptual(
            dev,
            &cudnn,
            net,
            plan,
            (&self.layout, addr(&self.arena, dev)),
            call,
            |step| match times.as_mut() {
                Some(t) => t.after(dev, step.kind(), step.label(layers)),
                None => Ok(()),
            },
        )?;
        match times {
            Some(t) => t.report(&format!(
                "{} {} {}",
                call.shape,
                weights.dtype.name(),
                if call.grad.is_some() {
                    "fwd+bwd"
                } else {
                    "forward only"
                }
            )),
            None => Ok(()),
        }
    }
}
