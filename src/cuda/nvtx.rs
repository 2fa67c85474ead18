//! NVTX ranges, so an nsys timeline of a loss call reads like the network
//! (docs/profiling.md).
//!
//! NVTX v3 is header-only for C; a Rust program reaches it through a shared
//! library that exports the C API: `libnvtx3interop.so.1` (CUDA 13 and
//! later, also in the `nvidia-nvtx` wheel) or `libnvToolsExt.so.1` (NVTX v2,
//! CUDA 12.8 and earlier). Either forwards to the profiler that the
//! `NVTX_INJECTION64_PATH` variable names (nsys sets it). The library is
//! looked up once; without one, ranges cost one cached check.

use libloading::Library;
use std::ffi::{c_char, c_int, CString};
use std::sync::OnceLock;

/// The libraries tried, newest first, by the dynamic loader's search
/// (LD_LIBRARY_PATH, the system paths, or one already loaded).
const LIBRARIES: [&str; 4] = [
    "libnvtx3interop.so.1",
    "libnvtx3interop.so",
    "libnvToolsExt.so.1",
    "libnvToolsExt.so",
];

struct Api {
    push: unsafe extern "C" fn(*const c_char) -> c_int,
    pop: unsafe extern "C" fn() -> c_int,
    /// Keeps the functions above loaded.
    _library: Library,
}

fn load(name: &str) -> Option<Api> {
    // SAFETY: loading an NVTX library runs no initialisers with
    // preconditions; the two symbols have the C signatures of
    // nvtxRangePushA and nvtxRangePop.
    unsafe {
        let library = Library::new(name).ok()?;
        let push = *library
            .get::<unsafe extern "C" fn(*const c_char) -> c_int>(b"nvtxRangePushA\0")
            .ok()?;
        let pop = *library
            .get::<unsafe extern "C" fn() -> c_int>(b"nvtxRangePop\0")
            .ok()?;
        Some(Api {
            push,
            pop,
            _library: library,
        })
    }
}

fn api() -> Option<&'static Api> {
    static API: OnceLock<Option<Api>> = OnceLock::new();
    API.get_or_init(|| LIBRARIES.iter().find_map(|name| load(name)))
        .as_ref()
}

/// An open range; it closes when dropped.
pub(crate) struct Range(Option<&'static Api>);

/// Opens a range named `name()` (built only when NVTX is present).
pub(crate) fn range(name: impl FnOnce() -> String) -> Range {
    let Some(api) = api() else {
        return Range(None);
    };
    let name = CString::new(name().replace('\0', " ")).unwrap_or_default();
    // SAFETY: a NUL-terminated string that outlives the call (NVTX copies it).
    unsafe { (api.push)(name.as_ptr()) };
    Range(Some(api))
}

impl Drop for Range {
    fn drop(&mut self) {
        if let Some(api) = self.0 {
            // SAFETY: pops the range this value pushed; ranges open and
            // close within one call, on one thread.
            unsafe { (api.pop)() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// A profiler stand-in: NVTX hands it the core function table at the
    /// first call, as it does to nsys's injection library, and it records
    /// the ranges it is given.
    const RECORDER: &str = r#"
#include <nvtx3/nvToolsExt.h>
#include <string.h>
static char events[4096];
static int depth;
static void add(const char *s) { strncat(events, s, sizeof events - strlen(events) - 1); }
static int NVTX_API push(const char *name) { add("push "); add(name); add(";"); return depth++; }
static int NVTX_API pop(void) { add("pop;"); return --depth; }
const char *recorded(void) { return events; }
int InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get) {
    const NvtxExportTableCallbacks *cb = (const NvtxExportTableCallbacks *)get(NVTX_ETID_CALLBACKS);
    NvtxFunctionTable table = 0;
    unsigned int size = 0;
    if (!cb || !cb->GetModuleFunctionTable(NVTX_CB_MODULE_CORE, &table, &size)) return 0;
    if (size <= NVTX_CBID_CORE_RangePop) return 0;
    *table[NVTX_CBID_CORE_RangePushA] = (NvtxFunctionPointer)push;
    *table[NVTX_CBID_CORE_RangePop] = (NvtxFunctionPointer)pop;
    return 1;
}
"#;

    /// The NVTX headers beside a library directory on LD_LIBRARY_PATH
    /// (the `nvidia-nvtx` wheel's layout: lib/ and include/nvtx3/).
    fn nvtx_include() -> Option<PathBuf> {
        std::env::var("LD_LIBRARY_PATH")
            .ok()?
            .split(':')
            .map(|dir| Path::new(dir).join("../include"))
            .find(|inc| inc.join("nvtx3/nvToolsExt.h").is_file())
    }

    /// Ranges reach a profiler through the NVTX library: the recorder is
    /// injected (as nsys injects itself) into a child test process, which
    /// opens nested ranges. Skips without the NVTX library, its headers
    /// or a C compiler, unless PERCEPTUAL_LOSS_REQUIRE_NVTX=1 (CI).
    #[test]
    fn ranges_reach_an_injected_profiler() {
        let skip =
            |why: &str| crate::cuda::skip_unless_required("PERCEPTUAL_LOSS_REQUIRE_NVTX", why);
        if api().is_none() {
            return skip("no NVTX library (libnvtx3interop.so.1 or libnvToolsExt.so.1) was found");
        }
        let Some(include) = nvtx_include() else {
            return skip("no nvtx3 headers beside a directory of LD_LIBRARY_PATH");
        };
        let dir = std::env::temp_dir().join(format!("pl-nvtx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, lib) = (dir.join("recorder.c"), dir.join("librecorder.so"));
        std::fs::write(&src, RECORDER).unwrap();
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let built = Command::new(&cc)
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&lib)
            .arg(&src)
            .arg("-I")
            .arg(&include)
            .output();
        match built {
            Err(_) => return skip(&format!("no C compiler ({cc})")),
            Ok(out) => assert!(
                out.status.success(),
                "compiling the recorder failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "cuda::nvtx::tests::child_opens_ranges"])
            .args(["--nocapture", "--test-threads=1"])
            .env("NVTX_INJECTION64_PATH", &lib)
            .env("PL_NVTX_RECORDER", &lib)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        std::fs::remove_dir_all(&dir).ok();
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(
            text.contains("1 passed"),
            "the child test did not run:\n{text}"
        );
    }

    /// Runs only as the child of the test above.
    #[test]
    fn child_opens_ranges() {
        let Ok(recorder) = std::env::var("PL_NVTX_RECORDER") else {
            return;
        };
        {
            let _outer = range(|| "perceptual 1x3x8x8".into());
            let _inner = range(|| "forward conv1_1".into());
        }
        let _last = range(|| "input gradient".into());
        drop(_last);
        // SAFETY: the library the NVTX library injected (already loaded);
        // `recorded` returns its NUL-terminated log.
        let events = unsafe {
            let lib = Library::new(&recorder).unwrap();
            let recorded = lib
                .get::<unsafe extern "C" fn() -> *const c_char>(b"recorded\0")
                .unwrap();
            std::ffi::CStr::from_ptr(recorded())
                .to_string_lossy()
                .into_owned()
        };
        assert_eq!(
            events,
            "push perceptual 1x3x8x8;push forward conv1_1;pop;pop;push input gradient;pop;"
        );
    }
}
