"""Loads the perceptual-loss shared library and declares its C ABI
(include/perceptual_loss.h) for ctypes. No compiler is needed.

The library is found, in order, at $PERCEPTUAL_LOSS_LIB, inside this
package (where `pip install` and the wheel put it), or in the repository's
target/release and target/debug (a checkout used in place)."""
import ctypes
import os
import pathlib
import sys

_SUFFIX = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")


def _candidates():
    if os.environ.get("PERCEPTUAL_LOSS_LIB"):
        yield pathlib.Path(os.environ["PERCEPTUAL_LOSS_LIB"])
        return  # an explicit choice is never second-guessed
    here = pathlib.Path(__file__).resolve().parent
    # The packaged library is libperceptual_loss.abi3.so (setup.py).
    yield from sorted(here.glob(f"*perceptual_loss*{_SUFFIX}"))
    stem = "perceptual_loss" if sys.platform == "win32" else "libperceptual_loss"
    for profile in ("release", "debug"):
        yield here.parents[2] / "target" / profile / f"{stem}{_SUFFIX}"


def _load():
    tried = []
    for path in _candidates():
        tried.append(str(path))
        if path.is_file():
            return ctypes.CDLL(str(path)), path
    raise OSError(
        "perceptual-loss library not found: install the package with `pip install ./bindings/python` "
        "(builds it with cargo), or build it with `cargo build --release` and set PERCEPTUAL_LOSS_LIB. "
        "Tried: " + ", ".join(tried)
    )


lib, path = _load()

c_int32, c_int64, c_float, c_void_p, c_char_p = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_char_p


c_size_t = ctypes.c_size_t


class Outputs(ctypes.Structure):
    """pl_outputs, field for field."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("loss", c_void_p),
        ("grad", c_void_p),
        ("per_sample", c_void_p),
        ("beta", c_float),
        ("reserved", c_int32),
        ("parts", c_void_p),
    ]


class TvConfig(ctypes.Structure):
    """pl_tv_config, field for field."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("variant", c_int32),
        ("reduction", c_int32),
        ("weight", c_float),
        ("eps", c_float),
        ("check_finite", c_int32),
        ("reserved", c_int32),
    ]


class FeatureConfig(ctypes.Structure):
    """pl_feature_config, field for field."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("criterion", c_int32),
        ("weight", c_float),
        ("check_finite", c_int32),
        ("reserved", c_int32),
    ]


class VggOptions(ctypes.Structure):
    """pl_vgg_options, field for field."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("arch", c_int32),
        ("compute", c_int32),
        ("depth", c_int32),
        ("reserved", c_int32),
    ]


class PerceptualConfig(ctypes.Structure):
    """pl_perceptual_config, field for field."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("taps", ctypes.POINTER(c_int32)),
        ("tap_names", ctypes.POINTER(c_char_p)),
        ("num_taps", c_size_t),
        ("tap_weights", ctypes.POINTER(c_float)),
        ("num_tap_weights", c_size_t),
        ("criterion", c_int32),
        ("input_norm", c_int32),
        ("pooling", c_int32),
        ("weight", c_float),
        ("allow_tf32", c_int32),
        ("check_finite", c_int32),
        ("max_chunk_images", c_size_t),
        ("memory_budget_bytes", c_size_t),
        ("style_taps", ctypes.POINTER(c_int32)),
        ("style_tap_names", ctypes.POINTER(c_char_p)),
        ("num_style_taps", c_size_t),
        ("style_tap_weights", ctypes.POINTER(c_float)),
        ("num_style_tap_weights", c_size_t),
        ("style_criterion", c_int32),
        ("style_weight", c_float),
        ("cuda_graphs", c_int32),
        ("reserved", c_int32),
    ]


class LpipsConfig(ctypes.Structure):
    """pl_lpips_config, field for field."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("lin_weights_path", c_char_p),
        ("max_chunk_images", c_size_t),
        ("memory_budget_bytes", c_size_t),
        ("normalize", c_int32),
        ("lin", c_int32),
        ("weight", c_float),
        ("check_finite", c_int32),
        ("allow_tf32", c_int32),
        ("cuda_graphs", c_int32),
    ]


