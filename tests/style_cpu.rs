//! Style (Gram) terms and the Fro criterion of the perceptual loss on the
//! CPU, against a float64 oracle written here from the definitions (Gram
//! G = F F^T / (C H W) of each image's C x HW feature map; MSE and MAE the
//! mean over the batch's N*C*C entries, Fro the norm of the whole N x C x C
//! difference; BasicSR's perceptual and style losses) over the direct
//! convolutions of tests/common/vgg.rs, and finite differences of it.

mod common;

use common::vgg::Net;
use common::{assert_close, assert_rel, Rng};
use perceptual_loss::{
    Criterion, DType, LossOutputs, PerceptualConfig, PerceptualLoss, Shape, Tap, TensorMut,
    TensorRef, TvConfig, TvLoss, VggArch,
};
use safetensors::Dtype;

/// One loss configuration as the oracle reads it.
struct Terms {
    taps: Vec<(usize, f64)>,
    criterion: Criterion,
    weight: f64,
    style: Vec<(usize, f64)>,
    style_criterion: Criterion,
    style_weight: f64,
}

impl Terms {
    fn config(&self) -> PerceptualConfig {
        PerceptualConfig {
            taps: self.taps.iter().map(|t| Tap::Index(t.0)).collect(),
            tap_weights: self.taps.iter().map(|t| t.1 as f32).collect(),
            criterion: self.criterion,
            weight: self.weight as f32,
            style_taps: self.style.iter().map(|t| Tap::Index(t.0)).collect(),
            style_tap_weights: self.style.iter().map(|t| t.1 as f32).collect(),
            style_criterion: self.style_criterion,
            style_weight: self.style_weight as f32,
            ..Default::default()
        }
    }
}

/// The Gram matrix of a C x M map, C x C.
fn gram(f: &[f64], c: usize) -> Vec<f64> {
    let m = f.len() / c;
    let mut g = vec![0.0; c * c];
    for i in 0..c {
        for j in 0..c {
            let dot: f64 = (0..m).map(|p| f[i * m + p] * f[j * m + p]).sum();
            g[i * c + j] = dot / (c * m) as f64;
        }
    }
    g
}

/// D between stacked batches: the mean of squares or absolute values, or
/// the norm of the whole difference.
fn distance(criterion: Criterion, a: &[f64], b: &[f64]) -> f64 {
    let d = a.iter().zip(b).map(|(x, y)| x - y);
    match criterion {
        Criterion::Mse => d.map(|v| v * v).sum::<f64>() / a.len() as f64,
        Criterion::Mae => d.map(f64::abs).sum::<f64>() / a.len() as f64,
        Criterion::Fro => d.map(|v| v * v).sum::<f64>().sqrt(),
    }
}

/// (perceptual, style) of a batch, from the definitions.
fn oracle(net: &Net, t: &Terms, pred: &[f64], target: &[f64], s: Shape) -> [f64; 2] {
    let image = s.c * s.h * s.w;
    let last = t.taps.iter().chain(&t.style).map(|x| x.0).max().unwrap();
    // Per layer, the batch's features and Grams, stacked image after image.
    let stack = |x: &[f64]| -> Vec<(Vec<f64>, Vec<f64>)> {
        let mut per_layer = vec![(Vec::new(), Vec::new()); last + 1];
        for k in 0..s.n {
            let outs = net.features(&x[k * image..(k + 1) * image], s.h, s.w, last, false);
            for (layer, f) in outs.iter().enumerate() {
                per_layer[layer].0.extend(f);
                per_layer[layer].1.extend(gram(f, net.channels(layer)));
            }
        }
        per_layer
    };
    let (p, q) = (stack(pred), stack(target));
    let perceptual: f64 = (t.taps.iter())
        .map(|&(l, w)| w * distance(t.criterion, &p[l].0, &q[l].0))
        .sum();
    let style: f64 = (t.style.iter())
        .map(|&(l, w)| w * distance(t.style_criterion, &p[l].1, &q[l].1))
        .sum();
    [t.weight * perceptual, t.style_weight * style]
}

/// Loss, parts, per-sample values and gradient of a CPU call.
struct Out {
    loss: f64,
    parts: [f64; 2],
    per_sample: Vec<f64>,
    grad: Vec<f64>,
}

