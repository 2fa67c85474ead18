//! The perceptual loss's GPU work as a list of steps: which pass reads and
//! writes which buffer. Pure data: `layout.rs` places the buffers in one
//! device allocation from their lifetimes, and `steps/` turns each step
//! into a kernel launch or a cuDNN call.
//!
//! Every tensor is its own buffer, written once (in-place passes keep
//! the buffer): the 2N batch [pred; target] activations in NHWC, the
//! pred half's gradients, ReLU masks, pool argmax and the gradients of
//! inner taps. `forward.rs` builds the forward steps, `backward.rs` the
//! backward ones from what the forward left; `steps.rs` defines each step.
//!
//! Against a kept target ([`Batch`]) the batch is one half: a forward over
//! the target alone keeps its tap features and Grams in buffers outside
//! the arena (the schedule's [`KeptSlot`]s), and later calls run over pred
//! alone, their taps reading those buffers.

mod backward;
mod forward;
mod steps;

pub(crate) use steps::*;

use super::super::config::PerceptualSpec;
use crate::error::Result;
use crate::vgg::{output_dims, Dims, Layer, INPUT_CHANNELS};

/// A buffer of the schedule, an index into [`Schedule::buffers`].
pub(crate) type Buf = usize;

/// How big a buffer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Size {
    /// Values in the compute dtype.
    Values(usize),
    /// Raw bytes (bit masks, argmax).
    Bytes(usize),
    /// Kept target slot k ([`Schedule::kept`]): memory of the kept target,
    /// not of the arena (0 bytes there).
    Kept(usize),
}

impl Size {
    /// Bytes in the arena.
    pub(crate) fn bytes(self, value_bytes: usize) -> usize {
        match self {
            Size::Values(n) => n * value_bytes,
            Size::Bytes(n) => n,
            Size::Kept(_) => 0,
        }
    }
}

/// What the batch of a call holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Batch {
    /// [pred; target]: a call with its target.
    Pairs,
    /// Pred alone: the taps read a kept target's slots.
    Pred,
    /// A target alone, forward only: its taps fill the kept slots.
    Target,
}

/// What a kept target holds of one tap layer, per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeptSlot {
    pub layer: usize,
    /// The layer's Grams (f32, C x C) rather than its features.
    pub grams: bool,
    pub per_image: Size,
}

/// Images of one buffer: those from `offset` (in values) on, `count` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Images {
    pub buf: Buf,
    pub offset: usize,
    pub count: usize,
}

/// The steps of one call and the buffers they use.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Schedule {
    pub steps: Vec<Step>,
    pub buffers: Vec<Size>,
    /// The kept target's slots a [`Batch::Pred`] call reads or a
    /// [`Batch::Target`] one writes, in tap order (the same for both).
    pub kept: Vec<KeptSlot>,
}

impl Schedule {
    fn buffer(&mut self, size: Size) -> Buf {
        self.buffers.push(size);
        self.buffers.len() - 1
    }

    /// The buffer of a new kept slot.
    fn kept_slot(&mut self, slot: KeptSlot) -> Buf {
        self.kept.push(slot);
        self.buffer(Size::Kept(self.kept.len() - 1))
    }
}

/// The activation dims the device sees: the padded input, and the output
/// of every layer up to the deepest tap, per image.
struct Shapes {
    input: Dims,
    out: Vec<Dims>,
}

impl Shapes {
    fn new(layers: &[Layer], h: usize, w: usize) -> Self {
        let input = (INPUT_CHANNELS, h, w);
        Shapes {
            input,
            out: output_dims(layers, input),
        }
    }

    /// The input dims of layer `layer`.
    fn input(&self, layer: usize) -> Dims {
        match layer {
            0 => self.input,
            _ => self.out[layer - 1],
        }
    }
}

/// Values of `images` images of `dims`.
fn values((c, h, w): Dims, images: usize) -> Size {
    Size::Values(images * c * h * w)
}

/// Output dims of every layer, for one image of `h` x `w` as the device
/// sees it (the input padded to [`INPUT_CHANNELS`]).
pub(crate) fn layer_dims(layers: &[Layer], h: usize, w: usize) -> Vec<Dims> {
    Shapes::new(layers, h, w).out
}

