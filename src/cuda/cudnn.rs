//! The slice of cuDNN the perceptual loss uses: NHWC 3x3 convolutions,
//! forward and backward-data, with owned descriptors and, per layer shape,
//! a [`CudnnConv`] whose algorithms are chosen once. Built on cudarc's `result`
//! layer; its `safe` layer unwraps inside `Cudnn::new` and `Drop`, which
//! would turn a missing library or a failed call into a panic.

use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::cudnn::{result, sys};
use std::ffi::c_void;

fn err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("cuDNN {what}: {e:?}"))
}

/// An error unless libcudnn can be loaded (cudarc would panic otherwise).
pub(crate) fn require() -> Result<()> {
    // SAFETY: only probes whether the shared library can be opened.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::NoCuda(
            "libcudnn (cuDNN 9) was not found; it is needed for the perceptual loss on CUDA".into(),
        ))
    }
}

fn data_type(dtype: DType) -> sys::cudnnDataType_t {
    match dtype {
        DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
    }
}

/// The loaded cuDNN's version, e.g. 91400 for 9.14.0.
pub(crate) fn version() -> usize {
    result::get_version()
}

/// A cuDNN handle bound to one stream. Not thread-safe: callers hold it
/// behind a mutex.
pub(crate) struct Handle(sys::cudnnHandle_t);

// SAFETY: the handle is only used under the owning device's mutex.
unsafe impl Send for Handle {}

impl Handle {
    pub(crate) fn new(stream: cudarc::driver::sys::CUstream) -> Result<Self> {
        require()?;
        let h = result::create_handle().map_err(|e| err("creating a handle", e))?;
        let handle = Handle(h);
        handle.set_stream(stream)?;
        Ok(handle)
    }

    /// Points the handle's calls at `stream`, a stream of the current
    /// context (a CUDA graph of the crate's own is captured on another).
    pub(crate) fn set_stream(&self, stream: cudarc::driver::sys::CUstream) -> Result<()> {
        // SAFETY: a live handle and a stream of the current context.
        unsafe { result::set_stream(self.0, stream as sys::cudaStream_t) }
            .map_err(|e| err("setting the stream", e))
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by create_handle and destroyed once; an error here
        // has nowhere to go and is ignored rather than panicking.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

macro_rules! descriptor {
    ($name:ident, $raw:ty, $destroy:path) => {
        struct $name($raw);
        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: created once, destroyed once; errors are ignored (see Handle).
                let _ = unsafe { $destroy(self.0) };
            }
        }
    };
}
descriptor!(
    TensorDesc,
    sys::cudnnTensorDescriptor_t,
    result::destroy_tensor_descriptor
);
descriptor!(
    FilterDesc,
    sys::cudnnFilterDescriptor_t,
    result::destroy_filter_descriptor
);
descriptor!(
    ConvDesc,
    sys::cudnnConvolutionDescriptor_t,
    result::destroy_convolution_descriptor
);

fn nhwc(dtype: DType, n: usize, c: usize, h: usize, w: usize) -> Result<TensorDesc> {
    let d = TensorDesc(
        result::create_tensor_descriptor().map_err(|e| err("creating a tensor descriptor", e))?,
    );
    let dims = [n, c, h, w].map(|v| v as i32);
    // SAFETY: a freshly created descriptor.
    unsafe {
        result::set_tensor4d_descriptor(
            d.0,
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
            data_type(dtype),
            dims,
        )
    }
    .map_err(|e| err(&format!("describing an NHWC tensor {dims:?}"), e))?;
    Ok(d)
}

/// The workspace an algorithm is preferred to take: the fastest
/// deterministic algorithm within it is chosen, and when none fits, the
/// deterministic one that needs the least (within a memory budget's room).
pub(crate) const MAX_WORKSPACE: usize = 256 << 20;

/// How much cuDNN workspace a plan's algorithms may need.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WorkspaceLimit {
    /// The fastest deterministic algorithm within this is chosen.
    pub preferred: usize,
    /// Never more than this: what a memory budget leaves after the buffers.
    pub most: Option<usize>,
}

