//! Perceptual loss on the CPU backend against the f64 oracle in
//! tests/common/vgg.rs (direct convolutions, written from the definitions)
//! and finite differences; weight files are written by the tests.

mod common;

use common::vgg::{perceptual, run_perceptual, Net, Spec, IMAGENET_MEAN, IMAGENET_STD};
use common::{assert_close, assert_rel, Rng};
use perceptual_loss::half::{bf16, f16};
use perceptual_loss::{
    Criterion, DType, Device, Error, InputNorm, PerceptualConfig, PerceptualLoss, Pooling, Shape,
    Tap, TensorRef, Vgg, VggArch, VggOptions, WeightsSource,
};
use safetensors::Dtype;
use std::sync::Arc;

fn load(net: &mut Net, arch: VggArch) -> Arc<Vgg> {
    let bytes = net.export_safetensors(Dtype::F32, "", |_| false);
    common::cpu_vgg(&bytes, arch, DType::F32)
}

fn spec_of(vgg: &Vgg, cfg: &PerceptualConfig, taps: &[usize]) -> Spec {
    let weights: Vec<f64> = if cfg.tap_weights.is_empty() {
        vec![1.0; taps.len()]
    } else {
        cfg.tap_weights.iter().map(|&w| w as f64).collect()
    };
    let affine = std::array::from_fn(|c| match cfg.input_norm {
        InputNorm::None => (1.0, 0.0),
        InputNorm::Imagenet => (1.0 / IMAGENET_STD[c], -IMAGENET_MEAN[c] / IMAGENET_STD[c]),
        InputNorm::FromPm1 => (0.5, 0.5),
        InputNorm::LpipsScaling | InputNorm::LpipsScalingFromUnit => {
            unreachable!("LPIPS's scaling is tested in tests/lpips_cpu.rs")
        }
        InputNorm::ImagenetFromPm1 => (
            0.5 / IMAGENET_STD[c],
            (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c],
        ),
    });
    let _ = vgg;
    Spec {
        taps: taps.iter().copied().zip(weights).collect(),
        mae: cfg.criterion == Criterion::Mae,
        affine,
        avg_pool: cfg.pooling == Pooling::Avg,
        weight: cfg.weight as f64,
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Loss, per-sample values and FD gradient at `probes` random pixels.
fn check_against_oracle(
    arch: VggArch,
    cfg: PerceptualConfig,
    taps_by_index: &[usize],
    s: Shape,
    seed: u64,
    probes: usize,
) {
    let mut net = Net::random(arch, seed);
    let vgg = load(&mut net, arch);
    let loss = PerceptualLoss::new(vgg.clone(), &cfg).unwrap();
    let mut rng = Rng::new(seed + 1);
    let n = s.n * s.c * s.h * s.w;
    let (pred, target) = (rng.vec(n, 0.0, 1.0), rng.vec(n, 0.0, 1.0));
    let out = run_perceptual::<f32>(&loss, &pred, &target, s, 0.0, None);
    let spec = spec_of(&vgg, &cfg, taps_by_index);
    let (p64, t64) = (f64s(&pred), f64s(&target));
    let oracle = |p: &[f64]| perceptual(&net, &spec, p, &t64, s);
    let want = oracle(&p64);
    let what = format!("{arch:?} {cfg:?} {s}");
    assert_rel(out.loss, want, 2e-5, &format!("loss {what}"));
    let per: Vec<f64> = (0..s.n)
        .map(|k| {
            let img = s.c * s.h * s.w;
            perceptual(
                &net,
                &spec,
                &p64[k * img..(k + 1) * img],
                &t64[k * img..(k + 1) * img],
                Shape::new(1, s.c, s.h, s.w),
            )
        })
        .collect();
    assert_close(
        &out.per_sample,
        &per,
        2e-5,
        0.0,
        &format!("per-sample {what}"),
    );
    common::assert_grad_at_random_elements(&out.grad, &p64, (probes, &mut rng), oracle, &what);
}

#[test]
fn article_defaults_match_the_oracle() {
    check_against_oracle(
        VggArch::Vgg16,
        PerceptualConfig::default(),
        &[3, 8, 15, 22],
        Shape::new(1, 3, 20, 28),
        1,
        6,
    );
}

#[test]
fn odd_sizes_where_pooling_floors() {
    check_against_oracle(
        VggArch::Vgg16,
        PerceptualConfig::default(),
        &[3, 8, 15, 22],
        Shape::new(2, 3, 17, 23),
        2,
        4,
    );
}

#[test]
fn vgg19_names_weights_mae_imagenet_avg_pool() {
    let cfg = PerceptualConfig {
        taps: vec![
            "conv1_2".into(),
            "relu2_2".into(),
            "pool2".into(),
            Tap::Name("conv3_4".into()),
        ],
        tap_weights: vec![0.1, 1.0, 0.5, 2.0],
        criterion: Criterion::Mae,
        input_norm: InputNorm::Imagenet,
        pooling: Pooling::Avg,
        weight: 0.5,
        ..Default::default()
    };
    // VGG19: conv1_2 = 2, relu2_2 = 8, pool2 = 9, conv3_4 = 16.
    check_against_oracle(
        VggArch::Vgg19,
        cfg,
        &[2, 8, 9, 16],
        Shape::new(2, 3, 12, 14),
        3,
        0,
    );
}

#[test]
fn gradients_of_shallow_taps_match_finite_differences() {
    let cfg = PerceptualConfig {
        taps: vec![3.into(), 8.into()],
        tap_weights: vec![1.0, 3.0],
        ..Default::default()
    };
    check_against_oracle(
        VggArch::Vgg16,
        cfg,
        &[3, 8],
        Shape::new(2, 3, 12, 10),
        4,
        40,
    );
}

#[test]
fn grayscale_from_pm1_is_replicated() {
    let cfg = PerceptualConfig {
        taps: vec![8.into(), 15.into()],
        input_norm: InputNorm::ImagenetFromPm1,
        ..Default::default()
    };
    check_against_oracle(
        VggArch::Vgg16,
        cfg,
        &[8, 15],
        Shape::new(1, 1, 16, 12),
        5,
        20,
    );
}

#[test]
fn from_pm1_maps_the_range_only() {
    let cfg = PerceptualConfig {
        taps: vec![3.into(), 8.into()],
        input_norm: InputNorm::FromPm1,
        ..Default::default()
    };
    check_against_oracle(VggArch::Vgg16, cfg, &[3, 8], Shape::new(1, 3, 8, 10), 8, 10);
}

#[test]
fn identical_inputs_give_zero_loss_and_gradient() {
    let mut net = Net::random(VggArch::Vgg16, 6);
    let vgg = load(&mut net, VggArch::Vgg16);
    let s = Shape::new(2, 3, 16, 16);
    let x = Rng::new(7).vec(s.n * s.c * s.h * s.w, 0.0, 1.0);
    for criterion in [Criterion::Mse, Criterion::Mae] {
        let loss = PerceptualLoss::new(
            vgg.clone(),
            &PerceptualConfig {
                criterion,
                ..Default::default()
            },
        )
        .unwrap();
        let out = run_perceptual::<f32>(&loss, &x, &x, s, 0.0, None);
        assert_eq!(out.loss, 0.0);
        assert!(out.grad.iter().all(|&g| g == 0.0), "{criterion:?}");
    }
}

#[test]
fn half_precision_inputs_and_accumulation() {
    let mut net = Net::random(VggArch::Vgg16, 8);
    let vgg = load(&mut net, VggArch::Vgg16);
    let loss = PerceptualLoss::new(vgg, &PerceptualConfig::default()).unwrap();
    let s = Shape::new(1, 3, 16, 20);
    let mut rng = Rng::new(9);
    let n = s.n * s.c * s.h * s.w;
    let (pred, target) = (rng.vec(n, 0.0, 1.0), rng.vec(n, 0.0, 1.0));
    let round = |v: &[f32], bf: bool| -> Vec<f32> {
        v.iter()
            .map(|&x| {
                if bf {
                    bf16::from_f32(x).to_f32()
                } else {
                    f16::from_f32(x).to_f32()
                }
            })
            .collect()
    };
    for bf in [false, true] {
        let reference =
            run_perceptual::<f32>(&loss, &round(&pred, bf), &round(&target, bf), s, 0.0, None);
        let got = if bf {
            run_perceptual::<bf16>(&loss, &pred, &target, s, 0.0, None)
        } else {
            run_perceptual::<f16>(&loss, &pred, &target, s, 0.0, None)
        };
        assert_rel(got.loss, reference.loss, 1e-6, "half loss");
        let scale = reference.grad.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert_close(&got.grad, &reference.grad, 1e-2, 1e-2 * scale, "half grad");
    }
    let old = rng.vec(n, -1.0, 1.0);
    let fresh = run_perceptual::<f32>(&loss, &pred, &target, s, 0.0, None);
    let acc = run_perceptual::<f32>(&loss, &pred, &target, s, 2.0, Some(&old));
    let want: Vec<f64> = old
        .iter()
        .zip(&fresh.grad)
        .map(|(o, g)| 2.0 * *o as f64 + g)
        .collect();
    assert_close(&acc.grad, &want, 1e-6, 1e-9, "accumulated grad");
}

#[test]
fn forward_only_writes_no_gradient() {
    let mut net = Net::random(VggArch::Vgg16, 10);
    let vgg = load(&mut net, VggArch::Vgg16);
    let loss = PerceptualLoss::new(vgg, &PerceptualConfig::default()).unwrap();
    let s = Shape::new(1, 3, 16, 16);
    let mut rng = Rng::new(11);
    let (p, t) = (rng.vec(768, 0.0, 1.0), rng.vec(768, 0.0, 1.0));
    let with_grad = run_perceptual::<f32>(&loss, &p, &t, s, 0.0, None).loss;
    let value = loss
        .value(
            &TensorRef::host(&p, s).unwrap(),
            &TensorRef::host(&t, s).unwrap(),
        )
        .unwrap();
    assert_eq!(value as f64, with_grad);
}

fn weights_error(bytes: &[u8]) -> String {
    let e = Vgg::load(
        &Device::cpu(),
        WeightsSource::Bytes(bytes),
        VggArch::Vgg16,
        DType::F32,
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidWeights(_)), "{e}");
    e.to_string()
}

#[test]
fn malformed_weight_files_name_the_tensor() {
    let mut net = Net::random(VggArch::Vgg16, 12);
    let good = net.export_safetensors(Dtype::F32, "", |_| false);
    // Cut in half: the header is whole, a tensor's data is not.
    let cut = weights_error(&good[..good.len() / 2]);
    assert!(
        cut.contains("past the end of the file") && cut.contains("tensor features."),
        "{cut}"
    );
    assert!(weights_error(&good[..5]).contains("safetensors"));
    assert!(weights_error(b"not a safetensors file at all").contains("safetensors"));
    let missing = net.export_safetensors(Dtype::F32, "", |n| n == "features.12.bias");
    assert!(weights_error(&missing).contains("features.12.bias"));
    // VGG19 weights read as VGG16: VGG19's conv3_4 (features.16) sits
    // where VGG16 has pool3, so the file is refused, not read as a prefix.
    let mut net19 = Net::random(VggArch::Vgg19, 13);
    let e = weights_error(&net19.export_safetensors(Dtype::F32, "", |_| false));
    assert!(
        e.contains("tensor features.16.") && e.contains("another network"),
        "{e}"
    );
    // A 5x5 kernel where VGG has 3x3.
    let five = vec![0u8; 64 * 3 * 25 * 4];
    let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![64, 3, 5, 5], &five).unwrap();
    let msg = weights_error(&safetensors::serialize([("features.0.weight", view)], None).unwrap());
    assert!(
        msg.contains("features.0.weight") && msg.contains("shape"),
        "{msg}"
    );
    // Non-finite weights.
    if let common::vgg::Op::Conv { w, .. } = &mut net.ops_mut()[5] {
        w[3] = f64::NAN;
    }
    let nan = net.export_safetensors(Dtype::F32, "", |_| false);
    assert!(weights_error(&nan).contains("features.5.weight"));
    // A tensor of an integer dtype.
    let ints = vec![0u8; 64 * 3 * 9 * 4];
    let view = safetensors::tensor::TensorView::new(Dtype::I32, vec![64, 3, 3, 3], &ints).unwrap();
    let bytes = safetensors::serialize([("features.0.weight", view)], None).unwrap();
    assert!(weights_error(&bytes).contains("features.0.weight"));
    // A file that is not there.
    let e = Vgg::load(
        &Device::cpu(),
        WeightsSource::Path("/nonexistent/vgg16.safetensors".as_ref()),
        VggArch::Vgg16,
        DType::F32,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Io(_)), "{e}");
}

