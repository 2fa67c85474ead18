//! Runs the CUDA kernels on the host, so the launchers and the kernels
//! themselves are tested on machines without a GPU.
//!
//! Each kernel family's source, exactly as NVRTC would compile it, is built
//! with the system C++ compiler and `kernels/host/cuda_emulation.h` into a
//! shared library, loaded once per test process. The emulator implements
//! [`Gpu`]: launches run synchronously, blocks in order, each block's
//! threads as fibers (see the header). Device addresses are host addresses.
//!
//! Without a C++ compiler the tests that need it print `skipped: no C++
//! compiler` and pass, unless `PERCEPTUAL_LOSS_REQUIRE_EMULATOR` is set.

use super::abi::pl_k_reduce;
use super::{kernels, Gpu, KernelImage, BLOCK};
use crate::error::{Error, Result};
use cudarc::driver::DeviceRepr;
use libloading::Library;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const SHIM: &str = include_str!("../../kernels/host/cuda_emulation.h");

pub(crate) struct Emulator {
    libraries: HashMap<&'static str, Library>,
    /// The emulated device is one global state: one launch at a time.
    running: std::sync::Mutex<()>,
}

type LaunchFn = unsafe extern "C" fn(u32, u32, u32, extern "C" fn(*mut c_void), *mut c_void);

/// What one emulated thread runs: the kernel with its by-value argument.
struct Entry<P> {
    kernel: unsafe extern "C" fn(P),
    params: P,
}

extern "C" fn run_entry<P: Copy>(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `Entry<P>` that `launch_symbol` keeps alive
    // for the whole (synchronous) launch.
    let entry = unsafe { &*(ctx as *const Entry<P>) };
    // SAFETY: the symbol is the extern "C" kernel taking exactly `P`.
    unsafe { (entry.kernel)(entry.params) }
}

/// Why there is no emulator: no compiler (the tests skip), or the kernels
/// did not build (the tests fail: that is a bug).
enum BuildError {
    NoCompiler(String),
    Failed(String),
}

/// Compiles one kernel family against `shim` (written once, before any
/// compile starts: rewriting it per family let one compiler read it while
/// another thread had just truncated it).
fn compile(
    image: &KernelImage,
    dir: &Path,
    shim: &Path,
) -> std::result::Result<PathBuf, BuildError> {
    let source = dir.join(format!("{}.cu", image.name));
    let library = dir.join(format!("{}.so", image.name));
    let io = |e: std::io::Error| BuildError::Failed(e.to_string());
    std::fs::write(&source, image.source).map_err(io)?;
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-fPIC", "-shared", "-include"])
        .arg(shim)
        .args(["-x", "c++"])
        .arg(&source)
        .arg("-o")
        .arg(&library)
        .output()
        .map_err(|e| BuildError::NoCompiler(format!("running {cxx}: {e}")))?;
    if !out.status.success() {
        return Err(BuildError::Failed(format!(
            "{cxx} failed on {}:\n{}",
            image.name,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(library)
}

fn build() -> std::result::Result<Emulator, BuildError> {
    let dir = std::env::temp_dir().join(format!("perceptual-loss-emulator-{}", std::process::id()));
    let io = |e: std::io::Error| BuildError::Failed(e.to_string());
    std::fs::create_dir_all(&dir).map_err(io)?;
    let shim = dir.join("cuda_emulation.h");
    std::fs::write(&shim, SHIM).map_err(io)?;
    let built: Vec<_> = std::thread::scope(|s| {
        let jobs: Vec<_> = kernels::ALL
            .iter()
            .map(|image| {
                let (dir, shim) = (&dir, &shim);
                s.spawn(move || compile(image, dir, shim).map(|path| (image.name, path)))
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("compile thread"))
            .collect()
    });
    let mut libraries = HashMap::new();
    for result in built {
        let (name, path) = result?;
        // SAFETY: a library this function just built from the kernel sources;
        // it has no initialisers beyond the C++ runtime's.
        let lib = unsafe { Library::new(&path) }.map_err(|e| BuildError::Failed(e.to_string()))?;
        libraries.insert(name, lib);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Emulator {
        libraries,
        running: Default::default(),
    })
}

impl Emulator {
    /// The process's emulator, or `None` (after printing why) when no C++
    /// compiler is available and `PERCEPTUAL_LOSS_REQUIRE_EMULATOR` is
    /// unset. Kernels that do not compile are a test failure.
    pub(crate) fn get() -> Option<&'static Emulator> {
        static EMULATOR: OnceLock<std::result::Result<Emulator, BuildError>> = OnceLock::new();
        match EMULATOR.get_or_init(build) {
            Ok(e) => Some(e),
            Err(BuildError::Failed(why)) => panic!("the emulated kernels did not build: {why}"),
            Err(BuildError::NoCompiler(why))
                if std::env::var_os("PERCEPTUAL_LOSS_REQUIRE_EMULATOR").is_some() =>
            {
                panic!("PERCEPTUAL_LOSS_REQUIRE_EMULATOR is set: {why}")
            }
            Err(BuildError::NoCompiler(why)) => {
                crate::report_skip(&format!("no C++ compiler for the CUDA emulator ({why})"));
                None
            }
        }
    }
}

impl Gpu for Emulator {
    fn launch_symbol<P: DeviceRepr + Copy>(
        &self,
        image: &KernelImage,
        symbol: &str,
        grid: (u32, u32),
        params: &P,
    ) -> Result<()> {
        let missing = |e: libloading::Error| Error::Internal(format!("emulated {symbol}: {e}"));
        let lib = self
            .libraries
            .get(image.name)
            .ok_or_else(|| Error::Internal(format!("no emulated {}", image.name)))?;
        // SAFETY: both symbols come from the library built from the kernel
        // source; the kernel takes one `P` by value (the shared header).
        let (kernel, launch) = unsafe {
            (
                *lib.get::<unsafe extern "C" fn(P)>(symbol.as_bytes())
                    .map_err(missing)?,
                *lib.get::<LaunchFn>(b"pl_emu_launch").map_err(missing)?,
            )
        };
        let entry = Entry {
            kernel,
            params: *params,
        };
        let _one_at_a_time = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `entry` outlives the launch, which returns when every
        // block has run.
        unsafe {
            launch(
                grid.0,
                grid.1,
                BLOCK,
                run_entry::<P>,
                &entry as *const Entry<P> as *mut c_void,
            )
        };
        Ok(())
    }

    fn with_reduce<R>(
        &self,
        images: usize,
        partials: usize,
        f: impl FnOnce(pl_k_reduce) -> Result<R>,
    ) -> Result<R> {
        // [counter (8 bytes) | image scales | partials]; the counter starts at 0.
        let mut scratch = vec![0u64; 1 + images + partials];
        let base = scratch.as_mut_ptr();
        // SAFETY: offsets inside `scratch`, which lives until `f` returns.
        let reduce = unsafe {
            pl_k_reduce {
                counter: base as *mut u32,
                image_scale: base.add(1) as *mut f64,
                partials: base.add(1 + images) as *mut f64,
                loss: std::ptr::null_mut(),
                per_sample: std::ptr::null_mut(),
            }
        };
        f(reduce)
    }
}

/// The host address of an input buffer, as the launchers take device addresses.
pub(crate) fn addr<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

/// The host address of a buffer the kernels write.
pub(crate) fn addr_mut<T>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as u64
}

/// `len` seeded values in [-1, 1), rounded to `T`.
pub(crate) fn values<T: crate::tensor::Element>(len: usize, seed: u64) -> Vec<T> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            T::from_f64((state >> 11) as f64 / (1u64 << 52) as f64 - 1.0)
        })
        .collect()
}

