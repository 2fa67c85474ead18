//! `pl_perceptual`: a VGG perceptual loss over loaded weights
//! (docs/design.md, "Perceptual loss").

use super::args::{dtype_of, input_view, pl_dtype, pl_outputs, shape_of, views};
use super::context::Streams;
use super::feature::{criterion_of, pl_criterion, PL_MSE};
use super::guard::guard;
use super::handle::{borrow, destroy, give, out_param, Handle};
use super::options::{self, released};
use super::status::pl_status;
use super::vgg::pl_vgg;
use crate::error::{Error, Result};
use crate::vgg::Pooling;
use crate::{DType, InputNorm, PerceptualConfig, PerceptualLoss, PlanReport, Shape, Tap, VggArch};
use std::ffi::{c_char, c_void, CStr};
use std::sync::Arc;

/// Input normalisation of a perceptual loss.
pub type pl_input_norm = i32;
/// Inputs used as given (the default).
pub const PL_NORM_NONE: pl_input_norm = 0;
/// ImageNet mean/std, inputs in [0, 1].
pub const PL_NORM_IMAGENET: pl_input_norm = 1;
/// Inputs in [-1, 1] mapped to [0, 1], then ImageNet mean/std.
pub const PL_NORM_IMAGENET_FROM_PM1: pl_input_norm = 2;
/// Inputs in [-1, 1] mapped to [0, 1] only.
pub const PL_NORM_FROM_PM1: pl_input_norm = 3;

/// Pooling of the VGG network.
pub type pl_pooling = i32;
/// Max-pooling (the default).
pub const PL_POOL_MAX: pl_pooling = 0;
/// Average pooling.
pub const PL_POOL_AVG: pl_pooling = 1;

/// The article's taps: relu1_2, relu2_2, relu3_3, relu4_3.
static DEFAULT_TAPS: [i32; 4] = [3, 8, 15, 22];

/// Perceptual loss options. Initialise with `pl_perceptual_config_init`,
/// which writes the article's configuration.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pl_perceptual_config {
    /// sizeof(pl_perceptual_config), as `pl_perceptual_config_init` writes it.
    pub struct_size: usize,
    /// Tapped module indices (torchvision `features`), or NULL when
    /// tap_names is given. Default: 3, 8, 15, 22 (relu1_2, relu2_2,
    /// relu3_3, relu4_3), an array owned by the library.
    pub taps: *const i32,
    /// Tapped module names such as "relu3_3" or "conv5_4", or NULL when
    /// taps is given; give one of the two. Default NULL.
    pub tap_names: *const *const c_char,
    /// Number of entries in taps or tap_names, 0 to 37 (distinct modules);
    /// default 4. 0: no perceptual terms (a style loss alone; taps and
    /// tap_names are then not read).
    pub num_taps: usize,
    /// One weight per tap, or NULL (the default) for all 1.
    pub tap_weights: *const f32,
    /// Number of entries in tap_weights: num_taps, or 0 when tap_weights
    /// is NULL.
    pub num_tap_weights: usize,
    /// PL_MSE (default), PL_MAE or PL_FRO (on CUDA, one chunk).
    pub criterion: pl_criterion,
    /// PL_NORM_NONE (default), PL_NORM_IMAGENET, PL_NORM_IMAGENET_FROM_PM1
    /// or PL_NORM_FROM_PM1.
    pub input_norm: pl_input_norm,
    /// PL_POOL_MAX (default) or PL_POOL_AVG.
    pub pooling: pl_pooling,
    /// Overall weight; default 1 (0 is a valid weight: a zero loss).
    pub weight: f32,
    /// Nonzero lets f32 convolutions on CUDA use TF32; default 0.
    pub allow_tf32: i32,
    /// Nonzero: a NaN or infinite pred or target is an error naming the
    /// first such element (one more pass; on CUDA the call then waits).
    /// Default 0.
    pub check_finite: i32,
    /// On CUDA, at most this many images at a time; 0 (the default) for
    /// the whole batch.
    pub max_chunk_images: usize,
    /// On CUDA, device bytes one call may hold for buffers and cuDNN
    /// workspace (the batch is chunked to fit); 0 (the default) for no limit.
    pub memory_budget_bytes: usize,
    /// Style (Gram) taps by module index, or NULL; the fields from here on
    /// were added in the struct's second version (a caller built against
    /// the first gets no style terms). Default NULL. CPU only.
    pub style_taps: *const i32,
    /// Style taps by name, or NULL; at most one of the two. Default NULL.
    pub style_tap_names: *const *const c_char,
    /// Number of style taps, 0 (the default: no style terms) to 37.
    pub num_style_taps: usize,
    /// One weight per style tap, or NULL (the default) for all 1.
    pub style_tap_weights: *const f32,
    /// Number of entries in style_tap_weights.
    pub num_style_tap_weights: usize,
    /// Distance between Gram matrices: PL_MSE (default), PL_MAE or PL_FRO.
    pub style_criterion: pl_criterion,
    /// The style part's weight; default 1.
    pub style_weight: f32,
    /// Nonzero: on CUDA, calls are replayed from CUDA graphs of the whole
    /// call (the second call of a shape is captured; the same results).
    /// Default 0; PERCEPTUAL_LOSS_CUDA_GRAPHS=1 or 0 overrides it. This
    /// and the next field were added in the struct's third version.
    pub cuda_graphs: i32,
    /// Write 0 (as `pl_perceptual_config_init` does).
    pub reserved: i32,
}