#[test]
fn prefixes_storage_dtypes_and_partial_depth() {
    let mut net = Net::random(VggArch::Vgg16, 14);
    for (dtype, prefix) in [
        (Dtype::F16, "vgg16."),
        (Dtype::BF16, "model."),
        (Dtype::F32, ""),
    ] {
        let bytes = net.export_safetensors(dtype, prefix, |_| false);
        let vgg = common::cpu_vgg(&bytes, VggArch::Vgg16, DType::F32);
        assert_eq!(vgg.depth(), 30);
    }
    // Only up to relu2_2 in the file: loads with up_to, and deeper taps are refused.
    let shallow = net.export_safetensors(Dtype::F32, "", |n| {
        n.split('.').nth(1).unwrap().parse::<usize>().unwrap() > 8
    });
    let options = VggOptions {
        up_to: Some(8),
        ..Default::default()
    };
    let vgg = Vgg::load_with(&Device::cpu(), WeightsSource::Bytes(&shallow), options).unwrap();
    assert_eq!(vgg.depth(), 8);
    let e = PerceptualLoss::new(vgg.clone(), &PerceptualConfig::default()).unwrap_err();
    assert!(
        e.to_string().contains("deeper than the loaded weights"),
        "{e}"
    );
    PerceptualLoss::new(
        vgg,
        &PerceptualConfig {
            taps: vec![3.into(), "relu2_2".into()],
            ..Default::default()
        },
    )
    .unwrap();
    // Without up_to the file loads as deep as it goes (to pool2, before
    // the missing conv3_1), and a deeper tap names itself and that depth.
    let vgg = Vgg::load(
        &Device::cpu(),
        WeightsSource::Bytes(&shallow),
        VggArch::Vgg16,
        DType::F32,
    )
    .unwrap();
    assert_eq!(vgg.depth(), 9);
    let depth = Vgg::depth_in(WeightsSource::Bytes(&shallow), VggOptions::default()).unwrap();
    assert_eq!(depth, 9);
    let e = PerceptualLoss::new(vgg, &PerceptualConfig::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("tap relu3_3 (15) is deeper than the loaded weights (up to module 9, pool2)"),
        "{e}"
    );
    // Asking for more than the file holds names the first tensor missing.
    let deeper = VggOptions {
        up_to: Some(15),
        ..Default::default()
    };
    let e = Vgg::load_with(&Device::cpu(), WeightsSource::Bytes(&shallow), deeper).unwrap_err();
    assert!(
        e.to_string()
            .contains("tensor features.10.weight (conv3_1) is missing"),
        "{e}"
    );
}

