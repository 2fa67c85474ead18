//! Helpers shared by the integration tests: a seeded generator, independent
//! f64 formulas (written from the definitions in docs/design.md, not from the crate),
//! finite differences, tolerance checks and the GPU gate.
#![allow(dead_code)]

use perceptual_loss::ffi::{pl_context, pl_context_create, pl_outputs, pl_outputs_init};
use perceptual_loss::ffi::{PL_DEVICE_CPU, PL_OK};
use perceptual_loss::{
    DType, Device, Reduction, Shape, TvConfig, TvVariant, Vgg, VggArch, WeightsSource,
};
use std::sync::Arc;

/// splitmix64: small, seeded, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    pub fn vec(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| self.uniform(lo, hi)).collect()
    }
}

pub fn numel(s: Shape) -> usize {
    s.n * s.c * s.h * s.w
}

/// The TV variants as docs/design.md defines them, computed the way the
/// article the crate started from does: whole shifted-difference arrays,
/// then sums.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Formula {
    Article,
    L1,
    L2Squared,
    L2,
    Isotropic(f64),
}

/// Per-image score s_n of `x` (f64, one image of c*h*w values).
pub fn tv_score(f: Formula, img: &[f64], c: usize, h: usize, w: usize) -> f64 {
    let px = |ch: usize, i: usize, j: usize| img[(ch * h + i) * w + j];
    // x[:, :, 1:, :] - x[:, :, :-1, :] and x[:, :, :, 1:] - x[:, :, :, :-1]
    let mut dh = Vec::new();
    let mut dw = Vec::new();
    for ch in 0..c {
        for i in 0..h - 1 {
            for j in 0..w {
                dh.push(px(ch, i + 1, j) - px(ch, i, j));
            }
        }
        for i in 0..h {
            for j in 0..w - 1 {
                dw.push(px(ch, i, j + 1) - px(ch, i, j));
            }
        }
    }
    let sq = |v: &[f64]| v.iter().map(|d| d * d).sum::<f64>();
    match f {
        Formula::Article => {
            let count_h = (c * (h - 1) * w) as f64;
            let count_w = (c * h * (w - 1)) as f64;
            2.0 * (sq(&dh) / count_h + sq(&dw) / count_w)
        }
        Formula::L1 => dh.iter().chain(&dw).map(|d| d.abs()).sum(),
        Formula::L2Squared => sq(&dh) + sq(&dw),
        Formula::L2 => (sq(&dh) + sq(&dw)).sqrt(),
        Formula::Isotropic(eps) => {
            let mut s = 0.0;
            for ch in 0..c {
                for i in 0..h - 1 {
                    for j in 0..w - 1 {
                        let a = px(ch, i + 1, j) - px(ch, i, j);
                        let b = px(ch, i, j + 1) - px(ch, i, j);
                        s += (a * a + b * b + eps).sqrt();
                    }
                }
            }
            s
        }
    }
}

/// weight * reduction over the batch of the per-image scores.
pub fn tv_loss(f: Formula, x: &[f64], s: Shape, weight: f64, mean: bool) -> f64 {
    let image = s.c * s.h * s.w;
    let total: f64 = (0..s.n)
        .map(|n| tv_score(f, &x[n * image..(n + 1) * image], s.c, s.h, s.w))
        .sum();
    weight * total / if mean { s.n as f64 } else { 1.0 }
}

