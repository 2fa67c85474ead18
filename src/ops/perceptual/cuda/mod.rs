//! The perceptual loss on CUDA.
//!
//! One call is a schedule of steps (`schedule/`): a preprocessing pass
//! into an NHWC [pred; target] batch, cuDNN convolutions, fused
//! bias+ReLU(+pool)(+tap) passes that keep a 1-bit mask and a 2-bit
//! argmax for the pred half, and a backward over the pred half only
//! (weights are frozen: backward-data needs no activations). `steps/`
//! launches each step, `exec.rs` queues a schedule, `plan.rs` holds what
//! one input shape needs (cuDNN algorithms, buffers laid out by
//! `layout.rs`, workspace), and [`Plans`] keeps the plans of recent
//! shapes and splits a batch into chunks under a memory budget. A kept
//! target (`kept.rs`) replaces the target half of the batch.

mod convs;
pub(crate) mod cost;
mod exec;
mod graph;
mod kept;
mod layout;
mod plan;
mod schedule;
mod steps;
#[cfg(test)]
mod tests;

use super::config::PerceptualSpec;
use crate::backend::DeviceIo;
use crate::cuda::cudnn::Handle;
use crate::device::{capture_forbids, CudaDevice};
use crate::error::{Error, Result};
use crate::recent::Recent;
use crate::tensor::{DType, Shape};
use crate::vgg::Vgg;
use cudarc::driver::{CudaSlice, DevicePtr};
pub(crate) use kept::DeviceTarget;
use plan::{buffer_bytes, ShapePlan};
pub(crate) use schedule::Batch;
use std::sync::{Arc, Mutex};
use steps::KeptAt;

/// One call (or one chunk of images of it) on the device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CudaCall {
    /// The addresses: pred, target (0 against a kept target, and for a
    /// target's own forward pred is the target), and the outputs.
    pub io: DeviceIo<2>,
    /// What the batch holds.
    pub holds: Batch,
    /// Images the loss averages over: the whole batch when chunked.
    pub batch: usize,
    /// The chunk's first image in the whole call.
    pub first: usize,
    /// Whether the loss already holds earlier chunks' share.
    pub accumulate: bool,
    /// An LPIPS call's spatial map terms (none for the others).
    pub terms: MapTerms,
    /// The device address of the call table the caller's addresses refer
    /// to (a call replayed from a CUDA graph, `graph.rs`), or 0: they are
    /// real addresses.
    pub table: u64,
}

/// Where an LPIPS call's per-pixel terms (the spatial map's, before the
/// resize) go, or their gradient comes from: device addresses of
/// [n][stride] f32, 0 for none. LPIPS tap k's terms start at `offsets[k]`
/// of an image's `stride`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MapTerms {
    /// Written by the taps: each pixel's term, the weight applied.
    pub values: u64,
    /// Read by the taps: dL/dterm, which replaces the mean's scale in
    /// the gradient.
    pub scales: u64,
    pub stride: usize,
    pub offsets: [usize; 5],
}

impl MapTerms {
    /// Tap `k`'s terms of a chunk's first image (`values` or `scales`),
    /// checked to be `pixels` long; 0 for none.
    pub(crate) fn at(&self, base: u64, k: usize, pixels: usize) -> Result<u64> {
        if base == 0 {
            return Ok(0);
        }
        let end = self.offsets.get(k + 1).copied().unwrap_or(self.stride);
        match self.offsets.get(k) {
            Some(&start) if end - start == pixels => Ok(base + 4 * start as u64),
            _ => Err(Error::Internal(format!(
                "LPIPS tap {k} has {pixels} pixels, its map terms another count"
            ))),
        }
    }
}

impl CudaCall {
    /// The whole of a call.
    fn new(io: DeviceIo<2>, holds: Batch) -> Self {
        CudaCall {
            io,
            holds,
            batch: io.shape.n,
            first: 0,
            accumulate: false,
            terms: MapTerms::default(),
            table: 0,
        }
    }

