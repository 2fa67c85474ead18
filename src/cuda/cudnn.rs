//! The slice of cuDNN the perceptual loss uses: NHWC 3x3 convolutions,
//! forward and backward-data, with owned descriptors and a plan per layer
//! shape whose algorithms are chosen once. Built on cudarc's `result`
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
        // SAFETY: a live handle and a stream of the current context.
        unsafe { result::set_stream(h, stream as sys::cudaStream_t) }
            .map_err(|e| err("setting the stream", e))?;
        Ok(handle)
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

/// Algorithms are taken from cuDNN's heuristics: the first deterministic
/// one (so the gradient, too, is reproducible) that fits the workspace
/// allowed, at most this.
pub(crate) const MAX_WORKSPACE: usize = 256 << 20;

/// One 3x3, padding-1 convolution of a fixed shape: descriptors, the
/// chosen forward and backward-data algorithms, and their workspace needs.
pub(crate) struct ConvPlan {
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

// SAFETY: descriptors are plain host structs; a plan is only used under the
// owning loss's mutex, with the device's cuDNN handle held.
unsafe impl Send for ConvPlan {}

impl ConvPlan {
    /// Forward runs on `fwd_images` (pred and target), backward-data on
    /// `bwd_images` (pred only); `tf32` lets f32 convolutions use TF32;
    /// each algorithm needs at most `max_workspace` bytes.
    pub(crate) fn new(
        handle: &Handle,
        dtype: DType,
        (fwd_images, bwd_images): (usize, usize),
        (c_in, c_out, h, w): (usize, usize, usize, usize),
        tf32: bool,
        max_workspace: usize,
    ) -> Result<Self> {
        let filter = FilterDesc(
            result::create_filter_descriptor()
                .map_err(|e| err("creating a filter descriptor", e))?,
        );
        let conv = ConvDesc(
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
                conv.0,
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
            result::set_convolution_math_type(conv.0, math)
                .map_err(|e| err("setting the math type", e))?;
        }
        let mut plan = ConvPlan {
            x_fwd: nhwc(dtype, fwd_images, c_in, h, w)?,
            y_fwd: nhwc(dtype, fwd_images, c_out, h, w)?,
            x_bwd: nhwc(dtype, bwd_images, c_in, h, w)?,
            y_bwd: nhwc(dtype, bwd_images, c_out, h, w)?,
            w: filter,
            conv,
            fwd: sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            bwd: sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
            forward_images: fwd_images,
            workspace: 0,
        };
        let fits = |status: sys::cudnnStatus_t,
                    det: sys::cudnnDeterminism_t,
                    memory: usize,
                    m: sys::cudnnMathType_t| {
            status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                && det == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC
                && memory <= max_workspace
                && (math != sys::cudnnMathType_t::CUDNN_FMA_MATH
                    || m == sys::cudnnMathType_t::CUDNN_FMA_MATH)
        };
        // SAFETY: live handle and descriptors; the output arrays hold `cap` entries.
        unsafe {
            const CAP: usize = 16;
            let mut count = 0;
            let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; CAP] = std::mem::zeroed();
            result::get_convolution_forward_algorithm(
                handle.0,
                plan.x_fwd.0,
                plan.w.0,
                plan.conv.0,
                plan.y_fwd.0,
                CAP as i32,
                &mut count,
                perf.as_mut_ptr(),
            )
            .map_err(|e| err("choosing a forward algorithm", e))?;
            let best = perf[..count.max(0) as usize]
                .iter()
                .find(|p| fits(p.status, p.determinism, p.memory, p.mathType))
                .ok_or_else(|| {
                    err(
                        "choosing a forward algorithm",
                        format!(
                            "no deterministic algorithm fits in {max_workspace} bytes of workspace"
                        ),
                    )
                })?;
            plan.fwd = best.algo;
            let mut perf: [sys::cudnnConvolutionBwdDataAlgoPerf_t; CAP] = std::mem::zeroed();
            result::get_convolution_backward_data_algorithm(
                handle.0,
                plan.w.0,
                plan.y_bwd.0,
                plan.conv.0,
                plan.x_bwd.0,
                CAP as i32,
                &mut count,
                perf.as_mut_ptr(),
            )
            .map_err(|e| err("choosing a backward-data algorithm", e))?;
            let best = perf[..count.max(0) as usize]
                .iter()
                .find(|p| fits(p.status, p.determinism, p.memory, p.mathType))
                .ok_or_else(|| {
                    err(
                        "choosing a backward-data algorithm",
                        format!(
                            "no deterministic algorithm fits in {max_workspace} bytes of workspace"
                        ),
                    )
                })?;
            plan.bwd = best.algo;
            let f = result::get_convolution_forward_workspace_size(
                handle.0,
                plan.x_fwd.0,
                plan.w.0,
                plan.conv.0,
                plan.y_fwd.0,
                plan.fwd,
            )
            .map_err(|e| err("sizing the forward workspace", e))?;
            let b = result::get_convolution_backward_data_workspace_size(
                handle.0,
                plan.w.0,
                plan.y_bwd.0,
                plan.conv.0,
                plan.x_bwd.0,
                plan.bwd,
            )
            .map_err(|e| err("sizing the backward workspace", e))?;
            plan.workspace = f.max(b);
        }
        Ok(plan)
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
    /// As for [`ConvPlan::forward`].
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
