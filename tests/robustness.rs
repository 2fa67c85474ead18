//! No input crashes the library: sizes that cannot exist are shape errors,
//! a failed allocation is an error value (and the next call works), and
//! the CPU convolutions keep their scratch within a fixed bound whatever
//! the image's shape. The memory cases run in a child process with its
//! address space limited, so an abort would fail the test instead of
//! ending the run.

mod common;

use common::{assert_child_ok, cpu_vgg, in_child, is_child, last_error, outputs};
use perceptual_loss::ffi::*;
use perceptual_loss::{
    seeded_safetensors, DType, Device, Error, LossOutputs, PerceptualConfig, PerceptualLoss, Shape,
    Tap, TensorMut, TensorRef, Vgg, VggArch, VggOptions, WeightsSource,
};

/// The calls that crashed or panicked before: dimensions whose element
/// count fits an i64 but whose bytes do not fit an allocation, or a host
/// address space. Each is a shape error now, naming the argument, and
/// nothing is written.
#[test]
fn sizes_that_cannot_exist_are_shape_errors() {
    unsafe {
        let ctx = common::cpu_context();
        let x = [0f32; 16];
        let mut loss = -1.0f32;
        let out = outputs(&mut loss, std::ptr::null_mut());
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

        let file = common::TempFile::seeded_vgg16("robust.safetensors", 1);
        let c_path = &file.c_path;
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

/// The loss of constant images, with the gradient written into `grad`.
fn loss_into(loss: &PerceptualLoss, s: Shape, grad: &mut [f32]) -> perceptual_loss::Result<f32> {
    let n = common::numel(s);
    let (pred, target) = (vec![0.25f32; n], vec![0.75f32; n]);
    let mut value = UNTOUCHED;
    loss.compute(
        &TensorRef::host(&pred, s)?,
        &TensorRef::host(&target, s)?,
        LossOutputs::new(TensorMut::scalar(&mut value)).with_grad(TensorMut::host(grad, s)?),
    )?;
    Ok(value)
}

fn loss_and_grad(loss: &PerceptualLoss, s: Shape) -> perceptual_loss::Result<f32> {
    loss_into(loss, s, &mut vec![0f32; common::numel(s)])
}

/// What outputs hold before a call, to see that a failed one wrote nothing.
const UNTOUCHED: f32 = -7.0;

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
        let big = Shape::new(1, 1, 2048, 2048);
        let mut grad = vec![UNTOUCHED; common::numel(big)];
        let err = loss_into(&loss, big, &mut grad).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory(_)), "{err}");
        assert!(err.to_string().contains("bytes for"), "{err}");
        assert!(grad.iter().all(|&g| g == UNTOUCHED), "a failed call wrote");
        println!("the error: {err}");
        let value = loss_and_grad(&loss, Shape::new(1, 3, 16, 16)).unwrap();
        assert!(value > 0.0);
        drop(grad);
        // And through the C ABI: its own status, nothing written.
        unsafe { c_abi_out_of_memory(big) };
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

/// `pl_perceptual_loss` to relu1_2 on a `big` image: PL_ERR_OUT_OF_MEMORY
/// naming the allocation, loss and gradient untouched.
unsafe fn c_abi_out_of_memory(big: Shape) {
    let ctx = common::cpu_context();
    let file = common::TempFile::seeded_vgg16("robust-oom.safetensors", 2);
    let c_path = &file.c_path;
    let mut options = std::mem::zeroed();
    assert_eq!(pl_vgg_options_init(&mut options), PL_OK);
    options.depth = 3;
    let (mut vgg, mut perceptual) = (std::ptr::null_mut(), std::ptr::null_mut());
    assert_eq!(pl_vgg_load(ctx, c_path.as_ptr(), &options, &mut vgg), PL_OK);
    let mut config = std::mem::zeroed();
    assert_eq!(pl_perceptual_config_init(&mut config), PL_OK);
    let tap = [3i32];
    config.taps = tap.as_ptr();
    config.num_taps = 1;
    assert_eq!(pl_perceptual_create(vgg, &config, &mut perceptual), PL_OK);
    let n = common::numel(big);
    let (x, mut grad, mut loss) = (vec![0.5f32; n], vec![UNTOUCHED; n], UNTOUCHED);
    let out = outputs(&mut loss, grad.as_mut_ptr().cast());
    let dims = [big.n, big.c, big.h, big.w].map(|d| d as i64);
    let st = pl_perceptual_loss(
        perceptual,
        x.as_ptr().cast(),
        x.as_ptr().cast(),
        PL_F32,
        dims[0],
        dims[1],
        dims[2],
        dims[3],
        &out,
    );
    assert_eq!(st, PL_ERR_OUT_OF_MEMORY, "{}", last_error());
    assert!(last_error().contains("bytes for"), "{}", last_error());
    assert_eq!(loss, UNTOUCHED);
    assert!(grad.iter().all(|&g| g == UNTOUCHED), "a failed call wrote");
    pl_perceptual_destroy(perceptual);
    pl_vgg_destroy(vgg);
    pl_context_destroy(ctx);
}

