//! Every C entry point called as a hostile caller would: NULLs, zero,
//! negative and overflowing dimensions, out-of-range enums, misaligned and
//! overlapping pointers, bad options structs. Each case expects one status,
//! a message, and its outputs untouched; each runs in a child process, so
//! a crash or an abort fails that case instead of the whole run.

mod common;

use common::{in_child_with, is_child};
use perceptual_loss::ffi::*;
use std::ffi::{c_char, c_void, CString};
use std::ptr::{null, null_mut};

/// What one case calls, given the world the cases share, and the status
/// it expects.
type Case = (&'static str, pl_status, fn(&World) -> pl_status);

/// What every case can use: a CPU context, loaded weights and a loss, host
/// buffers, and a weights file on disk.
struct World {
    ctx: *mut pl_context,
    vgg: *mut pl_vgg,
    loss: *mut pl_perceptual,
    x: Vec<f32>,
    path: CString,
}

/// The loss slot every case's outputs point at; a case must leave it.
const UNTOUCHED: f32 = -12345.0;
static mut LOSS: f32 = UNTOUCHED;
static mut GRAD: [f32; 3 * 16 * 16] = [UNTOUCHED; 3 * 16 * 16];

/// `want` when every one of `statuses` is `want`, else the first that is
/// not (so one wrongly accepted call fails its case).
fn every(statuses: &[pl_status], want: pl_status) -> pl_status {
    statuses
        .iter()
        .copied()
        .find(|&s| s != want)
        .unwrap_or(want)
}

fn outputs() -> pl_outputs {
    // SAFETY: pl_outputs is plain data; init writes every field.
    let mut out = unsafe { std::mem::zeroed() };
    unsafe { assert_eq!(pl_outputs_init(&mut out), PL_OK) };
    out.loss = std::ptr::addr_of_mut!(LOSS);
    out
}

fn with_grad() -> pl_outputs {
    let mut out = outputs();
    out.grad = std::ptr::addr_of_mut!(GRAD).cast();
    out
}

fn tv_config() -> pl_tv_config {
    let mut c = unsafe { std::mem::zeroed() };
    unsafe { assert_eq!(pl_tv_config_init(&mut c), PL_OK) };
    c
}

fn perceptual_config() -> pl_perceptual_config {
    let mut c = unsafe { std::mem::zeroed() };
    unsafe { assert_eq!(pl_perceptual_config_init(&mut c), PL_OK) };
    c
}

fn plan_report() -> pl_plan_report {
    let mut r = unsafe { std::mem::zeroed() };
    unsafe { assert_eq!(pl_plan_report_init(&mut r), PL_OK) };
    r
}

fn vgg_options() -> pl_vgg_options {
    let mut o = unsafe { std::mem::zeroed() };
    unsafe { assert_eq!(pl_vgg_options_init(&mut o), PL_OK) };
    o
}

impl World {
    /// The world of a child, over the weights file `path`.
    fn new(path: &str) -> World {
        let path = CString::new(path).unwrap();
        let (mut ctx, mut vgg, mut loss) = (null_mut(), null_mut(), null_mut());
        // To relu4_3, all the default taps need: less to read per case.
        let mut options = vgg_options();
        options.depth = 22;
        unsafe {
            assert_eq!(
                pl_context_create(PL_DEVICE_CPU, 0, null_mut(), &mut ctx),
                PL_OK
            );
            assert_eq!(pl_vgg_load(ctx, path.as_ptr(), &options, &mut vgg), PL_OK);
            assert_eq!(pl_perceptual_create(vgg, null(), &mut loss), PL_OK);
        }
        World {
            ctx,
            vgg,
            loss,
            x: (0..3 * 16 * 16).map(|i| (i % 13) as f32 / 13.0).collect(),
            path,
        }
    }

    fn x(&self) -> *const c_void {
        self.x.as_ptr().cast()
    }

    fn tv(&self, config: &pl_tv_config, dims: [i64; 4], out: &pl_outputs) -> pl_status {
        let [n, c, h, w] = dims;
        unsafe { pl_tv_loss(self.ctx, config, self.x(), PL_F32, n, c, h, w, out) }
    }

    fn perceptual(&self, dtype: pl_dtype, dims: [i64; 4], out: &pl_outputs) -> pl_status {
        let [n, c, h, w] = dims;
        unsafe { pl_perceptual_loss(self.loss, self.x(), self.x(), dtype, n, c, h, w, out) }
    }

    fn create(&self, config: &pl_perceptual_config) -> pl_status {
        let mut loss = null_mut();
        let st = unsafe { pl_perceptual_create(self.vgg, config, &mut loss) };
        assert!(st != PL_OK || !loss.is_null());
        if st != PL_OK {
            assert!(loss.is_null(), "a handle written on error");
        }
        unsafe { pl_perceptual_destroy(loss) };
        st
    }

    fn load(&self, path: *const c_char, options: &pl_vgg_options) -> pl_status {
        let mut vgg = null_mut();
        let st = unsafe { pl_vgg_load(self.ctx, path, options, &mut vgg) };
        if st != PL_OK {
            assert!(vgg.is_null(), "a handle written on error");
        }
        unsafe { pl_vgg_destroy(vgg) };
        st
    }
}

const ONE: [i64; 4] = [1, 3, 16, 16];
const BIG: i64 = 1 << 40;

fn cases() -> Vec<Case> {
    use std::ptr::addr_of_mut;
    vec![
        // Contexts.
        (
            "context: unknown kind",
            PL_ERR_INVALID_ARGUMENT,
            |_| unsafe {
                let mut c = null_mut();
                pl_context_create(7, 0, null_mut(), &mut c)
            },
        ),
        (
            "context: negative ordinal",
            PL_ERR_INVALID_ARGUMENT,
            |_| unsafe {
                let mut c = null_mut();
                pl_context_create(PL_DEVICE_CUDA, -3, null_mut(), &mut c)
            },
        ),
        ("context: NULL out", PL_ERR_INVALID_ARGUMENT, |_| unsafe {
            pl_context_create(PL_DEVICE_CPU, 0, null_mut(), null_mut())
        }),
        ("synchronize: NULL", PL_ERR_INVALID_ARGUMENT, |_| unsafe {
            pl_context_synchronize(null_mut())
        }),
        (
            "set_stream: NULL context",
            PL_ERR_INVALID_ARGUMENT,
            |_| unsafe { pl_context_set_stream(null_mut(), null_mut()) },
        ),
        (
            "set_stream: a stream for a CPU context",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe { pl_context_set_stream(w.ctx, 0x1000 as *mut c_void) },
        ),
        ("init: NULL structs", PL_ERR_INVALID_ARGUMENT, |_| unsafe {
            let all = [
                pl_outputs_init(null_mut()),
                pl_tv_config_init(null_mut()),
                pl_feature_config_init(null_mut()),
                pl_vgg_options_init(null_mut()),
                pl_perceptual_config_init(null_mut()),
            ];
            every(&all, PL_ERR_INVALID_ARGUMENT)
        }),
        // TV.
        ("tv: NULL ctx", PL_ERR_INVALID_ARGUMENT, |w| unsafe {
            pl_tv_loss(null_mut(), null(), w.x(), PL_F32, 1, 1, 4, 4, &outputs())
        }),
        ("tv: NULL x", PL_ERR_INVALID_ARGUMENT, |w| unsafe {
            pl_tv_loss(w.ctx, null(), null(), PL_F32, 1, 1, 4, 4, &outputs())
        }),
        ("tv: NULL outputs", PL_ERR_INVALID_ARGUMENT, |w| unsafe {
            pl_tv_loss(w.ctx, null(), w.x(), PL_F32, 1, 1, 4, 4, null())
        }),
        ("tv: NULL out.loss", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut out = outputs();
            out.loss = null_mut();
            w.tv(&tv_config(), [1, 1, 4, 4], &out)
        }),
        ("tv: dtype -1", PL_ERR_INVALID_ARGUMENT, |w| unsafe {
            pl_tv_loss(w.ctx, null(), w.x(), -1, 1, 1, 4, 4, &outputs())
        }),
        ("tv: dtype i32::MAX", PL_ERR_INVALID_ARGUMENT, |w| unsafe {
            pl_tv_loss(w.ctx, null(), w.x(), i32::MAX, 1, 1, 4, 4, &outputs())
        }),
        ("tv: variant 5", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = tv_config();
            c.variant = 5;
            w.tv(&c, [1, 1, 4, 4], &outputs())
        }),
        ("tv: reduction -1", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = tv_config();
            c.reduction = -1;
            w.tv(&c, [1, 1, 4, 4], &outputs())
        }),
        ("tv: the article summed", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = tv_config();
            c.reduction = PL_REDUCTION_SUM;
            w.tv(&c, [1, 1, 4, 4], &outputs())
        }),
        ("tv: NaN weight", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = tv_config();
            c.weight = f32::NAN;
            w.tv(&c, [1, 1, 4, 4], &outputs())
        }),
        ("tv: negative eps", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = tv_config();
            (c.variant, c.eps) = (PL_TV_ISOTROPIC, -1.0);
            w.tv(&c, [1, 1, 4, 4], &outputs())
        }),
        ("tv: struct_size 0", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = tv_config();
            c.struct_size = 0;
            w.tv(&c, [1, 1, 4, 4], &outputs())
        }),
        (
            "tv: struct_size of a newer version",
            PL_ERR_INVALID_ARGUMENT,
            |w| {
                let mut c = tv_config();
                c.struct_size += 8;
                w.tv(&c, [1, 1, 4, 4], &outputs())
            },
        ),
        ("tv: reserved set", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = tv_config();
            c.reserved = 1;
            w.tv(&c, [1, 1, 4, 4], &outputs())
        }),
        (
            "tv: outputs struct_size garbage",
            PL_ERR_INVALID_ARGUMENT,
            |w| {
                let mut out = outputs();
                out.struct_size = usize::MAX;
                w.tv(&tv_config(), [1, 1, 4, 4], &out)
            },
        ),
        (
            "tv: misaligned outputs struct",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe {
                let mut bytes = [0u8; 64];
                let at = bytes.as_mut_ptr().add(1).cast::<pl_outputs>();
                pl_tv_loss(w.ctx, null(), w.x(), PL_F32, 1, 1, 4, 4, at)
            },
        ),
        ("tv: zero height", PL_ERR_INVALID_SHAPE, |w| {
            w.tv(&tv_config(), [1, 1, 0, 4], &outputs())
        }),
        ("tv: negative width", PL_ERR_INVALID_SHAPE, |w| {
            w.tv(&tv_config(), [1, 1, 4, -4], &outputs())
        }),
        ("tv: n = i64::MAX", PL_ERR_INVALID_SHAPE, |w| {
            w.tv(&tv_config(), [i64::MAX, 1, 4, 4], &outputs())
        }),
        ("tv: i64::MIN", PL_ERR_INVALID_SHAPE, |w| {
            w.tv(&tv_config(), [1, i64::MIN, 4, 4], &outputs())
        }),
        ("tv: a product that overflows", PL_ERR_INVALID_SHAPE, |w| {
            w.tv(&tv_config(), [BIG, BIG, BIG, BIG], &outputs())
        }),
        (
            "tv: more bytes than an allocation",
            PL_ERR_INVALID_SHAPE,
            |w| w.tv(&tv_config(), [1, 1, 2, 1 << 60], &outputs()),
        ),
        ("tv: past any address space", PL_ERR_INVALID_SHAPE, |w| {
            w.tv(&tv_config(), [1, 1, 1 << 20, 1 << 37], &outputs())
        }),
        ("tv: H = 1 for the article", PL_ERR_INVALID_SHAPE, |w| {
            w.tv(&tv_config(), [1, 1, 1, 16], &outputs())
        }),
        ("tv: misaligned x", PL_ERR_INVALID_ARGUMENT, |w| unsafe {
            let x = w.x().cast::<u8>().add(2).cast();
            pl_tv_loss(w.ctx, null(), x, PL_F32, 1, 1, 4, 4, &outputs())
        }),
        ("tv: misaligned loss", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut out = outputs();
            out.loss = unsafe { addr_of_mut!(GRAD).cast::<u8>().add(1).cast() };
            w.tv(&tv_config(), [1, 1, 4, 4], &out)
        }),
        ("tv: gradient over x", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut out = outputs();
            out.grad = w.x() as *mut c_void;
            w.tv(&tv_config(), [1, 1, 4, 4], &out)
        }),
        ("tv: loss inside x", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut out = outputs();
            out.loss = unsafe { (w.x() as *mut f32).add(3) };
            w.tv(&tv_config(), [1, 1, 4, 4], &out)
        }),
        (
            "tv: per-sample over the gradient",
            PL_ERR_INVALID_ARGUMENT,
            |w| {
                let mut out = with_grad();
                out.per_sample = unsafe { addr_of_mut!(GRAD).cast::<f32>().add(5) };
                w.tv(&tv_config(), [1, 1, 4, 4], &out)
            },
        ),
        ("tv: infinite beta", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut out = with_grad();
            out.beta = f32::INFINITY;
            w.tv(&tv_config(), [1, 1, 4, 4], &out)
        }),
        // Feature distance.
        ("feature: NULL b", PL_ERR_INVALID_ARGUMENT, |w| unsafe {
            pl_feature_loss(w.ctx, null(), w.x(), null(), PL_F32, 1, 1, 4, 4, &outputs())
        }),
        (
            "feature: criterion 2",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe {
                let mut c = std::mem::zeroed();
                pl_feature_config_init(&mut c);
                c.criterion = 2;
                pl_feature_loss(w.ctx, &c, w.x(), w.x(), PL_F32, 1, 1, 4, 4, &outputs())
            },
        ),
        (
            "feature: infinite weight",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe {
                let mut c = std::mem::zeroed();
                pl_feature_config_init(&mut c);
                c.weight = f32::NEG_INFINITY;
                pl_feature_loss(w.ctx, &c, w.x(), w.x(), PL_F32, 1, 1, 4, 4, &outputs())
            },
        ),
        (
            "feature: gradient over b",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe {
                let mut out = outputs();
                out.grad = w.x() as *mut c_void;
                let b = w.x();
                let a = std::ptr::addr_of!(GRAD).cast();
                pl_feature_loss(w.ctx, null(), a, b, PL_F32, 1, 1, 4, 4, &out)
            },
        ),
        // Weights.
        ("load: NULL ctx", PL_ERR_INVALID_ARGUMENT, |w| unsafe {
            let mut v = null_mut();
            pl_vgg_load(null_mut(), w.path.as_ptr(), null(), &mut v)
        }),
        ("load: NULL path", PL_ERR_INVALID_ARGUMENT, |w| {
            w.load(null(), &vgg_options())
        }),
        ("load: NULL out", PL_ERR_INVALID_ARGUMENT, |w| unsafe {
            pl_vgg_load(w.ctx, w.path.as_ptr(), null(), null_mut())
        }),
        (
            "load: a path that is not UTF-8",
            PL_ERR_INVALID_ARGUMENT,
            |w| w.load(c"/tmp/\xff\xfe.safetensors".as_ptr(), &vgg_options()),
        ),
        ("load: a missing file", PL_ERR_IO, |w| {
            w.load(c"/nonexistent/x.safetensors".as_ptr(), &vgg_options())
        }),
        ("load: a directory", PL_ERR_IO, |w| {
            w.load(c"/tmp".as_ptr(), &vgg_options())
        }),
        ("load: /dev/zero", PL_ERR_IO, |w| {
            w.load(c"/dev/zero".as_ptr(), &vgg_options())
        }),
        ("load: arch 2", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut o = vgg_options();
            o.arch = 2;
            w.load(w.path.as_ptr(), &o)
        }),
        ("load: compute dtype 9", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut o = vgg_options();
            o.compute = 9;
            w.load(w.path.as_ptr(), &o)
        }),
        ("load: depth -2", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut o = vgg_options();
            o.depth = -2;
            w.load(w.path.as_ptr(), &o)
        }),
        (
            "load: depth past the network",
            PL_ERR_INVALID_ARGUMENT,
            |w| {
                let mut o = vgg_options();
                o.depth = 31;
                w.load(w.path.as_ptr(), &o)
            },
        ),
        ("load: a VGG16 file as VGG19", PL_ERR_INVALID_WEIGHTS, |w| {
            let mut o = vgg_options();
            o.arch = PL_VGG19;
            w.load(w.path.as_ptr(), &o)
        }),
        ("depth: NULL out", PL_ERR_INVALID_ARGUMENT, |w| unsafe {
            pl_vgg_depth(w.path.as_ptr(), null(), null_mut())
        }),
        ("depth: a missing file", PL_ERR_IO, |_| unsafe {
            let mut d = 0;
            pl_vgg_depth(c"/nonexistent".as_ptr(), null(), &mut d)
        }),
        (
            "seeded weights: NULL path",
            PL_ERR_INVALID_ARGUMENT,
            |_| unsafe { pl_seeded_weights_write(null(), PL_VGG16, 1) },
        ),
        (
            "seeded weights: arch -1",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe { pl_seeded_weights_write(w.path.as_ptr(), -1, 1) },
        ),
        (
            "seeded weights: an unwritable path",
            PL_ERR_IO,
            |_| unsafe {
                pl_seeded_weights_write(c"/nonexistent/dir/w.safetensors".as_ptr(), PL_VGG16, 1)
            },
        ),
        // Perceptual losses.
        ("create: NULL vgg", PL_ERR_INVALID_ARGUMENT, |_| unsafe {
            let mut l = null_mut();
            pl_perceptual_create(null_mut(), null(), &mut l)
        }),
        ("create: NULL out", PL_ERR_INVALID_ARGUMENT, |w| unsafe {
            pl_perceptual_create(w.vgg, null(), null_mut())
        }),
        // LPIPS: the world's weights stop at relu4_3, short of relu5_3.
        (
            "lpips: weights too shallow",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe {
                let mut l = null_mut();
                let st = pl_lpips_create(w.vgg, null(), &mut l);
                assert!(l.is_null());
                st
            },
        ),
        ("lpips: NULL vgg", PL_ERR_INVALID_ARGUMENT, |_| unsafe {
            let mut l = null_mut();
            pl_lpips_create(null_mut(), null(), &mut l)
        }),
        (
            "lpips: loss of a NULL handle",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe {
                pl_lpips_loss(null_mut(), w.x(), w.x(), PL_F32, 1, 3, 16, 16, &outputs())
            },
        ),
        (
            "lpips: a config never initialised",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe {
                let mut config: pl_lpips_config = std::mem::zeroed();
                config.lin = 1;
                let mut l = null_mut();
                pl_lpips_create(w.vgg, &config, &mut l)
            },
        ),
        // Kept targets.
        (
            "set_target: NULL handle",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe { pl_perceptual_set_target(null_mut(), w.x(), PL_F32, 1, 3, 16, 16) },
        ),
        (
            "set_target: NULL target",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe { pl_perceptual_set_target(w.loss, null(), PL_F32, 1, 3, 16, 16) },
        ),
        (
            "set_target: dimensions past the address space",
            PL_ERR_INVALID_SHAPE,
            |w| unsafe { pl_perceptual_set_target(w.loss, w.x(), PL_F32, 1 << 40, 3, 1 << 20, 16) },
        ),
        (
            "set_target: a bad dtype",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe { pl_perceptual_set_target(w.loss, w.x(), 9, 1, 3, 16, 16) },
        ),
        (
            "loss: no kept target",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe {
                pl_perceptual_loss(w.loss, w.x(), null(), PL_F32, 1, 3, 16, 16, &outputs())
            },
        ),
        (
            "clear_target: NULL handle",
            PL_ERR_INVALID_ARGUMENT,
            |_| unsafe { pl_perceptual_clear_target(null_mut()) },
        ),
        (
            "lpips_spatial: NULL handle",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe {
                let mut map = vec![0f32; 256];
                pl_lpips_spatial(
                    null_mut(),
                    w.x(),
                    w.x(),
                    PL_F32,
                    1,
                    3,
                    16,
                    16,
                    map.as_mut_ptr(),
                    null_mut(),
                )
            },
        ),
        (
            "lpips_spatial_backward: NULL handle",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe {
                let (map_grad, mut grad) = (vec![0f32; 256], vec![0f32; 768]);
                pl_lpips_spatial_backward(
                    null_mut(),
                    w.x(),
                    w.x(),
                    PL_F32,
                    1,
                    3,
                    16,
                    16,
                    map_grad.as_ptr(),
                    grad.as_mut_ptr().cast(),
                )
            },
        ),
        ("create: no taps", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = perceptual_config();
            c.num_taps = 0;
            w.create(&c)
        }),
        // A count far past the array: refused before it is read.
        ("create: num_taps garbage", PL_ERR_INVALID_ARGUMENT, |w| {
            let statuses = [38, 1 << 40, usize::MAX].map(|n| {
                let mut c = perceptual_config();
                c.num_taps = n;
                w.create(&c)
            });
            every(&statuses, PL_ERR_INVALID_ARGUMENT)
        }),
        (
            "create: taps and names NULL",
            PL_ERR_INVALID_ARGUMENT,
            |w| {
                let mut c = perceptual_config();
                c.taps = null();
                w.create(&c)
            },
        ),
        (
            "create: taps and names both",
            PL_ERR_INVALID_ARGUMENT,
            |w| {
                let mut c = perceptual_config();
                let names = [c"relu1_2".as_ptr()];
                c.tap_names = names.as_ptr();
                w.create(&c)
            },
        ),
        ("create: a negative tap", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = perceptual_config();
            let taps = [-1];
            (c.taps, c.num_taps) = (taps.as_ptr(), 1);
            w.create(&c)
        }),
        ("create: tap i32::MAX", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = perceptual_config();
            let taps = [i32::MAX];
            (c.taps, c.num_taps) = (taps.as_ptr(), 1);
            w.create(&c)
        }),
        ("create: a tap listed twice", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = perceptual_config();
            let taps = [3, 3];
            (c.taps, c.num_taps) = (taps.as_ptr(), 2);
            w.create(&c)
        }),
        ("create: a NULL tap name", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = perceptual_config();
            let names = [c"relu1_2".as_ptr(), null()];
            (c.taps, c.tap_names, c.num_taps) = (null(), names.as_ptr(), 2);
            w.create(&c)
        }),
        (
            "create: an unknown tap name",
            PL_ERR_INVALID_ARGUMENT,
            |w| {
                let mut c = perceptual_config();
                let names = [c"relu\xff".as_ptr()];
                (c.taps, c.tap_names, c.num_taps) = (null(), names.as_ptr(), 1);
                w.create(&c)
            },
        ),
        (
            "create: weights but no count",
            PL_ERR_INVALID_ARGUMENT,
            |w| {
                let mut c = perceptual_config();
                let weights = [1.0f32; 4];
                c.tap_weights = weights.as_ptr();
                w.create(&c)
            },
        ),
        ("create: a NaN tap weight", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = perceptual_config();
            let weights = [1.0, f32::NAN, 1.0, 1.0];
            (c.tap_weights, c.num_tap_weights) = (weights.as_ptr(), 4);
            w.create(&c)
        }),
        (
            "create: criterion, norm and pooling out of range",
            PL_ERR_INVALID_ARGUMENT,
            |w| {
                let statuses = [(3, 0, 0), (0, -1, 0), (0, 0, 2)].map(|(criterion, norm, pool)| {
                    let mut c = perceptual_config();
                    (c.criterion, c.input_norm, c.pooling) = (criterion, norm, pool);
                    w.create(&c)
                });
                every(&statuses, PL_ERR_INVALID_ARGUMENT)
            },
        ),
        ("create: struct_size 1", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut c = perceptual_config();
            c.struct_size = 1;
            w.create(&c)
        }),
        ("loss: NULL handle", PL_ERR_INVALID_ARGUMENT, |w| unsafe {
            pl_perceptual_loss(null_mut(), w.x(), w.x(), PL_F32, 1, 3, 16, 16, &outputs())
        }),
        ("loss: NULL pred", PL_ERR_INVALID_ARGUMENT, |w| unsafe {
            pl_perceptual_loss(w.loss, null(), w.x(), PL_F32, 1, 3, 16, 16, &outputs())
        }),
        ("loss: 2 channels", PL_ERR_INVALID_SHAPE, |w| {
            w.perceptual(PL_F32, [1, 2, 16, 16], &outputs())
        }),
        ("loss: too small for its pools", PL_ERR_INVALID_SHAPE, |w| {
            w.perceptual(PL_F32, [1, 3, 7, 16], &outputs())
        }),
        ("loss: dims that cannot be", PL_ERR_INVALID_SHAPE, |w| {
            w.perceptual(PL_F32, [1, 3, 1 << 30, 1 << 30], &outputs())
        }),
        (
            "loss: activations that cannot be",
            PL_ERR_INVALID_SHAPE,
            |w| w.perceptual(PL_F16, [1, 1, 1 << 27, 1 << 27], &outputs()),
        ),
        ("loss: dtype 3", PL_ERR_INVALID_ARGUMENT, |w| {
            w.perceptual(3, ONE, &outputs())
        }),
        ("loss: gradient over pred", PL_ERR_INVALID_ARGUMENT, |w| {
            let mut out = outputs();
            out.grad = w.x() as *mut c_void;
            w.perceptual(PL_F32, ONE, &out)
        }),
        // The cost model of a loss.
        (
            "plan report: NULL loss",
            PL_ERR_INVALID_ARGUMENT,
            |_| unsafe {
                let mut r = plan_report();
                pl_perceptual_plan_report(null_mut(), PL_F32, 1, 3, 16, 16, 1, &mut r)
            },
        ),
        (
            "plan report: NULL report",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe { pl_perceptual_plan_report(w.loss, PL_F32, 1, 3, 16, 16, 1, null_mut()) },
        ),
        (
            "plan report: struct_size 0",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe {
                let mut r = plan_report();
                r.struct_size = 0;
                let st = pl_perceptual_plan_report(w.loss, PL_F32, 1, 3, 16, 16, 1, &mut r);
                if r.kernel_launches != 0 {
                    return PL_OK; // written despite the error: fail the case
                }
                st
            },
        ),
        (
            "plan report: dtype 3, 2 channels, negative n",
            PL_ERR_INVALID_ARGUMENT,
            |w| unsafe {
                let mut r = plan_report();
                let statuses = [
                    pl_perceptual_plan_report(w.loss, 3, 1, 3, 16, 16, 1, &mut r),
                    match pl_perceptual_plan_report(w.loss, PL_F32, 1, 2, 16, 16, 1, &mut r) {
                        PL_ERR_INVALID_SHAPE => PL_ERR_INVALID_ARGUMENT,
                        other => other,
                    },
                    match pl_perceptual_plan_report(w.loss, PL_F32, -1, 3, 16, 16, 1, &mut r) {
                        PL_ERR_INVALID_SHAPE => PL_ERR_INVALID_ARGUMENT,
                        other => other,
                    },
                ];
                every(&statuses, PL_ERR_INVALID_ARGUMENT)
            },
        ),
        // A well-formed call still works after all of the above.
        ("a good call", PL_OK, |w| {
            w.perceptual(PL_F32, ONE, &with_grad())
        }),
    ]
}