/// Central finite differences of `loss` at `x`, step `h`.
pub fn finite_diff(x: &[f64], h: f64, mut loss: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut p = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = p[i];
            p[i] = orig + h;
            let up = loss(&p);
            p[i] = orig - h;
            let down = loss(&p);
            p[i] = orig;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Asserts |got - want| <= atol + rtol * |want| elementwise, naming the
/// first mismatches.
/// Asserts `grad` matches central differences (step 1e-6) of `loss` at
/// `probes` random elements of `x`: within 2e-3 of the difference plus
/// 2e-3 of the gradient's largest element.
#[allow(dead_code)]
pub fn assert_grad_at_random_elements(
    grad: &[f64],
    x: &[f64],
    (probes, rng): (usize, &mut Rng),
    loss: impl Fn(&[f64]) -> f64,
    what: &str,
) {
    let scale = grad.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: a zero gradient");
    let mut p = x.to_vec();
    for _ in 0..probes {
        let i = (rng.next_u64() % x.len() as u64) as usize;
        let h = 1e-6;
        p[i] = x[i] + h;
        let up = loss(&p);
        p[i] = x[i] - h;
        let fd = (up - loss(&p)) / (2.0 * h);
        p[i] = x[i];
        assert!(
            (grad[i] - fd).abs() <= 2e-3 * fd.abs() + 2e-3 * scale,
            "{what}: grad[{i}] = {} but finite difference {fd}",
            grad[i]
        );
    }
}

/// `v` widened to f64.
#[allow(dead_code)]
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub fn assert_close(got: &[f64], want: &[f64], rtol: f64, atol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<String> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| !within(**g, **w, rtol, atol))
        .take(5)
        .map(|(i, (g, w))| format!("[{i}] got {g} want {w}"))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} mismatches, first: {}",
        bad.len(),
        bad.join(", ")
    );
}

/// |got - want| <= atol + rtol * |want|; false for NaN.
pub fn within(got: f64, want: f64, rtol: f64, atol: f64) -> bool {
    (got - want).abs() <= atol + rtol * want.abs()
}

/// Relative error of a scalar.
pub fn assert_rel(got: f64, want: f64, rtol: f64, what: &str) {
    let err = (got - want).abs() / want.abs().max(1e-30);
    assert!(
        err <= rtol || got == want,
        "{what}: got {got} want {want} (rel err {err:e} > {rtol:e})"
    );
}

/// The CUDA device for GPU tests, or `None` (after printing why) when there
/// is none; with PERCEPTUAL_LOSS_REQUIRE_GPU=1 a missing device fails.
pub fn gpu() -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let required = std::env::var("PERCEPTUAL_LOSS_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "PERCEPTUAL_LOSS_REQUIRE_GPU=1 but no CUDA device: {e}"
            );
            perceptual_loss::report_skip(&e.to_string()); // "no CUDA device: ..."
            None
        }
    }
}

/// Whether a CUDA device can be used, without printing or failing.
pub fn gpu_present() -> bool {
    Device::cuda(0).is_ok()
}

/// Every TV variant and reduction, a non-unit weight, and a nonzero eps.
pub fn tv_configs() -> Vec<TvConfig> {
    let mut v = vec![
        TvConfig::default(),
        TvConfig {
            weight: 0.37,
            ..Default::default()
        },
    ];
    for variant in [
        TvVariant::L1,
        TvVariant::L2Squared,
        TvVariant::L2,
        TvVariant::Isotropic,
    ] {
        for reduction in [Reduction::Mean, Reduction::Sum] {
            v.push(TvConfig {
                variant,
                reduction,
                weight: 1.5,
                ..Default::default()
            });
        }
    }
    v.push(TvConfig {
        variant: TvVariant::Isotropic,
        eps: 1e-3,
        ..Default::default()
    });
    v
}

/// The reference formula a config computes.
pub fn formula(cfg: &TvConfig) -> Formula {
    match cfg.variant {
        TvVariant::Article => Formula::Article,
        TvVariant::L1 => Formula::L1,
        TvVariant::L2Squared => Formula::L2Squared,
        TvVariant::L2 => Formula::L2,
        TvVariant::Isotropic => Formula::Isotropic(cfg.eps as f64),
    }
}
pub mod vgg;