#[test]
fn the_cpu_network_computes_in_f32_whatever_dtype_it_was_loaded_with() {
    let bytes = seeded_safetensors(VggArch::Vgg16, 2).unwrap();
    let vgg = cpu_vgg(&bytes, VggArch::Vgg16, DType::BF16);
    assert_eq!(vgg.compute_dtype(), DType::F32);
}

fn load_error(source: WeightsSource<'_>) -> Error {
    Vgg::load(&Device::cpu(), source, VggArch::Vgg16, DType::F32).unwrap_err()
}

/// A directory, a FIFO with no writer (opening it would block forever) and
/// a device (/dev/zero would be read until memory runs out) are refused
/// before they are opened. In a child process, so that a hang fails.
#[test]
fn weights_that_are_not_a_regular_file_are_refused_without_blocking() {
    if is_child("weights_that_are_not_a_regular_file_are_refused_without_blocking") {
        let dir = std::env::temp_dir().join(format!("weights-kinds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        for (path, kind) in [
            (dir.as_path(), "a directory"),
            (fifo.as_path(), "a FIFO"),
            ("/dev/zero".as_ref(), "a device"),
        ] {
            let e = load_error(WeightsSource::Path(path));
            assert!(matches!(e, Error::Io(_)), "{e}");
            assert!(
                e.to_string()
                    .contains(&format!("is {kind}, not a regular file")),
                "{e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    }
    let out = in_child(
        "weights_that_are_not_a_regular_file_are_refused_without_blocking",
        None,
    );
    assert_child_ok(&out, "a directory, a FIFO and a device as weights");
}

/// A 2 GiB file (sparse: it takes no disk) whose header length is
/// impossible is refused from its first 8 bytes: under a 900 MB limit the
/// load reads nothing else.
#[test]
fn a_huge_file_is_refused_from_its_header() {
    if is_child("a_huge_file_is_refused_from_its_header") {
        let path = std::env::temp_dir().join(format!("huge-{}.safetensors", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(2 << 30).unwrap();
        std::io::Write::write_all(&mut &file, &(1u64 << 40).to_le_bytes()).unwrap();
        let e = load_error(WeightsSource::Path(&path));
        std::fs::remove_file(&path).unwrap();
        assert!(
            e.to_string()
                .contains("header length is 1099511627776 bytes"),
            "{e}"
        );
        return;
    }
    let out = in_child("a_huge_file_is_refused_from_its_header", Some(LIMIT_KIB));
    assert_child_ok(&out, "a 2 GiB file with a bad header under a 900 MB limit");
}

/// A safetensors image's header as JSON, and its data.
fn split(file: &[u8]) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&file[8..8 + n]).unwrap();
    (header, file[8 + n..].to_vec())
}

fn join(header_text: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header_text.len() as u64).to_le_bytes().to_vec();
    out.extend(header_text.as_bytes());
    out.extend(data);
    out
}

/// Broken headers: each message names the tensor at fault, and the same
/// file gives the same message however often it is read.
#[test]
fn broken_headers_name_the_tensor_the_same_way_every_time() {
    let good = seeded_safetensors(VggArch::Vgg16, 4).unwrap();
    let (header, data) = split(&good);
    // features.14.weight given features.12.weight's offsets (same shape).
    let mut shared = header.clone();
    let offsets = shared["features.12.weight"]["data_offsets"].clone();
    shared["features.14.weight"]["data_offsets"] = offsets;
    let shared = join(&serde_json::to_string(&shared).unwrap(), &data);
    let first = load_error(WeightsSource::Bytes(&shared)).to_string();
    assert!(
        first.contains("tensor features.14.weight overlaps the data of tensor features.12.weight"),
        "{first}"
    );
    for _ in 0..8 {
        assert_eq!(load_error(WeightsSource::Bytes(&shared)).to_string(), first);
    }
    // A name given twice.
    let text = serde_json::to_string(&header).unwrap();
    let entry = format!(
        "\"features.0.bias\":{}",
        serde_json::to_string(&header["features.0.bias"]).unwrap()
    );
    let twice = join(&text.replacen('{', &format!("{{{entry},"), 1), &data);
    let e = load_error(WeightsSource::Bytes(&twice)).to_string();
    assert!(e.contains("\"features.0.bias\" is named twice"), "{e}");
    // Not UTF-8, not an object, a wrong dtype, a shape that is not a list.
    let mut bad_bytes = good.clone();
    bad_bytes[10] = 0xff;
    assert!(load_error(WeightsSource::Bytes(&bad_bytes))
        .to_string()
        .contains("not UTF-8 (at byte 2)"));
    let not_object = join("[1, 2]", &data);
    assert!(load_error(WeightsSource::Bytes(&not_object))
        .to_string()
        .contains("header is not valid"));
    for (field, value, message) in [
        (
            "dtype",
            serde_json::json!("I64"),
            "is I64; expected F32, F16 or BF16",
        ),
        (
            "shape",
            serde_json::json!(7),
            "has a shape that is not a list",
        ),
        ("data_offsets", serde_json::json!([0]), "not two offsets"),
        (
            "data_offsets",
            serde_json::json!([0, 1u64 << 40]),
            "takes 6912 bytes",
        ),
    ] {
        let mut h = header.clone();
        h["features.0.weight"][field] = value;
        let e = load_error(WeightsSource::Bytes(&join(
            &serde_json::to_string(&h).unwrap(),
            &data,
        )));
        let e = e.to_string();
        assert!(
            e.contains("tensor features.0.weight (conv1_1)") && e.contains(message),
            "{field}: {e}"
        );
    }
}

/// Files that break the format's layout are refused even where the
/// network would not read the bytes at fault: a gap in the convolutions
/// (not a prefix), an ignored tensor past the end of the data or sharing
/// another's bytes, and a header longer than any weights file needs.
#[test]
fn files_laid_out_wrong_are_refused_whatever_is_read() {
    let good = seeded_safetensors(VggArch::Vgg16, 4).unwrap();
    let (header, data) = split(&good);
    let refused = |h: &serde_json::Map<String, serde_json::Value>, message: &str| {
        let file = join(&serde_json::to_string(h).unwrap(), &data);
        let e = load_error(WeightsSource::Bytes(&file)).to_string();
        assert!(e.contains(message), "{message}: {e}");
        let depth = Vgg::depth_in(WeightsSource::Bytes(&file), VggOptions::default());
        assert_eq!(depth.unwrap_err().to_string(), e, "depth_in says the same");
    };
    let mut gap = header.clone();
    gap.remove("features.10.weight");
    gap.remove("features.10.bias");
    refused(
        &gap,
        "tensor features.10.weight (conv3_1) is missing, but the deeper features.12.weight (conv3_2) is there",
    );
    let end = data.len() as u64;
    let mut past = header.clone();
    past.insert(
        "classifier.6.bias".into(),
        serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]}),
    );
    refused(
        &past,
        "tensor classifier.6.bias has data_offsets that are not two offsets within",
    );
    let mut shared = header.clone();
    let offsets = header["features.0.weight"]["data_offsets"][0]
        .as_u64()
        .unwrap();
    shared.insert(
        "classifier.6.bias".into(),
        serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [offsets, offsets + 4]}),
    );
    refused(
        &shared,
        "tensor features.0.weight overlaps the data of tensor classifier.6.bias",
    );
    // 17 MiB of header (spaces are valid JSON padding): refused from its length.
    let mut long = (17u64 << 20).to_le_bytes().to_vec();
    long.resize(8 + (17 << 20), b' ');
    let e = load_error(WeightsSource::Bytes(&long)).to_string();
    assert!(e.contains("more than the 16777216 allowed"), "{e}");
}

