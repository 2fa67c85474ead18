//! Each fused step alone: its kernel, run by the host emulator through its
//! launch function, against the CPU composition it replaces (the
//! functions of `cpu/` and `feature::cpu`, applied image by image in CHW
//! f32 and rounded where the kernel stores), on random odd shapes in f32,
//! f16 and bf16.
//!
//! The comparisons are per element: f32 within 1e-5 relative (1e-5 of
//! the operands' size where a sum may cancel), f16 and bf16 within about
//! one rounding of their precision; masks and argmax bits exactly. No tie
//! needs excluding: both sides take the first maximum of a window, and the
//! reference rounds at the same points as the kernel, so equal values tie
//! the same way.

use super::{DeviceNet, Exec};
use crate::backend::{DeviceIo, HostGrad};
use crate::cuda::emulator::{load, round_to, store, Emulator};
use crate::error::{Error, Result};
use crate::ops::feature::cpu::distance_sum;
use crate::ops::feature::Criterion;
use crate::ops::perceptual::config::{InputNorm, PerceptualSpec};
use crate::ops::perceptual::cpu::{self, layers};
use crate::ops::perceptual::cuda::convs::Convs;
use crate::ops::perceptual::cuda::layout::Layout;
use crate::ops::perceptual::cuda::schedule::*;
use crate::ops::perceptual::cuda::CudaCall;
use crate::tensor::{DType, Shape};
use crate::vgg::device_weights::ConvAddrs;
use crate::vgg::{Dims, LayerAddrs, Pooling, INPUT_CHANNELS};

/// The steps here launch no convolution.
struct NoConvs;

impl Convs for NoConvs {
    unsafe fn forward(&self, _: usize, _: usize, _: u64, _: u64, _: u64) -> Result<()> {
        Err(Error::Internal("no convolution in a step test".into()))
    }
    unsafe fn backward_data(&self, _: usize, _: u64, _: u64, _: u64) -> Result<()> {
        Err(Error::Internal("no convolution in a step test".into()))
    }
}

/// Seeded values in [lo, hi).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len)
            .map(|_| lo + (hi - lo) * (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .collect()
    }
    /// `len` values rounded to `dtype`.
    fn values(&mut self, len: usize, dtype: DType) -> Vec<f32> {
        let v = self.uniform(len, -1.0, 1.0);
        v.into_iter().map(|x| round_to(dtype, x)).collect()
    }
    fn below(&mut self, n: u64) -> usize {
        (self.next() % n) as usize
    }
}

/// A step's buffers on the host, in one arena laid out like a plan's
/// (256-byte aligned), poisoned with NaN bytes so a read before a write
/// shows, and with a guard tail that must stay untouched.
struct Arena {
    words: Vec<u128>,
    layout: Layout,
}

const GUARD: u128 = 0x5a5a_5a5a_5a5a_5a5a_5a5a_5a5a_5a5a_5a5a;

impl Arena {
    /// Buffers of these byte sizes.
    fn new(sizes: &[usize]) -> Arena {
        let mut offsets = Vec::new();
        let mut at = 0;
        for &s in sizes {
            offsets.push(at);
            at += s.max(1).next_multiple_of(256);
        }
        let mut words = vec![u128::MAX; at / 16 + 16];
        words[at / 16..].fill(GUARD);
        Arena {
            words,
            layout: Layout { offsets, bytes: at },
        }
    }

    fn addr(&self, b: Buf) -> u64 {
        self.words.as_ptr() as u64 + self.layout.offsets[b] as u64
    }

    fn base(&self) -> u64 {
        self.words.as_ptr() as u64
    }

    fn put(&mut self, b: Buf, dtype: DType, values: &[f32]) {
        // SAFETY: each buffer was sized for what the test puts in it.
        unsafe { store(self.addr(b), dtype, values) }
    }

    fn get(&self, b: Buf, dtype: DType, len: usize) -> Vec<f32> {
        // SAFETY: as for `put`.
        unsafe { load(self.addr(b), dtype, len) }
    }

    fn put_bytes(&mut self, b: Buf, bytes: &[u8]) {
        let at = self.addr(b) as *mut u8;
        // SAFETY: as for `put`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at, bytes.len()) }
    }

    fn get_bytes(&self, b: Buf, len: usize) -> Vec<u8> {
        // SAFETY: as for `put`.
        unsafe { std::slice::from_raw_parts(self.addr(b) as *const u8, len).to_vec() }
    }

    fn assert_guard(&self) {
        let end = self.layout.bytes / 16;
        assert!(
            self.words[end..].iter().all(|&w| w == GUARD),
            "a kernel wrote past the last buffer"
        );
    }
}

/// What a step runs with: the options, the bias of layer 0, the call.
struct Setup {
    spec: PerceptualSpec,
    weights: LayerAddrs,
    call: CudaCall,
    compute: DType,
}

