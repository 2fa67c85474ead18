//! Perceptual loss on the CPU, one image at a time: normalise, run VGG on
//! pred and target up to the deepest tap, compare at each tap, then
//! back-propagate through pred's network only (weights are frozen).
//!
//! This is the reference the CUDA schedule is tested against: each of its
//! fused steps has a CPU composition of the functions here and in
//! `layers.rs` (see `cuda/steps/tests/`).

pub(crate) mod buffers;
mod gemm;
pub(crate) mod gram;
pub(crate) mod layers;
mod packed;
mod winograd;

use super::config::{InputNorm, PerceptualSpec};
use crate::backend::{HostGrad, HostIo, Values};
use crate::error::{Error, Result};
use crate::fallible;
use crate::ops::feature::cpu::distance_sum;
use crate::ops::feature::Criterion;
use crate::ops::lpips;
use crate::ops::parts;
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

/// Forward through the network to the deepest tap; calls `at_tap(layer,
/// features, (C, H*W))` at every tapped layer (perceptual or style) and,
/// when `saved` is given, keeps what backward needs.
fn forward(
    net: HostNet<'_>,
    spec: &PerceptualSpec,
    mut x: Vec<f32>,
    h: usize,
    w: usize,
    mut saved: Option<&mut Vec<Saved>>,
    mut at_tap: impl FnMut(usize, &[f32], (usize, usize)) -> Result<()>,
) -> Result<()> {
    let tapped = spec.tapped();
    let (mut c, mut h, mut w) = (3, h, w);
    let buffers = &net.weights.buffers;
    let (mut next, mut cols) = (buffers.take(), buffers.take());
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
        if tapped.contains(&layer.index) {
            at_tap(layer.index, &x, (c, h * w))?;
        }
    }
    [x, next, cols].into_iter().for_each(|b| buffers.give(b));
    Ok(())
}

/// What the loss needs of one target image at one tapped layer: its
/// features where a perceptual term reads them, its Gram matrix where a
/// style term does (each empty otherwise).
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct TapTarget {
    features: Vec<f32>,
    gram: Vec<f32>,
}

/// One target image at every tapped layer.
fn image_features<T: Element>(
    net: HostNet<'_>,
    spec: &PerceptualSpec,
    image: &[T],
    (c, h, w): (usize, usize, usize),
) -> Result<Vec<TapTarget>> {
    let mut taps = Vec::new();
    let x = preprocess(image, c, h * w, spec.norm)?;
    forward(net, spec, x, h, w, None, |layer, f, (c, m)| {
        let mut kept = TapTarget::default();
        if spec.tap_weight(layer).is_some() {
            kept.features = fallible::copied(f, "a target's tap features")?;
        }
        if spec.style_weight_at(layer).is_some() {
            kept.gram = gram::gram(f, c, m)?;
        }
        taps.push(kept);
        Ok(())
    })?;
    Ok(taps)
}

/// Per image, per tapped layer, what the target contributes.
pub(crate) type TapFeatures = Vec<Vec<TapTarget>>;

