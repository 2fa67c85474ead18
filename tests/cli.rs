//! The `perceptual-loss compare` command on generated PNGs, against the f64
//! oracle and the TV formula of tests/common.

mod common;

use common::vgg::{perceptual, Net, Spec};
use perceptual_loss::images::save_png;
use perceptual_loss::{Shape, VggArch};
use std::path::{Path, PathBuf};
use std::process::Command;

fn workdir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A 1x3xHxW pattern as written to PNG: 8-bit values k/255.
fn pattern(h: usize, w: usize, seed: usize) -> Vec<f32> {
    (0..3 * h * w)
        .map(|i| ((i * (7 + seed) + seed * 31) % 256) as f32 / 255.0)
        .collect()
}

/// `compare a b` on the CPU with the seeded stand-in weights, then `extra`.
fn seeded_compare(a: &Path, b: &Path, extra: &[&str]) -> (i32, String, String) {
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let mut args = vec!["compare", a, b, "--seeded-weights", "--device", "cpu"];
    args.extend_from_slice(extra);
    cli(&args)
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_perceptual-loss"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// The number after `"key": ` in the first JSON object holding it, from `from` on.
fn json_number(text: &str, key: &str) -> f64 {
    let at = text
        .find(&format!("\"{key}\": "))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        + key.len()
        + 4;
    text[at..]
        .split([',', '}'])
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn weights(dir: &Path) -> (Net, PathBuf) {
    let mut net = Net::random(VggArch::Vgg16, 71);
    let path = dir.join("vgg16.safetensors");
    std::fs::write(
        &path,
        net.export_safetensors(safetensors::Dtype::F32, "", |_| false),
    )
    .unwrap();
    (net, path)
}

#[test]
fn compare_two_images_matches_the_oracle() {
    let dir = workdir("cli-two");
    let (net, w) = weights(&dir);
    let (h, wd) = (20, 24);
    let s = Shape::new(1, 3, h, wd);
    let (a, b) = (pattern(h, wd, 1), pattern(h, wd, 2));
    save_png(&dir.join("a.png"), &a, s, 0).unwrap();
    save_png(&dir.join("b.png"), &b, s, 0).unwrap();
    let (code, out, err) = cli(&[
        "compare",
        dir.join("a.png").to_str().unwrap(),
        dir.join("b.png").to_str().unwrap(),
        "--weights",
        w.to_str().unwrap(),
        "--device",
        "cpu",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.is_empty(), "{err}");
    let (a64, b64): (Vec<f64>, Vec<f64>) = (
        a.iter().map(|&v| v as f64).collect(),
        b.iter().map(|&v| v as f64).collect(),
    );
    let spec = Spec {
        taps: [3, 8, 15, 22].map(|t| (t, 1.0)).to_vec(),
        mae: false,
        affine: [(1.0, 0.0); 3],
        avg_pool: false,
        weight: 1.0,
    };
    common::assert_rel(
        json_number(&out, "perceptual"),
        perceptual(&net, &spec, &a64, &b64, s),
        2e-5,
        "perceptual",
    );
    common::assert_rel(
        json_number(&out, "tv_a"),
        common::tv_loss(common::Formula::Article, &a64, s, 1.0, true),
        1e-6,
        "tv(A)",
    );
    common::assert_rel(
        json_number(&out, "tv_b"),
        common::tv_loss(common::Formula::Article, &b64, s, 1.0, true),
        1e-6,
        "tv(B)",
    );
    assert!(
        out.contains("\"mean\": {\"pairs\": 1, \"perceptual\": "),
        "{out}"
    );
}

/// Folders A and B: two identical pairs, an image only in A, one only in B,
/// a size mismatch and an unreadable file.
fn folders(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = workdir(name);
    let (_, w) = weights(&dir);
    let (da, db) = (dir.join("A"), dir.join("B"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let s = Shape::new(1, 3, 16, 16);
    for (name, seed) in [("same.png", 3), ("same2.png", 6)] {
        save_png(&da.join(name), &pattern(16, 16, seed), s, 0).unwrap();
        save_png(&db.join(name), &pattern(16, 16, seed), s, 0).unwrap(); // identical: loss 0
    }
    save_png(&da.join("other.png"), &pattern(16, 16, 4), s, 0).unwrap();
    save_png(&db.join("extra.png"), &pattern(16, 16, 7), s, 0).unwrap();
    save_png(&da.join("size.png"), &pattern(16, 16, 5), s, 0).unwrap();
    save_png(
        &db.join("size.png"),
        &pattern(16, 18, 5),
        Shape::new(1, 3, 16, 18),
        0,
    )
    .unwrap();
    std::fs::write(da.join("broken.png"), b"not a png").unwrap();
    save_png(&db.join("broken.png"), &pattern(16, 16, 8), s, 0).unwrap();
    (da, db, w)
}

fn compare_folders(da: &Path, db: &Path, w: &Path, format: &str) -> String {
    let (code, out, err) = cli(&[
        "compare",
        da.to_str().unwrap(),
        db.to_str().unwrap(),
        "--weights",
        w.to_str().unwrap(),
        "--device",
        "cpu",
        "--format",
        format,
    ]);
    assert_eq!(code, 1, "a failed pair makes the exit status 1: {out}{err}");
    out
}

/// The error a pair reports when `name` is in `there` but not in `missing`.
fn no_counterpart(there: &Path, missing: &Path, name: &str) -> String {
    format!(
        "I/O error: {} has no counterpart {}",
        there.join(name).display(),
        missing.join(name).display()
    )
}

#[test]
fn folders_report_each_pair_and_the_problems() {
    let (da, db, w) = folders("cli-folders");
    let out = compare_folders(&da, &db, &w, "csv");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_string()
    };
    for name in ["same.png", "same2.png"] {
        assert!(
            line(name).starts_with(&format!("{name},0,")),
            "{}",
            line(name)
        );
    }
    assert_eq!(
        line("other.png"),
        format!("other.png,,,,{}", no_counterpart(&da, &db, "other.png"))
    );
    assert_eq!(
        line("extra.png"),
        format!("extra.png,,,,{}", no_counterpart(&db, &da, "extra.png"))
    );
    assert!(
        line("size.png").contains("sizes differ"),
        "{}",
        line("size.png")
    );
    assert!(
        line("broken.png").contains("cannot read image"),
        "{}",
        line("broken.png")
    );
    assert!(
        line("mean").starts_with("mean over 2 pairs,0,"),
        "the mean covers the pairs that worked, and says how many: {}",
        line("mean")
    );
    assert_eq!(out.lines().count(), 8, "header, six names, mean: {out}");
}

#[test]
fn json_and_table_report_files_only_in_b_and_count_the_mean() {
    let (da, db, w) = folders("cli-folders-formats");
    let json: serde_json::Value =
        serde_json::from_str(&compare_folders(&da, &db, &w, "json")).unwrap();
    let items = json["pairs"].as_array().unwrap();
    let names: Vec<&str> = items.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "broken.png",
            "extra.png",
            "other.png",
            "same.png",
            "same2.png",
            "size.png"
        ]
    );
    assert_eq!(
        items[1]["error"],
        no_counterpart(&db, &da, "extra.png").as_str()
    );
    assert_eq!(
        items[2]["error"],
        no_counterpart(&da, &db, "other.png").as_str()
    );
    let mean = &json["mean"];
    assert_eq!(mean["pairs"], 2, "{mean}");
    assert_eq!(mean["perceptual"], 0.0, "{mean}");
    let tv_a = (items[3]["tv_a"].as_f64().unwrap() + items[4]["tv_a"].as_f64().unwrap()) / 2.0;
    common::assert_rel(mean["tv_a"].as_f64().unwrap(), tv_a, 1e-12, "mean tv(A)");

    let table = compare_folders(&da, &db, &w, "table");
    let extra = table.lines().find(|l| l.starts_with("extra.png")).unwrap();
    assert!(
        extra.ends_with(&format!("error: {}", no_counterpart(&db, &da, "extra.png"))),
        "{table}"
    );
    let last = table.lines().last().unwrap();
    let figures = last
        .strip_prefix("mean over 2 pairs")
        .unwrap_or_else(|| panic!("{table}"));
    assert_eq!(
        figures.split_whitespace().next(),
        Some("0.000000"),
        "{table}"
    );
}

#[test]
fn a_missing_path_is_named_plainly() {
    let dir = workdir("cli-missing");
    let s = Shape::new(1, 3, 16, 16);
    let target = dir.join("target.png");
    save_png(&target, &pattern(16, 16, 1), s, 0).unwrap();
    let folder = dir.join("A");
    std::fs::create_dir_all(&folder).unwrap();
    let (nothere, nodir) = (dir.join("nothere.png"), dir.join("nodir"));
    let compare = |a: &Path, b: &Path| seeded_compare(a, b, &[]);
    for (a, b, missing) in [
        (&target, &nothere, &nothere),
        (&nothere, &target, &nothere),
        (&folder, &nodir, &nodir),
        (&nodir, &folder, &nodir),
    ] {
        let (code, out, err) = compare(a, b);
        assert_eq!(code, 2, "{out}{err}");
        assert_eq!(
            err,
            format!(
                "perceptual-loss: I/O error: {}: no such file or folder\n",
                missing.display()
            )
        );
    }
    // Both there, one a file and one a folder: the mismatch is the problem.
    let (code, _, err) = compare(&target, &folder);
    assert_eq!(code, 2);
    assert!(
        err.starts_with(
            "perceptual-loss: invalid argument: A and B must both be files or both be folders\n"
        ),
        "{err}"
    );
}

#[test]
fn half_precision_on_the_cpu_warns_that_it_computes_in_float32() {
    let dir = workdir("cli-dtype");
    let s = Shape::new(1, 3, 16, 16);
    let (a, b) = (dir.join("a.png"), dir.join("b.png"));
    save_png(&a, &pattern(16, 16, 1), s, 0).unwrap();
    save_png(&b, &pattern(16, 16, 2), s, 0).unwrap();
    let compare = |dtype: &str| seeded_compare(&a, &b, &["--dtype", dtype]);
    let (code, f32_out, err) = compare("f32");
    assert_eq!((code, err.as_str()), (0, ""), "{f32_out}");
    for dtype in ["bf16", "f16"] {
        let (code, out, err) = compare(dtype);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(
            err,
            format!(
                "warning: --dtype {dtype} applies on CUDA; the CPU backend computes in float32\n"
            )
        );
        assert_eq!(out, f32_out, "the figures are the f32 ones");
    }
}

#[test]
fn missing_weights_and_bad_options_are_explained() {
    // Real images, since the paths are checked before the weights and layers.
    let dir = workdir("cli-options");
    let (a, b) = (dir.join("a.png"), dir.join("b.png"));
    let s = Shape::new(1, 3, 16, 16);
    save_png(&a, &pattern(16, 16, 1), s, 0).unwrap();
    save_png(&b, &pattern(16, 16, 2), s, 0).unwrap();
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let (code, _, err) = cli(&["compare", a, b]);
    assert_eq!(code, 2);
    assert!(err.contains("--weights PATH"), "{err}");
    let (code, _, err) = cli(&[
        "compare",
        a,
        b,
        "--seeded-weights",
        "--layers",
        "relu9_9",
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("relu9_9"), "{err}");
    let (code, _, err) = cli(&["compare", "a.png", "--seeded-weights"]);
    assert_eq!(code, 2);
    assert!(err.contains("two paths"), "{err}");
    let (code, _, err) = cli(&["compare", a, b, "--weights", "/nonexistent.safetensors"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("reading weights /nonexistent.safetensors"),
        "{err}"
    );
    let (code, _, err) = cli(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.contains("usage"), "{err}");
}

#[test]
fn style_and_lpips_metrics_are_the_library_values() {
    use perceptual_loss::{Lpips, LpipsConfig, PerceptualConfig, PerceptualLoss, TensorRef};
    let dir = workdir("cli-metrics");
    let (_, w) = weights(&dir);
    let s = Shape::new(1, 3, 16, 20);
    let (a, b) = (pattern(16, 20, 3), pattern(16, 20, 4));
    save_png(&dir.join("a.png"), &a, s, 0).unwrap();
    save_png(&dir.join("b.png"), &b, s, 0).unwrap();
    let (pa, pb) = (dir.join("a.png"), dir.join("b.png"));
    let run = |metric: &str| {
        let (code, out, err) = cli(&[
            "compare",
            pa.to_str().unwrap(),
            pb.to_str().unwrap(),
            "--weights",
            w.to_str().unwrap(),
            "--device",
            "cpu",
            "--format",
            "json",
            "--metric",
            metric,
        ]);
        assert_eq!(code, 0, "{out}{err}");
        json_number(&out, metric)
    };
    let vgg = common::cpu_vgg(
        &std::fs::read(&w).unwrap(),
        VggArch::Vgg16,
        perceptual_loss::DType::F32,
    );
    let (ta, tb) = (
        TensorRef::host(&a, s).unwrap(),
        TensorRef::host(&b, s).unwrap(),
    );
    // The CLI's images in [0, 1]: LPIPS with normalize (tests/lpips_cpu.rs
    // checks the library against an oracle).
    let config = LpipsConfig {
        normalize: true,
        ..Default::default()
    };
    let want = Lpips::new(vgg.clone(), &config)
        .unwrap()
        .value(&ta, &tb)
        .unwrap();
    assert_eq!(run("lpips") as f32, want);
    let style = PerceptualConfig {
        taps: vec![],
        style_taps: PerceptualConfig::default().taps,
        ..Default::default()
    };
    let want = PerceptualLoss::new(vgg, &style)
        .unwrap()
        .value(&ta, &tb)
        .unwrap();
    assert_eq!(run("style") as f32, want);
    let (code, _, err) = seeded_compare(&pa, &pb, &["--metric", "lpips", "--layers", "relu1_2"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--layers does not apply to --metric lpips"),
        "{err}"
    );
    let (code, _, err) = seeded_compare(&pa, &pb, &["--metric", "ssim"]);
    assert!(code == 2 && err.contains("unknown --metric ssim"), "{err}");
}

#[test]
fn help_prints_the_usage_and_succeeds() {
    for args in [
        &["--help"][..],
        &["compare", "-h"],
        &["compare", "a", "b", "--help"],
    ] {
        let (code, out, err) = cli(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains("usage: perceptual-loss compare A B"), "{out}");
        assert!(
            out.contains("--weights PATH") && err.is_empty(),
            "{out}{err}"
        );
    }
    let (code, _, err) = cli(&[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("no command given") && err.contains("usage"),
        "{err}"
    );
}