impl Setup {
    fn new(compute: DType, pooling: Pooling, criterion: Criterion, bias: Option<&[f32]>) -> Self {
        let spec = PerceptualSpec {
            taps: Vec::new(),
            criterion,
            norm: InputNorm::None,
            pooling,
            weight: 1.0,
            tf32: false,
            chunk: None,
            budget: None,
        };
        let weights = LayerAddrs(vec![bias.map(|b| ConvAddrs {
            weight: 0,
            bias: b.as_ptr() as u64,
        })]);
        Setup {
            spec,
            weights,
            call: CudaCall::new(DeviceIo {
                shape: Shape::new(1, 3, 1, 1),
                dtype: DType::F32,
                inputs: [0, 0],
                grad: None,
                beta: 0.0,
                loss: 0,
                per_sample: None,
            }),
            compute,
        }
    }

    /// Runs `step` on `arena` through its launch function.
    fn run(&self, emu: &Emulator, arena: &Arena, step: Step) {
        let layers = crate::vgg::VggArch::Vgg16.layers();
        let x = Exec {
            gpu: emu,
            convs: &NoConvs,
            net: DeviceNet {
                layers: &layers,
                weights: &self.weights,
                compute: self.compute,
            },
            spec: &self.spec,
            call: &self.call,
            layout: &arena.layout,
            base: arena.base(),
        };
        x.launch(&step).unwrap();
        arena.assert_guard();
    }
}

/// The relative precision a comparison in `dtype` allows.
fn tolerance(dtype: DType) -> f64 {
    match dtype.size() {
        4 => 1e-5,
        // About one rounding of the 16-bit formats (bf16 2^-8, f16 2^-11),
        // for results the two sides round from slightly different f32 sums.
        _ if dtype == DType::BF16 => 8e-3,
        _ => 1e-3,
    }
}

/// Asserts every element of `got` is within `rel` of `want`, relative to
/// `scale[i]` (the size of what the element was computed from), or to
/// |want| where `scale` is empty.
fn assert_each(what: &str, got: &[f32], want: &[f32], scale: &[f32], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let s = scale.get(i).map_or(w.abs(), |s| s.abs().max(w.abs())) as f64;
        let ok = (g as f64 - w as f64).abs() <= rel * s || (g.is_nan() && w.is_nan());
        assert!(ok, "{what}[{i}]: got {g}, want {w} (scale {s})");
    }
}

/// NHWC images -> CHW images (both `count` images of `dims`).
fn to_chw(x: &[f32], count: usize, (c, h, w): Dims) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for n in 0..count {
        for p in 0..h * w {
            for ch in 0..c {
                out[(n * c + ch) * h * w + p] = x[(n * h * w + p) * c + ch];
            }
        }
    }
    out
}

/// CHW images -> NHWC images.
fn to_nhwc(x: &[f32], count: usize, (c, h, w): Dims) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for n in 0..count {
        for p in 0..h * w {
            for ch in 0..c {
                out[(n * h * w + p) * c + ch] = x[(n * c + ch) * h * w + p];
            }
        }
    }
    out
}

/// Flags as 0.0 / 1.0, to reorder them like values.
fn flags(b: &[bool]) -> Vec<f32> {
    b.iter().map(|&b| b as u8 as f32).collect()
}

fn flags_u8(b: &[u8]) -> Vec<f32> {
    b.iter().map(|&b| b as f32).collect()
}

fn bools(v: &[f32]) -> Vec<bool> {
    v.iter().map(|&v| v == 1.0).collect()
}

/// Bit masks as the kernels keep them: element k of the NHWC order is bit
/// k % 32 of word k / 32.
fn unpack_bits(bytes: &[u8], len: usize) -> Vec<bool> {
    (0..len)
        .map(|k| (bytes[k / 8] >> (k % 8)) & 1 == 1)
        .collect()
}

fn pack_bits(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(32) * 4];
    for (k, &b) in bits.iter().enumerate() {
        out[k / 8] |= (b as u8) << (k % 8);
    }
    out
}

/// Pool argmax as the kernels keep it: for outputs 32j..32j+31, word 2j
/// holds the low bits and word 2j+1 the high bits.
fn unpack_argmax(bytes: &[u8], len: usize) -> Vec<u8> {
    let bit = |word: usize, k: usize| (bytes[word * 4 + k / 8] >> (k % 8)) & 1;
    (0..len)
        .map(|o| bit(o / 32 * 2, o % 32) | bit(o / 32 * 2 + 1, o % 32) << 1)
        .collect()
}

/// Bytes of the argmax of `len` outputs: whole 32-output groups.
fn argmax_bytes(len: usize) -> usize {
    len.div_ceil(32) * 8
}

