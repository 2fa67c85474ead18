//! Perceptual loss on CUDA (DESIGN.md section 5): one preprocessing pass
//! into an NHWC [pred; target] batch, cuDNN convolutions, fused bias+ReLU
//! passes that keep a 1-bit mask for the pred half, pooling with a stored
//! argmax, one fused distance+gradient pass per tap, and a backward over
//! the pred half only (weights are frozen: backward-data needs no
//! activations). Buffers, descriptors and algorithms are built once per
//! input shape and dtype (a [`ShapePlan`]) and reused.

use super::abi::*;
use super::cudnn::{ConvPlan, Handle};
use super::schedule::{layer_dims, schedule, Step, TapGrad, INPUT_CHANNELS};
use super::{grid_for, kernel_dtype, kernels, launch_symbol, nvtx, BLOCK};
use crate::device::CudaDevice;
use crate::error::{Error, Result};
use crate::loss::perceptual::Plan;
use crate::tensor::{DType, Shape};
use crate::vgg::Pooling;
use crate::vgg::{ConvWeights, Layer, Module};
use cudarc::driver::{CudaSlice, DevicePtr};
use half::{bf16, f16};

/// One convolution's parameters on the device: the filter in the compute
/// dtype, KRSC (NHWC) layout, input channels padded for the first layer,
/// and the bias in f32.
pub(crate) struct DeviceConv {
    weight: CudaSlice<u8>,
    bias: CudaSlice<f32>,
}

/// The network's resident parameters on one device.
pub(crate) struct DeviceWeights {
    convs: Vec<DeviceConv>,
    dtype: DType,
}

impl std::fmt::Debug for DeviceWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceWeights({} convs, {})",
            self.convs.len(),
            self.dtype.name()
        )
    }
}

