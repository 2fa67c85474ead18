//! The perceptual loss's GPU work as a list of steps: which pass reads and
//! writes which buffer, with which mask, argmax and tap gradient. Pure data,
//! so the order and buffer bookkeeping are tested on the CPU (the tests
//! below run each step with a plain CPU implementation and compare with the
//! CPU backend); `perceptual.rs` turns each step into a kernel launch or a
//! cuDNN call.
//!
//! Buffers: `Act(i)` ping-pong activations of the 2N batch [pred; target]
//! (NHWC), `Grad(i)` ping-pong gradients of the pred half, and per-layer
//! side buffers (ReLU masks, pool argmax, gradients of inner taps) named by
//! layer position.

use crate::loss::perceptual::Plan;
use crate::vgg::{Layer, Module, Pooling};

/// Channels the 3-channel input is padded to, for tensor-core friendly strides.
pub(crate) const INPUT_CHANNELS: usize = 8;

/// Where a tap writes its gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TapGrad {
    /// The deepest tap starts backward in `Grad(0)`.
    Start,
    /// An inner tap's own buffer, added in on the way back.
    Inner(usize),
}

/// (channels, height, width) of one image's activation.
pub(crate) type Dims = (usize, usize, usize);

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// Caller pred and target -> `Act(0)`, normalised and channel-padded.
    Preprocess,
    /// `Act(from)` -> `Act(to)` through conv `conv` of layer `k` (no bias).
    ConvForward {
        k: usize,
        conv: usize,
        from: usize,
        to: usize,
    },
    /// In place on `Act(act)`: + bias of conv `bias`, then ReLU if `relu`;
    /// the pred half's positive mask into layer `mask`'s buffer.
    BiasAct {
        act: usize,
        bias: Option<usize>,
        relu: bool,
        mask: Option<usize>,
        dims: Dims,
    },
    /// `Act(from)` (of `input` dims) -> `Act(to)`, argmax into layer `argmax`'s buffer.
    Pool {
        from: usize,
        to: usize,
        argmax: Option<usize>,
        input: Dims,
    },
    /// The distance between the halves of `Act(act)`, its gradient into `grad`.
    Tap {
        act: usize,
        grad: Option<TapGrad>,
        dims: Dims,
        weight: f64,
        accumulate: bool,
    },
    /// In place on `Grad(g)` through ReLU layer `mask`: g = (g + tap `before`) * mask + tap `after`.
    ReluBackward {
        g: usize,
        before: Option<usize>,
        mask: Option<usize>,
        after: Option<usize>,
        dims: Dims,
    },
    /// `Grad(from)` (+ tap `before`) -> `Grad(to)` of `input` dims through pool layer `k`.
    Unpool {
        from: usize,
        to: usize,
        before: Option<usize>,
        argmax: Option<usize>,
        input: Dims,
    },
    /// `Grad(from)` -> `Grad(to)` through conv `conv` of layer `k`, transposed.
    ConvBackward {
        k: usize,
        conv: usize,
        from: usize,
        to: usize,
    },
    /// `Grad(g)` -> the caller's gradient, through the normalisation.
    InputGrad { g: usize },
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

