//! `pl_vgg`: VGG weights loaded once onto a context's device and shared by
//! any number of losses; and stand-in weights for demos.

use super::args::{dtype_of, pl_dtype, PL_F32};
use super::context::{pl_context, Streams};
use super::guard::guard;
use super::handle::{borrow, destroy, give, out_param, Handle};
use super::options::{self, released};
use super::status::pl_status;
use crate::error::Error;
use crate::vgg::{Vgg, VggArch, VggOptions, WeightsSource};
use std::ffi::{c_char, CStr};
use std::sync::Arc;

/// VGG variant.
pub type pl_vgg_arch = i32;
/// VGG16.
pub const PL_VGG16: pl_vgg_arch = 0;
/// VGG19.
pub const PL_VGG19: pl_vgg_arch = 1;

/// Resident VGG weights on one context's device.
pub struct pl_vgg {
    pub(crate) vgg: Arc<Vgg>,
    pub(crate) streams: Arc<Streams>,
}

impl Handle for pl_vgg {
    const NAME: &'static str = "pl_vgg";
}

/// How to load VGG weights. Initialise with `pl_vgg_options_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pl_vgg_options {
    /// sizeof(pl_vgg_options), as `pl_vgg_options_init` writes it.
    pub struct_size: usize,
    /// PL_VGG16 (default) or PL_VGG19.
    pub arch: pl_vgg_arch,
    /// The dtype convolutions run in on a CUDA device; default PL_F32. The
    /// CPU backend always computes in f32 with f64 loss sums.
    pub compute: pl_dtype,
    /// The deepest module to load, by torchvision index (22 loads up to
    /// relu4_3; every convolution up to it must be in the file); -1 (the
    /// default) loads as deep as the file goes: all of `features`, or, for
    /// a file holding a prefix of the network, every layer before the
    /// first convolution it lacks. Losses can tap only loaded modules.
    pub depth: i32,
    /// Write 0 (as `pl_vgg_options_init` does).
    pub reserved: i32,
}

released!(pl_vgg_options, reserved reserved, last reserved: i32, {
    arch: PL_VGG16,
    compute: PL_F32,
    depth: -1,
    reserved: 0,
});

pub(crate) fn vgg_arch(arch: pl_vgg_arch) -> Result<VggArch, Error> {
    match arch {
        PL_VGG16 => Ok(VggArch::Vgg16),
        PL_VGG19 => Ok(VggArch::Vgg19),
        _ => Err(Error::arg(format!("unknown pl_vgg_arch {arch}"))),
    }
}

fn vgg_options(o: &pl_vgg_options) -> Result<VggOptions, Error> {
    let up_to = match o.depth {
        -1 => None,
        d => Some(usize::try_from(d).map_err(|_| {
            Error::arg(format!(
                "options.depth is {d}: a module index, or -1 for the whole network"
            ))
        })?),
    };
    Ok(VggOptions {
        arch: vgg_arch(o.arch)?,
        compute: dtype_of(o.compute)?,
        up_to,
    })
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `s` must be NULL or a NUL-terminated string.
pub(crate) unsafe fn utf8<'a>(s: *const c_char, what: &str) -> Result<&'a str, Error> {
    if s.is_null() {
        return Err(Error::arg(format!("{what} is NULL")));
    }
    CStr::from_ptr(s)
        .to_str()
        .map_err(|_| Error::arg(format!("{what} is not UTF-8")))
}

/// Writes the defaults to `options`: VGG16, f32 compute, the whole network.
///
/// # Safety
/// `options` must be NULL or a writable `pl_vgg_options`.
#[no_mangle]
pub unsafe extern "C" fn pl_vgg_options_init(options: *mut pl_vgg_options) -> pl_status {
    guard(|| options::init(options, "options"))
}

/// Loads VGG `features` weights (safetensors, torchvision names) from
/// `safetensors_path` onto the context's device, as `options` says (NULL
/// = the defaults).
///
/// # Safety
/// `ctx` must be a live context, `safetensors_path` a NUL-terminated path,
/// `options` NULL or valid, `out` writable.
#[no_mangle]
pub unsafe extern "C" fn pl_vgg_load(
    ctx: *mut pl_context,
    safetensors_path: *const c_char,
    options: *const pl_vgg_options,
    out: *mut *mut pl_vgg,
) -> pl_status {
    guard(|| {
        let ctx = borrow(ctx, "ctx")?;
        let path = utf8(safetensors_path, "safetensors_path")?;
        let out = out_param(out, "out")?;
        let options = vgg_options(&options::read(options, "options")?)?;
        let streams = ctx.streams.clone();
        let source = WeightsSource::Path(path.as_ref());
        let vgg = Vgg::load_with(&streams.current()?, source, options)?;
        give(pl_vgg { vgg, streams }, out);
        Ok(())
    })
}

/// Writes to `depth_out` the index of the deepest module `pl_vgg_load`
/// would load from `safetensors_path` with `options` (NULL = the
/// defaults: as deep as the file goes), checking the file's header (names,
/// shapes, dtypes, byte ranges) without reading any tensor data.
///
/// # Safety
/// `safetensors_path` must be a NUL-terminated path, `options` NULL or
/// valid, `depth_out` writable.
#[no_mangle]
pub unsafe extern "C" fn pl_vgg_depth(
    safetensors_path: *const c_char,
    options: *const pl_vgg_options,
    depth_out: *mut i32,
) -> pl_status {
    guard(|| {
        let path = utf8(safetensors_path, "safetensors_path")?;
        let out = out_param(depth_out, "depth_out")?;
        let options = vgg_options(&options::read(options, "options")?)?;
        let depth = Vgg::depth_in(WeightsSource::Path(path.as_ref()), options)?;
        *out = depth as i32;
        Ok(())
    })
}

/// Releases a VGG handle; NULL is ignored. Losses made from it keep the
/// weights alive until they are destroyed.
///
/// # Safety
/// `vgg` must be NULL or a handle from `pl_vgg_load`, not used again.
#[no_mangle]
pub unsafe extern "C" fn pl_vgg_destroy(vgg: *mut pl_vgg) {
    destroy(vgg)
}

/// Writes seeded stand-in VGG weights (He-uniform, zero biases; the same
/// for the same seed) to a safetensors file at `path`, for demos and tests
/// on machines without the pretrained weights.
///
/// # Safety
/// `path` must be a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pl_seeded_weights_write(
    path: *const c_char,
    arch: pl_vgg_arch,
    seed: u64,
) -> pl_status {
    guard(|| {
        let path = utf8(path, "path")?;
        let bytes = crate::vgg::seeded_safetensors(vgg_arch(arch)?, seed)?;
        std::fs::write(path, bytes).map_err(|e| Error::Io(format!("writing {path}: {e}")))
    })
}
