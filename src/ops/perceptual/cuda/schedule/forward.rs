//! The forward steps: preprocessing, then each layer of the network up to
//! the deepest tap over the 2N batch [pred; target], fusing a ReLU with
//! the pool after it (and with its tap) where the pool covers every pixel.
//! A style tap's Grams, their distance and its feature gradient follow its
//! layer (and its perceptual tap): the layer's output is then stored, not
//! fused into the pool, since the Grams read it.
//!
//! Against a kept target the batch is one half ([`Batch`]): pred, whose
//! taps read the kept slots, or the target, whose taps copy their layer's
//! output (and Grams) into them.

use super::steps::*;
use super::{values, Batch, Buf, Images, KeptSlot, Schedule, Shapes, Size};
use crate::ops::feature::Criterion;
use crate::ops::perceptual::config::PerceptualSpec;
use crate::vgg::{Dims, Layer, Module, Pooling};

/// What the forward steps leave for the backward ones, by layer.
pub(super) struct Kept {
    /// The gradient buffer of the deepest tap, where backward starts.
    pub deepest_grad: Option<Buf>,
    /// A ReLU layer's mask, a max-pool layer's argmax.
    pub saved: Vec<Option<Buf>>,
    /// The gradient of an inner tap at a layer's output.
    pub tap_grads: Vec<Option<Buf>>,
}

/// A forward activation: the 2N batch [pred; target] in one buffer, or
/// its halves in two. Full-resolution layers are split, so that the input
/// and output of a convolution there are never both whole: at 256x256 each
/// half of a 64-channel activation is as large as all of a later block's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Joint(Buf),
    Split(Buf, Buf),
}

impl Act {
    /// The pred images (`n` of `per_image` values each).
    fn pred(self, n: usize) -> Images {
        let (Act::Joint(buf) | Act::Split(buf, _)) = self;
        Images {
            buf,
            offset: 0,
            count: n,
        }
    }

    fn target(self, n: usize, per_image: usize) -> Images {
        match self {
            Act::Joint(buf) => Images {
                buf,
                offset: n * per_image,
                count: n,
            },
            Act::Split(_, buf) => Images {
                buf,
                offset: 0,
                count: n,
            },
        }
    }

    /// The passes an elementwise step takes: (images, how many of them are
    /// pred images, which come first).
    fn parts(self, n: usize, per_image: usize) -> Vec<(Images, usize)> {
        match self {
            Act::Joint(buf) => vec![(
                Images {
                    buf,
                    offset: 0,
                    count: 2 * n,
                },
                n,
            )],
            Act::Split(..) => vec![(self.pred(n), n), (self.target(n, per_image), 0)],
        }
    }
}

/// A ReLU layer and its pool waiting for their tap, to run as one step.
struct PendingTap {
    layer: usize,
    y: Buf,
    bias: Option<usize>,
    mask: Option<Buf>,
    argmax: Option<Buf>,
}

/// Whether a ReLU layer of `dims` and the pool after it run as one pass:
/// the pool must cover every pixel (the fused pass writes the ReLU's mask
/// only where a window reads).
fn fuses_with_pool((_, h, w): Dims) -> bool {
    h % 2 == 0 && w % 2 == 0
}

fn per_image((c, h, w): Dims) -> usize {
    c * h * w
}

/// `count` images of `dims` from image `first` of `buf`.
fn images(buf: Buf, first: usize, count: usize, dims: Dims) -> Images {
    Images {
        buf,
        offset: first * per_image(dims),
        count,
    }
}

/// The forward builder's state while it walks the layers.
struct Forward<'a> {
    s: &'a mut Schedule,
    layers: &'a [Layer],
    spec: &'a PerceptualSpec,
    shapes: &'a Shapes,
    batch: Batch,
    /// Pred images (or, for [`Batch::Target`], target images).
    n: usize,
    want_grad: bool,
    accumulate: bool,
    /// The current activation.
    cur: Act,
    /// Layers before this one run on split halves.
    first_pool: usize,
    saved: Vec<Option<Buf>>,
    tap_grads: Vec<Option<Buf>>,
    /// No tap has run yet.
    first_tap: bool,
    /// No tap of the perceptual (0) or style (1) part has run yet.
    first_of_part: [bool; 2],
    /// The output of a pool already run with the ReLU before it.
    fused_pool: Option<Buf>,
    /// A tapped ReLU and its pool, run with the tap.
    pending: Option<PendingTap>,
    deepest_grad: Option<Buf>,
}

