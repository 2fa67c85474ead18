//! The C ABI end to end: tests/c/tv_check.c compiled with the system C
//! compiler against include/perceptual_loss.h and the static library, then
//! run. Also the same entry points called from Rust.

mod common;

use common::{last_error, outputs};
use perceptual_loss::ffi::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles tests/c/<name>.c against the header and the static library.
fn build_c(name: &str) -> PathBuf {
    build_c_file(&format!("tests/c/{name}.c"), name)
}

/// The folder these tests write their programs and files into (cargo's
/// scratch folder for integration tests), created on first use.
fn work_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("c-abi");
    std::fs::create_dir_all(&dir).expect("create the C ABI tests' folder");
    dir
}

/// Compiles the C file at `source` (relative to the repository) into `exe`.
fn build_c_file(source: &str, exe: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = common::built_libraries().join("libperceptual_loss.a");
    let exe = work_dir().join(exe);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("include"))
        .arg(root.join(source))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("run the C compiler");
    assert!(
        out.status.success(),
        "{cc} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs a C program; its stdout when it exits 0.
fn run_c(exe: &Path, args: &[&Path]) -> String {
    let run = Command::new(exe).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "C checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

#[test]
fn c_example_runs() {
    let exe = build_c_file("examples/c/perceptual_demo.c", "perceptual_demo");
    let run = Command::new(&exe)
        .current_dir(exe.parent().unwrap())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The numbers after each `label` on its line.
    let numbers = |label: &str| -> Vec<f64> {
        let line = out
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label:?} in {out}"));
        line[label.len()..]
            .split(|c: char| !(c.is_ascii_digit() || ".-+e".contains(c)))
            .filter_map(|v| v.parse().ok())
            .collect()
    };
    // perceptual loss L, |grad| G, per image p0 p1 (L is their mean).
    let [loss, grad_p, p0, p1] = numbers("perceptual loss ")[..] else {
        panic!("{out}")
    };
    assert!(loss.is_finite() && loss > 0.0 && grad_p > 0.0, "{out}");
    common::assert_rel((p0 + p1) / 2.0, loss, 1e-5, "per-image mean");
    let [tv, grad_tv] = numbers("tv loss ")[..] else {
        panic!("{out}")
    };
    assert!(tv.is_finite() && tv > 0.0 && grad_tv > 0.0, "{out}");
    // |grad_p + grad_tv| with beta = 1: neither gradient alone, and
    // within the triangle inequality.
    let [sum] = numbers("|perceptual grad + tv grad| ")[..] else {
        panic!("{out}")
    };
    assert!(
        sum <= grad_p + grad_tv && sum >= (grad_p - grad_tv).abs(),
        "{out}"
    );
    assert!(
        (sum - grad_tv).abs() > 1e-6 * sum && (sum - grad_p).abs() > 1e-6 * sum,
        "accumulated: {out}"
    );
}

#[test]
fn c_program_runs_against_the_static_library() {
    assert_eq!(run_c(&build_c("tv_check"), &[]).trim(), "ok");
}

#[test]
fn c_perceptual_program_matches_the_oracle() {
    use common::vgg::{perceptual, Net, Spec, IMAGENET_MEAN, IMAGENET_STD};
    use perceptual_loss::{Shape, VggArch};
    let mut net = Net::random(VggArch::Vgg16, 41);
    let bytes = net.export_safetensors(safetensors::Dtype::F32, "", |_| false);
    let path = work_dir().join("vgg16-test.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let out = run_c(&build_c("perceptual_check"), &[&path]);
    let value = |key: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in {out}"));
        line[key.len()..].trim().parse().unwrap()
    };
    // The images perceptual_check.c builds.
    let count = 3 * 16 * 16;
    let pred: Vec<f64> = (0..count)
        .map(|i| ((i * 37) % 101) as f32 as f64 / 101.0)
        .collect();
    let target: Vec<f64> = (0..count)
        .map(|i| ((i * 53) % 97) as f32 as f64 / 97.0)
        .collect();
    let (pred, target): (Vec<f64>, Vec<f64>) = (
        pred.iter().map(|&v| v as f32 as f64).collect(),
        target.iter().map(|&v| v as f32 as f64).collect(),
    );
    let s = Shape::new(1, 3, 16, 16);
    let defaults = Spec {
        taps: [3, 8, 15, 22].map(|t| (t, 1.0)).to_vec(),
        mae: false,
        affine: [(1.0, 0.0); 3],
        avg_pool: false,
        weight: 1.0,
    };
    common::assert_rel(
        value("loss"),
        perceptual(&net, &defaults, &pred, &target, s),
        2e-5,
        "C default loss",
    );
    let named = Spec {
        taps: vec![(8, 1.0), (15, 0.5)],
        mae: true,
        affine: std::array::from_fn(|c| {
            (1.0 / IMAGENET_STD[c], -IMAGENET_MEAN[c] / IMAGENET_STD[c])
        }),
        avg_pool: false,
        weight: 2.0,
    };
    common::assert_rel(
        value("named"),
        perceptual(&net, &named, &pred, &target, s),
        2e-5,
        "C named loss",
    );
    // The C config's style fields reach the loss: the same terms through
    // the Rust API (tests/style_cpu.rs checks them against an oracle).
    let line = out.lines().find(|l| l.starts_with("style ")).unwrap();
    // %.9g round-trips an f32
    let got: Vec<f32> = line[6..].split(' ').map(|v| v.parse().unwrap()).collect();
    let vgg = common::cpu_vgg(
        &std::fs::read(&path).unwrap(),
        VggArch::Vgg16,
        perceptual_loss::DType::F32,
    );
    let cfg = perceptual_loss::PerceptualConfig {
        taps: vec!["relu2_2".into()],
        style_taps: vec!["relu1_2".into(), "relu2_2".into()],
        style_weight: 3.0,
        ..Default::default()
    };
    let loss = perceptual_loss::PerceptualLoss::new(vgg, &cfg).unwrap();
    let as_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let (p, t) = (as_f32(&pred), as_f32(&target));
    let (mut total, mut parts) = (0f32, [0f32; 2]);
    use perceptual_loss::{LossOutputs, TensorMut, TensorRef};
    loss.compute(
        &TensorRef::host(&p, s).unwrap(),
        &TensorRef::host(&t, s).unwrap(),
        LossOutputs::new(TensorMut::scalar(&mut total))
            .with_parts(TensorMut::host(&mut parts, Shape::flat(2)).unwrap()),
    )
    .unwrap();
    assert_eq!(got, parts, "C style parts");
    // LPIPS with the embedded weights (tests/lpips_cpu.rs checks it
    // against an oracle): the C call is the Rust one.
    let vgg = common::cpu_vgg(
        &std::fs::read(&path).unwrap(),
        VggArch::Vgg16,
        perceptual_loss::DType::F32,
    );
    let lpips = perceptual_loss::Lpips::new(vgg, &Default::default()).unwrap();
    let want = lpips
        .value(
            &TensorRef::host(&p, s).unwrap(),
            &TensorRef::host(&t, s).unwrap(),
        )
        .unwrap();
    assert_eq!(value("lpips") as f32, want, "C LPIPS");
}

/// The TV options of `variant` and `reduction`, weight `weight`.
unsafe fn tv_config(variant: pl_tv_variant, reduction: pl_reduction, weight: f32) -> pl_tv_config {
    let mut config = std::mem::zeroed();
    assert_eq!(pl_tv_config_init(&mut config), PL_OK);
    config.variant = variant;
    config.reduction = reduction;
    config.weight = weight;
    config
}

#[test]
fn rust_caller_sees_statuses_and_messages() {
    unsafe {
        let ctx = common::cpu_context();
        let x: Vec<f32> = (0..2 * 3 * 4 * 5)
            .map(|i| ((i * 7919) % 13) as f32 / 13.0)
            .collect();
        let mut grad = vec![f32::NAN; x.len()];
        let mut loss = f32::NAN;
        let mut per_sample = [f32::NAN; 2];
        let mut out = outputs(&mut loss, grad.as_mut_ptr().cast());
        out.per_sample = per_sample.as_mut_ptr();
        let iso_sum = tv_config(PL_TV_ISOTROPIC, PL_REDUCTION_SUM, 2.0);
        let st = pl_tv_loss(ctx, &iso_sum, x.as_ptr().cast(), PL_F32, 2, 3, 4, 5, &out);
        assert_eq!(st, PL_OK, "{}", last_error());
        // Independent formula: isotropic, summed over the batch, weight 2.
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let s = perceptual_loss::Shape::new(2, 3, 4, 5);
        let formula = common::Formula::Isotropic(0.0);
        let want = common::tv_loss(formula, &x64, s, 2.0, false);
        common::assert_rel(loss as f64, want, 1e-6, "isotropic sum via C ABI");
        let one = perceptual_loss::Shape::new(1, 3, 4, 5);
        for (n, &got) in per_sample.iter().enumerate() {
            let image = &x64[n * 60..(n + 1) * 60];
            let want = common::tv_loss(formula, image, one, 2.0, false);
            common::assert_rel(got as f64, want, 1e-6, "per-image isotropic via C ABI");
        }
        assert!(grad.iter().all(|g| g.is_finite()));
        // The isotropic eps reaches the kernel: a constant image has the
        // loss sqrt(eps) per pixel of the (H-1) x (W-1) region.
        let flat = vec![0.5f32; 60];
        let mut with_eps = iso_sum;
        with_eps.eps = 4.0;
        let st = pl_tv_loss(
            ctx,
            &with_eps,
            flat.as_ptr().cast(),
            PL_F32,
            1,
            3,
            4,
            5,
            &out,
        );
        assert_eq!(st, PL_OK, "{}", last_error());
        assert_eq!(
            loss,
            2.0 * 3.0 * 12.0 * 2.0,
            "weight 2 * 36 terms of sqrt(4)"
        );

        // f16 through the C ABI.
        let xh: Vec<perceptual_loss::half::f16> = x
            .iter()
            .map(|&v| perceptual_loss::half::f16::from_f32(v))
            .collect();
        let l2 = tv_config(PL_TV_L2, PL_REDUCTION_MEAN, 1.0);
        let loss_only = outputs(&mut loss, std::ptr::null_mut());
        let st = pl_tv_loss(ctx, &l2, xh.as_ptr().cast(), PL_F16, 2, 3, 4, 5, &loss_only);
        assert_eq!(st, PL_OK, "{}", last_error());

        let l1 = tv_config(PL_TV_L1, PL_REDUCTION_MEAN, 1.0);
        let tv = |config: &pl_tv_config, dims: [i64; 4], out: &pl_outputs| {
            let [n, c, h, w] = dims;
            pl_tv_loss(ctx, config, x.as_ptr().cast(), PL_F32, n, c, h, w, out)
        };
        // Overflowing dimensions.
        assert_eq!(
            tv(&l1, [i64::MAX, 2, 2, 2], &loss_only),
            PL_ERR_INVALID_SHAPE
        );
        assert!(
            last_error().contains("too many elements"),
            "{}",
            last_error()
        );
        // Zero dimension.
        assert_eq!(tv(&l1, [1, 0, 2, 2], &loss_only), PL_ERR_INVALID_SHAPE);
        // Non-finite weight.
        let nan = tv_config(PL_TV_L1, PL_REDUCTION_MEAN, f32::NAN);
        assert_eq!(tv(&nan, [1, 1, 2, 2], &loss_only), PL_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("weight"), "{}", last_error());
        // An unknown reduction.
        let bad = tv_config(PL_TV_L1, 2, 1.0);
        assert_eq!(tv(&bad, [1, 1, 2, 2], &loss_only), PL_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("pl_reduction 2"), "{}", last_error());
        // Loss output overlapping x, per-sample output overlapping the
        // loss, a non-finite beta.
        let aliased = outputs(x.as_ptr() as *mut f32, std::ptr::null_mut());
        assert_eq!(tv(&l1, [1, 1, 2, 2], &aliased), PL_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("overlap"), "{}", last_error());
        let mut doubled = outputs(&mut loss, std::ptr::null_mut());
        doubled.per_sample = &mut loss;
        assert_eq!(tv(&l1, [1, 1, 2, 2], &doubled), PL_ERR_INVALID_ARGUMENT);
        let mut bad_beta = outputs(&mut loss, grad.as_mut_ptr().cast());
        bad_beta.beta = f32::INFINITY;
        assert_eq!(tv(&l1, [1, 1, 2, 2], &bad_beta), PL_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("beta"), "{}", last_error());
        let mut reserved = outputs(&mut loss, std::ptr::null_mut());
        reserved.reserved = 1;
        assert_eq!(tv(&l1, [1, 1, 2, 2], &reserved), PL_ERR_INVALID_ARGUMENT);
        assert_eq!(
            pl_context_synchronize(std::ptr::null_mut()),
            PL_ERR_INVALID_ARGUMENT
        );
        pl_context_destroy(ctx);
    }
}

#[test]
fn the_feature_distance_and_its_per_image_values() {
    use common::{assert_rel, Rng};
    unsafe {
        let ctx = common::cpu_context();
        let mut rng = Rng::new(5);
        let (a, b) = (
            rng.vec(3 * 2 * 5 * 7, -1.0, 1.0),
            rng.vec(3 * 2 * 5 * 7, -1.0, 1.0),
        );
        let (mut loss, mut per, mut grad) = (f32::NAN, [f32::NAN; 3], vec![f32::NAN; a.len()]);
        let mut out = outputs(&mut loss, grad.as_mut_ptr().cast());
        out.per_sample = per.as_mut_ptr();
        let mut config = std::mem::zeroed();
        assert_eq!(pl_feature_config_init(&mut config), PL_OK);
        config.weight = 0.5;
        let st = pl_feature_loss(
            ctx,
            &config,
            a.as_ptr().cast(),
            b.as_ptr().cast(),
            PL_F32,
            3,
            2,
            5,
            7,
            &out,
        );
        assert_eq!(st, PL_OK, "{}", last_error());
        // Written from the definition: 0.5 * mean of squares, per image and overall.
        let sq = |r: std::ops::Range<usize>| -> f64 {
            r.clone()
                .map(|i| (a[i] as f64 - b[i] as f64).powi(2))
                .sum::<f64>()
                / r.len() as f64
        };
        assert_rel(loss as f64, 0.5 * sq(0..a.len()), 1e-6, "MSE via C ABI");
        for (n, &v) in per.iter().enumerate() {
            assert_rel(v as f64, 0.5 * sq(n * 70..(n + 1) * 70), 1e-6, "per image");
        }
        let want0 = 0.5 * 2.0 * (a[0] as f64 - b[0] as f64) / a.len() as f64;
        assert_rel(grad[0] as f64, want0, 1e-6, "MSE gradient");
        let st = pl_feature_loss(
            ctx,
            &config,
            a.as_ptr().cast(),
            std::ptr::null(),
            PL_F32,
            3,
            2,
            5,
            7,
            &out,
        );
        assert_eq!(st, PL_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("b is NULL"), "{}", last_error());
        config.criterion = 7;
        let st = pl_feature_loss(
            ctx,
            &config,
            a.as_ptr().cast(),
            b.as_ptr().cast(),
            PL_F32,
            3,
            2,
            5,
            7,
            &out,
        );
        assert_eq!(st, PL_ERR_INVALID_ARGUMENT);
        pl_context_destroy(ctx);
    }
}

#[test]
fn the_header_compiles_on_its_own_as_c99_and_cpp() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = work_dir();
    // The header first, nothing before it; the version macro is usable.
    let source = "#include \"perceptual_loss.h\"\n\
                  int main(void) { return PL_ABI_VERSION == 2 && sizeof(pl_outputs) > 0 ? 0 : 1; }\n";
    for (compiler, var, lang, std) in [
        ("cc", "CC", "c", "-std=c99"),
        ("c++", "CXX", "c++", "-std=c++11"),
    ] {
        let file = dir.join(format!(
            "header_only.{}",
            if lang == "c" { "c" } else { "cpp" }
        ));
        std::fs::write(&file, source).unwrap();
        let cc = std::env::var(var).unwrap_or_else(|_| compiler.into());
        let out = Command::new(&cc)
            .args([
                std,
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pedantic",
                "-fsyntax-only",
                "-I",
            ])
            .arg(root.join("include"))
            .arg(&file)
            .output()
            .expect("run the compiler");
        assert!(
            out.status.success(),
            "{cc} {std} failed on the header alone:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn cuda_context_without_a_device_is_a_clean_error() {
    if common::gpu_present() {
        perceptual_loss::report_skip("a CUDA device is present");
        return;
    }
    let mut ctx = std::ptr::null_mut();
    let st = unsafe { pl_context_create(PL_DEVICE_CUDA, 0, std::ptr::null_mut(), &mut ctx) };
    assert_eq!(st, PL_ERR_NO_CUDA, "{}", last_error());
    assert!(ctx.is_null());
    assert!(
        last_error().starts_with("no CUDA device"),
        "{}",
        last_error()
    );
}

#[test]
fn seeded_weights_and_streams_through_the_c_abi() {
    use std::ffi::CString;
    let dir = work_dir();
    let path = CString::new(dir.join("seeded-vgg19.safetensors").to_str().unwrap()).unwrap();
    unsafe {
        assert_eq!(
            pl_seeded_weights_write(path.as_ptr(), PL_VGG19, 7),
            PL_OK,
            "{}",
            last_error()
        );
        assert_eq!(
            pl_seeded_weights_write(path.as_ptr(), 5, 7),
            PL_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            pl_seeded_weights_write(std::ptr::null(), PL_VGG16, 7),
            PL_ERR_INVALID_ARGUMENT
        );
        let ctx = common::cpu_context();
        // A CPU context has no stream but NULL.
        assert_eq!(pl_context_set_stream(ctx, std::ptr::null_mut()), PL_OK);
        assert_eq!(
            pl_context_set_stream(ctx, 8 as *mut _),
            PL_ERR_INVALID_ARGUMENT
        );
        let mut options = std::mem::zeroed();
        assert_eq!(pl_vgg_options_init(&mut options), PL_OK);
        options.arch = PL_VGG19;
        let mut vgg = std::ptr::null_mut();
        assert_eq!(
            pl_vgg_load(ctx, path.as_ptr(), &options, &mut vgg),
            PL_OK,
            "{}",
            last_error()
        );
        let mut loss = std::ptr::null_mut();
        assert_eq!(
            pl_perceptual_create(vgg, std::ptr::null(), &mut loss),
            PL_OK
        );
        let x = vec![0.5f32; 3 * 8 * 8];
        let mut value = f32::NAN;
        let out = outputs(&mut value, std::ptr::null_mut());
        let st = pl_perceptual_loss(
            loss,
            x.as_ptr().cast(),
            x.as_ptr().cast(),
            PL_F32,
            1,
            3,
            8,
            8,
            &out,
        );
        assert_eq!(st, PL_OK, "{}", last_error());
        assert_eq!(value, 0.0, "identical inputs");
        // The cost model through C is the Rust one, field for field.
        let mut report = std::mem::zeroed();
        assert_eq!(pl_plan_report_init(&mut report), PL_OK);
        let st = pl_perceptual_plan_report(loss, PL_BF16, 2, 3, 8, 8, 1, &mut report);
        assert_eq!(st, PL_OK, "{}", last_error());
        let seeded =
            perceptual_loss::seeded_safetensors(perceptual_loss::VggArch::Vgg19, 7).unwrap();
        let vgg19 = perceptual_loss::Vgg::load(
            &perceptual_loss::Device::cpu(),
            perceptual_loss::WeightsSource::Bytes(&seeded),
            perceptual_loss::VggArch::Vgg19,
            perceptual_loss::DType::F32,
        )
        .unwrap();
        let loss_rs = perceptual_loss::PerceptualLoss::new(vgg19, &Default::default()).unwrap();
        let want = loss_rs
            .plan_report(
                perceptual_loss::Shape::new(2, 3, 8, 8),
                perceptual_loss::DType::BF16,
                true,
            )
            .unwrap();
        let got = [
            report.chunks,
            report.kernel_launches,
            report.cudnn_calls,
            report.kernel_bytes_read,
            report.kernel_bytes_written,
            report.conv_flops,
            report.gram_flops,
        ];
        let want = [
            want.chunks as u64,
            want.kernel_launches as u64,
            want.cudnn_calls as u64,
            want.kernel_bytes_read,
            want.kernel_bytes_written,
            want.conv_flops,
            want.gram_flops,
        ];
        assert_eq!(got, want);
        // A caller built before gram_flops: its smaller struct is written
        // up to where it ends.
        let mut old = report;
        old.struct_size = std::mem::offset_of!(pl_plan_report, gram_flops);
        old.gram_flops = 12345;
        assert_eq!(
            pl_perceptual_plan_report(loss, PL_BF16, 2, 3, 8, 8, 1, &mut old),
            PL_OK
        );
        assert_eq!((old.gram_flops, old.conv_flops), (12345, report.conv_flops));
        // Against a kept target: pred's half of the forward alone, as Rust
        // counts it.
        let mut kept = std::mem::zeroed();
        assert_eq!(pl_plan_report_init(&mut kept), PL_OK);
        let st = pl_perceptual_resident_plan_report(loss, PL_BF16, 2, 3, 8, 8, 1, &mut kept);
        assert_eq!(st, PL_OK, "{}", last_error());
        let want = loss_rs
            .resident_plan_report(
                perceptual_loss::Shape::new(2, 3, 8, 8),
                perceptual_loss::DType::BF16,
                true,
            )
            .unwrap();
        assert_eq!(
            (kept.cudnn_calls, kept.conv_flops, kept.kernel_bytes_read),
            (
                want.cudnn_calls as u64,
                want.conv_flops,
                want.kernel_bytes_read
            )
        );
        assert!(kept.conv_flops < report.conv_flops);
        assert!(report.kernel_launches > 0 && report.conv_flops > 0);
        pl_perceptual_destroy(loss);
        pl_vgg_destroy(vgg);
        pl_context_destroy(ctx);
    }
}
