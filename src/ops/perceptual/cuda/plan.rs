//! The per-shape plan: what one input shape needs on the device, built
//! once and reused. It holds the cuDNN descriptors and algorithms of every
//! convolution, the one allocation that holds every buffer of the schedule
//! (laid out by `layout.rs`) and the cuDNN workspace.

use super::convs::Cudnn;
use super::exec;
use super::graph::{self, GraphKey, Graphs, Next, OnStream};
use super::layout::Layout;
use super::schedule::{self, layer_dims, Batch, Step};
use super::steps::{DeviceNet, Exec, KeptAt};
use super::CudaCall;
use crate::cuda::cudnn::{self, CudnnConv, Handle, Scratch, WorkspaceLimit, MAX_WORKSPACE};
use crate::cuda::step_times::{self, StepTimes};
use crate::cuda::Gpu;
use crate::device::CudaDevice;
use crate::error::{Error, Result};
use crate::ops::perceptual::config::PerceptualSpec;
use crate::tensor::{DType, Shape};
use crate::vgg::{DeviceWeights, Dims, Layer, Module, INPUT_CHANNELS};
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
        .map_err(|e| Error::cuda_alloc(what, bytes, e))
}

/// Bytes of the buffers (not the cuDNN workspace) a call on `n` images
/// (or image pairs) of `h` x `w` in a batch holding `holds` holds.
pub(crate) fn buffer_bytes(
    layers: &[Layer],
    spec: &PerceptualSpec,
    holds: Batch,
    nhw: (usize, usize, usize),
    compute: DType,
) -> Result<usize> {
    let sched = schedule::build(layers, spec, holds, nhw, true, false)?;
    Ok(Layout::new(&sched, compute.size()).bytes)
}

/// With PERCEPTUAL_LOSS_CUDNN_BENCHMARK=1, a new plan times cuDNN's
/// algorithms on the device and takes the fastest deterministic one (as
/// `torch.backends.cudnn.benchmark` does); otherwise cuDNN's heuristics
/// choose, which plans instantly but may pick a slower kernel. Read at
/// each new plan, so it reaches the Rust, C and Python interfaces alike.
/// While planning, the timing holds scratch for the largest layer's input
/// and output and a workspace, briefly and outside any memory budget.
fn benchmark_algorithms() -> bool {
    crate::cuda::env_flag("PERCEPTUAL_LOSS_CUDNN_BENCHMARK")
}

/// Everything one input shape needs, allocated once.
pub(crate) struct ShapePlan {
    /// (input shape, what the batch holds, compute dtype, TF32, stream):
    /// buffers belong to one stream.
    key: (Shape, Batch, DType, bool, usize),
    /// By layer index: the cuDNN convolution of each conv layer.
    convs: Vec<Option<CudnnConv>>,
    /// Every buffer of the schedule, at `layout`'s offsets.
    arena: CudaSlice<u8>,
    layout: Layout,
    workspace: CudaSlice<u8>,
    /// Device bytes held by this plan.
    pub footprint: usize,
    /// A caller's CUDA graph captured a call of this plan: its buffers
    /// must outlive the graph, so the plan cache never drops it.
    pub captured: bool,
    /// The plan's own CUDA graphs of whole calls (`graph.rs`), dropped
    /// with it.
    pub graphs: Graphs,
}