fn run(loss: &PerceptualLoss, pred: &[f32], target: &[f32], s: Shape) -> Out {
    let (mut value, mut parts) = (f32::NAN, [f32::NAN; 2]);
    let (mut per, mut grad) = (vec![f32::NAN; s.n], vec![f32::NAN; pred.len()]);
    loss.compute(
        &TensorRef::host(pred, s).unwrap(),
        &TensorRef::host(target, s).unwrap(),
        LossOutputs::new(TensorMut::scalar(&mut value))
            .with_grad(TensorMut::host(&mut grad, s).unwrap())
            .with_per_sample(TensorMut::host(&mut per, Shape::flat(s.n)).unwrap())
            .with_parts(TensorMut::host(&mut parts, Shape::flat(2)).unwrap()),
    )
    .unwrap();
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    Out {
        loss: value as f64,
        parts: [parts[0] as f64, parts[1] as f64],
        per_sample: f64s(&per),
        grad: f64s(&grad),
    }
}

fn loss_over(net: &mut Net, t: &Terms) -> PerceptualLoss {
    let bytes = net.export_safetensors(Dtype::F32, "", |_| false);
    let vgg = common::cpu_vgg(&bytes, VggArch::Vgg16, DType::F32);
    PerceptualLoss::new(vgg, &t.config()).unwrap()
}

/// Loss, parts and per-sample values against the oracle, and the gradient
/// against its central differences at `probes` random elements.
fn check(t: Terms, s: Shape, seed: u64, probes: usize) {
    let mut net = Net::random(VggArch::Vgg16, seed);
    let loss = loss_over(&mut net, &t);
    let mut rng = Rng::new(seed + 1);
    let len = s.n * s.c * s.h * s.w;
    let (pred, target) = (rng.vec(len, 0.0, 1.0), rng.vec(len, 0.0, 1.0));
    let out = run(&loss, &pred, &target, s);
    let (p64, t64): (Vec<f64>, Vec<f64>) = (
        pred.iter().map(|&v| v as f64).collect(),
        target.iter().map(|&v| v as f64).collect(),
    );
    let want = oracle(&net, &t, &p64, &t64, s);
    let what = format!("{:?} {s}", t.config());
    assert!(
        want[0] + want[1] > 0.0,
        "{what}: a zero oracle tests nothing"
    );
    assert_rel(
        out.parts[0],
        want[0],
        2e-5,
        &format!("perceptual part {what}"),
    );
    assert_rel(out.parts[1], want[1], 2e-5, &format!("style part {what}"));
    assert_rel(out.loss, want[0] + want[1], 2e-5, &format!("loss {what}"));
    // Each image's value is the same formula over that image alone.
    let image = s.c * s.h * s.w;
    let per: Vec<f64> = (0..s.n)
        .map(|k| {
            let one = Shape::new(1, s.c, s.h, s.w);
            let range = k * image..(k + 1) * image;
            oracle(&net, &t, &p64[range.clone()], &t64[range], one)
                .iter()
                .sum()
        })
        .collect();
    assert_close(
        &out.per_sample,
        &per,
        2e-5,
        0.0,
        &format!("per-sample {what}"),
    );
    let total = |p: &[f64]| oracle(&net, &t, p, &t64, s).iter().sum::<f64>();
    common::assert_grad_at_random_elements(&out.grad, &p64, (probes, &mut rng), total, &what);
}

#[test]
fn a_style_loss_alone_matches_the_gram_definition() {
    let t = Terms {
        taps: vec![],
        criterion: Criterion::Mse,
        weight: 1.0,
        style: vec![(3, 1.0), (8, 0.5)],
        style_criterion: Criterion::Mse,
        style_weight: 2.0,
    };
    check(t, Shape::new(2, 3, 12, 10), 21, 30);
}

#[test]
fn perceptual_and_style_in_one_call_give_both_parts() {
    // Taps shared between the two losses and taps of one only.
    let t = Terms {
        taps: vec![(3, 1.0), (8, 2.0)],
        criterion: Criterion::Mae,
        weight: 0.7,
        style: vec![(1, 1.5), (8, 1.0)],
        style_criterion: Criterion::Mae,
        style_weight: 3.0,
    };
    check(t, Shape::new(2, 3, 8, 12), 22, 30);
}

#[test]
fn fro_norms_span_the_whole_batch() {
    let t = Terms {
        taps: vec![(3, 1.0), (6, 0.5)],
        criterion: Criterion::Fro,
        weight: 1.0,
        style: vec![(3, 1.0), (8, 2.0)],
        style_criterion: Criterion::Fro,
        style_weight: 0.5,
    };
    check(t, Shape::new(3, 3, 8, 8), 23, 30);
}

