"""Loads the perceptual-loss shared library and declares its C ABI
(include/perceptual_loss.h) for ctypes. No compiler is needed.

The library is found, in order, at $PERCEPTUAL_LOSS_LIB, next to this
package, or in the repository's target/release and target/debug."""
import ctypes
import os
import pathlib
import sys

_NAMES = {"linux": "libperceptual_loss.so", "darwin": "libperceptual_loss.dylib", "win32": "perceptual_loss.dll"}


def _candidates():
    if os.environ.get("PERCEPTUAL_LOSS_LIB"):
        yield pathlib.Path(os.environ["PERCEPTUAL_LOSS_LIB"])
    name = _NAMES.get(sys.platform, "libperceptual_loss.so")
    here = pathlib.Path(__file__).resolve().parent
    yield here / name
    repo = here.parents[2]
    for profile in ("release", "debug"):
        yield repo / "target" / profile / name


def _load():
    tried = []
    for path in _candidates():
        tried.append(str(path))
        if path.is_file():
            return ctypes.CDLL(str(path))
    raise OSError(
        "perceptual-loss library not found; build it with `cargo build --release` "
        "or set PERCEPTUAL_LOSS_LIB. Tried: " + ", ".join(tried)
    )


lib = _load()

c_int32, c_int64, c_float, c_void_p, c_char_p = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_char_p


class PerceptualConfig(ctypes.Structure):
    """pl_perceptual_config, field for field."""

    _fields_ = [
        ("taps", ctypes.POINTER(c_int32)),
        ("tap_names", ctypes.POINTER(c_char_p)),
        ("num_taps", ctypes.c_size_t),
        ("tap_weights", ctypes.POINTER(c_float)),
        ("num_tap_weights", ctypes.c_size_t),
        ("criterion", c_int32),
        ("input_norm", c_int32),
        ("pooling", c_int32),
        ("weight", c_float),
        ("allow_tf32", c_int32),
        ("max_chunk_images", ctypes.c_size_t),
        ("memory_budget_bytes", ctypes.c_size_t),
    ]


def _declare(name, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


pl_version = _declare("pl_version", c_char_p)
pl_last_error = _declare("pl_last_error", c_char_p)
pl_context_create = _declare("pl_context_create", c_int32, c_int32, ctypes.c_int, c_void_p, ctypes.POINTER(c_void_p))
pl_context_destroy = _declare("pl_context_destroy", None, c_void_p)
pl_context_synchronize = _declare("pl_context_synchronize", c_int32, c_void_p)
pl_context_set_stream = _declare("pl_context_set_stream", c_int32, c_void_p, c_void_p)
pl_tv_loss = _declare(
    "pl_tv_loss", c_int32, c_void_p, c_void_p, c_int32, c_int64, c_int64, c_int64, c_int64, c_int32, c_float, c_void_p, c_void_p
)
pl_vgg_load = _declare("pl_vgg_load", c_int32, c_void_p, c_char_p, c_int32, c_int32, ctypes.POINTER(c_void_p))
pl_vgg_destroy = _declare("pl_vgg_destroy", None, c_void_p)
pl_perceptual_create = _declare(
    "pl_perceptual_create", c_int32, c_void_p, ctypes.POINTER(PerceptualConfig), ctypes.POINTER(c_void_p)
)
pl_perceptual_destroy = _declare("pl_perceptual_destroy", None, c_void_p)
pl_perceptual_loss = _declare(
    "pl_perceptual_loss", c_int32, c_void_p, c_void_p, c_void_p, c_int32, c_int64, c_int64, c_int64, c_int64, c_void_p, c_void_p
)
pl_seeded_weights_write = _declare("pl_seeded_weights_write", c_int32, c_char_p, c_int32, ctypes.c_uint64)
