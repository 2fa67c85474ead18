//! With PERCEPTUAL_LOSS_STEP_TIMES=1, every perceptual call on CUDA prints
//! the device time of each step of its schedule on stderr, one line each:
//!
//! `step-times <shape> <compute dtype> <fwd+bwd|forward only> | <step kind> | <step label> | <ms>`
//!
//! For machines where nsys cannot run (the NVTX ranges say the same under
//! nsys). A CUDA event is recorded after every step and the call waits for
//! the last one, so whole-call timings taken meanwhile are not
//! representative; scripts/gpu-check.sh takes per-step medians over calls.

use crate::device::CudaDevice;
use crate::error::{Error, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;

fn event(dev: &CudaDevice) -> Result<CudaEvent> {
    dev.stream()
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| Error::cuda("recording a step-time event", e))
}

/// Events after each step of one call.
pub(crate) struct StepTimes {
    start: CudaEvent,
    steps: Vec<(&'static str, String, CudaEvent)>,
}

/// Whether calls are timed step by step: PERCEPTUAL_LOSS_STEP_TIMES=1,
/// read once per call.
pub(crate) fn wanted() -> bool {
    super::env_flag("PERCEPTUAL_LOSS_STEP_TIMES")
}

impl StepTimes {
    /// Starts timing on `dev`'s stream.
    pub(crate) fn start(dev: &CudaDevice) -> Result<Self> {
        Ok(StepTimes {
            start: event(dev)?,
            steps: Vec::new(),
        })
    }

    /// Marks the end of a step just queued.
    pub(crate) fn after(
        &mut self,
        dev: &CudaDevice,
        kind: &'static str,
        label: String,
    ) -> Result<()> {
        self.steps.push((kind, label, event(dev)?));
        Ok(())
    }

    /// Waits for the call and prints one line per step, `what` first.
    pub(crate) fn report(self, what: &str) -> Result<()> {
        let mut prev = &self.start;
        for (kind, label, end) in &self.steps {
            end.synchronize()
                .map_err(|e| Error::cuda("waiting for a step-time event", e))?;
            let ms = prev
                .elapsed_ms(end)
                .map_err(|e| Error::cuda("reading a step time", e))?;
            eprintln!("step-times {what} | {kind} | {label} | {ms:.4}");
            prev = end;
        }
        Ok(())
    }
}
