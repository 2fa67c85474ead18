//! CUDA against the CPU oracle. Without a device every test prints
//! `skipped: no CUDA device` and passes; PERCEPTUAL_LOSS_REQUIRE_GPU=1
//! turns a missing device into a failure (scripts/gpu-check.sh sets it).
//!
//! Outputs are poisoned (NaN) before each call, so an element the kernel
//! forgets to write shows up as a mismatch.

mod common;

use common::{assert_close, assert_rel, gpu, numel, tv_configs, Rng};
use perceptual_loss::cudarc::driver::{CudaSlice, CudaStream};
use perceptual_loss::half::{bf16, f16};
use perceptual_loss::{
    Criterion, DType, Device, Element, Error, FeatureLoss, LossOutputs, Reduction, Shape,
    TensorMut, TensorRef, TvConfig, TvLoss, TvVariant,
};
use std::sync::Arc;

fn stream(dev: &Device) -> Arc<CudaStream> {
    dev.cuda_stream().expect("a CUDA device").clone()
}

fn upload<T: Element>(s: &Arc<CudaStream>, v: &[f32]) -> CudaSlice<T> {
    let host: Vec<T> = v.iter().map(|&x| T::from_f64(x as f64)).collect();
    s.clone_htod(&host).unwrap()
}

fn download<T: Element>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<f64> {
    s.clone_dtoh(d)
        .unwrap()
        .iter()
        .map(|v| v.to_f64())
        .collect()
}

struct Result3 {
    loss: f64,
    grad: Vec<f64>,
    per_sample: Vec<f64>,
}

/// Runs the TV loss on `dev` with `grad` starting as `old` (NaN when None).
fn tv_on<T: Element>(
    dev: &Device,
    cfg: TvConfig,
    x: &[f32],
    s: Shape,
    beta: f32,
    old: Option<&[f32]>,
) -> Result3 {
    let nan = vec![f32::NAN; x.len()];
    let old = old.unwrap_or(&nan);
    let tv = TvLoss::new(cfg).unwrap();
    match dev.cuda_stream() {
        None => {
            let xs: Vec<T> = x.iter().map(|&v| T::from_f64(v as f64)).collect();
            let mut g: Vec<T> = old.iter().map(|&v| T::from_f64(v as f64)).collect();
            let (mut loss, mut per) = (f32::NAN, vec![f32::NAN; s.n]);
            tv.compute(
                dev,
                &TensorRef::host(&xs, s).unwrap(),
                LossOutputs::new(TensorMut::scalar(&mut loss))
                    .with_grad(TensorMut::host(&mut g, s).unwrap())
                    .accumulate(beta)
                    .with_per_sample(TensorMut::host(&mut per, Shape::flat(s.n)).unwrap()),
            )
            .unwrap();
            Result3 {
                loss: loss as f64,
                grad: g.iter().map(|v| v.to_f64()).collect(),
                per_sample: per.iter().map(|&v| v as f64).collect(),
            }
        }
        Some(st) => {
            let xd = upload::<T>(st, x);
            let mut gd = upload::<T>(st, old);
            let mut loss = upload::<f32>(st, &[f32::NAN]);
            let mut per = upload::<f32>(st, &vec![f32::NAN; s.n]);
            tv.compute(
                dev,
                &TensorRef::cuda(&xd, s).unwrap(),
                LossOutputs::new(TensorMut::cuda(&mut loss, Shape::flat(1)).unwrap())
                    .with_grad(TensorMut::cuda(&mut gd, s).unwrap())
                    .accumulate(beta)
                    .with_per_sample(TensorMut::cuda(&mut per, Shape::flat(s.n)).unwrap()),
            )
            .unwrap();
            Result3 {
                loss: download(st, &loss)[0],
                grad: download(st, &gd),
                per_sample: download(st, &per),
            }
        }
    }
}

/// (loss rtol, gradient rtol, gradient atol as a fraction of max |grad|).
fn tolerance(dtype: DType) -> (f64, f64, f64) {
    match dtype {
        DType::F32 => (1e-6, 1e-5, 1e-6),
        DType::F16 | DType::BF16 => (1e-2, 1e-2, 1e-2),
    }
}

