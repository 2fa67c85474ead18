//! No input crashes the library: sizes that cannot exist are shape errors,
//! a failed allocation is an error value (and the next call works), and
//! the CPU convolutions keep their scratch within a fixed bound whatever
//! the image's shape. The memory cases run in a child process with its
//! address space limited, so an abort would fail the test instead of
//! ending the run.

mod common;

use common::{assert_child_ok, in_child, is_child};
use perceptual_loss::ffi::*;
use perceptual_loss::{
    seeded_safetensors, DType, Device, Error, LossOutputs, PerceptualConfig, PerceptualLoss, Shape,
    Tap, TensorMut, TensorRef, Vgg, VggArch, VggOptions, WeightsSource,
};
use std::ffi::CStr;

fn last_error() -> String {
    // SAFETY: never NULL; valid until the next failing call on this thread.
    unsafe { CStr::from_ptr(pl_last_error()) }
        .to_string_lossy()
        .into_owned()
}

unsafe fn outputs(loss: *mut f32) -> pl_outputs {
    let mut out = std::mem::zeroed();
    assert_eq!(pl_outputs_init(&mut out), PL_OK);
    out.loss = loss;
    out
}

/// The calls that crashed or panicked before: dimensions whose element
/// count fits an i64 but whose bytes do not fit an allocation, or a host
/// address space. Each is a shape error now, naming the argument, and
/// nothing is written.
#[test]
fn sizes_that_cannot_exist_are_shape_errors() {
    unsafe {
        let mut ctx = std::ptr::null_mut();
        assert_eq!(
            pl_context_create(PL_DEVICE_CPU, 0, std::ptr::null_mut(), &mut ctx),
            PL_OK
        );
        let x = [0f32; 16];
        let mut loss = -1.0f32;
        let out = outputs(&mut loss);
        let cases: [(pl_dtype, i64, &str); 4] = [
            (PL_F32, 1 << 60, "more than"), // 2^61 elements of 4 bytes
            (PL_F16, 1 << 61, "more than"), // 2^62 elements of 2 bytes
            (PL_F16, (1 << 62) - 1, "more than"),
            (PL_F16, 1 << 60, "past the end of any host address space"),
        ];
        for (dtype, w, message) in cases {
            let st = pl_tv_loss(
                ctx,
                std::ptr::null(),
                x.as_ptr().cast(),
                dtype,
                1,
                1,
                2,
                w,
                &out,
            );
            assert_eq!(st, PL_ERR_INVALID_SHAPE, "w = {w}: {}", last_error());
            let e = last_error();
            assert!(e.contains(message), "w = {w}: {e}");
            assert!(e.contains('x'), "names the argument: {e}");
        }
        assert_eq!(loss, -1.0, "nothing written");

        let path = std::env::temp_dir().join(format!("robust-{}.st", std::process::id()));
        std::fs::write(&path, seeded_safetensors(VggArch::Vgg16, 1).unwrap()).unwrap();
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        let (mut vgg, mut perceptual) = (std::ptr::null_mut(), std::ptr::null_mut());
        assert_eq!(
            pl_vgg_load(ctx, c_path.as_ptr(), std::ptr::null(), &mut vgg),
            PL_OK
        );
        assert_eq!(
            pl_perceptual_create(vgg, std::ptr::null(), &mut perceptual),
            PL_OK
        );
        let big = 1i64 << 30;
        let (p, t) = (x.as_ptr().cast(), x.as_ptr().cast());
        let st = pl_perceptual_loss(perceptual, p, t, PL_F32, 1, 3, big, big, &out);
        assert_eq!(st, PL_ERR_INVALID_SHAPE, "{}", last_error());
        assert!(last_error().contains("pred"), "{}", last_error());
        // Could be an input (2^55 bytes), but its activations cannot be
        // held: checked before any work.
        let side = 1i64 << 27;
        let st = pl_perceptual_loss(perceptual, p, t, PL_F16, 1, 1, side, side, &out);
        assert_eq!(st, PL_ERR_INVALID_SHAPE, "{}", last_error());
        assert!(
            last_error().contains("conv1_1 activation"),
            "{}",
            last_error()
        );
        pl_perceptual_destroy(perceptual);
        pl_vgg_destroy(vgg);
        pl_context_destroy(ctx);
        let _ = std::fs::remove_file(path);
    }
}