released!(pl_perceptual_config, since [style_taps, cuda_graphs], reserved reserved,
    last reserved: i32, {
    taps: DEFAULT_TAPS.as_ptr(),
    tap_names: std::ptr::null(),
    num_taps: DEFAULT_TAPS.len(),
    tap_weights: std::ptr::null(),
    num_tap_weights: 0,
    criterion: PL_MSE,
    input_norm: PL_NORM_NONE,
    pooling: PL_POOL_MAX,
    weight: 1.0,
    allow_tf32: 0,
    check_finite: 0,
    max_chunk_images: 0,
    memory_budget_bytes: 0,
    style_taps: std::ptr::null(),
    style_tap_names: std::ptr::null(),
    num_style_taps: 0,
    style_tap_weights: std::ptr::null(),
    num_style_tap_weights: 0,
    style_criterion: PL_MSE,
    style_weight: 1.0,
    cuda_graphs: 0,
    reserved: 0,
});

/// A perceptual loss; it keeps its VGG alive and runs on its context's
/// current stream.
pub struct pl_perceptual {
    loss: PerceptualLoss,
    streams: Arc<Streams>,
}

impl Handle for pl_perceptual {
    const NAME: &'static str = "pl_perceptual";
}

/// A list of taps as a config gives it: by index or by name, `count` of
/// them, and `num_weights` weights or none.
struct TapList {
    what: &'static str,
    ids: *const i32,
    names: *const *const c_char,
    count: usize,
    weights: *const f32,
    num_weights: usize,
}

impl TapList {
    /// The taps and their weights (empty for all 1).
    ///
    /// # Safety
    /// The arrays must hold their counts of entries; names must be
    /// NUL-terminated strings.
    unsafe fn read(&self) -> Result<(Vec<Tap>, Vec<f32>), Error> {
        let what = self.what;
        // Taps are distinct modules, so a larger count cannot be valid;
        // refusing it here keeps a garbage count from becoming a read past
        // the array.
        let modules = VggArch::Vgg19.module_count();
        if self.count > modules {
            return Err(Error::arg(format!(
                "config.num_{what}s is {}; there are at most {modules} distinct {what}s",
                self.count
            )));
        }
        let taps = match (self.count, self.ids.is_null(), self.names.is_null()) {
            (0, ..) => Vec::new(),
            (_, false, true) => std::slice::from_raw_parts(self.ids, self.count)
                .iter()
                .map(|&i| {
                    usize::try_from(i)
                        .map(Tap::Index)
                        .map_err(|_| Error::arg(format!("{what} {i} is negative")))
                })
                .collect::<Result<_, _>>()?,
            (_, true, false) => std::slice::from_raw_parts(self.names, self.count)
                .iter()
                .map(|&p| {
                    if p.is_null() {
                        return Err(Error::arg(format!("a {what} name is NULL")));
                    }
                    Ok(Tap::Name(CStr::from_ptr(p).to_string_lossy().into_owned()))
                })
                .collect::<Result<_, Error>>()?,
            (_, true, true) => {
                return Err(Error::arg(format!(
                    "config.{what}s and config.{what}_names are NULL"
                )))
            }
            (_, false, false) => {
                return Err(Error::arg(format!(
                    "give config.{what}s or config.{what}_names, not both"
                )))
            }
        };
        let weights = match (self.weights.is_null(), self.num_weights) {
            (true, 0) => Vec::new(),
            (true, n) => {
                return Err(Error::arg(format!(
                    "num_{what}_weights is {n} but {what}_weights is NULL"
                )))
            }
            (false, 0) => {
                return Err(Error::arg(format!(
                    "{what}_weights needs num_{what}_weights"
                )))
            }
            (false, n) if n != taps.len() => {
                return Err(Error::arg(format!(
                    "{} {what}s but {n} {what} weights",
                    taps.len()
                )))
            }
            (false, n) => std::slice::from_raw_parts(self.weights, n).to_vec(),
        };
        Ok((taps, weights))
    }
}

