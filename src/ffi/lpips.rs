//! `pl_lpips`: LPIPS v0.1 over loaded VGG16 weights (docs/design.md,
//! "LPIPS").

use super::args::{check_host_span, dtype_of, input_view, pl_dtype, pl_outputs, shape_of};
use super::context::Streams;
use super::guard::guard;
use super::handle::{borrow, destroy, give, out_param, Handle};
use super::options::{self, check_aligned, released};
use super::perceptual::{keep_target, loss_call};
use super::status::pl_status;
use super::vgg::pl_vgg;
use crate::error::Error;
use crate::tensor::{Element, PerDType};
use crate::{DType, LinWeights, Lpips, LpipsConfig, Shape, TensorMut, TensorRef};
use std::ffi::{c_char, c_void, CStr};
use std::sync::Arc;

/// LPIPS options. Initialise with `pl_lpips_config_init`, which writes
/// `lpips.LPIPS(net='vgg')`'s: the embedded v0.1 lin weights, inputs in
/// [-1, 1].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pl_lpips_config {
    /// sizeof(pl_lpips_config), as `pl_lpips_config_init` writes it.
    pub struct_size: usize,
    /// A safetensors file of lin weights (keys lin0..lin4), or NULL (the
    /// default) for the v0.1 weights embedded in the library.
    pub lin_weights_path: *const c_char,
    /// On CUDA, at most this many images at a time; 0 (the default) for
    /// the whole batch.
    pub max_chunk_images: usize,
    /// On CUDA, device bytes one call may hold; 0 (the default) for no limit.
    pub memory_budget_bytes: usize,
    /// Nonzero: inputs in [0, 1], mapped to [-1, 1] first (LPIPS's
    /// `normalize=True`). Default 0.
    pub normalize: i32,
    /// Zero: every channel weight 1 (`lin=False`); default 1.
    pub lin: i32,
    /// Multiplies every distance and the gradient; default 1.
    pub weight: f32,
    /// Nonzero: a NaN or infinite input is an error. Default 0.
    pub check_finite: i32,
    /// Nonzero lets f32 convolutions on CUDA use TF32; default 0.
    pub allow_tf32: i32,
    /// Nonzero: on CUDA, distances are replayed from CUDA graphs, as
    /// `pl_perceptual_config.cuda_graphs` (not the spatial map). Default 0
    /// (this field was `reserved`, which had to be 0).
    pub cuda_graphs: i32,
}

released!(pl_lpips_config, last cuda_graphs: i32, {
    lin_weights_path: std::ptr::null(),
    max_chunk_images: 0,
    memory_budget_bytes: 0,
    normalize: 0,
    lin: 1,
    weight: 1.0,
    check_finite: 0,
    allow_tf32: 0,
    cuda_graphs: 0,
});

/// An LPIPS metric; it keeps its VGG alive and runs on its context's
/// current stream.
pub struct pl_lpips {
    lpips: Lpips,
    streams: Arc<Streams>,
}

impl Handle for pl_lpips {
    const NAME: &'static str = "pl_lpips";
}

/// The Rust config of a C one.
///
/// # Safety
/// `lin_weights_path` must be NULL or a NUL-terminated string.
unsafe fn lpips_config(c: &pl_lpips_config) -> Result<LpipsConfig, Error> {
    let lin = match (c.lin, c.lin_weights_path.is_null()) {
        (0, true) => LinWeights::ones(),
        (0, false) => {
            return Err(Error::arg(
                "config.lin is 0 (all weights 1) but config.lin_weights_path is given",
            ))
        }
        (_, true) => LinWeights::v0_1(),
        (_, false) => {
            let path = CStr::from_ptr(c.lin_weights_path)
                .to_string_lossy()
                .into_owned();
            LinWeights::from_file(std::path::Path::new(&path))?
        }
    };
    Ok(LpipsConfig {
        normalize: c.normalize != 0,
        lin,
        weight: c.weight,
        max_chunk_images: (c.max_chunk_images > 0).then_some(c.max_chunk_images),
        memory_budget: (c.memory_budget_bytes > 0).then_some(c.memory_budget_bytes),
        allow_tf32: c.allow_tf32 != 0,
        check_finite: c.check_finite != 0,
        cuda_graphs: c.cuda_graphs != 0,
    })
}

/// Writes the defaults to `config`.
///
/// # Safety
/// `config` must be NULL or a writable `pl_lpips_config`.
#[no_mangle]
pub unsafe extern "C" fn pl_lpips_config_init(config: *mut pl_lpips_config) -> pl_status {
    guard(|| options::init(config, "config"))
}

