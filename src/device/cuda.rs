//! One CUDA device and stream: kernel modules (loaded once per device per
//! process), the reduction scratch memory, the stream's cuDNN handle, and
//! pointer checks.

use super::require_driver;
use crate::cuda::abi::pl_k_reduce;
use crate::cuda::KernelImage;
use crate::error::{Error, Result};
use cudarc::driver::sys::{CUdeviceptr, CUpointer_attribute, CUresult, CUstream};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::{CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

/// What every `Device` of one ordinal shares: the context and loaded kernels.
struct Shared {
    ctx: Arc<CudaContext>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: RwLock<HashMap<String, CudaFunction>>,
}

/// Per-process registry, so kernels load once per device however many
/// `Device` values (streams) point at it.
fn shared(ordinal: usize) -> Result<Arc<Shared>> {
    static REGISTRY: OnceLock<Mutex<HashMap<usize, Arc<Shared>>>> = OnceLock::new();
    let mut reg = REGISTRY
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| Error::poisoned())?;
    if let Some(s) = reg.get(&ordinal) {
        return Ok(s.clone());
    }
    require_driver()?;
    let count =
        CudaContext::device_count().map_err(|e| Error::NoCuda(format!("cuInit failed: {e}")))?;
    if ordinal >= count.max(0) as usize {
        return Err(Error::NoCuda(format!(
            "CUDA device {ordinal} requested but {count} present"
        )));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| Error::cuda("creating the context", e))?;
    // Our scratch memory is only ever used on the stream that allocated it,
    // so cudarc's cross-stream event tracking is pure overhead.
    // SAFETY: no slice of this context is shared between streams.
    unsafe { ctx.disable_event_tracking() };
    let s = Arc::new(Shared {
        ctx,
        modules: Default::default(),
        functions: Default::default(),
    });
    reg.insert(ordinal, s.clone());
    Ok(s)
}

/// A CUDA device plus the stream its work goes to.
pub(crate) struct CudaDevice {
    /// Numbers devices for the keys of CUDA graphs (`NEXT_ID`).
    id: u64,
    shared: Arc<Shared>,
    stream: Arc<CudaStream>,
    reduce_scratch: Mutex<Scratch>,
    cudnn: Mutex<Option<crate::cuda::cudnn::Handle>>,
}

/// The stream's reduction scratch. A block a CUDA graph holds the address
/// of is never freed while the device lives: a larger one replaces it, and
/// it is retired instead. `captured`: a caller's capture used it (the C
/// context then keeps this device); `baked`: a graph of the crate's own
/// did (its plan keeps the graph, whose key names this device).
#[derive(Default)]
struct Scratch {
    block: Option<CudaSlice<u8>>,
    captured: bool,
    baked: bool,
    retired: Vec<CudaSlice<u8>>,
}

/// The scratch of one deterministic reduction (block partials, per-image
/// values and the finishing counter), held locked until its launch is
/// queued. Not the cuDNN workspace, which each per-shape plan owns.
pub(crate) struct ReduceScratch<'a> {
    _guard: MutexGuard<'a, Scratch>,
    pub reduce: pl_k_reduce,
}

const COUNTER_BYTES: usize = 256;

/// The next [`CudaDevice::id`].
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The error for `what` (an allocation, a new handle, a wait) that a call
/// would do while its stream is being captured into a CUDA graph.
pub(crate) fn capture_forbids(what: String) -> Error {
    Error::arg(format!(
        "{what}, which a CUDA graph capture of this stream forbids"
    ))
}

impl CudaDevice {
    pub(crate) fn new(ordinal: usize, stream: Option<CUstream>) -> Result<Self> {
        let shared = shared(ordinal)?;
        let stream = match stream {
            None => shared
                .ctx
                .new_stream()
                .map_err(|e| Error::cuda("creating a stream", e))?,
            Some(s) if s.is_null() => shared.ctx.default_stream(),
            // SAFETY: the caller of Device::cuda_on_stream vouches for the stream.
            Some(s) => unsafe { shared.ctx.wrap_borrowed_stream(s) },
        };
        Ok(CudaDevice {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            shared,
            stream,
            reduce_scratch: Mutex::default(),
            cudnn: Mutex::new(None),
        })
    }

    pub(crate) fn ordinal(&self) -> usize {
        self.shared.ctx.ordinal()
    }