/// The Rust config of a C one.
///
/// # Safety
/// The arrays in `c` must hold their counts of entries; names must be
/// NUL-terminated strings.
unsafe fn perceptual_config(c: &pl_perceptual_config) -> Result<PerceptualConfig, Error> {
    let mut cfg = PerceptualConfig::default();
    (cfg.taps, cfg.tap_weights) = TapList {
        what: "tap",
        ids: c.taps,
        names: c.tap_names,
        count: c.num_taps,
        weights: c.tap_weights,
        num_weights: c.num_tap_weights,
    }
    .read()?;
    (cfg.style_taps, cfg.style_tap_weights) = TapList {
        what: "style_tap",
        ids: c.style_taps,
        names: c.style_tap_names,
        count: c.num_style_taps,
        weights: c.style_tap_weights,
        num_weights: c.num_style_tap_weights,
    }
    .read()?;
    cfg.criterion = criterion_of(c.criterion)?;
    cfg.style_criterion = criterion_of(c.style_criterion)?;
    cfg.style_weight = c.style_weight;
    cfg.input_norm = match c.input_norm {
        PL_NORM_NONE => InputNorm::None,
        PL_NORM_IMAGENET => InputNorm::Imagenet,
        PL_NORM_IMAGENET_FROM_PM1 => InputNorm::ImagenetFromPm1,
        PL_NORM_FROM_PM1 => InputNorm::FromPm1,
        v => return Err(Error::arg(format!("unknown pl_input_norm {v}"))),
    };
    cfg.pooling = match c.pooling {
        PL_POOL_MAX => Pooling::Max,
        PL_POOL_AVG => Pooling::Avg,
        v => return Err(Error::arg(format!("unknown pl_pooling {v}"))),
    };
    cfg.weight = c.weight;
    cfg.allow_tf32 = c.allow_tf32 != 0;
    cfg.check_finite = c.check_finite != 0;
    cfg.max_chunk_images = (c.max_chunk_images > 0).then_some(c.max_chunk_images);
    cfg.memory_budget = (c.memory_budget_bytes > 0).then_some(c.memory_budget_bytes);
    cfg.cuda_graphs = c.cuda_graphs != 0;
    Ok(cfg)
}

/// Writes the defaults to `config`: the article's loss (taps relu1_2,
/// relu2_2, relu3_3, relu4_3, unit weights, MSE, no normalisation,
/// max-pooling, weight 1), TF32 off, no chunking, no memory budget.
///
/// # Safety
/// `config` must be NULL or a writable `pl_perceptual_config`.
#[no_mangle]
pub unsafe extern "C" fn pl_perceptual_config_init(config: *mut pl_perceptual_config) -> pl_status {
    guard(|| options::init(config, "config"))
}

/// Creates a perceptual loss over `vgg` with `config` (NULL = the
/// defaults `pl_perceptual_config_init` writes). The arrays `config`
/// points to are copied: they may be freed when this returns.
///
/// # Safety
/// `vgg` must be a live handle, `config` NULL or valid, `out` writable.
#[no_mangle]
pub unsafe extern "C" fn pl_perceptual_create(
    vgg: *mut pl_vgg,
    config: *const pl_perceptual_config,
    out: *mut *mut pl_perceptual,
) -> pl_status {
    guard(|| {
        let vgg = borrow(vgg, "vgg")?;
        let out = out_param(out, "out")?;
        let config = perceptual_config(&options::read(config, "config")?)?;
        let loss = PerceptualLoss::new(vgg.vgg.clone(), &config)?;
        let streams = vgg.streams.clone();
        give(pl_perceptual { loss, streams }, out);
        Ok(())
    })
}

/// Destroys a perceptual loss; NULL is ignored.
///
/// # Safety
/// `loss` must be NULL or a handle from `pl_perceptual_create`, not used again.
#[no_mangle]
pub unsafe extern "C" fn pl_perceptual_destroy(loss: *mut pl_perceptual) {
    destroy(loss)
}