#[test]
fn misconfiguration_and_bad_inputs_are_errors() {
    let mut net = Net::random(VggArch::Vgg16, 15);
    let vgg = load(&mut net, VggArch::Vgg16);
    let bad = |cfg: PerceptualConfig| {
        PerceptualLoss::new(vgg.clone(), &cfg)
            .unwrap_err()
            .to_string()
    };
    assert!(bad(PerceptualConfig {
        taps: vec!["relu9_9".into()],
        ..Default::default()
    })
    .contains("relu9_9"));
    assert!(bad(PerceptualConfig {
        taps: vec![31.into()],
        ..Default::default()
    })
    .contains("no layer"));
    assert!(bad(PerceptualConfig {
        tap_weights: vec![1.0],
        ..Default::default()
    })
    .contains("tap weights"));
    assert!(bad(PerceptualConfig {
        taps: vec![3.into(), "relu1_2".into()],
        ..Default::default()
    })
    .contains("twice"));
    assert!(bad(PerceptualConfig {
        taps: vec![],
        ..Default::default()
    })
    .contains("at least one tap"));
    assert!(bad(PerceptualConfig {
        weight: f32::NAN,
        ..Default::default()
    })
    .contains("finite"));
    assert!(bad(PerceptualConfig {
        max_chunk_images: Some(0),
        ..Default::default()
    })
    .contains("max_chunk_images"));

    let loss = PerceptualLoss::new(vgg, &PerceptualConfig::default()).unwrap();
    let x = vec![0f32; 2 * 7 * 7 * 3];
    let err = |s: Shape, t: Shape| {
        let n = s.n * s.c * s.h * s.w;
        let m = t.n * t.c * t.h * t.w;
        loss.value(
            &TensorRef::host(&x[..n], s).unwrap(),
            &TensorRef::host(&x[..m], t).unwrap(),
        )
        .unwrap_err()
        .to_string()
    };
    // relu4_3 follows three poolings: 7x7 becomes 0x0 at the third.
    assert!(err(Shape::new(1, 3, 7, 7), Shape::new(1, 3, 7, 7)).contains("too small"));
    assert!(err(Shape::new(1, 2, 7, 7), Shape::new(1, 2, 7, 7)).contains("3 channels"));
    assert!(err(Shape::new(1, 3, 7, 7), Shape::new(1, 3, 7, 6)).contains("one shape"));
}