    /// The call split into runs of at most `chunk` images. Images are
    /// independent: a chunk is a smaller batch at an offset, scaled by the
    /// whole batch and added to the earlier chunks' loss.
    pub(crate) fn chunks(&self, chunk: usize) -> Vec<CudaCall> {
        let io = self.io;
        let s = io.shape;
        let chunk = chunk.clamp(1, s.n);
        // pred, target and gradient share the image size
        let image_bytes = (s.image_len() * io.dtype.size()) as u64;
        // An address `bytes` on, where 0 (none) stays 0.
        let shifted = |p: u64, bytes: u64| if p == 0 { 0 } else { p + bytes };
        let term_bytes = 4 * self.terms.stride as u64;
        (0..s.n)
            .step_by(chunk)
            .map(|start| {
                let at = start as u64;
                let terms_at = |p: u64| shifted(p, at * term_bytes);
                CudaCall {
                    io: DeviceIo {
                        shape: Shape::new(chunk.min(s.n - start), s.c, s.h, s.w),
                        inputs: io.inputs.map(|p| shifted(p, at * image_bytes)),
                        grad: io.grad.map(|g| g + at * image_bytes),
                        per_sample: io.per_sample.map(|ps| ps + at * 4),
                        ..io
                    },
                    first: self.first + start,
                    accumulate: self.accumulate || start > 0,
                    terms: MapTerms {
                        values: terms_at(self.terms.values),
                        scales: terms_at(self.terms.scales),
                        ..self.terms
                    },
                    ..*self
                }
            })
            .collect()
    }
}

/// Input shapes whose CUDA buffers a loss keeps (per loss and its clones).
const KEPT_SHAPES: usize = 4;

/// The CUDA backend's state of one loss: the plans (cuDNN algorithms and
/// buffers) of the most recently used input shapes, and the chunk size
/// chosen for each (batch shape, compute dtype).
pub(crate) struct Plans {
    plans: Mutex<Recent<ShapePlan>>,
    chunks: Mutex<Recent<(ChunkKey, usize)>>,
    /// Kept targets a CUDA graph captured a call against: its slots must
    /// outlive the graph, so they stay while the loss lives.
    captured_targets: Mutex<Vec<Arc<DeviceTarget>>>,
    /// LPIPS's channel weights on each device used, by ordinal.
    lin: Mutex<Vec<(usize, CudaSlice<f32>)>>,
}

impl Default for Plans {
    fn default() -> Self {
        Plans {
            plans: Mutex::new(Recent::new(KEPT_SHAPES)),
            chunks: Mutex::new(Recent::new(64)),
            captured_targets: Mutex::new(Vec::new()),
            lin: Mutex::new(Vec::new()),
        }
    }
}

impl std::fmt::Debug for Plans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.plans.lock().map(|p| p.len()).unwrap_or(0);
        write!(f, "Plans({n} shapes)")
    }
}

/// A chunk size is chosen per (batch shape, compute dtype, what the batch
/// holds).
type ChunkKey = (Shape, DType, Batch);

/// What kind of call a batch holding `holds` is, for messages.
fn call_kind(holds: Batch) -> &'static str {
    match holds {
        Batch::Pairs => "",
        Batch::Pred => " against a kept target",
        Batch::Target => " keeping a target",
    }
}

impl Plans {
    /// Queues the loss of `io.inputs[0]` (pred) against `io.inputs[1]`
    /// (target), or against the `kept` target, on `dev`, chunk by chunk.
    pub(crate) fn queue(
        &self,
        dev: &CudaDevice,
        vgg: &Vgg,
        spec: &PerceptualSpec,
        io: &DeviceIo<2>,
        kept: Option<&Arc<DeviceTarget>>,
    ) -> Result<()> {
        let holds = match kept {
            Some(_) => Batch::Pred,
            None => Batch::Pairs,
        };
        if let Some(target) = kept.filter(|_| dev.capturing()) {
            let mut captured = self
                .captured_targets
                .lock()
                .map_err(|_| Error::poisoned())?;
            if !captured.iter().any(|t| Arc::ptr_eq(t, target)) {
                captured.push(target.clone());
            }
        }
        self.queue_chunks(
            dev,
            vgg,
            spec,
            CudaCall::new(*io, holds),
            kept.map(|t| &**t),
        )
    }

    /// Queues an LPIPS call of pred against its target that also writes
    /// the spatial map's terms or takes their gradient (`terms`).
    pub(crate) fn queue_with_terms(
        &self,
        dev: &CudaDevice,
        vgg: &Vgg,
        spec: &PerceptualSpec,
        io: &DeviceIo<2>,
        terms: MapTerms,
    ) -> Result<()> {
        let call = CudaCall {
            terms,
            ..CudaCall::new(*io, Batch::Pairs)
        };
        self.queue_chunks(dev, vgg, spec, call, None)
    }

