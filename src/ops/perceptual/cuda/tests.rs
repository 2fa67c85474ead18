//! The whole CUDA path — schedule, layout, launch parameters and the
//! kernels themselves — run by the host emulator, with a direct
//! convolution in cuDNN's place, against the CPU backend. The tight checks
//! of each fused kernel are in `steps/tests/`; this is the end to end one.

use super::convs::Convs;
use super::layout::Layout;
use super::schedule::Batch;
use super::schedule::{self, layer_dims};
use super::steps::{DeviceNet, Exec, KeptAt};
use super::{exec, graph, CudaCall};
use crate::backend::DeviceIo;
use crate::cuda::abi::pl_k_reduce;
use crate::cuda::emulator::{addr, addr_mut, assert_close, load, store, values, Emulator};
use crate::cuda::{Gpu, KernelImage};
use crate::error::{Error, Result};
use crate::ops::feature::Criterion;
use crate::ops::perceptual::{InputNorm, PerceptualConfig, PerceptualLoss, Tap};
use crate::tensor::{DType, Element, Shape};
use crate::vgg::device_weights::krsc_bytes;
use crate::vgg::device_weights::ConvAddrs;
use crate::vgg::{Dims, Layer, LayerAddrs, Pooling, VggArch, INPUT_CHANNELS};
use crate::{LossOutputs, TensorMut, TensorRef};
use cudarc::driver::DeviceRepr;
use half::{bf16, f16};
use std::cell::Cell;

/// The emulator, counting the kernels launched through it.
struct Counting<'a> {
    gpu: &'a Emulator,
    launches: Cell<usize>,
}

impl Gpu for Counting<'_> {
    fn launch_symbol<P: DeviceRepr + Copy>(
        &self,
        image: &KernelImage,
        symbol: &str,
        grid: (u32, u32),
        params: &P,
    ) -> Result<()> {
        self.launches.set(self.launches.get() + 1);
        self.gpu.launch_symbol(image, symbol, grid, params)
    }

    fn with_reduce<R>(
        &self,
        images: usize,
        partials: usize,
        f: impl FnOnce(pl_k_reduce) -> Result<R>,
    ) -> Result<R> {
        self.gpu.with_reduce(images, partials, f)
    }
}

/// What cuDNN computes: NHWC, KRSC filters, zero padding 1, f32 sums,
/// results rounded to the compute dtype.
pub(super) struct DirectConvs {
    n: usize,
    /// Per layer: input and output dims.
    dims: Vec<(Dims, Dims)>,
    dtype: DType,
    /// Calls made, and their multiply-adds times 2 (for the cost model).
    calls: Cell<usize>,
    flops: Cell<u64>,
}

impl DirectConvs {
    pub(super) fn new(layers: &[Layer], n: usize, h: usize, w: usize, dtype: DType) -> Self {
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
        DirectConvs {
            n,
            dims,
            dtype,
            calls: Cell::new(0),
            flops: Cell::new(0),
        }
    }

    fn counted(&self, layer: usize, images: usize) {
        let ((ci, h, w), (co, _, _)) = self.dims[layer];
        self.calls.set(self.calls.get() + 1);
        self.flops
            .set(self.flops.get() + (2 * images * co * ci * 9 * h * w) as u64);
    }

