//! Perceptual loss on the CPU, one image at a time: normalise, run VGG on
//! pred and target up to the deepest tap, compare at each tap, then
//! back-propagate through pred's network only (weights are frozen).
//!
//! This is the reference the CUDA schedule is tested against: each of its
//! fused steps has a CPU composition of the functions here and in
//! `layers.rs` (see `cuda/steps/tests/`).

mod gemm;
pub(crate) mod layers;

use super::config::{InputNorm, PerceptualSpec};
use crate::backend::{HostGrad, HostIo, Values};
use crate::error::{Error, Result};
use crate::fallible;
use crate::ops::feature::cpu::distance_sum;
use crate::tensor::{as_bytes, DType, Element, Shape};
use crate::vgg::{output_dims, HostWeights, Layer, Module};
use std::sync::{Arc, Mutex};

/// The network on the host: its layers and their f32 parameters.
#[derive(Clone, Copy)]
pub(crate) struct HostNet<'a> {
    pub layers: &'a [Layer],
    pub weights: &'a HostWeights,
}

/// What backward needs from one module's forward (pred only).
enum Saved {
    Conv {
        layer: usize,
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

/// One image of `x` (`c` = 1 or 3 planes of `hw` values) as 3 x H x W f32,
/// normalised: the reference of the `pl_vgg_preprocess` kernel.
pub(crate) fn preprocess<T: Element>(
    x: &[T],
    c: usize,
    hw: usize,
    norm: InputNorm,
) -> Result<Vec<f32>> {
    let mut out = fallible::with_capacity(3 * hw, "a normalised image")?;
    for ch in 0..3 {
        let src = if c == 1 { 0 } else { ch };
        let (scale, shift) = norm.affine(ch);
        out.extend(
            x[src * hw..(src + 1) * hw]
                .iter()
                .map(|v| (v.to_f64() * scale + shift) as f32),
        );
    }
    Ok(out)
}

/// The gradient w.r.t. one caller image from the gradient `g` (3 x H x W)
/// of the normalised image: through the normalisation and, for a gray
/// image (`c` = 1), summed over the three channels it fed. Element `i` of
/// plane `ch` is `value(ch, i)`: the reference of `pl_vgg_input_grad`.
pub(crate) fn input_grad(
    g: &[f32],
    c: usize,
    hw: usize,
    norm: InputNorm,
    ch: usize,
    i: usize,
) -> f64 {
    if c == 1 {
        (0..3)
            .map(|c3| g[c3 * hw + i] as f64 * norm.affine(c3).0)
            .sum()
    } else {
        g[ch * hw + i] as f64 * norm.affine(ch).0
    }
}

/// Forward through the network to the deepest tap; calls `at_tap(layer, tap
/// weight, features)` and, when `saved` is given, keeps what backward needs.
fn forward(
    net: HostNet<'_>,
    spec: &PerceptualSpec,
    mut x: Vec<f32>,
    h: usize,
    w: usize,
    mut saved: Option<&mut Vec<Saved>>,
    mut at_tap: impl FnMut(usize, f64, &[f32]) -> Result<()>,
) -> Result<()> {
    let (mut c, mut h, mut w) = (3, h, w);
    let (mut next, mut cols) = (Vec::new(), Vec::new());
    for layer in &net.layers[..=spec.deepest()] {
        match layer.module {
            Module::Conv { out_c, .. } => {
                let p = net.weights.conv(layer.index)?;
                layers::conv(&x, h, w, p, &mut next, &mut cols)?;
                std::mem::swap(&mut x, &mut next);
                c = out_c;
                if let Some(s) = saved.as_deref_mut() {
                    s.push(Saved::Conv {
                        layer: layer.index,
                        h,
                        w,
                    });
                }
            }
            Module::Relu => {
                let mut mask = saved.as_ref().map(|_| Vec::new());
                layers::relu(&mut x, mask.as_mut())?;
                if let (Some(s), Some(m)) = (saved.as_deref_mut(), mask) {
                    s.push(Saved::Relu(m));
                }
            }
            Module::Pool => {
                let mut argmax = saved.as_ref().map(|_| Vec::new());
                layers::pool(&x, c, h, w, spec.pooling, &mut next, argmax.as_mut())?;
                std::mem::swap(&mut x, &mut next);
                if let (Some(s), Some(a)) = (saved.as_deref_mut(), argmax) {
                    s.push(Saved::Pool { c, h, w, argmax: a });
                }
                h /= 2;
                w /= 2;
            }
        }
        if let Some(weight) = spec.tap_weight(layer.index) {
            at_tap(layer.index, weight, &x)?;
        }
    }
    Ok(())
}

/// One target image's features at every tap: all the loss needs of it.
fn image_features<T: Element>(
    net: HostNet<'_>,
    spec: &PerceptualSpec,
    image: &[T],
    (c, h, w): (usize, usize, usize),
) -> Result<Vec<Vec<f32>>> {
    let mut taps = Vec::new();
    let x = preprocess(image, c, h * w, spec.norm)?;
    forward(net, spec, x, h, w, None, |_, _, f| {
        taps.push(fallible::copied(f, "a target's tap features")?);
        Ok(())
    })?;
    Ok(taps)
}

/// Per image, per tap, the features.
type TapFeatures = Vec<Vec<Vec<f32>>>;

/// The target of a call: its images, or their tap features kept from an
/// earlier call.
enum Target<'a, T> {
    Images(&'a [T]),
    Features(&'a [Vec<Vec<f32>>]),
}

/// The batch loss and each image's; writes `beta * grad + dL/dpred` when
/// `grad` is given, once every image has succeeded (a failure part way,
/// such as an allocation, leaves it untouched).
fn network<T: Element>(
    net: HostNet<'_>,
    spec: &PerceptualSpec,
    pred: &[T],
    target: Target<'_, T>,
    s: Shape,
    grad: Option<HostGrad<'_, T>>,
) -> Result<Values> {
    let (hw, image) = (s.h * s.w, s.image_len());
    let dims = (s.c, s.h, s.w);
    let mut total = 0.0;
    let mut per_sample = fallible::with_capacity(s.n, "per-image losses")?;
    // What the gradient will hold once every image is done (blended with
    // beta and rounded, as a direct store would be), copied in at the end.
    let staged_len = if grad.is_some() { pred.len() } else { 0 };
    let mut staged = fallible::filled(staged_len, T::from_f64(0.0), "the staged input gradient")?;
    for n in 0..s.n {
        let range = n * image..(n + 1) * image;
        // This image's target features: kept ones borrowed, or computed
        // now and each dropped once its tap is done (they would otherwise
        // stay alive through the whole pred pass).
        let (kept, mut computed) = match target {
            Target::Features(f) => (Some(&f[n]), Vec::new()),
            Target::Images(t) => (None, image_features(net, spec, &t[range.clone()], dims)?),
        };
        // Pred features, each tap's loss and (when asked) its gradient.
        let mut saved = grad.as_ref().map(|_| Vec::new());
        let mut tap_grads: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut image_loss = 0.0;
        let mut k = 0;
        let x = preprocess(&pred[range.clone()], s.c, hw, spec.norm)?;
        forward(
            net,
            spec,
            x,
            s.h,
            s.w,
            saved.as_mut(),
            |layer, tap_weight, f| {
                // The batch mean over N images of per-image means.
                let weight = (tap_weight * spec.weight / s.n as f64) as f32;
                let scale = weight as f64 / f.len() as f64;
                let g_len = if grad.is_some() { f.len() } else { 0 };
                let mut g = fallible::filled(g_len, 0f32, "a tap's gradient")?;
                let slot = grad.as_ref().map(|_| HostGrad {
                    values: &mut g[..],
                    beta: 0.0,
                });
                let taken;
                let t = match kept {
                    Some(kept) => &kept[k],
                    None => {
                        taken = std::mem::take(&mut computed[k]);
                        &taken
                    }
                };
                image_loss += distance_sum(spec.criterion, f, t, slot, scale) * scale;
                tap_grads.push((layer, g));
                k += 1;
                Ok(())
            },
        )?;
        per_sample.push(image_loss * s.n as f64);
        total += image_loss;

        let (Some(out), Some(saved)) = (grad.as_ref(), saved) else {
            continue;
        };
        let g = backward(net, spec, saved, tap_grads)?;
        // Through the normalisation, and back to one channel for grayscale.
        for ch in 0..s.c {
            for i in 0..hw {
                let at = range.start + ch * hw + i;
                staged[at] = out.blended(at, input_grad(&g, s.c, hw, spec.norm, ch, i));
            }
        }
    }
    if let Some(out) = grad {
        out.values.copy_from_slice(&staged);
    }
    Ok(Values {
        loss: total,
        per_sample,
    })
}

/// Back-propagates the tap gradients of one pred image through the layers
/// `saved` describes; returns the gradient w.r.t. the normalised image.
fn backward(
    net: HostNet<'_>,
    spec: &PerceptualSpec,
    saved: Vec<Saved>,
    mut tap_grads: Vec<(usize, Vec<f32>)>,
) -> Result<Vec<f32>> {
    let mut g: Vec<f32> = Vec::new();
    let (mut next, mut cols) = (Vec::new(), Vec::new());
    for (layer, step) in net.layers[..=spec.deepest()].iter().zip(saved).rev() {
        if let Some(pos) = tap_grads.iter().position(|(i, _)| *i == layer.index) {
            let tg = std::mem::take(&mut tap_grads[pos].1);
            if g.is_empty() {
                g = tg;
            } else {
                g.iter_mut().zip(&tg).for_each(|(a, b)| *a += b);
            }
        }
        match step {
            Saved::Conv { layer, h, w } => {
                let p = net.weights.conv(layer)?;
                layers::conv_backward(&g, h, w, p, &mut next, &mut cols)?;
                std::mem::swap(&mut g, &mut next);
            }
            Saved::Relu(mask) => layers::relu_backward(&mut g, &mask),
            Saved::Pool { c, h, w, argmax } => {
                layers::pool_backward(&g, c, h, w, spec.pooling, &argmax, &mut next)?;
                std::mem::swap(&mut g, &mut next);
            }
        }
    }
    Ok(g)
}

/// The CPU backend's state of one loss: the last target and its tap
/// features, reused while the target is unchanged (same shape, dtype and
/// bytes), as in feature-inversion and style loops.
#[derive(Default)]
pub(crate) struct TargetCache {
    last: Mutex<Option<KeptTarget>>,
}

struct KeptTarget {
    shape: Shape,
    dtype: DType,
    input: Vec<u8>,
    features: Arc<TapFeatures>,
}

impl std::fmt::Debug for TargetCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.last.lock().as_deref() {
            Ok(Some(k)) => write!(f, "TargetCache({} {})", k.dtype.name(), k.shape),
            _ => write!(f, "TargetCache(empty)"),
        }
    }
}

/// Largest target (input plus features) kept between calls.
const TARGET_CACHE_BYTES: usize = 64 << 20;

impl TargetCache {
    /// The loss of `io.inputs[0]` (pred) against `io.inputs[1]` (target).
    pub(crate) fn evaluate<T: Element>(
        &self,
        net: HostNet<'_>,
        spec: &PerceptualSpec,
        io: HostIo<'_, T, 2>,
    ) -> Result<Values> {
        let [pred, target] = io.inputs;
        let features = self.features(net, spec, target, io.shape)?;
        let target = match &features {
            Some(f) => Target::Features(f),
            None => Target::Images(target),
        };
        network(net, spec, pred, target, io.shape, io.grad)
    }