/// The folder holding the library's shared and static builds from this
/// very `cargo test` run: cargo compiles the library once as rlib, cdylib
/// and staticlib into the test binaries' own `deps` folder (the copies
/// one level up are refreshed only by `cargo build`).
pub fn built_libraries() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe
        .parent()
        .expect("the test binary's folder")
        .to_path_buf();
    for lib in ["libperceptual_loss.so", "libperceptual_loss.a"] {
        assert!(
            deps.join(lib).is_file(),
            "{lib} is missing beside the test binary in {}",
            deps.display()
        );
    }
    deps
}

/// Whether this process is the child `in_child` started to run `test`.
pub fn is_child(test: &str) -> bool {
    std::env::var("PERCEPTUAL_LOSS_CHILD").is_ok_and(|t| t == test)
}

/// Runs test `test` of this test binary again in a child process (with
/// its virtual memory limited to `limit_kib` when given), so that a crash
/// or an abort there is a failure here, not the end of the test run. The
/// child test does its work only when [`is_child`] says so.
pub fn in_child(test: &str, limit_kib: Option<u64>) -> std::process::Output {
    in_child_with(test, limit_kib, &[])
}

/// [`in_child`] with more environment variables for the child.
pub fn in_child_with(
    test: &str,
    limit_kib: Option<u64>,
    env: &[(&str, &str)],
) -> std::process::Output {
    let exe = std::env::current_exe().expect("the test binary");
    let limit = limit_kib.map_or(String::new(), |k| format!("ulimit -v {k} && "));
    // A child that hangs is killed after two minutes: a failure, not a stuck run.
    std::process::Command::new("timeout")
        .args(["120", "sh", "-c"])
        .arg(format!(
            "{limit}exec \"$0\" --exact {test} --nocapture --test-threads=1"
        ))
        .arg(exe)
        .envs(env.iter().copied())
        .env("PERCEPTUAL_LOSS_CHILD", test)
        .output()
        .expect("start the child test process")
}

/// Asserts that a child from [`in_child`] exited cleanly, showing its
/// output (and how it died) otherwise.
pub fn assert_child_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: the child process failed ({:?}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The network in the safetensors `bytes`, loaded on the CPU.
pub fn cpu_vgg(bytes: &[u8], arch: VggArch, dtype: DType) -> Arc<Vgg> {
    Vgg::load(&Device::cpu(), WeightsSource::Bytes(bytes), arch, dtype).unwrap()
}

/// A CPU context from the C ABI; the caller destroys it.
pub fn cpu_context() -> *mut pl_context {
    let mut ctx = std::ptr::null_mut();
    // SAFETY: `ctx` is a valid place for the handle; a NULL stream is the
    // only stream a CPU context takes.
    let st = unsafe { pl_context_create(PL_DEVICE_CPU, 0, std::ptr::null_mut(), &mut ctx) };
    assert_eq!(st, PL_OK);
    ctx
}

/// A file in the temporary directory holding `bytes`, removed when dropped
/// (also when the test fails); `c_path` is its path for the C ABI.
pub struct TempFile {
    pub path: std::path::PathBuf,
    pub c_path: std::ffi::CString,
}

impl TempFile {
    /// `name` is made unique to this process.
    pub fn new(name: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        TempFile { path, c_path }
    }

    /// Seeded stand-in VGG16 weights.
    pub fn seeded_vgg16(name: &str, seed: u64) -> Self {
        let bytes = perceptual_loss::seeded_safetensors(VggArch::Vgg16, seed).unwrap();
        TempFile::new(name, &bytes)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// This thread's last C ABI error message.
pub fn last_error() -> String {
    // SAFETY: pl_last_error never returns NULL, and the string stays valid
    // until the next failing call on this thread.
    unsafe { std::ffi::CStr::from_ptr(perceptual_loss::ffi::pl_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// C outputs with `loss` and `grad` (NULL for none), defaults otherwise.
pub fn outputs(loss: *mut f32, grad: *mut std::ffi::c_void) -> pl_outputs {
    // SAFETY: pl_outputs is plain data and init writes every field.
    let mut out = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { pl_outputs_init(&mut out) }, PL_OK);
    out.loss = loss;
    out.grad = grad;
    out
}