    pub(crate) fn name(&self) -> String {
        self.shared
            .ctx
            .name()
            .unwrap_or_else(|_| format!("cuda:{}", self.ordinal()))
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// An error when this device's stream is being captured into a CUDA
    /// graph (a caller's `cuStreamBeginCapture`, PyTorch's
    /// `torch.cuda.graph`): `what` would allocate device memory, create a
    /// handle or wait for the device, which breaks a capture.
    pub(crate) fn refuse_in_capture(&self, what: impl FnOnce() -> String) -> Result<()> {
        match self.capturing() {
            true => Err(capture_forbids(what())),
            false => Ok(()),
        }
    }

    /// Whether this device's stream is being captured into a CUDA graph.
    /// The legacy default stream answers "implicit" while another stream
    /// captures in a mode that forbids touching it: that counts as
    /// capturing. Any other error counts as not, so a call outside any
    /// capture is never refused for a status the driver cannot report.
    pub(crate) fn capturing(&self) -> bool {
        use cudarc::driver::sys::{
            CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
            CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE,
        };
        match self.stream.capture_status() {
            Ok(status) => status != CU_STREAM_CAPTURE_STATUS_NONE,
            Err(e) => e.0 == CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
        }
    }

    /// Whether a CUDA graph captured this stream's reduction scratch, the
    /// current block or a retired one (such a device must be kept while
    /// the graph may run).
    pub(crate) fn captured(&self) -> bool {
        self.reduce_scratch
            .lock()
            .is_ok_and(|s| s.captured || !s.retired.is_empty())
    }

    /// Makes this device's context current on the calling thread (for the
    /// driver and cuDNN calls that use the current context).
    pub(crate) fn bind(&self) -> Result<()> {
        self.shared
            .ctx
            .bind_to_thread()
            .map_err(|e| Error::cuda("binding the context", e))
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::cuda("synchronizing the stream", e))
    }

    /// The kernel `{family}_{dtype}` of `image`, loading the module on first use.
    pub(crate) fn function(&self, image: &KernelImage, symbol: &str) -> Result<CudaFunction> {
        if let Some(f) = self
            .shared
            .functions
            .read()
            .map_err(|_| Error::poisoned())?
            .get(symbol)
        {
            return Ok(f.clone());
        }
        let module = self.module(image)?;
        let f = module
            .load_function(symbol)
            .map_err(|e| Error::cuda(&format!("loading kernel {symbol}"), e))?;
        self.shared
            .functions
            .write()
            .map_err(|_| Error::poisoned())?
            .insert(symbol.to_string(), f.clone());
        Ok(f)
    }

    fn module(&self, image: &KernelImage) -> Result<Arc<CudaModule>> {
        let mut modules = self.shared.modules.lock().map_err(|_| Error::poisoned())?;
        if let Some(m) = modules.get(image.name) {
            return Ok(m.clone());
        }
        let ctx = &self.shared.ctx;
        // The embedded fatbin first; NVRTC when there is none, the driver
        // cannot use it (a GPU older than the fatbin's targets), or
        // PERCEPTUAL_LOSS_FORCE_NVRTC=1 asks for it (to test that path).
        let force_nvrtc = std::env::var_os("PERCEPTUAL_LOSS_FORCE_NVRTC").is_some_and(|v| v == "1");
        let from_fatbin = image
            .fatbin
            .filter(|_| !force_nvrtc)
            .map(|bin| ctx.load_module(Ptx::from_binary(bin.to_vec())));
        let module = match from_fatbin {
            Some(Ok(m)) => m,
            _ => {
                let ptx = nvrtc_ptx(
                    image,
                    ctx.compute_capability()
                        .map_err(|e| Error::cuda("querying the GPU", e))?,
                )?;
                ctx.load_module(ptx)
                    .map_err(|e| Error::cuda(&format!("loading the {} kernels", image.name), e))?
            }
        };
        modules.insert(image.name, module.clone());
        Ok(module)
    }

    /// Runs `f` with this stream's cuDNN handle (created on first use),
    /// holding it for the duration: a handle is not thread-safe.
    pub(crate) fn with_cudnn<R>(
        &self,
        f: impl FnOnce(&crate::cuda::cudnn::Handle) -> Result<R>,
    ) -> Result<R> {
        let mut guard = self.cudnn.lock().map_err(|_| Error::poisoned())?;
        // cuDNN works on the calling thread's current context, and this
        // thread may not have made ours current yet.
        self.bind()?;
        let handle = match guard.take() {
            // Each use starts on this stream: a capture of the crate's own
            // points the handle at a stream of its plan for a while.
            Some(h) => match h.set_stream(self.stream.cu_stream()) {
                Ok(()) => h,
                Err(e) => {
                    *guard = Some(h);
                    return Err(e);
                }
            },
            None => {
                self.refuse_in_capture(|| {
                    "this stream has no cuDNN handle yet (run one call on it before capturing): \
                     creating one"
                        .into()
                })?;
                crate::cuda::cudnn::Handle::new(self.stream.cu_stream())?
            }
        };
        let result = f(&handle);
        *guard = Some(handle);
        result
    }