fn pack_argmax(argmax: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; argmax_bytes(argmax.len())];
    for (o, &a) in argmax.iter().enumerate() {
        let (word, k) = (o / 32 * 2, o % 32);
        out[word * 4 + k / 8] |= (a & 1) << (k % 8);
        out[(word + 1) * 4 + k / 8] |= (a >> 1) << (k % 8);
    }
    out
}

/// The reference of bias + ReLU on CHW images: `layers::add_bias`, then
/// `layers::relu` when `relu`, rounded to `dtype` as the kernel stores;
/// the mask is that of the stored values.
fn bias_relu(
    x: &[f32],
    count: usize,
    dims: Dims,
    bias: &[f32],
    relu: bool,
    dtype: DType,
) -> (Vec<f32>, Vec<bool>) {
    let (c, h, w) = dims;
    let mut out = Vec::with_capacity(x.len());
    for image in x.chunks_exact(c * h * w).take(count) {
        let mut v = image.to_vec();
        layers::add_bias(&mut v, bias, h * w);
        if relu {
            layers::relu(&mut v, None);
        }
        out.extend(v.into_iter().map(|v| round_to(dtype, v)));
    }
    let mask = out.iter().map(|&v| v > 0.0).collect();
    (out, mask)
}

/// The reference of a 2x2 pool of CHW images (`layers::pool`), rounded to
/// `dtype`, with the argmax per output.
fn pool_ref(
    x: &[f32],
    count: usize,
    (c, h, w): Dims,
    kind: Pooling,
    dtype: DType,
) -> (Vec<f32>, Vec<u8>) {
    let (mut y, mut argmax) = (Vec::new(), Vec::new());
    for image in x.chunks_exact(c * h * w).take(count) {
        let (mut out, mut a) = (Vec::new(), Vec::new());
        layers::pool(image, c, h, w, kind, &mut out, Some(&mut a));
        y.extend(out.into_iter().map(|v| round_to(dtype, v)));
        argmax.extend(a);
    }
    (y, argmax)
}

/// `argmax` of CHW outputs in the NHWC order the kernels keep it.
fn argmax_nhwc(argmax: &[u8], count: usize, dims: Dims) -> Vec<u8> {
    let a = to_nhwc(&flags_u8(argmax), count, dims);
    a.iter().map(|&v| v as u8).collect()
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

#[test]
fn preprocess_matches_cpu_preprocess() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(11);
    for (in_dtype, compute) in [
        (DType::F32, DType::F32),
        (DType::F16, DType::BF16),
        (DType::BF16, DType::F16),
        (DType::F32, DType::BF16),
    ] {
        for (c, norm) in [(3, InputNorm::Imagenet), (1, InputNorm::ImagenetFromPm1)] {
            let s = Shape::new(2, c, 5, 7);
            let hw = s.h * s.w;
            let (pred, target) = (
                rng.values(s.n * c * hw, in_dtype),
                rng.values(s.n * c * hw, in_dtype),
            );
            let out_dims = (INPUT_CHANNELS, s.h, s.w);
            let mut arena = Arena::new(&[
                s.n * c * hw * in_dtype.size(),
                s.n * c * hw * in_dtype.size(),
                2 * s.n * hw * INPUT_CHANNELS * compute.size(),
            ]);
            arena.put(0, in_dtype, &pred);
            arena.put(1, in_dtype, &target);
            let mut setup = Setup::new(compute, Pooling::Max, Criterion::Mse, None);
            setup.spec.norm = norm;
            setup.call.io.shape = s;
            setup.call.io.dtype = in_dtype;
            setup.call.io.inputs = [arena.addr(0), arena.addr(1)];
            setup.run(emu, &arena, Step::Preprocess(Preprocess { out: 2 }));
            // cpu::preprocess per image of pred, then of target, padded to 8 channels.
            let mut want = Vec::new();
            let mut scale = Vec::new();
            for image in pred.chunks_exact(c * hw).chain(target.chunks_exact(c * hw)) {
                let planes = cpu::preprocess(image, c, hw, norm);
                let mut padded = vec![0.0; INPUT_CHANNELS * hw];
                let mut size = vec![0.0; INPUT_CHANNELS * hw];
                for ch in 0..3 {
                    let (a, b) = norm.affine(ch);
                    for p in 0..hw {
                        padded[ch * hw + p] = round_to(compute, planes[ch * hw + p]);
                        let x = image[if c == 1 { p } else { ch * hw + p }];
                        size[ch * hw + p] = ((x as f64 * a).abs() + b.abs()) as f32;
                    }
                }
                want.extend(to_nhwc(&padded, 1, out_dims));
                scale.extend(to_nhwc(&size, 1, out_dims));
            }
            let got = arena.get(2, compute, want.len());
            let what = format!("preprocess {s} {} -> {}", in_dtype.name(), compute.name());
            assert_each(&what, &got, &want, &scale, tolerance(compute));
        }
    }
}

