//! NVTX ranges, so an nsys timeline of a loss call reads like the network
//! (docs/profiling.md). Ranges are pushed only where libnvToolsExt can be
//! loaded; elsewhere they cost one cached check.

use std::sync::OnceLock;

fn enabled() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only probes whether the shared library can be opened.
    *PRESENT.get_or_init(|| unsafe { cudarc::nvtx::sys::is_culib_present() })
}

/// An open range; it closes when dropped.
pub(crate) struct Range(bool);

/// Opens a range named `name()` (built only when NVTX is present).
pub(crate) fn range(name: impl FnOnce() -> String) -> Range {
    if !enabled() {
        return Range(false);
    }
    let name = name().replace('\0', " ");
    cudarc::nvtx::result::range_push(name);
    Range(true)
}

impl Drop for Range {
    fn drop(&mut self) {
        if self.0 {
            cudarc::nvtx::result::range_pop();
        }
    }
}