impl WorkspaceLimit {
    /// The preferred workspace, within the most allowed.
    pub(crate) fn preferred_bytes(self) -> usize {
        self.preferred.min(self.most.unwrap_or(usize::MAX))
    }
}

/// Device memory for cuDNN to time algorithms on (`cudnnFind*Ex`): room for
/// the forward input and output and the filter of any layer, and a
/// workspace. Contents are irrelevant; results written there are dropped.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scratch {
    pub data: u64,
    pub workspace: u64,
    pub workspace_bytes: usize,
}

/// One algorithm cuDNN offered, from its heuristics or from timing it.
struct Candidate<A> {
    algo: A,
    status: sys::cudnnStatus_t,
    deterministic: bool,
    memory: usize,
    math: sys::cudnnMathType_t,
}

macro_rules! candidates {
    ($perf:expr) => {
        $perf
            .iter()
            .map(|p| Candidate {
                algo: p.algo,
                status: p.status,
                deterministic: p.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC,
                memory: p.memory,
                math: p.mathType,
            })
            .collect::<Vec<_>>()
    };
}

/// The first (fastest) usable candidate: it ran or may run, is
/// deterministic (so the gradient, too, is reproducible), keeps TF32 off
/// when asked (`math` FMA) and fits the preferred workspace; when none
/// does, the usable one needing the least, if within the most allowed.
/// The error lists what cuDNN offered.
fn choose<A: Copy + std::fmt::Debug>(
    what: &str,
    offered: &[Candidate<A>],
    math: sys::cudnnMathType_t,
    limit: WorkspaceLimit,
) -> Result<(A, usize)> {
    let usable = |c: &&Candidate<A>| {
        c.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
            && c.deterministic
            && (math != sys::cudnnMathType_t::CUDNN_FMA_MATH
                || c.math == sys::cudnnMathType_t::CUDNN_FMA_MATH)
    };
    let most = limit.most.unwrap_or(usize::MAX);
    let fitting = offered
        .iter()
        .filter(usable)
        .find(|c| c.memory <= limit.preferred_bytes());
    let smallest = || {
        offered
            .iter()
            .filter(usable)
            .min_by_key(|c| c.memory)
            .filter(|c| c.memory <= most)
    };
    match fitting.or_else(smallest) {
        Some(c) => Ok((c.algo, c.memory)),
        None => {
            // Usable algorithms that all need more workspace than the
            // budget leaves: a memory error, not a cuDNN one.
            let memory = offered.iter().any(|c| usable(&c));
            let list: Vec<String> = offered
                .iter()
                .map(|c| {
                    format!(
                        "{:?} {:?} {} {} bytes {:?}",
                        c.algo,
                        c.status,
                        if c.deterministic {
                            "deterministic"
                        } else {
                            "non-deterministic"
                        },
                        c.memory,
                        c.math
                    )
                })
                .collect();
            let why = format!(
                "cuDNN choosing a {what} algorithm: no deterministic algorithm fits in {most} bytes of workspace; offered: [{}]",
                list.join("; ")
            );
            Err(match memory {
                true => Error::OutOfMemory(why),
                false => Error::Cuda(why),
            })
        }
    }
}

/// One 3x3, padding-1 convolution of a fixed shape: descriptors, the
/// chosen forward and backward-data algorithms, and their workspace needs.
pub(crate) struct CudnnConv {
    x_fwd: TensorDesc,
    y_fwd: TensorDesc,
    x_bwd: TensorDesc,
    y_bwd: TensorDesc,
    w: FilterDesc,
    conv: ConvDesc,
    fwd: sys::cudnnConvolutionFwdAlgo_t,
    bwd: sys::cudnnConvolutionBwdDataAlgo_t,
    /// Images of the forward batch.
    pub forward_images: usize,
    /// Workspace bytes the larger of the two needs.
    pub workspace: usize,
}

