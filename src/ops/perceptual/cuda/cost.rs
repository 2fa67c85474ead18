//! What one CUDA call costs, counted from its schedule (pure data, so it
//! needs no GPU): kernel launches, cuDNN calls, the bytes the crate's own
//! kernels read and write, and the convolutions' FLOPs, with the time
//! floor these imply on a card of a given bandwidth and tensor throughput.
//! A change that adds a pass or a launch changes these numbers, and the
//! tests below pin them for a small shape.

use super::schedule::{self, Batch, Buf, Images, Schedule, Step};
use crate::error::{Error, Result};
use crate::ops::perceptual::config::PerceptualSpec;
use crate::tensor::{DType, Shape};
use crate::vgg::{Dims, Layer, Module, INPUT_CHANNELS};

/// The cost of one perceptual call on CUDA, from its schedule (see
/// [`PerceptualLoss::plan_report`](crate::PerceptualLoss::plan_report)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanReport {
    /// How many chunks the batch runs in (`max_chunk_images`; a memory
    /// budget is resolved on the device and is not counted here).
    pub chunks: usize,
    /// Launches of the crate's own kernels.
    pub kernel_launches: usize,
    /// cuDNN convolution calls (forward and backward-data).
    pub cudnn_calls: usize,
    /// Bytes the crate's own kernels read (activations, masks, the
    /// caller's inputs), not counting cuDNN's.
    pub kernel_bytes_read: u64,
    /// Bytes the crate's own kernels write.
    pub kernel_bytes_written: u64,
    /// Multiply-adds times 2 of every convolution call.
    pub conv_flops: u64,
    /// Multiply-adds times 2 of the crate's own f32 products on CUDA cores:
    /// the style terms' Grams and their gradient.
    pub gram_flops: u64,
}

/// A card's ceilings, for [`PlanReport::floor`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Card {
    /// What the card is called in reports.
    pub name: &'static str,
    /// DRAM bandwidth in bytes per second (a measured copy is the honest
    /// ceiling).
    pub bytes_per_s: f64,
    /// Dense tensor-core throughput in FLOP/s for the compute dtype.
    pub flops_per_s: f64,
    /// f32 throughput of the CUDA cores in FLOP/s (the Gram kernels').
    pub f32_flops_per_s: f64,
}

impl Card {
    /// NVIDIA H200 SXM: the 4.3 TB/s device-to-device copy measured on one
    /// (docs/performance.md), and the 989 TFLOP/s dense bf16 and 67 TFLOP/s
    /// f32 of its data sheet.
    pub const H200: Card = Card {
        name: "H200",
        bytes_per_s: 4.3e12,
        flops_per_s: 989e12,
        f32_flops_per_s: 67e12,
    };
}

/// The time below which a call cannot run on a card: its own kernels'
/// bytes at full bandwidth plus the convolutions' FLOPs at full throughput
/// (they run one after the other).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Floor {
    /// Seconds to move the kernels' bytes at the card's bandwidth.
    pub memory_s: f64,
    /// Seconds for the convolutions at the card's tensor throughput.
    pub compute_s: f64,
    /// Seconds for the Gram products at the card's f32 throughput.
    pub gram_s: f64,
}

impl Floor {
    /// The floors, one after the other.
    pub fn total_s(&self) -> f64 {
        self.memory_s + self.compute_s + self.gram_s
    }
}

impl PlanReport {
    /// Nodes of the call's CUDA graph with `cuda_graphs`: the kernels, the
    /// cuDNN calls at one node each (cuDNN may launch more than one kernel
    /// for a call) and `pl_vgg_publish` (one more per chunk of a call that
    /// asks for parts: the parts' sum). Replaying it takes two launches
    /// however many nodes it has.
    pub fn graph_nodes(&self) -> usize {
        self.kernel_launches + self.cudnn_calls + 1
    }

    /// The time floor this call implies on `card`.
    pub fn floor(&self, card: &Card) -> Floor {
        Floor {
            memory_s: (self.kernel_bytes_read + self.kernel_bytes_written) as f64
                / card.bytes_per_s,
            compute_s: self.conv_flops as f64 / card.flops_per_s,
            gram_s: self.gram_flops as f64 / card.f32_flops_per_s,
        }
    }