/// One case, in a child process.
#[test]
fn abuse_case() {
    let Ok(index) = std::env::var("PERCEPTUAL_LOSS_ABUSE_CASE") else {
        return; // only in a child started by the test below
    };
    assert!(is_child("abuse_case"));
    let (name, want, call) = cases()[index.parse::<usize>().unwrap()];
    let world = World::new(&std::env::var("PERCEPTUAL_LOSS_ABUSE_WEIGHTS").unwrap());
    let got = call(&world);
    let message = common::last_error();
    assert_eq!(got, want, "{name}: status {got}, message {message:?}");
    if want != PL_OK {
        assert!(!message.is_empty(), "{name}: no message");
        assert_eq!(unsafe { LOSS }, UNTOUCHED, "{name}: the loss was written");
        assert!(
            unsafe { GRAD }.iter().all(|&g| g == UNTOUCHED),
            "{name}: the gradient was written"
        );
    }
    println!("\nabuse-ok {name}: {message}");
    unsafe {
        pl_perceptual_destroy(world.loss);
        pl_vgg_destroy(world.vgg);
        pl_context_destroy(world.ctx);
    }
}

#[test]
fn every_entry_point_survives_a_hostile_caller() {
    let file = common::TempFile::seeded_vgg16("abuse.safetensors", 1);
    let weights = file.path.to_str().unwrap();
    let cases = cases();
    let mut failed = Vec::new();
    for (index, (name, _, _)) in cases.iter().enumerate() {
        let index = index.to_string();
        let env = [
            ("PERCEPTUAL_LOSS_ABUSE_CASE", index.as_str()),
            ("PERCEPTUAL_LOSS_ABUSE_WEIGHTS", weights),
        ];
        let out = in_child_with("abuse_case", None, &env);
        if !out.status.success() {
            failed.push(format!(
                "{name} ({:?}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .chain(String::from_utf8_lossy(&out.stderr).lines())
                    .filter(|l| l.contains("panicked") || l.contains(name) || l.contains("status"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n\n")
    );
    println!("{} cases, each in its own process", cases.len());
}