fn compare_tv<T: Element>(
    dev: &Device,
    cfg: TvConfig,
    x: &[f32],
    s: Shape,
    beta: f32,
    old: Option<&[f32]>,
) {
    let cpu = tv_on::<T>(&Device::cpu(), cfg, x, s, beta, old);
    let got = tv_on::<T>(dev, cfg, x, s, beta, old);
    let (lt, gr, ga) = tolerance(T::DTYPE);
    let what = format!("{} {cfg:?} {s}", T::DTYPE.name());
    assert_rel(got.loss, cpu.loss, lt, &format!("loss {what}"));
    assert_close(
        &got.per_sample,
        &cpu.per_sample,
        lt,
        0.0,
        &format!("per-sample {what}"),
    );
    let scale = cpu.grad.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert_close(
        &got.grad,
        &cpu.grad,
        gr,
        ga * scale,
        &format!("grad {what}"),
    );
}

#[test]
fn tv_matches_cpu_for_every_variant_dtype_and_shape() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(21);
    let shapes = [
        Shape::new(1, 1, 2, 2),
        Shape::new(3, 5, 7, 11),
        Shape::new(2, 3, 4, 33),
        Shape::new(4, 3, 67, 129),
        Shape::new(1, 1, 5, 300),
        Shape::new(1, 3, 257, 255),
        // More images than grid rows (65535): the kernel loops over images.
        Shape::new(70_000, 1, 2, 2),
    ];
    for s in shapes {
        let x = rng.vec(numel(s), -1.0, 1.0);
        for cfg in tv_configs() {
            compare_tv::<f32>(&dev, cfg, &x, s, 0.0, None);
            compare_tv::<f16>(&dev, cfg, &x, s, 0.0, None);
            compare_tv::<bf16>(&dev, cfg, &x, s, 0.0, None);
        }
    }
}

#[test]
fn tv_gradient_accumulates() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(22);
    let s = Shape::new(3, 2, 19, 45);
    let x = rng.vec(numel(s), -1.0, 1.0);
    let old = rng.vec(numel(s), -1.0, 1.0);
    for cfg in tv_configs() {
        compare_tv::<f32>(&dev, cfg, &x, s, 1.0, Some(&old));
        compare_tv::<bf16>(&dev, cfg, &x, s, 0.5, Some(&old));
    }
}

#[test]
fn tv_constant_image_gives_zero_without_nan() {
    let Some(dev) = gpu() else { return };
    let s = Shape::new(2, 3, 8, 9);
    let x = vec![0.5f32; numel(s)];
    for cfg in tv_configs().into_iter().filter(|c| c.eps == 0.0) {
        let r = tv_on::<f32>(&dev, cfg, &x, s, 0.0, None);
        assert_eq!(r.loss, 0.0, "{cfg:?}");
        assert!(r.grad.iter().all(|&g| g == 0.0), "{cfg:?}");
    }
}

#[test]
fn tv_loss_is_bit_identical_run_to_run() {
    let Some(dev) = gpu() else { return };
    let s = Shape::new(8, 3, 256, 256);
    let x = Rng::new(23).vec(numel(s), -1.0, 1.0);
    for cfg in [
        TvConfig::default(),
        TvConfig::new(TvVariant::L2),
        TvConfig::new(TvVariant::Isotropic),
    ] {
        let a = tv_on::<f32>(&dev, cfg, &x, s, 0.0, None);
        for _ in 0..3 {
            let b = tv_on::<f32>(&dev, cfg, &x, s, 0.0, None);
            assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{cfg:?}");
            assert_eq!(a.grad, b.grad, "{cfg:?}");
        }
    }
}

#[test]
fn tv_nan_input_propagates() {
    let Some(dev) = gpu() else { return };
    let s = Shape::new(1, 1, 4, 4);
    let mut x = vec![0.5f32; 16];
    x[5] = f32::NAN;
    for cfg in tv_configs() {
        let r = tv_on::<f32>(&dev, cfg, &x, s, 0.0, None);
        assert!(r.loss.is_nan() && r.grad[5].is_nan(), "{cfg:?}");
    }
}