    /// The target's tap features: those of the previous call when the
    /// target is the same, computed and kept when small enough, `None` for
    /// a target too large to keep (the loss then computes them one image
    /// at a time).
    fn features<T: Element>(
        &self,
        net: HostNet<'_>,
        spec: &PerceptualSpec,
        target: &[T],
        s: Shape,
    ) -> Result<Option<Arc<TapFeatures>>> {
        let bytes = as_bytes(target);
        if let Some(k) = self.last.lock().map_err(|_| Error::poisoned())?.as_ref() {
            if k.shape == s && k.dtype == T::DTYPE && k.input == bytes {
                return Ok(Some(k.features.clone()));
            }
        }
        let dims = output_dims(net.layers, (3, s.h, s.w));
        let per_image: usize = spec
            .taps
            .iter()
            .map(|&(layer, _)| dims[layer].0 * dims[layer].1 * dims[layer].2)
            .sum();
        if s.n * per_image * 4 + bytes.len() > TARGET_CACHE_BYTES {
            return Ok(None);
        }
        // Computed without the lock: other threads' calls go on meanwhile.
        let features = target
            .chunks_exact(s.image_len())
            .map(|image| image_features(net, spec, image, (s.c, s.h, s.w)))
            .collect::<Result<Vec<_>>>()?;
        let features = Arc::new(features);
        *self.last.lock().map_err(|_| Error::poisoned())? = Some(KeptTarget {
            shape: s,
            dtype: T::DTYPE,
            input: fallible::copied(bytes, "the kept target")?,
            features: features.clone(),
        });
        Ok(Some(features))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::perceptual::{PerceptualConfig, PerceptualLoss};
    use crate::vgg::VggArch;

    #[test]
    fn kept_target_features_give_the_same_bits_as_the_images() {
        let loss = PerceptualLoss::seeded(VggArch::Vgg16, &PerceptualConfig::default());
        let net = HostNet {
            layers: loss.vgg().layers(),
            weights: loss.vgg().host_weights().unwrap(),
        };
        let s = Shape::new(2, 3, 16, 12);
        let len = s.n * s.image_len();
        let pred: Vec<f32> = (0..len).map(|i| (i % 97) as f32 / 97.0).collect();
        let target: Vec<f32> = (0..len).map(|i| (i % 89) as f32 / 89.0).collect();
        let run = |t: Target<'_, f32>| {
            let mut grad = vec![0f32; len];
            let out = HostGrad {
                values: &mut grad,
                beta: 0.0,
            };
            let values = network(net, loss.spec(), &pred, t, s, Some(out)).unwrap();
            (values, grad)
        };
        let features: TapFeatures = target
            .chunks_exact(s.image_len())
            .map(|image| image_features(net, loss.spec(), image, (s.c, s.h, s.w)).unwrap())
            .collect();
        let kept = run(Target::Features(&features));
        assert!(kept.0.loss > 0.0);
        assert_eq!(kept, run(Target::Images(&target)));
    }
}