    /// `self` plus `times` x `other`, or an error when a count overflows.
    fn add(&mut self, other: &PlanReport, times: usize) -> Result<()> {
        let over = || Error::shape("the cost of this call does not fit 64-bit counts");
        let times64 = times as u64;
        let mul = |a: usize| a.checked_mul(times).ok_or_else(over);
        let mul64 = |a: u64| a.checked_mul(times64).ok_or_else(over);
        let sum = |a: usize, b: usize| a.checked_add(b).ok_or_else(over);
        let sum64 = |a: u64, b: u64| a.checked_add(b).ok_or_else(over);
        self.kernel_launches = sum(self.kernel_launches, mul(other.kernel_launches)?)?;
        self.cudnn_calls = sum(self.cudnn_calls, mul(other.cudnn_calls)?)?;
        self.kernel_bytes_read = sum64(self.kernel_bytes_read, mul64(other.kernel_bytes_read)?)?;
        self.kernel_bytes_written = sum64(
            self.kernel_bytes_written,
            mul64(other.kernel_bytes_written)?,
        )?;
        self.conv_flops = sum64(self.conv_flops, mul64(other.conv_flops)?)?;
        self.gram_flops = sum64(self.gram_flops, mul64(other.gram_flops)?)?;
        Ok(())
    }
}

impl std::fmt::Display for PlanReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let floor = self.floor(&Card::H200);
        write!(
            f,
            "{} chunk(s): {} kernel launches, {} cuDNN calls ({} CUDA graph nodes), kernels read \
             {:.1} MiB and write {:.1} MiB, convolutions {:.2} GFLOP, Grams {:.2} GFLOP; floor on an \
             {}: {:.1} us memory + {:.1} us compute + {:.1} us Grams",
            self.chunks,
            self.kernel_launches,
            self.cudnn_calls,
            self.graph_nodes(),
            self.kernel_bytes_read as f64 / (1u64 << 20) as f64,
            self.kernel_bytes_written as f64 / (1u64 << 20) as f64,
            self.conv_flops as f64 / 1e9,
            self.gram_flops as f64 / 1e9,
            Card::H200.name,
            floor.memory_s * 1e6,
            floor.compute_s * 1e6,
            floor.gram_s * 1e6,
        )
    }
}

/// The report of a call on `shape` with inputs of `input` dtype, the
/// network computing in `compute`, its batch holding `holds`.
pub(crate) fn report(
    layers: &[Layer],
    spec: &PerceptualSpec,
    (shape, holds): (Shape, Batch),
    (input, compute): (DType, DType),
    want_grad: bool,
) -> Result<PlanReport> {
    let chunk = spec.chunk.unwrap_or(shape.n).min(shape.n).max(1);
    let mut total = PlanReport {
        chunks: shape.n.div_ceil(chunk),
        kernel_launches: 0,
        cudnn_calls: 0,
        kernel_bytes_read: 0,
        kernel_bytes_written: 0,
        conv_flops: 0,
        gram_flops: 0,
    };
    // Chunks of one size have the same steps (only whether a tap adds to
    // the loss differs): count a whole chunk and the rest once each.
    let (whole, rest) = (shape.n / chunk, shape.n % chunk);
    for (n, times) in [(chunk, whole), (rest, 1)] {
        if n == 0 || times == 0 {
            continue;
        }
        let sched = schedule::build(layers, spec, holds, (n, shape.h, shape.w), want_grad, false)?;
        let part = Shape { n, ..shape };
        let counted =
            Counter::new(&layers[..=spec.deepest()], &sched, part, (input, compute)).count()?;
        total.add(&counted, times)?;
    }
    Ok(total)
}

/// Counts one chunk's schedule.
struct Counter<'a> {
    layers: &'a [Layer],
    sched: &'a Schedule,
    shape: Shape,
    input: DType,
    compute: DType,
    /// The device dims of each layer's input.
    inputs: Vec<Dims>,
}