#[test]
fn value_helper_and_best_device() {
    let Some(dev) = gpu() else { return };
    assert_eq!(Device::best().ordinal(), Some(0));
    let st = stream(&dev);
    let s = Shape::new(1, 1, 3, 3);
    let xd = upload::<f32>(&st, &[1., 2., 4., 7., 11., 16., 22., 29., 37.]);
    let v = TvLoss::new(TvConfig::default())
        .unwrap()
        .value(&dev, &TensorRef::cuda(&xd, s).unwrap())
        .unwrap();
    assert_eq!(v, 470.0); // hand-derived, see tests/tv_cpu.rs
}

#[test]
fn bad_device_buffers_are_clear_errors() {
    let Some(dev) = gpu() else { return };
    let st = stream(&dev);
    let tv = TvLoss::new(TvConfig::default()).unwrap();
    let s = Shape::new(1, 1, 8, 8);
    let xd = upload::<f32>(&st, &[0.0; 64]);
    let mut loss = upload::<f32>(&st, &[-3.0]);
    // A host tensor on a CUDA device.
    let host = vec![0f32; 64];
    let e = tv
        .compute(
            &dev,
            &TensorRef::host(&host, s).unwrap(),
            LossOutputs::new(TensorMut::cuda(&mut loss, Shape::flat(1)).unwrap()),
        )
        .unwrap_err();
    assert!(matches!(e, Error::DeviceMismatch(_)), "{e}");
    // A host loss output.
    let mut host_loss = 0f32;
    let e = tv
        .compute(
            &dev,
            &TensorRef::cuda(&xd, s).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut host_loss)),
        )
        .unwrap_err();
    assert!(matches!(e, Error::DeviceMismatch(_)), "{e}");
    // A raw view larger than its allocation.
    let (ptr, _) = perceptual_loss::cudarc::driver::DevicePtr::device_ptr(&xd, &st);
    let too_big = unsafe { TensorRef::from_raw_cuda(ptr, 0, DType::F32, Shape::new(1, 1, 8, 9)) };
    let e = tv
        .compute(
            &dev,
            &too_big,
            LossOutputs::new(TensorMut::cuda(&mut loss, Shape::flat(1)).unwrap()),
        )
        .unwrap_err();
    assert!(e.to_string().contains("allocation ends"), "{e}");
    // A misaligned address.
    let odd = unsafe { TensorRef::from_raw_cuda(ptr + 2, 0, DType::F32, Shape::new(1, 1, 2, 2)) };
    let e = tv
        .compute(
            &dev,
            &odd,
            LossOutputs::new(TensorMut::cuda(&mut loss, Shape::flat(1)).unwrap()),
        )
        .unwrap_err();
    assert!(e.to_string().contains("aligned"), "{e}");
    // A gradient aliasing x.
    let alias = unsafe { TensorMut::from_raw_cuda(ptr, 0, DType::F32, s) };
    let e = tv
        .compute(
            &dev,
            &TensorRef::cuda(&xd, s).unwrap(),
            LossOutputs::new(TensorMut::cuda(&mut loss, Shape::flat(1)).unwrap()).with_grad(alias),
        )
        .unwrap_err();
    assert!(e.to_string().contains("overlap"), "{e}");
    // A host address passed as a device pointer.
    let fake = unsafe { TensorRef::from_raw_cuda(host.as_ptr() as u64, 0, DType::F32, s) };
    let e = tv
        .compute(
            &dev,
            &fake,
            LossOutputs::new(TensorMut::cuda(&mut loss, Shape::flat(1)).unwrap()),
        )
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_eq!(download(&st, &loss)[0], -3.0, "nothing written on error");
}

