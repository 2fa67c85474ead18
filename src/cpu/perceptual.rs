//! Perceptual loss on the CPU, one image at a time: normalise, run VGG on
//! pred and target up to the deepest tap, compare at each tap, then
//! back-propagate through pred's network only (weights are frozen).

use super::{feature::feature, store_grad, vgg as ops};
use crate::loss::perceptual::Plan;
use crate::tensor::{Element, Shape};
use crate::vgg::{ConvWeights, Layer, Module};

/// The network on the host: its layers and their f32 parameters.
#[derive(Clone, Copy)]
pub(crate) struct Net<'a> {
    pub layers: &'a [Layer],
    pub convs: &'a [ConvWeights],
}

/// What backward needs from one module's forward (pred only).
enum Saved {
    Conv {
        conv: usize,
        h: usize,
        w: usize,
    },
    Relu(Vec<bool>),
    Pool {
        c: usize,
        h: usize,
        w: usize,
        argmax: Vec<u8>,
    },
}

/// One image of `x` as 3 x H x W f32, normalised as `plan` says.
fn preprocess<T: Element>(x: &[T], c: usize, hw: usize, plan: &Plan) -> Vec<f32> {
    let mut out = Vec::with_capacity(3 * hw);
    for ch in 0..3 {
        let src = if c == 1 { 0 } else { ch };
        let (scale, shift) = plan.norm.affine(ch);
        out.extend(
            x[src * hw..(src + 1) * hw]
                .iter()
                .map(|v| (v.to_f64() * scale + shift) as f32),
        );
    }
    out
}

/// Forward through the network to the deepest tap; calls `at_tap(module, tap
/// weight, features)` and, when `saved` is given, keeps what backward needs.
fn forward(
    net: Net<'_>,
    plan: &Plan,
    mut x: Vec<f32>,
    h: usize,
    w: usize,
    mut saved: Option<&mut Vec<Saved>>,
    mut at_tap: impl FnMut(usize, f64, &[f32]),
) {
    let (mut c, mut h, mut w) = (3, h, w);
    let (mut next, mut cols) = (Vec::new(), Vec::new());
    for layer in &net.layers[..=plan.deepest()] {
        match layer.module {
            Module::Conv { out_c, conv, .. } => {
                ops::conv(&x, h, w, &net.convs[conv], &mut next, &mut cols);
                std::mem::swap(&mut x, &mut next);
                c = out_c;
                if let Some(s) = saved.as_deref_mut() {
                    s.push(Saved::Conv { conv, h, w });
                }
            }
            Module::Relu => {
                let mut mask = saved.as_ref().map(|_| Vec::new());
                ops::relu(&mut x, mask.as_mut());
                if let (Some(s), Some(m)) = (saved.as_deref_mut(), mask) {
                    s.push(Saved::Relu(m));
                }
            }
            Module::Pool => {
                let mut argmax = saved.as_ref().map(|_| Vec::new());
                ops::pool(&x, c, h, w, plan.pooling, &mut next, argmax.as_mut());
                std::mem::swap(&mut x, &mut next);
                if let (Some(s), Some(a)) = (saved.as_deref_mut(), argmax) {
                    s.push(Saved::Pool { c, h, w, argmax: a });
                }
                h /= 2;
                w /= 2;
            }
        }
        if let Some(weight) = plan.tap_weight(layer.index) {
            at_tap(layer.index, weight, &x);
        }
    }
}

/// One target image's features at every tap: all the loss needs of it.
fn image_features<T: Element>(
    net: Net<'_>,
    plan: &Plan,
    image: &[T],
    c: usize,
    h: usize,
    w: usize,
) -> Vec<Vec<f32>> {
    let mut taps = Vec::new();
    forward(
        net,
        plan,
        preprocess(image, c, h * w, plan),
        h,
        w,
        None,
        |_, _, f| taps.push(f.to_vec()),
    );
    taps
}

/// Per image, per tap, the features.
pub(crate) type TapFeatures = Vec<Vec<Vec<f32>>>;

/// Every target image's tap features, so a caller may keep them while
/// the target does not change.
pub(crate) fn target_features<T: Element>(
    net: Net<'_>,
    plan: &Plan,
    target: &[T],
    s: Shape,
) -> TapFeatures {
    target
        .chunks_exact(s.c * s.h * s.w)
        .map(|image| image_features(net, plan, image, s.c, s.h, s.w))
        .collect()
}