    /// Scratch for a deterministic reduction over `partials` block sums and
    /// `images` per-image values; grows (never shrinks) and stays allocated.
    pub(crate) fn reduce_scratch(
        &self,
        images: usize,
        partials: usize,
    ) -> Result<ReduceScratch<'_>> {
        self.scratch(images, partials, false)
    }

    /// [`CudaDevice::reduce_scratch`] for a launch a graph of the crate's
    /// own captures (on a stream of its own, so this stream is not
    /// capturing): it must not grow, and its block is kept from now on.
    pub(crate) fn reduce_scratch_for_graph(
        &self,
        images: usize,
        partials: usize,
    ) -> Result<ReduceScratch<'_>> {
        self.scratch(images, partials, true)
    }

    fn scratch(&self, images: usize, partials: usize, baking: bool) -> Result<ReduceScratch<'_>> {
        let mut guard = self.reduce_scratch.lock().map_err(|_| Error::poisoned())?;
        let need = COUNTER_BYTES + 8 * (images + partials);
        // A graph of the crate's own is captured on a stream of its plan,
        // outside any capture of this one.
        let caller_capturing = !baking && self.capturing();
        if guard.block.as_ref().is_none_or(|ws| ws.len() < need) {
            if baking || caller_capturing {
                return Err(capture_forbids(format!(
                    "this call needs {need} bytes of reduction scratch on this stream (run it once \
                     there before capturing): allocating them"
                )));
            }
            // Zeroed: the counter must start at 0 (each launch leaves it at 0).
            let size = need.next_power_of_two().max(4096);
            let old = guard.block.take();
            match (old, guard.captured || guard.baked) {
                // A graph holds its address: kept, not freed.
                (Some(old), true) => guard.retired.push(old),
                // Freed first (stream-ordered), so its memory serves the new one.
                (old, _) => drop(old),
            }
            guard.captured = false;
            guard.baked = false;
            guard.block = Some(
                self.stream
                    .alloc_zeros::<u8>(size)
                    .map_err(|e| Error::cuda_alloc("reduction scratch", size, e))?,
            );
        }
        guard.captured |= caller_capturing;
        guard.baked |= baking;
        let base = {
            let ws = guard.block.as_ref().expect("allocated above");
            let (ptr, _sync) = ws.device_ptr(&self.stream);
            ptr
        };
        let image_scale = base + COUNTER_BYTES as u64;
        let reduce = pl_k_reduce {
            counter: base as *mut u32,
            image_scale: image_scale as *mut f64,
            partials: (image_scale + 8 * images as u64) as *mut f64,
            loss: std::ptr::null_mut(),
            per_sample: std::ptr::null_mut(),
        };
        Ok(ReduceScratch {
            _guard: guard,
            reduce,
        })
    }

    /// The address and bytes of this stream's reduction scratch, if it has
    /// one.
    pub(crate) fn reduce_scratch_block(&self) -> Result<Option<(u64, usize)>> {
        let guard = self.reduce_scratch.lock().map_err(|_| Error::poisoned())?;
        Ok(guard
            .block
            .as_ref()
            .map(|ws| (ws.device_ptr(&self.stream).0, ws.len())))
    }

    /// This device's number, never given to another in this process.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// A new stream of this device's context (non-blocking).
    pub(crate) fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.shared
            .ctx
            .new_stream()
            .map_err(|e| Error::cuda("creating a stream", e))
    }

    /// Checks that `[ptr, ptr + bytes)` lies inside one allocation of this
    /// device, so a wrong pointer or size is an error instead of a fault.
    pub(crate) fn check_buffer(
        &self,
        ptr: u64,
        bytes: usize,
        align: usize,
        what: &str,
    ) -> Result<()> {
        if ptr == 0 {
            return Err(Error::arg(format!("{what} is a NULL device pointer")));
        }
        if !ptr.is_multiple_of(align as u64) {
            return Err(Error::arg(format!(
                "{what} ({ptr:#x}) is not aligned to {align} bytes"
            )));
        }
        self.bind()?;
        let attr = |a: CUpointer_attribute| -> Result<u64> {
            let mut value: u64 = 0;
            // SAFETY: both attributes write one CUdeviceptr/size_t (8 bytes).
            let r = unsafe {
                cudarc::driver::sys::cuPointerGetAttribute(
                    (&mut value as *mut u64).cast(),
                    a,
                    ptr as CUdeviceptr,
                )
            };
            if r == CUresult::CUDA_SUCCESS {
                Ok(value)
            } else {
                Err(Error::arg(format!(
                    "{what} ({ptr:#x}) is not memory known to CUDA ({r:?}); a CUDA context needs device pointers"
                )))
            }
        };
        let mut ordinal: i32 = -1;
        // SAFETY: DEVICE_ORDINAL writes one int.
        let r = unsafe {
            cudarc::driver::sys::cuPointerGetAttribute(
                (&mut ordinal as *mut i32).cast(),
                CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr as CUdeviceptr,
            )
        };
        if r == CUresult::CUDA_SUCCESS && ordinal >= 0 && ordinal as usize != self.ordinal() {
            return Err(Error::DeviceMismatch(format!(
                "{what} is on CUDA device {ordinal}, the context on device {}",
                self.ordinal()
            )));
        }
        let start = attr(CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR)?;
        let size = attr(CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE)?;
        let end = ptr.checked_add(bytes as u64);
        if end.is_none_or(|end| end > start + size) {
            return Err(Error::arg(format!(
                "{what} needs {bytes} bytes at {ptr:#x} but its allocation ends {} bytes after it",
                (start + size).saturating_sub(ptr)
            )));
        }
        Ok(())
    }
}