impl<'a> Counter<'a> {
    fn new(layers: &'a [Layer], sched: &'a Schedule, shape: Shape, dtypes: (DType, DType)) -> Self {
        let out = schedule::layer_dims(layers, shape.h, shape.w);
        let inputs = std::iter::once((INPUT_CHANNELS, shape.h, shape.w))
            .chain(out.iter().copied())
            .take(layers.len())
            .collect();
        Counter {
            layers,
            sched,
            shape,
            input: dtypes.0,
            compute: dtypes.1,
            inputs,
        }
    }

    // Counted in u128 (the shape check bounds each buffer, not these
    // products), then checked into u64.
    fn buf(&self, b: Buf) -> u128 {
        self.sched.buffers[b].bytes(self.compute.size()) as u128
    }

    fn opt(&self, b: Option<Buf>) -> u128 {
        b.map_or(0, |b| self.buf(b))
    }

    fn images(&self, i: Images, (c, h, w): Dims) -> u128 {
        [i.count, c, h, w, self.compute.size()]
            .iter()
            .map(|&v| v as u128)
            .product()
    }

    /// The caller's pred and target (or gradient): n images each.
    fn caller(&self) -> u128 {
        let s = self.shape;
        [s.n, s.c, s.h, s.w, self.input.size()]
            .iter()
            .map(|&v| v as u128)
            .product()
    }

    /// 2 * multiply-adds of convolution `layer` over `images` images.
    fn conv_flops(&self, layer: usize, images: usize) -> u128 {
        let (in_c, h, w) = self.inputs[layer];
        let Module::Conv { out_c, .. } = self.layers[layer].module else {
            return 0;
        };
        [2, images, out_c, in_c, 9, h, w]
            .iter()
            .map(|&v| v as u128)
            .product()
    }

    /// 1 for a Fro term's second launch (the gradient), counted in
    /// `launches`; 0 otherwise.
    fn fro_pass(&self, norm: Option<Buf>, grad: Option<Buf>, launches: &mut usize) -> u128 {
        let two = norm.is_some() && grad.is_some();
        *launches += two as usize;
        two as u128
    }