/// `len` values of `dtype` at a host address, widened to f32.
///
/// # Safety
/// `base` must address `len` readable values of `dtype`.
pub(crate) unsafe fn load(base: u64, dtype: crate::tensor::DType, len: usize) -> Vec<f32> {
    struct Load(u64, usize);
    impl crate::tensor::PerDType for Load {
        type Output = Vec<f32>;
        fn run<T: crate::tensor::Element>(self) -> Vec<f32> {
            // SAFETY: as the caller of `load` promised.
            let values = unsafe { std::slice::from_raw_parts(self.0 as *const T, self.1) };
            values.iter().map(|v| v.to_f64() as f32).collect()
        }
    }
    dtype.dispatch(Load(base, len))
}

/// Writes `values` rounded to `dtype` at a host address.
///
/// # Safety
/// `base` must address `values.len()` writable values of `dtype`.
pub(crate) unsafe fn store(base: u64, dtype: crate::tensor::DType, values: &[f32]) {
    let bytes = crate::vgg::device_weights::to_bytes(values, dtype);
    std::ptr::copy_nonoverlapping(bytes.as_ptr(), base as *mut u8, bytes.len());
}

/// `v` rounded to `dtype` (as a store and a load would leave it).
pub(crate) fn round_to(dtype: crate::tensor::DType, v: f32) -> f32 {
    struct Round(f32);
    impl crate::tensor::PerDType for Round {
        type Output = f32;
        fn run<T: crate::tensor::Element>(self) -> f32 {
            T::from_f64(self.0 as f64).to_f64() as f32
        }
    }
    dtype.dispatch(Round(v))
}

/// Asserts `got` matches `want` to `tol` relative to the largest `|want|`.
pub(crate) fn assert_close<T: crate::tensor::Element>(what: &str, got: &[T], want: &[T], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().map(|v| v.to_f64().abs()).fold(1e-30, f64::max);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.to_f64(), w.to_f64());
        assert!(
            (g - w).abs() <= tol * scale || (g.is_nan() && w.is_nan()),
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

/// Asserts that an emulated call's loss, per-image values and gradient
/// match the CPU backend's (`want`, `want_grad`) to `tol`.
pub(crate) fn assert_matches_cpu<T: crate::tensor::Element>(
    what: &str,
    (loss, per_sample, grad): (f32, &[f32], &[T]),
    want: &crate::backend::Values,
    want_grad: &[T],
    tol: f64,
) {
    assert!(
        (loss as f64 - want.loss).abs() <= tol * want.loss.abs().max(1e-30),
        "{what}: loss {loss} vs {}",
        want.loss
    );
    let want_per: Vec<f32> = want.per_sample.iter().map(|&v| v as f32).collect();
    assert_close(&format!("{what} per sample"), per_sample, &want_per, tol);
    assert_close(&format!("{what} gradient"), grad, want_grad, tol);
}
