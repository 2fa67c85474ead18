//! The backward steps, over the pred half only: from the deepest tap's
//! gradient back through every layer, adding inner taps' gradients where
//! they were taken and folding each ReLU into the unpool after it, then
//! the caller's gradient.

use super::forward::Kept;
use super::steps::*;
use super::{values, Schedule, Shapes};
use crate::error::{Error, Result};
use crate::vgg::{Layer, Module};

/// Appends the backward steps to `s`, from what the forward ones `kept`.
pub(super) fn build(
    s: &mut Schedule,
    layers: &[Layer],
    shapes: &Shapes,
    n: usize,
    kept: Kept,
) -> Result<()> {
    let missing = |what: &str| Error::Internal(format!("the forward schedule kept no {what}"));
    let mut g = kept.deepest_grad.ok_or_else(|| missing("deepest tap"))?;
    let tap_grads = &kept.tap_grads;
    let relu_grad = |layer: usize| -> Result<ReluGrad> {
        Ok(ReluGrad {
            before: tap_grads[layer],
            mask: kept.saved[layer].ok_or_else(|| missing("ReLU mask"))?,
            // A tap on the convolution before adds after the mask.
            after: tap_grads[layer - 1],
        })
    };
    // A ReLU layer whose backward ran with the pool after it.
    let mut relu_done = None;
    for layer in layers.iter().rev() {
        let l = layer.index;
        match layer.module {
            Module::Relu if relu_done == Some(l) => {}
            Module::Relu => s.steps.push(Step::ReluBackward(ReluBackward {
                layer: l,
                g,
                relu: relu_grad(l)?,
                dims: shapes.out[l],
            })),
            Module::Pool => {
                let gx = s.buffer(values(shapes.input(l), n));
                let relu_before = l > 0 && layers[l - 1].module == Module::Relu;
                let relu = match relu_before {
                    true => Some(relu_grad(l - 1)?),
                    false => None,
                };
                relu_done = relu.map(|_| l - 1);
                s.steps.push(Step::Unpool(Unpool {
                    layer: l,
                    gy: g,
                    gx,
                    before: tap_grads[l],
                    argmax: kept.saved[l],
                    relu,
                    input: shapes.input(l),
                }));
                g = gx;
            }
            Module::Conv { .. } => {
                let dx = s.buffer(values(shapes.input(l), n));
                s.steps.push(Step::ConvBackwardData(ConvBackwardData {
                    layer: l,
                    dy: g,
                    dx,
                }));
                g = dx;
            }
        }
    }
    s.steps.push(Step::InputGrad(InputGrad { g }));
    Ok(())
}