    fn count(&self) -> Result<PlanReport> {
        let (mut launches, mut cudnn) = (0usize, 0usize);
        let (mut read_total, mut written_total, mut flops) = (0u128, 0u128, 0u128);
        let mut gram_flops = 0u128;
        // 2 * multiply-adds of C x C from M pixels, per image.
        let gram = |(c, h, w): Dims, images: usize| -> u128 {
            [2, images, c, c, h, w].iter().map(|&v| v as u128).product()
        };
        let pooled = |(c, h, w): Dims| (c, h / 2, w / 2);
        for step in &self.sched.steps {
            let (read, written) = match step {
                Step::ConvForward(s) => {
                    cudnn += 1;
                    flops += self.conv_flops(s.layer, s.x.count);
                    continue;
                }
                Step::ConvBackwardData(s) => {
                    cudnn += 1;
                    flops += self.conv_flops(s.layer, self.shape.n);
                    continue;
                }
                // The caller's inputs in; the padded batch out.
                Step::Preprocess(s) => {
                    let inputs = if s.pairs { 2 } else { 1 };
                    (inputs * self.caller(), self.buf(s.out))
                }
                // In place, and the pred images' 1-bit mask.
                Step::BiasAct(s) => {
                    let x = self.images(s.x, s.dims);
                    (x, x + self.opt(s.mask))
                }
                Step::BiasActPool(s) => (
                    self.images(s.x, s.input),
                    self.images(s.y, pooled(s.input)) + self.opt(s.mask) + self.opt(s.argmax),
                ),
                Step::BiasActPoolTap(s) => (
                    self.images(s.pred, s.input) + self.images(s.target, s.input),
                    self.images(s.y_pred, pooled(s.input))
                        + s.y_target.map_or(0, |y| self.images(y, pooled(s.input)))
                        + self.opt(s.mask)
                        + self.opt(s.argmax)
                        + self.opt(s.tap.grad),
                ),
                Step::Pool(s) => (
                    self.images(s.x, s.input),
                    self.images(s.y, pooled(s.input)) + self.opt(s.argmax),
                ),
                Step::TapLoss(s) => {
                    let both = self.images(s.pred, s.dims) + self.images(s.target, s.dims);
                    // A Fro term's gradient launch reads both halves again.
                    let again = self.fro_pass(s.tap.norm, s.tap.grad, &mut launches) * both;
                    (both + again, self.opt(s.tap.grad))
                }
                // Both halves' features (or one's) in; the Grams (or
                // their partial sums, added up by a second launch) out.
                Step::Gram(s) => {
                    let target = s.target.map_or(0, |t| t.count);
                    gram_flops += gram(s.dims, s.pred.count + target);
                    let features = self.images(s.pred, s.dims)
                        + s.target.map_or(0, |t| self.images(t, s.dims));
                    let (c, _, _) = s.dims;
                    let grams = ((s.pred.count + target) * c * c * 4) as u128;
                    match s.partial {
                        None => (features, grams),
                        Some(partial) => {
                            launches += 1;
                            let partial = self.buf(partial);
                            (features + partial, partial + grams)
                        }
                    }
                }
                // Both halves' Grams in (a kept target's counted as n
                // images); dL/dG over pred's.
                Step::GramLoss(s) => {
                    let grams = (2 * self.shape.n * s.c * s.c * 4) as u128;
                    let again = self.fro_pass(s.tap.norm, s.tap.grad, &mut launches) * grams;
                    (grams + again, s.tap.grad.map_or(0, |_| grams / 2))
                }
                // A target's features copied out.
                Step::Keep(s) => {
                    let x = self.images(s.x, s.dims);
                    (x, x)
                }
                // dL/dG and the pred features in (and the perceptual tap's
                // gradient when adding to it); the feature gradient out.
                Step::GramBackward(s) => {
                    gram_flops += gram(s.dims, s.x.count);
                    let grad = self.buf(s.grad);
                    let (c, _, _) = s.dims;
                    let e = (s.x.count * c * c * 4) as u128;
                    let old = if s.accumulate { grad } else { 0 };
                    (e + self.images(s.x, s.dims) + old, grad)
                }
                Step::ReluBackward(s) => {
                    let relu = s.relu;
                    let read = self.buf(s.g) + self.buf(relu.mask);
                    (
                        read + self.opt(relu.before) + self.opt(relu.after),
                        self.buf(s.g),
                    )
                }
                Step::Unpool(s) => {
                    let relu = s.relu.map_or(0, |r| {
                        self.buf(r.mask) + self.opt(r.before) + self.opt(r.after)
                    });
                    let read = self.buf(s.gy) + self.opt(s.before) + self.opt(s.argmax);
                    (read + relu, self.buf(s.gx))
                }
                // The padded gradient in; the caller's gradient out.
                Step::InputGrad(s) => (self.buf(s.g), self.caller()),
            };
            launches += 1;
            read_total += read;
            written_total += written;
        }
        let fit = |v: u128| {
            u64::try_from(v)
                .map_err(|_| Error::shape("the cost of this call does not fit 64-bit counts"))
        };
        Ok(PlanReport {
            chunks: 1,
            kernel_launches: launches,
            cudnn_calls: cudnn,
            kernel_bytes_read: fit(read_total)?,
            kernel_bytes_written: fit(written_total)?,
            conv_flops: fit(flops)?,
            gram_flops: fit(gram_flops)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::perceptual::{PerceptualConfig, PerceptualLoss, Tap};
    use crate::vgg::VggArch;

    fn loss(taps: &[&str], chunk: Option<usize>) -> PerceptualLoss {
        let config = PerceptualConfig {
            taps: taps.iter().map(|&t| Tap::from(t)).collect(),
            max_chunk_images: chunk,
            ..Default::default()
        };
        PerceptualLoss::seeded(VggArch::Vgg16, &config)
    }

    /// One 4x4 f32 pair tapped at relu1_1, by hand. Device buffers: the
    /// padded batch (2 x 8 x 16 values), conv1_1's pred and target outputs
    /// (64 x 16 each, split at full resolution), pred's ReLU mask (1024
    /// bits) and conv1_1's input gradient (8 x 16).
    #[test]
    fn a_small_call_costs_what_its_steps_add_up_to() {
        let r = loss(&["relu1_1"], None)
            .plan_report(Shape::new(1, 3, 4, 4), DType::F32, true)
            .unwrap();
        let act = 64 * 16 * 4; // one image's conv1_1 output, bytes
        let mask = 1024 / 8;
        // preprocess; bias+ReLU on pred (with mask) and on target; the
        // tap; ReLU backward; the input gradient.
        assert_eq!(r.kernel_launches, 6);
        // conv1_1 forward on each half, and its backward-data.
        assert_eq!(r.cudnn_calls, 3);
        // Those, and pl_vgg_publish.
        assert_eq!(r.graph_nodes(), 10);
        let read = 2 * 48 * 4 // the caller's pred and target
            + act + act       // bias+ReLU, in place, each half
            + 2 * act         // the tap reads both
            + act + mask      // ReLU backward: gradient and mask
            + 8 * 16 * 4; // the input gradient reads conv1_1's dx
        let written = 2 * 8 * 16 * 4 // the padded batch
            + act + mask + act       // bias+ReLU, the mask once
            + act                    // the tap's gradient
            + act                    // ReLU backward, in place
            + 48 * 4; // the caller's gradient
        assert_eq!(r.kernel_bytes_read, read as u64);
        assert_eq!(r.kernel_bytes_written, written as u64);
        // 2 * (64 x 8 x 3 x 3 multiply-adds per pixel, 16 pixels), over
        // each half forward and pred backward (8: the padded input).
        assert_eq!(r.conv_flops, 3 * 2 * 64 * 8 * 9 * 16);
        assert_eq!(r.chunks, 1);
    }

    #[test]
    fn forward_only_drops_the_backward_and_the_mask() {
        let l = loss(&["relu1_1"], None);
        let s = Shape::new(1, 3, 4, 4);
        let fwd = l.plan_report(s, DType::F32, false).unwrap();
        let both = l.plan_report(s, DType::F32, true).unwrap();
        assert_eq!(fwd.kernel_launches, 4);
        assert_eq!(fwd.cudnn_calls, 2);
        assert_eq!(both.conv_flops - fwd.conv_flops, 2 * 64 * 8 * 9 * 16);
        let act = 64 * 16 * 4;
        // No mask, no tap gradient, no backward passes.
        assert_eq!(fwd.kernel_bytes_written, (2 * 8 * 16 * 4 + 2 * act) as u64);
    }

    #[test]
    fn chunks_repeat_the_steps_of_one() {
        let s = Shape::new(3, 3, 16, 16);
        let chunked = loss(&["relu2_2"], Some(1))
            .plan_report(s, DType::F16, true)
            .unwrap();
        let one = loss(&["relu2_2"], None)
            .plan_report(Shape { n: 1, ..s }, DType::F16, true)
            .unwrap();
        assert_eq!(chunked.chunks, 3);
        assert_eq!(chunked.kernel_launches, 3 * one.kernel_launches);
        assert_eq!(chunked.cudnn_calls, 3 * one.cudnn_calls);
        assert_eq!(chunked.kernel_bytes_read, 3 * one.kernel_bytes_read);
        assert_eq!(chunked.conv_flops, 3 * one.conv_flops);
    }

    /// A huge batch costs one schedule per chunk size, not per chunk, and
    /// counts that do not fit 64 bits are an error, not a wrap.
    #[test]
    fn huge_batches_are_counted_at_once_or_refused() {
        let l = loss(&["relu1_1"], Some(1));
        let one = l
            .plan_report(Shape::new(1, 3, 4, 4), DType::F32, true)
            .unwrap();
        let n = 1 << 30;
        let many = l
            .plan_report(Shape::new(n, 3, 4, 4), DType::F32, true)
            .unwrap();
        assert_eq!(many.chunks, n);
        assert_eq!(many.kernel_launches, n * one.kernel_launches);
        assert_eq!(many.conv_flops, n as u64 * one.conv_flops);
        let e = l
            .plan_report(Shape::new(1 << 46, 3, 4, 4), DType::F32, true)
            .unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
    }

    #[test]
    fn the_floor_divides_by_the_card() {
        let r = PlanReport {
            chunks: 1,
            kernel_launches: 1,
            cudnn_calls: 0,
            kernel_bytes_read: 3_000,
            kernel_bytes_written: 1_000,
            conv_flops: 8_000,
            gram_flops: 300,
        };
        let card = Card {
            name: "test",
            bytes_per_s: 1_000.0,
            flops_per_s: 2_000.0,
            f32_flops_per_s: 100.0,
        };
        let floor = r.floor(&card);
        assert_eq!(
            (
                floor.memory_s,
                floor.compute_s,
                floor.gram_s,
                floor.total_s()
            ),
            (4.0, 4.0, 3.0, 11.0)
        );
    }

    /// A style tap at relu1_1 of one 4x4 pair, by hand: the Grams of both
    /// images (2 x 64 x 64 x 16 multiply-adds each) and pred's gradient
    /// (64 x 64 x 16); gram, gram distance and gram gradient launches.
    #[test]
    fn style_terms_count_their_grams() {
        let config = PerceptualConfig {
            taps: vec![],
            style_taps: vec![Tap::from("relu1_1")],
            ..Default::default()
        };
        let l = PerceptualLoss::seeded(VggArch::Vgg16, &config);
        let s = Shape::new(1, 3, 4, 4);
        let r = l.plan_report(s, DType::F32, true).unwrap();
        assert_eq!(r.gram_flops, 3 * 2 * 64 * 64 * 16);
        // preprocess, bias+ReLU per half, the three Gram steps, ReLU
        // backward, the input gradient.
        assert_eq!(r.kernel_launches, 8);
        let fwd = l.plan_report(s, DType::F32, false).unwrap();
        assert_eq!(fwd.gram_flops, 2 * 2 * 64 * 64 * 16);
    }

    /// The hand-derived call above against a kept target: one half of
    /// every forward pass, the tap reading the kept target's conv1_1 output.
    #[test]
    fn a_kept_target_costs_one_half_of_the_forward() {
        let l = loss(&["relu1_1"], None);
        let s = Shape::new(1, 3, 4, 4);
        let r = l.resident_plan_report(s, DType::F32, true).unwrap();
        let act = 64 * 16 * 4;
        let mask = 1024 / 8;
        // preprocess; bias+ReLU on pred; the tap; ReLU backward; the input
        // gradient. conv1_1 forward once, and its backward-data.
        assert_eq!((r.kernel_launches, r.cudnn_calls), (5, 2));
        let read = 48 * 4 + act + 2 * act + act + mask + 8 * 16 * 4;
        let written = 8 * 16 * 4 + act + mask + act + act + 48 * 4;
        assert_eq!(r.kernel_bytes_read, read as u64);
        assert_eq!(r.kernel_bytes_written, written as u64);
        let conv = 2 * 64 * 8 * 9 * 16;
        assert_eq!(r.conv_flops, 2 * conv);
        // With a style tap there too: what a kept call saves is the
        // target's input, bias+ReLU and Grams (its 64 x 64 f32 Grams are
        // read, not made); dL/dG is read as in a passed call.
        let config = PerceptualConfig {
            taps: vec![Tap::from("relu1_1")],
            style_taps: vec![Tap::from("relu1_1")],
            ..Default::default()
        };
        let style = PerceptualLoss::seeded(VggArch::Vgg16, &config);
        let passed = style.plan_report(s, DType::F32, true).unwrap();
        let kept = style.resident_plan_report(s, DType::F32, true).unwrap();
        let grams = 64 * 64 * 4;
        assert_eq!(
            passed.kernel_bytes_read - kept.kernel_bytes_read,
            (48 * 4 + act + act) as u64
        );
        assert_eq!(
            passed.kernel_bytes_written - kept.kernel_bytes_written,
            (8 * 16 * 4 + act + grams) as u64
        );
        // At the article's taps and a larger shape: the forward halves.
        let article = PerceptualLoss::seeded(VggArch::Vgg16, &PerceptualConfig::default());
        let s = Shape::new(2, 3, 32, 32);
        let flops = |kept: bool, grad: bool| match kept {
            true => article.resident_plan_report(s, DType::BF16, grad),
            false => article.plan_report(s, DType::BF16, grad),
        };
        let flops = |kept, grad| flops(kept, grad).unwrap().conv_flops;
        assert_eq!(2 * flops(true, false), flops(false, false));
        assert_eq!(flops(false, true) - flops(true, true), flops(true, false));
    }
}
