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
//!
//! `forward.rs`, `taps.rs` and `backward.rs` hold the tests; this file the
//! host buffers, the references shared by several steps and the layout
//! conversions.

mod backward;
mod forward;
mod gram;
mod taps;

use super::{DeviceNet, Exec, KeptAt};
use crate::backend::DeviceIo;
use crate::cuda::emulator::{load, round_to, store, Emulator};
use crate::error::{Error, Result};
use crate::ops::feature::Criterion;
use crate::ops::perceptual::config::{InputNorm, PerceptualSpec};
use crate::ops::perceptual::cpu::layers;
use crate::ops::perceptual::cuda::convs::Convs;
use crate::ops::perceptual::cuda::layout::Layout;
use crate::ops::perceptual::cuda::schedule::*;
use crate::ops::perceptual::cuda::CudaCall;
use crate::tensor::{DType, Shape};
use crate::vgg::device_weights::ConvAddrs;
use crate::vgg::{Dims, LayerAddrs, Pooling};

/// The steps here launch no convolution.
pub(super) struct NoConvs;

impl Convs for NoConvs {
    unsafe fn forward(&self, _: usize, _: usize, _: u64, _: u64, _: u64) -> Result<()> {
        Err(Error::Internal("no convolution in a step test".into()))
    }
    unsafe fn backward_data(&self, _: usize, _: u64, _: u64, _: u64) -> Result<()> {
        Err(Error::Internal("no convolution in a step test".into()))
    }
}

/// Seeded values in [lo, hi).
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(super) fn uniform(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len)
            .map(|_| lo + (hi - lo) * (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .collect()
    }
    /// `len` values rounded to `dtype`.
    pub(super) fn values(&mut self, len: usize, dtype: DType) -> Vec<f32> {
        let v = self.uniform(len, -1.0, 1.0);
        v.into_iter().map(|x| round_to(dtype, x)).collect()
    }
    pub(super) fn below(&mut self, n: u64) -> usize {
        (self.next() % n) as usize
    }
}

/// A step's buffers on the host, in one arena laid out like a plan's
/// (256-byte aligned), poisoned with NaN bytes so a read before a write
/// shows, and with a guard tail that must stay untouched.
pub(super) struct Arena {
    words: Vec<u128>,
    pub(super) layout: Layout,
}

pub(super) const GUARD: u128 = 0x5a5a_5a5a_5a5a_5a5a_5a5a_5a5a_5a5a_5a5a;

impl Arena {
    /// Buffers of these byte sizes.
    pub(super) fn new(sizes: &[usize]) -> Arena {
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
            layout: Layout {
                kept: vec![None; offsets.len()],
                offsets,
                bytes: at,
            },
        }
    }

    pub(super) fn addr(&self, b: Buf) -> u64 {
        self.words.as_ptr() as u64 + self.layout.offsets[b] as u64
    }

    pub(super) fn base(&self) -> u64 {
        self.words.as_ptr() as u64
    }

    pub(super) fn put(&mut self, b: Buf, dtype: DType, values: &[f32]) {
        // SAFETY: each buffer was sized for what the test puts in it.
        unsafe { store(self.addr(b), dtype, values) }
    }

    pub(super) fn get(&self, b: Buf, dtype: DType, len: usize) -> Vec<f32> {
        // SAFETY: as for `put`.
        unsafe { load(self.addr(b), dtype, len) }
    }

    pub(super) fn put_bytes(&mut self, b: Buf, bytes: &[u8]) {
        let at = self.addr(b) as *mut u8;
        // SAFETY: as for `put`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at, bytes.len()) }
    }

    pub(super) fn get_bytes(&self, b: Buf, len: usize) -> Vec<u8> {
        // SAFETY: as for `put`.
        unsafe { std::slice::from_raw_parts(self.addr(b) as *const u8, len).to_vec() }
    }

    pub(super) fn assert_guard(&self) {
        let end = self.layout.bytes / 16;
        assert!(
            self.words[end..].iter().all(|&w| w == GUARD),
            "a kernel wrote past the last buffer"
        );
    }
}

/// What a step runs with: the options, the bias of layer 0, the call.
pub(super) struct Setup {
    pub(super) spec: PerceptualSpec,
    weights: LayerAddrs,
    pub(super) call: CudaCall,
    compute: DType,
    /// The host address of LPIPS's channel weights, or 0.
    pub(super) lpips: u64,
}

impl Setup {
    pub(super) fn new(
        compute: DType,
        pooling: Pooling,
        criterion: Criterion,
        bias: Option<&[f32]>,
    ) -> Self {
        let spec = PerceptualSpec {
            taps: Vec::new(),
            criterion,
            style: Vec::new(),
            style_criterion: Criterion::Mse,
            style_weight: 1.0,
            lpips: None,
            norm: InputNorm::None,
            pooling,
            weight: 1.0,
            tf32: false,
            chunk: None,
            budget: None,
            check_finite: false,
            graphs: false,
        };
        let weights = LayerAddrs(vec![bias.map(|b| ConvAddrs {
            weight: 0,
            bias: b.as_ptr() as u64,
        })]);
        Setup {
            spec,
            weights,
            call: CudaCall::new(
                DeviceIo {
                    shape: Shape::new(1, 3, 1, 1),
                    dtype: DType::F32,
                    inputs: [0, 0],
                    grad: None,
                    beta: 0.0,
                    loss: 0,
                    per_sample: None,
                    parts: None,
                },
                Batch::Pairs,
            ),
            compute,
            lpips: 0,
        }
    }