#[test]
fn bias_act_matches_add_bias_and_relu() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(12);
    for dtype in DTYPES {
        for (relu, count, pred) in [(true, 3, 2), (false, 2, 2), (true, 2, 0)] {
            let dims = (16, 5, 3);
            let (c, h, w) = dims;
            let per = c * h * w;
            let x = rng.values(count * per, dtype);
            let bias = rng.uniform(c, -0.5, 0.5);
            let mut arena = Arena::new(&[count * per * dtype.size(), pred * per / 8 + 4]);
            arena.put(0, dtype, &x);
            let setup = Setup::new(dtype, Pooling::Max, Criterion::Mse, Some(&bias));
            let mask = (relu && pred > 0).then_some(1);
            let images = Images {
                buf: 0,
                offset: 0,
                count,
            };
            let step = BiasAct {
                layer: 0,
                x: images,
                pred,
                bias: Some(0),
                relu,
                mask,
                dims,
            };
            setup.run(emu, &arena, Step::BiasAct(step));
            let chw = to_chw(&x, count, dims);
            let (want, want_mask) = bias_relu(&chw, count, dims, &bias, relu, dtype);
            let got = to_chw(&arena.get(0, dtype, count * per), count, dims);
            let what = format!("bias_act relu={relu} {} images {}", count, dtype.name());
            assert_each(&what, &got, &want, &[], tolerance(dtype));
            if mask.is_some() {
                let bits = unpack_bits(&arena.get_bytes(1, pred * per / 8), pred * per);
                let want_bits = bools(&to_nhwc(&flags(&want_mask), count, dims)[..pred * per]);
                assert_eq!(bits, want_bits, "{what}: mask");
            }
        }
    }
}

/// Shapes of the pool tests: even sizes for the fused passes, odd ones
/// for the plain pool (whose floor drops a row or a column).
const EVEN: Dims = (16, 6, 10);
const ODD: Dims = (8, 7, 5);

#[test]
fn bias_act_pool_matches_add_bias_relu_and_pool() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(13);
    for dtype in DTYPES {
        for kind in [Pooling::Max, Pooling::Avg] {
            let (count, pred) = (3, 2);
            let (c, h, w) = EVEN;
            let pooled = (c, h / 2, w / 2);
            let (per, per_out) = (c * h * w, c * h / 2 * (w / 2));
            let x = rng.values(count * per, dtype);
            let bias = rng.uniform(c, -0.5, 0.5);
            let mut arena = Arena::new(&[
                count * per * dtype.size(),
                count * per_out * dtype.size(),
                pred * per / 8 + 4,
                pred * per_out / 4 + 8,
            ]);
            arena.put(0, dtype, &x);
            let setup = Setup::new(dtype, kind, Criterion::Mse, Some(&bias));
            let max = kind == Pooling::Max;
            let step = BiasActPool {
                layer: 0,
                x: Images {
                    buf: 0,
                    offset: 0,
                    count,
                },
                y: Images {
                    buf: 1,
                    offset: 0,
                    count,
                },
                pred,
                bias: Some(0),
                mask: Some(2),
                argmax: max.then_some(3),
                input: EVEN,
            };
            setup.run(emu, &arena, Step::BiasActPool(step));
            let (act, mask) = bias_relu(&to_chw(&x, count, EVEN), count, EVEN, &bias, true, dtype);
            let (want, argmax) = pool_ref(&act, count, EVEN, kind, dtype);
            let got = to_chw(&arena.get(1, dtype, count * per_out), count, pooled);
            let what = format!("bias_act_pool {kind:?} {}", dtype.name());
            assert_each(&what, &got, &want, &[], tolerance(dtype));
            let bits = unpack_bits(&arena.get_bytes(2, pred * per / 8), pred * per);
            let want_bits = bools(&to_nhwc(&flags(&mask), count, EVEN)[..pred * per]);
            assert_eq!(bits, want_bits, "{what}: mask");
            if max {
                let got = unpack_argmax(
                    &arena.get_bytes(3, argmax_bytes(pred * per_out)),
                    pred * per_out,
                );
                let want = argmax_nhwc(&argmax, count, pooled);
                assert_eq!(got, want[..pred * per_out], "{what}: argmax");
            }
        }
    }
}

