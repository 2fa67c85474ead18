//! The perceptual loss's GPU work as a list of steps: which pass reads and
//! writes which buffer. Pure data: `layout.rs` places the buffers in one
//! device allocation from their lifetimes, and `perceptual.rs` turns each
//! step into a kernel launch or a cuDNN call (its tests run the whole list
//! through the host emulator against the CPU backend).
//!
//! Every tensor is its own buffer, written once (in-place passes keep
//! the buffer): the 2N batch [pred; target] activations in NHWC, the
//! pred half's gradients, ReLU masks, pool argmax and the gradients of
//! inner taps.

use crate::loss::perceptual::Plan;
use crate::vgg::{Layer, Module, Pooling};

/// Channels the 3-channel input is padded to, for tensor-core friendly strides.
pub(crate) const INPUT_CHANNELS: usize = 8;

/// (channels, height, width) of one image's activation.
pub(crate) type Dims = (usize, usize, usize);

/// A buffer of the schedule, an index into [`Schedule::buffers`].
pub(crate) type Buf = usize;

/// How big a buffer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Size {
    /// Values in the compute dtype.
    Values(usize),
    /// Raw bytes (bit masks, argmax).
    Bytes(usize),
}

impl Size {
    pub(crate) fn bytes(self, value_bytes: usize) -> usize {
        match self {
            Size::Values(n) => n * value_bytes,
            Size::Bytes(n) => n,
        }
    }
}

/// Images of one buffer: those from `offset` (in values) on, `count` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Images {
    pub buf: Buf,
    pub offset: usize,
    pub count: usize,
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

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// Caller pred and target -> `out`, normalised and channel-padded.
    Preprocess { out: Buf },
    /// `x` -> `y` through conv `conv` of layer `k` (no bias).
    ConvForward {
        k: usize,
        conv: usize,
        x: Images,
        y: Images,
    },
    /// In place on `x` (its first `pred` images are pred images): + bias
    /// of conv `bias`, then ReLU if `relu`; the pred images' mask into `mask`.
    BiasAct {
        k: usize,
        x: Images,
        pred: usize,
        bias: Option<usize>,
        relu: bool,
        mask: Option<Buf>,
        dims: Dims,
    },
    /// A ReLU layer and the pooling after it in one pass over `x` (of
    /// `input` dims, its first `pred` images pred images): + bias of conv
    /// `bias`, ReLU, the pred mask, then `y` and the pred argmax.
    BiasActPool {
        k: usize,
        x: Images,
        y: Images,
        pred: usize,
        bias: Option<usize>,
        mask: Option<Buf>,
        argmax: Option<Buf>,
        input: Dims,
    },
    /// A tapped ReLU layer, the pooling after it and the tap in one pass:
    /// as `BiasActPool` on the `pred` and `target` images (into `y_pred`
    /// and `y_target`), with the tap taken on the ReLU output.
    BiasActPoolTap {
        k: usize,
        pred: Images,
        target: Images,
        y_pred: Images,
        y_target: Images,
        bias: Option<usize>,
        mask: Option<Buf>,
        argmax: Option<Buf>,
        input: Dims,
        tap: TapTerm,
    },
    /// `x` (of `input` dims) -> `y`, the pred images' argmax into `argmax`.
    Pool {
        k: usize,
        x: Images,
        y: Images,
        pred: usize,
        argmax: Option<Buf>,
        input: Dims,
    },
    /// The distance between `pred` and `target` (of `dims`).
    Tap {
        k: usize,
        pred: Images,
        target: Images,
        dims: Dims,
        tap: TapTerm,
    },
    /// In place on `g` through a ReLU: g = (g + `before`) * `mask` + `after`.
    ReluBackward {
        k: usize,
        g: Buf,
        before: Option<Buf>,
        mask: Buf,
        after: Option<Buf>,
        dims: Dims,
    },
    /// `gy` (+ `before`) -> `gx` of `input` dims through a pool, and
    /// through the ReLU before it when `relu` is set.
    Unpool {
        k: usize,
        gy: Buf,
        gx: Buf,
        before: Option<Buf>,
        argmax: Option<Buf>,
        relu: Option<ReluGrad>,
        input: Dims,
    },
    /// `dy` -> `dx` through conv `conv` of layer `k`, transposed (pred half).
    ConvBackward {
        k: usize,
        conv: usize,
        dy: Buf,
        dx: Buf,
    },
    /// `g` -> the caller's gradient, through the normalisation.
    InputGrad { g: Buf },
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
}