    /// Calls `f(output pixel, tap, input pixel)` for every in-bounds
    /// 3x3 tap, pixels numbered over all images.
    fn windows(images: usize, h: usize, w: usize, mut f: impl FnMut(usize, usize, usize)) {
        for img in 0..images {
            for i in 0..h {
                for j in 0..w {
                    for t in 0..9 {
                        let (si, sj) = ((i + t / 3).wrapping_sub(1), (j + t % 3).wrapping_sub(1));
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
        layer: usize,
        images: usize,
        x: u64,
        weight: u64,
        y: u64,
    ) -> Result<()> {
        self.counted(layer, images);
        let ((ci, h, w), (co, _, _)) = self.dims[layer];
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

    unsafe fn backward_data(&self, layer: usize, weight: u64, dy: u64, dx: u64) -> Result<()> {
        self.counted(layer, self.n);
        let ((ci, h, w), (co, _, _)) = self.dims[layer];
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
    let loss = PerceptualLoss::seeded(case.arch, &case.config);
    check_loss::<T>(loss, case, None);
}

/// [`check`] against a kept target of `images` images (1 or the batch's):
/// the target's own forward fills the kept slots, then the call runs over
/// pred alone.
fn check_kept<T: Element>(case: Case, images: usize) {
    let loss = PerceptualLoss::seeded(case.arch, &case.config);
    check_loss::<T>(loss, case, Some(images));
}

/// The network's weights as the emulated kernels read them.
struct EmulatedNet {
    /// The filters `weights` points into.
    _filters: Vec<(usize, Vec<u8>)>,
    weights: LayerAddrs,
}

impl EmulatedNet {
    fn new(loss: &PerceptualLoss, compute: DType) -> Self {
        let host = loss.vgg().host_weights().unwrap();
        let filters: Vec<(usize, Vec<u8>)> = host
            .convs()
            .map(|(layer, p)| (layer, krsc_bytes(p, compute)))
            .collect();
        let mut weights = LayerAddrs::default();
        for ((layer, p), (_, f)) in host.convs().zip(&filters) {
            weights.0.resize(layer + 1, None);
            weights.0[layer] = Some(ConvAddrs {
                weight: addr(f),
                bias: addr(&p.bias),
            });
        }
        EmulatedNet {
            _filters: filters,
            weights,
        }
    }
}

/// Outputs and the arena carry a guard tail: a write past an end shows.
const GUARD: usize = 64;
const GUARD_WORD: u64 = 0x5a5a_5a5a_5a5a_5a5a;

/// Runs `whole` chunk by chunk through the emulator, checking each chunk
/// against the cost model and for writes past the arena's end; `kept`
/// gives the kept target's slots from a chunk's first image.
fn emulate(
    loss: &PerceptualLoss,
    net: DeviceNet<'_>,
    whole: CudaCall,
    kept: &dyn Fn(usize) -> KeptAt,
    input: DType,
) {
    let emu = Emulator::get().unwrap();
    let (vgg, spec, compute) = (loss.vgg().as_ref(), loss.spec(), net.compute);
    let (s, holds) = (whole.io.shape, whole.holds);
    let chunk = loss
        .device_plans()
        .chunk_images(vgg, spec, (s, holds), compute, |_| Ok(()))
        .unwrap();
    let want_grad = whole.io.grad.is_some();
    for call in whole.chunks(chunk) {
        let n = call.io.shape.n;
        let layers = &vgg.layers()[..=spec.deepest()];
        let sched = schedule::build(layers, spec, holds, (n, s.h, s.w), true, false).unwrap();
        let layout = Layout::new(&sched, compute.size());
        // Poisoned (a NaN pattern), so a read before a write shows.
        let words = layout.bytes.div_ceil(8);
        let mut arena = vec![u64::MAX; words + GUARD];
        arena[words..].fill(GUARD_WORD);
        let direct = DirectConvs::new(layers, n, s.h, s.w, compute);
        let counting = Counting {
            gpu: emu,
            launches: Cell::new(0),
        };
        let kept = kept(call.first);
        let x = Exec {
            gpu: &counting,
            convs: &direct,
            net,
            spec,
            call: &call,
            layout: &layout,
            base: addr_mut(&mut arena),
            kept: &kept,
        };
        exec::run(&x, |_| Ok(())).unwrap();
        // The cost model counts what this chunk launched (but the parts'
        // sum, one launch at the end of a call that asks for parts).
        let shape = Shape { n, ..s };
        let cost =
            super::cost::report(layers, spec, (shape, holds), (input, compute), want_grad).unwrap();
        let seen = (
            counting.launches.get() - call.io.parts.is_some() as usize,
            direct.calls.get(),
            direct.flops.get(),
        );
        assert_eq!(
            seen,
            (cost.kernel_launches, cost.cudnn_calls, cost.conv_flops)
        );
        assert!(
            arena[words..].iter().all(|&w| w == GUARD_WORD),
            "a kernel wrote past the end of the buffers"
        );
    }
}

/// [`emulate`] of `whole` as its CUDA graph runs it (`graph.rs`): the
/// caller's addresses through a call table, the loss, parts and per-sample
/// values into memory of its own, then published to the caller's.
fn emulate_through_table(
    loss: &PerceptualLoss,
    net: DeviceNet<'_>,
    whole: CudaCall,
    kept: &dyn Fn(usize) -> KeptAt,
    input: DType,
) {
    let emu = Emulator::get().unwrap();
    // Filled as a replay fills it: by its kernel.
    let mut table = vec![u64::MAX; graph::SLOTS];
    graph::fill_table(emu, addr_mut(&mut table), &whole.io).unwrap();
    let mut outputs = vec![f32::NAN; graph::outputs_bytes(whole.io.shape.n) / 4];
    let via = graph::through_table(&whole, addr(&table), addr_mut(&mut outputs));
    emulate(loss, net, via, kept, input);
    graph::publish(emu, &via).unwrap();
}

/// Host memory in place of a kept target's slots on the device: the
/// target's own forward through the emulator fills them.
struct EmulatedTarget {
    slots: Vec<(Vec<u64>, usize)>,
    images: usize,
}

impl EmulatedTarget {
    fn new<T: Element>(
        loss: &PerceptualLoss,
        net: DeviceNet<'_>,
        target: &[T],
        shape: Shape,
    ) -> Self {
        let (layers, spec) = (loss.vgg().layers(), loss.spec());
        let one = (1, shape.h, shape.w);
        let sched = schedule::build(layers, spec, Batch::Target, one, false, false).unwrap();
        let mut slots: Vec<(Vec<u64>, usize)> = (sched.kept.iter())
            .map(|slot| {
                let per_image = slot.per_image.bytes(net.compute.size());
                let words = (shape.n * per_image).div_ceil(8);
                let mut mem = vec![u64::MAX; words + GUARD];
                mem[words..].fill(GUARD_WORD);
                (mem, per_image)
            })
            .collect();
        let bases: Vec<(u64, usize)> = (slots.iter_mut())
            .map(|(mem, per_image)| (addr_mut(mem), *per_image))
            .collect();
        let mut unused = 0f32;
        let whole = CudaCall::new(
            DeviceIo {
                shape,
                dtype: T::DTYPE,
                inputs: [addr(target), 0],
                grad: None,
                beta: 0.0,
                loss: &mut unused as *mut f32 as u64,
                per_sample: None,
                parts: None,
            },
            Batch::Target,
        );
        let kept = |first| KeptAt::of(bases.iter().copied(), shape.n, first);
        emulate(loss, net, whole, &kept, T::DTYPE);
        assert!(unused == 0.0, "a target's forward wrote a loss");
        for (mem, per_image) in &slots {
            let words = (shape.n * per_image).div_ceil(8);
            assert!(
                mem[words..].iter().all(|&w| w == GUARD_WORD),
                "a kernel wrote past the end of a kept slot"
            );
        }
        EmulatedTarget {
            slots,
            images: shape.n,
        }
    }

    fn at(&self, first: usize) -> KeptAt {
        let bases = self
            .slots
            .iter()
            .map(|(mem, per_image)| (addr(mem), *per_image));
        KeptAt::of(bases, self.images, first)
    }
}

/// [`check`] of `loss` (built from the case's arch and config), against
/// its target or a kept target of `kept` images.
fn check_loss<T: Element>(loss: PerceptualLoss, case: Case, kept: Option<usize>) {
    let Some(_) = Emulator::get() else { return };
    let Case {
        arch,
        config,
        shape: s,
        compute,
        want_grad,
        tol,
    } = case;
    let spec = loss.spec();
    let count = s.n * s.image_len();
    let target_shape = Shape {
        n: kept.unwrap_or(s.n),
        ..s
    };
    let (pred, target) = (
        values::<T>(count, 1),
        values::<T>(target_shape.n * s.image_len(), 2),
    );
    let old = values::<T>(count, 3);
    let beta = 0.5;

    let emulated = EmulatedNet::new(&loss, compute);
    let net = DeviceNet {
        layers: loss.vgg().layers(),
        weights: &emulated.weights,
        compute,
        lpips: spec.lpips.as_ref().map_or(0, |l| addr(l.all())),
    };
    let guarded = |v: &[T]| -> Vec<T> {
        let mut v = v.to_vec();
        v.extend((0..GUARD).map(|_| T::from_f64(7.0)));
        v
    };
    let kept_target = kept.map(|_| EmulatedTarget::new(&loss, net, &target, target_shape));
    // The call as it runs plainly, or as a CUDA graph runs it.
    let run = |through_table: bool| {
        let (mut got, mut got_per) = (f32::NAN, vec![f32::NAN; s.n]);
        let mut got_parts = [f32::NAN; 2];
        got_per.extend([7.0; GUARD]);
        let mut got_grad = guarded(&old);
        let io = DeviceIo {
            shape: s,
            dtype: T::DTYPE,
            inputs: [addr(&pred), if kept.is_some() { 0 } else { addr(&target) }],
            grad: want_grad.then(|| addr_mut(&mut got_grad)),
            beta,
            loss: &mut got as *mut f32 as u64,
            per_sample: Some(addr_mut(&mut got_per)),
            parts: Some(got_parts.as_mut_ptr() as u64),
        };
        let (holds, at): (_, &dyn Fn(usize) -> KeptAt) = match &kept_target {
            None => (Batch::Pairs, &|_| KeptAt::default()),
            Some(t) => (Batch::Pred, &|first| t.at(first)),
        };
        let whole = CudaCall::new(io, holds);
        match through_table {
            false => emulate(&loss, net, whole, at, T::DTYPE),
            true => emulate_through_table(&loss, net, whole, at, T::DTYPE),
        }
        assert!(
            got_grad[count..].iter().all(|v| v.to_f64() == 7.0)
                && got_per[s.n..].iter().all(|&v| v == 7.0),
            "a kernel wrote past the end of an output"
        );
        got_grad.truncate(count);
        got_per.truncate(s.n);
        (got, got_per, got_parts, got_grad)
    };
    let plain = run(false);
    let graphed = run(true);
    let bits = |(l, per, parts, g): &(f32, Vec<f32>, [f32; 2], Vec<T>)| {
        let mut b: Vec<u64> = vec![l.to_bits() as u64];
        b.extend(per.iter().chain(parts).map(|v| v.to_bits() as u64));
        b.extend(g.iter().map(|v| v.to_f64().to_bits()));
        b
    };
    assert!(
        bits(&plain) == bits(&graphed),
        "the call through a CUDA graph's call table gave other bits than the plain call"
    );
    let (got, got_per, got_parts, got_grad) = plain;
    let (got_grad, got_per) = (&got_grad[..], &got_per[..]);

    // The CPU reference takes the target image by image.
    let target: Vec<T> = match target_shape.n {
        1 => (0..s.n).flat_map(|_| target.iter().copied()).collect(),
        _ => target,
    };
    let (mut want, mut want_per) = (0f32, vec![0f32; s.n]);
    let mut want_parts = [0f32; 2];
    let mut want_g = old.clone();
    let mut out = LossOutputs::new(TensorMut::scalar(&mut want))
        .with_per_sample(TensorMut::host(&mut want_per, Shape::new(s.n, 1, 1, 1)).unwrap())
        .with_parts(TensorMut::host(&mut want_parts, Shape::flat(2)).unwrap());
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
        "{arch:?} {config:?} {s} {} via {}{}",
        T::DTYPE.name(),
        compute.name(),
        kept.map_or(String::new(), |n| format!(" against a kept target of {n}"))
    );
    assert!(
        (got as f64 - want as f64).abs() <= tol * want.abs() as f64,
        "{what}: loss {got} vs {want}"
    );
    assert_close(&format!("{what} per sample"), got_per, &want_per, tol);
    for k in 0..2 {
        let (g, w) = (got_parts[k] as f64, want_parts[k] as f64);
        assert!(
            (g - w).abs() <= tol * (want as f64).abs(),
            "{what}: part {k} {g} vs {w}"
        );
    }
    assert_close(&format!("{what} gradient"), got_grad, &want_g, 10.0 * tol);
    if T::DTYPE == DType::F32 && want_grad {
        // The loss's own gradient, without beta * old (which can dwarf it):
        // f32 outputs keep it to within a rounding of the old values.
        let own = |g: &[T]| -> Vec<f32> {
            g.iter()
                .zip(&old)
                .map(|(g, o)| (g.to_f64() - beta as f64 * o.to_f64()) as f32)
                .collect()
        };
        assert_close(
            &format!("{what} gradient less beta * old"),
            &own(got_grad),
            &own(&want_g),
            10.0 * tol,
        );
    }
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
    let bytes = |n| plan_bytes(layers, &probe, (n, s.h, s.w));
    let (two, three) = (bytes(2), bytes(3));
    assert!(two < three);
    let budgeted = |budget| {
        let config = PerceptualConfig {
            memory_budget: Some(budget),
            ..Default::default()
        };
        PerceptualLoss::seeded(VggArch::Vgg16, &config)
    };
    let chunk = |loss: &PerceptualLoss, plans: &mut dyn FnMut(usize) -> Result<()>| {
        loss.device_plans().chunk_images(
            loss.vgg(),
            loss.spec(),
            (s, Batch::Pairs),
            DType::F32,
            plans,
        )
    };
    let fits = &mut |_| Ok(());
    assert_eq!(chunk(&budgeted(three), fits).unwrap(), 3);
    assert_eq!(chunk(&budgeted(three - 1), fits).unwrap(), 2);
    assert_eq!(chunk(&budgeted(two), fits).unwrap(), 2);
    let err = chunk(&budgeted(1000), fits).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory(_)), "{err}");
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
        chunk(&budgeted(three), &mut no_workspace_above(1)).unwrap(),
        1
    );
    let err = chunk(&budgeted(three), &mut no_workspace_above(0)).unwrap_err();
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

fn plan_bytes(layers: &[Layer], loss: &PerceptualLoss, nhw: (usize, usize, usize)) -> usize {
    super::plan::buffer_bytes(layers, loss.spec(), Batch::Pairs, nhw, DType::F32).unwrap()
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
fn style_terms_with_and_without_perceptual_ones() {
    // A style tap shared with a perceptual one and fused into a pool
    // otherwise (relu1_2), one alone (relu2_2), a pre-activation one
    // (conv3_1, the deepest), MAE Grams; then Grams alone, chunked. The
    // style weights make the style gradient outweigh beta * old.
    let both = PerceptualConfig {
        taps: taps(&["relu1_2", "relu2_1"]),
        style_taps: taps(&["relu1_2", "relu2_2", "conv3_1"]),
        style_tap_weights: vec![1.0, 0.5, 2.0],
        style_criterion: Criterion::Mae,
        style_weight: 3e4,
        ..Default::default()
    };
    check::<f32>(f32_case(
        VggArch::Vgg16,
        both.clone(),
        Shape::new(2, 3, 16, 12),
    ));
    check::<bf16>(Case {
        arch: VggArch::Vgg16,
        config: both,
        shape: Shape::new(2, 3, 16, 12),
        compute: DType::BF16,
        want_grad: true,
        tol: 3e-2,
    });
    let alone = PerceptualConfig {
        taps: vec![],
        style_taps: taps(&["relu1_2", "relu2_2"]),
        style_weight: 1e5,
        max_chunk_images: Some(2),
        ..Default::default()
    };
    check::<f32>(f32_case(VggArch::Vgg16, alone, Shape::new(3, 1, 12, 10)));
}

#[test]
fn fro_norms_of_features_and_grams() {
    // BasicSR's criterion='fro' for both losses, shared and separate taps.
    let config = PerceptualConfig {
        taps: taps(&["relu1_2", "relu2_2"]),
        criterion: Criterion::Fro,
        style_taps: taps(&["relu1_2", "conv2_1"]),
        style_criterion: Criterion::Fro,
        style_weight: 300.0,
        ..Default::default()
    };
    check::<f32>(f32_case(
        VggArch::Vgg16,
        config.clone(),
        Shape::new(2, 3, 16, 12),
    ));
    check::<bf16>(Case {
        arch: VggArch::Vgg16,
        config,
        shape: Shape::new(3, 3, 8, 8),
        compute: DType::BF16,
        want_grad: true,
        tol: 3e-2,
    });
}

#[test]
fn a_large_map_sums_its_gram_in_slices() {
    // 48 x 48 = 2304 pixels at relu1_2: two slices of the Gram's sum.
    let config = PerceptualConfig {
        taps: vec![],
        style_taps: taps(&["relu1_2"]),
        ..Default::default()
    };
    check::<f32>(f32_case(VggArch::Vgg16, config, Shape::new(1, 3, 48, 48)));
}

#[test]
fn lpips_in_f32_and_bf16() {
    use crate::ops::lpips::{LinWeights, LPIPS_TAPS};
    let config = PerceptualConfig {
        taps: LPIPS_TAPS.into_iter().map(Tap::Index).collect(),
        input_norm: InputNorm::LpipsScaling,
        ..Default::default()
    };
    let lpips = |lin: LinWeights| {
        let seeded = PerceptualLoss::seeded(VggArch::Vgg16, &config);
        let vgg = seeded.vgg().clone();
        PerceptualLoss::with_lpips(vgg, &config, std::sync::Arc::new(lin)).unwrap()
    };
    let case = |compute, tol| Case {
        arch: VggArch::Vgg16,
        config: config.clone(),
        shape: Shape::new(2, 3, 16, 16),
        compute,
        want_grad: true,
        tol,
    };
    check_loss::<f32>(lpips(LinWeights::v0_1()), case(DType::F32, 1e-4), None);
    check_loss::<bf16>(lpips(LinWeights::ones()), case(DType::BF16, 3e-2), None);
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

#[test]
fn against_a_kept_target() {
    // The article's taps (relu1_2..relu3_3 fused with their pools), a
    // target of the batch's size and one image serving every pred image.
    let article = || {
        f32_case(
            VggArch::Vgg16,
            PerceptualConfig::default(),
            Shape::new(2, 3, 16, 12),
        )
    };
    check_kept::<f32>(article(), 2);
    check_kept::<f32>(article(), 1);
    check_kept::<bf16>(
        Case {
            compute: DType::BF16,
            tol: 3e-2,
            ..article()
        },
        1,
    );
    // Chunks read the kept target from their own first image on.
    let chunked = PerceptualConfig {
        max_chunk_images: Some(2),
        ..Default::default()
    };
    check_kept::<f32>(
        f32_case(VggArch::Vgg16, chunked, Shape::new(3, 3, 16, 12)),
        3,
    );
    // Pre-activation and pool taps, average pooling, MAE.
    let conv_taps = PerceptualConfig {
        taps: taps(&["conv1_2", "pool1", "relu2_1"]),
        criterion: Criterion::Mae,
        pooling: Pooling::Avg,
        ..Default::default()
    };
    check_kept::<f32>(
        f32_case(VggArch::Vgg16, conv_taps, Shape::new(2, 1, 13, 11)),
        1,
    );
    // Forward only.
    check_kept::<f32>(
        Case {
            want_grad: false,
            ..article()
        },
        2,
    );
}

#[test]
fn style_and_fro_against_a_kept_target() {
    // Kept Grams (split in slices at 48 x 48), shared with a perceptual
    // tap and alone; Fro norms of both.
    let both = PerceptualConfig {
        taps: taps(&["relu1_2", "relu2_1"]),
        style_taps: taps(&["relu1_2", "relu2_2"]),
        style_weight: 3e4,
        ..Default::default()
    };
    check_kept::<f32>(f32_case(VggArch::Vgg16, both, Shape::new(2, 3, 16, 12)), 1);
    let fro = PerceptualConfig {
        taps: taps(&["relu1_2"]),
        criterion: Criterion::Fro,
        style_taps: taps(&["relu1_2", "conv2_1"]),
        style_criterion: Criterion::Fro,
        style_weight: 300.0,
        ..Default::default()
    };
    check_kept::<f32>(f32_case(VggArch::Vgg16, fro, Shape::new(2, 3, 16, 12)), 2);
    let sliced = PerceptualConfig {
        taps: vec![],
        style_taps: taps(&["relu1_2"]),
        ..Default::default()
    };
    check_kept::<f32>(
        f32_case(VggArch::Vgg16, sliced, Shape::new(2, 3, 48, 48)),
        1,
    );
}

#[test]
fn lpips_against_a_kept_target() {
    use crate::ops::lpips::{LinWeights, LPIPS_TAPS};
    let config = PerceptualConfig {
        taps: LPIPS_TAPS.into_iter().map(Tap::Index).collect(),
        input_norm: InputNorm::LpipsScaling,
        ..Default::default()
    };
    let seeded = PerceptualLoss::seeded(VggArch::Vgg16, &config);
    let lin = std::sync::Arc::new(LinWeights::v0_1());
    let loss = PerceptualLoss::with_lpips(seeded.vgg().clone(), &config, lin).unwrap();
    let case = f32_case(VggArch::Vgg16, config, Shape::new(2, 3, 16, 16));
    check_loss::<f32>(loss, case, Some(1));
}

/// LPIPS's spatial map, per-layer distances and the map's gradient: the
/// taps' per-pixel terms and gradient scales through the emulated CUDA
/// path, chunk by chunk, with the resize kernels, against the CPU's
/// `Lpips::spatial` and `spatial_backward` (odd sizes: the layers' ratios
/// to the input are not powers of two).
#[test]
fn lpips_spatial_map_and_its_gradient() {
    use crate::ops::lpips::cuda::{layer_means, upsample, upsample_adjoint, TermLayout};
    use crate::ops::lpips::{Lpips, LpipsConfig};
    let Some(emu) = Emulator::get() else { return };
    let seeded = PerceptualLoss::seeded(VggArch::Vgg16, &PerceptualConfig::default());
    let config = LpipsConfig {
        weight: 0.7,
        max_chunk_images: Some(1),
        ..Default::default()
    };
    let lpips = Lpips::new(seeded.vgg().clone(), &config).unwrap();
    let loss = lpips.perceptual();
    let s = Shape::new(2, 3, 18, 22);
    let (count, pixels) = (s.n * s.image_len(), s.n * s.h * s.w);
    let (pred, target) = (values::<f32>(count, 1), values::<f32>(count, 2));
    let map_grad = values::<f32>(pixels, 4);
    let emulated = EmulatedNet::new(loss, DType::F32);
    let net = DeviceNet {
        layers: loss.vgg().layers(),
        weights: &emulated.weights,
        compute: DType::F32,
        lpips: addr(loss.spec().lpips.as_ref().unwrap().all()),
    };
    let at = TermLayout::new(loss.vgg().layers(), (s.h, s.w));
    let call = |terms, grad: Option<u64>| {
        let mut unused = 0f32;
        let io = DeviceIo {
            shape: s,
            dtype: DType::F32,
            inputs: [addr(&pred), addr(&target)],
            grad,
            beta: 0.0,
            loss: &mut unused as *mut f32 as u64,
            per_sample: None,
            parts: None,
        };
        let call = CudaCall {
            terms,
            ..CudaCall::new(io, Batch::Pairs)
        };
        emulate(loss, net, call, &|_| KeptAt::default(), DType::F32);
    };

    let mut terms = vec![f32::NAN; s.n * at.stride + GUARD];
    call(at.terms(addr_mut(&mut terms), 0), None);
    assert!(
        terms[s.n * at.stride..].iter().all(|v| v.is_nan()),
        "a tap wrote past its terms"
    );
    let (mut map, mut means) = (vec![f32::NAN; pixels], vec![f32::NAN; s.n * 5]);
    upsample(emu, &at, addr(&terms), addr_mut(&mut map), s.n).unwrap();
    layer_means(emu, &at, addr(&terms), addr_mut(&mut means), s.n).unwrap();
    let (pred_host, target_host) = (
        TensorRef::host(&pred, s).unwrap(),
        TensorRef::host(&target, s).unwrap(),
    );
    let want = lpips.spatial(&pred_host, &target_host).unwrap();
    assert_close("the map", &map, &want.map, 1e-5);
    let want_means: Vec<f32> = want.layers.iter().flatten().copied().collect();
    assert_close("the layers' distances", &means, &want_means, 1e-5);

    let mut scales = vec![f32::NAN; s.n * at.stride];
    upsample_adjoint(emu, &at, addr(&map_grad), addr_mut(&mut scales), s.n).unwrap();
    let mut grad = vec![f32::NAN; count + GUARD];
    call(at.terms(0, addr(&scales)), Some(addr_mut(&mut grad)));
    assert!(
        grad[count..].iter().all(|v| v.is_nan()),
        "a kernel wrote past the gradient"
    );
    let mut want_grad = vec![0f32; count];
    let map_shape = Shape::new(s.n, 1, s.h, s.w);
    (lpips.spatial_backward(
        &pred_host,
        &target_host,
        &TensorRef::host(&map_grad, map_shape).unwrap(),
        TensorMut::host(&mut want_grad, s).unwrap(),
    ))
    .unwrap();
    assert_close("the map's gradient", &grad[..count], &want_grad, 1e-4);
}
