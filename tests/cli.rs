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
    assert!(!err.contains("note:"), "{err}");
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
    // A half-precision request on the CPU still computes in f32, and says so
    // rather than silently reporting f32 figures as bf16 ones.
    let (code, out_bf16, err) = cli(&[
        "compare",
        dir.join("a.png").to_str().unwrap(),
        dir.join("b.png").to_str().unwrap(),
        "--weights",
        w.to_str().unwrap(),
        "--device",
        "cpu",
        "--dtype",
        "bf16",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{out_bf16}{err}");
    assert!(err.contains("computes in f32; --dtype bf16"), "{err}");
    assert_eq!(out_bf16, out);
}

#[test]
fn folders_report_each_pair_and_the_problems() {
    let dir = workdir("cli-folders");
    let (_, w) = weights(&dir);
    let (da, db) = (dir.join("A"), dir.join("B"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let s = Shape::new(1, 3, 16, 16);
    for (name, seed) in [("same.png", 3), ("other.png", 4)] {
        save_png(&da.join(name), &pattern(16, 16, seed), s, 0).unwrap();
    }
    save_png(&db.join("same.png"), &pattern(16, 16, 3), s, 0).unwrap(); // identical: loss 0
    save_png(&da.join("size.png"), &pattern(16, 16, 5), s, 0).unwrap();
    save_png(
        &db.join("size.png"),
        &pattern(16, 18, 5),
        Shape::new(1, 3, 16, 18),
        0,
    )
    .unwrap();
    std::fs::write(da.join("broken.png"), b"not a png").unwrap();
    let (code, out, err) = cli(&[
        "compare",
        da.to_str().unwrap(),
        db.to_str().unwrap(),
        "--weights",
        w.to_str().unwrap(),
        "--device",
        "cpu",
        "--format",
        "csv",
    ]);
    assert_eq!(code, 1, "a failed pair makes the exit status 1: {out}{err}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_string()
    };
    assert!(
        line("same.png").starts_with("same.png,0,"),
        "{}",
        line("same.png")
    );
    assert!(
        line("other.png").contains("no counterpart"),
        "{}",
        line("other.png")
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
        line("mean").starts_with("mean,0,"),
        "the mean covers the pairs that worked: {}",
        line("mean")
    );
}

#[test]
fn missing_weights_and_bad_options_are_explained() {
    let (code, _, err) = cli(&["compare", "a.png", "b.png"]);
    assert_eq!(code, 2);
    assert!(err.contains("--weights PATH"), "{err}");
    let (code, _, err) = cli(&[
        "compare",
        "a.png",
        "b.png",
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
    let (code, _, err) = cli(&[
        "compare",
        "a.png",
        "b.png",
        "--weights",
        "/nonexistent.safetensors",
    ]);
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
