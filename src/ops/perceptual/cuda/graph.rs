//! A whole call replayed from a CUDA graph (`cuda_graphs`).
//!
//! A shape's first call runs plainly: it plans (buffers, cuDNN algorithms,
//! the stream's cuDNN handle and reduction scratch), so nothing in a
//! capture needs to allocate, create a handle or wait (and the scratch
//! refuses to grow in one). The next call that bakes in the same things
//! (a [`GraphKey`]) is captured, every chunk and every kernel and cuDNN
//! call, into a graph its plan keeps; later ones replay it on the caller's
//! stream with two launches (the call table's, then the graph's). The
//! capture is made on a stream of the plan's own, so nothing another
//! thread queues on the caller's stream meanwhile is captured.
//!
//! A graph must not bake the caller's tensors, which change from call to
//! call: its kernels read pred and target and write the gradient through a
//! call table (kernels/pl_kernel_abi.h), a few device words the host fills
//! before each replay, and the taps leave the loss, parts and per-sample
//! values in the graph's own memory, which a last kernel
//! (`pl_vgg_publish`) copies to the caller's outputs through the table.
//! The arithmetic is the plain call's, so the results are bit-identical.

use super::steps::KeptAt;
use super::{Batch, CudaCall, MapTerms};
use crate::backend::DeviceIo;
use crate::cuda::abi::{
    self, pl_k_call_slot, pl_k_call_table_params, pl_k_publish_params, pl_k_reduce,
};
use crate::cuda::cudnn::Handle;
use crate::cuda::{env_flag, kernels, Gpu, KernelImage};
use crate::device::CudaDevice;
use crate::error::{Error, Result};
use crate::tensor::{DType, Shape};
use cudarc::driver::sys::{self, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{result, CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use std::sync::Arc;

/// Addresses in a call table: one per `pl_k_call_slot`.
pub(crate) const SLOTS: usize = abi::pl_k_call_slot_PL_K_CALL_SLOTS as usize;

/// A caller address as a graph bakes it: the slot, and offset 0 (a
/// chunk's shift adds to it).
fn slot(s: pl_k_call_slot) -> u64 {
    (s as u64 + 1) << abi::pl_k_call_encoding_PL_K_CALL_SLOT_SHIFT
}

/// Byte offsets of the parts and the per-sample values in the graph's own
/// outputs (`pl_k_publish_layout`, in floats), after the loss.
const PARTS_AT: usize = 4 * abi::pl_k_publish_layout_PL_K_PUBLISH_PARTS_AT as usize;
const PER_SAMPLE_AT: usize = 4 * abi::pl_k_publish_layout_PL_K_PUBLISH_PER_SAMPLE_AT as usize;

/// Bytes of the graph's own outputs for `n` images.
pub(crate) fn outputs_bytes(n: usize) -> usize {
    PER_SAMPLE_AT + 4 * n
}

/// What a call can go through a graph: not a target's own forward (done
/// once per kept target) nor an LPIPS map (its scratch is the call's).
pub(crate) fn eligible(call: &CudaCall) -> bool {
    call.holds != Batch::Target && call.terms == MapTerms::default()
}

/// The call table's contents for `io`, by slot (0 for an output not asked
/// for, or the target of a call against a kept one).
fn table_of_io(io: &DeviceIo<2>) -> [u64; SLOTS] {
    let mut t = [0; SLOTS];
    t[abi::pl_k_call_slot_PL_K_CALL_PRED as usize] = io.inputs[0];
    t[abi::pl_k_call_slot_PL_K_CALL_TARGET as usize] = io.inputs[1];
    t[abi::pl_k_call_slot_PL_K_CALL_GRAD as usize] = io.grad.unwrap_or(0);
    t[abi::pl_k_call_slot_PL_K_CALL_LOSS as usize] = io.loss;
    t[abi::pl_k_call_slot_PL_K_CALL_PER_SAMPLE as usize] = io.per_sample.unwrap_or(0);
    t[abi::pl_k_call_slot_PL_K_CALL_PARTS as usize] = io.parts.unwrap_or(0);
    t
}

/// `whole` as its graph runs it: pred, target and the gradient through
/// the call table at `table`, the loss, parts and per-sample values into
/// the graph's own memory at `outputs` ([`outputs_bytes`]).
pub(crate) fn through_table(whole: &CudaCall, table: u64, outputs: u64) -> CudaCall {
    let io = whole.io;
    let target = match io.inputs[1] {
        0 => 0,
        _ => slot(abi::pl_k_call_slot_PL_K_CALL_TARGET),
    };
    CudaCall {
        io: DeviceIo {
            inputs: [slot(abi::pl_k_call_slot_PL_K_CALL_PRED), target],
            grad: io.grad.map(|_| slot(abi::pl_k_call_slot_PL_K_CALL_GRAD)),
            loss: outputs,
            parts: io.parts.map(|_| outputs + PARTS_AT as u64),
            per_sample: io.per_sample.map(|_| outputs + PER_SAMPLE_AT as u64),
            ..io
        },
        table,
        ..*whole
    }
}

/// Queues `pl_vgg_call_table`, which writes `io`'s addresses to the call
/// table at `table`: the addresses travel as the launch's parameters, so
/// no host memory has to outlive the call, and nothing waits.
pub(crate) fn fill_table(gpu: &impl Gpu, table: u64, io: &DeviceIo<2>) -> Result<()> {
    let p = pl_k_call_table_params {
        table: table as *mut u64,
        addrs: table_of_io(io),
    };
    gpu.launch_symbol(&kernels::VGG, "pl_vgg_call_table", (1, 1), &p)
}

/// Queues `pl_vgg_publish`: the outputs of `via` (from [`through_table`])
/// to the caller's, through the table.
pub(crate) fn publish(gpu: &impl Gpu, via: &CudaCall) -> Result<()> {
    let io = &via.io;
    let p = pl_k_publish_params {
        from: io.loss as *const f32,
        loss: slot(abi::pl_k_call_slot_PL_K_CALL_LOSS) as *mut f32,
        per_sample: io
            .per_sample
            .map_or(0, |_| slot(abi::pl_k_call_slot_PL_K_CALL_PER_SAMPLE))
            as *mut f32,
        parts: io
            .parts
            .map_or(0, |_| slot(abi::pl_k_call_slot_PL_K_CALL_PARTS)) as *mut f32,
        call: via.table as *const u64,
        n: io.shape.n as i64,
    };
    gpu.launch_symbol(&kernels::VGG, "pl_vgg_publish", (1, 1), &p)
}

/// Everything a captured call bakes in but the caller's addresses: a
/// replay needs all of it unchanged. (The plan's own buffers, cuDNN
/// handle and workspace, and the network's weights, belong to the plan or
/// the loss and stay.)
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GraphKey {
    shape: Shape,
    dtype: DType,
    holds: Batch,
    chunk: usize,
    grad: bool,
    beta: u32,
    per_sample: bool,
    parts: bool,
    /// Each chunk's kept target slots.
    kept: Vec<KeptAt>,
    lpips: u64,
    /// The device (never reused within the process): its cuDNN handle
    /// and reduction scratch are baked.
    device: u64,
    /// The reduction scratch's address and bytes: a larger block replaces
    /// it, and a freed one may come back at the same address smaller.
    scratch: Option<(u64, usize)>,
}

impl GraphKey {
    pub(crate) fn new(
        whole: &CudaCall,
        chunk: usize,
        (kept, lpips): (&[KeptAt], u64),
        dev: &CudaDevice,
    ) -> Result<Self> {
        let io = &whole.io;
        Ok(GraphKey {
            shape: io.shape,
            dtype: io.dtype,
            holds: whole.holds,
            chunk,
            grad: io.grad.is_some(),
            beta: io.beta.to_bits(),
            per_sample: io.per_sample.is_some(),
            parts: io.parts.is_some(),
            kept: kept.to_vec(),
            lpips,
            device: dev.id(),
            scratch: dev.reduce_scratch_block()?,
        })
    }
}

/// Whether calls of a loss whose config says `configured` go through
/// graphs: PERCEPTUAL_LOSS_CUDA_GRAPHS=1 or 0 decides for every loss,
/// read at each call.
pub(crate) fn wanted(configured: bool) -> bool {
    match std::env::var("PERCEPTUAL_LOSS_CUDA_GRAPHS").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => configured,
    }
}

/// Graphs a plan keeps, and keys it remembers seeing once, most recent last.
const KEPT_GRAPHS: usize = 4;

/// An instantiated graph, destroyed with it. (cudarc's `CudaGraph` ends
/// a capture through a context check that can fail first, which would
/// leave the stream capturing; the raw calls here cannot.)
struct Executable {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

impl Drop for Executable {
    fn drop(&mut self) {
        // SAFETY: made by one capture and instantiate, destroyed once; the
        // driver frees an executable still running when its launch ends.
        // An error here has nowhere to go.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

/// A captured call, and the memory its taps write the loss to.
struct CallGraph {
    key: GraphKey,
    graph: Executable,
    _outputs: CudaSlice<u8>,
}

// SAFETY: the driver asks that a graph's uses be serialised, not that they
// stay on one thread; a plan, and so its graphs, is only used under its
// loss's plan-cache lock.
unsafe impl Send for CallGraph {}

/// What a plan does with a call (see [`Graphs::next`]).
pub(crate) enum Next {
    /// Run it plainly: first of its key, or graphs failed on this plan.
    Plain,
    /// Capture it: its key was seen once.
    Capture,
    /// Replay graph `i`.
    Replay(usize),
}

/// Queues a call's kernels on the capture stream (the device's reduction
/// scratch, the stream's own launches), so that only the call's work is
/// captured: other work a thread queues on the caller's stream meanwhile
/// runs there as usual.
pub(crate) struct OnStream<'a> {
    dev: &'a CudaDevice,
    stream: &'a Arc<CudaStream>,
}

impl Gpu for OnStream<'_> {
    fn launch_symbol<P: DeviceRepr + Copy>(
        &self,
        image: &KernelImage,
        symbol: &str,
        grid: (u32, u32),
        params: &P,
    ) -> Result<()> {
        self.dev.launch_on(self.stream, image, symbol, grid, params)
    }

    fn with_reduce<R>(
        &self,
        images: usize,
        partials: usize,
        f: impl FnOnce(pl_k_reduce) -> Result<R>,
    ) -> Result<R> {
        let scratch = self.dev.reduce_scratch_for_graph(images, partials)?;
        f(scratch.reduce)
    }
}

/// Ends a capture when dropped, so neither an error nor a panic in the
/// queueing leaves the stream capturing; `end` gives the graph.
struct Capture(sys::CUstream);

impl Capture {
    fn begin(stream: &CudaStream) -> Result<Self> {
        // SAFETY: a live stream of the current context.
        unsafe {
            result::stream::begin_capture(
                stream.cu_stream(),
                CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| Error::cuda("starting a CUDA graph capture", e))?;
        Ok(Capture(stream.cu_stream()))
    }

    fn end(self) -> Result<Executable> {
        let stream = self.0;
        std::mem::forget(self);
        // SAFETY: this thread began the capture on `stream`.
        let graph = unsafe { result::stream::end_capture(stream) }
            .map_err(|e| Error::cuda("ending the capture", e))?;
        if graph.is_null() {
            return Err(Error::cuda(
                "ending the capture",
                "the driver gave no graph",
            ));
        }
        // SAFETY: a graph the capture just made, destroyed on failure.
        match unsafe { result::graph::instantiate(graph, CUgraphInstantiate_flags(0)) } {
            Ok(exec) => Ok(Executable { graph, exec }),
            Err(e) => {
                // SAFETY: as above; nothing else holds it.
                let _ = unsafe { result::graph::destroy(graph) };
                Err(Error::cuda("instantiating the graph", e))
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // SAFETY: this thread began the capture; its graph is discarded.
        if let Ok(g) = unsafe { result::stream::end_capture(self.0) } {
            if !g.is_null() {
                let _ = unsafe { result::graph::destroy(g) };
            }
        }
    }
}

/// A plan's graphs: the call table they read, the calls captured, the
/// keys seen once, and the stream captures are made on. A capture that
/// fails (the driver refuses something the call queues) leaves the plan to
/// plain calls, which give the same bits.
#[derive(Default)]
pub(crate) struct Graphs {
    table: Option<CudaSlice<u64>>,
    stream: Option<Arc<CudaStream>>,
    captured: Vec<CallGraph>,
    seen: Vec<GraphKey>,
    failed: bool,
}

fn addr<T>(s: &CudaSlice<T>, dev: &CudaDevice) -> u64 {
    s.device_ptr(dev.stream()).0
}

impl Graphs {
    /// How many calls this plan holds graphs of.
    pub(crate) fn len(&self) -> usize {
        self.captured.len()
    }

    /// What to do with a call of `key`: replay its graph, capture it (its
    /// key was seen once), or run it plainly.
    pub(crate) fn next(&mut self, key: &GraphKey) -> Next {
        if let Some(i) = self.captured.iter().position(|g| g.key == *key) {
            return Next::Replay(i);
        }
        if self.failed {
            return Next::Plain;
        }
        match self.seen.iter().position(|k| k == key) {
            Some(i) => {
                self.seen.remove(i);
                Next::Capture
            }
            None => Next::Plain,
        }
    }

    /// Notes a plain call of `key` (taken after it ran: a first call sets
    /// up the stream's reduction scratch), so the next one is captured.
    pub(crate) fn saw(&mut self, key: GraphKey) {
        if !self.failed && !self.seen.contains(&key) {
            if self.seen.len() == KEPT_GRAPHS {
                self.seen.remove(0);
            }
            self.seen.push(key);
        }
    }

    /// Captures `whole` on a stream of the plan's own, with `handle` (the
    /// caller stream's cuDNN handle) pointed at it meanwhile: `queue`
    /// queues every chunk of the call it is given ([`through_table`] of
    /// `whole`) through the [`OnStream`], then the outputs are published.
    /// Returns whether a graph was made (then [`Graphs::replay`] of the
    /// last one runs the call); when not, nothing ran and the plan stays
    /// plain from now on.
    pub(crate) fn capture(
        &mut self,
        (dev, handle): (&CudaDevice, &Handle),
        key: GraphKey,
        whole: &CudaCall,
        queue: impl FnOnce(&CudaCall, &OnStream<'_>) -> Result<()>,
    ) -> Result<bool> {
        let made = self.try_capture((dev, handle), key, whole, queue);
        // The handle serves the caller's stream again whatever happened.
        let restored = handle.set_stream(dev.stream().cu_stream());
        let why = match (made, restored) {
            (Ok(()), Ok(())) => return Ok(true),
            (_, Err(e)) => return Err(e),
            (Err(e), Ok(())) => e.to_string(),
        };
        self.failed = true;
        if env_flag("PERCEPTUAL_LOSS_LOG_PLANS") {
            eprintln!(
                "perceptual plan for {}: capturing a CUDA graph failed ({why}); its calls run \
                 without graphs",
                whole.io.shape
            );
        }
        Ok(false)
    }

    fn try_capture(
        &mut self,
        (dev, handle): (&CudaDevice, &Handle),
        key: GraphKey,
        whole: &CudaCall,
        queue: impl FnOnce(&CudaCall, &OnStream<'_>) -> Result<()>,
    ) -> Result<()> {
        let alloc_err = |what, bytes| move |e| Error::cuda_alloc(what, bytes, e);
        if self.table.is_none() {
            // SAFETY: every replay fills the table before its graph runs.
            let t = unsafe { dev.stream().alloc::<u64>(SLOTS) }
                .map_err(alloc_err("the CUDA graph's call table", 8 * SLOTS))?;
            self.table = Some(t);
        }
        if self.stream.is_none() {
            self.stream = Some(dev.new_stream()?);
        }
        let (Some(table), Some(stream)) = (&self.table, &self.stream) else {
            return Err(Error::Internal("no call table or capture stream".into()));
        };
        // SAFETY: the taps write every output the call asks for before
        // pl_vgg_publish reads it.
        let bytes = outputs_bytes(whole.io.shape.n);
        let outputs = unsafe { dev.stream().alloc::<u8>(bytes) }
            .map_err(alloc_err("the CUDA graph's outputs", bytes))?;
        let via = through_table(whole, addr(table, dev), addr(&outputs, dev));
        // Loaded now: every other kernel of the call ran in its plain calls.
        dev.function(&kernels::VGG, "pl_vgg_publish")?;
        dev.function(&kernels::VGG, "pl_vgg_call_table")?;
        // The table and outputs are allocated on the caller's stream, and
        // replays run there after those allocations.
        handle.set_stream(stream.cu_stream())?;
        let on = OnStream { dev, stream };
        let capture = Capture::begin(stream)?;
        queue(&via, &on).and_then(|()| publish(&on, &via))?;
        let graph = capture.end()?;
        if self.captured.len() == KEPT_GRAPHS {
            self.captured.remove(0);
        }
        self.captured.push(CallGraph {
            key,
            graph,
            _outputs: outputs,
        });
        Ok(())
    }

    /// Runs captured call `i` for `io` on the caller's stream: fills the
    /// call table with its addresses and launches the graph.
    pub(crate) fn replay(&self, i: usize, dev: &CudaDevice, io: &DeviceIo<2>) -> Result<()> {
        let (Some(table), Some(g)) = (&self.table, self.captured.get(i)) else {
            return Err(Error::Internal("a replay without its graph".into()));
        };
        let _range = crate::cuda::nvtx::range(|| format!("perceptual {} (CUDA graph)", io.shape));
        fill_table(dev, addr(table, dev), io)?;
        let stream = dev.stream().cu_stream();
        // SAFETY: an executable graph of this context, on a stream of it.
        unsafe { result::graph::launch(g.graph.exec, stream) }
            .map_err(|e| Error::cuda("launching the call's CUDA graph", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets of a chunk ride on the baked slot, NULL stays NULL, and a
    /// slot's bits are above any address the table holds.
    #[test]
    fn a_baked_address_is_its_slot_plus_the_chunks_offset() {
        let io = DeviceIo {
            shape: Shape::new(4, 3, 8, 8),
            dtype: DType::F32,
            inputs: [0x7f00_0000_1000, 0],
            grad: Some(0x7f00_0010_0000),
            beta: 0.0,
            loss: 0x7f00_0020_0000,
            per_sample: None,
            parts: Some(0x7f00_0030_0000),
        };
        let whole = CudaCall::new(io, Batch::Pred);
        let via = through_table(&whole, 0xabc0, 0x5000);
        assert_eq!(via.io.inputs, [1 << 56, 0]);
        assert_eq!(via.io.grad, Some(3 << 56));
        assert_eq!(
            (via.io.loss, via.io.parts, via.io.per_sample),
            (0x5000, Some(0x5004), None)
        );
        let second = via.chunks(2)[1];
        assert_eq!(second.io.inputs[0], (1 << 56) + 2 * 3 * 64 * 4);
        assert_eq!(second.table, 0xabc0);
        let t = table_of_io(&io);
        assert_eq!(
            t,
            [
                io.inputs[0],
                0,
                io.grad.unwrap(),
                io.loss,
                0,
                io.parts.unwrap()
            ]
        );
        assert!(t.iter().all(|&a| a < slot(0)));
    }
}