#[test]
fn pool_matches_layers_pool_on_odd_sizes() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(14);
    for dtype in DTYPES {
        for kind in [Pooling::Max, Pooling::Avg] {
            let (count, pred) = (3, 1);
            let (c, h, w) = ODD;
            let pooled = (c, h / 2, w / 2);
            let (per, per_out) = (c * h * w, c * (h / 2) * (w / 2));
            let x = rng.values(count * per, dtype);
            let mut arena = Arena::new(&[
                count * per * dtype.size(),
                count * per_out * dtype.size(),
                pred * per_out / 4 + 8,
            ]);
            arena.put(0, dtype, &x);
            let max = kind == Pooling::Max;
            let step = Pool {
                layer: 4,
                x: Images {
                    buf: 0,
                    offset: 0,
                    count,
                },
                y: Images {
                    buf: 1,
                    offset: 0,
                    count,
                },
                pred,
                argmax: max.then_some(2),
                input: ODD,
            };
            Setup::new(dtype, kind, Criterion::Mse, None).run(emu, &arena, Step::Pool(step));
            let (want, argmax) = pool_ref(&to_chw(&x, count, ODD), count, ODD, kind, dtype);
            let got = to_chw(&arena.get(1, dtype, count * per_out), count, pooled);
            let what = format!("pool {kind:?} {}", dtype.name());
            assert_each(&what, &got, &want, &[], tolerance(dtype));
            if max {
                let got = unpack_argmax(
                    &arena.get_bytes(2, argmax_bytes(pred * per_out)),
                    pred * per_out,
                );
                let want = argmax_nhwc(&argmax, count, pooled);
                assert_eq!(got, want[..pred * per_out], "{what}: argmax");
            }
        }
    }
}

/// A tap's expected values: loss, per-image values and the gradient of
/// `f_pred` (CHW f32, rounded to `dtype`) against `f_target`, by
/// `feature::cpu::distance_sum` per image.
struct TapWant {
    loss: f64,
    per_sample: Vec<f64>,
    grad: Vec<f32>,
}

fn tap_ref(
    f_pred: &[f32],
    f_target: &[f32],
    n: usize,
    criterion: Criterion,
    weight: f32,
    batch: usize,
    dtype: DType,
) -> TapWant {
    let per = f_pred.len() / n;
    let scale = weight as f64 / (batch * per) as f64;
    let mut grad = vec![0f32; f_pred.len()];
    let mut per_sample = Vec::new();
    let mut total = 0.0;
    for i in 0..n {
        let r = i * per..(i + 1) * per;
        let g = HostGrad {
            values: &mut grad[r.clone()],
            beta: 0.0,
        };
        let sum = distance_sum(criterion, &f_pred[r.clone()], &f_target[r], Some(g), scale);
        per_sample.push(weight as f64 * sum / per as f64);
        total += sum / per as f64;
    }
    TapWant {
        loss: total * weight as f64 / batch as f64,
        per_sample,
        grad: grad.into_iter().map(|g| round_to(dtype, g)).collect(),
    }
}

/// Loss and per-sample outputs of a tap step, on the host, with old
/// values for the accumulating case.
struct TapOut {
    loss: f32,
    per_sample: Vec<f32>,
}

fn assert_tap(
    what: &str,
    got: &TapOut,
    want: &TapWant,
    (old_loss, old_per): (f32, &[f32]),
    accumulate: bool,
) {
    let base = if accumulate { old_loss as f64 } else { 0.0 };
    let want_loss = (base + want.loss) as f32;
    assert_each(
        &format!("{what}: loss"),
        &[got.loss],
        &[want_loss],
        &[],
        1e-5,
    );
    let want_per: Vec<f32> = want
        .per_sample
        .iter()
        .zip(old_per)
        .map(|(v, old)| (*v + if accumulate { *old as f64 } else { 0.0 }) as f32)
        .collect();
    assert_each(
        &format!("{what}: per sample"),
        &got.per_sample,
        &want_per,
        &[],
        1e-5,
    );
}

#[test]
fn tap_loss_matches_the_feature_distance() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(15);
    for dtype in DTYPES {
        for (criterion, in_place, accumulate) in
            [(Criterion::Mse, false, false), (Criterion::Mae, true, true)]
        {
            let (n, batch) = (3, 5); // a chunk of 3 images of a batch of 5
            let dims = (24, 5, 7);
            let per = dims.0 * dims.1 * dims.2;
            let (a, b) = (rng.values(n * per, dtype), rng.values(n * per, dtype));
            let mut arena = Arena::new(&[
                n * per * dtype.size(),
                n * per * dtype.size(),
                n * per * dtype.size(),
            ]);
            arena.put(0, dtype, &a);
            arena.put(1, dtype, &b);
            let old_per = rng.uniform(n, 0.0, 1.0);
            let mut out = TapOut {
                loss: 0.25,
                per_sample: old_per.clone(),
            };
            let mut setup = Setup::new(dtype, Pooling::Max, criterion, None);
            setup.call.io.shape = Shape::new(n, 3, 1, 1);
            setup.call.io.loss = &mut out.loss as *mut f32 as u64;
            setup.call.io.per_sample = Some(out.per_sample.as_mut_ptr() as u64);
            setup.call.batch = batch;
            let grad = if in_place { 0 } else { 2 };
            let weight = 0.75;
            let images = |buf| Images {
                buf,
                offset: 0,
                count: n,
            };
            let tap = TapTerm {
                grad: Some(grad),
                weight,
                accumulate,
                first: !accumulate,
            };
            let step = TapLoss {
                layer: 3,
                pred: images(0),
                target: images(1),
                dims,
                tap,
            };
            setup.run(emu, &arena, Step::TapLoss(step));
            let want = tap_ref(
                &to_chw(&a, n, dims),
                &to_chw(&b, n, dims),
                n,
                criterion,
                weight as f32,
                batch,
                dtype,
            );
            let what = format!(
                "tap_loss {criterion:?} in_place={in_place} {}",
                dtype.name()
            );
            assert_tap(&what, &out, &want, (0.25, &old_per), accumulate);
            let got = to_chw(&arena.get(grad, dtype, n * per), n, dims);
            assert_each(
                &format!("{what}: gradient"),
                &got,
                &want.grad,
                &[],
                tolerance(dtype),
            );
        }
    }
}