/// The header alone tells how deep a load would go, for a whole file and
/// a prefix, through Rust and C, without reading tensor data.
#[test]
fn the_depth_of_a_file_from_its_header() {
    let good = seeded_safetensors(VggArch::Vgg16, 5).unwrap();
    let whole = Vgg::depth_in(WeightsSource::Bytes(&good), VggOptions::default()).unwrap();
    assert_eq!(whole, 30);
    // A NaN in the data: a load finds it, the header alone cannot.
    let (mut header, data) = split(&good);
    let mut poisoned = data.clone();
    let at = header["features.0.weight"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    poisoned[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let poisoned = join(&serde_json::to_string(&header).unwrap(), &poisoned);
    let options = VggOptions::default();
    assert_eq!(
        Vgg::depth_in(WeightsSource::Bytes(&poisoned), options).unwrap(),
        30
    );
    let e = load_error(WeightsSource::Bytes(&poisoned)).to_string();
    assert!(e.contains("non-finite value"), "{e}");
    for layer in [17, 19, 21, 24, 26, 28] {
        header.remove(&format!("features.{layer}.weight"));
        header.remove(&format!("features.{layer}.bias"));
    }
    let prefix = join(&serde_json::to_string(&header).unwrap(), &data);
    let file = common::TempFile::new("prefix.safetensors", &prefix);
    let mut depth = -1;
    let st = unsafe { pl_vgg_depth(file.c_path.as_ptr(), std::ptr::null(), &mut depth) };
    assert_eq!(st, PL_OK, "{}", last_error());
    assert_eq!(depth, 16, "up to pool3, before the missing conv4_1");
}
