//! LPIPS on the CPU backend against a float64 oracle written here from
//! richzhang/PerceptualSimilarity's definition (ScalingLayer, unit
//! normalisation over channels with eps 1e-10, per-channel lin weights,
//! mean over H and W, sum over relu1_2..relu5_3) over the direct
//! convolutions of tests/common/vgg.rs, and finite differences of it.
//! tests/python.rs runs the `lpips` package itself against the crate.

mod common;

use common::vgg::Net;
use common::{assert_close, assert_rel, Rng};
use perceptual_loss::{
    DType, LinWeights, LossOutputs, Lpips, LpipsConfig, Shape, TensorMut, TensorRef, VggArch,
    LPIPS_TAPS,
};
use safetensors::Dtype;

const SHIFT: [f64; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f64; 3] = [0.458, 0.448, 0.450];

/// Each image's distance, from the definition: the mean of each layer's
/// map, summed over the layers.
fn oracle(
    net: &Net,
    lin: &LinWeights,
    x0: &[f64],
    x1: &[f64],
    s: Shape,
    normalize: bool,
) -> Vec<f64> {
    layer_maps(net, lin, x0, x1, s, normalize)
        .iter()
        .map(|maps| {
            (maps.iter())
                .map(|(map, _)| map.iter().sum::<f64>() / map.len() as f64)
                .sum()
        })
        .collect()
}

/// Per image, each layer's per-pixel values sum_c w_c (n(f0)_c -
/// n(f1)_c)^2 and the layer's (h, w).
type Maps = Vec<Vec<(Vec<f64>, (usize, usize))>>;

fn layer_maps(
    net: &Net,
    lin: &LinWeights,
    x0: &[f64],
    x1: &[f64],
    s: Shape,
    normalize: bool,
) -> Maps {
    let (h, w) = (s.h, s.w);
    let image = s.c * h * w;
    let scaled = |x: &[f64]| -> Vec<f64> {
        (0..3)
            .flat_map(|ch| {
                let src = if s.c == 1 { 0 } else { ch };
                x[src * h * w..(src + 1) * h * w].iter().map(move |&v| {
                    let v = if normalize { 2.0 * v - 1.0 } else { v };
                    (v - SHIFT[ch]) / SCALE[ch]
                })
            })
            .collect()
    };
    (0..s.n)
        .map(|k| {
            let r = k * image..(k + 1) * image;
            let f0 = net.features(&scaled(&x0[r.clone()]), h, w, 29, false);
            let f1 = net.features(&scaled(&x1[r]), h, w, 29, false);
            let mut maps = Vec::new();
            for (l, &tap) in LPIPS_TAPS.iter().enumerate() {
                let c = net.channels(tap);
                let m = f0[tap].len() / c;
                let unit = |f: &[f64], p: usize| -> Vec<f64> {
                    let norm = (0..c).map(|ch| f[ch * m + p].powi(2)).sum::<f64>().sqrt();
                    (0..c).map(|ch| f[ch * m + p] / (norm + 1e-10)).collect()
                };
                let map = (0..m)
                    .map(|p| {
                        let (a, b) = (unit(&f0[tap], p), unit(&f1[tap], p));
                        (0..c)
                            .map(|ch| lin.layer(l)[ch] as f64 * (a[ch] - b[ch]).powi(2))
                            .sum()
                    })
                    .collect();
                // Each pool halves H and W, rounding down.
                maps.push((map, (h >> l, w >> l)));
            }
            maps
        })
        .collect()
}

/// PyTorch's `interpolate(map, size=(out_h, out_w), mode='bilinear',
/// align_corners=False)` of one h x w map: output pixel (y, x) reads the
/// source point ((y + 0.5) h / out_h - 0.5, (x + 0.5) w / out_w - 0.5),
/// each coordinate clamped at 0, from its four neighbours.
fn bilinear(map: &[f64], (h, w): (usize, usize), (out_h, out_w): (usize, usize)) -> Vec<f64> {
    let axis = |dst: usize, n: usize, out: usize| {
        let src = (((dst as f64) + 0.5) * n as f64 / out as f64 - 0.5).max(0.0);
        let lo = (src as usize).min(n - 1);
        (lo, (lo + 1).min(n - 1), src - lo as f64)
    };
    let mut out = Vec::with_capacity(out_h * out_w);
    for y in 0..out_h {
        let (y0, y1, fy) = axis(y, h, out_h);
        for x in 0..out_w {
            let (x0, x1, fx) = axis(x, w, out_w);
            let at = |i: usize, j: usize| map[i * w + j];
            out.push(
                (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x1))
                    + fy * ((1.0 - fx) * at(y1, x0) + fx * at(y1, x1)),
            );
        }
    }
    out
}

/// Each image's spatial map (H x W, images after one another): the
/// layers' maps resized to H x W and summed.
fn spatial_oracle(maps: &Maps, s: Shape) -> Vec<f64> {
    maps.iter()
        .flat_map(|layers| {
            let mut map = vec![0.0; s.h * s.w];
            for (values, dims) in layers {
                let up = bilinear(values, *dims, (s.h, s.w));
                map.iter_mut().zip(&up).for_each(|(a, b)| *a += b);
            }
            map
        })
        .collect()
}