/// Creates LPIPS over `vgg` (VGG16, loaded to relu5_3 at least) with
/// `config` (NULL = the defaults). A lin weights file is read now.
///
/// # Safety
/// `vgg` must be a live handle, `config` NULL or valid, `out` writable.
#[no_mangle]
pub unsafe extern "C" fn pl_lpips_create(
    vgg: *mut pl_vgg,
    config: *const pl_lpips_config,
    out: *mut *mut pl_lpips,
) -> pl_status {
    guard(|| {
        let vgg = borrow(vgg, "vgg")?;
        let out = out_param(out, "out")?;
        let config = lpips_config(&options::read(config, "config")?)?;
        let lpips = Lpips::new(vgg.vgg.clone(), &config)?;
        let streams = vgg.streams.clone();
        give(pl_lpips { lpips, streams }, out);
        Ok(())
    })
}

/// Destroys an LPIPS metric; NULL is ignored.
///
/// # Safety
/// `lpips` must be NULL or a handle from `pl_lpips_create`, not used again.
#[no_mangle]
pub unsafe extern "C" fn pl_lpips_destroy(lpips: *mut pl_lpips) {
    destroy(lpips)
}

/// LPIPS distances of `pred` to the constant `target` (contiguous NCHW, c
/// = 1 or 3, H and W of at least 16, same dtype): `out->per_sample` gets
/// each image's distance, `out->loss` their mean, `out->grad` (if given)
/// the mean's gradient w.r.t. pred. A NULL `target` means the one
/// `pl_lpips_set_target` kept.
///
/// # Safety
/// As `pl_perceptual_loss`.
#[no_mangle]
pub unsafe extern "C" fn pl_lpips_loss(
    lpips: *mut pl_lpips,
    pred: *const c_void,
    target: *const c_void,
    dtype: pl_dtype,
    n: i64,
    c: i64,
    h: i64,
    w: i64,
    out: *const pl_outputs,
) -> pl_status {
    guard(|| {
        let handle = borrow(lpips, "lpips")?;
        let loss = handle.lpips.perceptual();
        loss_call(
            loss,
            &handle.streams,
            (pred, target),
            dtype,
            [n, c, h, w],
            out,
        )
    })
}

/// Keeps `target` for `pl_lpips_loss` calls with a NULL target (as
/// `pl_perceptual_set_target`).
///
/// # Safety
/// As `pl_perceptual_set_target`.
#[no_mangle]
pub unsafe extern "C" fn pl_lpips_set_target(
    lpips: *mut pl_lpips,
    target: *const c_void,
    dtype: pl_dtype,
    n: i64,
    c: i64,
    h: i64,
    w: i64,
) -> pl_status {
    guard(|| {
        let handle = borrow(lpips, "lpips")?;
        let loss = handle.lpips.perceptual();
        keep_target(loss, &handle.streams, target, dtype, [n, c, h, w])
    })
}

/// Drops the target `pl_lpips_set_target` kept.
///
/// # Safety
/// `lpips` must be a live handle.
#[no_mangle]
pub unsafe extern "C" fn pl_lpips_clear_target(lpips: *mut pl_lpips) -> pl_status {
    guard(|| borrow(lpips, "lpips")?.lpips.clear_target())
}

/// The spatial LPIPS map and per-layer distances of `pred` against
/// `target` (as `lpips.LPIPS(spatial=True)` and `retPerLayer=True`): into
/// `map` n*h*w floats (each image's layers' per-pixel values resized
/// bilinearly to h x w and summed) and, when not NULL, `layers` n*5 floats.
/// Its gradient is `pl_lpips_spatial_backward`'s. On a CUDA context
/// everything is device memory, the call is queued on the context's
/// stream, and the outputs must not overlap the inputs; each call
/// allocates scratch, so it cannot be captured.
///
/// # Safety
/// `lpips` must be a live handle; `pred` and `target` must address
/// n*c*h*w elements of `dtype`, `map` n*h*w floats and `layers` NULL or
/// n*5 floats, on the context's device.
#[no_mangle]
pub unsafe extern "C" fn pl_lpips_spatial(
    lpips: *mut pl_lpips,
    pred: *const c_void,
    target: *const c_void,
    dtype: pl_dtype,
    n: i64,
    c: i64,
    h: i64,
    w: i64,
    map: *mut f32,
    layers: *mut f32,
) -> pl_status {
    guard(|| {
        let handle = borrow(lpips, "lpips")?;
        let (dtype, shape) = (dtype_of(dtype)?, shape_of(n, c, h, w)?);
        let device = handle.streams.current()?;
        if map.is_null() {
            return Err(Error::arg("map is NULL"));
        }
        let map_shape = Shape::new(shape.n, 1, shape.h, shape.w);
        let layers_shape = Shape::new(shape.n, 5, 1, 1);
        if let Some(ordinal) = device.ordinal() {
            let p = input_view(&device, pred, (dtype, shape), "pred")?;
            let t = input_view(&device, target, (dtype, shape), "target")?;
            let out =
                |ptr: *mut f32, s| TensorMut::from_raw_cuda(ptr as u64, ordinal, DType::F32, s);
            let layers = (!layers.is_null()).then(|| out(layers, layers_shape));
            return (handle.lpips).spatial_into_on(&device, &p, &t, out(map, map_shape), layers);
        }
        // The outputs checked as `views` checks a call's, before any work.
        for (ptr, s, what) in [(map, map_shape, "map"), (layers, layers_shape, "layers")] {
            if !ptr.is_null() {
                check_aligned(ptr.cast_const().cast(), 4, what)?;
                check_host_span(ptr as u64, 4 * s.numel()?, what)?;
            }
        }
        // Computed before anything is written, and the input views gone
        // by then (an output may alias an input).
        let maps = {
            let p = input_view(&device, pred, (dtype, shape), "pred")?;
            let t = input_view(&device, target, (dtype, shape), "target")?;
            handle.lpips.spatial(&p, &t)?
        };
        std::ptr::copy_nonoverlapping(maps.map.as_ptr(), map, maps.map.len());
        if !layers.is_null() {
            let flat: Vec<f32> = maps.layers.iter().flatten().copied().collect();
            std::ptr::copy_nonoverlapping(flat.as_ptr(), layers, flat.len());
        }
        Ok(())
    })
}