fn to_bytes(values: impl Iterator<Item = f32>, dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => values.flat_map(f32::to_le_bytes).collect(),
        DType::F16 => values
            .flat_map(|v| f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .flat_map(|v| bf16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

fn upload_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::cuda(what, e)
}

/// Uploads every convolution once, converted to `dtype`, and waits so the
/// weights are ready for any stream.
pub(crate) fn upload(
    dev: &CudaDevice,
    convs: &[ConvWeights],
    dtype: DType,
) -> Result<DeviceWeights> {
    let st = dev.stream();
    let mut out = Vec::with_capacity(convs.len());
    for p in convs {
        let in_c = if p.in_c < INPUT_CHANNELS {
            INPUT_CHANNELS
        } else {
            p.in_c
        };
        // [out][in][ky][kx] -> [out][ky][kx][in_padded]
        let krsc = (0..p.out_c).flat_map(|o| {
            (0..9).flat_map(move |k| {
                (0..in_c).map(move |c| {
                    if c < p.in_c {
                        p.weight[(o * p.in_c + c) * 9 + k]
                    } else {
                        0.0
                    }
                })
            })
        });
        out.push(DeviceConv {
            weight: st
                .clone_htod(&to_bytes(krsc, dtype))
                .map_err(upload_err("uploading weights"))?,
            bias: st
                .clone_htod(&p.bias)
                .map_err(upload_err("uploading biases"))?,
        });
    }
    dev.synchronize()?;
    Ok(DeviceWeights { convs: out, dtype })
}

fn stream_id(dev: &CudaDevice) -> usize {
    dev.stream().cu_stream() as usize
}

fn addr<T>(s: &CudaSlice<T>, dev: &CudaDevice) -> u64 {
    s.device_ptr(dev.stream()).0
}

fn alloc(dev: &CudaDevice, bytes: usize, what: &str) -> Result<CudaSlice<u8>> {
    // SAFETY: every buffer is written before it is read (see ShapePlan).
    unsafe { dev.stream().alloc::<u8>(bytes.max(256)) }
        .map_err(|e| Error::cuda(&format!("allocating {what} ({bytes} bytes)"), e))
}

/// Everything one input shape needs, allocated once.
pub(crate) struct ShapePlan {
    /// (input shape, compute dtype, TF32, stream): buffers belong to one stream.
    key: (Shape, DType, bool, usize),
    convs: Vec<Option<ConvPlan>>,
    act: [CudaSlice<u8>; 2],
    grad: [CudaSlice<u8>; 2],
    masks: Vec<Option<CudaSlice<u8>>>,
    argmax: Vec<Option<CudaSlice<u8>>>,
    tap_grads: Vec<Option<CudaSlice<u8>>>,
    workspace: CudaSlice<u8>,
    /// Device bytes held by this plan.
    pub footprint: usize,
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
        let es = compute.size();
        let n = s.n;
        let input = s.h * s.w * INPUT_CHANNELS;
        let largest = dims
            .iter()
            .map(|(c, h, w)| c * h * w)
            .chain([input])
            .max()
            .unwrap_or(input);
        let mut footprint = 0;
        let mut buffer = |bytes: usize, what: &str| -> Result<CudaSlice<u8>> {
            footprint += bytes.max(256);
            alloc(dev, bytes, what)
        };
        let act = [
            buffer(2 * n * largest * es, "activations")?,
            buffer(2 * n * largest * es, "activations")?,
        ];
        let grad = [
            buffer(n * largest * es, "gradients")?,
            buffer(n * largest * es, "gradients")?,
        ];
        let (mut convs, mut masks, mut argmax, mut tap_grads) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut workspace = 0;
        let mut in_dims = (INPUT_CHANNELS, s.h, s.w);
        for (layer, &(c, h, w)) in layers.iter().zip(&dims) {
            let elems = n * c * h * w;
            convs.push(match layer.module {
                Module::Conv { out_c, .. } => {
                    let p = ConvPlan::new(
                        handle,
                        compute,
                        (2 * n, n),
                        (in_dims.0, out_c, h, w),
                        plan.tf32,
                    )?;
                    workspace = workspace.max(p.workspace);
                    Some(p)
                }
                _ => None,
            });
            masks.push(match layer.module {
                Module::Relu => Some(buffer(elems.div_ceil(32) * 4, "ReLU masks")?),
                _ => None,
            });
            argmax.push(match layer.module {
                Module::Pool => Some(buffer(elems, "pool argmax")?),
                _ => None,
            });
            let inner_tap = plan.tap_weight(layer.index).is_some() && layer.index != plan.deepest();
            tap_grads.push(if inner_tap {
                Some(buffer(elems * es, "tap gradients")?)
            } else {
                None
            });
            in_dims = (c, h, w);
        }
        let workspace = buffer(workspace, "cuDNN workspace")?;
        Ok(ShapePlan {
            key: (s, compute, plan.tf32, stream_id(dev)),
            convs,
            act,
            grad,
            masks,
            argmax,
            tap_grads,
            workspace,
            footprint,
        })
    }
}

/// Device addresses of one call (or one chunk of images of it).
pub(crate) struct PerceptualCall {
    /// Images the loss averages over: the whole batch when chunked.
    pub batch: usize,
    /// Whether the loss already holds earlier chunks' share.
    pub accumulate: bool,
    pub pred: u64,
    pub target: u64,
    pub dtype: DType,
    pub shape: Shape,
    pub grad: Option<u64>,
    pub beta: f32,
    pub loss: u64,
    pub per_sample: Option<u64>,
}

fn run(
    dev: &CudaDevice,
    symbol: &str,
    grid: (u32, u32),
    params: &impl cudarc::driver::DeviceRepr,
) -> Result<()> {
    launch_symbol(dev, &kernels::VGG, symbol, grid, params)
}

/// Queues the whole loss (and gradient) on `dev`'s stream: the steps of
/// [`schedule`], each a kernel launch or a cuDNN call.
pub(crate) fn perceptual(
    dev: &CudaDevice,
    handle: &Handle,
    weights: &DeviceWeights,
    layers: &[Layer],
    plan: &Plan,
    sp: &mut ShapePlan,
    call: &PerceptualCall,
) -> Result<()> {
    let s = call.shape;
    let n = s.n as i64;
    let cd = kernel_dtype(weights.dtype);
    let (mut scale, mut shift) = ([0f32; 3], [0f32; 3]);
    for c in 0..3 {
        let (a, b) = plan.norm.affine(c);
        scale[c] = a as f32;
        shift[c] = b as f32;
    }
    let _call = nvtx::range(|| format!("perceptual {}x{}x{}x{}", s.n, s.c, s.h, s.w));
    let act = [addr(&sp.act[0], dev), addr(&sp.act[1], dev)];
    let grad = [addr(&sp.grad[0], dev), addr(&sp.grad[1], dev)];
    let workspace = addr(&sp.workspace, dev);
    let side = |bufs: &[Option<CudaSlice<u8>>], k: Option<usize>| -> Result<u64> {
        match k {
            None => Ok(0),
            Some(k) => bufs[k]
                .as_ref()
                .map(|b| addr(b, dev))
                .ok_or_else(|| Error::Internal(format!("no buffer for layer {k}"))),
        }
    };
    let conv_plan = |k: usize| {
        sp.convs[k]
            .as_ref()
            .ok_or_else(|| Error::Internal("no plan for a convolution".into()))
    };
    let name = |k: usize| layers[k].name.as_str();

    for step in schedule(layers, plan, s.h, s.w, call.grad.is_some(), call.accumulate) {
        match step {
            Step::Preprocess => {
                let _r = nvtx::range(|| "preprocess".into());
                let p = pl_k_preprocess_params {
                    pred: call.pred as *const _,
                    target: call.target as *const _,
                    out: act[0] as *mut _,
                    n,
                    h: s.h as i64,
                    w: s.w as i64,
                    c: s.c as i32,
                    cpad: INPUT_CHANNELS as i32,
                    in_dtype: kernel_dtype(call.dtype),
                    out_dtype: cd,
                    scale,
                    shift,
                };
                run(
                    dev,
                    "pl_vgg_preprocess",
                    grid_for(2 * s.n * s.h * s.w * INPUT_CHANNELS),
                    &p,
                )?;
            }
            Step::ConvForward { k, conv, from, to } => {
                let _r = nvtx::range(|| format!("forward {}", name(k)));
                // SAFETY: the plan's buffers hold the planned shapes.
                unsafe {
                    conv_plan(k)?.forward(
                        handle,
                        act[from],
                        addr(&weights.convs[conv].weight, dev),
                        act[to],
                        workspace,
                    )?
                };
            }
            Step::BiasAct {
                act: a,
                bias,
                relu,
                mask,
                dims: (c, h, w),
            } => {
                let elems = s.n * c * h * w;
                let p = pl_k_bias_act_params {
                    x: act[a] as *mut _,
                    bias: bias.map_or(std::ptr::null(), |b| {
                        addr(&weights.convs[b].bias, dev) as *const f32
                    }),
                    mask: side(&sp.masks, mask)? as *mut u32,
                    count: 2 * elems as i64,
                    pred_count: elems as i64,
                    c: c as i32,
                    dtype: cd,
                    relu: relu as i32,
                    reserved: 0,
                };
                run(dev, "pl_vgg_bias_act", grid_for(2 * elems), &p)?;
            }
            Step::Pool {
                from,
                to,
                argmax,
                input: (c, h, w),
            } => {
                let p = pl_k_pool_params {
                    x: act[from] as *const _,
                    y: act[to] as *mut _,
                    argmax: side(&sp.argmax, argmax)? as *mut u8,
                    images: 2 * n,
                    pred_images: n,
                    h: h as i64,
                    w: w as i64,
                    c: c as i32,
                    dtype: cd,
                    avg: (plan.pooling == Pooling::Avg) as i32,
                    reserved: 0,
                };
                run(
                    dev,
                    "pl_vgg_pool",
                    grid_for(2 * s.n * c * (h / 2) * (w / 2)),
                    &p,
                )?;
            }
            Step::Tap {
                act: a,
                grad: g,
                dims: (c, h, w),
                weight,
                accumulate,
            } => {
                let target = match g {
                    None => 0,
                    Some(TapGrad::Start) => grad[0],
                    Some(TapGrad::Inner(k)) => side(&sp.tap_grads, Some(k))?,
                };
                tap(
                    dev,
                    act[a],
                    target,
                    call,
                    (c * h * w, weight, accumulate),
                    plan,
                    cd,
                )?;
            }
            Step::ReluBackward {
                g,
                before,
                mask,
                after,
                dims: (c, h, w),
            } => {
                let elems = s.n * c * h * w;
                let p = pl_k_grad_step_params {
                    g: grad[g] as *mut _,
                    before: side(&sp.tap_grads, before)? as *const _,
                    mask: side(&sp.masks, mask)? as *const u32,
                    after: side(&sp.tap_grads, after)? as *const _,
                    count: elems as i64,
                    dtype: cd,
                    reserved: 0,
                };
                run(dev, "pl_vgg_grad_step", grid_for(elems), &p)?;
            }
            Step::Unpool {
                from,
                to,
                before,
                argmax,
                input: (c, h, w),
            } => {
                let p = pl_k_unpool_params {
                    gy: grad[from] as *const _,
                    before: side(&sp.tap_grads, before)? as *const _,
                    gx: grad[to] as *mut _,
                    argmax: side(&sp.argmax, argmax)? as *const u8,
                    n,
                    h: h as i64,
                    w: w as i64,
                    c: c as i32,
                    dtype: cd,
                };
                run(dev, "pl_vgg_unpool", grid_for(s.n * c * h * w), &p)?;
            }
            Step::ConvBackward { k, conv, from, to } => {
                let _r = nvtx::range(|| format!("backward {}", name(k)));
                // SAFETY: the plan's buffers hold the planned shapes.
                unsafe {
                    conv_plan(k)?.backward_data(
                        handle,
                        addr(&weights.convs[conv].weight, dev),
                        grad[from],
                        grad[to],
                        workspace,
                    )?
                };
            }
            Step::InputGrad { g } => {
                let _r = nvtx::range(|| "input gradient".into());
                let p = pl_k_input_grad_params {
                    g: grad[g] as *const _,
                    grad: call.grad.unwrap_or(0) as *mut _,
                    n,
                    h: s.h as i64,
                    w: s.w as i64,
                    c: s.c as i32,
                    cpad: INPUT_CHANNELS as i32,
                    g_dtype: cd,
                    out_dtype: kernel_dtype(call.dtype),
                    scale,
                    beta: call.beta,
                    reserved: 0,
                };
                run(
                    dev,
                    "pl_vgg_input_grad",
                    grid_for(s.n * s.c * s.h * s.w),
                    &p,
                )?;
            }
        }
    }
    Ok(())
}

/// Blocks in flight a tap aims for; fixed, so the loss bits depend only on the shape.
const TAP_BLOCKS: usize = 1024;

/// The distance at one tap: `(per_image elements, weight, accumulate)`.
fn tap(
    dev: &CudaDevice,
    x: u64,
    grad: u64,
    call: &PerceptualCall,
    (per_image, weight, accumulate): (usize, f64, bool),
    plan: &Plan,
    dtype: i32,
) -> Result<()> {
    let n = call.shape.n;
    let target_blocks = TAP_BLOCKS
        .div_ceil(n)
        .min(per_image.div_ceil(BLOCK as usize))
        .max(1);
    let per_block = per_image.div_ceil(target_blocks);
    let blocks_per_image = per_image.div_ceil(per_block);
    let ws = dev.workspace(0, blocks_per_image * n)?;
    let mut reduce = ws.reduce;
    reduce.loss = call.loss as *mut f32;
    reduce.per_sample = call.per_sample.unwrap_or(0) as *mut f32;
    let _stage = nvtx::range(|| "tap loss".into());
    let p = pl_k_tap_params {
        x: x as *const _,
        grad: grad as *mut _,
        reduce,
        n: n as i64,
        batch: call.batch as i64,
        per_image: per_image as i64,
        per_block: per_block as i64,
        blocks_per_image: blocks_per_image as i32,
        dtype,
        criterion: plan.criterion.kernel_id(),
        accumulate: accumulate as i32,
        weight: weight as f32,
        reserved: 0,
    };
    run(
        dev,
        "pl_vgg_tap",
        (blocks_per_image as u32, n.min(65535) as u32),
        &p,
    )
}