/// The target of a call: its images, or their tap features kept from an
/// earlier call.
pub(crate) enum Target<'a, T> {
    Images(&'a [T]),
    Features(&'a [Vec<Vec<f32>>]),
}

/// The batch loss; fills `per_sample` and, when given, writes
/// `beta * grad + dL/dpred`.
pub(crate) fn perceptual<T: Element>(
    net: Net<'_>,
    plan: &Plan,
    pred: &[T],
    target: Target<'_, T>,
    s: Shape,
    mut grad: Option<(&mut [T], f32)>,
    per_sample: &mut [f64],
) -> f64 {
    let (hw, image) = (s.h * s.w, s.c * s.h * s.w);
    let mut total = 0.0;
    for (n, per_image) in per_sample.iter_mut().enumerate() {
        let range = n * image..(n + 1) * image;
        // This image's target features: kept ones borrowed, or computed
        // now and each dropped once its tap is done (they would otherwise
        // stay alive through the whole pred pass).
        let (kept, mut computed) = match target {
            Target::Features(f) => (Some(&f[n]), Vec::new()),
            Target::Images(t) => (
                None,
                image_features(net, plan, &t[range.clone()], s.c, s.h, s.w),
            ),
        };
        // Pred features, each tap's loss and (when asked) its gradient.
        let mut saved = grad.as_ref().map(|_| Vec::new());
        let mut tap_grads: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut image_loss = 0.0;
        let mut k = 0;
        forward(
            net,
            plan,
            preprocess(&pred[range.clone()], s.c, hw, plan),
            s.h,
            s.w,
            saved.as_mut(),
            |index, tap_weight, f| {
                // The batch mean over N images of per-image means.
                let weight = tap_weight * plan.weight / s.n as f64;
                let mut g = vec![0f32; if grad.is_some() { f.len() } else { 0 }];
                let gslot = grad.as_ref().map(|_| (&mut g[..], 0.0f32));
                let taken;
                let t = match kept {
                    Some(kept) => &kept[k],
                    None => {
                        taken = std::mem::take(&mut computed[k]);
                        &taken
                    }
                };
                image_loss += feature(f, t, gslot, plan.criterion, weight as f32);
                tap_grads.push((index, g));
                k += 1;
            },
        );
        *per_image = image_loss * s.n as f64;
        total += image_loss;

        let (Some((out, beta)), Some(saved)) = (grad.as_mut(), saved) else {
            continue;
        };
        let mut g: Vec<f32> = Vec::new();
        let (mut next, mut cols) = (Vec::new(), Vec::new());
        for (layer, step) in net.layers[..=plan.deepest()].iter().zip(saved).rev() {
            if let Some(pos) = tap_grads.iter().position(|(i, _)| *i == layer.index) {
                let tg = std::mem::take(&mut tap_grads[pos].1);
                if g.is_empty() {
                    g = tg;
                } else {
                    g.iter_mut().zip(&tg).for_each(|(a, b)| *a += b);
                }
            }
            match step {
                Saved::Conv { conv, h, w } => {
                    ops::conv_backward(&g, h, w, &net.convs[conv], &mut next, &mut cols);
                    std::mem::swap(&mut g, &mut next);
                }
                Saved::Relu(mask) => ops::relu_backward(&mut g, &mask),
                Saved::Pool { c, h, w, argmax } => {
                    ops::pool_backward(&g, c, h, w, plan.pooling, &argmax, &mut next);
                    std::mem::swap(&mut g, &mut next);
                }
            }
        }
        // Through the normalisation, and back to one channel for grayscale.
        let dst = &mut out[range];
        for (ch, plane) in dst.chunks_exact_mut(hw).enumerate() {
            for (i, slot) in plane.iter_mut().enumerate() {
                let v: f64 = if s.c == 1 {
                    (0..3)
                        .map(|c3| g[c3 * hw + i] as f64 * plan.norm.affine(c3).0)
                        .sum()
                } else {
                    g[ch * hw + i] as f64 * plan.norm.affine(ch).0
                };
                store_grad(slot, v, *beta);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::perceptual::{PerceptualConfig, PerceptualLoss};
    use crate::vgg::VggArch;

    #[test]
    fn kept_target_features_give_the_same_bits_as_the_images() {
        let loss = PerceptualLoss::seeded(VggArch::Vgg16, &PerceptualConfig::default());
        let net = Net {
            layers: loss.vgg().layers(),
            convs: loss.vgg().host_convs().unwrap(),
        };
        let s = Shape::new(2, 3, 16, 12);
        let len = s.n * s.c * s.h * s.w;
        let pred: Vec<f32> = (0..len).map(|i| (i % 97) as f32 / 97.0).collect();
        let target: Vec<f32> = (0..len).map(|i| (i % 89) as f32 / 89.0).collect();
        let run = |t: Target<'_, f32>| {
            let (mut grad, mut per) = (vec![0f32; len], vec![0.0; s.n]);
            let loss = perceptual(
                net,
                loss.plan(),
                &pred,
                t,
                s,
                Some((&mut grad, 0.0)),
                &mut per,
            );
            (loss, grad, per)
        };
        let features = target_features(net, loss.plan(), &target, s);
        let kept = run(Target::Features(&features));
        assert!(kept.0 > 0.0);
        assert_eq!(kept, run(Target::Images(&target)));
    }
}