// SAFETY: descriptors are plain host structs; a CudnnConv is only used
// under its per-shape plan's mutex, with the device's cuDNN handle held.
unsafe impl Send for CudnnConv {}

/// Algorithms offered at most, per query.
const OFFERED: usize = 16;

impl CudnnConv {
    /// Forward runs on `fwd_images` (pred and target), backward-data on
    /// `bwd_images` (pred only); `tf32` lets f32 convolutions use TF32.
    /// Algorithms come from cuDNN's heuristics, or, given `scratch`, from
    /// timing each on the device (slower to plan, often faster to run).
    pub(crate) fn new(
        handle: &Handle,
        dtype: DType,
        (fwd_images, bwd_images): (usize, usize),
        (c_in, c_out, h, w): (usize, usize, usize, usize),
        tf32: bool,
        limit: WorkspaceLimit,
        scratch: Option<Scratch>,
    ) -> Result<Self> {
        let filter = FilterDesc(
            result::create_filter_descriptor()
                .map_err(|e| err("creating a filter descriptor", e))?,
        );
        let desc = ConvDesc(
            result::create_convolution_descriptor()
                .map_err(|e| err("creating a convolution descriptor", e))?,
        );
        let math = match (dtype, tf32) {
            (DType::F32, false) => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            (DType::F32, true) => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        };
        // SAFETY: freshly created descriptors; f32 accumulation for every dtype.
        unsafe {
            result::set_filter4d_descriptor(
                filter.0,
                data_type(dtype),
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                [c_out as i32, c_in as i32, 3, 3],
            )
            .map_err(|e| err("describing the filter", e))?;
            result::set_convolution2d_descriptor(
                desc.0,
                1,
                1,
                1,
                1,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(|e| err("describing the convolution", e))?;
            result::set_convolution_math_type(desc.0, math)
                .map_err(|e| err("setting the math type", e))?;
        }
        let mut conv = CudnnConv {
            x_fwd: nhwc(dtype, fwd_images, c_in, h, w)?,
            y_fwd: nhwc(dtype, fwd_images, c_out, h, w)?,
            x_bwd: nhwc(dtype, bwd_images, c_in, h, w)?,
            y_bwd: nhwc(dtype, bwd_images, c_out, h, w)?,
            w: filter,
            conv: desc,
            fwd: sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            bwd: sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
            forward_images: fwd_images,
            workspace: 0,
        };
        // Scratch layout: filter, then the layer's input, then its output.
        let elem = dtype.size() as u64;
        let regions = scratch.map(|s| {
            let x = s.data + (c_out * c_in * 9) as u64 * elem;
            (s, x, x + (fwd_images * c_in * h * w) as u64 * elem)
        });
        let mut count = 0;
        // SAFETY: live handle and descriptors; the output arrays hold
        // OFFERED entries; scratch regions hold the described tensors.
        unsafe {
            let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; OFFERED] = std::mem::zeroed();
            match regions {
                Some((s, x, y)) => sys::cudnnFindConvolutionForwardAlgorithmEx(
                    handle.0,
                    conv.x_fwd.0,
                    x as *const c_void,
                    conv.w.0,
                    s.data as *const c_void,
                    conv.conv.0,
                    conv.y_fwd.0,
                    y as *mut c_void,
                    OFFERED as i32,
                    &mut count,
                    perf.as_mut_ptr(),
                    s.workspace as *mut c_void,
                    s.workspace_bytes,
                )
                .result(),
                None => result::get_convolution_forward_algorithm(
                    handle.0,
                    conv.x_fwd.0,
                    conv.w.0,
                    conv.conv.0,
                    conv.y_fwd.0,
                    OFFERED as i32,
                    &mut count,
                    perf.as_mut_ptr(),
                ),
            }
            .map_err(|e| err("choosing a forward algorithm", e))?;
            let offered = candidates!(perf[..count.clamp(0, OFFERED as i32) as usize]);
            conv.fwd = choose("forward", &offered, math, limit)?.0;
            let mut perf: [sys::cudnnConvolutionBwdDataAlgoPerf_t; OFFERED] = std::mem::zeroed();
            match regions {
                Some((s, dx, dy)) => sys::cudnnFindConvolutionBackwardDataAlgorithmEx(
                    handle.0,
                    conv.w.0,
                    s.data as *const c_void,
                    conv.y_bwd.0,
                    dy as *const c_void,
                    conv.conv.0,
                    conv.x_bwd.0,
                    dx as *mut c_void,
                    OFFERED as i32,
                    &mut count,
                    perf.as_mut_ptr(),
                    s.workspace as *mut c_void,
                    s.workspace_bytes,
                )
                .result(),
                None => result::get_convolution_backward_data_algorithm(
                    handle.0,
                    conv.w.0,
                    conv.y_bwd.0,
                    conv.conv.0,
                    conv.x_bwd.0,
                    OFFERED as i32,
                    &mut count,
                    perf.as_mut_ptr(),
                ),
            }
            .map_err(|e| err("choosing a backward-data algorithm", e))?;
            let offered = candidates!(perf[..count.clamp(0, OFFERED as i32) as usize]);
            conv.bwd = choose("backward-data", &offered, math, limit)?.0;
            let f = result::get_convolution_forward_workspace_size(
                handle.0,
                conv.x_fwd.0,
                conv.w.0,
                conv.conv.0,
                conv.y_fwd.0,
                conv.fwd,
            )
            .map_err(|e| err("sizing the forward workspace", e))?;
            let b = result::get_convolution_backward_data_workspace_size(
                handle.0,
                conv.w.0,
                conv.y_bwd.0,
                conv.conv.0,
                conv.x_bwd.0,
                conv.bwd,
            )
            .map_err(|e| err("sizing the backward workspace", e))?;
            conv.workspace = f.max(b);
        }
        Ok(conv)
    }