/// The target of a call: its images, or their tap features kept from an
/// earlier call.
enum Target<'a, T> {
    Images(&'a [T]),
    Features(&'a [Vec<TapTarget>]),
}

/// The terms of a loss, in a fixed order: the perceptual taps, then the
/// style taps, each ascending by layer. A term's `sum` over one image is
/// its criterion's elementwise sum there (squares for Fro).
struct Terms {
    /// (layer, criterion, weight with the overall one, elements per image
    /// it compares, whether it is a style term).
    terms: Vec<(usize, Criterion, f64, usize, bool)>,
    images: usize,
}

impl Terms {
    fn new(net: HostNet<'_>, spec: &PerceptualSpec, s: Shape) -> Terms {
        let dims = output_dims(net.layers, (3, s.h, s.w));
        // An LPIPS term is a mean over pixels of a sum over channels.
        let perceptual = spec.taps.iter().map(|&(layer, w)| {
            let (c, h, wd) = dims[layer];
            let count = if spec.lpips.is_some() {
                h * wd
            } else {
                c * h * wd
            };
            (layer, spec.criterion, w * spec.weight, count, false)
        });
        let style = spec.style.iter().map(|&(layer, w)| {
            let c = dims[layer].0;
            (
                layer,
                spec.style_criterion,
                w * spec.style_weight,
                c * c,
                true,
            )
        });
        Terms {
            terms: perceptual.chain(style).collect(),
            images: s.n,
        }
    }

    /// The term at `layer` of the perceptual (`style` false) or style loss.
    fn index(&self, layer: usize, style: bool) -> Option<usize> {
        self.terms.iter().position(|t| t.0 == layer && t.4 == style)
    }

    /// What a mean term's sum is multiplied by to give its share of the
    /// loss (the batch mean of per-image means); the weight is rounded to
    /// f32 first, as the CUDA kernels receive it.
    fn mean_scale(&self, term: usize) -> f64 {
        let (_, _, weight, count, _) = self.terms[term];
        ((weight / self.images as f64) as f32) as f64 / count as f64
    }

    /// What each term's elementwise slopes are multiplied by in the
    /// gradient. A Fro term's, w / (2 ||D||) (a zero difference: 0), needs
    /// the batch's sums (`totals`); without them (no gradient) it is 0.
    fn grad_scales(&self, totals: Option<&[f64]>) -> Vec<f64> {
        (0..self.terms.len())
            .map(|t| match (self.terms[t].1, totals) {
                (Criterion::Fro, Some(totals)) if totals[t] > 0.0 => {
                    self.terms[t].2 / (2.0 * totals[t].sqrt())
                }
                (Criterion::Fro, _) => 0.0,
                _ => self.mean_scale(t),
            })
            .collect()
    }
}

/// Each image's term sums (`sums[n][term]`), composed into the values.
fn compose(terms: &Terms, sums: &[Vec<f64>]) -> Values {
    let n = terms.images;
    let mut parts = [0.0f64; 2];
    let mut per_sample = vec![0.0; n];
    // Mean terms: image by image, in term order (the sum order the loss's
    // bits have always had).
    for (image, sums) in sums.iter().enumerate() {
        let mut image_parts = [0.0f64; 2];
        for (t, &(_, criterion, ..)) in terms.terms.iter().enumerate() {
            if criterion != Criterion::Fro {
                image_parts[terms.terms[t].4 as usize] += sums[t] * terms.mean_scale(t);
            }
        }
        parts[0] += image_parts[0];
        parts[1] += image_parts[1];
        per_sample[image] = (image_parts[0] + image_parts[1]) * n as f64;
    }
    // Norm terms: of the whole batch; an image's value is its own norm.
    for (t, &(_, criterion, weight, _, style)) in terms.terms.iter().enumerate() {
        if criterion == Criterion::Fro {
            let total: f64 = sums.iter().map(|s| s[t]).sum();
            parts[style as usize] += weight * total.sqrt();
            for (image, sums) in sums.iter().enumerate() {
                per_sample[image] += weight * sums[t].sqrt();
            }
        }
    }
    Values {
        loss: parts[0] + parts[1],
        per_sample,
        parts: Some(parts),
    }
}

/// The batch loss and each image's; writes `beta * grad + dL/dpred` when
/// `grad` is given, once every image has succeeded (a failure part way,
/// such as an allocation, leaves it untouched). A Fro term's gradient
/// needs the batch's norm first: then the forward runs once more. With
/// `keep`, also the target's tap data when it was computed from images.
fn network<T: Element>(
    net: HostNet<'_>,
    spec: &PerceptualSpec,
    pred: &[T],
    target: Target<'_, T>,
    s: Shape,
    grad: Option<HostGrad<'_, T>>,
    keep: bool,
) -> Result<(Values, Option<TapFeatures>)> {
    let terms = Terms::new(net, spec, s);
    let mut computed = None;
    let totals = match grad.is_some() && spec.has_norm_terms() {
        true => {
            let (sums, taps) = pass(net, spec, &terms, pred, &target, s, None, (&[], keep))?;
            computed = taps;
            let totals = (0..terms.terms.len())
                .map(|t| sums.iter().map(|s| s[t]).sum())
                .collect::<Vec<f64>>();
            Some(totals)
        }
        false => None,
    };
    let scales = terms.grad_scales(totals.as_deref());
    let (sums, taps) = match &computed {
        // The first pass's target taps serve the second.
        Some(taps) => {
            let target = Target::Features(taps);
            pass(net, spec, &terms, pred, &target, s, grad, (&scales, false))?
        }
        None => pass(net, spec, &terms, pred, &target, s, grad, (&scales, keep))?,
    };
    Ok((compose(&terms, &sums), computed.or(taps)))
}

/// A pred image (normalised, `x`, `dims` = (C, H, W) of the caller's
/// image) through the network to the deepest tap against one target image
/// (CHW, the caller's channels), keeping what backward needs when `saved`
/// is given: `each(layer, f, (C, H*W), t)` for each tap, with pred's
/// features `f` there and the target's tap data `t`. Where the target's
/// forward runs beside pred's (`parts::together`), pred's tap features are
/// copied and compared once both are done; otherwise the target's taps are
/// computed first and each is compared as pred's forward reaches it, its
/// data dropped there unless `keep`. Returns the target's tap data (empty
/// where it was dropped).
fn against_target_image<T: Element>(
    net: HostNet<'_>,
    spec: &PerceptualSpec,
    (x, target): (Vec<f32>, &[T]),
    (c, h, w): (usize, usize, usize),
    (saved, keep): (Option<&mut Vec<Saved>>, bool),
    mut each: impl FnMut(usize, &[f32], (usize, usize), &TapTarget) -> Result<()>,
) -> Result<Vec<TapTarget>> {
    let target_taps = || image_features(net, spec, target, (c, h, w));
    if parts::together() {
        let (computed, pred_taps) = parts::both(target_taps, || {
            let mut taps = Vec::new();
            forward(net, spec, x, h, w, saved, |layer, f, dims| {
                taps.push((layer, fallible::copied(f, "a tap's features")?, dims));
                Ok(())
            })?;
            Ok(taps)
        });
        let (computed, pred_taps) = (computed?, pred_taps?);
        if pred_taps.len() != computed.len() {
            return Err(Error::Internal("pred and target tap counts differ".into()));
        }
        for ((layer, f, dims), t) in pred_taps.into_iter().zip(&computed) {
            each(layer, &f, dims, t)?;
        }
        return Ok(computed);
    }
    let mut computed = target_taps()?;
    let mut k = 0;
    forward(net, spec, x, h, w, saved, |layer, f, dims| {
        let t = computed
            .get_mut(k)
            .ok_or_else(|| Error::Internal("the target has fewer taps".into()))?;
        k += 1;
        each(layer, f, dims, t)?;
        if !keep {
            *t = TapTarget::default();
        }
        Ok(())
    })?;
    Ok(computed)
}

/// One pass over the batch: each image's term sums, and, when `grad` is
/// given, the gradient with each term's slopes times `scales[term]`. With
/// `collect`, the tap data of target images it computed (`None` for kept
/// ones). Images go two at a time (`parts::both`: on a two-core machine, a
/// core each).
#[allow(clippy::too_many_arguments)]
fn pass<T: Element>(
    net: HostNet<'_>,
    spec: &PerceptualSpec,
    terms: &Terms,
    pred: &[T],
    target: &Target<'_, T>,
    s: Shape,
    grad: Option<HostGrad<'_, T>>,
    (scales, collect): (&[f64], bool),
) -> Result<(Vec<Vec<f64>>, Option<TapFeatures>)> {
    let (hw, image) = (s.h * s.w, s.image_len());
    let mut sums = fallible::with_capacity(s.n, "per-image losses")?;
    let mut collected = Vec::new();
    // What the gradient will hold once every image is done (blended with
    // beta and rounded, as a direct store would be), copied in at the end.
    let staged_len = if grad.is_some() { pred.len() } else { 0 };
    let mut staged = fallible::filled(staged_len, T::from_f64(0.0), "the staged input gradient")?;
    let run = |n: usize| {
        let at = (&pred[n * image..(n + 1) * image], n);
        image_pass(
            net,
            spec,
            terms,
            at,
            target,
            s,
            (grad.is_some(), scales, collect),
        )
    };
    let mut n = 0;
    while n < s.n {
        let (first, second) = match n + 1 < s.n {
            true => {
                let (a, b) = parts::both(|| run(n), || run(n + 1));
                (a?, Some(b?))
            }
            false => (run(n)?, None),
        };
        for done in std::iter::once(first).chain(second) {
            sums.push(done.sums);
            if let (true, Some(computed)) = (collect, done.computed) {
                collected.push(computed);
            }
            // Through the normalisation, and back to one channel for
            // grayscale.
            if let (Some(out), Some(g)) = (grad.as_ref(), done.grad) {
                for ch in 0..s.c {
                    for i in 0..hw {
                        let at = n * image + ch * hw + i;
                        staged[at] = out.blended(at, input_grad(&g, s.c, hw, spec.norm, ch, i));
                    }
                }
                net.weights.buffers.give(g);
            }
            n += 1;
        }
    }
    if let Some(out) = grad {
        out.values.copy_from_slice(&staged);
    }
    let collected = (collect && matches!(target, Target::Images(_))).then_some(collected);
    Ok((sums, collected))
}

/// What one image of a pass gives.
struct ImagePass {
    /// Its term sums.
    sums: Vec<f64>,
    /// The target's tap data, where it was computed from the image.
    computed: Option<Vec<TapTarget>>,
    /// The gradient w.r.t. its normalised image, when asked for.
    grad: Option<Vec<f32>>,
}

/// Pred image `n` (`pred`, CHW) of a pass against its target (images, as
/// [`against_target_image`] compares them, their tap data kept when
/// `collect`; or kept tap data).
fn image_pass<T: Element>(
    net: HostNet<'_>,
    spec: &PerceptualSpec,
    terms: &Terms,
    (pred, n): (&[T], usize),
    target: &Target<'_, T>,
    s: Shape,
    (want_grad, scales, collect): (bool, &[f64], bool),
) -> Result<ImagePass> {
    let mut saved = want_grad.then(Vec::new);
    let x = preprocess(pred, s.c, s.h * s.w, spec.norm)?;
    let mut tap = TapTerms {
        spec,
        terms,
        scales,
        want_grad,
        sums: vec![0.0; terms.terms.len()],
        grads: Vec::new(),
    };
    let dims = (s.c, s.h, s.w);
    let computed = match target {
        Target::Images(t) => {
            let image = &t[n * s.image_len()..(n + 1) * s.image_len()];
            let (x, saved) = ((x, image), (saved.as_mut(), collect));
            let each = |layer, f: &[f32], dims, t: &TapTarget| tap.add(layer, f, dims, t);
            let computed = against_target_image(net, spec, x, dims, saved, each)?;
            collect.then_some(computed)
        }
        // Kept tap data, one image's for any batch or one per pred image.
        Target::Features(f) => {
            let kept = &f[if f.len() == 1 { 0 } else { n }];
            let mut k = 0;
            forward(net, spec, x, s.h, s.w, saved.as_mut(), |layer, f, dims| {
                let t = kept.get(k);
                let t = t.ok_or_else(|| Error::Internal("the target has fewer taps".into()))?;
                k += 1;
                tap.add(layer, f, dims, t)
            })?;
            None
        }
    };
    let grad = match saved {
        Some(saved) => Some(backward(net, spec, saved, tap.grads)?),
        None => None,
    };
    Ok(ImagePass {
        sums: tap.sums,
        computed,
        grad,
    })
}

/// One pred image's terms, tap by tap: each term's sum and, when the
/// gradient is wanted, each tapped layer's gradient.
struct TapTerms<'a> {
    spec: &'a PerceptualSpec,
    terms: &'a Terms,
    scales: &'a [f64],
    want_grad: bool,
    sums: Vec<f64>,
    grads: Vec<(usize, Vec<f32>)>,
}