/// A ReLU layer and its pool waiting for their tap, to run as one step.
struct PendingTap {
    k: usize,
    y: Buf,
    bias: Option<usize>,
    mask: Option<Buf>,
    argmax: Option<Buf>,
}

/// A ReLU's backward folded into the pass after it: g = (g + `before`) * `mask` + `after`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ReluGrad {
    pub before: Option<Buf>,
    pub mask: Buf,
    pub after: Option<Buf>,
}

/// Whether a ReLU layer of `dims` and the pool after it run as one pass:
/// the pool must cover every pixel (the fused pass writes the ReLU's mask
/// only where a window reads).
fn fuses_with_pool((_, h, w): Dims) -> bool {
    h % 2 == 0 && w % 2 == 0
}

impl Step {
    /// What the step does, whatever the layer (for step timings).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Step::Preprocess { .. } => "preprocess",
            Step::ConvForward { .. } => "conv forward",
            Step::BiasAct { .. } => "bias+relu",
            Step::BiasActPool { .. } => "bias+relu+pool",
            Step::BiasActPoolTap { .. } => "bias+relu+pool+tap",
            Step::Pool { .. } => "pool",
            Step::Tap { .. } => "tap",
            Step::ReluBackward { .. } => "relu backward",
            Step::Unpool { .. } => "unpool",
            Step::ConvBackward { .. } => "conv backward-data",
            Step::InputGrad { .. } => "input gradient",
        }
    }

    /// The step's name on an NVTX timeline: its direction and layer names.
    pub(crate) fn label(&self, layers: &[Layer]) -> String {
        let name = |k: usize| layers[k].name.as_str();
        match *self {
            Step::Preprocess { .. } => "preprocess".into(),
            Step::ConvForward { k, .. } | Step::BiasAct { k, .. } => format!("forward {}", name(k)),
            Step::BiasActPool { k, .. } => format!("forward {}+{}", name(k), name(k + 1)),
            Step::BiasActPoolTap { k, .. } => {
                format!("forward {}+{}, tap {}", name(k), name(k + 1), name(k))
            }
            Step::Pool { k, .. } => format!("forward {}", name(k)),
            Step::Tap { k, .. } => format!("tap {}", name(k)),
            Step::ReluBackward { k, .. } | Step::ConvBackward { k, .. } => {
                format!("backward {}", name(k))
            }
            Step::Unpool { k, relu: None, .. } => format!("backward {}", name(k)),
            Step::Unpool { k, .. } => format!("backward {}+{}", name(k), name(k - 1)),
            Step::InputGrad { .. } => "input gradient".into(),
        }
    }

    /// Every buffer the step reads or writes.
    pub(crate) fn buffers(&self) -> Vec<Buf> {
        match *self {
            Step::Preprocess { out } => vec![out],
            Step::ConvForward { x, y, .. } => vec![x.buf, y.buf],
            Step::BiasAct { x, mask, .. } => [Some(x.buf), mask].into_iter().flatten().collect(),
            Step::BiasActPool {
                x, y, mask, argmax, ..
            } => [Some(x.buf), Some(y.buf), mask, argmax]
                .into_iter()
                .flatten()
                .collect(),
            Step::Pool { x, y, argmax, .. } => [Some(x.buf), Some(y.buf), argmax]
                .into_iter()
                .flatten()
                .collect(),
            Step::BiasActPoolTap {
                pred,
                target,
                y_pred,
                y_target,
                mask,
                argmax,
                tap,
                ..
            } => [
                Some(pred.buf),
                Some(target.buf),
                Some(y_pred.buf),
                Some(y_target.buf),
                mask,
                argmax,
                tap.grad,
            ]
            .into_iter()
            .flatten()
            .collect(),
            Step::Tap {
                pred, target, tap, ..
            } => [Some(pred.buf), Some(target.buf), tap.grad]
                .into_iter()
                .flatten()
                .collect(),
            Step::ReluBackward {
                g,
                before,
                mask,
                after,
                ..
            } => [Some(g), before, Some(mask), after]
                .into_iter()
                .flatten()
                .collect(),
            Step::Unpool {
                gy,
                gx,
                before,
                argmax,
                relu,
                ..
            } => [
                Some(gy),
                Some(gx),
                before,
                argmax,
                relu.and_then(|r| r.before),
                relu.map(|r| r.mask),
                relu.and_then(|r| r.after),
            ]
            .into_iter()
            .flatten()
            .collect(),
            Step::ConvBackward { dy, dx, .. } => vec![dy, dx],
            Step::InputGrad { g } => vec![g],
        }
    }
}

