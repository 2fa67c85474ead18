//! The step types of a schedule, one struct per kind of pass: what it
//! reads and writes, and its name on a timeline. Each is launched by its
//! own function in `steps/` (one kernel of `kernels/vgg.cu`, or one cuDNN
//! call). Layers are named by their torchvision index; a `bias` names the
//! convolution layer whose bias a step adds.

use super::{Buf, Images};
use crate::vgg::{Dims, Layer};

/// Caller pred and target (`pairs`), or the one input alone -> `out`,
/// normalised and channel-padded (`pl_vgg_preprocess`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Preprocess {
    pub out: Buf,
    pub pairs: bool,
}

/// `x` -> `y` through convolution `layer` (no bias; cuDNN).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConvForward {
    pub layer: usize,
    pub x: Images,
    pub y: Images,
}

/// In place on `x` (its first `pred` images are pred images): + the bias
/// of `bias`, then ReLU if `relu`; the pred images' mask into `mask`
/// (`pl_vgg_bias_act`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BiasAct {
    pub layer: usize,
    pub x: Images,
    pub pred: usize,
    pub bias: Option<usize>,
    pub relu: bool,
    pub mask: Option<Buf>,
    pub dims: Dims,
}

/// ReLU layer `layer` and the pooling after it in one pass over `x` (of
/// `input` dims, its first `pred` images pred images): + the bias of
/// `bias`, ReLU, the pred mask, then `y` and the pred argmax
/// (`pl_vgg_bias_act_pool`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BiasActPool {
    pub layer: usize,
    pub x: Images,
    pub y: Images,
    pub pred: usize,
    pub bias: Option<usize>,
    pub mask: Option<Buf>,
    pub argmax: Option<Buf>,
    pub input: Dims,
}

/// A tapped ReLU layer, the pooling after it and the tap in one pass: as
/// [`BiasActPool`] on the `pred` and `target` images (into `y_pred` and
/// `y_target`), with the tap taken on the ReLU output
/// (`pl_vgg_bias_act_pool_tap`). Without `y_target`, `target` is a kept
/// target's ReLU output, read as it is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BiasActPoolTap {
    pub layer: usize,
    pub pred: Images,
    pub target: Images,
    pub y_pred: Images,
    pub y_target: Option<Images>,
    pub bias: Option<usize>,
    pub mask: Option<Buf>,
    pub argmax: Option<Buf>,
    pub input: Dims,
    pub tap: TapTerm,
}

/// Pool layer `layer`: `x` (of `input` dims) -> `y`, the pred images'
/// argmax into `argmax` (`pl_vgg_pool`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Pool {
    pub layer: usize,
    pub x: Images,
    pub y: Images,
    pub pred: usize,
    pub argmax: Option<Buf>,
    pub input: Dims,
}

/// The distance between `pred` and `target` (of `dims`) at tap `layer`
/// (`pl_vgg_tap_loss`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TapLoss {
    pub layer: usize,
    pub pred: Images,
    pub target: Images,
    pub dims: Dims,
    pub tap: TapTerm,
}

/// In place on `g` through ReLU layer `layer`: g = (g + `relu.before`) *
/// `relu.mask` + `relu.after` (`pl_vgg_relu_backward`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReluBackward {
    pub layer: usize,
    pub g: Buf,
    pub relu: ReluGrad,
    pub dims: Dims,
}

/// `gy` (+ `before`) -> `gx` of `input` dims through pool layer `layer`,
/// and through the ReLU before it when `relu` is set (`pl_vgg_unpool`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Unpool {
    pub layer: usize,
    pub gy: Buf,
    pub gx: Buf,
    pub before: Option<Buf>,
    pub argmax: Option<Buf>,
    pub relu: Option<ReluGrad>,
    pub input: Dims,
}

/// The Gram matrices (f32, [2n][C][C] in `out`: pred's, then target's) of
/// the `pred` and `target` images of `dims` at style tap `layer`, or of
/// the `pred` images alone (`pl_vgg_gram`); with more than one slice along
/// the pixels, through the partial sums in `partial` (`pl_vgg_gram_sum`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Gram {
    pub layer: usize,
    pub pred: Images,
    pub target: Option<Images>,
    pub dims: Dims,
    pub slices: usize,
    pub partial: Option<Buf>,
    pub out: Buf,
}

/// The style distance between the pred Grams in `grams` (C x C each) and
/// the target's, after them or in a kept slot `target`, at tap `layer`;
/// the gradient, when wanted, overwrites the pred Grams
/// (`pl_vgg_tap_loss` in f32).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GramLoss {
    pub layer: usize,
    pub grams: Buf,
    pub target: Option<Buf>,
    pub c: usize,
    pub tap: TapTerm,
}

/// A target's features `x` (of `dims`) at tap `layer` copied into its
/// kept slot `into` (`pl_vgg_copy`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Keep {
    pub layer: usize,
    pub x: Images,
    pub dims: Dims,
    pub into: Buf,
}