impl TapTerms<'_> {
    /// The terms at `layer`, whose pred features are `f` ((C, H*W) =
    /// `(c, m)`), against the target's tap data `t`.
    fn add(
        &mut self,
        layer: usize,
        f: &[f32],
        (c, m): (usize, usize),
        t: &TapTarget,
    ) -> Result<()> {
        let (spec, want_grad) = (self.spec, self.want_grad);
        let g_len = if want_grad { f.len() } else { 0 };
        let mut g = fallible::filled(g_len, 0f32, "a tap's gradient")?;
        if let Some(term) = self.terms.index(layer, false) {
            let scale = self.scales.get(term).copied().unwrap_or(0.0);
            self.sums[term] = match &spec.lpips {
                // LPIPS's taps are the perceptual taps, in order.
                Some(lin) => {
                    let slot = want_grad.then_some(&mut g[..]);
                    let lin = lin.layer(term);
                    let scale = lpips::cpu::Scale::All(scale);
                    lpips::cpu::tap_sum(f, &t.features, (c, m), lin, slot, scale)
                }
                None => {
                    let slot = want_grad.then(|| HostGrad {
                        values: &mut g[..],
                        beta: 0.0,
                    });
                    distance_sum(spec.criterion, f, &t.features, slot, scale)
                }
            };
        }
        if let Some(term) = self.terms.index(layer, true) {
            let gp = gram::gram(f, c, m)?;
            let e_len = if want_grad { gp.len() } else { 0 };
            let mut e = fallible::filled(e_len, 0f32, "a Gram matrix's gradient")?;
            let slot = want_grad.then(|| HostGrad {
                values: &mut e[..],
                beta: 0.0,
            });
            let scale = self.scales.get(term).copied().unwrap_or(0.0);
            self.sums[term] = distance_sum(spec.style_criterion, &gp, &t.gram, slot, scale);
            if want_grad {
                let mut gs = fallible::filled(f.len(), 0f32, "a style tap's gradient")?;
                gram::gram_backward(&e, f, c, m, &mut gs)?;
                g.iter_mut().zip(&gs).for_each(|(a, b)| *a += b);
            }
        }
        if want_grad {
            self.grads.push((layer, g));
        }
        Ok(())
    }
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
    let buffers = &net.weights.buffers;
    let (mut next, mut cols) = (buffers.take(), buffers.take());
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
    buffers.give(next);
    buffers.give(cols);
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