    /// Keeps the target `io.inputs[0]` of `io.shape` on `dev` for calls
    /// against it: one forward over it alone fills the kept slots, and is
    /// waited for (the caller may reuse the target's memory, and calls on
    /// any stream may read the slots). Its plan is freed after it: a
    /// target is kept for many calls, and its buffers would otherwise stay.
    pub(crate) fn keep(
        &self,
        dev: &CudaDevice,
        vgg: &Vgg,
        spec: &PerceptualSpec,
        io: &DeviceIo<2>,
    ) -> Result<DeviceTarget> {
        let s = io.shape;
        let layers = vgg.layers();
        let one = schedule::build(layers, spec, Batch::Target, (1, s.h, s.w), false, false)?;
        let target = DeviceTarget::alloc(dev, &one, s.n, vgg.compute_dtype().size())?;
        let call = CudaCall::new(*io, Batch::Target);
        let done = self
            .queue_chunks(dev, vgg, spec, call, Some(&target))
            .and_then(|()| dev.synchronize());
        let mut plans = self.plans.lock().map_err(|_| Error::poisoned())?;
        while plans.take(|p| p.holds() == Batch::Target).is_some() {}
        done.map(|()| target)
    }

    fn queue_chunks(
        &self,
        dev: &CudaDevice,
        vgg: &Vgg,
        spec: &PerceptualSpec,
        whole: CudaCall,
        kept: Option<&DeviceTarget>,
    ) -> Result<()> {
        let (s, holds) = (whole.io.shape, whole.holds);
        let weights = vgg.device_weights()?;
        let lpips = self.lin_on(dev, spec)?;
        let chunk = self.device_chunk_images(dev, vgg, spec, (s, holds))?;
        if spec.has_norm_terms() && holds != Batch::Target && chunk < s.n {
            return Err(Error::arg(format!(
                "the Fro criterion's norm spans the whole batch, which must run in one chunk \
                 (max_chunk_images or the memory budget allows {chunk} of {} images)",
                s.n
            )));
        }
        let calls = whole.chunks(chunk);
        let kept_at: Vec<KeptAt> = (calls.iter())
            .map(|c| kept.map(|k| k.at(dev, c.first)).unwrap_or_default())
            .collect();
        // Chunks of one size run on one plan, which may replay the whole
        // call from a CUDA graph.
        if calls.iter().all(|c| c.io.shape == calls[0].io.shape) {
            let graphs = graph::wanted(spec.graphs);
            return self.with_plan(
                dev,
                vgg,
                spec,
                (calls[0].io.shape, holds),
                |handle, plan| {
                    plan.run_whole(
                        (dev, handle),
                        (weights, vgg.layers(), spec),
                        (&whole, calls[0].io.shape.n, graphs),
                        (lpips, &kept_at),
                    )
                },
            );
        }
        // Every plan first (a full chunk's and the last one's), so that one
        // that cannot be built fails the call before anything is written.
        if let Some(last) = calls.last().filter(|c| c.io.shape.n != chunk) {
            self.with_plan(dev, vgg, spec, (last.io.shape, holds), |_, _| Ok(()))?;
        }
        let timed = crate::cuda::step_times::wanted();
        for (call, kept) in calls.iter().zip(&kept_at) {
            self.with_plan(dev, vgg, spec, (call.io.shape, holds), |handle, plan| {
                plan.run(
                    (dev, dev, timed),
                    handle,
                    (weights, vgg.layers(), spec),
                    (call, lpips, kept),
                )
            })?;
        }
        Ok(())
    }

    /// The device address of LPIPS's channel weights on `dev` (uploaded on
    /// the first call there, and waited for, so any stream may read them),
    /// or 0 for a loss without LPIPS terms.
    fn lin_on(&self, dev: &CudaDevice, spec: &PerceptualSpec) -> Result<u64> {
        let Some(lin) = &spec.lpips else {
            return Ok(0);
        };
        let mut on = self.lin.lock().map_err(|_| Error::poisoned())?;
        if let Some((_, slice)) = on.iter().find(|(o, _)| *o == dev.ordinal()) {
            return Ok(slice.device_ptr(dev.stream()).0);
        }
        dev.refuse_in_capture(|| {
            "the LPIPS weights are uploaded on the first call on a device (make one before \
             capturing)"
                .into()
        })?;
        let slice = (dev.stream().clone_htod(lin.all()))
            .map_err(|e| Error::cuda_alloc("the LPIPS weights", 4 * lin.all().len(), e))?;
        dev.synchronize()?;
        let addr = slice.device_ptr(dev.stream()).0;
        on.push((dev.ordinal(), slice));
        Ok(addr)
    }

    /// How many whole calls the plans hold CUDA graphs of.
    pub(crate) fn graphs_held(&self) -> Result<usize> {
        let plans = self.plans.lock().map_err(|_| Error::poisoned())?;
        Ok(plans.iter().map(|p| p.graphs.len()).sum())
    }

