//! How a test that cannot run here (no CUDA device, no compiler, no
//! Python with torch) says so. `cargo test` captures what passing tests
//! print, so the line goes straight to stderr, where it shows in every
//! run; with `PERCEPTUAL_LOSS_SKIP_LOG` set to a file, as `scripts/test.sh`
//! sets it, it is also appended there for the summary that script prints
//! at the end. Public for the integration tests only.

use std::io::Write;

/// Reports that the calling test skipped `why`: its test binary and name
/// (libtest names each test's thread after the test), then the reason.
#[doc(hidden)]
pub fn report_skip(why: &str) {
    let suite = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        // cargo names a test binary <target>-<hash>.
        .map(|s| {
            s.rsplit_once('-')
                .map_or(s.clone(), |(name, _)| name.to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    let why = why.replace(['\n', '\t'], " ");
    let _ = writeln!(std::io::stderr(), "skipped: {suite} {test}: {why}");
    if let Some(log) = std::env::var_os("PERCEPTUAL_LOSS_SKIP_LOG") {
        // One write per line in append mode: lines from concurrent tests
        // and test binaries do not interleave.
        let line = format!("{suite}\t{test}\t{why}\n");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}