fn feature_on<T: Element>(
    dev: &Device,
    crit: Criterion,
    a: &[f32],
    b: &[f32],
    beta: f32,
    old: &[f32],
) -> (f64, Vec<f64>) {
    let s = Shape::flat(a.len());
    let f = FeatureLoss::new(crit, 0.75).unwrap();
    match dev.cuda_stream() {
        None => {
            let (av, bv): (Vec<T>, Vec<T>) = (
                a.iter().map(|&v| T::from_f64(v as f64)).collect(),
                b.iter().map(|&v| T::from_f64(v as f64)).collect(),
            );
            let mut g: Vec<T> = old.iter().map(|&v| T::from_f64(v as f64)).collect();
            let mut loss = f32::NAN;
            f.compute(
                dev,
                &TensorRef::host(&av, s).unwrap(),
                &TensorRef::host(&bv, s).unwrap(),
                LossOutputs::new(TensorMut::scalar(&mut loss))
                    .with_grad(TensorMut::host(&mut g, s).unwrap())
                    .accumulate(beta),
            )
            .unwrap();
            (loss as f64, g.iter().map(|v| v.to_f64()).collect())
        }
        Some(st) => {
            let (ad, bd) = (upload::<T>(st, a), upload::<T>(st, b));
            let mut gd = upload::<T>(st, old);
            let mut loss = upload::<f32>(st, &[f32::NAN]);
            f.compute(
                dev,
                &TensorRef::cuda(&ad, s).unwrap(),
                &TensorRef::cuda(&bd, s).unwrap(),
                LossOutputs::new(TensorMut::cuda(&mut loss, Shape::flat(1)).unwrap())
                    .with_grad(TensorMut::cuda(&mut gd, s).unwrap())
                    .accumulate(beta),
            )
            .unwrap();
            (download(st, &loss)[0], download(st, &gd))
        }
    }
}

fn compare_feature<T: Element>(
    dev: &Device,
    crit: Criterion,
    a: &[f32],
    b: &[f32],
    beta: f32,
    old: &[f32],
) {
    let (cl, cg) = feature_on::<T>(&Device::cpu(), crit, a, b, beta, old);
    let (gl, gg) = feature_on::<T>(dev, crit, a, b, beta, old);
    let (lt, gr, ga) = tolerance(T::DTYPE);
    let what = format!("{} {crit:?} n={}", T::DTYPE.name(), a.len());
    assert_rel(gl, cl, lt, &format!("loss {what}"));
    let scale = cg.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert_close(&gg, &cg, gr, ga * scale, &format!("grad {what}"));
}

#[test]
fn feature_matches_cpu_for_every_criterion_dtype_and_size() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(24);
    for n in [1usize, 7, 1000, 65_537, 3_000_001] {
        let (a, b) = (rng.vec(n, -1.0, 1.0), rng.vec(n, -1.0, 1.0));
        let poison = vec![f32::NAN; n];
        let old = rng.vec(n, -1.0, 1.0);
        for crit in [Criterion::Mse, Criterion::Mae] {
            compare_feature::<f32>(&dev, crit, &a, &b, 0.0, &poison);
            compare_feature::<f16>(&dev, crit, &a, &b, 0.0, &poison);
            compare_feature::<bf16>(&dev, crit, &a, &b, 0.0, &poison);
            compare_feature::<f32>(&dev, crit, &a, &b, 1.0, &old);
        }
        // Identical inputs: zero loss and gradient, MAE included.
        let (l, g) = feature_on::<f32>(&dev, Criterion::Mae, &a, &a, 0.0, &poison);
        assert_eq!(l, 0.0);
        assert!(g.iter().all(|&v| v == 0.0));
    }
}

#[test]
fn feature_loss_is_bit_identical_run_to_run() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(25);
    let (a, b) = (rng.vec(2_000_000, -1.0, 1.0), rng.vec(2_000_000, -1.0, 1.0));
    let poison = vec![f32::NAN; a.len()];
    let first = feature_on::<f32>(&dev, Criterion::Mse, &a, &b, 0.0, &poison).0;
    for _ in 0..3 {
        assert_eq!(
            first.to_bits(),
            feature_on::<f32>(&dev, Criterion::Mse, &a, &b, 0.0, &poison)
                .0
                .to_bits()
        );
    }
}