class PlanReport(ctypes.Structure):
    """pl_plan_report, field for field."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("chunks", ctypes.c_uint64),
        ("kernel_launches", ctypes.c_uint64),
        ("cudnn_calls", ctypes.c_uint64),
        ("kernel_bytes_read", ctypes.c_uint64),
        ("kernel_bytes_written", ctypes.c_uint64),
        ("conv_flops", ctypes.c_uint64),
        ("gram_flops", ctypes.c_uint64),
    ]


def _declare(name, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


ABI_VERSION = 2  # PL_ABI_VERSION of the header these declarations follow
pl_abi_version = _declare("pl_abi_version", ctypes.c_uint32)
if pl_abi_version() != ABI_VERSION:
    raise OSError(f"the perceptual-loss library implements C ABI {pl_abi_version()}, this package needs {ABI_VERSION}")
pl_version = _declare("pl_version", c_char_p)
pl_last_error = _declare("pl_last_error", c_char_p)
pl_context_create = _declare("pl_context_create", c_int32, c_int32, ctypes.c_int, c_void_p, ctypes.POINTER(c_void_p))
pl_context_destroy = _declare("pl_context_destroy", None, c_void_p)
pl_context_synchronize = _declare("pl_context_synchronize", c_int32, c_void_p)
pl_context_set_stream = _declare("pl_context_set_stream", c_int32, c_void_p, c_void_p)
pl_outputs_init = _declare("pl_outputs_init", c_int32, ctypes.POINTER(Outputs))
pl_tv_config_init = _declare("pl_tv_config_init", c_int32, ctypes.POINTER(TvConfig))
pl_tv_loss = _declare(
    "pl_tv_loss", c_int32, c_void_p, ctypes.POINTER(TvConfig), c_void_p, c_int32, c_int64, c_int64, c_int64, c_int64,
    ctypes.POINTER(Outputs),
)
pl_feature_config_init = _declare("pl_feature_config_init", c_int32, ctypes.POINTER(FeatureConfig))
pl_feature_loss = _declare(
    "pl_feature_loss", c_int32, c_void_p, ctypes.POINTER(FeatureConfig), c_void_p, c_void_p, c_int32, c_int64, c_int64,
    c_int64, c_int64, ctypes.POINTER(Outputs),
)
pl_vgg_options_init = _declare("pl_vgg_options_init", c_int32, ctypes.POINTER(VggOptions))
pl_vgg_load = _declare("pl_vgg_load", c_int32, c_void_p, c_char_p, ctypes.POINTER(VggOptions), ctypes.POINTER(c_void_p))
pl_vgg_destroy = _declare("pl_vgg_destroy", None, c_void_p)
pl_vgg_depth = _declare("pl_vgg_depth", c_int32, c_char_p, ctypes.POINTER(VggOptions), ctypes.POINTER(c_int32))
pl_perceptual_config_init = _declare("pl_perceptual_config_init", c_int32, ctypes.POINTER(PerceptualConfig))
pl_perceptual_create = _declare(
    "pl_perceptual_create", c_int32, c_void_p, ctypes.POINTER(PerceptualConfig), ctypes.POINTER(c_void_p)
)
pl_perceptual_destroy = _declare("pl_perceptual_destroy", None, c_void_p)
pl_perceptual_loss = _declare(
    "pl_perceptual_loss", c_int32, c_void_p, c_void_p, c_void_p, c_int32, c_int64, c_int64, c_int64, c_int64,
    ctypes.POINTER(Outputs),
)
pl_perceptual_set_target = _declare(
    "pl_perceptual_set_target", c_int32, c_void_p, c_void_p, c_int32, c_int64, c_int64, c_int64, c_int64
)
pl_perceptual_clear_target = _declare("pl_perceptual_clear_target", c_int32, c_void_p)
pl_lpips_set_target = _declare(
    "pl_lpips_set_target", c_int32, c_void_p, c_void_p, c_int32, c_int64, c_int64, c_int64, c_int64
)
pl_lpips_clear_target = _declare("pl_lpips_clear_target", c_int32, c_void_p)
pl_lpips_spatial_backward = _declare(
    "pl_lpips_spatial_backward", c_int32, c_void_p, c_void_p, c_void_p, c_int32, c_int64, c_int64, c_int64, c_int64,
    ctypes.POINTER(ctypes.c_float), c_void_p,
)
pl_lpips_spatial = _declare(
    "pl_lpips_spatial", c_int32, c_void_p, c_void_p, c_void_p, c_int32, c_int64, c_int64, c_int64, c_int64,
    ctypes.POINTER(c_float), ctypes.POINTER(c_float),
)
pl_lpips_config_init = _declare("pl_lpips_config_init", c_int32, ctypes.POINTER(LpipsConfig))
pl_lpips_create = _declare("pl_lpips_create", c_int32, c_void_p, ctypes.POINTER(LpipsConfig), ctypes.POINTER(c_void_p))
pl_lpips_destroy = _declare("pl_lpips_destroy", None, c_void_p)
pl_lpips_loss = _declare(
    "pl_lpips_loss", c_int32, c_void_p, c_void_p, c_void_p, c_int32, c_int64, c_int64, c_int64, c_int64,
    ctypes.POINTER(Outputs),
)
pl_plan_report_init = _declare("pl_plan_report_init", c_int32, ctypes.POINTER(PlanReport))
pl_perceptual_plan_report, pl_perceptual_resident_plan_report = (
    _declare(name, c_int32, c_void_p, c_int32, c_int64, c_int64, c_int64, c_int64, c_int32, ctypes.POINTER(PlanReport))
    for name in ("pl_perceptual_plan_report", "pl_perceptual_resident_plan_report")
)
pl_seeded_weights_write = _declare("pl_seeded_weights_write", c_int32, c_char_p, c_int32, ctypes.c_uint64)