/// The steps of one call and the buffers they use.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Schedule {
    pub steps: Vec<Step>,
    pub buffers: Vec<Size>,
}

impl Schedule {
    fn buffer(&mut self, size: Size) -> Buf {
        self.buffers.push(size);
        self.buffers.len() - 1
    }
}

/// A pool layer's argmax (max-pooling) and output buffers.
fn pool_buffers(
    s: &mut Schedule,
    saved: &mut [Option<Buf>],
    k: usize,
    n: usize,
    (c, h, w): Dims,
    max: bool,
) -> (Option<Buf>, Buf) {
    // 2 bits per output, in whole 32-output groups.
    let argmax = max.then(|| s.buffer(Size::Bytes((n * c * h * w).div_ceil(32) * 8)));
    saved[k] = argmax;
    (argmax, s.buffer(Size::Values(2 * n * c * h * w)))
}

/// Output dims of every layer up to the deepest tap, for one image.
pub(crate) fn layer_dims(layers: &[Layer], h: usize, w: usize) -> Vec<Dims> {
    let (mut c, mut h, mut w) = (INPUT_CHANNELS, h, w);
    layers
        .iter()
        .map(|l| {
            match l.module {
                Module::Conv { out_c, .. } => c = out_c,
                Module::Relu => {}
                Module::Pool => {
                    h /= 2;
                    w /= 2;
                }
            }
            (c, h, w)
        })
        .collect()
}