/// The gradient w.r.t. `pred` of the map `pl_lpips_spatial` gives, from
/// `map_grad` (n*h*w floats, dL/dmap): into `grad`, n*c*h*w elements of
/// `dtype` (0 at a pixel whose features are all 0). On a CPU context
/// `grad` may be `pred` itself; on a CUDA context everything is device
/// memory, `grad` must not overlap an input, and the call is queued as
/// `pl_lpips_spatial`'s.
///
/// # Safety
/// `lpips` must be a live handle; `pred`, `target` and `grad` must address
/// n*c*h*w elements of `dtype`, and `map_grad` n*h*w floats, on the
/// context's device.
#[no_mangle]
pub unsafe extern "C" fn pl_lpips_spatial_backward(
    lpips: *mut pl_lpips,
    pred: *const c_void,
    target: *const c_void,
    dtype: pl_dtype,
    n: i64,
    c: i64,
    h: i64,
    w: i64,
    map_grad: *const f32,
    grad: *mut c_void,
) -> pl_status {
    guard(|| {
        let handle = borrow(lpips, "lpips")?;
        let (dtype, shape) = (dtype_of(dtype)?, shape_of(n, c, h, w)?);
        let device = handle.streams.current()?;
        if grad.is_null() {
            return Err(Error::arg("grad is NULL"));
        }
        let map_shape = Shape::new(shape.n, 1, shape.h, shape.w);
        let views = || -> Result<_, Error> {
            Ok((
                input_view(&device, pred, (dtype, shape), "pred")?,
                input_view(&device, target, (dtype, shape), "target")?,
                input_view(
                    &device,
                    map_grad.cast(),
                    (DType::F32, map_shape),
                    "map_grad",
                )?,
            ))
        };
        if let Some(ordinal) = device.ordinal() {
            let (p, t, g) = views()?;
            let out = TensorMut::from_raw_cuda(grad as u64, ordinal, dtype, shape);
            return (handle.lpips).spatial_backward_on(&device, &p, &t, &g, out);
        }
        let bytes = shape.bytes(dtype)?;
        check_aligned(grad.cast_const(), dtype.size(), "grad")?;
        check_host_span(grad as u64, bytes, "grad")?;
        // Computed into a buffer of its own, then copied (the input views
        // gone by then): grad may alias an input.
        let staged = {
            let (p, t, g) = views()?;
            dtype.dispatch(MapGrad {
                lpips: &handle.lpips,
                pred: &p,
                target: &t,
                map_grad: &g,
            })?
        };
        std::ptr::copy_nonoverlapping(staged.as_ptr(), grad.cast::<u8>(), bytes);
        Ok(())
    })
}

/// `Lpips::spatial_backward` into a buffer of pred's element type, as bytes.
struct MapGrad<'a, 't> {
    lpips: &'a Lpips,
    pred: &'a TensorRef<'t>,
    target: &'a TensorRef<'t>,
    map_grad: &'a TensorRef<'t>,
}

impl PerDType for MapGrad<'_, '_> {
    type Output = Result<Vec<u8>, Error>;

    fn run<T: Element>(self) -> Self::Output {
        let s = self.pred.shape();
        let mut out = crate::fallible::filled(s.numel()?, T::from_f64(0.0), "the gradient")?;
        let grad = TensorMut::host(&mut out, s)?;
        (self.lpips).spatial_backward(self.pred, self.target, self.map_grad, grad)?;
        let bytes = crate::tensor::as_bytes(&out);
        let mut staged = crate::fallible::filled(bytes.len(), 0u8, "the staged gradient")?;
        staged.copy_from_slice(bytes);
        Ok(staged)
    }
}