/// One layer's per-pixel values and its (h, w).
pub(crate) type LayerMap = (Vec<f64>, (usize, usize));

/// LPIPS's per-layer maps of one pred image against one target image (CHW,
/// `dims` = (C, H, W)), tap by tap.
pub(crate) fn lpips_maps<T: Element>(
    net: HostNet<'_>,
    spec: &PerceptualSpec,
    (pred, target): (&[T], &[T]),
    dims: (usize, usize, usize),
) -> Result<Vec<LayerMap>> {
    let lin = (spec.lpips.as_ref())
        .ok_or_else(|| Error::Internal("LPIPS maps of a loss that is not LPIPS".into()))?;
    let (c, h, w) = dims;
    let layer_dims = output_dims(net.layers, (3, h, w));
    let x = preprocess(pred, c, h * w, spec.norm)?;
    let mut maps = Vec::new();
    against_target_image(
        net,
        spec,
        (x, target),
        dims,
        (None, false),
        |layer, f, cm, t| {
            let values = lpips::cpu::pixel_values(f, &t.features, cm, lin.layer(maps.len()));
            maps.push((values, (layer_dims[layer].1, layer_dims[layer].2)));
            Ok(())
        },
    )?;
    Ok(maps)
}

/// dL/dpred (CHW, the caller's channels, into `out`) of one pred image
/// against one target image (`dims` = (C, H, W)) from `map_grad` (H x
/// W), the gradient of LPIPS's spatial map with the weight applied: each
/// layer's map was resized to H x W and summed, so the layer's per-pixel
/// values get `map_grad` brought back to their resolution (the resize's
/// adjoint), which weights their gradients.
pub(crate) fn lpips_map_grad<T: Element>(
    net: HostNet<'_>,
    spec: &PerceptualSpec,
    (pred, target): (&[T], &[T]),
    dims: (usize, usize, usize),
    map_grad: &[f64],
    out: &mut [f64],
) -> Result<()> {
    let lin = (spec.lpips.as_ref())
        .ok_or_else(|| Error::Internal("LPIPS maps of a loss that is not LPIPS".into()))?;
    let (c, h, w) = dims;
    let hw = h * w;
    let layer_dims = output_dims(net.layers, (3, h, w));
    let mut saved = Vec::new();
    let x = preprocess(pred, c, hw, spec.norm)?;
    let mut tap_grads: Vec<(usize, Vec<f32>)> = Vec::new();
    let saved_here = (Some(&mut saved), false);
    against_target_image(
        net,
        spec,
        (x, target),
        dims,
        saved_here,
        |layer, f, cm, t| {
            let (_, lh, lw) = layer_dims[layer];
            let scale = lpips::cpu::upsampled_grad(map_grad, (h, w), (lh, lw))?;
            let mut g = fallible::filled(f.len(), 0f32, "a tap's gradient")?;
            let pixels = lpips::cpu::Scale::Pixels(&scale);
            let lin = lin.layer(tap_grads.len());
            lpips::cpu::tap_sum(f, &t.features, cm, lin, Some(&mut g), pixels);
            tap_grads.push((layer, g));
            Ok(())
        },
    )?;
    let g = backward(net, spec, saved, tap_grads)?;
    for ch in 0..c {
        for i in 0..hw {
            out[ch * hw + i] = input_grad(&g, c, hw, spec.norm, ch, i);
        }
    }
    net.weights.buffers.give(g);
    Ok(())
}

