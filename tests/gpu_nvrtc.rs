//! The NVRTC fallback: the embedded kernel sources compiled at run time
//! (PERCEPTUAL_LOSS_FORCE_NVRTC=1 skips the nvcc fatbins), checked against
//! the CPU oracle. Its own test binary, so the module cache starts empty.

mod common;

use common::{assert_close, assert_rel, gpu, numel, Rng};
use perceptual_loss::{
    Criterion, Device, FeatureLoss, LossOutputs, Shape, TensorMut, TensorRef, TvConfig, TvLoss,
    TvVariant,
};

#[test]
fn nvrtc_compiled_kernels_match_cpu() {
    // SAFETY (edition 2021: safe): set before any other thread of this binary exists.
    std::env::set_var("PERCEPTUAL_LOSS_FORCE_NVRTC", "1");
    let Some(dev) = gpu() else { return };
    let st = dev.cuda_stream().unwrap().clone();
    let s = Shape::new(2, 3, 31, 47);
    let x = Rng::new(31).vec(numel(s), -1.0, 1.0);
    let xd = st.clone_htod(&x).unwrap();
    for variant in [
        TvVariant::Article,
        TvVariant::L1,
        TvVariant::L2,
        TvVariant::Isotropic,
    ] {
        let tv = TvLoss::new(TvConfig::new(variant)).unwrap();
        let mut gd = st.clone_htod(&vec![f32::NAN; x.len()]).unwrap();
        let mut ld = st.clone_htod(&[f32::NAN]).unwrap();
        tv.compute(
            &dev,
            &TensorRef::cuda(&xd, s).unwrap(),
            LossOutputs::new(TensorMut::cuda(&mut ld, Shape::flat(1)).unwrap())
                .with_grad(TensorMut::cuda(&mut gd, s).unwrap()),
        )
        .unwrap();
        let (mut loss, mut grad) = (0f32, vec![0f32; x.len()]);
        tv.compute(
            &Device::cpu(),
            &TensorRef::host(&x, s).unwrap(),
            LossOutputs::new(TensorMut::scalar(&mut loss))
                .with_grad(TensorMut::host(&mut grad, s).unwrap()),
        )
        .unwrap();
        let got_loss = st.clone_dtoh(&ld).unwrap()[0];
        assert_rel(
            got_loss as f64,
            loss as f64,
            1e-6,
            &format!("{variant:?} loss"),
        );
        let want: Vec<f64> = grad.iter().map(|&v| v as f64).collect();
        let got: Vec<f64> = st
            .clone_dtoh(&gd)
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert_close(
            &got,
            &want,
            1e-5,
            1e-6 * scale,
            &format!("{variant:?} grad"),
        );
    }
    let f = FeatureLoss::new(Criterion::Mae, 1.0).unwrap();
    let yd = st.clone_htod(&vec![0.25f32; x.len()]).unwrap();
    let v = f
        .value(
            &dev,
            &TensorRef::cuda(&xd, s).unwrap(),
            &TensorRef::cuda(&yd, s).unwrap(),
        )
        .unwrap();
    let want = x.iter().map(|&a| (a as f64 - 0.25).abs()).sum::<f64>() / x.len() as f64;
    assert_rel(v as f64, want, 1e-6, "MAE via NVRTC");
}