/// A CPU network to relu1_2 only (the first two convolutions).
fn relu1_2() -> PerceptualLoss {
    let bytes = seeded_safetensors(VggArch::Vgg16, 2).unwrap();
    let options = VggOptions {
        up_to: Some(3),
        ..Default::default()
    };
    let vgg = Vgg::load_with(&Device::cpu(), WeightsSource::Bytes(&bytes), options).unwrap();
    let config = PerceptualConfig {
        taps: vec![Tap::from("relu1_2")],
        ..Default::default()
    };
    PerceptualLoss::new(vgg, &config).unwrap()
}

fn loss_and_grad(loss: &PerceptualLoss, s: Shape) -> perceptual_loss::Result<f32> {
    let n = s.n * s.c * s.h * s.w;
    let (pred, target) = (vec![0.25f32; n], vec![0.75f32; n]);
    let (mut value, mut grad) = (0f32, vec![0f32; n]);
    loss.compute(
        &TensorRef::host(&pred, s)?,
        &TensorRef::host(&target, s)?,
        LossOutputs::new(TensorMut::scalar(&mut value)).with_grad(TensorMut::host(&mut grad, s)?),
    )?;
    Ok(value)
}

/// Limit on the child's address space for the memory tests (KiB): room for
/// the test binary and a few hundred MB of buffers.
const LIMIT_KIB: u64 = 900_000;

/// One row of 300,000 pixels at relu1_2: unfolded whole, the second
/// convolution's columns alone would take 691 MB (and, before the bands
/// were bounded by bytes, aborted the process under this limit); in
/// bands they take at most 16 MiB, and the call fits.
#[test]
fn a_one_row_image_keeps_its_scratch_bounded() {
    if is_child("a_one_row_image_keeps_its_scratch_bounded") {
        let value = loss_and_grad(&relu1_2(), Shape::new(1, 1, 1, 300_000)).unwrap();
        assert!(value.is_finite() && value > 0.0, "{value}");
        return;
    }
    let out = in_child("a_one_row_image_keeps_its_scratch_bounded", Some(LIMIT_KIB));
    assert_child_ok(&out, "a one-row image under a 900 MB limit");
}

/// An image whose activations do not fit the limit: an out-of-memory
/// error naming what was being allocated, not an abort; then a small call
/// on the same loss works.
#[test]
fn allocation_failure_is_an_error_and_the_next_call_works() {
    if is_child("allocation_failure_is_an_error_and_the_next_call_works") {
        let loss = relu1_2();
        // conv1_1's output alone: 64 x 2048 x 2048 f32 = 1 GiB.
        let err = loss_and_grad(&loss, Shape::new(1, 1, 2048, 2048)).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory(_)), "{err}");
        assert!(err.to_string().contains("bytes for"), "{err}");
        println!("the error: {err}");
        let value = loss_and_grad(&loss, Shape::new(1, 3, 16, 16)).unwrap();
        assert!(value > 0.0);
        // And through the C ABI: its own status.
        assert_eq!(perceptual_loss::ffi::PL_ERR_OUT_OF_MEMORY, 10);
        return;
    }
    let out = in_child(
        "allocation_failure_is_an_error_and_the_next_call_works",
        Some(LIMIT_KIB),
    );
    assert_child_ok(&out, "a too large image under a 900 MB limit");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("out of memory"), "{text}");
}

#[test]
fn the_cpu_network_computes_in_f32_whatever_dtype_it_was_loaded_with() {
    let bytes = seeded_safetensors(VggArch::Vgg16, 2).unwrap();
    let vgg = Vgg::load(
        &Device::cpu(),
        WeightsSource::Bytes(&bytes),
        VggArch::Vgg16,
        DType::BF16,
    )
    .unwrap();
    assert_eq!(vgg.compute_dtype(), DType::F32);
}