/// Appends the forward steps to `s`; returns what backward needs.
pub(super) fn build(
    s: &mut Schedule,
    layers: &[Layer],
    spec: &PerceptualSpec,
    shapes: &Shapes,
    (batch, n): (Batch, usize),
    want_grad: bool,
    accumulate: bool,
) -> Kept {
    let pairs = batch == Batch::Pairs;
    let input = s.buffer(values(shapes.input, if pairs { 2 * n } else { n }));
    s.steps
        .push(Step::Preprocess(Preprocess { out: input, pairs }));
    let mut f = Forward {
        s,
        layers,
        spec,
        shapes,
        batch,
        n,
        want_grad,
        accumulate,
        cur: Act::Joint(input),
        first_pool: layers
            .iter()
            .position(|l| l.module == Module::Pool)
            .unwrap_or(layers.len()),
        saved: vec![None; layers.len()],
        tap_grads: vec![None; layers.len()],
        first_tap: true,
        first_of_part: [true; 2],
        fused_pool: None,
        pending: None,
        deepest_grad: None,
    };
    for layer in layers {
        match layer.module {
            Module::Conv { .. } => f.conv(layer.index),
            Module::Relu => f.relu(layer.index),
            Module::Pool => f.pool(layer.index),
        }
        if let Some(weight) = spec.tap_weight(layer.index) {
            f.tap(layer.index, weight);
        }
        if let Some(weight) = spec.style_weight_at(layer.index) {
            f.style(layer.index, weight);
        }
    }
    Kept {
        deepest_grad: f.deepest_grad,
        saved: f.saved,
        tap_grads: f.tap_grads,
    }
}

/// Pixels per slice of a Gram's sum: a tile of a large map is split into
/// runs this long, summed apart then in order (fixed, so the bits depend
/// on the shape only).
pub(crate) const GRAM_ROWS: usize = 2048;

