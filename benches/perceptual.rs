//! Perceptual loss timing: VGG16 taps [3, 8, 15, 22], forward + backward.
//!
//! CPU: 1x3x64x64 f32 (the fallback's target: well under a second on two
//! cores). GPU: 8x3x256x256 bf16 (the headline figure; PyTorch on the same
//! card: scripts/torch_perceptual_bench.py), plus f32 with TF32 off and a
//! small launch-bound batch, and at 8x3x256x256 bf16 the style issue's
//! comparisons: taps to relu5_3 against LPIPS (LPIPS's budget is 1.2x
//! that), the default taps plus Grams at relu1_2..relu4_3, and the same
//! against a kept target; each the median of CUDA-event-timed runs, with
//! the device memory the call holds (its plan: buffers and cuDNN
//! workspace) and the drop in free device memory it caused. Weights are
//! deterministic pseudo-random (timing does not depend on them).
//!
//! `cargo bench --bench perceptual [-- --gpu-only]`

mod common;

use common::{median, time_gpu};
use perceptual_loss::half::bf16;
use perceptual_loss::{
    seeded_safetensors, Card, DType, Device, Element, LossOutputs, Lpips, LpipsConfig,
    PerceptualConfig, PerceptualLoss, Shape, TensorMut, TensorRef, Vgg, VggArch, WeightsSource,
    LPIPS_TAPS,
};
use std::time::Instant;

/// What a GPU case computes.
#[derive(Clone, Copy)]
enum Kind {
    /// The default perceptual loss.
    Perceptual,
    /// Taps relu1_2..relu5_3: LPIPS's network and taps as a perceptual loss.
    PerceptualTo53,
    /// LPIPS v0.1.
    Lpips,
    /// The default taps plus Grams at relu1_2..relu4_3.
    WithStyle,
    /// The same against a kept target.
    WithStyleKept,
}

/// (median ms, plan MiB, free-memory drop MiB, the cost model's H200
/// floor in ms) of forward + backward (or forward only) on `dev`.
fn gpu_case<T: Element>(
    dev: &Device,
    bytes: &[u8],
    (s, compute, tf32, with_grad): (Shape, DType, bool, bool),
    (kind, graphs): (Kind, bool),
) -> Result<(f64, f64, f64, f64), Box<dyn std::error::Error>> {
    let st = dev.cuda_stream().ok_or("not a CUDA device")?.clone();
    let ctx = st.context().clone();
    let vgg = Vgg::load(dev, WeightsSource::Bytes(bytes), VggArch::Vgg16, compute)?;
    let lpips =
        matches!(kind, Kind::Lpips).then(|| Lpips::new(vgg.clone(), &LpipsConfig::default()));
    let taps = |t: &[usize]| t.iter().map(|&i| i.into()).collect::<Vec<_>>();
    let config = PerceptualConfig {
        allow_tf32: tf32,
        taps: match kind {
            Kind::PerceptualTo53 => taps(&LPIPS_TAPS),
            _ => PerceptualConfig::default().taps,
        },
        style_taps: match kind {
            Kind::WithStyle | Kind::WithStyleKept => taps(&[3, 8, 15, 22]),
            _ => vec![],
        },
        cuda_graphs: graphs,
        ..Default::default()
    };
    let loss = match lpips {
        Some(l) => l?.perceptual_loss(),
        None => PerceptualLoss::new(vgg, &config)?,
    };
    let n = s.n * s.c * s.h * s.w;
    let host = |m: usize| {
        (0..n)
            .map(|i| T::from_f64(((i * m) % 1000) as f64 / 1000.0))
            .collect::<Vec<T>>()
    };
    let (pred, target) = (st.clone_htod(&host(7919))?, st.clone_htod(&host(104_729))?);
    let mut grad = st.clone_htod(&host(1))?;
    let mut value = st.alloc_zeros::<f32>(1)?;
    dev.synchronize()?;
    let free_before = ctx.mem_get_info()?.0;
    let mut step = || -> perceptual_loss::Result<()> {
        let mut out = LossOutputs::new(TensorMut::cuda(&mut value, Shape::flat(1))?);
        if with_grad {
            out = out.with_grad(TensorMut::cuda(&mut grad, s)?);
        }
        match kind {
            Kind::WithStyleKept => loss.compute_resident(&TensorRef::cuda(&pred, s)?, out),
            _ => loss.compute(
                &TensorRef::cuda(&pred, s)?,
                &TensorRef::cuda(&target, s)?,
                out,
            ),
        }
    };
    if matches!(kind, Kind::WithStyleKept) {
        loss.set_target(&TensorRef::cuda(&target, s)?)?;
    }
    // With graphs, the calls after the first plan capture the call.
    for _ in 0..if graphs { 3 } else { 1 } {
        step()?;
    }
    dev.synchronize()?;
    if graphs && loss.cuda_graphs_held()? == 0 {
        return Err("no CUDA graph was captured (PERCEPTUAL_LOSS_LOG_PLANS=1 says why)".into());
    }
    let drop = free_before.saturating_sub(ctx.mem_get_info()?.0);
    // The first call planned the shape and succeeded: later ones reuse it.
    let ms = time_gpu(dev, 30, || step().unwrap());
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let report = match kind {
        Kind::WithStyleKept => loss.resident_plan_report(s, T::DTYPE, with_grad)?,
        _ => loss.plan_report(s, T::DTYPE, with_grad)?,
    };
    let floor = report.floor(&Card::H200);
    let floor_ms = floor.total_s() * 1e3;
    Ok((
        ms,
        mib(loss.plan_footprint(s)?.unwrap_or(0)),
        mib(drop),
        floor_ms,
    ))
}

