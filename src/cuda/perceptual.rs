//! Perceptual loss on CUDA (DESIGN.md section 5): runs the steps of
//! `schedule.rs` — one preprocessing pass into an NHWC [pred; target]
//! batch, cuDNN convolutions, fused bias+ReLU(+pool)(+tap) passes that keep
//! a 1-bit mask and a 2-bit argmax for the pred half, and a backward over
//! the pred half only (weights are frozen: backward-data needs no
//! activations) — each as a kernel launch or a convolution, on the buffers
//! of a `ShapePlan` (`shape_plan.rs`).

use super::abi::*;
use super::device_weights::ConvAddrs;
use super::layout::Layout;
use super::schedule::{schedule, Buf, Images, Schedule, Step, TapTerm, INPUT_CHANNELS};
use super::shape_plan::Convs;
use super::{grid_for, kernel_dtype, kernels, nvtx, Gpu, BLOCK};
use crate::error::{Error, Result};
use crate::loss::perceptual::Plan;
use crate::tensor::{DType, Shape};
use crate::vgg::{Layer, Pooling};

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

impl PerceptualCall {
    /// The call split into runs of at most `chunk` images. Images are
    /// independent: a chunk is a smaller batch at an offset, scaled by the
    /// whole batch and added to the earlier chunks' loss.
    pub(crate) fn chunks(&self, chunk: usize) -> Vec<PerceptualCall> {
        let s = self.shape;
        let chunk = chunk.clamp(1, s.n);
        // pred, target and gradient share the image size
        let image_bytes = (s.c * s.h * s.w * self.dtype.size()) as u64;
        (0..s.n)
            .step_by(chunk)
            .map(|start| {
                let at = start as u64;
                PerceptualCall {
                    batch: self.batch,
                    accumulate: self.accumulate || start > 0,
                    pred: self.pred + at * image_bytes,
                    target: self.target + at * image_bytes,
                    dtype: self.dtype,
                    shape: Shape::new(chunk.min(s.n - start), s.c, s.h, s.w),
                    grad: self.grad.map(|g| g + at * image_bytes),
                    beta: self.beta,
                    loss: self.loss,
                    per_sample: self.per_sample.map(|ps| ps + at * 4),
                }
            })
            .collect()
    }
}

/// The network as the kernels see it.
#[derive(Clone, Copy)]
pub(crate) struct Net<'a> {
    pub layers: &'a [Layer],
    pub weights: &'a [ConvAddrs],
    pub compute: DType,
}

fn vgg_kernel(
    gpu: &impl Gpu,
    symbol: &str,
    grid: (u32, u32),
    params: &(impl cudarc::driver::DeviceRepr + Copy),
) -> Result<()> {
    gpu.launch_symbol(&kernels::VGG, symbol, grid, params)
}

/// Elements per thread of the vectorised VGG passes (PL_VEC in kernels/common.cuh).
const VEC: usize = 8;

/// An error unless `c` channels split into whole [`VEC`]-channel vectors.
fn check_vec(c: usize) -> Result<()> {
    if c.is_multiple_of(VEC) {
        Ok(())
    } else {
        Err(Error::Internal(format!(
            "{c} channels: the VGG passes need a multiple of {VEC}"
        )))
    }
}

/// The grid of a pass giving each thread [`VEC`] consecutive channels of
/// `count` elements with `c` channels.
fn vec_grid(count: usize, c: usize) -> Result<(u32, u32)> {
    check_vec(c)?;
    Ok(grid_for(count / VEC))
}