/// Perceptual loss of `pred` against the constant `target` (contiguous
/// NCHW, c = 1 or 3, same dtype), on the device its VGG was loaded for.
/// A NULL `target` means the one `pl_perceptual_set_target` kept.
/// Writes the loss and, as `out` asks, dL/dpred (in `dtype` and pred's
/// layout) and each image's loss. In PL_F16 the gradient of a mean over
/// many elements can fall below half precision's normal range (about
/// 6e-5): scale it with the config's `weight`.
///
/// # Safety
/// `loss` must be a live handle; `pred`, `target` and `out->grad` must
/// address n*c*h*w elements, `out->loss` one float and `out->per_sample` n
/// floats on that device; `out` must be valid.
#[no_mangle]
pub unsafe extern "C" fn pl_perceptual_loss(
    loss: *mut pl_perceptual,
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
        let handle = borrow(loss, "loss")?;
        loss_call(
            &handle.loss,
            &handle.streams,
            (pred, target),
            dtype,
            [n, c, h, w],
            out,
        )
    })
}

/// A loss call of `loss` (the perceptual loss or LPIPS's) on its context's
/// current stream: against `target`, or the kept target when it is NULL.
///
/// # Safety
/// As `pl_perceptual_loss`.
pub(super) unsafe fn loss_call(
    loss: &PerceptualLoss,
    streams: &Streams,
    (pred, target): (*const c_void, *const c_void),
    dtype: pl_dtype,
    [n, c, h, w]: [i64; 4],
    out: *const pl_outputs,
) -> Result<(), Error> {
    let (dtype, shape) = (dtype_of(dtype)?, shape_of(n, c, h, w)?);
    let device = streams.current()?;
    if target.is_null() {
        let call = views(&device, &[(pred, "pred")], dtype, shape, out)?;
        return loss.compute_resident_on(&device, &call.inputs[0], call.outputs);
    }
    let call = views(
        &device,
        &[(pred, "pred"), (target, "target")],
        dtype,
        shape,
        out,
    )?;
    let (p, t) = (&call.inputs[0], &call.inputs[1]);
    loss.compute_on(&device, p, t, call.outputs)
}

/// Keeps `target` for `loss` (the perceptual loss or LPIPS's), copied on
/// its context's current stream.
///
/// # Safety
/// As `pl_perceptual_set_target`.
pub(super) unsafe fn keep_target(
    loss: &PerceptualLoss,
    streams: &Streams,
    target: *const c_void,
    dtype: pl_dtype,
    [n, c, h, w]: [i64; 4],
) -> Result<(), Error> {
    let (dtype, shape) = (dtype_of(dtype)?, shape_of(n, c, h, w)?);
    let device = streams.current()?;
    let t = input_view(&device, target, (dtype, shape), "target")?;
    loss.set_target_on(&device, &t)
}

/// Keeps `target` (n x c x h x w of `dtype` on the loss's device) for
/// later `pl_perceptual_loss` calls with a NULL target, replacing one kept
/// before. What the loss needs is copied before this returns (the caller
/// may free or change `target` at once). A target of one image serves any
/// batch size; otherwise later preds have its n. The target's tap
/// features (and Grams) are computed now and kept (on CUDA on the device,
/// outside the memory budget): later calls run the network over pred
/// alone.
///
/// # Safety
/// `loss` must be a live handle; `target` must address n*c*h*w elements
/// of `dtype` on the loss's device.
#[no_mangle]
pub unsafe extern "C" fn pl_perceptual_set_target(
    loss: *mut pl_perceptual,
    target: *const c_void,
    dtype: pl_dtype,
    n: i64,
    c: i64,
    h: i64,
    w: i64,
) -> pl_status {
    guard(|| {
        let handle = borrow(loss, "loss")?;
        keep_target(&handle.loss, &handle.streams, target, dtype, [n, c, h, w])
    })
}

/// Drops the target `pl_perceptual_set_target` kept (no-op without one).
///
/// # Safety
/// `loss` must be a live handle.
#[no_mangle]
pub unsafe extern "C" fn pl_perceptual_clear_target(loss: *mut pl_perceptual) -> pl_status {
    guard(|| borrow(loss, "loss")?.loss.clear_target())
}

/// What one CUDA call of a perceptual loss costs, counted from its
/// schedule (no GPU needed): fill `struct_size` with
/// `pl_plan_report_init`, then `pl_perceptual_plan_report` writes the rest.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pl_plan_report {
    /// sizeof(pl_plan_report), as `pl_plan_report_init` writes it.
    pub struct_size: usize,
    /// Chunks the batch runs in (`max_chunk_images`; a memory budget is
    /// resolved on the device and not counted).
    pub chunks: u64,
    /// Launches of the library's own kernels.
    pub kernel_launches: u64,
    /// cuDNN convolution calls.
    pub cudnn_calls: u64,
    /// Bytes the library's own kernels read (cuDNN's not counted).
    pub kernel_bytes_read: u64,
    /// Bytes the library's own kernels write.
    pub kernel_bytes_written: u64,
    /// 2 x the multiply-adds of every convolution call.
    pub conv_flops: u64,
    /// 2 x the multiply-adds of the style terms' Gram products (f32, CUDA
    /// cores); added in the struct's second version.
    pub gram_flops: u64,
}