struct Out {
    loss: f64,
    per_sample: Vec<f64>,
    grad: Vec<f64>,
}

fn run(lpips: &Lpips, x0: &[f32], x1: &[f32], s: Shape) -> Out {
    let (mut loss, mut per, mut grad) = (f32::NAN, vec![f32::NAN; s.n], vec![f32::NAN; x0.len()]);
    lpips
        .compute(
            &TensorRef::host(x0, s).unwrap(),
            &TensorRef::host(x1, s).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut loss))
                .with_grad(TensorMut::host(&mut grad, s).unwrap())
                .with_per_sample(TensorMut::host(&mut per, Shape::flat(s.n)).unwrap()),
        )
        .unwrap();
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    Out {
        loss: loss as f64,
        per_sample: f64s(&per),
        grad: f64s(&grad),
    }
}

fn lpips_over(net: &mut Net, config: &LpipsConfig) -> Lpips {
    let bytes = net.export_safetensors(Dtype::F32, "", |_| false);
    Lpips::new(common::cpu_vgg(&bytes, VggArch::Vgg16, DType::F32), config).unwrap()
}

fn check(config: LpipsConfig, s: Shape, seed: u64, probes: usize) {
    let mut net = Net::random(VggArch::Vgg16, seed);
    let lpips = lpips_over(&mut net, &config);
    let mut rng = Rng::new(seed + 1);
    let len = s.n * s.c * s.h * s.w;
    let (lo, hi) = if config.normalize {
        (0.0, 1.0)
    } else {
        (-1.0, 1.0)
    };
    let (x0, x1) = (rng.vec(len, lo, hi), rng.vec(len, lo, hi));
    let out = run(&lpips, &x0, &x1, s);
    let (p, t): (Vec<f64>, Vec<f64>) = (
        x0.iter().map(|&v| v as f64).collect(),
        x1.iter().map(|&v| v as f64).collect(),
    );
    let want = oracle(&net, &config.lin, &p, &t, s, config.normalize);
    let what = format!("normalize={} {s}", config.normalize);
    assert!(want.iter().all(|&d| d > 0.0));
    assert_close(
        &out.per_sample,
        &want,
        2e-5,
        0.0,
        &format!("distances {what}"),
    );
    let mean = want.iter().sum::<f64>() / s.n as f64;
    assert_rel(out.loss, mean, 2e-5, &format!("mean {what}"));
    let total = |p: &[f64]| {
        oracle(&net, &config.lin, p, &t, s, config.normalize)
            .iter()
            .sum::<f64>()
            / s.n as f64
    };
    common::assert_grad_at_random_elements(&out.grad, &p, (probes, &mut rng), total, &what);
}

#[test]
fn lpips_matches_its_definition() {
    check(LpipsConfig::default(), Shape::new(2, 3, 16, 16), 71, 12);
}

#[test]
fn unit_inputs_plain_channel_sums_and_gray_images() {
    let config = LpipsConfig {
        normalize: true,
        lin: LinWeights::ones(),
        weight: 1.0,
        ..Default::default()
    };
    check(config, Shape::new(1, 1, 20, 18), 72, 8);
}

/// The spatial map against the definition, and its gradient: autograd's
/// backward of `lpips.LPIPS(spatial=True)` receives dL/dmap, here a fixed
/// random one, and gives d<map, dL/dmap>/dpred, checked by finite
/// differences of the oracle. 20 x 24: the deeper maps are 5 x 6, 2 x 3
/// and 1 x 1, resized by 4, by 10 and 8, and from one pixel. These whole
/// factors keep a map's mean, so a uniform dL/dmap gives the distance's
/// own gradient.
#[test]
fn the_spatial_map_and_its_gradient_match_the_definition() {
    let config = LpipsConfig {
        weight: 2.0,
        ..Default::default()
    };
    let mut net = Net::random(VggArch::Vgg16, 77);
    let lpips = lpips_over(&mut net, &config);
    let s = Shape::new(2, 3, 20, 24);
    let mut rng = Rng::new(78);
    let len = s.n * s.c * s.h * s.w;
    let (x0, x1) = (rng.vec(len, -1.0, 1.0), rng.vec(len, -1.0, 1.0));
    let map_grad = rng.vec(s.n * s.h * s.w, -1.0, 1.0);
    let (p, t) = (common::f64s(&x0), common::f64s(&x1));
    let (pred, target) = (
        TensorRef::host(&x0, s).unwrap(),
        TensorRef::host(&x1, s).unwrap(),
    );
    let maps = lpips.spatial(&pred, &target).unwrap();
    let oracle_map = |p: &[f64]| -> Vec<f64> {
        let maps = layer_maps(&net, &config.lin, p, &t, s, false);
        spatial_oracle(&maps, s).iter().map(|v| 2.0 * v).collect()
    };
    assert_close(
        &common::f64s(&maps.map),
        &oracle_map(&p),
        2e-5,
        1e-7,
        "spatial map",
    );
    let mut grad = vec![f32::NAN; len];
    let map_shape = Shape::new(s.n, 1, s.h, s.w);
    lpips
        .spatial_backward(
            &pred,
            &target,
            &TensorRef::host(&map_grad, map_shape).unwrap(),
            TensorMut::host(&mut grad, s).unwrap(),
        )
        .unwrap();
    let g = common::f64s(&map_grad);
    let total = |p: &[f64]| -> f64 { oracle_map(p).iter().zip(&g).map(|(a, b)| a * b).sum() };
    common::assert_grad_at_random_elements(
        &common::f64s(&grad),
        &p,
        (12, &mut rng),
        total,
        "spatial map gradient",
    );
    // A uniform dL/dmap of 1 / (H W) is the distance's own gradient.
    let uniform = vec![1.0 / (s.h * s.w) as f32; s.n * s.h * s.w];
    lpips
        .spatial_backward(
            &pred,
            &target,
            &TensorRef::host(&uniform, map_shape).unwrap(),
            TensorMut::host(&mut grad, s).unwrap(),
        )
        .unwrap();
    let own = run(&lpips, &x0, &x1, s);
    let summed: Vec<f64> = own.grad.iter().map(|g| g * s.n as f64).collect();
    assert_close(
        &common::f64s(&grad),
        &summed,
        1e-4,
        1e-7,
        "uniform map gradient",
    );
    // Wrong sizes are errors, and grad is left alone.
    let mut short = vec![7.0f32; len];
    let e = lpips
        .spatial_backward(
            &pred,
            &target,
            &TensorRef::host(&map_grad[1..], Shape::flat(map_grad.len() - 1)).unwrap(),
            TensorMut::host(&mut short, s).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("map's gradient must be f32 with"), "{e}");
    assert!(short.iter().all(|&v| v == 7.0));
}