#[test]
fn bias_act_pool_tap_matches_bias_relu_pool_and_the_distance() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(16);
    for dtype in DTYPES {
        for (kind, criterion, in_place) in [
            (Pooling::Max, Criterion::Mse, true),
            (Pooling::Avg, Criterion::Mae, false),
        ] {
            let n = 2;
            let (c, h, w) = EVEN;
            let pooled = (c, h / 2, w / 2);
            let (per, per_out) = (c * h * w, c * (h / 2) * (w / 2));
            let (a, b) = (rng.values(n * per, dtype), rng.values(n * per, dtype));
            let bias = rng.uniform(c, -0.5, 0.5);
            let v = dtype.size();
            let mut arena = Arena::new(&[
                n * per * v,
                n * per * v,
                2 * n * per_out * v,
                n * per / 8 + 4,
                n * per_out / 4 + 8,
                n * per * v,
            ]);
            arena.put(0, dtype, &a);
            arena.put(1, dtype, &b);
            let mut out = TapOut {
                loss: f32::NAN,
                per_sample: vec![f32::NAN; n],
            };
            let mut setup = Setup::new(dtype, kind, criterion, Some(&bias));
            setup.call.io.shape = Shape::new(n, 3, 1, 1);
            setup.call.io.loss = &mut out.loss as *mut f32 as u64;
            setup.call.io.per_sample = Some(out.per_sample.as_mut_ptr() as u64);
            setup.call.batch = n;
            let max = kind == Pooling::Max;
            let grad = if in_place { 0 } else { 5 };
            let images = |buf, offset| Images {
                buf,
                offset,
                count: n,
            };
            let weight = 1.5;
            let step = BiasActPoolTap {
                layer: 3,
                pred: images(0, 0),
                target: images(1, 0),
                y_pred: images(2, 0),
                y_target: images(2, n * per_out),
                bias: Some(0),
                mask: Some(3),
                argmax: max.then_some(4),
                input: EVEN,
                tap: TapTerm {
                    grad: Some(grad),
                    weight,
                    accumulate: false,
                    first: true,
                },
            };
            setup.run(emu, &arena, Step::BiasActPoolTap(step));
            let (fa, mask) = bias_relu(&to_chw(&a, n, EVEN), n, EVEN, &bias, true, dtype);
            let (fb, _) = bias_relu(&to_chw(&b, n, EVEN), n, EVEN, &bias, true, dtype);
            let want = tap_ref(&fa, &fb, n, criterion, weight as f32, n, dtype);
            let what = format!("bias_act_pool_tap {kind:?} {criterion:?} {}", dtype.name());
            assert_tap(&what, &out, &want, (0.0, &[0.0; 2]), false);
            let got = to_chw(&arena.get(grad, dtype, n * per), n, EVEN);
            assert_each(
                &format!("{what}: gradient"),
                &got,
                &want.grad,
                &[],
                tolerance(dtype),
            );
            let (ya, argmax) = pool_ref(&fa, n, EVEN, kind, dtype);
            let (yb, _) = pool_ref(&fb, n, EVEN, kind, dtype);
            let y = arena.get(2, dtype, 2 * n * per_out);
            let (got_a, got_b) = y.split_at(n * per_out);
            assert_each(
                &format!("{what}: pooled pred"),
                &to_chw(got_a, n, pooled),
                &ya,
                &[],
                tolerance(dtype),
            );
            assert_each(
                &format!("{what}: pooled target"),
                &to_chw(got_b, n, pooled),
                &yb,
                &[],
                tolerance(dtype),
            );
            let bits = unpack_bits(&arena.get_bytes(3, n * per / 8), n * per);
            assert_eq!(
                bits,
                bools(&to_nhwc(&flags(&mask), n, EVEN)),
                "{what}: mask"
            );
            if max {
                let got =
                    unpack_argmax(&arena.get_bytes(4, argmax_bytes(n * per_out)), n * per_out);
                assert_eq!(got, argmax_nhwc(&argmax, n, pooled), "{what}: argmax");
            }
        }
    }
}