impl Forward<'_> {
    /// A perceptual or style tap: the layer's output is compared.
    fn is_tap(&self, layer: usize) -> bool {
        self.spec.tap_weight(layer).is_some() || self.is_style(layer)
    }

    fn is_style(&self, layer: usize) -> bool {
        self.spec.style_weight_at(layer).is_some()
    }

    /// Images in the batch: both halves, or one.
    fn images(&self) -> usize {
        match self.batch {
            Batch::Pairs => 2 * self.n,
            Batch::Pred | Batch::Target => self.n,
        }
    }

    /// The passes an elementwise step over the current activation (of
    /// `dims`) takes, as [`Act::parts`].
    fn parts(&self, dims: Dims) -> Vec<(Images, usize)> {
        match self.batch {
            Batch::Pairs => self.cur.parts(self.n, per_image(dims)),
            Batch::Pred | Batch::Target => vec![(self.cur.pred(self.n), self.n)],
        }
    }

    /// The target images at tap `layer` (of `dims`): the batch's second
    /// half, or the kept slot of the layer's features or Grams.
    fn kept_slot(&mut self, layer: usize, grams: bool, dims: Dims) -> Images {
        let (c, _, _) = dims;
        let per_image = match grams {
            true => Size::Bytes(c * c * 4),
            false => values(dims, 1),
        };
        let buf = self.s.kept_slot(KeptSlot {
            layer,
            grams,
            per_image,
        });
        Images {
            buf,
            offset: 0,
            count: self.n,
        }
    }

    fn conv(&mut self, layer: usize) {
        let (n, dims) = (self.n, self.shapes.out[layer]);
        let cur = self.cur;
        let (x_pred, x_target) = (
            cur.pred(n),
            cur.target(n, per_image(self.shapes.input(layer))),
        );
        if layer < self.first_pool && self.batch == Batch::Pairs {
            let p = self.s.buffer(values(dims, n));
            let t = self.s.buffer(values(dims, n));
            for (x, y) in [(x_pred, p), (x_target, t)] {
                let y = images(y, 0, n, dims);
                self.s
                    .steps
                    .push(Step::ConvForward(ConvForward { layer, x, y }));
            }
            self.cur = Act::Split(p, t);
        } else {
            // After the first pool every activation is joint (a batch of
            // one half always is).
            debug_assert!(matches!(cur, Act::Joint(_)));
            let count = self.images();
            let y = self.s.buffer(values(dims, count));
            let x = Images { count, ..x_pred };
            let y = images(y, 0, count, dims);
            self.s
                .steps
                .push(Step::ConvForward(ConvForward { layer, x, y }));
            self.cur = Act::Joint(y.buf);
        }
        if self.is_tap(layer) {
            // A pre-activation tap: the bias now, the ReLU after the tap.
            for (x, pred) in self.parts(dims) {
                self.s.steps.push(Step::BiasAct(BiasAct {
                    layer,
                    x,
                    pred,
                    bias: Some(layer),
                    relu: false,
                    mask: None,
                    dims,
                }));
            }
        }
    }

    fn relu(&mut self, layer: usize) {
        let (n, dims) = (self.n, self.shapes.out[layer]);
        // The bias of the convolution before, unless its tap added it.
        let bias = match self.layers[layer - 1].module {
            Module::Conv { .. } if !self.is_tap(layer - 1) => Some(layer - 1),
            _ => None,
        };
        let (c, h, w) = dims;
        // A target's forward keeps nothing for backward.
        let mask = (self.batch != Batch::Target)
            .then(|| self.s.buffer(Size::Bytes((n * c * h * w).div_ceil(32) * 4)));
        self.saved[layer] = mask;
        let pool_next = self
            .layers
            .get(layer + 1)
            .is_some_and(|l| l.module == Module::Pool);
        let want_grad = self.want_grad;
        // Only an elementwise perceptual tap runs in the fused pass (Fro's
        // norm needs a second pass).
        // A target's forward keeps the ReLU's output, which the fused pass
        // does not store.
        let elementwise = self.spec.lpips.is_none()
            && self.spec.criterion != Criterion::Fro
            && self.batch != Batch::Target;
        let own_tap = self.is_style(layer) || (!elementwise && self.is_tap(layer));
        if !(pool_next && fuses_with_pool(dims)) || own_tap {
            for (x, pred) in self.parts(dims) {
                self.s.steps.push(Step::BiasAct(BiasAct {
                    layer,
                    x,
                    pred,
                    bias,
                    relu: true,
                    mask: mask.filter(|_| want_grad && pred > 0),
                    dims,
                }));
            }
            return;
        }
        // The pool's step is this one (with the tap, when there is one);
        // the pool layer then only moves `cur`.
        let pooled = self.shapes.out[layer + 1];
        let (argmax, y) = self.pool_buffers(layer + 1, pooled);
        let (mask, argmax) = (mask.filter(|_| want_grad), argmax.filter(|_| want_grad));
        if self.is_tap(layer) {
            self.pending = Some(PendingTap {
                layer,
                y,
                bias,
                mask,
                argmax,
            });
        } else {
            for (x, pred) in self.parts(dims) {
                let first_image = if pred > 0 { 0 } else { n };
                self.s.steps.push(Step::BiasActPool(BiasActPool {
                    layer,
                    x,
                    y: images(y, first_image, x.count, pooled),
                    pred,
                    bias,
                    mask: mask.filter(|_| pred > 0),
                    argmax: argmax.filter(|_| pred > 0),
                    input: dims,
                }));
            }
        }
        self.fused_pool = Some(y);
    }

    /// Pool layer `layer`'s argmax (max-pooling) and output buffers, for
    /// outputs of `dims`.
    fn pool_buffers(&mut self, layer: usize, (c, h, w): Dims) -> (Option<Buf>, Buf) {
        let n = self.n;
        // 2 bits per output, in whole 32-output groups.
        let argmax = (self.spec.pooling == Pooling::Max && self.batch != Batch::Target)
            .then(|| self.s.buffer(Size::Bytes((n * c * h * w).div_ceil(32) * 8)));
        self.saved[layer] = argmax;
        (argmax, self.s.buffer(values((c, h, w), self.images())))
    }

    fn pool(&mut self, layer: usize) {
        let y = match self.fused_pool.take() {
            Some(y) => y,
            None => {
                let (n, input) = (self.n, self.shapes.input(layer));
                let dims = self.shapes.out[layer];
                let (argmax, y) = self.pool_buffers(layer, dims);
                let want_grad = self.want_grad;
                for (x, pred) in self.parts(input) {
                    let first_image = if pred > 0 { 0 } else { n };
                    self.s.steps.push(Step::Pool(Pool {
                        layer,
                        x,
                        y: images(y, first_image, x.count, dims),
                        pred,
                        argmax: argmax.filter(|_| want_grad && pred > 0),
                        input,
                    }));
                }
                y
            }
        };
        self.cur = Act::Joint(y);
    }

    /// The next term of the loss, of `part`: where its gradient goes, its
    /// weight, and whether it adds to the loss, its part and the
    /// per-image values.
    fn term(&mut self, grad: Option<Buf>, weight: f64, part: usize) -> TapTerm {
        let criterion = [self.spec.criterion, self.spec.style_criterion][part];
        let norm = (criterion == Criterion::Fro).then(|| self.s.buffer(Size::Bytes(4)));
        let term = TapTerm {
            norm,
            grad,
            weight,
            accumulate: self.accumulate || !self.first_tap,
            first: self.first_tap,
            part,
            part_accumulate: self.accumulate || !self.first_of_part[part],
        };
        self.first_tap = false;
        self.first_of_part[part] = false;
        term
    }

    fn tap(&mut self, layer: usize, tap_weight: f64) {
        let (n, dims) = (self.n, self.shapes.out[layer]);
        if self.batch == Batch::Target {
            let into = self.kept_slot(layer, false, dims).buf;
            let x = self.cur.pred(n);
            self.s.steps.push(Step::Keep(Keep {
                layer,
                x,
                dims,
                into,
            }));
            return;
        }
        let deepest = self.layers.len() - 1;
        // The tap is the last reader of a buffer of pred images alone when
        // the pool after it has run (or nothing follows): its gradient then
        // overwrites the pred values, element by element.
        let pred_only = matches!(self.cur, Act::Split(..)) || self.batch == Batch::Pred;
        let in_place =
            pred_only && (layer == deepest || self.fused_pool.is_some()) && !self.is_style(layer);
        let grad = if in_place {
            self.cur.pred(n).buf
        } else {
            self.s.buffer(values(dims, n))
        };
        if layer != deepest {
            self.tap_grads[layer] = Some(grad);
        }
        let tap = self.term(
            self.want_grad.then_some(grad),
            tap_weight * self.spec.weight,
            0,
        );
        let pred = self.cur.pred(n);
        let target = match self.batch {
            Batch::Pairs => self.cur.target(n, per_image(dims)),
            Batch::Pred | Batch::Target => self.kept_slot(layer, false, dims),
        };
        let step = match self.pending.take() {
            Some(p) => {
                let pooled = self.shapes.out[layer + 1];
                Step::BiasActPoolTap(BiasActPoolTap {
                    layer: p.layer,
                    pred,
                    target,
                    y_pred: images(p.y, 0, n, pooled),
                    y_target: (self.batch == Batch::Pairs).then(|| images(p.y, n, n, pooled)),
                    bias: p.bias,
                    mask: p.mask,
                    argmax: p.argmax,
                    input: dims,
                    tap,
                })
            }
            None => Step::TapLoss(TapLoss {
                layer,
                pred,
                target,
                dims,
                tap,
            }),
        };
        self.s.steps.push(step);
        if layer == deepest {
            self.deepest_grad = Some(grad);
        }
    }

    /// Style tap `layer` (weight `tap_weight`): the Grams of pred and
    /// target, their distance, and dL/dF into the tap's gradient buffer
    /// (the perceptual tap's there, added to, or a new one).
    fn style(&mut self, layer: usize, tap_weight: f64) {
        let (n, dims) = (self.n, self.shapes.out[layer]);
        let (c, h, w) = dims;
        let slices = (h * w).div_ceil(GRAM_ROWS);
        let gram_bytes = self.images() * c * c * 4;
        let out = match self.batch {
            Batch::Target => self.kept_slot(layer, true, dims).buf,
            Batch::Pairs | Batch::Pred => self.s.buffer(Size::Bytes(gram_bytes)),
        };
        let partial = (slices > 1).then(|| self.s.buffer(Size::Bytes(slices * gram_bytes)));
        let pred = self.cur.pred(n);
        let target = (self.batch == Batch::Pairs).then(|| self.cur.target(n, per_image(dims)));
        self.s.steps.push(Step::Gram(Gram {
            layer,
            pred,
            target,
            dims,
            slices,
            partial,
            out,
        }));
        let kept_grams = match self.batch {
            Batch::Target => return,
            Batch::Pred => Some(self.kept_slot(layer, true, dims).buf),
            Batch::Pairs => None,
        };
        let deepest = layer == self.layers.len() - 1;
        let perceptual = match deepest {
            true => self.deepest_grad,
            false => self.tap_grads[layer],
        };
        let grad = perceptual.unwrap_or_else(|| self.s.buffer(values(dims, n)));
        match deepest {
            true => self.deepest_grad = Some(grad),
            false => self.tap_grads[layer] = Some(grad),
        }
        let weight = tap_weight * self.spec.style_weight;
        let tap = self.term(self.want_grad.then_some(out), weight, 1);
        self.s.steps.push(Step::GramLoss(GramLoss {
            layer,
            grams: out,
            target: kept_grams,
            c,
            tap,
        }));
        if self.want_grad {
            self.s.steps.push(Step::GramBackward(GramBackward {
                layer,
                e: out,
                x: pred,
                dims,
                grad,
                accumulate: perceptual.is_some(),
            }));
        }
    }
}