/// With `check_finite`, the map and its gradient refuse a NaN input by
/// name, as the distance does, and leave the outputs alone.
#[test]
fn maps_check_their_inputs_when_asked() {
    let mut net = Net::random(VggArch::Vgg16, 75);
    let config = LpipsConfig {
        check_finite: true,
        ..Default::default()
    };
    let lpips = lpips_over(&mut net, &config);
    let s = Shape::new(1, 3, 16, 16);
    let mut x = Rng::new(76).vec(3 * 16 * 16, -1.0, 1.0);
    let y = x.clone();
    x[17] = f32::NAN;
    let (p, t) = (
        TensorRef::host(&y, s).unwrap(),
        TensorRef::host(&x, s).unwrap(),
    );
    let e = lpips.spatial(&p, &t).unwrap_err().to_string();
    assert!(
        e.contains("target holds a non-finite value (NaN) at element 17"),
        "{e}"
    );
    let g = vec![1.0f32; 16 * 16];
    let mut grad = vec![7.0f32; 3 * 16 * 16];
    let map_grad = TensorRef::host(&g, Shape::new(1, 1, 16, 16)).unwrap();
    let e = (lpips.spatial_backward(&t, &p, &map_grad, TensorMut::host(&mut grad, s).unwrap()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pred holds a non-finite value (NaN) at element 17"),
        "{e}"
    );
    assert!(grad.iter().all(|&v| v == 7.0));
}

#[test]
fn identical_inputs_give_zero_and_a_zero_gradient() {
    let mut net = Net::random(VggArch::Vgg16, 73);
    let lpips = lpips_over(&mut net, &LpipsConfig::default());
    let s = Shape::new(2, 3, 16, 16);
    let x = Rng::new(74).vec(s.n * 3 * 16 * 16, -1.0, 1.0);
    let out = run(&lpips, &x, &x, s);
    assert_eq!(out.loss, 0.0);
    assert!(out.per_sample.iter().all(|&v| v == 0.0));
    assert!(out.grad.iter().all(|&g| g == 0.0));
}

#[test]
fn bad_networks_and_shapes_are_errors() {
    let mut net = Net::random(VggArch::Vgg16, 75);
    let lpips = lpips_over(&mut net, &LpipsConfig::default());
    let s = Shape::new(1, 3, 8, 16);
    let x = vec![0.0f32; 3 * 8 * 16];
    let mut loss = 0f32;
    let e = lpips
        .compute(
            &TensorRef::host(&x, s).unwrap(),
            &TensorRef::host(&x, s).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut loss)),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("too small") && e.contains("16"), "{e}");
    // VGG19, or VGG16 loaded short of relu5_3.
    let mut net19 = Net::random(VggArch::Vgg19, 76);
    let bytes = net19.export_safetensors(Dtype::F32, "", |_| false);
    let vgg19 = common::cpu_vgg(&bytes, VggArch::Vgg19, DType::F32);
    let e = Lpips::new(vgg19, &LpipsConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("VGG16"), "{e}");
    let bytes = net.export_safetensors(Dtype::F32, "", |n| n.starts_with("features.28"));
    let short = common::cpu_vgg(&bytes, VggArch::Vgg16, DType::F32);
    let e = Lpips::new(short, &LpipsConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("deeper than the loaded weights"), "{e}");
}