/// The steps of one call over `n` image pairs of `h` x `w`. `accumulate`:
/// the loss already holds an earlier chunk's share, so every tap adds to it.
///
/// Without the gradient the steps are the same forward steps using fewer
/// buffers, numbered as with it: one layout serves both.
pub(crate) fn schedule(
    layers: &[Layer],
    plan: &Plan,
    (n, h, w): (usize, usize, usize),
    want_grad: bool,
    accumulate: bool,
) -> Schedule {
    let layers = &layers[..=plan.deepest()];
    let dims = layer_dims(layers, h, w);
    let input = |k: usize| {
        if k == 0 {
            (INPUT_CHANNELS, h, w)
        } else {
            dims[k - 1]
        }
    };
    let values = |(c, h, w): Dims, images: usize| Size::Values(images * c * h * w);
    let is_tap = |k: usize| plan.tap_weight(layers[k].index).is_some();
    let max_pool = plan.pooling == Pooling::Max;
    let deepest = layers.len() - 1;
    let mut s = Schedule {
        steps: Vec::new(),
        buffers: Vec::new(),
    };
    let mut deepest_grad = None;
    let input_buf = s.buffer(values(input(0), 2 * n));
    s.steps.push(Step::Preprocess { out: input_buf });
    let mut cur = Act::Joint(input_buf);
    // Layers before the first pool run on split halves.
    let first_pool = layers
        .iter()
        .position(|l| l.module == Module::Pool)
        .unwrap_or(layers.len());
    // Per layer: its ReLU mask or pool argmax, and an inner tap's gradient.
    let mut saved = vec![None; layers.len()];
    let mut tap_grads = vec![None; layers.len()];
    let mut first = true;
    // The output of a pool already run with the ReLU before it.
    let mut fused_pool = None;
    // A tapped ReLU and its pool, run with the tap.
    let mut pending = None;
    let per_image = |(c, h, w): Dims| c * h * w;
    // `count` images of `dims` from image `first` of `buf`.
    let images = |buf: Buf, first: usize, count: usize, dims: Dims| Images {
        buf,
        offset: first * per_image(dims),
        count,
    };
    for (k, layer) in layers.iter().enumerate() {
        match layer.module {
            Module::Conv { conv, .. } => {
                let (x_pred, x_target) = (cur.pred(n), cur.target(n, per_image(input(k))));
                if k < first_pool {
                    let (p, t) = (s.buffer(values(dims[k], n)), s.buffer(values(dims[k], n)));
                    for (x, y) in [(x_pred, p), (x_target, t)] {
                        let y = images(y, 0, n, dims[k]);
                        s.steps.push(Step::ConvForward { k, conv, x, y });
                    }
                    cur = Act::Split(p, t);
                } else {
                    // After the first pool every activation is joint.
                    debug_assert!(matches!(cur, Act::Joint(_)));
                    let y = s.buffer(values(dims[k], 2 * n));
                    let x = Images {
                        count: 2 * n,
                        ..x_pred
                    };
                    let y_all = images(y, 0, 2 * n, dims[k]);
                    s.steps.push(Step::ConvForward {
                        k,
                        conv,
                        x,
                        y: y_all,
                    });
                    cur = Act::Joint(y);
                }
                if is_tap(k) {
                    // A pre-activation tap: the bias now, the ReLU after the tap.
                    for (x, pred) in cur.parts(n, per_image(dims[k])) {
                        s.steps.push(Step::BiasAct {
                            k,
                            x,
                            pred,
                            bias: Some(conv),
                            relu: false,
                            mask: None,
                            dims: dims[k],
                        });
                    }
                }
            }
            Module::Relu => {
                let bias = match layers[k - 1].module {
                    Module::Conv { conv, .. } if !is_tap(k - 1) => Some(conv),
                    _ => None,
                };
                let (c, h, w) = dims[k];
                let mask = s.buffer(Size::Bytes((n * c * h * w).div_ceil(32) * 4));
                saved[k] = Some(mask);
                let pool_next = layers.get(k + 1).is_some_and(|l| l.module == Module::Pool);
                if pool_next && fuses_with_pool(dims[k]) {
                    // The pool's step is this one (with the tap, when there
                    // is one, below); the pool layer then only moves `cur`.
                    let (argmax, y) =
                        pool_buffers(&mut s, &mut saved, k + 1, n, dims[k + 1], max_pool);
                    let (mask, argmax) = (want_grad.then_some(mask), argmax.filter(|_| want_grad));
                    if is_tap(k) {
                        pending = Some(PendingTap {
                            k,
                            y,
                            bias,
                            mask,
                            argmax,
                        });
                    } else {
                        for (x, pred) in cur.parts(n, per_image(dims[k])) {
                            let first_image = if pred > 0 { 0 } else { n };
                            s.steps.push(Step::BiasActPool {
                                k,
                                x,
                                y: images(y, first_image, x.count, dims[k + 1]),
                                pred,
                                bias,
                                mask: mask.filter(|_| pred > 0),
                                argmax: argmax.filter(|_| pred > 0),
                                input: dims[k],
                            });
                        }
                    }
                    fused_pool = Some(y);
                } else {
                    for (x, pred) in cur.parts(n, per_image(dims[k])) {
                        s.steps.push(Step::BiasAct {
                            k,
                            x,
                            pred,
                            bias,
                            relu: true,
                            mask: Some(mask).filter(|_| want_grad && pred > 0),
                            dims: dims[k],
                        });
                    }
                }
            }
            Module::Pool => {
                let y = match fused_pool.take() {
                    Some(y) => y,
                    None => {
                        let (argmax, y) = pool_buffers(&mut s, &mut saved, k, n, dims[k], max_pool);
                        for (x, pred) in cur.parts(n, per_image(input(k))) {
                            let first_image = if pred > 0 { 0 } else { n };
                            s.steps.push(Step::Pool {
                                k,
                                x,
                                y: images(y, first_image, x.count, dims[k]),
                                pred,
                                argmax: argmax.filter(|_| want_grad && pred > 0),
                                input: input(k),
                            });
                        }
                        y
                    }
                };
                cur = Act::Joint(y);
            }
        }
        if let Some(tap_weight) = plan.tap_weight(layer.index) {
            // The tap is the last reader of a split pred half when the pool
            // after it has run (or nothing follows): its gradient then
            // overwrites the pred values, element by element.
            let in_place = matches!(cur, Act::Split(..)) && (k == deepest || fused_pool.is_some());
            let grad = if in_place {
                cur.pred(n).buf
            } else {
                s.buffer(values(dims[k], n))
            };
            if k != deepest {
                tap_grads[k] = Some(grad);
            }
            let tap = TapTerm {
                grad: want_grad.then_some(grad),
                weight: tap_weight * plan.weight,
                accumulate: accumulate || !first,
                first,
            };
            let (pred, target) = (cur.pred(n), cur.target(n, per_image(dims[k])));
            s.steps.push(match pending.take() {
                Some(p) => Step::BiasActPoolTap {
                    k: p.k,
                    pred,
                    target,
                    y_pred: images(p.y, 0, n, dims[k + 1]),
                    y_target: images(p.y, n, n, dims[k + 1]),
                    bias: p.bias,
                    mask: p.mask,
                    argmax: p.argmax,
                    input: dims[k],
                    tap,
                },
                None => Step::Tap {
                    k,
                    pred,
                    target,
                    dims: dims[k],
                    tap,
                },
            });
            first = false;
            if k == deepest {
                deepest_grad = Some(grad);
            }
        }
    }
    if !want_grad {
        return s;
    }
    let mut g = deepest_grad.expect("the deepest layer is a tap");
    // A ReLU layer whose backward ran with the pool after it.
    let mut relu_done = None;
    let relu_grad = |k: usize| ReluGrad {
        before: tap_grads[k],
        mask: saved[k].expect("a mask per ReLU"),
        // A tap on the convolution before adds after the mask.
        after: tap_grads[k - 1],
    };
    for (k, layer) in layers.iter().enumerate().rev() {
        match layer.module {
            Module::Relu if relu_done == Some(k) => {}
            Module::Relu => {
                let r = relu_grad(k);
                s.steps.push(Step::ReluBackward {
                    k,
                    g,
                    before: r.before,
                    mask: r.mask,
                    after: r.after,
                    dims: dims[k],
                })
            }
            Module::Pool => {
                let gx = s.buffer(values(input(k), n));
                let relu =
                    (k > 0 && layers[k - 1].module == Module::Relu).then(|| relu_grad(k - 1));
                relu_done = relu.map(|_| k - 1);
                s.steps.push(Step::Unpool {
                    k,
                    gy: g,
                    gx,
                    before: tap_grads[k],
                    argmax: saved[k],
                    relu,
                    input: input(k),
                });
                g = gx;
            }
            Module::Conv { conv, .. } => {
                let dx = s.buffer(values(input(k), n));
                s.steps.push(Step::ConvBackward { k, conv, dy: g, dx });
                g = dx;
            }
        }
    }
    s.steps.push(Step::InputGrad { g });
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::perceptual::{PerceptualConfig, PerceptualLoss};
    use crate::vgg::VggArch;

    fn article_loss() -> PerceptualLoss {
        PerceptualLoss::seeded(VggArch::Vgg16, &PerceptualConfig::default())
    }

    #[test]
    fn forward_only_keeps_nothing_for_backward() {
        let loss = article_loss();
        let steps = schedule(loss.vgg().layers(), loss.plan(), (1, 16, 16), false, false).steps;
        for step in &steps {
            match step {
                Step::BiasAct { mask: Some(_), .. }
                | Step::BiasActPool { mask: Some(_), .. }
                | Step::BiasActPool {
                    argmax: Some(_), ..
                }
                | Step::Pool {
                    argmax: Some(_), ..
                }
                | Step::BiasActPoolTap { mask: Some(_), .. }
                | Step::BiasActPoolTap {
                    argmax: Some(_), ..
                }
                | Step::BiasActPoolTap {
                    tap: TapTerm { grad: Some(_), .. },
                    ..
                }
                | Step::Tap {
                    tap: TapTerm { grad: Some(_), .. },
                    ..
                } => {
                    panic!("{step:?} keeps data for backward in a forward-only call")
                }
                Step::ReluBackward { .. }
                | Step::Unpool { .. }
                | Step::ConvBackward { .. }
                | Step::InputGrad { .. } => {
                    panic!("{step:?} in a forward-only call")
                }
                _ => {}
            }
        }
        let taps = |s: &Step| matches!(s, Step::Tap { .. } | Step::BiasActPoolTap { .. });
        assert_eq!(count(&steps, taps), 4);
    }

    fn count(steps: &[Step], f: impl Fn(&Step) -> bool) -> usize {
        steps.iter().filter(|s| f(s)).count()
    }

    #[test]
    fn relu_and_pool_run_as_one_pass_where_the_pool_covers_every_pixel() {
        let loss = article_loss();
        let tapped_pool = |s: &Step| matches!(s, Step::BiasActPoolTap { .. });
        // 16x16: pool1..pool3 inputs are 16, 8 and 4 wide: each tapped ReLU
        // runs with its pool and tap; only relu4_3's tap runs alone.
        let steps = schedule(loss.vgg().layers(), loss.plan(), (2, 16, 16), true, false).steps;
        assert_eq!(count(&steps, tapped_pool), 3);
        assert_eq!(count(&steps, |s| matches!(s, Step::Tap { .. })), 1);
        assert_eq!(count(&steps, |s| matches!(s, Step::Pool { .. })), 0);
        // Backward: every unpool carries the ReLU before it; the other
        // seven of the ten ReLUs run alone.
        assert_eq!(
            count(&steps, |s| matches!(s, Step::Unpool { relu: Some(_), .. })),
            3
        );
        assert_eq!(
            count(&steps, |s| matches!(s, Step::ReluBackward { .. })),
            10 - 3
        );
        // 20x28: pool3's input is 5x7, so it runs after a plain bias+ReLU
        // and its own tap.
        let steps = schedule(loss.vgg().layers(), loss.plan(), (1, 20, 28), true, false).steps;
        assert_eq!(count(&steps, tapped_pool), 2);
        assert_eq!(count(&steps, |s| matches!(s, Step::Pool { .. })), 1);
        assert_eq!(count(&steps, |s| matches!(s, Step::Tap { .. })), 2);
        // Untapped ReLUs before pools: the plain fused pass, once per half
        // at full resolution.
        let taps = PerceptualConfig {
            taps: vec![crate::loss::perceptual::Tap::from("relu3_1")],
            ..Default::default()
        };
        let loss = PerceptualLoss::seeded(VggArch::Vgg16, &taps);
        let steps = schedule(loss.vgg().layers(), loss.plan(), (1, 16, 16), true, false).steps;
        assert_eq!(count(&steps, |s| matches!(s, Step::BiasActPool { .. })), 3);
        assert_eq!(count(&steps, tapped_pool), 0);
    }

    #[test]
    fn timeline_labels_name_the_layers() {
        let loss = article_loss();
        let layers = loss.vgg().layers();
        let labels: Vec<String> = schedule(layers, loss.plan(), (2, 16, 16), true, false)
            .steps
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