#[test]
fn c_abi_on_a_cuda_context() {
    use perceptual_loss::ffi::*;
    let Some(dev) = gpu() else { return };
    let st = stream(&dev);
    let s = Shape::new(2, 3, 17, 23);
    let x = Rng::new(26).vec(numel(s), -1.0, 1.0);
    let xd = upload::<f32>(&st, &x);
    let gd = upload::<f32>(&st, &vec![f32::NAN; x.len()]);
    let ld = upload::<f32>(&st, &[f32::NAN]);
    st.synchronize().unwrap();
    let ptr = |d: &CudaSlice<f32>| perceptual_loss::cudarc::driver::DevicePtr::device_ptr(d, &st).0;
    unsafe {
        let mut ctx = std::ptr::null_mut();
        // The context's stream is the caller's: here the same one the buffers use.
        assert_eq!(
            pl_context_create(PL_DEVICE_CUDA, 0, st.cu_stream().cast(), &mut ctx),
            PL_OK
        );
        let mut config = std::mem::zeroed();
        assert_eq!(pl_tv_config_init(&mut config), PL_OK);
        config.variant = PL_TV_L2_SQUARED;
        config.reduction = PL_REDUCTION_SUM;
        let mut out = std::mem::zeroed();
        assert_eq!(pl_outputs_init(&mut out), PL_OK);
        out.loss = ptr(&ld) as *mut f32;
        out.grad = ptr(&gd) as *mut _;
        let status = pl_tv_loss(
            ctx,
            &config,
            ptr(&xd) as *const _,
            PL_F32,
            2,
            3,
            17,
            23,
            &out,
        );
        assert_eq!(status, PL_OK, "{}", common::last_error());
        assert_eq!(pl_context_synchronize(ctx), PL_OK);
        // A host pointer is refused by a CUDA context.
        let mut host_loss = 0f32;
        let mut host_out = std::mem::zeroed();
        assert_eq!(pl_outputs_init(&mut host_out), PL_OK);
        host_out.loss = &mut host_loss;
        let status = pl_tv_loss(
            ctx,
            &config,
            x.as_ptr().cast(),
            PL_F32,
            2,
            3,
            17,
            23,
            &host_out,
        );
        assert_eq!(status, PL_ERR_INVALID_ARGUMENT);
        pl_context_destroy(ctx);
    }
    let cfg = TvConfig {
        variant: TvVariant::L2Squared,
        reduction: Reduction::Sum,
        ..Default::default()
    };
    let cpu = tv_on::<f32>(&Device::cpu(), cfg, &x, s, 0.0, None);
    assert_rel(download(&st, &ld)[0], cpu.loss, 1e-6, "C ABI loss");
    let scale = cpu.grad.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert_close(
        &download(&st, &gd),
        &cpu.grad,
        1e-5,
        1e-6 * scale,
        "C ABI grad",
    );
}

#[test]
fn check_finite_on_a_device_names_the_first_bad_element() {
    let Some(dev) = gpu() else { return };
    let st = stream(&dev);
    let s = Shape::new(2, 3, 17, 23);
    let mut x = Rng::new(30).vec(numel(s), -1.0, 1.0);
    x[1000] = f32::NAN;
    x[900] = f32::INFINITY;
    let xd = upload::<f32>(&st, &x);
    let mut ld = upload::<f32>(&st, &[7.0]);
    let config = TvConfig {
        check_finite: true,
        ..TvConfig::new(TvVariant::L1)
    };
    let tv = TvLoss::new(config).unwrap();
    let out = LossOutputs::new(TensorMut::cuda(&mut ld, Shape::flat(1)).unwrap());
    let e = tv
        .compute(&dev, &TensorRef::cuda(&xd, s).unwrap(), out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "x holds a non-finite value (inf) at element 900 (image 0, channel 2, row 5, column 3)"
        ),
        "{e}"
    );
    assert_eq!(download(&st, &ld)[0], 7.0, "nothing written");
    // Finite input: the loss as without the check.
    x[900] = 0.5;
    x[1000] = 0.5;
    let checked = tv_on::<f32>(&dev, config, &x, s, 0.0, None).loss;
    let plain = tv_on::<f32>(&dev, TvConfig::new(TvVariant::L1), &x, s, 0.0, None).loss;
    assert_eq!(checked.to_bits(), plain.to_bits());
}