/// The reference of a ReLU's backward on CHW gradients: + `before`,
/// `layers::relu_backward`, + `after`, rounded to `dtype`.
fn relu_backward_ref(
    g: &[f32],
    before: Option<&[f32]>,
    mask: &[bool],
    after: Option<&[f32]>,
    dtype: DType,
) -> Vec<f32> {
    let mut v = g.to_vec();
    if let Some(b) = before {
        v.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    }
    layers::relu_backward(&mut v, mask);
    if let Some(b) = after {
        v.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    }
    v.into_iter().map(|x| round_to(dtype, x)).collect()
}

#[test]
fn relu_backward_matches_layers_relu_backward() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(17);
    for dtype in DTYPES {
        for (with_before, with_after) in [(true, true), (false, false), (true, false)] {
            let n = 3;
            let dims = (16, 3, 5);
            let per = dims.0 * dims.1 * dims.2;
            let g = rng.values(n * per, dtype);
            let (before, after) = (rng.values(n * per, dtype), rng.values(n * per, dtype));
            let mask: Vec<bool> = (0..n * per).map(|_| rng.below(2) == 1).collect();
            let v = dtype.size();
            let mut arena = Arena::new(&[n * per * v, n * per * v, n * per / 8 + 4, n * per * v]);
            arena.put(0, dtype, &g);
            arena.put(1, dtype, &before);
            arena.put_bytes(2, &pack_bits(&mask));
            arena.put(3, dtype, &after);
            let mut setup = Setup::new(dtype, Pooling::Max, Criterion::Mse, None);
            setup.call.io.shape = Shape::new(n, 3, 1, 1);
            let step = ReluBackward {
                layer: 1,
                g: 0,
                before: with_before.then_some(1),
                mask: 2,
                after: with_after.then_some(3),
                dims,
            };
            setup.run(emu, &arena, Step::ReluBackward(step));
            let chw = |x: &[f32]| to_chw(x, n, dims);
            let mask_chw = bools(&chw(&flags(&mask)));
            let (g, b, a) = (chw(&g), chw(&before), chw(&after));
            let want = relu_backward_ref(
                &g,
                with_before.then_some(&b[..]),
                &mask_chw,
                with_after.then_some(&a[..]),
                dtype,
            );
            let got = chw(&arena.get(0, dtype, n * per));
            // Sums of two or three terms may cancel: relative to their size.
            let size: Vec<f32> = (0..n * per)
                .map(|i| g[i].abs() + b[i].abs() + a[i].abs())
                .collect();
            let what = format!(
                "relu_backward before={with_before} after={with_after} {}",
                dtype.name()
            );
            assert_each(&what, &got, &want, &size, tolerance(dtype));
        }
    }
}