/// The loss of `io.inputs[0]` (pred) against a kept target's `features`
/// (one image's, for any batch, or one per pred image).
pub(crate) fn with_features<T: Element>(
    net: HostNet<'_>,
    spec: &PerceptualSpec,
    io: HostIo<'_, T, 1>,
    features: &TapFeatures,
) -> Result<Values> {
    let [pred] = io.inputs;
    let target = Target::Features(features);
    Ok(network(net, spec, pred, target, io.shape, io.grad, false)?.0)
}

impl TargetCache {
    /// Every image's tap features of `target` (of shape `s`).
    pub(crate) fn features_of<T: Element>(
        net: HostNet<'_>,
        spec: &PerceptualSpec,
        target: &[T],
        s: Shape,
    ) -> Result<TapFeatures> {
        target
            .chunks_exact(s.image_len())
            .map(|image| image_features(net, spec, image, (s.c, s.h, s.w)))
            .collect()
    }

    /// The loss of `io.inputs[0]` (pred) against `io.inputs[1]` (target):
    /// against the previous call's tap data when the target is the same
    /// (same shape, dtype and bytes); else with the target's forward run
    /// beside pred's, its tap data kept for the next call when small
    /// enough.
    pub(crate) fn evaluate<T: Element>(
        &self,
        net: HostNet<'_>,
        spec: &PerceptualSpec,
        io: HostIo<'_, T, 2>,
    ) -> Result<Values> {
        let [pred, target] = io.inputs;
        let (s, bytes) = (io.shape, as_bytes(target));
        // The lock is let go before the call runs.
        let hit = (self.last.lock().map_err(|_| Error::poisoned())?.as_ref())
            .filter(|k| k.shape == s && k.dtype == T::DTYPE && k.input == bytes)
            .map(|k| k.features.clone());
        if let Some(features) = hit {
            let target = Target::Features(&features);
            return Ok(network(net, spec, pred, target, s, io.grad, false)?.0);
        }
        let keep = Self::fits(net, spec, s, bytes.len());
        // Computed without the lock: other threads' calls go on meanwhile.
        let target = Target::Images(target);
        let (values, features) = network(net, spec, pred, target, s, io.grad, keep)?;
        if let Some(features) = features {
            *self.last.lock().map_err(|_| Error::poisoned())? = Some(KeptTarget {
                shape: s,
                dtype: T::DTYPE,
                input: fallible::copied(bytes, "the kept target")?,
                features: Arc::new(features),
            });
        }
        Ok(values)
    }

