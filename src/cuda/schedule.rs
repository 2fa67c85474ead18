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

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// Caller pred and target -> `out`, normalised and channel-padded.
    Preprocess { out: Buf },
    /// `x` -> `y` through conv `conv` of layer `k` (no bias), all 2N images.
    ConvForward {
        k: usize,
        conv: usize,
        x: Buf,
        y: Buf,
    },
    /// In place on `x`: + bias of conv `bias`, then ReLU if `relu`; the
    /// pred half's positive mask into `mask`.
    BiasAct {
        x: Buf,
        bias: Option<usize>,
        relu: bool,
        mask: Option<Buf>,
        dims: Dims,
    },
    /// `x` (of `input` dims) -> `y`, the pred half's argmax into `argmax`.
    Pool {
        x: Buf,
        y: Buf,
        argmax: Option<Buf>,
        input: Dims,
    },
    /// The distance between the halves of `x`, its gradient into `grad`.
    /// `accumulate`: add to the loss (an earlier tap or chunk wrote it);
    /// `first`: the first tap of this call, which writes the per-image values.
    Tap {
        x: Buf,
        grad: Option<Buf>,
        dims: Dims,
        weight: f64,
        accumulate: bool,
        first: bool,
    },
    /// In place on `g` through a ReLU: g = (g + `before`) * `mask` + `after`.
    ReluBackward {
        g: Buf,
        before: Option<Buf>,
        mask: Buf,
        after: Option<Buf>,
        dims: Dims,
    },
    /// `gy` (+ `before`) -> `gx` of `input` dims through a pool.
    Unpool {
        gy: Buf,
        gx: Buf,
        before: Option<Buf>,
        argmax: Option<Buf>,
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

impl Step {
    /// Every buffer the step reads or writes.
    pub(crate) fn buffers(&self) -> Vec<Buf> {
        match *self {
            Step::Preprocess { out } => vec![out],
            Step::ConvForward { x, y, .. } => vec![x, y],
            Step::BiasAct { x, mask, .. } => [Some(x), mask].into_iter().flatten().collect(),
            Step::Pool { x, y, argmax, .. } => {
                [Some(x), Some(y), argmax].into_iter().flatten().collect()
            }
            Step::Tap { x, grad, .. } => [Some(x), grad].into_iter().flatten().collect(),
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
                ..
            } => [Some(gy), Some(gx), before, argmax]
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
    let deepest = layers.len() - 1;
    let mut s = Schedule {
        steps: Vec::new(),
        buffers: Vec::new(),
    };
    let mut cur = s.buffer(values(input(0), 2 * n));
    s.steps.push(Step::Preprocess { out: cur });
    // Per layer: its ReLU mask or pool argmax, and an inner tap's gradient.
    let mut saved = vec![None; layers.len()];
    let mut tap_grads = vec![None; layers.len()];
    let mut first = true;
    for (k, layer) in layers.iter().enumerate() {
        match layer.module {
            Module::Conv { conv, .. } => {
                let y = s.buffer(values(dims[k], 2 * n));
                s.steps.push(Step::ConvForward { k, conv, x: cur, y });
                cur = y;
                if is_tap(k) {
                    // A pre-activation tap: the bias now, the ReLU after the tap.
                    s.steps.push(Step::BiasAct {
                        x: cur,
                        bias: Some(conv),
                        relu: false,
                        mask: None,
                        dims: dims[k],
                    });
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
                s.steps.push(Step::BiasAct {
                    x: cur,
                    bias,
                    relu: true,
                    mask: want_grad.then_some(mask),
                    dims: dims[k],
                });
            }
            Module::Pool => {
                let argmax = (plan.pooling == Pooling::Max)
                    .then(|| s.buffer(Size::Bytes(n * dims[k].0 * dims[k].1 * dims[k].2)));
                saved[k] = argmax;
                let y = s.buffer(values(dims[k], 2 * n));
                s.steps.push(Step::Pool {
                    x: cur,
                    y,
                    argmax: argmax.filter(|_| want_grad),
                    input: input(k),
                });
                cur = y;
            }
        }
        if let Some(tap_weight) = plan.tap_weight(layer.index) {
            let grad = s.buffer(values(dims[k], n));
            if k != deepest {
                tap_grads[k] = Some(grad);
            }
            s.steps.push(Step::Tap {
                x: cur,
                grad: want_grad.then_some(grad),
                dims: dims[k],
                weight: tap_weight * plan.weight,
                accumulate: accumulate || !first,
                first,
            });
            first = false;
            if k == deepest {
                cur = grad;
            }
        }
    }
    if !want_grad {
        return s;
    }
    // `cur` is now the deepest tap's gradient.
    let mut g = cur;
    for (k, layer) in layers.iter().enumerate().rev() {
        match layer.module {
            // A tap on the convolution before adds after the mask.
            Module::Relu => s.steps.push(Step::ReluBackward {
                g,
                before: tap_grads[k],
                mask: saved[k].expect("a mask per ReLU when the gradient is wanted"),
                after: tap_grads[k - 1],
                dims: dims[k],
            }),
            Module::Pool => {
                let gx = s.buffer(values(input(k), n));
                s.steps.push(Step::Unpool {
                    gy: g,
                    gx,
                    before: tap_grads[k],
                    argmax: saved[k],
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
    use crate::vgg::{seeded_safetensors, Vgg, VggArch, WeightsSource};
    use crate::Device;

    #[test]
    fn forward_only_keeps_nothing_for_backward() {
        let bytes = seeded_safetensors(VggArch::Vgg16, 1).unwrap();
        let vgg = Vgg::load(
            &Device::cpu(),
            WeightsSource::Bytes(&bytes),
            VggArch::Vgg16,
            crate::DType::F32,
        )
        .unwrap();
        let loss = PerceptualLoss::new(vgg, &PerceptualConfig::default()).unwrap();
        let steps = schedule(loss.vgg().layers(), loss.plan(), (1, 16, 16), false, false).steps;
        for step in &steps {
            match step {
                Step::BiasAct { mask: Some(_), .. }
                | Step::Pool {
                    argmax: Some(_), ..
                }
                | Step::Tap { grad: Some(_), .. } => {
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
        assert_eq!(
            steps
                .iter()
                .filter(|s| matches!(s, Step::Tap { .. }))
                .count(),
            4
        );
    }
}