#[test]
fn seeded_weights_load_and_are_reproducible() {
    let a = perceptual_loss::seeded_safetensors(VggArch::Vgg19, 3).unwrap();
    assert_eq!(
        a,
        perceptual_loss::seeded_safetensors(VggArch::Vgg19, 3).unwrap()
    );
    assert_ne!(
        a,
        perceptual_loss::seeded_safetensors(VggArch::Vgg19, 4).unwrap()
    );
    let vgg = Vgg::load(
        &Device::cpu(),
        WeightsSource::Bytes(&a),
        VggArch::Vgg19,
        DType::F32,
    )
    .unwrap();
    assert_eq!(vgg.depth(), 36);
    // He-uniform: |w| <= sqrt(6 / fan_in), fan_in = 3 * 9 for the first layer.
    let file = safetensors::SafeTensors::deserialize(&a).unwrap();
    let first = file.tensor("features.0.weight").unwrap();
    let bound = (6.0f32 / 27.0).sqrt();
    let values: Vec<f32> = first
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert!(
        values.iter().all(|v| v.abs() <= bound) && values.iter().any(|v| v.abs() > bound / 2.0)
    );
}

/// Loss and gradient of `pred` against `target` through `loss`, on the
/// caller's own slices (`run_perceptual` copies its inputs, so it cannot
/// show a target buffer changed in place).
fn loss_and_grad(loss: &PerceptualLoss, pred: &[f32], target: &[f32], s: Shape) -> (f32, Vec<f32>) {
    let (mut value, mut grad) = (0f32, vec![0f32; pred.len()]);
    loss.compute(
        &TensorRef::host(pred, s).unwrap(),
        &TensorRef::host(target, s).unwrap(),
        perceptual_loss::LossOutputs::new(perceptual_loss::TensorMut::scalar(&mut value))
            .with_grad(perceptual_loss::TensorMut::host(&mut grad, s).unwrap()),
    )
    .unwrap();
    (value, grad)
}