/// The steps of one call over `n` images (or image pairs) of `h` x `w`
/// in a `batch`. `accumulate`: the loss already holds an earlier chunk's
/// share, so every tap adds to it.
///
/// Without the gradient the steps are the same forward steps using fewer
/// buffers, numbered as with it: one layout serves both. A target's
/// forward ([`Batch::Target`]) has no gradient.
pub(crate) fn build(
    layers: &[Layer],
    spec: &PerceptualSpec,
    batch: Batch,
    (n, h, w): (usize, usize, usize),
    want_grad: bool,
    accumulate: bool,
) -> Result<Schedule> {
    let layers = &layers[..=spec.deepest()];
    let shapes = Shapes::new(layers, h, w);
    let mut s = Schedule::default();
    let want_grad = want_grad && batch != Batch::Target;
    let kept = forward::build(
        &mut s,
        layers,
        spec,
        &shapes,
        (batch, n),
        want_grad,
        accumulate,
    );
    if want_grad {
        backward::build(&mut s, layers, &shapes, n, kept)?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::perceptual::{PerceptualConfig, PerceptualLoss, Tap};
    use crate::vgg::VggArch;

    fn article_loss() -> PerceptualLoss {
        PerceptualLoss::seeded(VggArch::Vgg16, &PerceptualConfig::default())
    }

    fn steps_of(loss: &PerceptualLoss, nhw: (usize, usize, usize), want_grad: bool) -> Vec<Step> {
        build(
            loss.vgg().layers(),
            loss.spec(),
            Batch::Pairs,
            nhw,
            want_grad,
            false,
        )
        .unwrap()
        .steps
    }

    #[test]
    fn forward_only_keeps_nothing_for_backward() {
        let loss = article_loss();
        forward_only_keeps_nothing(&steps_of(&loss, (1, 16, 16), false), 4);
        let style = PerceptualConfig {
            style_taps: vec![Tap::from("relu1_2"), Tap::from("relu4_3")],
            ..Default::default()
        };
        let loss = PerceptualLoss::seeded(VggArch::Vgg16, &style);
        let steps = steps_of(&loss, (1, 16, 16), false);
        forward_only_keeps_nothing(&steps, 4);
        assert_eq!(count(&steps, |s| matches!(s, Step::GramLoss(_))), 2);
    }

    fn forward_only_keeps_nothing(steps: &[Step], perceptual_taps: usize) {
        let no_grad = |t: &TapTerm| t.grad.is_none();
        for step in steps {
            let keeps = match step {
                Step::BiasAct(s) => s.mask.is_some(),
                Step::BiasActPool(s) => s.mask.is_some() || s.argmax.is_some(),
                Step::Pool(s) => s.argmax.is_some(),
                Step::BiasActPoolTap(s) => {
                    s.mask.is_some() || s.argmax.is_some() || !no_grad(&s.tap)
                }
                Step::TapLoss(s) => !no_grad(&s.tap),
                Step::GramLoss(s) => !no_grad(&s.tap),
                Step::GramBackward(_)
                | Step::ReluBackward(_)
                | Step::Unpool(_)
                | Step::ConvBackwardData(_)
                | Step::InputGrad(_) => panic!("{step:?} in a forward-only call"),
                _ => false,
            };
            assert!(
                !keeps,
                "{step:?} keeps data for backward in a forward-only call"
            );
        }
        let taps = |s: &Step| matches!(s, Step::TapLoss(_) | Step::BiasActPoolTap(_));
        assert_eq!(count(steps, taps), perceptual_taps);
    }

    fn count(steps: &[Step], f: impl Fn(&Step) -> bool) -> usize {
        steps.iter().filter(|s| f(s)).count()
    }

    #[test]
    fn relu_and_pool_run_as_one_pass_where_the_pool_covers_every_pixel() {
        let loss = article_loss();
        let tapped_pool = |s: &Step| matches!(s, Step::BiasActPoolTap(_));
        // 16x16: pool1..pool3 inputs are 16, 8 and 4 wide: each tapped ReLU
        // runs with its pool and tap; only relu4_3's tap runs alone.
        let steps = steps_of(&loss, (2, 16, 16), true);
        assert_eq!(count(&steps, tapped_pool), 3);
        assert_eq!(count(&steps, |s| matches!(s, Step::TapLoss(_))), 1);
        assert_eq!(count(&steps, |s| matches!(s, Step::Pool(_))), 0);
        // Backward: every unpool carries the ReLU before it; the other
        // seven of the ten ReLUs run alone.
        let fused_unpool = |s: &Step| matches!(s, Step::Unpool(u) if u.relu.is_some());
        assert_eq!(count(&steps, fused_unpool), 3);
        assert_eq!(
            count(&steps, |s| matches!(s, Step::ReluBackward(_))),
            10 - 3
        );
        // 20x28: pool3's input is 5x7, so it runs after a plain bias+ReLU
        // and its own tap.
        let steps = steps_of(&loss, (1, 20, 28), true);
        assert_eq!(count(&steps, tapped_pool), 2);
        assert_eq!(count(&steps, |s| matches!(s, Step::Pool(_))), 1);
        assert_eq!(count(&steps, |s| matches!(s, Step::TapLoss(_))), 2);
        // Untapped ReLUs before pools: the plain fused pass, once per half
        // at full resolution.
        let taps = PerceptualConfig {
            taps: vec![Tap::from("relu3_1")],
            ..Default::default()
        };
        let loss = PerceptualLoss::seeded(VggArch::Vgg16, &taps);
        let steps = steps_of(&loss, (1, 16, 16), true);
        assert_eq!(count(&steps, |s| matches!(s, Step::BiasActPool(_))), 3);
        assert_eq!(count(&steps, tapped_pool), 0);
    }

    #[test]
    fn a_style_tap_keeps_its_layer_output_for_the_grams() {
        // relu1_2 with a style tap: bias+ReLU alone, the tap, then the
        // pool; its gradient is its own buffer, added to by the Grams'.
        let style = PerceptualConfig {
            style_taps: vec![Tap::from("relu1_2")],
            ..Default::default()
        };
        let loss = PerceptualLoss::seeded(VggArch::Vgg16, &style);
        let steps = steps_of(&loss, (1, 16, 16), true);
        assert_eq!(count(&steps, |s| matches!(s, Step::BiasActPoolTap(_))), 2);
        let at = steps
            .iter()
            .position(|s| matches!(s, Step::Gram(g) if g.layer == 3))
            .unwrap();
        assert!(matches!(&steps[at - 1], Step::TapLoss(t) if t.layer == 3));
        let Step::TapLoss(tap) = &steps[at - 1] else {
            unreachable!()
        };
        assert!(matches!(&steps[at + 1], Step::GramLoss(_)));
        let Step::GramBackward(back) = &steps[at + 2] else {
            panic!("no gram backward after {:?}", steps[at + 1]);
        };
        assert!(back.accumulate && Some(back.grad) == tap.tap.grad);
        assert_ne!(
            Some(tap.pred.buf),
            tap.tap.grad,
            "not written over the features"
        );
        assert!(matches!(&steps[at + 3], Step::Pool(p) if p.layer == 4));
    }

    #[test]
    fn a_kept_target_halves_the_forward() {
        // Perceptual taps fused with pools, a pre-activation tap, and Grams.
        let config = PerceptualConfig {
            taps: vec![
                Tap::from("relu1_2"),
                Tap::from("conv2_1"),
                Tap::from("relu3_3"),
            ],
            style_taps: vec![Tap::from("relu2_2"), Tap::from("relu3_3")],
            ..Default::default()
        };
        let loss = PerceptualLoss::seeded(VggArch::Vgg16, &config);
        let (layers, spec) = (loss.vgg().layers(), loss.spec());
        let of = |batch| build(layers, spec, batch, (3, 16, 16), true, false).unwrap();
        let (pairs, pred, target) = (of(Batch::Pairs), of(Batch::Pred), of(Batch::Target));
        let conv_images = |s: &Schedule| -> usize {
            (s.steps.iter())
                .map(|s| match s {
                    Step::ConvForward(c) => c.x.count,
                    _ => 0,
                })
                .sum()
        };
        assert_eq!(conv_images(&pred), conv_images(&pairs) / 2);
        assert_eq!(conv_images(&target), conv_images(&pred));
        // Both list the same slots: features of each perceptual tap, then
        // the Grams of each style tap, layer by layer.
        assert_eq!(pred.kept, target.kept);
        let slots: Vec<(usize, bool)> = pred.kept.iter().map(|k| (k.layer, k.grams)).collect();
        assert_eq!(
            slots,
            [(3, false), (5, false), (8, true), (15, false), (15, true)]
        );
        assert!(pairs.kept.is_empty());
        // The target's forward keeps nothing for backward and has no loss.
        assert!(target.steps.iter().all(|s| match s {
            Step::BiasAct(b) => b.mask.is_none(),
            Step::BiasActPool(b) => b.mask.is_none() && b.argmax.is_none(),
            Step::Pool(p) => p.argmax.is_none(),
            Step::Preprocess(p) => !p.pairs,
            Step::ConvForward(_) | Step::Gram(_) | Step::Keep(_) => true,
            _ => false,
        }));
        assert_eq!(count(&target.steps, |s| matches!(s, Step::Keep(_))), 3);
        // Pred's relu1_2 tap stays fused with its pool, reading the kept
        // ReLU output.
        let fused = |s: &Step| matches!(s, Step::BiasActPoolTap(t) if t.y_target.is_none());
        assert_eq!(count(&pred.steps, fused), 1);
    }

    #[test]
    fn timeline_labels_name_the_layers() {
        let loss = article_loss();
        let layers = loss.vgg().layers();
        let labels: Vec<String> = steps_of(&loss, (2, 16, 16), true)
            .iter()
            .map(|s| s.label(layers))
            .collect();
        for want in [
            "preprocess",
            "forward conv1_1",
            "forward relu1_2+pool1, tap relu1_2",
            "tap relu4_3",
            "backward relu4_3",
            "backward pool1+relu1_2",
            "backward conv1_1",
            "input gradient",
        ] {
            assert!(
                labels.iter().any(|l| l == want),
                "no {want:?} in {labels:?}"
            );
        }
    }
}