    /// Whether a target of shape `s` and `bytes` input bytes is kept
    /// between calls: with its tap data, at most `TARGET_CACHE_BYTES`.
    fn fits(net: HostNet<'_>, spec: &PerceptualSpec, s: Shape, bytes: usize) -> bool {
        let dims = output_dims(net.layers, (3, s.h, s.w));
        let features = spec
            .taps
            .iter()
            .map(|&(l, _)| dims[l].0 * dims[l].1 * dims[l].2);
        let grams = spec.style.iter().map(|&(l, _)| dims[l].0 * dims[l].0);
        let per_image: usize = features.chain(grams).sum();
        s.n * per_image * 4 + bytes <= TARGET_CACHE_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::perceptual::{PerceptualConfig, PerceptualLoss};
    use crate::vgg::VggArch;

    #[test]
    fn kept_target_features_give_the_same_bits_as_the_images() {
        let with_style = PerceptualConfig {
            style_taps: vec![3.into(), 6.into()],
            ..Default::default()
        };
        for config in [PerceptualConfig::default(), with_style] {
            kept_target_gives_the_images_bits(&config);
        }
    }

    /// A batch of three (two images side by side, then one alone) gives
    /// each image what it gives alone: its per-sample value, and its
    /// gradient over the batch size; and keeps every image's target taps.
    #[test]
    fn images_run_in_pairs_give_each_image_its_own_loss_and_gradient() {
        let loss = PerceptualLoss::seeded(VggArch::Vgg16, &PerceptualConfig::default());
        let net = HostNet {
            layers: loss.vgg().layers(),
            weights: loss.vgg().host_weights().unwrap(),
        };
        let s = Shape::new(3, 3, 16, 12);
        let len = s.n * s.image_len();
        let pred: Vec<f32> = (0..len).map(|i| (i * 7 % 97) as f32 / 97.0).collect();
        let target: Vec<f32> = (0..len).map(|i| (i * 5 % 89) as f32 / 89.0).collect();
        let run = |pred: &[f32], target: &[f32], s: Shape| {
            let mut grad = vec![0f32; pred.len()];
            let out = HostGrad {
                values: &mut grad,
                beta: 0.0,
            };
            let t = Target::Images(target);
            let values = network(net, loss.spec(), pred, t, s, Some(out), false)
                .unwrap()
                .0;
            (values, grad)
        };
        let (batch, batch_grad) = run(&pred, &target, s);
        // What a call keeps for the target cache is every image's tap
        // data, paired or not, and with a Fro term's two passes.
        let fro = PerceptualConfig {
            criterion: Criterion::Fro,
            ..Default::default()
        };
        for loss in [&loss, &PerceptualLoss::seeded(VggArch::Vgg16, &fro)] {
            let mut grad = vec![0f32; len];
            let out = HostGrad {
                values: &mut grad,
                beta: 0.0,
            };
            let t = Target::Images(&target[..]);
            let kept = network(net, loss.spec(), &pred, t, s, Some(out), true)
                .unwrap()
                .1;
            let want = TargetCache::features_of(net, loss.spec(), &target, s).unwrap();
            assert_eq!(kept, Some(want), "the kept tap data");
        }
        for n in 0..s.n {
            let image = n * s.image_len()..(n + 1) * s.image_len();
            let one = Shape { n: 1, ..s };
            let (alone, grad) = run(&pred[image.clone()], &target[image.clone()], one);
            let (got, want) = (batch.per_sample[n], alone.loss);
            assert!(
                (got - want).abs() <= 1e-6 * want,
                "image {n}: {got} vs {want}"
            );
            // To f32 rounding (the batch's weight is rounded to f32 over
            // three images, the image's alone over one).
            let largest = grad.iter().fold(0f32, |m, g| m.max(g.abs()));
            for (i, (b, a)) in batch_grad[image].iter().zip(&grad).enumerate() {
                let want = a / s.n as f32;
                assert!(
                    (b - want).abs() <= 1e-5 * largest,
                    "image {n} grad[{i}]: {b} vs {want}"
                );
            }
        }
    }

    /// LPIPS's maps and their gradient give the same bits whether the
    /// target's forward runs beside pred's (here, on a two-core machine;
    /// elsewhere both runs take the other path) or before it, its taps
    /// compared as pred's forward reaches them (in a branch of
    /// `parts::both`, where nothing runs beside).
    #[test]
    fn lpips_maps_are_the_same_with_the_target_beside_or_before() {
        let bytes = crate::vgg::seeded_safetensors(VggArch::Vgg16, 4).unwrap();
        let source = crate::vgg::WeightsSource::Bytes(&bytes);
        let vgg = crate::Vgg::load(&crate::Device::cpu(), source, VggArch::Vgg16, DType::F32);
        let lpips = crate::Lpips::new(vgg.unwrap(), &Default::default()).unwrap();
        let (loss, dims) = (lpips.perceptual(), (3, 16, 20));
        let net = HostNet {
            layers: loss.vgg().layers(),
            weights: loss.vgg().host_weights().unwrap(),
        };
        let len = 3 * 16 * 20;
        let pred: Vec<f32> = (0..len).map(|i| (i * 7 % 97) as f32 / 48.5 - 1.0).collect();
        let target: Vec<f32> = (0..len).map(|i| (i * 5 % 89) as f32 / 44.5 - 1.0).collect();
        let map_grad: Vec<f64> = (0..16 * 20).map(|i| (i % 13) as f64 / 13.0).collect();
        let run = || {
            let maps = lpips_maps(net, loss.spec(), (&pred, &target), dims).unwrap();
            let mut grad = vec![0f64; len];
            let images = (&pred[..], &target[..]);
            lpips_map_grad(net, loss.spec(), images, dims, &map_grad, &mut grad).unwrap();
            (maps, grad)
        };
        let (here, (before, beside)) = (run(), parts::both(run, parts::together));
        assert!(!beside, "a branch of parts::both runs nothing beside it");
        assert_eq!(here.0.len(), 5);
        assert!(here.1.iter().any(|&g| g != 0.0));
        assert_eq!(here, before);
    }

    fn kept_target_gives_the_images_bits(config: &PerceptualConfig) {
        let loss = PerceptualLoss::seeded(VggArch::Vgg16, config);
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
            let values = network(net, loss.spec(), &pred, t, s, Some(out), false)
                .unwrap()
                .0;
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