/// The steps of one call. `accumulate`: the loss already holds an earlier
/// chunk's share, so every tap adds to it.
pub(crate) fn schedule(
    layers: &[Layer],
    plan: &Plan,
    h: usize,
    w: usize,
    want_grad: bool,
    accumulate: bool,
) -> Vec<Step> {
    let layers = &layers[..=plan.deepest()];
    let dims = layer_dims(layers, h, w);
    let input = |k: usize| {
        if k == 0 {
            (INPUT_CHANNELS, h, w)
        } else {
            dims[k - 1]
        }
    };
    let is_tap = |k: usize| plan.tap_weight(layers[k].index).is_some();
    let deepest = layers.len() - 1;
    let inner_tap = |k: usize| (is_tap(k) && k != deepest).then_some(k);
    let mut steps = vec![Step::Preprocess];
    let mut cur = 0;
    let mut first_tap = !accumulate;
    for (k, layer) in layers.iter().enumerate() {
        match layer.module {
            Module::Conv { conv, .. } => {
                steps.push(Step::ConvForward {
                    k,
                    conv,
                    from: cur,
                    to: 1 - cur,
                });
                cur = 1 - cur;
                if is_tap(k) {
                    // A pre-activation tap: the bias now, the ReLU after the tap.
                    steps.push(Step::BiasAct {
                        act: cur,
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
                let mask = want_grad.then_some(k);
                steps.push(Step::BiasAct {
                    act: cur,
                    bias,
                    relu: true,
                    mask,
                    dims: dims[k],
                });
            }
            Module::Pool => {
                let argmax = (want_grad && plan.pooling == Pooling::Max).then_some(k);
                steps.push(Step::Pool {
                    from: cur,
                    to: 1 - cur,
                    argmax,
                    input: input(k),
                });
                cur = 1 - cur;
            }
        }
        if let Some(tap_weight) = plan.tap_weight(layer.index) {
            let grad = want_grad.then(|| inner_tap(k).map_or(TapGrad::Start, TapGrad::Inner));
            steps.push(Step::Tap {
                act: cur,
                grad,
                dims: dims[k],
                weight: tap_weight * plan.weight,
                accumulate: !first_tap,
            });
            first_tap = false;
        }
    }
    if !want_grad {
        return steps;
    }
    let mut g = 0;
    for (k, layer) in layers.iter().enumerate().rev() {
        match layer.module {
            // A tap on the convolution before adds after the mask.
            Module::Relu => steps.push(Step::ReluBackward {
                g,
                before: inner_tap(k),
                mask: Some(k),
                after: inner_tap(k - 1),
                dims: dims[k],
            }),
            Module::Pool => {
                let argmax = (plan.pooling == Pooling::Max).then_some(k);
                steps.push(Step::Unpool {
                    from: g,
                    to: 1 - g,
                    before: inner_tap(k),
                    argmax,
                    input: input(k),
                });
                g = 1 - g;
            }
            Module::Conv { conv, .. } => {
                steps.push(Step::ConvBackward {
                    k,
                    conv,
                    from: g,
                    to: 1 - g,
                });
                g = 1 - g;
            }
        }
    }
    steps.push(Step::InputGrad { g });
    steps
}

#[cfg(test)]
mod tests {
    //! Runs the schedule with a direct CPU implementation of every step, in
    //! the GPU's layouts (NHWC, padded input channels, bit-packed masks,
    //! byte argmax, [pred; target] batches), and compares with the CPU
    //! backend: this checks the order of the steps and which buffer each
    //! one reads and writes, independently of the GPU kernels.

    use super::*;
    use crate::loss::feature::Criterion;
    use crate::loss::perceptual::{InputNorm, PerceptualConfig, PerceptualLoss, Tap};
    use crate::tensor::Shape;
    use crate::vgg::{seeded_safetensors, Vgg, VggArch, WeightsSource};
    use crate::Device;
    use std::collections::HashMap;

    struct Run<'a> {
        vgg: &'a Vgg,
        plan: &'a Plan,
        s: Shape,
        batch: usize,
        act: [Vec<f32>; 2],
        grad: [Vec<f32>; 2],
        masks: HashMap<usize, Vec<u32>>,
        argmax: HashMap<usize, Vec<u8>>,
        tap_grads: HashMap<usize, Vec<f32>>,
        loss: f64,
    }

    impl Run<'_> {
        /// Input dims of layer k.
        fn input(&self, k: usize) -> Dims {
            let dims = layer_dims(
                &self.vgg.layers()[..=self.plan.deepest()],
                self.s.h,
                self.s.w,
            );
            if k == 0 {
                (INPUT_CHANNELS, self.s.h, self.s.w)
            } else {
                dims[k - 1]
            }
        }

        fn output(&self, k: usize) -> Dims {
            layer_dims(
                &self.vgg.layers()[..=self.plan.deepest()],
                self.s.h,
                self.s.w,
            )[k]
        }

        fn step(&mut self, step: &Step, pred: &[f32], target: &[f32], caller_grad: &mut [f32]) {
            let n = self.s.n;
            match *step {
                Step::Preprocess => {
                    let (h, w, c) = (self.s.h, self.s.w, self.s.c);
                    let mut out = vec![0f32; 2 * n * h * w * INPUT_CHANNELS];
                    for img in 0..2 * n {
                        let (src, m) = if img < n {
                            (pred, img)
                        } else {
                            (target, img - n)
                        };
                        for i in 0..h * w {
                            for ch in 0..3 {
                                let (a, b) = self.plan.norm.affine(ch);
                                let sc = if c == 1 { 0 } else { ch };
                                out[(img * h * w + i) * INPUT_CHANNELS + ch] =
                                    (src[(m * c + sc) * h * w + i] as f64 * a + b) as f32;
                            }
                        }
                    }
                    self.act[0] = out;
                }
                Step::ConvForward { k, conv, from, to } => {
                    let ((ci, h, w), (co, _, _)) = (self.input(k), self.output(k));
                    let p = &self.vgg.host_convs().unwrap()[conv];
                    let x = &self.act[from];
                    let mut y = vec![0f32; 2 * n * h * w * co];
                    for img in 0..2 * n {
                        for i in 0..h {
                            for j in 0..w {
                                for o in 0..co {
                                    let mut acc = 0f32;
                                    for (ky, kx) in (0..3).flat_map(|a| (0..3).map(move |b| (a, b)))
                                    {
                                        let (si, sj) = (
                                            i as isize + ky as isize - 1,
                                            j as isize + kx as isize - 1,
                                        );
                                        if si < 0 || sj < 0 || si as usize >= h || sj as usize >= w
                                        {
                                            continue;
                                        }
                                        for c in 0..p.in_c.min(ci) {
                                            acc += p.weight[((o * p.in_c + c) * 3 + ky) * 3 + kx]
                                                * x[((img * h + si as usize) * w + sj as usize)
                                                    * ci
                                                    + c];
                                        }
                                    }
                                    y[((img * h + i) * w + j) * co + o] = acc;
                                }
                            }
                        }
                    }
                    self.act[to] = y;
                }
                Step::BiasAct {
                    act,
                    bias,
                    relu,
                    mask,
                    dims: (c, h, w),
                } => {
                    let pred_count = n * h * w * c;
                    let mut bits = vec![0u32; pred_count / 32];
                    for (idx, v) in self.act[act].iter_mut().enumerate() {
                        if let Some(b) = bias {
                            *v += self.vgg.host_convs().unwrap()[b].bias[idx % c];
                        }
                        if relu && *v <= 0.0 {
                            *v = 0.0;
                        }
                        if idx < pred_count && *v > 0.0 {
                            bits[idx / 32] |= 1 << (idx % 32);
                        }
                    }
                    if let Some(k) = mask {
                        self.masks.insert(k, bits);
                    }
                }
                Step::Pool {
                    from,
                    to,
                    argmax,
                    input: (c, h, w),
                } => {
                    let (oh, ow) = (h / 2, w / 2);
                    let x = &self.act[from];
                    let mut y = vec![0f32; 2 * n * oh * ow * c];
                    let mut arg = vec![0u8; n * oh * ow * c];
                    for (o, out) in y.iter_mut().enumerate() {
                        let (ch, rest) = (o % c, o / c);
                        let (j, rest) = (rest % ow, rest / ow);
                        let (i, img) = (rest % oh, rest / oh);
                        let at =
                            |q: usize| x[((img * h + 2 * i + q / 2) * w + 2 * j + q % 2) * c + ch];
                        if self.plan.pooling == Pooling::Avg {
                            *out = (0..4).map(at).sum::<f32>() / 4.0;
                        } else {
                            let best = (1..4).fold(0, |b, q| if at(q) > at(b) { q } else { b });
                            *out = at(best);
                            if img < n {
                                arg[o] = best as u8;
                            }
                        }
                    }
                    self.act[to] = y;
                    if let Some(k) = argmax {
                        self.argmax.insert(k, arg);
                    }
                }
                Step::Tap {
                    act,
                    grad,
                    dims: (c, h, w),
                    weight,
                    accumulate,
                } => {
                    let per_image = c * h * w;
                    let x = &self.act[act];
                    let mae = self.plan.criterion == Criterion::Mae;
                    let mut total = 0.0;
                    let mut g = vec![0f32; n * per_image];
                    for i in 0..n * per_image {
                        let d = (x[i] - x[n * per_image + i]) as f64;
                        total += if mae { d.abs() } else { d * d };
                        let slope = if mae { crate::cpu::sign(d) } else { 2.0 * d };
                        g[i] = (weight * slope / (self.batch * per_image) as f64) as f32;
                    }
                    let value = weight * total / (self.batch * per_image) as f64;
                    self.loss = if accumulate { self.loss + value } else { value };
                    match grad {
                        Some(TapGrad::Start) => self.grad[0] = g,
                        Some(TapGrad::Inner(k)) => {
                            self.tap_grads.insert(k, g);
                        }
                        None => {}
                    }
                }
                Step::ReluBackward {
                    g,
                    before,
                    mask,
                    after,
                    ..
                } => {
                    let bits = mask.map(|k| self.masks[&k].clone());
                    for (i, v) in self.grad[g].iter_mut().enumerate() {
                        if let Some(b) = before {
                            *v += self.tap_grads[&b][i];
                        }
                        if let Some(m) = &bits {
                            if (m[i / 32] >> (i % 32)) & 1 == 0 {
                                *v = 0.0;
                            }
                        }
                        if let Some(a) = after {
                            *v += self.tap_grads[&a][i];
                        }
                    }
                }
                Step::Unpool {
                    from,
                    to,
                    before,
                    argmax,
                    input: (c, h, w),
                } => {
                    let (oh, ow) = (h / 2, w / 2);
                    let mut gx = vec![0f32; n * h * w * c];
                    for o in 0..n * oh * ow * c {
                        let (ch, rest) = (o % c, o / c);
                        let (j, rest) = (rest % ow, rest / ow);
                        let (i, img) = (rest % oh, rest / oh);
                        let gy = self.grad[from][o] + before.map_or(0.0, |b| self.tap_grads[&b][o]);
                        for q in 0..4 {
                            let at = ((img * h + 2 * i + q / 2) * w + 2 * j + q % 2) * c + ch;
                            gx[at] = match argmax {
                                Some(k) if self.argmax[&k][o] as usize == q => gy,
                                Some(_) => 0.0,
                                None => gy / 4.0,
                            };
                        }
                    }
                    self.grad[to] = gx;
                }
                Step::ConvBackward { k, conv, from, to } => {
                    let ((ci, h, w), (co, _, _)) = (self.input(k), self.output(k));
                    let p = &self.vgg.host_convs().unwrap()[conv];
                    let dy = &self.grad[from];
                    let mut dx = vec![0f32; n * h * w * ci];
                    for img in 0..n {
                        for i in 0..h {
                            for j in 0..w {
                                for (ky, kx) in (0..3).flat_map(|a| (0..3).map(move |b| (a, b))) {
                                    let (si, sj) = (
                                        i as isize + ky as isize - 1,
                                        j as isize + kx as isize - 1,
                                    );
                                    if si < 0 || sj < 0 || si as usize >= h || sj as usize >= w {
                                        continue;
                                    }
                                    for o in 0..co {
                                        let g = dy[((img * h + i) * w + j) * co + o];
                                        for c in 0..p.in_c.min(ci) {
                                            dx[((img * h + si as usize) * w + sj as usize) * ci
                                                + c] +=
                                                p.weight[((o * p.in_c + c) * 3 + ky) * 3 + kx] * g;
                                        }
                                    }
                                }
                            }
                        }
                    }
                    self.grad[to] = dx;
                }
                Step::InputGrad { g } => {
                    let (h, w, c) = (self.s.h, self.s.w, self.s.c);
                    for img in 0..n {
                        for ch in 0..c {
                            for i in 0..h * w {
                                let at = (img * h * w + i) * INPUT_CHANNELS;
                                let v: f64 = if c == 1 {
                                    (0..3)
                                        .map(|k| {
                                            self.grad[g][at + k] as f64 * self.plan.norm.affine(k).0
                                        })
                                        .sum()
                                } else {
                                    self.grad[g][at + ch] as f64 * self.plan.norm.affine(ch).0
                                };
                                caller_grad[(img * c + ch) * h * w + i] = v as f32;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Loss and gradient through the schedule, in chunks of `chunk` images.
    fn through_schedule(
        loss: &PerceptualLoss,
        pred: &[f32],
        target: &[f32],
        s: Shape,
        chunk: usize,
    ) -> (f64, Vec<f32>) {
        let (vgg, plan) = (loss.vgg().as_ref(), loss.plan());
        let image = s.c * s.h * s.w;
        let mut grad = vec![f32::NAN; pred.len()];
        let mut value = 0.0;
        for start in (0..s.n).step_by(chunk) {
            let images = chunk.min(s.n - start);
            let cs = Shape::new(images, s.c, s.h, s.w);
            let mut run = Run {
                vgg,
                plan,
                s: cs,
                batch: s.n,
                act: Default::default(),
                grad: Default::default(),
                masks: HashMap::new(),
                argmax: HashMap::new(),
                tap_grads: HashMap::new(),
                loss: value,
            };
            let range = start * image..(start + images) * image;
            for step in schedule(vgg.layers(), plan, s.h, s.w, true, start > 0) {
                run.step(
                    &step,
                    &pred[range.clone()],
                    &target[range.clone()],
                    &mut grad[range.clone()],
                );
            }
            value = run.loss;
        }
        (value, grad)
    }

    fn check(arch: VggArch, config: PerceptualConfig, s: Shape, chunk: usize) {
        let bytes = seeded_safetensors(arch, 9).unwrap();
        let vgg = Vgg::load(
            &Device::cpu(),
            WeightsSource::Bytes(&bytes),
            arch,
            crate::DType::F32,
        )
        .unwrap();
        let loss = PerceptualLoss::new(vgg, &config).unwrap();
        let count = s.n * s.c * s.h * s.w;
        let pred: Vec<f32> = (0..count)
            .map(|i| ((i * 7919) % 997) as f32 / 997.0)
            .collect();
        let target: Vec<f32> = (0..count)
            .map(|i| ((i * 104_729) % 991) as f32 / 991.0)
            .collect();
        let (got, got_grad) = through_schedule(&loss, &pred, &target, s, chunk);
        let (mut want, mut want_grad) = (0f32, vec![0f32; count]);
        loss.compute(
            &crate::TensorRef::host(&pred, s).unwrap(),
            &crate::TensorRef::host(&target, s).unwrap(),
            crate::LossOutputs::new(crate::TensorMut::scalar(&mut want))
                .with_grad(crate::TensorMut::host(&mut want_grad, s).unwrap()),
        )
        .unwrap();
        let what = format!("{arch:?} {config:?} {s} chunk {chunk}");
        assert!(
            (got - want as f64).abs() <= 1e-4 * want.abs() as f64,
            "{what}: loss {got} vs {want}"
        );
        let scale = want_grad.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in got_grad.iter().zip(&want_grad).enumerate() {
            assert!(
                (a - b).abs() <= 1e-3 * b.abs() + 1e-4 * scale,
                "{what}: grad[{i}] {a} vs {b}"
            );
        }
    }

    #[test]
    fn article_defaults() {
        check(
            VggArch::Vgg16,
            PerceptualConfig::default(),
            Shape::new(2, 3, 16, 12),
            2,
        );
    }

    #[test]
    fn chunks_add_up_to_the_batch() {
        check(
            VggArch::Vgg16,
            PerceptualConfig::default(),
            Shape::new(3, 3, 16, 12),
            2,
        );
    }

    #[test]
    fn conv_taps_mae_imagenet() {
        let config = PerceptualConfig {
            taps: ["conv1_2", "relu2_1", "conv3_4"]
                .into_iter()
                .map(Tap::from)
                .collect(),
            tap_weights: vec![0.5, 1.0, 2.0],
            criterion: Criterion::Mae,
            input_norm: InputNorm::Imagenet,
            ..Default::default()
        };
        check(VggArch::Vgg19, config, Shape::new(2, 3, 12, 16), 2);
    }

    #[test]
    fn pool_taps_average_pooling_grayscale() {
        let config = PerceptualConfig {
            taps: ["pool1", "relu2_2", "pool2"]
                .into_iter()
                .map(Tap::from)
                .collect(),
            pooling: Pooling::Avg,
            input_norm: InputNorm::ImagenetFromPm1,
            weight: 3.0,
            ..Default::default()
        };
        check(VggArch::Vgg16, config, Shape::new(2, 1, 13, 11), 1);
        let max_pools = PerceptualConfig {
            taps: vec!["pool1".into(), "pool2".into()],
            ..Default::default()
        };
        check(VggArch::Vgg16, max_pools, Shape::new(1, 3, 12, 12), 1);
    }

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
        let steps = schedule(loss.vgg().layers(), loss.plan(), 16, 16, false, false);
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
