//! Queues one call (or one chunk of images of it): the steps of its
//! schedule in order, each in an NVTX range named for its layers.

use super::convs::Convs;
use super::schedule::{self, Step};
use super::steps::Exec;
use crate::cuda::{nvtx, Gpu};
use crate::error::{Error, Result};

/// Queues the whole loss (and gradient) of `x.call`, calling `after_step`
/// after each step is queued. The layout must come from the gradient
/// schedule of the same shape (it holds every buffer either schedule uses).
pub(crate) fn run<G: Gpu, C: Convs>(
    x: &Exec<'_, G, C>,
    mut after_step: impl FnMut(&Step) -> Result<()>,
) -> Result<()> {
    let io = &x.call.io;
    let s = io.shape;
    let _call = nvtx::range(|| format!("perceptual {}x{}x{}x{}", s.n, s.c, s.h, s.w));
    let sched = schedule::build(
        x.net.layers,
        x.spec,
        x.call.holds,
        (s.n, s.h, s.w),
        io.grad.is_some(),
        x.call.accumulate,
    )?;
    if x.layout.offsets.len() < sched.buffers.len() {
        return Err(Error::Internal("a layout from another schedule".into()));
    }
    if x.kept.addrs.len() != sched.kept.len() {
        return Err(Error::Internal(format!(
            "{} kept target slots for a schedule of {}",
            x.kept.addrs.len(),
            sched.kept.len()
        )));
    }
    for step in &sched.steps {
        let _range = nvtx::range(|| step.label(x.net.layers));
        x.launch(step)?;
        after_step(step)?;
    }
    if io.parts.is_some() {
        x.parts_total()?;
    }
    Ok(())
}