/// dL/dF at style tap `layer` from dL/dG (the first n Grams of `e`) and
/// the pred features `x` of `dims`, into `grad`, or added to it when
/// `accumulate` (a perceptual tap there wrote it) (`pl_vgg_gram_backward`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GramBackward {
    pub layer: usize,
    pub e: Buf,
    pub x: Images,
    pub dims: Dims,
    pub grad: Buf,
    pub accumulate: bool,
}

/// `dy` -> `dx` through convolution `layer`, transposed, over the pred
/// half (cuDNN backward-data).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConvBackwardData {
    pub layer: usize,
    pub dy: Buf,
    pub dx: Buf,
}

/// `g` -> the caller's gradient, through the normalisation
/// (`pl_vgg_input_grad`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InputGrad {
    pub g: Buf,
}

/// One tap's term of the loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TapTerm {
    /// Where its gradient goes (the pred images' own buffer when the tap
    /// is their last reader), when the gradient is wanted.
    pub grad: Option<Buf>,
    /// Tap weight times the overall weight.
    pub weight: f64,
    /// Add to the loss (an earlier tap or chunk wrote it).
    pub accumulate: bool,
    /// The first tap of this call, which writes the per-image values.
    pub first: bool,
    /// The loss part it adds to: 0 perceptual, 1 style (when the call
    /// asks for parts, each part has its own sum).
    pub part: usize,
    /// Add to its part (an earlier tap of that part, or chunk, wrote it).
    pub part_accumulate: bool,
    /// A Fro term's gradient scale (one f32) between its two launches.
    pub norm: Option<Buf>,
}

/// A ReLU's backward folded into the pass after it: g = (g + `before`) *
/// `mask` + `after`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ReluGrad {
    pub before: Option<Buf>,
    pub mask: Buf,
    pub after: Option<Buf>,
}

/// One step of a schedule.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    Preprocess(Preprocess),
    ConvForward(ConvForward),
    BiasAct(BiasAct),
    BiasActPool(BiasActPool),
    BiasActPoolTap(BiasActPoolTap),
    Pool(Pool),
    TapLoss(TapLoss),
    Gram(Gram),
    GramLoss(GramLoss),
    GramBackward(GramBackward),
    Keep(Keep),
    ReluBackward(ReluBackward),
    Unpool(Unpool),
    ConvBackwardData(ConvBackwardData),
    InputGrad(InputGrad),
}

/// `$body` with `$s` bound to the step struct inside `$step`, whatever
/// its kind.
macro_rules! on_step {
    ($step:expr, $s:ident => $body:expr) => {
        match $step {
            Step::Preprocess($s) => $body,
            Step::ConvForward($s) => $body,
            Step::BiasAct($s) => $body,
            Step::BiasActPool($s) => $body,
            Step::BiasActPoolTap($s) => $body,
            Step::Pool($s) => $body,
            Step::TapLoss($s) => $body,
            Step::Gram($s) => $body,
            Step::GramLoss($s) => $body,
            Step::GramBackward($s) => $body,
            Step::Keep($s) => $body,
            Step::ReluBackward($s) => $body,
            Step::Unpool($s) => $body,
            Step::ConvBackwardData($s) => $body,
            Step::InputGrad($s) => $body,
        }
    };
}
pub(crate) use on_step;

/// What every step type says about itself.
pub(crate) trait StepInfo {
    /// What the step does, whatever the layer (for step timings).
    const KIND: &'static str;
    /// Every buffer the step reads or writes.
    fn buffers(&self) -> Vec<Buf>;
    /// The step's name on a timeline: its direction and layer names.
    fn label(&self, layers: &[Layer]) -> String;
}

impl Step {
    pub(crate) fn kind(&self) -> &'static str {
        fn kind_of<S: StepInfo>(_: &S) -> &'static str {
            S::KIND
        }
        on_step!(self, s => kind_of(s))
    }

    pub(crate) fn buffers(&self) -> Vec<Buf> {
        on_step!(self, s => s.buffers())
    }

    pub(crate) fn label(&self, layers: &[Layer]) -> String {
        on_step!(self, s => s.label(layers))
    }
}

/// The buffers among `bufs` that are present.
fn present<const K: usize>(bufs: [Option<Buf>; K]) -> Vec<Buf> {
    bufs.into_iter().flatten().collect()
}

fn name(layers: &[Layer], layer: usize) -> &str {
    layers[layer].name.as_str()
}

impl StepInfo for Preprocess {
    const KIND: &'static str = "preprocess";
    fn buffers(&self) -> Vec<Buf> {
        vec![self.out]
    }
    fn label(&self, _: &[Layer]) -> String {
        "preprocess".into()
    }
}

impl StepInfo for ConvForward {
    const KIND: &'static str = "conv forward";
    fn buffers(&self) -> Vec<Buf> {
        vec![self.x.buf, self.y.buf]
    }
    fn label(&self, layers: &[Layer]) -> String {
        format!("forward {}", name(layers, self.layer))
    }
}