/// Queues the whole loss (and gradient): the steps of [`schedule`], each a
/// kernel launch or a convolution, on buffers at `base` + the layout's
/// offsets. The layout must come from the gradient schedule of the same
/// shape (it holds every buffer either schedule uses).
pub(crate) fn perceptual(
    gpu: &impl Gpu,
    convs: &impl Convs,
    net: Net<'_>,
    plan: &Plan,
    (layout, base): (&Layout, u64),
    call: &PerceptualCall,
    mut after_step: impl FnMut(&Step) -> Result<()>,
) -> Result<()> {
    let s = call.shape;
    let n = s.n as i64;
    let cd = kernel_dtype(net.compute);
    let (mut scale, mut shift) = ([0f32; 3], [0f32; 3]);
    for c in 0..3 {
        let (a, b) = plan.norm.affine(c);
        scale[c] = a as f32;
        shift[c] = b as f32;
    }
    let _call = nvtx::range(|| format!("perceptual {}x{}x{}x{}", s.n, s.c, s.h, s.w));
    let sched: Schedule = schedule(
        net.layers,
        plan,
        (s.n, s.h, s.w),
        call.grad.is_some(),
        call.accumulate,
    );
    if layout.offsets.len() < sched.buffers.len() {
        return Err(Error::Internal("a layout from another schedule".into()));
    }
    let at = |b: Buf| base + layout.offsets[b] as u64;
    let span = |x: Images| at(x.buf) + (x.offset * net.compute.size()) as u64;
    let bias_of =
        |conv: Option<usize>| conv.map_or(std::ptr::null(), |b| net.weights[b].bias as *const f32);
    let opt = |b: Option<Buf>| b.map_or(0, at);

    for step in &sched.steps {
        let _r = nvtx::range(|| step.label(net.layers));
        match *step {
            Step::Preprocess { out } => {
                let p = pl_k_preprocess_params {
                    pred: call.pred as *const _,
                    target: call.target as *const _,
                    out: at(out) as *mut _,
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
                vgg_kernel(gpu, "pl_vgg_preprocess", grid_for(2 * s.n * s.h * s.w), &p)?;
            }
            Step::ConvForward { k, conv, x, y } => {
                // SAFETY: the layout's buffers hold the planned shapes.
                unsafe { convs.forward(k, x.count, span(x), net.weights[conv].weight, span(y))? };
            }
            Step::BiasAct {
                k: _,
                x,
                pred,
                bias,
                relu,
                mask,
                dims: (c, h, w),
            } => {
                let per_image = c * h * w;
                let p = pl_k_bias_act_params {
                    x: span(x) as *mut _,
                    bias: bias_of(bias),
                    mask: opt(mask) as *mut u32,
                    count: (x.count * per_image) as i64,
                    pred_count: (pred * per_image) as i64,
                    c: c as i32,
                    dtype: cd,
                    relu: relu as i32,
                    reserved: 0,
                };
                vgg_kernel(
                    gpu,
                    "pl_vgg_bias_act",
                    vec_grid(x.count * per_image, c)?,
                    &p,
                )?;
            }
            Step::BiasActPool {
                k: _,
                x,
                y,
                pred,
                bias,
                mask,
                argmax,
                input: (c, h, w),
            } => {
                let p = pl_k_bias_act_pool_params {
                    x: span(x) as *const _,
                    y: span(y) as *mut _,
                    bias: bias_of(bias),
                    mask: opt(mask) as *mut u32,
                    argmax: opt(argmax) as *mut u32,
                    images: x.count as i64,
                    pred_images: pred as i64,
                    h: h as i64,
                    w: w as i64,
                    c: c as i32,
                    dtype: cd,
                    avg: (plan.pooling == Pooling::Avg) as i32,
                    reserved: 0,
                };
                let pooled = x.count * c * (h / 2) * (w / 2);
                vgg_kernel(gpu, "pl_vgg_bias_act_pool", vec_grid(pooled, c)?, &p)?;
            }
            Step::BiasActPoolTap {
                k: _,
                pred,
                target,
                y_pred,
                y_target,
                bias,
                mask,
                argmax,
                input: (c, h, w),
                ref tap,
            } => {
                check_vec(c)?;
                let sizes = (c * h * w, 4 * VEC); // a unit: 8 channels of a 2x2 window
                let ids = (plan.criterion.kernel_id(), cd);
                with_tap(
                    gpu,
                    call,
                    (span(pred), span(target), opt(tap.grad)),
                    sizes,
                    tap,
                    ids,
                    |t, grid| {
                        let p = pl_k_bias_act_pool_tap_params {
                            tap: t,
                            y: span(y_pred) as *mut _,
                            y_target: span(y_target) as *mut _,
                            bias: bias_of(bias),
                            mask: opt(mask) as *mut u32,
                            argmax: opt(argmax) as *mut u32,
                            h: h as i64,
                            w: w as i64,
                            c: c as i32,
                            avg: (plan.pooling == Pooling::Avg) as i32,
                        };
                        vgg_kernel(gpu, "pl_vgg_bias_act_pool_tap", grid, &p)
                    },
                )?;
            }
            Step::Pool {
                k: _,
                x,
                y,
                pred,
                argmax,
                input: (c, h, w),
            } => {
                let p = pl_k_pool_params {
                    x: span(x) as *const _,
                    y: span(y) as *mut _,
                    argmax: opt(argmax) as *mut u32,
                    images: x.count as i64,
                    pred_images: pred as i64,
                    h: h as i64,
                    w: w as i64,
                    c: c as i32,
                    dtype: cd,
                    avg: (plan.pooling == Pooling::Avg) as i32,
                    reserved: 0,
                };
                let pooled = x.count * c * (h / 2) * (w / 2);
                vgg_kernel(gpu, "pl_vgg_pool", grid_for(pooled), &p)?;
            }
            Step::Tap {
                k: _,
                pred,
                target,
                dims: (c, h, w),
                ref tap,
            } => {
                let sizes = (c * h * w, VEC);
                let ids = (plan.criterion.kernel_id(), cd);
                with_tap(
                    gpu,
                    call,
                    (span(pred), span(target), opt(tap.grad)),
                    sizes,
                    tap,
                    ids,
                    |t, grid| vgg_kernel(gpu, "pl_vgg_tap", grid, &t),
                )?;
            }
            Step::ReluBackward {
                k: _,
                g,
                before,
                mask,
                after,
                dims: (c, h, w),
            } => {
                let elems = s.n * c * h * w;
                let p = pl_k_grad_step_params {
                    g: at(g) as *mut _,
                    before: opt(before) as *const _,
                    mask: at(mask) as *const u32,
                    after: opt(after) as *const _,
                    count: elems as i64,
                    dtype: cd,
                    reserved: 0,
                };
                vgg_kernel(gpu, "pl_vgg_grad_step", vec_grid(elems, c)?, &p)?;
            }
            Step::Unpool {
                k: _,
                gy,
                gx,
                before,
                argmax,
                relu,
                input: (c, h, w),
            } => {
                let p = pl_k_unpool_params {
                    gy: at(gy) as *const _,
                    before: opt(before) as *const _,
                    gx: at(gx) as *mut _,
                    argmax: opt(argmax) as *const u32,
                    relu_before: opt(relu.and_then(|r| r.before)) as *const _,
                    mask: opt(relu.map(|r| r.mask)) as *const u32,
                    after: opt(relu.and_then(|r| r.after)) as *const _,
                    n,
                    h: h as i64,
                    w: w as i64,
                    c: c as i32,
                    dtype: cd,
                };
                vgg_kernel(gpu, "pl_vgg_unpool", vec_grid(s.n * c * h * w, c)?, &p)?;
            }
            Step::ConvBackward { k, conv, dy, dx } => {
                // SAFETY: the layout's buffers hold the planned shapes.
                unsafe { convs.backward_data(k, net.weights[conv].weight, at(dy), at(dx))? };
            }
            Step::InputGrad { g } => {
                let p = pl_k_input_grad_params {
                    g: at(g) as *const _,
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
                vgg_kernel(gpu, "pl_vgg_input_grad", grid_for(s.n * s.h * s.w), &p)?;
            }
        }
        after_step(step)?;
    }
    Ok(())
}

/// Blocks in flight a tap aims for; fixed, so the loss bits depend only on the shape.
const TAP_BLOCKS: usize = 1024;

/// A tap's launch: its parameters, with the reduction scratch, and grid.
/// The grid splits each image's `units` (what one thread takes at a time)
/// into blocks; `unit` elements make one unit.
fn with_tap<R>(
    gpu: &impl Gpu,
    call: &PerceptualCall,
    (pred, target, grad): (u64, u64, u64),
    (per_image, unit): (usize, usize),
    tap: &TapTerm,
    (criterion, dtype): (i32, i32),
    f: impl FnOnce(pl_k_tap_params, (u32, u32)) -> Result<R>,
) -> Result<R> {
    let n = call.shape.n;
    let units = per_image / unit;
    let target_blocks = TAP_BLOCKS
        .div_ceil(n)
        .min(units.div_ceil(BLOCK as usize))
        .max(1);
    let per_block = units.div_ceil(target_blocks);
    let blocks_per_image = units.div_ceil(per_block);
    gpu.with_reduce(0, blocks_per_image * n, |mut reduce| {
        reduce.loss = call.loss as *mut f32;
        reduce.per_sample = call.per_sample.unwrap_or(0) as *mut f32;
        let p = pl_k_tap_params {
            x: pred as *const _,
            target: target as *const _,
            grad: grad as *mut _,
            reduce,
            n: n as i64,
            batch: call.batch as i64,
            per_image: per_image as i64,
            per_block: per_block as i64,
            blocks_per_image: blocks_per_image as i32,
            dtype,
            criterion,
            accumulate: tap.accumulate as i32,
            weight: tap.weight as f32,
            accumulate_per_sample: !tap.first as i32,
        };
        f(p, (blocks_per_image as u32, n.min(65535) as u32))
    })
}

#[cfg(test)]
mod tests {
    //! The whole CUDA path — schedule, layout, launch parameters and the
    //! kernels themselves — run by the host emulator, with a direct
    //! convolution in cuDNN's place, against the CPU backend.

    use super::*;
    use crate::cuda::device_weights::{krsc_bytes, to_bytes};
    use crate::cuda::emulator::{addr, addr_mut, assert_close, values, Emulator};
    use crate::cuda::schedule::layer_dims;
    use crate::cuda::schedule::Dims;
    use crate::cuda::shape_plan::buffer_bytes;
    use crate::loss::feature::Criterion;
    use crate::loss::perceptual::{InputNorm, PerceptualConfig, PerceptualLoss, Tap};
    use crate::tensor::Element;
    use crate::vgg::VggArch;
    use crate::{LossOutputs, TensorMut, TensorRef};
    use half::{bf16, f16};

    /// Values of `dtype` at a host address.
    unsafe fn load(base: u64, dtype: DType, len: usize) -> Vec<f32> {
        match dtype {
            DType::F32 => std::slice::from_raw_parts(base as *const f32, len).to_vec(),
            DType::F16 => std::slice::from_raw_parts(base as *const f16, len)
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            DType::BF16 => std::slice::from_raw_parts(base as *const bf16, len)
                .iter()
                .map(|v| v.to_f32())
                .collect(),
        }
    }

    unsafe fn store(base: u64, dtype: DType, v: &[f32]) {
        let bytes = to_bytes(v.iter().copied(), dtype);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), base as *mut u8, bytes.len());
    }

    /// What cuDNN computes: NHWC, KRSC filters, zero padding 1, f32 sums,
    /// results rounded to the compute dtype.
    struct DirectConvs {
        n: usize,
        /// Per layer: input and output dims.
        dims: Vec<(Dims, Dims)>,
        dtype: DType,
    }

    impl DirectConvs {
        fn new(layers: &[Layer], n: usize, h: usize, w: usize, dtype: DType) -> Self {
            let out = layer_dims(layers, h, w);
            let dims = (0..out.len())
                .map(|k| {
                    let input = if k == 0 {
                        (INPUT_CHANNELS, h, w)
                    } else {
                        out[k - 1]
                    };
                    (input, out[k])
                })
                .collect();
            DirectConvs { n, dims, dtype }
        }

        /// Calls `f(output pixel, tap, input pixel)` for every in-bounds
        /// 3x3 tap, pixels numbered over all images.
        fn windows(images: usize, h: usize, w: usize, mut f: impl FnMut(usize, usize, usize)) {
            for img in 0..images {
                for i in 0..h {
                    for j in 0..w {
                        for t in 0..9 {
                            let (si, sj) =
                                ((i + t / 3).wrapping_sub(1), (j + t % 3).wrapping_sub(1));
                            if si < h && sj < w {
                                f((img * h + i) * w + j, t, (img * h + si) * w + sj);
                            }
                        }
                    }
                }
            }
        }
    }

    impl Convs for DirectConvs {
        unsafe fn forward(
            &self,
            k: usize,
            images: usize,
            x: u64,
            weight: u64,
            y: u64,
        ) -> Result<()> {
            let ((ci, h, w), (co, _, _)) = self.dims[k];
            let xs = load(x, self.dtype, images * h * w * ci);
            let ws = load(weight, self.dtype, co * 9 * ci);
            let mut ys = vec![0f32; images * h * w * co];
            Self::windows(images, h, w, |out, t, src| {
                for o in 0..co {
                    let f = &ws[(o * 9 + t) * ci..][..ci];
                    let v = &xs[src * ci..][..ci];
                    ys[out * co + o] += f.iter().zip(v).map(|(a, b)| a * b).sum::<f32>();
                }
            });
            store(y, self.dtype, &ys);
            Ok(())
        }

        unsafe fn backward_data(&self, k: usize, weight: u64, dy: u64, dx: u64) -> Result<()> {
            let ((ci, h, w), (co, _, _)) = self.dims[k];
            let dys = load(dy, self.dtype, self.n * h * w * co);
            let ws = load(weight, self.dtype, co * 9 * ci);
            let mut dxs = vec![0f32; self.n * h * w * ci];
            Self::windows(self.n, h, w, |out, t, src| {
                for o in 0..co {
                    let g = dys[out * co + o];
                    let f = &ws[(o * 9 + t) * ci..][..ci];
                    for (d, f) in dxs[src * ci..][..ci].iter_mut().zip(f) {
                        *d += f * g;
                    }
                }
            });
            store(dx, self.dtype, &dxs);
            Ok(())
        }
    }

    struct Case {
        arch: VggArch,
        config: PerceptualConfig,
        shape: Shape,
        compute: DType,
        want_grad: bool,
        tol: f64,
    }

    /// Loss, per-sample losses and gradient (beta 0.5 over old values)
    /// through the emulated CUDA path and through the CPU backend.
    fn check<T: Element>(case: Case) {
        let Some(emu) = Emulator::get() else { return };
        let Case {
            arch,
            config,
            shape: s,
            compute,
            want_grad,
            tol,
        } = case;
        let loss = PerceptualLoss::seeded(arch, &config);
        let (vgg, plan) = (loss.vgg().as_ref(), loss.plan());
        let count = s.n * s.c * s.h * s.w;
        let (pred, target) = (values::<T>(count, 1), values::<T>(count, 2));
        let old = values::<T>(count, 3);
        let beta = 0.5;

        let convs = vgg.host_convs().unwrap();
        let filters: Vec<Vec<u8>> = convs.iter().map(|p| krsc_bytes(p, compute)).collect();
        let weights: Vec<ConvAddrs> = convs
            .iter()
            .zip(&filters)
            .map(|(p, f)| ConvAddrs {
                weight: addr(f),
                bias: addr(&p.bias),
            })
            .collect();
        let net = Net {
            layers: vgg.layers(),
            weights: &weights,
            compute,
        };
        // Outputs and the arena carry a guard tail: a write past an end shows.
        const GUARD: usize = 64;
        let guarded = |v: &[T]| -> Vec<T> {
            let mut v = v.to_vec();
            v.extend((0..GUARD).map(|_| T::from_f64(7.0)));
            v
        };
        let (mut got, mut got_per) = (f32::NAN, vec![f32::NAN; s.n]);
        got_per.extend([7.0; GUARD]);
        let mut got_grad = guarded(&old);
        let whole = PerceptualCall {
            batch: s.n,
            accumulate: false,
            pred: addr(&pred),
            target: addr(&target),
            dtype: T::DTYPE,
            shape: s,
            grad: want_grad.then(|| addr_mut(&mut got_grad)),
            beta,
            loss: &mut got as *mut f32 as u64,
            per_sample: Some(addr_mut(&mut got_per)),
        };
        for call in whole.chunks(loss.chunk_images(s, compute, |_| Ok(())).unwrap()) {
            let n = call.shape.n;
            let layers = &vgg.layers()[..=plan.deepest()];
            let layout = Layout::new(
                &schedule(layers, plan, (n, s.h, s.w), true, false),
                compute.size(),
            );
            // Poisoned (a NaN pattern), so a read before a write shows.
            let words = layout.bytes.div_ceil(8);
            let mut arena = vec![u64::MAX; words + GUARD];
            arena[words..].fill(0x5a5a_5a5a_5a5a_5a5a);
            let direct = DirectConvs::new(layers, n, s.h, s.w, compute);
            perceptual(
                emu,
                &direct,
                net,
                plan,
                (&layout, addr_mut(&mut arena)),
                &call,
                |_| Ok(()),
            )
            .unwrap();
            assert!(
                arena[words..].iter().all(|&w| w == 0x5a5a_5a5a_5a5a_5a5a),
                "a kernel wrote past the end of the buffers"
            );
        }
        assert!(
            got_grad[count..].iter().all(|v| v.to_f64() == 7.0)
                && got_per[s.n..].iter().all(|&v| v == 7.0),
            "a kernel wrote past the end of an output"
        );
        let (got_grad, got_per) = (&got_grad[..count], &got_per[..s.n]);

        let (mut want, mut want_per) = (0f32, vec![0f32; s.n]);
        let mut want_g = old.clone();
        let mut out = LossOutputs::new(TensorMut::scalar(&mut want))
            .with_per_sample(TensorMut::host(&mut want_per, Shape::new(s.n, 1, 1, 1)).unwrap());
        if want_grad {
            out = out
                .with_grad(TensorMut::host(&mut want_g, s).unwrap())
                .accumulate(beta);
        }
        loss.compute(
            &TensorRef::host(&pred, s).unwrap(),
            &TensorRef::host(&target, s).unwrap(),
            out,
        )
        .unwrap();

        let what = format!(
            "{arch:?} {config:?} {s} {} via {}",
            T::DTYPE.name(),
            compute.name()
        );
        assert!(
            (got as f64 - want as f64).abs() <= tol * want.abs() as f64,
            "{what}: loss {got} vs {want}"
        );
        assert_close(&format!("{what} per sample"), got_per, &want_per, tol);
        assert_close(&format!("{what} gradient"), got_grad, &want_g, 10.0 * tol);
    }

    /// f32 in, f32 compute, with the gradient.
    fn f32_case(arch: VggArch, config: PerceptualConfig, shape: Shape) -> Case {
        Case {
            arch,
            config,
            shape,
            compute: DType::F32,
            want_grad: true,
            tol: 1e-4,
        }
    }

    fn taps(names: &[&str]) -> Vec<Tap> {
        names.iter().map(|&n| Tap::from(n)).collect()
    }

    #[test]
    fn article_defaults_in_every_dtype() {
        let case = |compute, tol| Case {
            arch: VggArch::Vgg16,
            config: PerceptualConfig::default(),
            shape: Shape::new(2, 3, 16, 12),
            compute,
            want_grad: true,
            tol,
        };
        check::<f32>(case(DType::F32, 1e-4));
        check::<bf16>(case(DType::BF16, 3e-2));
        check::<f16>(case(DType::F16, 1e-2));
        check::<f32>(case(DType::BF16, 3e-2));
    }

    #[test]
    fn chunks_add_up_to_the_batch() {
        let config = PerceptualConfig {
            max_chunk_images: Some(2),
            ..Default::default()
        };
        check::<f32>(f32_case(VggArch::Vgg16, config, Shape::new(3, 3, 16, 12)));
    }

    #[test]
    fn a_memory_budget_picks_the_largest_chunk_that_fits() {
        let s = Shape::new(3, 3, 16, 12);
        let probe = PerceptualLoss::seeded(VggArch::Vgg16, &PerceptualConfig::default());
        let layers = probe.vgg().layers();
        let two = buffer_bytes(layers, probe.plan(), (2, s.h, s.w), DType::F32);
        let three = buffer_bytes(layers, probe.plan(), (3, s.h, s.w), DType::F32);
        assert!(two < three);
        let budgeted = |budget| {
            let config = PerceptualConfig {
                memory_budget: Some(budget),
                ..Default::default()
            };
            PerceptualLoss::seeded(VggArch::Vgg16, &config)
        };
        assert_eq!(
            budgeted(three)
                .chunk_images(s, DType::F32, |_| Ok(()))
                .unwrap(),
            3
        );
        assert_eq!(
            budgeted(three - 1)
                .chunk_images(s, DType::F32, |_| Ok(()))
                .unwrap(),
            2
        );
        assert_eq!(
            budgeted(two)
                .chunk_images(s, DType::F32, |_| Ok(()))
                .unwrap(),
            2
        );
        let err = budgeted(1000)
            .chunk_images(s, DType::F32, |_| Ok(()))
            .unwrap_err();
        assert!(err.to_string().contains("memory budget"), "{err}");
        // A chunk whose cuDNN plan does not fit (workspace) gives way to a
        // smaller one; when even one image fails, that error is returned.
        let no_workspace_above = |max: usize| {
            move |k: usize| match k <= max {
                true => Ok(()),
                false => Err(Error::Cuda(format!("{k} images: no algorithm fits"))),
            }
        };
        assert_eq!(
            budgeted(three)
                .chunk_images(s, DType::F32, no_workspace_above(1))
                .unwrap(),
            1
        );
        let err = budgeted(three)
            .chunk_images(s, DType::F32, no_workspace_above(0))
            .unwrap_err();
        assert!(
            err.to_string().contains("1 images: no algorithm fits"),
            "{err}"
        );
        // The chunked call still matches the CPU.
        let config = PerceptualConfig {
            memory_budget: Some(two),
            ..Default::default()
        };
        check::<f32>(f32_case(VggArch::Vgg16, config, s));
    }

    #[test]
    fn conv_taps_mae_imagenet_vgg19() {
        let config = PerceptualConfig {
            taps: taps(&["conv1_2", "relu2_1", "conv3_4"]),
            tap_weights: vec![0.5, 1.0, 2.0],
            criterion: Criterion::Mae,
            input_norm: InputNorm::Imagenet,
            ..Default::default()
        };
        check::<f32>(f32_case(VggArch::Vgg19, config, Shape::new(2, 3, 12, 16)));
    }

    #[test]
    fn pool_taps_average_pooling_grayscale_odd_sizes() {
        let config = PerceptualConfig {
            taps: taps(&["pool1", "relu2_2", "pool2"]),
            pooling: Pooling::Avg,
            input_norm: InputNorm::ImagenetFromPm1,
            weight: 3.0,
            ..Default::default()
        };
        for shape in [Shape::new(2, 1, 13, 11), Shape::new(1, 1, 16, 8)] {
            check::<f32>(f32_case(VggArch::Vgg16, config.clone(), shape));
        }
        let max_pools = PerceptualConfig {
            taps: taps(&["pool1", "pool2"]),
            ..Default::default()
        };
        check::<f32>(f32_case(
            VggArch::Vgg16,
            max_pools,
            Shape::new(1, 3, 20, 28),
        ));
    }

    #[test]
    fn forward_only() {
        check::<bf16>(Case {
            arch: VggArch::Vgg16,
            config: PerceptualConfig::default(),
            shape: Shape::new(2, 3, 16, 16),
            compute: DType::BF16,
            want_grad: false,
            tol: 3e-2,
        });
    }
}