released!(pl_plan_report, since [gram_flops], last gram_flops: u64, {
    chunks: 0,
    kernel_launches: 0,
    cudnn_calls: 0,
    kernel_bytes_read: 0,
    kernel_bytes_written: 0,
    conv_flops: 0,
    gram_flops: 0,
});

/// Writes `struct_size` and zero counts to `report`.
///
/// # Safety
/// `report` must be NULL or a writable `pl_plan_report`.
#[no_mangle]
pub unsafe extern "C" fn pl_plan_report_init(report: *mut pl_plan_report) -> pl_status {
    guard(|| options::init(report, "report"))
}

/// Writes to `report` (its `struct_size` set by `pl_plan_report_init`)
/// what a CUDA call of `loss` on n x c x h x w inputs of `dtype` costs,
/// with the gradient when `want_grad` is nonzero: kernel launches, cuDNN
/// calls, the bytes the library's kernels move and the convolutions'
/// FLOPs, in the network's compute dtype (f32 for weights on the CPU).
/// Nothing runs; the shape is checked as a loss call checks it.
///
/// # Safety
/// `loss` must be a live handle and `report` a writable `pl_plan_report`.
#[no_mangle]
pub unsafe extern "C" fn pl_perceptual_plan_report(
    loss: *mut pl_perceptual,
    dtype: pl_dtype,
    n: i64,
    c: i64,
    h: i64,
    w: i64,
    want_grad: i32,
    report: *mut pl_plan_report,
) -> pl_status {
    guard(|| {
        write_report(loss, (dtype, [n, c, h, w]), report, |l, s, d| {
            l.plan_report(s, d, want_grad != 0)
        })
    })
}

/// As `pl_perceptual_plan_report`, for a call against a kept target
/// (`pl_perceptual_set_target`) with pred of n x c x h x w: the network
/// runs over pred alone, and the taps read the kept target (counted as n
/// images).
///
/// # Safety
/// `loss` must be a live handle and `report` a writable `pl_plan_report`.
#[no_mangle]
pub unsafe extern "C" fn pl_perceptual_resident_plan_report(
    loss: *mut pl_perceptual,
    dtype: pl_dtype,
    n: i64,
    c: i64,
    h: i64,
    w: i64,
    want_grad: i32,
    report: *mut pl_plan_report,
) -> pl_status {
    guard(|| {
        write_report(loss, (dtype, [n, c, h, w]), report, |l, s, d| {
            l.resident_plan_report(s, d, want_grad != 0)
        })
    })
}

/// Writes the report `of` gives for `loss` on a call of `dtype` and
/// shape into the caller's `report`, as much of it as its version holds.
///
/// # Safety
/// As `pl_perceptual_plan_report`.
unsafe fn write_report(
    loss: *mut pl_perceptual,
    (dtype, [n, c, h, w]): (pl_dtype, [i64; 4]),
    report: *mut pl_plan_report,
    of: impl FnOnce(&PerceptualLoss, Shape, DType) -> Result<PlanReport>,
) -> Result<()> {
    let handle = borrow(loss, "loss")?;
    if report.is_null() {
        return Err(Error::arg("report is NULL"));
    }
    // Aligned, and a version of the struct this library knows (checked
    // on the raw pointer, before any reference to it exists).
    let size = options::read(report.cast_const(), "report")?.struct_size;
    let (dtype, shape) = (dtype_of(dtype)?, shape_of(n, c, h, w)?);
    let r = of(&handle.loss, shape, dtype)?;
    let count = |v: usize| v as u64;
    let value = pl_plan_report {
        struct_size: size,
        chunks: count(r.chunks),
        kernel_launches: count(r.kernel_launches),
        cudnn_calls: count(r.cudnn_calls),
        kernel_bytes_read: r.kernel_bytes_read,
        kernel_bytes_written: r.kernel_bytes_written,
        conv_flops: r.conv_flops,
        gram_flops: r.gram_flops,
    };
    // Only the caller's version's bytes: an older, smaller struct ends
    // where its fields do.
    std::ptr::copy_nonoverlapping(
        (&value as *const pl_plan_report).cast::<u8>(),
        report.cast::<u8>(),
        size,
    );
    Ok(())
}