    /// Device bytes of the buffers and cuDNN workspace a call on `shape`
    /// holds (for one chunk when chunked), building its plan if needed.
    pub(crate) fn footprint(
        &self,
        dev: &CudaDevice,
        vgg: &Vgg,
        spec: &PerceptualSpec,
        shape: Shape,
    ) -> Result<usize> {
        let key = (shape, Batch::Pairs);
        let chunk = Shape {
            n: self.device_chunk_images(dev, vgg, spec, key)?,
            ..shape
        };
        self.with_plan(dev, vgg, spec, (chunk, key.1), |_, plan| Ok(plan.footprint))
    }

    /// Images per chunk: `max_chunk_images`, lowered until the buffers fit
    /// the memory budget and then until `plans(k)` (building the plan of a
    /// k-image chunk) succeeds: cuDNN's workspace comes out of what the
    /// buffers leave. Decided once per shape.
    pub(crate) fn chunk_images(
        &self,
        vgg: &Vgg,
        spec: &PerceptualSpec,
        (s, holds): (Shape, Batch),
        compute: DType,
        mut plans: impl FnMut(usize) -> Result<()>,
    ) -> Result<usize> {
        let cap = spec.chunk.unwrap_or(s.n).min(s.n);
        let Some(budget) = spec.budget else {
            return Ok(cap);
        };
        let mut chunks = self.chunks.lock().map_err(|_| Error::poisoned())?;
        let key = (s, compute, holds);
        let chosen = chunks.get_or_try_insert(
            |(k, _)| *k == key,
            || {
                let bytes =
                    |k: usize| buffer_bytes(vgg.layers(), spec, holds, (k, s.h, s.w), compute);
                let one = bytes(1)?;
                if one > budget {
                    return Err(Error::OutOfMemory(format!(
                        "the memory budget of {budget} bytes is below the {one} bytes of buffers one {}x{} image needs",
                        s.h, s.w
                    )));
                }
                // Buffers grow about linearly with the images: start there,
                // then step to the largest count that fits.
                let mut k = (budget / one).clamp(1, cap);
                while k > 1 && bytes(k)? > budget {
                    k -= 1;
                }
                while k < cap && bytes(k + 1)? <= budget {
                    k += 1;
                }
                loop {
                    match plans(k) {
                        Ok(()) => return Ok((key, k)),
                        Err(e) if k == 1 => return Err(e),
                        Err(_) => k -= 1,
                    }
                }
            },
        )?;
        Ok(chosen.1)
    }

    fn device_chunk_images(
        &self,
        dev: &CudaDevice,
        vgg: &Vgg,
        spec: &PerceptualSpec,
        (s, holds): (Shape, Batch),
    ) -> Result<usize> {
        // The search builds plans: under a capture only a decided chunk goes.
        let decided = |c: &Recent<(ChunkKey, usize)>| {
            c.contains(|(key, _)| *key == (s, vgg.compute_dtype(), holds))
        };
        if spec.budget.is_some()
            && dev.capturing()
            && !decided(&*self.chunks.lock().map_err(|_| Error::poisoned())?)
        {
            return Err(capture_forbids(format!(
                "no chunk size for {s}{} under the memory budget yet (run one such call before \
                 capturing): choosing one builds plans",
                call_kind(holds)
            )));
        }
        self.chunk_images(vgg, spec, (s, holds), vgg.compute_dtype(), |k| {
            self.with_plan(dev, vgg, spec, (Shape { n: k, ..s }, holds), |_, _| Ok(()))
        })
    }

    /// Runs `f` with the device's cuDNN handle and the plan for a batch of
    /// `shape` holding `holds`.
    fn with_plan<R>(
        &self,
        dev: &CudaDevice,
        vgg: &Vgg,
        spec: &PerceptualSpec,
        (shape, holds): (Shape, Batch),
        f: impl FnOnce(&Handle, &mut ShapePlan) -> Result<R>,
    ) -> Result<R> {
        dev.with_cudnn(|handle| {
            let mut plans = self.plans.lock().map_err(|_| Error::poisoned())?;
            let compute = vgg.compute_dtype();
            let matches = |p: &ShapePlan| p.matches(dev, (shape, holds), compute, spec.tf32);
            let capturing = dev.capturing();
            // Refused before the cache makes room: dropping a plan frees
            // memory, which a capture must not see either.
            if capturing && !plans.contains(matches) {
                return Err(capture_forbids(format!(
                    "no plan for {shape}{} on this stream yet (run one such call on it before \
                     capturing): building one allocates device memory and chooses cuDNN \
                     algorithms",
                    call_kind(holds)
                )));
            }
            let plan = plans.get_or_try_insert_keeping(
                matches,
                |p| p.captured,
                || ShapePlan::new(dev, handle, vgg.layers(), spec, (shape, holds), compute),
            )?;
            plan.captured |= capturing;
            f(handle, plan)
        })
    }
}