#[test]
fn unpool_matches_layers_pool_backward_and_the_relu_before() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(18);
    for dtype in DTYPES {
        for (kind, relu, dims) in [
            (Pooling::Max, true, ODD),
            (Pooling::Avg, false, EVEN),
            (Pooling::Max, false, EVEN),
        ] {
            let n = 2;
            let (c, h, w) = dims;
            let pooled = (c, h / 2, w / 2);
            let (per, per_out) = (c * h * w, c * (h / 2) * (w / 2));
            let gy = rng.values(n * per_out, dtype);
            let before = rng.values(n * per_out, dtype);
            let argmax: Vec<u8> = (0..n * per_out).map(|_| rng.below(4) as u8).collect();
            let relu_before = rng.values(n * per, dtype);
            let after = rng.values(n * per, dtype);
            let mask: Vec<bool> = (0..n * per).map(|_| rng.below(2) == 1).collect();
            let v = dtype.size();
            let mut arena = Arena::new(&[
                n * per_out * v,
                n * per_out * v,
                n * per * v,
                n * per_out / 4 + 8,
                n * per * v,
                n * per / 8 + 4,
                n * per * v,
            ]);
            arena.put(0, dtype, &gy);
            arena.put(1, dtype, &before);
            arena.put_bytes(3, &pack_argmax(&argmax));
            arena.put(4, dtype, &relu_before);
            arena.put_bytes(5, &pack_bits(&mask));
            arena.put(6, dtype, &after);
            let mut setup = Setup::new(dtype, kind, Criterion::Mse, None);
            setup.call.io.shape = Shape::new(n, 3, 1, 1);
            let max = kind == Pooling::Max;
            let step = Unpool {
                layer: 4,
                gy: 0,
                gx: 2,
                before: Some(1),
                argmax: max.then_some(3),
                relu: relu.then_some(ReluGrad {
                    before: Some(4),
                    mask: 5,
                    after: Some(6),
                }),
                input: dims,
            };
            setup.run(emu, &arena, Step::Unpool(step));
            // + before, layers::pool_backward per image, then the ReLU.
            let argmax_chw: Vec<u8> = to_chw(&flags_u8(&argmax), n, pooled)
                .iter()
                .map(|&v| v as u8)
                .collect();
            let unpool = |gy: &[f32]| {
                let g = to_chw(gy, n, pooled);
                let mut out = Vec::new();
                for i in 0..n {
                    let r = i * per_out..(i + 1) * per_out;
                    let mut dx = Vec::new();
                    layers::pool_backward(&g[r.clone()], c, h, w, kind, &argmax_chw[r], &mut dx);
                    out.extend(dx);
                }
                out
            };
            let summed: Vec<f32> = gy.iter().zip(&before).map(|(a, b)| a + b).collect();
            let unpooled = unpool(&summed);
            let chw = |x: &[f32]| to_chw(x, n, dims);
            let (rb, af) = (chw(&relu_before), chw(&after));
            let want = if relu {
                let m = bools(&chw(&flags(&mask)));
                relu_backward_ref(&unpooled, Some(&rb), &m, Some(&af), dtype)
            } else {
                unpooled.iter().map(|&x| round_to(dtype, x)).collect()
            };
            // The size of what each element sums: |gy| + |before| unpooled
            // the same way, and the ReLU's terms.
            let magnitude: Vec<f32> = gy
                .iter()
                .zip(&before)
                .map(|(a, b)| a.abs() + b.abs())
                .collect();
            let size: Vec<f32> = unpool(&magnitude)
                .iter()
                .enumerate()
                .map(|(i, u)| u + if relu { rb[i].abs() + af[i].abs() } else { 0.0 })
                .collect();
            let got = chw(&arena.get(2, dtype, n * per));
            let what = format!("unpool {kind:?} relu={relu} {dims:?} {}", dtype.name());
            assert_each(&what, &got, &want, &size, tolerance(dtype));
        }
    }
}

#[test]
fn input_grad_matches_cpu_input_grad() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(19);
    for (compute, out_dtype) in [
        (DType::F32, DType::F32),
        (DType::BF16, DType::F32),
        (DType::F16, DType::F16),
        (DType::BF16, DType::BF16),
    ] {
        for (c, norm, beta) in [
            (3, InputNorm::Imagenet, 0.5),
            (1, InputNorm::ImagenetFromPm1, 0.0),
        ] {
            let s = Shape::new(2, c, 5, 3);
            let hw = s.h * s.w;
            let g_dims = (INPUT_CHANNELS, s.h, s.w);
            let g = rng.values(s.n * hw * INPUT_CHANNELS, compute);
            let old = rng.values(s.n * c * hw, out_dtype);
            let mut arena = Arena::new(&[
                s.n * hw * INPUT_CHANNELS * compute.size(),
                s.n * c * hw * out_dtype.size(),
            ]);
            arena.put(0, compute, &g);
            arena.put(1, out_dtype, &old);
            let mut setup = Setup::new(compute, Pooling::Max, Criterion::Mse, None);
            setup.spec.norm = norm;
            setup.call.io.shape = s;
            setup.call.io.dtype = out_dtype;
            setup.call.io.grad = Some(arena.addr(1));
            setup.call.io.beta = beta;
            setup.run(emu, &arena, Step::InputGrad(InputGrad { g: 0 }));
            let g_chw = to_chw(&g, s.n, g_dims);
            let mut want = Vec::new();
            let mut size = Vec::new();
            for i in 0..s.n {
                let image = &g_chw[i * INPUT_CHANNELS * hw..(i + 1) * INPUT_CHANNELS * hw];
                for ch in 0..c {
                    for p in 0..hw {
                        let v = cpu::input_grad(image, c, hw, norm, ch, p);
                        let o = old[(i * c + ch) * hw + p] as f64;
                        want.push(round_to(out_dtype, (beta as f64 * o + v) as f32));
                        let terms: f64 = (0..3)
                            .map(|k| (image[k * hw + p] as f64 * norm.affine(k).0).abs())
                            .sum();
                        size.push((terms + (beta as f64 * o).abs()) as f32);
                    }
                }
            }
            let got = arena.get(1, out_dtype, s.n * c * hw);
            let what = format!(
                "input_grad c={c} {} -> {}",
                compute.name(),
                out_dtype.name()
            );
            assert_each(&what, &got, &want, &size, tolerance(out_dtype));
        }
    }
}