    /// Runs `step` on `arena` through its launch function.
    pub(super) fn run(&self, emu: &Emulator, arena: &Arena, step: Step) {
        let layers = crate::vgg::VggArch::Vgg16.layers();
        let x = Exec {
            gpu: emu,
            convs: &NoConvs,
            net: DeviceNet {
                layers: &layers,
                weights: &self.weights,
                compute: self.compute,
                lpips: self.lpips,
            },
            spec: &self.spec,
            call: &self.call,
            layout: &arena.layout,
            base: arena.base(),
            kept: &KeptAt::default(),
        };
        x.launch(&step).unwrap();
        arena.assert_guard();
    }
}

/// The relative precision a comparison in `dtype` allows.
pub(super) fn tolerance(dtype: DType) -> f64 {
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
pub(super) fn assert_each(what: &str, got: &[f32], want: &[f32], scale: &[f32], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let s = scale.get(i).map_or(w.abs(), |s| s.abs().max(w.abs())) as f64;
        let ok = (g as f64 - w as f64).abs() <= rel * s || (g.is_nan() && w.is_nan());
        assert!(ok, "{what}[{i}]: got {g}, want {w} (scale {s})");
    }
}

/// NHWC images -> CHW images (both `count` images of `dims`).
pub(super) fn to_chw(x: &[f32], count: usize, (c, h, w): Dims) -> Vec<f32> {
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
pub(super) fn to_nhwc(x: &[f32], count: usize, (c, h, w): Dims) -> Vec<f32> {
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
pub(super) fn flags(b: &[bool]) -> Vec<f32> {
    b.iter().map(|&b| b as u8 as f32).collect()
}

pub(super) fn flags_u8(b: &[u8]) -> Vec<f32> {
    b.iter().map(|&b| b as f32).collect()
}

pub(super) fn bools(v: &[f32]) -> Vec<bool> {
    v.iter().map(|&v| v == 1.0).collect()
}

/// Bit masks as the kernels keep them: element k of the NHWC order is bit
/// k % 32 of word k / 32.
pub(super) fn unpack_bits(bytes: &[u8], len: usize) -> Vec<bool> {
    (0..len)
        .map(|k| (bytes[k / 8] >> (k % 8)) & 1 == 1)
        .collect()
}

pub(super) fn pack_bits(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(32) * 4];
    for (k, &b) in bits.iter().enumerate() {
        out[k / 8] |= (b as u8) << (k % 8);
    }
    out
}

/// Pool argmax as the kernels keep it: for outputs 32j..32j+31, word 2j
/// holds the low bits and word 2j+1 the high bits.
pub(super) fn unpack_argmax(bytes: &[u8], len: usize) -> Vec<u8> {
    let bit = |word: usize, k: usize| (bytes[word * 4 + k / 8] >> (k % 8)) & 1;
    (0..len)
        .map(|o| bit(o / 32 * 2, o % 32) | bit(o / 32 * 2 + 1, o % 32) << 1)
        .collect()
}

/// The first `len` mask bits of buffer `b`.
pub(super) fn mask_of(arena: &Arena, b: Buf, len: usize) -> Vec<bool> {
    unpack_bits(&arena.get_bytes(b, len.div_ceil(8)), len)
}

/// The first `len` argmax values of buffer `b`.
pub(super) fn argmax_of(arena: &Arena, b: Buf, len: usize) -> Vec<u8> {
    unpack_argmax(&arena.get_bytes(b, argmax_bytes(len)), len)
}

/// All `count` images of buffer `buf`.
pub(super) fn whole(buf: Buf, count: usize) -> Images {
    Images {
        buf,
        offset: 0,
        count,
    }
}

/// Bytes of the argmax of `len` outputs: whole 32-output groups.
pub(super) fn argmax_bytes(len: usize) -> usize {
    len.div_ceil(32) * 8
}

pub(super) fn pack_argmax(argmax: &[u8]) -> Vec<u8> {
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
pub(super) fn bias_relu(
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
            layers::relu(&mut v, None).unwrap();
        }
        out.extend(v.into_iter().map(|v| round_to(dtype, v)));
    }
    let mask = out.iter().map(|&v| v > 0.0).collect();
    (out, mask)
}

/// The reference of a 2x2 pool of CHW images (`layers::pool`), rounded to
/// `dtype`, with the argmax per output.
pub(super) fn pool_ref(
    x: &[f32],
    count: usize,
    (c, h, w): Dims,
    kind: Pooling,
    dtype: DType,
) -> (Vec<f32>, Vec<u8>) {
    let (mut y, mut argmax) = (Vec::new(), Vec::new());
    for image in x.chunks_exact(c * h * w).take(count) {
        let (mut out, mut a) = (Vec::new(), Vec::new());
        layers::pool(image, c, h, w, kind, &mut out, Some(&mut a)).unwrap();
        y.extend(out.into_iter().map(|v| round_to(dtype, v)));
        argmax.extend(a);
    }
    (y, argmax)
}

/// `argmax` of CHW outputs in the NHWC order the kernels keep it.
pub(super) fn argmax_nhwc(argmax: &[u8], count: usize, dims: Dims) -> Vec<u8> {
    let a = to_nhwc(&flags_u8(argmax), count, dims);
    a.iter().map(|&v| v as u8).collect()
}

pub(super) const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Shapes of the pool tests: even sizes for the fused passes, odd ones
/// for the plain pool (whose floor drops a row or a column).
pub(super) const EVEN: Dims = (16, 6, 10);
pub(super) const ODD: Dims = (8, 7, 5);