fn main() {
    let bytes = seeded_safetensors(VggArch::Vgg16, 0).unwrap();
    // `--gpu-only` skips the CPU cases (scripts/gpu-check.sh reruns the GPU
    // ones with other settings).
    if !std::env::args().any(|a| a == "--gpu-only") {
        cpu_cases(&bytes);
    }
    gpu_cases(&bytes);
}

fn cpu_cases(bytes: &[u8]) {
    let vgg = Vgg::load(
        &Device::cpu(),
        WeightsSource::Bytes(bytes),
        VggArch::Vgg16,
        DType::F32,
    )
    .unwrap();
    let loss = PerceptualLoss::new(vgg, &PerceptualConfig::default()).unwrap();
    let s = Shape::new(1, 3, 64, 64);
    let n = s.n * s.c * s.h * s.w;
    let pred: Vec<f32> = (0..n).map(|i| (i % 251) as f32 / 251.0).collect();
    // Two targets: alternating between them makes every call a new target;
    // repeating one lets the loss keep its features (feature inversion).
    let targets: [Vec<f32>; 2] =
        [241, 239].map(|m| (0..n).map(|i| (i % m) as f32 / m as f32).collect());
    let mut grad = vec![0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut run = |with_grad: bool, target: &[f32]| {
        let mut value = 0f32;
        let mut out = LossOutputs::new(TensorMut::scalar(&mut value));
        if with_grad {
            out = out.with_grad(TensorMut::host(&mut grad, s).unwrap());
        }
        let t = Instant::now();
        loss.compute(
            &TensorRef::host(&pred, s).unwrap(),
            &TensorRef::host(target, s).unwrap(),
            out,
        )
        .unwrap();
        t.elapsed().as_secs_f64() * 1e3
    };
    run(true, &targets[0]);
    let mut case = |with_grad: bool, alternate: bool| {
        median(
            (0..15)
                .map(|i| run(with_grad, &targets[alternate as usize * (i % 2)]))
                .collect(),
        )
    };
    let (fwd_bwd, fwd) = (case(true, true), case(false, true));
    let (kept_fwd_bwd, kept_fwd) = (case(true, false), case(false, false));
    println!("| perceptual VGG16 [3,8,15,22], CPU ({threads} threads) | new target: median ms | same target: median ms |");
    println!("|---|---|---|");
    println!("| {s} f32 forward + backward | {fwd_bwd:.1} | {kept_fwd_bwd:.1} |");
    println!("| {s} f32 forward only | {fwd:.1} | {kept_fwd:.1} |");
}

fn gpu_cases(bytes: &[u8]) {
    let dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => return println!("\nGPU: skipped: no CUDA device ({e})"),
    };
    println!(
        "\n| perceptual VGG16 [3,8,15,22] on {}, cuDNN algorithms {} | median ms | plan MiB | free-memory drop MiB | H200 floor ms (cost model, bf16 peak) |",
        dev.name(),
        match std::env::var("PERCEPTUAL_LOSS_CUDNN_BENCHMARK").as_deref() {
            Ok("1") => "timed (PERCEPTUAL_LOSS_CUDNN_BENCHMARK=1)",
            _ => "from heuristics",
        }
    );
    println!("|---|---|---|---|---|");
    let cases = [
        (Shape::new(8, 3, 256, 256), DType::BF16, false, true),
        (Shape::new(8, 3, 256, 256), DType::BF16, false, false),
        (Shape::new(8, 3, 256, 256), DType::F32, false, true),
        (Shape::new(8, 3, 256, 256), DType::F32, true, true),
        (Shape::new(16, 3, 128, 128), DType::BF16, false, true),
        (Shape::new(1, 3, 64, 64), DType::BF16, false, true),
    ];
    let big = (Shape::new(8, 3, 256, 256), DType::BF16, false, true);
    let graphed = [
        Shape::new(1, 3, 64, 64),
        Shape::new(16, 3, 128, 128),
        Shape::new(8, 3, 256, 256),
    ];
    let plain = |(c, kind, label)| (c, (kind, false), label);
    let runs = (cases.into_iter().map(|c| plain((c, Kind::Perceptual, ""))))
        .chain(graphed.map(|s| {
            (
                (s, DType::BF16, false, true),
                (Kind::Perceptual, true),
                " CUDA graph",
            )
        }))
        .chain(
            [
                (big, Kind::PerceptualTo53, " to relu5_3"),
                (big, Kind::Lpips, " LPIPS"),
                (big, Kind::WithStyle, " + Grams relu1_2..relu4_3"),
                (big, Kind::WithStyleKept, " + Grams, kept target"),
            ]
            .map(plain),
        );
    for (case, kind, label) in runs {
        let (s, compute, tf32, with_grad) = case;
        let result = match compute {
            DType::BF16 => gpu_case::<bf16>(&dev, bytes, case, kind),
            _ => gpu_case::<f32>(&dev, bytes, case, kind),
        };
        let what = format!(
            "{s}{label} {}{} {}",
            compute.name(),
            match (compute, tf32) {
                (DType::F32, true) => " (TF32 on)",
                (DType::F32, false) => " (TF32 off)",
                _ => "",
            },
            if with_grad { "fwd+bwd" } else { "forward only" }
        );
        match result {
            // The floor takes the bf16 tensor peak: for f32 it is no floor.
            Ok((ms, plan, drop, floor)) if compute != DType::F32 => {
                println!("| {what} | {ms:.3} | {plan:.0} | {drop:.0} | {floor:.3} |")
            }
            Ok((ms, plan, drop, _)) => println!("| {what} | {ms:.3} | {plan:.0} | {drop:.0} | |"),
            Err(e) => println!("| {what} | failed: {e} | | | |"),
        }
    }
}