#[test]
fn a_repeated_target_reuses_its_features_and_a_changed_one_is_seen() {
    let mut net = Net::random(VggArch::Vgg16, 15);
    let vgg = load(&mut net, VggArch::Vgg16);
    let s = Shape::new(2, 3, 16, 16);
    let mut rng = Rng::new(77);
    let pred = rng.vec(2 * 3 * 16 * 16, 0.0, 1.0);
    let (a, b) = (rng.vec(pred.len(), 0.0, 1.0), rng.vec(pred.len(), 0.0, 1.0));
    let fresh = |target: &[f32]| {
        let loss = PerceptualLoss::new(vgg.clone(), &PerceptualConfig::default()).unwrap();
        loss_and_grad(&loss, &pred, target, s)
    };
    let loss = PerceptualLoss::new(vgg.clone(), &PerceptualConfig::default()).unwrap();
    let clone = loss.clone(); // clones share what they keep
    let mut target = a.clone();
    assert_eq!(loss_and_grad(&loss, &pred, &target, s), fresh(&a));
    assert_eq!(loss_and_grad(&loss, &pred, &target, s), fresh(&a)); // reused: the same bits
    assert_eq!(loss_and_grad(&clone, &pred, &b, s), fresh(&b));
    assert_eq!(loss_and_grad(&loss, &pred, &target, s), fresh(&a));
    // The same buffer with one value changed is a new target.
    target[100] += 0.5;
    let changed = fresh(&target);
    assert_ne!(changed.0, fresh(&a).0);
    assert_eq!(loss_and_grad(&loss, &pred, &target, s), changed);
    // Another shape of the same values.
    let flat = Shape::new(1, 3, 32, 16);
    let (want, _) = {
        let l = PerceptualLoss::new(vgg.clone(), &PerceptualConfig::default()).unwrap();
        loss_and_grad(&l, &pred, &target, flat)
    };
    assert_eq!(loss_and_grad(&loss, &pred, &target, flat).0, want);
}

