//! The Python package's tests (bindings/python/tests) with pytest, against
//! a freshly built shared library. Without python3, NumPy or pytest they
//! print why and pass; PERCEPTUAL_LOSS_REQUIRE_PYTHON=1 (CI) makes that a
//! failure. PERCEPTUAL_LOSS_PYTHON picks the interpreter.

mod common;

use std::path::PathBuf;
use std::process::Command;

#[test]
fn python_package_tests() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("PERCEPTUAL_LOSS_PYTHON").unwrap_or_else(|_| "python3".into());
    let required = std::env::var("PERCEPTUAL_LOSS_REQUIRE_PYTHON").is_ok_and(|v| v == "1");
    let probe = Command::new(&python)
        .args(["-c", "import numpy, pytest"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        assert!(
            !required,
            "PERCEPTUAL_LOSS_REQUIRE_PYTHON=1 but {python} cannot import numpy and pytest"
        );
        perceptual_loss::report_skip(&format!("{python} with numpy and pytest not found"));
        return;
    }
    let libs = common::built_libraries();
    let out = Command::new(&python)
        // -rs lists each skipped test and why, reported below.
        .args(["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"])
        .arg(root.join("bindings/python/tests"))
        .env("PERCEPTUAL_LOSS_LIB", libs.join("libperceptual_loss.so"))
        .output()
        .expect("run pytest");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert!(out.status.success(), "pytest failed:\n{text}");
    // "SKIPPED [2] bindings/python/tests/test_torch.py:148: needs a GPU":
    // two tests (parametrized) skipped at that line, reported as two.
    for skip in text.lines().filter_map(|l| l.strip_prefix("SKIPPED ")) {
        let (count, at) = skip
            .strip_prefix('[')
            .and_then(|s| s.split_once("] "))
            .map_or((1, skip), |(n, at)| (n.parse().unwrap_or(1), at));
        let at = at.rsplit_once("tests/").map_or(at, |(_, file)| file);
        for _ in 0..count {
            perceptual_loss::report_skip(&format!("pytest {at}"));
        }
    }
}