impl StepInfo for BiasAct {
    const KIND: &'static str = "bias+relu";
    fn buffers(&self) -> Vec<Buf> {
        present([Some(self.x.buf), self.mask])
    }
    fn label(&self, layers: &[Layer]) -> String {
        format!("forward {}", name(layers, self.layer))
    }
}

impl StepInfo for BiasActPool {
    const KIND: &'static str = "bias+relu+pool";
    fn buffers(&self) -> Vec<Buf> {
        present([Some(self.x.buf), Some(self.y.buf), self.mask, self.argmax])
    }
    fn label(&self, layers: &[Layer]) -> String {
        let l = self.layer;
        format!("forward {}+{}", name(layers, l), name(layers, l + 1))
    }
}

impl StepInfo for BiasActPoolTap {
    const KIND: &'static str = "bias+relu+pool+tap";
    fn buffers(&self) -> Vec<Buf> {
        present([
            Some(self.pred.buf),
            Some(self.target.buf),
            Some(self.y_pred.buf),
            self.y_target.map(|y| y.buf),
            self.mask,
            self.argmax,
            self.tap.grad,
            self.tap.norm,
        ])
    }
    fn label(&self, layers: &[Layer]) -> String {
        let (relu, pool) = (name(layers, self.layer), name(layers, self.layer + 1));
        format!("forward {relu}+{pool}, tap {relu}")
    }
}

impl StepInfo for Pool {
    const KIND: &'static str = "pool";
    fn buffers(&self) -> Vec<Buf> {
        present([Some(self.x.buf), Some(self.y.buf), self.argmax])
    }
    fn label(&self, layers: &[Layer]) -> String {
        format!("forward {}", name(layers, self.layer))
    }
}

impl StepInfo for TapLoss {
    const KIND: &'static str = "tap";
    fn buffers(&self) -> Vec<Buf> {
        present([
            Some(self.pred.buf),
            Some(self.target.buf),
            self.tap.grad,
            self.tap.norm,
        ])
    }
    fn label(&self, layers: &[Layer]) -> String {
        format!("tap {}", name(layers, self.layer))
    }
}

impl StepInfo for Gram {
    const KIND: &'static str = "gram";
    fn buffers(&self) -> Vec<Buf> {
        present([
            Some(self.pred.buf),
            self.target.map(|t| t.buf),
            self.partial,
            Some(self.out),
        ])
    }
    fn label(&self, layers: &[Layer]) -> String {
        format!("gram {}", name(layers, self.layer))
    }
}

impl StepInfo for GramLoss {
    const KIND: &'static str = "style tap";
    fn buffers(&self) -> Vec<Buf> {
        present([Some(self.grams), self.target, self.tap.norm])
    }
    fn label(&self, layers: &[Layer]) -> String {
        format!("style tap {}", name(layers, self.layer))
    }
}

impl StepInfo for GramBackward {
    const KIND: &'static str = "gram backward";
    fn buffers(&self) -> Vec<Buf> {
        vec![self.e, self.x.buf, self.grad]
    }
    fn label(&self, layers: &[Layer]) -> String {
        format!("style gradient {}", name(layers, self.layer))
    }
}

impl StepInfo for Keep {
    const KIND: &'static str = "keep";
    fn buffers(&self) -> Vec<Buf> {
        vec![self.x.buf, self.into]
    }
    fn label(&self, layers: &[Layer]) -> String {
        format!("keep {}", name(layers, self.layer))
    }
}

impl StepInfo for ReluBackward {
    const KIND: &'static str = "relu backward";
    fn buffers(&self) -> Vec<Buf> {
        let r = self.relu;
        present([Some(self.g), r.before, Some(r.mask), r.after])
    }
    fn label(&self, layers: &[Layer]) -> String {
        format!("backward {}", name(layers, self.layer))
    }
}

impl StepInfo for Unpool {
    const KIND: &'static str = "unpool";
    fn buffers(&self) -> Vec<Buf> {
        let relu = self.relu;
        present([
            Some(self.gy),
            Some(self.gx),
            self.before,
            self.argmax,
            relu.and_then(|r| r.before),
            relu.map(|r| r.mask),
            relu.and_then(|r| r.after),
        ])
    }
    fn label(&self, layers: &[Layer]) -> String {
        let pool = name(layers, self.layer);
        match self.relu {
            None => format!("backward {pool}"),
            Some(_) => format!("backward {pool}+{}", name(layers, self.layer - 1)),
        }
    }
}

impl StepInfo for ConvBackwardData {
    const KIND: &'static str = "conv backward-data";
    fn buffers(&self) -> Vec<Buf> {
        vec![self.dy, self.dx]
    }
    fn label(&self, layers: &[Layer]) -> String {
        format!("backward {}", name(layers, self.layer))
    }
}

impl StepInfo for InputGrad {
    const KIND: &'static str = "input gradient";
    fn buffers(&self) -> Vec<Buf> {
        vec![self.g]
    }
    fn label(&self, _: &[Layer]) -> String {
        "input gradient".into()
    }
}