#[test]
fn identical_inputs_give_zero_loss_and_a_zero_gradient() {
    let mut net = Net::random(VggArch::Vgg16, 24);
    let s = Shape::new(2, 3, 8, 8);
    let x = Rng::new(25).vec(s.n * s.c * s.h * s.w, 0.0, 1.0);
    for criterion in [Criterion::Mse, Criterion::Mae, Criterion::Fro] {
        let t = Terms {
            taps: vec![(3, 1.0)],
            criterion,
            weight: 1.0,
            style: vec![(3, 1.0), (8, 1.0)],
            style_criterion: criterion,
            style_weight: 1.0,
        };
        let out = run(&loss_over(&mut net, &t), &x, &x, s);
        assert_eq!((out.loss, out.parts), (0.0, [0.0, 0.0]), "{criterion:?}");
        assert!(out.per_sample.iter().all(|&v| v == 0.0), "{criterion:?}");
        // Fro's gradient at a zero norm is 0, not 0/0.
        assert!(out.grad.iter().all(|&g| g == 0.0), "{criterion:?}");
    }
}

#[test]
fn a_loss_without_style_reports_its_value_as_the_first_part() {
    let mut net = Net::random(VggArch::Vgg16, 26);
    let t = Terms {
        taps: vec![(3, 1.0), (8, 1.0)],
        criterion: Criterion::Mse,
        weight: 1.0,
        style: vec![],
        style_criterion: Criterion::Mse,
        style_weight: 1.0,
    };
    let s = Shape::new(1, 3, 8, 8);
    let mut rng = Rng::new(27);
    let (p, q) = (
        rng.vec(s.c * s.h * s.w, 0.0, 1.0),
        rng.vec(s.c * s.h * s.w, 0.0, 1.0),
    );
    let out = run(&loss_over(&mut net, &t), &p, &q, s);
    assert!(out.loss > 0.0);
    assert_eq!(out.parts, [out.loss, 0.0]);
}

#[test]
fn bad_style_options_and_outputs_are_errors() {
    let mut net = Net::random(VggArch::Vgg16, 28);
    let bytes = net.export_safetensors(Dtype::F32, "", |name| name.starts_with("features.28"));
    let vgg = common::cpu_vgg(&bytes, VggArch::Vgg16, DType::F32);
    let err = |cfg: PerceptualConfig| {
        PerceptualLoss::new(vgg.clone(), &cfg)
            .unwrap_err()
            .to_string()
    };
    let style = |taps: Vec<Tap>| PerceptualConfig {
        taps: vec![],
        style_taps: taps,
        ..Default::default()
    };
    let e = err(style(vec!["relu9_9".into()]));
    assert!(e.contains("relu9_9"), "{e}");
    let e = err(style(vec!["relu5_3".into()]));
    assert!(
        e.contains("style tap relu5_3") && e.contains("deeper"),
        "{e}"
    );
    let e = err(style(vec![3.into(), 3.into()]));
    assert!(e.contains("style tap 3 is listed twice"), "{e}");
    let e = err(PerceptualConfig {
        style_tap_weights: vec![1.0, 2.0],
        ..style(vec![3.into()])
    });
    assert!(e.contains("1 style taps but 2 style tap weights"), "{e}");
    let e = err(PerceptualConfig {
        style_weight: f32::NAN,
        ..style(vec![3.into()])
    });
    assert!(e.contains("style_weight"), "{e}");
    let e = err(style(vec![]));
    assert!(e.contains("at least one tap or style tap"), "{e}");

    // parts: two f32, and only a perceptual loss has them.
    let loss = PerceptualLoss::new(vgg.clone(), &style(vec![3.into()])).unwrap();
    let s = Shape::new(1, 3, 8, 8);
    let x = vec![0.5f32; s.c * s.h * s.w];
    let (mut value, mut three) = (0f32, [0f32; 3]);
    let e = loss
        .compute(
            &TensorRef::host(&x, s).unwrap(),
            &TensorRef::host(&x, s).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut value))
                .with_parts(TensorMut::host(&mut three, Shape::flat(3)).unwrap()),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("parts output must be 2 f32"), "{e}");
    let tv = TvLoss::new(TvConfig::default()).unwrap();
    let mut two = [0f32; 2];
    let e = tv
        .compute(
            &perceptual_loss::Device::cpu(),
            &TensorRef::host(&x, s).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut value))
                .with_parts(TensorMut::host(&mut two, Shape::flat(2)).unwrap()),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("one part"), "{e}");
}