    /// Bytes of scratch [`CudnnConv::new`] reads and writes when timing
    /// algorithms for this layer shape (besides the workspace).
    pub(crate) fn scratch_bytes(
        dtype: DType,
        fwd_images: usize,
        (c_in, c_out, h, w): (usize, usize, usize, usize),
    ) -> usize {
        (c_out * c_in * 9 + fwd_images * (c_in + c_out) * h * w) * dtype.size()
    }

    /// The chosen algorithms and workspace, for the plan log.
    pub(crate) fn describe(&self) -> String {
        format!(
            "forward {:?}, backward-data {:?}, workspace {} bytes",
            self.fwd, self.bwd, self.workspace
        )
    }

    /// y = conv(x) over the forward batch (no bias).
    ///
    /// # Safety
    /// Device addresses of the planned shapes; `workspace` holds `self.workspace` bytes.
    pub(crate) unsafe fn forward(
        &self,
        handle: &Handle,
        x: u64,
        weight: u64,
        y: u64,
        workspace: u64,
    ) -> Result<()> {
        let (one, zero) = (1.0f32, 0.0f32);
        result::convolution_forward(
            handle.0,
            (&one as *const f32).cast(),
            self.x_fwd.0,
            x as *const c_void,
            self.w.0,
            weight as *const c_void,
            self.conv.0,
            self.fwd,
            workspace as *mut c_void,
            self.workspace,
            (&zero as *const f32).cast(),
            self.y_fwd.0,
            y as *mut c_void,
        )
        .map_err(|e| err("convolution forward", e))
    }