/// One `Vgg` behind an `Arc`, two losses over it, called from several
/// threads at once with alternating targets (so the kept-target features
/// are replaced under contention): every result equals the same call made
/// alone, bit for bit.
#[test]
fn shared_weights_and_losses_across_threads() {
    let vgg = load(&mut Net::random(VggArch::Vgg16, 31), VggArch::Vgg16);
    let configs = [
        PerceptualConfig::default(),
        PerceptualConfig {
            taps: vec!["relu2_2".into(), "conv3_1".into()],
            criterion: Criterion::Mae,
            ..Default::default()
        },
    ];
    let losses = configs
        .each_ref()
        .map(|c| PerceptualLoss::new(vgg.clone(), c).unwrap());
    let s = Shape::new(1, 3, 16, 20);
    let n = 3 * 16 * 20;
    let mut rng = Rng::new(32);
    let pred = rng.vec(n, 0.0, 1.0);
    let targets = [rng.vec(n, 0.0, 1.0), rng.vec(n, 0.0, 1.0)];
    // Alone, each (loss, target) pair once; fresh losses, nothing kept.
    let alone: Vec<Vec<_>> = configs
        .iter()
        .map(|c| {
            targets
                .iter()
                .map(|t| {
                    let fresh = PerceptualLoss::new(vgg.clone(), c).unwrap();
                    let out = run_perceptual::<f32>(&fresh, &pred, t, s, 0.0, None);
                    (out.loss.to_bits(), out.grad)
                })
                .collect()
        })
        .collect();
    std::thread::scope(|scope| {
        for thread in 0..4 {
            let (losses, alone, pred, targets) = (&losses, &alone, &pred, &targets);
            scope.spawn(move || {
                for call in 0..6 {
                    let (l, t) = ((thread + call) % 2, (thread / 2 + call) % 2);
                    let out = run_perceptual::<f32>(&losses[l], pred, &targets[t], s, 0.0, None);
                    assert_eq!(
                        (out.loss.to_bits(), &out.grad),
                        (alone[l][t].0, &alone[l][t].1),
                        "thread {thread} call {call}: loss {l}, target {t}"
                    );
                }
            });
        }
    });
}