/// With PERCEPTUAL_LOSS_LOG_PLANS=1, every new plan is described on stderr:
/// the cuDNN algorithms chosen per convolution (`timed` on the device, or
/// from the heuristics) and the memory it takes.
fn log_plan(
    (layers, spec): (&[Layer], &PerceptualSpec),
    (convs, timed): (&[Option<CudnnConv>], bool),
    ((s, holds), compute): ((Shape, Batch), DType),
    (dims, buffers, workspace): (&[Dims], usize, usize),
) {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let batch = super::call_kind(holds);
    eprintln!(
        "perceptual plan for {s}{batch} computing in {} (cuDNN {}, algorithms {}): buffers {:.1} MiB, cuDNN workspace {:.1} MiB",
        compute.name(),
        cudnn::version(),
        if timed { "timed" } else { "from heuristics" },
        mib(buffers),
        mib(workspace)
    );
    // The caller's tensors counted in the compute dtype: the plan serves
    // every input dtype.
    if let Ok(cost) = super::cost::report(layers, spec, (s, holds), (compute, compute), true) {
        eprintln!("  cost per call with the gradient: {cost}");
    }
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

/// Per conv layer (by index): the images of its forward batch and its
/// (input channels, output channels, H, W); `None` for other layers.
type ConvShapes = Vec<Option<(usize, (usize, usize, usize, usize))>>;

fn conv_shapes(layers: &[Layer], dims: &[Dims], sched: &schedule::Schedule) -> ConvShapes {
    let forward_images = |layer: usize| {
        sched.steps.iter().find_map(|step| match step {
            Step::ConvForward(c) if c.layer == layer => Some(c.x.count),
            _ => None,
        })
    };
    let mut in_c = INPUT_CHANNELS;
    layers
        .iter()
        .zip(dims)
        .map(|(layer, &(c, h, w))| {
            let conv = match (layer.module, forward_images(layer.index)) {
                (Module::Conv { out_c, .. }, Some(images)) => Some((images, (in_c, out_c, h, w))),
                _ => None,
            };
            in_c = c;
            conv
        })
        .collect()
}

impl ShapePlan {
    /// What the batch of its calls holds.
    pub(crate) fn holds(&self) -> Batch {
        self.key.1
    }

    pub(crate) fn matches(
        &self,
        dev: &CudaDevice,
        (s, holds): (Shape, Batch),
        dtype: DType,
        tf32: bool,
    ) -> bool {
        self.key == (s, holds, dtype, tf32, stream_id(dev))
    }

    pub(crate) fn new(
        dev: &CudaDevice,
        handle: &Handle,
        layers: &[Layer],
        spec: &PerceptualSpec,
        (s, holds): (Shape, Batch),
        compute: DType,
    ) -> Result<Self> {
        let layers = &layers[..=spec.deepest()];
        let dims = layer_dims(layers, s.h, s.w);
        // The call with the gradient uses every buffer a forward-only call
        // does, and has every convolution at its batch.
        let sched = schedule::build(layers, spec, holds, (s.n, s.h, s.w), true, false)?;
        let layout = Layout::new(&sched, compute.size());
        // The workspace gets what the budget leaves after the buffers (its
        // allocation is at least 256 bytes).
        let limit = WorkspaceLimit {
            preferred: MAX_WORKSPACE,
            most: spec.budget.map(|b| b.saturating_sub(layout.bytes + 256)),
        };
        let shapes = conv_shapes(layers, &dims, &sched);
        // Held only while planning: cuDNN times its algorithms on it.
        let scratch = benchmark_algorithms()
            .then(|| {
                let data = shapes
                    .iter()
                    .flatten()
                    .map(|&(images, dims)| CudnnConv::scratch_bytes(compute, images, dims))
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
        for shape in shapes {
            convs.push(match shape {
                Some((images, dims)) => {
                    let conv = |scratch| {
                        CudnnConv::new(
                            handle,
                            compute,
                            (images, s.n),
                            dims,
                            spec.tf32,
                            limit,
                            scratch,
                        )
                    };
                    // Timing that finds nothing usable falls back to the heuristics.
                    let c = conv(scratch_addrs).or_else(|e| match scratch_addrs {
                        Some(_) => conv(None),
                        None => Err(e),
                    })?;
                    workspace = workspace.max(c.workspace);
                    Some(c)
                }
                None => None,
            });
        }
        drop(scratch);
        if crate::cuda::env_flag("PERCEPTUAL_LOSS_LOG_PLANS") {
            log_plan(
                (layers, spec),
                (&convs, scratch_addrs.is_some()),
                ((s, holds), compute),
                (&dims, layout.bytes, workspace),
            );
        }
        let arena = alloc(dev, layout.bytes, "activations and gradients")?;
        let workspace = alloc(dev, workspace, "cuDNN workspace")?;
        Ok(ShapePlan {
            key: (s, holds, compute, spec.tf32, stream_id(dev)),
            convs,
            footprint: layout.bytes.max(256) + workspace.len(),
            captured: false,
            graphs: Graphs::default(),
            arena,
            layout,
            workspace,
        })
    }

    /// Queues `whole` on `dev`'s stream in chunks of `chunk` images, each
    /// of this plan's shape, against `kept[i]` for chunk i: replayed from
    /// a CUDA graph when `graphs` and the call allows it (see `graph.rs`).
    pub(crate) fn run_whole(
        &mut self,
        (dev, handle): (&CudaDevice, &Handle),
        net: (&DeviceWeights, &[Layer], &PerceptualSpec),
        (whole, chunk, graphs): (&CudaCall, usize, bool),
        (lpips, kept): (u64, &[KeptAt]),
    ) -> Result<()> {
        let chunks = |plan: &mut Self,
                      gpu: &dyn Fn(&mut Self, &CudaCall, &KeptAt) -> Result<()>,
                      call: &CudaCall| {
            call.chunks(chunk)
                .iter()
                .zip(kept)
                .try_for_each(|(c, k)| gpu(plan, c, k))
        };
        let timed = step_times::wanted();
        let plain = |plan: &mut Self, c: &CudaCall, k: &KeptAt| {
            plan.run((dev, dev, timed), handle, net, (c, lpips, k))
        };
        // Step times need an event after each step; a caller's capture
        // takes the plain call into its own graph.
        let graphed = graphs && graph::eligible(whole) && !timed && !dev.capturing();
        if !graphed {
            return chunks(self, &plain, whole);
        }
        let key = GraphKey::new(whole, chunk, (kept, lpips), dev)?;
        let mut graphs = std::mem::take(&mut self.graphs);
        let done = match graphs.next(&key) {
            Next::Replay(i) => graphs.replay(i, dev, &whole.io),
            Next::Plain => chunks(self, &plain, whole).and_then(|()| {
                // Taken again: the call may have set up the reduction scratch.
                graphs.saw(GraphKey::new(whole, chunk, (kept, lpips), dev)?);
                Ok(())
            }),
            Next::Capture => {
                let queue = |via: &CudaCall, on: &OnStream<'_>| {
                    let captured = |plan: &mut Self, c: &CudaCall, k: &KeptAt| {
                        plan.run((dev, on, false), handle, net, (c, lpips, k))
                    };
                    chunks(self, &captured, via)
                };
                match graphs.capture((dev, handle), key, whole, queue) {
                    Ok(true) => graphs.replay(graphs.len() - 1, dev, &whole.io),
                    Ok(false) => chunks(self, &plain, whole),
                    Err(e) => Err(e),
                }
            }
        };
        self.graphs = graphs;
        done
    }

    /// Queues `call` on `gpu` (`dev` itself, or its capture stream), with
    /// an event after each step when `timed` (on `dev` itself only).
    pub(crate) fn run<G: Gpu>(
        &mut self,
        (dev, gpu, timed): (&CudaDevice, &G, bool),
        handle: &Handle,
        (weights, layers, spec): (&DeviceWeights, &[Layer], &PerceptualSpec),
        (call, lpips, kept): (&CudaCall, u64, &KeptAt),
    ) -> Result<()> {
        let cudnn = Cudnn {
            handle,
            convs: &self.convs,
            workspace: addr(&self.workspace, dev),
        };
        let addrs = weights.addrs(dev);
        let x = Exec {
            gpu,
            convs: &cudnn,
            net: DeviceNet {
                layers,
                weights: &addrs,
                compute: weights.dtype,
                lpips,
            },
            spec,
            call,
            layout: &self.layout,
            base: addr(&self.arena, dev),
            kept,
        };
        let mut times = timed.then(|| StepTimes::start(dev)).transpose()?;
        exec::run(&x, |step| match times.as_mut() {
            Some(t) => t.after(dev, step.kind(), step.label(layers)),
            None => Ok(()),
        })?;
        match times {
            Some(t) => t.report(&format!(
                "{} {} {}",
                call.io.shape,
                weights.dtype.name(),
                if call.io.grad.is_some() {
                    "fwd+bwd"
                } else {
                    "forward only"
                }
            )),
            None => Ok(()),
        }
    }
}