/// PTX compiled at run time from the embedded source, once per process per
/// kernel family and compute capability.
pub(crate) fn nvrtc_ptx(image: &KernelImage, (major, minor): (i32, i32)) -> Result<Ptx> {
    /// PTX text by (kernel family, compute capability major, minor).
    type Cache = HashMap<(&'static str, i32, i32), String>;
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| Error::poisoned())?;
    if let Some(src) = cache.get(&(image.name, major, minor)) {
        return Ok(Ptx::from_src(src.clone()));
    }
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::NoCuda(format!(
            "the {} kernels were built without nvcc and libnvrtc was not found to compile them",
            image.name
        )));
    }
    let opts = CompileOptions {
        options: vec![
            format!("--gpu-architecture=compute_{major}{minor}"),
            "-std=c++17".into(),
        ],
        name: Some(format!("{}.cu", image.name)),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(image.source, opts)
        .map_err(|e| Error::cuda(&format!("NVRTC compiling the {} kernels", image.name), e))?;
    cache.insert((image.name, major, minor), ptx.to_src());
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels;

    /// The `extern "C"` kernels a source defines: written out, or made by
    /// `PL_INSTANTIATE(name, ...)` for each dtype.
    fn entry_points(source: &str) -> Vec<String> {
        let ident = |s: &str| {
            s.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        };
        let mut names: Vec<String> = source
            .split("__launch_bounds__(PL_BLOCK) ")
            .skip(1)
            .map(ident)
            .filter(|n| n.starts_with("pl_"))
            .collect();
        for part in source.split("PL_INSTANTIATE(").skip(1) {
            let family = ident(part);
            if family.starts_with("pl_") {
                names.extend(["f32", "f16", "bf16"].map(|d| format!("{family}_{d}")));
            }
        }
        names
    }

    /// The NVRTC fallback compiles what build.rs embedded (no GPU needed,
    /// only libnvrtc). PERCEPTUAL_LOSS_REQUIRE_NVRTC=1 makes a missing
    /// libnvrtc a failure, as CI sets it.
    #[test]
    fn embedded_sources_compile_with_nvrtc() {
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return crate::cuda::skip_unless_required(
                "PERCEPTUAL_LOSS_REQUIRE_NVRTC",
                "libnvrtc was not found",
            );
        }
        for image in kernels::ALL {
            let entries = entry_points(image.source);
            assert!(!entries.is_empty(), "{}: no kernels found", image.name);
            for arch in [(8, 0), (9, 0)] {
                let ptx = nvrtc_ptx(image, arch)
                    .unwrap_or_else(|e| panic!("{}: {e}", image.name))
                    .to_src();
                for entry in &entries {
                    assert!(
                        ptx.contains(&format!(".entry {entry}(")),
                        "{} for sm_{}{}: no {entry}",
                        image.name,
                        arch.0,
                        arch.1
                    );
                }
            }
        }
    }
}