    /// dx = conv^T(dy) over the backward batch.
    ///
    /// # Safety
    /// As for [`CudnnConv::forward`].
    pub(crate) unsafe fn backward_data(
        &self,
        handle: &Handle,
        weight: u64,
        dy: u64,
        dx: u64,
        workspace: u64,
    ) -> Result<()> {
        let (one, zero) = (1.0f32, 0.0f32);
        result::convolution_backward_data(
            handle.0,
            (&one as *const f32).cast(),
            self.w.0,
            weight as *const c_void,
            self.y_bwd.0,
            dy as *const c_void,
            self.conv.0,
            self.bwd,
            workspace as *mut c_void,
            self.workspace,
            (&zero as *const f32).cast(),
            self.x_bwd.0,
            dx as *mut c_void,
        )
        .map_err(|e| err("convolution backward-data", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cudnnMathType_t::{CUDNN_DEFAULT_MATH, CUDNN_FMA_MATH, CUDNN_TENSOR_OP_MATH};
    use sys::cudnnStatus_t::{CUDNN_STATUS_NOT_SUPPORTED, CUDNN_STATUS_SUCCESS};

    fn offer(
        algo: i32,
        deterministic: bool,
        memory: usize,
        math: sys::cudnnMathType_t,
    ) -> Candidate<i32> {
        Candidate {
            algo,
            status: CUDNN_STATUS_SUCCESS,
            deterministic,
            memory,
            math,
        }
    }

    const PREFER_100: WorkspaceLimit = WorkspaceLimit {
        preferred: 100,
        most: None,
    };
    const BUDGET_100: WorkspaceLimit = WorkspaceLimit {
        preferred: 100,
        most: Some(100),
    };

    #[test]
    fn the_first_usable_algorithm_within_the_workspace_wins() {
        let mut failed = offer(0, true, 0, CUDNN_TENSOR_OP_MATH);
        failed.status = CUDNN_STATUS_NOT_SUPPORTED;
        let offered = [
            failed,
            offer(1, false, 0, CUDNN_TENSOR_OP_MATH), // not deterministic
            offer(2, true, 500, CUDNN_TENSOR_OP_MATH), // over the workspace
            offer(3, true, 80, CUDNN_TENSOR_OP_MATH),
            offer(4, true, 0, CUDNN_TENSOR_OP_MATH),
        ];
        let pick = |limit| choose("forward", &offered, CUDNN_TENSOR_OP_MATH, limit).unwrap();
        assert_eq!(pick(PREFER_100), (3, 80));
        assert_eq!(pick(BUDGET_100), (3, 80));
    }

    #[test]
    fn tf32_off_takes_only_fma_algorithms() {
        let offered = [
            offer(1, true, 0, CUDNN_DEFAULT_MATH),
            offer(2, true, 10, CUDNN_FMA_MATH),
        ];
        assert_eq!(
            choose("forward", &offered, CUDNN_FMA_MATH, PREFER_100).unwrap(),
            (2, 10)
        );
        // With TF32 allowed, the first one is fine.
        assert_eq!(
            choose("forward", &offered, CUDNN_DEFAULT_MATH, PREFER_100).unwrap(),
            (1, 0)
        );
    }

    #[test]
    fn over_the_preferred_workspace_the_smallest_within_the_budget_wins() {
        let offered = [
            offer(1, true, 900, CUDNN_FMA_MATH),
            offer(2, false, 0, CUDNN_FMA_MATH),
            offer(3, true, 300, CUDNN_FMA_MATH),
        ];
        assert_eq!(
            choose("backward-data", &offered, CUDNN_FMA_MATH, PREFER_100).unwrap(),
            (3, 300)
        );
        // A budget with room for it lets the preference give way too.
        let roomy = WorkspaceLimit {
            preferred: 100,
            most: Some(300),
        };
        assert_eq!(
            choose("backward-data", &offered, CUDNN_FMA_MATH, roomy).unwrap(),
            (3, 300)
        );
        let e = choose("backward-data", &offered, CUDNN_FMA_MATH, BUDGET_100).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(_)), "a memory error: {e}");
        let e = e.to_string();
        assert!(e.contains("choosing a backward-data algorithm"), "{e}");
        assert!(
            e.contains("no deterministic algorithm fits in 100 bytes"),
            "{e}"
        );
        assert!(
            e.contains("2 CUDNN_STATUS_SUCCESS non-deterministic 0 bytes"),
            "{e}"
        );
    }
}
