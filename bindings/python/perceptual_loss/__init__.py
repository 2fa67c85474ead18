"""perceptual-loss from Python: total-variation, feature and VGG perceptual
losses with gradients, over the library's C ABI.

The functions take NumPy arrays or any array with `__dlpack__` (PyTorch,
CuPy, JAX) without copies: CPU arrays run on the CPU backend, CUDA arrays
on their GPU (through PyTorch, which then must be installed). The PyTorch
modules (`TVLoss`, `FeatureLoss`, `PerceptualLoss`, `StyleLoss`, and
`perceptual_loss.basicsr.PerceptualLoss`) are imported on demand.

    import numpy as np, perceptual_loss as pl
    loss, grad = pl.tv_loss(np.random.rand(2, 3, 64, 64).astype(np.float32))
"""
import ctypes
import warnings

import numpy as np

from . import _cuda_libs, _lib
from ._cuda_libs import loaded as cuda_libraries

__all__ = [
    "Error", "Context", "Vgg", "Perceptual", "tv_loss", "feature_loss", "weights_depth", "write_seeded_weights",
    "version", "cuda_libraries", "TVLoss", "FeatureLoss", "PerceptualLoss", "StyleLoss", "Lpips", "LPIPS",
]


def __getattr__(name):
    # The PyTorch modules import torch only when asked for.
    if name in ("TVLoss", "FeatureLoss", "PerceptualLoss", "StyleLoss", "LPIPS"):
        from . import torch_modules

        return getattr(torch_modules, name)
    raise AttributeError(name)

# pl_tv_variant; a "_sum" suffix on a name sums over the batch instead of
# taking the mean (the article variant is a mean only).
TV_VARIANTS = {"article": 0, "l1": 1, "l2_squared": 2, "l2": 3, "isotropic": 4}
REDUCTIONS = {"mean": 0, "sum": 1}
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
ARCHS = {"vgg16": 0, "vgg19": 1}
# "fro": the norm of the whole batch's difference (perceptual and style
# terms, CPU only); "l1" is "mae" by BasicSR's name.
CRITERIA = {"mse": 0, "mae": 1, "l1": 1, "fro": 2}
NORMS = {"none": 0, "imagenet": 1, "imagenet_from_pm1": 2, "from_pm1": 3}
POOLINGS = {"max": 0, "avg": 1}


class Error(RuntimeError):
    """A failed library call; the message is the library's."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def _check(status):
    if status != 0:
        raise Error(status, _lib.pl_last_error().decode("utf-8", "replace"))


def _choice(table, value, what):
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"unknown {what} {value!r}; one of {sorted(table)}") from None


def tv_config(variant="article", weight=1.0, eps=0.0, check_finite=False):
    """The pl_tv_config of a variant name ("l1", "l1_sum", ...)."""
    base, summed = (variant[:-4], True) if variant.endswith("_sum") else (variant, False)
    cfg = _lib.TvConfig()
    _check(_lib.pl_tv_config_init(ctypes.byref(cfg)))
    cfg.variant = _choice(TV_VARIANTS, base, "TV variant")
    cfg.reduction = REDUCTIONS["sum" if summed else "mean"]
    cfg.weight, cfg.eps, cfg.check_finite = weight, eps, int(bool(check_finite))
    return cfg


def outputs(loss_ptr, grad_ptr=None, per_sample_ptr=None, beta=0.0, parts_ptr=None):
    """A pl_outputs naming where a call writes (addresses as ints)."""
    out = _lib.Outputs()
    _check(_lib.pl_outputs_init(ctypes.byref(out)))
    out.loss, out.grad, out.per_sample, out.beta = loss_ptr, grad_ptr, per_sample_ptr, beta
    out.parts = parts_ptr
    return out


def _results(loss, grad, per_sample, parts=None):
    """(loss, grad), then each image's loss if asked for, then the
    (perceptual, style) parts if asked for."""
    extra = tuple(v for v in (per_sample, parts) if v is not None)
    return (float(loss[0]), grad) + extra


def version():
    """The library version."""
    return _lib.pl_version().decode()


class Context:
    """A device and its current stream: `Context("cpu")`, or
    `Context("cuda", ordinal, stream)` with a `cudaStream_t` as an int
    (0 = the default stream)."""

    def __init__(self, kind="cpu", ordinal=0, stream=0):
        kinds = {"cpu": 0, "cuda": 1}
        if kind == "cuda":
            _cuda_libs.preload_once()
        handle = ctypes.c_void_p()
        _check(_lib.pl_context_create(_choice(kinds, kind, "device kind"), ordinal, ctypes.c_void_p(stream or None), ctypes.byref(handle)))
        self.kind, self.ordinal, self.stream, self._handle = kind, ordinal, stream, handle

    def set_stream(self, stream):
        """Queues later calls on `stream` (a `cudaStream_t` as an int)."""
        _check(_lib.pl_context_set_stream(self._handle, ctypes.c_void_p(stream or None)))
        self.stream = stream

    def synchronize(self):
        _check(_lib.pl_context_synchronize(self._handle))

    def __del__(self):
        if getattr(self, "_handle", None):
            _lib.pl_context_destroy(self._handle)
            self._handle = None


_cpu = None


def _cpu_context():
    global _cpu
    if _cpu is None:
        _cpu = Context("cpu")
    return _cpu


# DLPack device types (dlpack.h): memory the CPU can read, and CUDA memory.
_DLPACK_HOST = (1, 3)  # kDLCPU, kDLCUDAHost
_DLPACK_CUDA = 2  # kDLCUDA


def _on_cuda(x):
    """Whether `x` is a non-NumPy array in CUDA memory (by DLPack)."""
    if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack_device__"):
        return False
    return x.__dlpack_device__()[0] == _DLPACK_CUDA


def _from_dlpack_cuda(*named):
    """CUDA DLPack arrays as torch tensors sharing their memory, imported
    on PyTorch's current stream (the producer orders its writes before
    it), and checked as the modules check theirs: contiguous NCHW of a
    supported dtype, and a second array of the first one's shape, dtype
    and device."""
    try:
        import torch
    except ImportError:
        raise TypeError(f"{named[0][1]} is a CUDA array: running it needs PyTorch (the GPU's memory is allocated "
                        "through it); install torch, or pass a NumPy array for the CPU backend") from None
    from .torch_modules import _check_pair, _check_tensor

    tensors = [torch.from_dlpack(x) if hasattr(x, "__dlpack__") else x for x, _ in named]
    names = [n for _, n in named]
    with torch.no_grad():
        if len(tensors) == 1:
            _check_tensor(tensors[0], names[0])
        else:
            _check_pair(*tensors, names)
    return tensors


def _image_pair(pred, target):
    """pred and target as `_as_image_batch` takes them, of one shape and dtype."""
    pred, target = _as_image_batch(pred, "pred"), _as_image_batch(target, "target")
    if pred.shape != target.shape or pred.dtype != target.dtype:
        raise ValueError(f"pred and target differ: {pred.dtype}{pred.shape} vs {target.dtype}{target.shape}")
    return pred, target


def _check_map_grad(shape, pred_shape):
    """An error unless dL/dmap of `shape` fits the LPIPS map of a batch of
    `pred_shape`: N x 1 x H x W, or N x H x W."""
    n, _, h, w = pred_shape
    if tuple(shape) not in ((n, 1, h, w), (n, h, w)):
        raise ValueError(f"map_grad has shape {tuple(shape)}; the map of {tuple(pred_shape)} is N x 1 x H x W = "
                         f"{(n, 1, h, w)} (or N x H x W)")


def _as_image_batch(x, name):
    """A C-contiguous float32/float16 NCHW array, or a clear error. Arrays
    from other libraries in memory the CPU can read come in by DLPack,
    without a copy."""
    if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__"):
        device = x.__dlpack_device__()[0] if hasattr(x, "__dlpack_device__") else None
        if device not in _DLPACK_HOST:
            raise TypeError(f"{name} is a DLPack array on device type {device}; CPU and CUDA arrays are supported")
        try:
            x = np.from_dlpack(x)
        except (TypeError, BufferError, RuntimeError) as e:
            raise TypeError(f"{name} cannot be shared with NumPy by DLPack: {e}") from None
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array or have __dlpack__, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must be N x C x H x W, got shape {x.shape}")
    if x.dtype.name not in ("float32", "float16"):
        raise TypeError(f"{name} must be float32 or float16, got {x.dtype}")
    if not x.flags["C_CONTIGUOUS"]:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    return x


def _call_arrays(x, grad, per_sample, parts=False):
    """The loss, gradient, per-sample and parts arrays of a NumPy call, and
    their outputs."""
    g = np.empty_like(x) if grad else None
    loss = np.zeros(1, np.float32)
    per = np.zeros(x.shape[0], np.float32) if per_sample else None
    two = np.zeros(2, np.float32) if parts else None
    addr = lambda a: None if a is None else a.ctypes.data  # noqa: E731
    return loss, g, per, two, outputs(loss.ctypes.data, addr(g), addr(per), parts_ptr=addr(two))


def _cuda_results(ran, grad, per_sample, parts=None):
    """(loss, grad, [per_sample], [parts]) of a CUDA call from a torch op's
    outputs; the arrays stay torch CUDA tensors (any DLPack consumer takes
    them without a copy: `cupy.from_dlpack(grad)`)."""
    loss, per, g = ran[:3]
    return _results(loss.reshape(1).cpu(), g if grad else None, per if per_sample else None, parts)


def tv_loss(x, variant="article", weight=1.0, grad=True, eps=0.0, per_sample=False, check_finite=False):
    """Total-variation loss of a batch (NumPy, or any array with
    `__dlpack__`). Returns (loss, dL/dx or None), and each image's loss
    last with `per_sample=True`. Variants as in the README ("article",
    "l1", "l2_squared", "l2", "isotropic", each but the article with "_sum"
    for a sum over the batch); `eps` goes inside the isotropic square root;
    `check_finite` makes a NaN or infinite input an error naming it."""
    cfg = tv_config(variant, weight, eps, check_finite)
    if _on_cuda(x):
        from .torch_modules import _tv_op

        (t,) = _from_dlpack_cuda((x, "x"))
        return _cuda_results(_tv_op(t, cfg.variant, cfg.weight, cfg.eps, bool(check_finite),
                                    cfg.reduction == REDUCTIONS["sum"], grad), grad, per_sample)
    x = _as_image_batch(x, "x")
    loss, g, per, _, out = _call_arrays(x, grad, per_sample)
    _check(_lib.pl_tv_loss(_cpu_context()._handle, ctypes.byref(cfg), x.ctypes.data, DTYPES[x.dtype.name], *x.shape,
                           ctypes.byref(out)))
    return _results(loss, g, per)


def feature_loss(a, b, criterion="mse", weight=1.0, grad=True, per_sample=False, check_finite=False):
    """weight * the mean over all elements of (a-b)^2 ("mse") or |a-b|
    ("mae") of two batches (NumPy, or any arrays with `__dlpack__`).
    Returns (loss, dL/da or None), and each image's weight * mean last
    with `per_sample=True`."""
    if _on_cuda(a) or _on_cuda(b):
        from .torch_modules import _feature_op

        ta, tb = _from_dlpack_cuda((a, "a"), (b, "b"))
        return _cuda_results(_feature_op(ta, tb, _choice(CRITERIA, criterion, "criterion"), float(weight),
                                         bool(check_finite), False, grad), grad, per_sample)
    a, b = _as_image_batch(a, "a"), _as_image_batch(b, "b")
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"a and b differ: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
    cfg = _lib.FeatureConfig()
    _check(_lib.pl_feature_config_init(ctypes.byref(cfg)))
    cfg.criterion, cfg.weight = _choice(CRITERIA, criterion, "criterion"), weight
    cfg.check_finite = int(bool(check_finite))
    loss, g, per, _, out = _call_arrays(a, grad, per_sample)
    _check(_lib.pl_feature_loss(_cpu_context()._handle, ctypes.byref(cfg), a.ctypes.data, b.ctypes.data,
                                DTYPES[a.dtype.name], *a.shape, ctypes.byref(out)))
    return _results(loss, g, per)


def write_seeded_weights(path, arch="vgg16", seed=0):
    """Writes deterministic stand-in VGG weights (for demos and tests; real
    runs use weights exported with scripts/export_vgg.py)."""
    _check(_lib.pl_seeded_weights_write(str(path).encode(), _choice(ARCHS, arch, "arch"), seed))


def _vgg_options(arch, compute, depth):
    opts = _lib.VggOptions()
    _check(_lib.pl_vgg_options_init(ctypes.byref(opts)))
    opts.arch = _choice(ARCHS, arch, "arch")
    opts.compute = _choice(DTYPES, compute, "compute dtype")
    opts.depth = -1 if depth is None else depth
    return opts


def weights_depth(path, arch="vgg16", depth=None):
    """The index of the deepest VGG module a load of `path` would take
    (30 for all of VGG16's `features`), checking the file's header
    (names, shapes, dtypes, byte ranges) without reading tensor data:
    raises `Error` with the library's message for a missing or malformed
    file."""
    out = ctypes.c_int32()
    _check(_lib.pl_vgg_depth(str(path).encode(), ctypes.byref(_vgg_options(arch, "float32", depth)), ctypes.byref(out)))
    return out.value


class Vgg:
    """VGG `features` weights from a safetensors file, resident on the
    context's device; shared by any number of `Perceptual` losses."""

    def __init__(self, path, arch="vgg16", compute="float32", context=None, depth=None):
        """`depth`: the deepest module to load (22 = relu4_3), or None for as
        deep as the file goes. `compute` applies on CUDA; the CPU backend
        computes in float32 (a warning says so when another is asked)."""
        self.context = context or _cpu_context()
        if self.context.kind == "cpu" and compute != "float32":
            warnings.warn(f"compute={compute!r} applies on CUDA; the CPU backend computes in float32", stacklevel=2)
        opts = _vgg_options(arch, compute, depth)
        handle = ctypes.c_void_p()
        _check(_lib.pl_vgg_load(self.context._handle, str(path).encode(), ctypes.byref(opts), ctypes.byref(handle)))
        self.arch, self._handle = arch, handle

    def __del__(self):
        if getattr(self, "_handle", None):
            _lib.pl_vgg_destroy(self._handle)
            self._handle = None


def _set_taps(cfg, prefix, taps, weights, keep):
    """Fills the config's `{prefix}taps`/`{prefix}tap_names`, its count and
    weights from a list of indices or of names; `keep` holds the arrays the
    config points into until the create call returns."""
    if all(isinstance(t, str) for t in taps):
        names = (ctypes.c_char_p * len(taps))(*[t.encode() for t in taps])
        keep.append(names)
        setattr(cfg, f"{prefix}taps", None)
        setattr(cfg, f"{prefix}tap_names", ctypes.cast(names, ctypes.POINTER(ctypes.c_char_p)))
    elif all(isinstance(t, int) for t in taps):
        idx = (ctypes.c_int32 * len(taps))(*taps)
        keep.append(idx)
        setattr(cfg, f"{prefix}taps", ctypes.cast(idx, ctypes.POINTER(ctypes.c_int32)))
    else:
        raise TypeError(f"{prefix}taps must be all indices or all names")
    setattr(cfg, f"num_{prefix}taps", len(taps))
    if weights is not None:
        w = (ctypes.c_float * len(weights))(*weights)
        keep.append(w)
        setattr(cfg, f"{prefix}tap_weights", ctypes.cast(w, ctypes.POINTER(ctypes.c_float)))
        setattr(cfg, f"num_{prefix}tap_weights", len(weights))


def _device_options(cfg, allow_tf32, max_chunk_images, memory_budget, check_finite, cuda_graphs):
    """The options a perceptual or LPIPS config shares: TF32, chunking, the
    memory budget (bytes, or None for no limit), check_finite and CUDA
    graphs."""
    cfg.allow_tf32, cfg.check_finite = int(bool(allow_tf32)), int(bool(check_finite))
    cfg.cuda_graphs = int(bool(cuda_graphs))
    cfg.max_chunk_images = max_chunk_images
    if memory_budget is not None and memory_budget <= 0:
        raise ValueError("memory_budget must be a positive number of bytes (or None for no limit)")
    cfg.memory_budget_bytes = memory_budget or 0


class Perceptual:
    """A perceptual loss over `vgg`. Defaults are the article's: taps
    relu1_2, relu2_2, relu3_3, relu4_3, MSE, unit weights, no input
    normalisation. `taps` are indices or names ("relu3_3", "conv5_4"); an
    empty list means no perceptual terms (a style loss alone).
    `style_taps` add style terms: the Gram matrices F F^T / (C H W) of
    those layers compared by `style_criterion` ("mse", "l1"/"mae" or
    "fro"), weighted per tap and by `style_weight`. On CUDA,
    `max_chunk_images` and `memory_budget` (bytes for buffers and cuDNN
    workspace) split the batch into chunks; the loss is the same.
    `check_finite` makes a NaN or infinite input an error naming it.
    `cuda_graphs` replays CUDA calls from CUDA graphs of the whole call
    (captured at a shape's second call; the same results);
    PERCEPTUAL_LOSS_CUDA_GRAPHS=1 or 0 overrides it."""

    def __init__(self, vgg, taps=None, tap_weights=None, criterion="mse", input_norm="none", pooling="max",
                 weight=1.0, allow_tf32=False, max_chunk_images=0, memory_budget=None, check_finite=False,
                 style_taps=None, style_tap_weights=None, style_criterion="mse", style_weight=1.0,
                 cuda_graphs=False):
        cfg = _lib.PerceptualConfig()
        _check(_lib.pl_perceptual_config_init(ctypes.byref(cfg)))  # the article's defaults
        keep = []  # arrays the config points into, alive until create returns
        if taps is not None:
            _set_taps(cfg, "", list(taps), tap_weights, keep)
        elif tap_weights is not None:
            _set_taps(cfg, "", [3, 8, 15, 22], tap_weights, keep)
        if style_taps is not None:
            _set_taps(cfg, "style_", list(style_taps), style_tap_weights, keep)
        cfg.criterion = _choice(CRITERIA, criterion, "criterion")
        cfg.style_criterion = _choice(CRITERIA, style_criterion, "style criterion")
        cfg.style_weight = style_weight
        cfg.input_norm = _choice(NORMS, input_norm, "input normalisation")
        cfg.pooling = _choice(POOLINGS, pooling, "pooling")
        cfg.weight = weight
        _device_options(cfg, allow_tf32, max_chunk_images, memory_budget, check_finite, cuda_graphs)
        handle = ctypes.c_void_p()
        _check(_lib.pl_perceptual_create(vgg._handle, ctypes.byref(cfg), ctypes.byref(handle)))
        self.vgg, self._handle = vgg, handle

    def plan_report(self, shape, dtype="float32", grad=True, kept=False):
        """What one CUDA call on inputs of `shape` (N, C, H, W) and `dtype`
        costs, counted from its schedule without running anything (no GPU
        needed), in the weights' compute dtype (float32 for weights on the
        CPU): {"chunks", "kernel_launches", "cudnn_calls",
        "kernel_bytes_read", "kernel_bytes_written", "conv_flops", "gram_flops",
        "graph_nodes"} (graph_nodes: the nodes of its CUDA graph with
        `cuda_graphs`, as the Rust `PlanReport::graph_nodes` counts them).
        With `kept`, of a call against a kept target (`set_target`): the
        network runs over pred alone."""
        report = _lib.PlanReport()
        _check(_lib.pl_plan_report_init(ctypes.byref(report)))
        of = _lib.pl_perceptual_resident_plan_report if kept else _lib.pl_perceptual_plan_report
        _check(of(self._handle, _choice(DTYPES, dtype, "dtype"), *shape, int(bool(grad)), ctypes.byref(report)))
        counts = {name: getattr(report, name) for name, _ in _lib.PlanReport._fields_[1:]}
        counts["graph_nodes"] = counts["kernel_launches"] + counts["cudnn_calls"] + 1  # and pl_vgg_publish
        return counts

    def raw(self, pred_ptr, target_ptr, dtype, shape, out):
        """The C call on raw addresses (device addresses for a CUDA
        context; a target of None means the kept one); `out` is a
        pl_outputs from `outputs()`."""
        _check(_lib.pl_perceptual_loss(self._handle, pred_ptr, target_ptr, DTYPES[dtype], *shape, ctypes.byref(out)))

    def raw_set_target(self, ptr, dtype, shape):
        """`set_target` on a raw address."""
        _check(_lib.pl_perceptual_set_target(self._handle, ptr, DTYPES[dtype], *shape))

    def clear_target(self):
        """Drops the kept target."""
        _check(_lib.pl_perceptual_clear_target(self._handle))

    def set_target(self, target):
        """Keeps what the loss needs of `target` (N x C x H x W, NumPy or any
        array with `__dlpack__`, on this loss's device) for calls with
        `target=None`: its features are computed once and later calls run
        the network over pred alone. A target of one image
        serves any batch size; later preds have its C, H, W and dtype. The
        caller may change `target` afterwards."""
        if _on_cuda(target):
            import torch

            (t,) = _from_dlpack_cuda((target, "target"))
            torch.cuda.current_stream(t.device).synchronize()
            from .torch_modules import _TORCH_DTYPES
            self.raw_set_target(t.data_ptr(), _TORCH_DTYPES[t.dtype], tuple(t.shape))
            return
        t = _as_image_batch(target, "target")
        self.raw_set_target(t.ctypes.data, t.dtype.name, t.shape)

    def __call__(self, pred, target=None, grad=True, per_sample=False, parts=False):
        """Loss and dL/dpred, then each image's loss with
        `per_sample=True`, then the (perceptual, style) parts as two floats
        with `parts=True`, of NumPy batches (or any CPU arrays
        with `__dlpack__`) for weights on the CPU, or CUDA arrays with
        `__dlpack__` for weights on that GPU (returned as torch tensors).
        Without a target, the one `set_target` kept."""
        if _on_cuda(pred) or (target is not None and _on_cuda(target)):
            return self._call_cuda(pred, target, grad, per_sample, parts)
        if self.vgg.context.kind != "cpu":
            raise TypeError("pred is in host memory but this loss's weights are on CUDA: pass CUDA arrays")
        if target is None:
            pred = _as_image_batch(pred, "pred")
        else:
            pred, target = _image_pair(pred, target)
        loss, g, per, two, out = _call_arrays(pred, grad, per_sample, parts)
        self.raw(pred.ctypes.data, None if target is None else target.ctypes.data, pred.dtype.name, pred.shape, out)
        return _results(loss, g, per, two)

    def _cuda_inputs(self, pred, target):
        """pred and target (None: the kept one) as torch tensors on this
        loss's GPU, or a clear error."""
        ctx = self.vgg.context
        if ctx.kind != "cuda":
            raise TypeError("pred is a CUDA array but this loss's weights are on the CPU: load the Vgg with "
                            "context=Context('cuda', ordinal)")
        if target is None:
            (p,) = _from_dlpack_cuda((pred, "pred"))
            t = None
        else:
            p, t = _from_dlpack_cuda((pred, "pred"), (target, "target"))
        if p.device.index != ctx.ordinal:
            raise ValueError(f"pred is on cuda:{p.device.index} but this loss's weights are on cuda:{ctx.ordinal}")
        return p, t

    def _call_cuda(self, pred, target, grad, per_sample, parts):
        import torch

        from .torch_modules import _TORCH_DTYPES, _outputs_like

        ctx = self.vgg.context
        p, t = self._cuda_inputs(pred, target)
        loss, per, g, two = _outputs_like(p, grad, parts=True)
        # The arrays were imported, and the outputs allocated, on PyTorch's
        # current stream, while this context queues on its own: wait for
        # PyTorch's work before the call and for the call before returning.
        torch.cuda.current_stream(p.device).synchronize()
        self.raw(p.data_ptr(), None if t is None else t.data_ptr(), _TORCH_DTYPES[p.dtype], tuple(p.shape),
                 outputs(loss.data_ptr(), g.data_ptr() if grad else None, per.data_ptr(),
                         parts_ptr=two.data_ptr() if parts else None))
        ctx.synchronize()
        return _cuda_results((loss, per, g), grad, per_sample, two if parts else None)

    def __del__(self):
        if getattr(self, "_handle", None):
            _lib.pl_perceptual_destroy(self._handle)
            self._handle = None


class Lpips(Perceptual):
    """LPIPS v0.1 (VGG16) over `vgg` (loaded to relu5_3 at least), as
    `lpips.LPIPS(net='vgg')` defines it: inputs in [-1, 1] (`normalize=True`:
    [0, 1]), the embedded v0.1 lin weights (`lin=False`: all 1;
    `lin_weights`: a safetensors file with lin0..lin4). Calls return (mean
    distance, its gradient w.r.t. pred or None) and, with
    `per_sample=True`, each image's distance; as `Perceptual` otherwise."""

    def __init__(self, vgg, normalize=False, lin=True, lin_weights=None, weight=1.0, allow_tf32=False,
                 max_chunk_images=0, memory_budget=None, check_finite=False, cuda_graphs=False):
        cfg = _lib.LpipsConfig()
        _check(_lib.pl_lpips_config_init(ctypes.byref(cfg)))
        cfg.normalize, cfg.lin, cfg.weight = int(bool(normalize)), int(bool(lin)), weight
        cfg.lin_weights_path = None if lin_weights is None else str(lin_weights).encode()
        _device_options(cfg, allow_tf32, max_chunk_images, memory_budget, check_finite, cuda_graphs)
        handle = ctypes.c_void_p()
        _check(_lib.pl_lpips_create(vgg._handle, ctypes.byref(cfg), ctypes.byref(handle)))
        self.vgg, self._handle = vgg, handle

    def plan_report(self, shape, dtype="float32", grad=True):
        raise NotImplementedError("plan_report is the perceptual loss's")

    def raw(self, pred_ptr, target_ptr, dtype, shape, out):
        """The C call on raw addresses; `out` is a pl_outputs from `outputs()`."""
        _check(_lib.pl_lpips_loss(self._handle, pred_ptr, target_ptr, DTYPES[dtype], *shape, ctypes.byref(out)))

    def raw_set_target(self, ptr, dtype, shape):
        _check(_lib.pl_lpips_set_target(self._handle, ptr, DTYPES[dtype], *shape))

    def spatial(self, pred, target):
        """(map, layers) of NumPy batches on a CPU network, as
        `lpips.LPIPS(spatial=True)` and `retPerLayer=True` give them: the
        N x 1 x H x W map (each layer's per-pixel values resized bilinearly,
        align_corners=False, and summed) and the N x 5 per-layer distances.
        The map's gradient is `spatial_backward`'s. CUDA arrays (by DLPack,
        on this loss's device) give torch CUDA tensors."""
        if _on_cuda(pred) or _on_cuda(target):
            return self._spatial_cuda(pred, target, None)
        pred, target = _image_pair(pred, target)
        n, _, h, w = pred.shape
        spatial_map = np.empty((n, 1, h, w), np.float32)
        layers = np.empty((n, 5), np.float32)
        self.raw_spatial(pred.ctypes.data, target.ctypes.data, pred.dtype.name, pred.shape, spatial_map.ctypes.data,
                         layers.ctypes.data)
        return spatial_map, layers

    def _spatial_cuda(self, pred, target, map_grad):
        """`spatial` (map_grad None: (map, layers)) or `spatial_backward`
        (the gradient) of CUDA arrays, as torch CUDA tensors."""
        import torch

        from .torch_modules import _TORCH_DTYPES

        if target is None:
            raise TypeError("the LPIPS map needs the target passed")
        ctx = self.vgg.context
        p, t = self._cuda_inputs(pred, target)  # checked as a pair: one shape, dtype and device
        n, _, h, w = p.shape
        args = (p.data_ptr(), t.data_ptr(), _TORCH_DTYPES[p.dtype], tuple(p.shape))
        if map_grad is not None:
            g = torch.from_dlpack(map_grad) if not isinstance(map_grad, torch.Tensor) else map_grad
            g = g.to(device=p.device, dtype=torch.float32).contiguous()
            _check_map_grad(tuple(g.shape), tuple(p.shape))
            grad = torch.empty_like(p)
        else:
            spatial_map = torch.empty((n, 1, h, w), dtype=torch.float32, device=p.device)
            layers = torch.empty((n, 5), dtype=torch.float32, device=p.device)
        # As `_call_cuda`: PyTorch's stream's work first, the call's before returning.
        torch.cuda.current_stream(p.device).synchronize()
        if map_grad is not None:
            self.raw_spatial_backward(*args, g.data_ptr(), grad.data_ptr())
        else:
            self.raw_spatial(*args, spatial_map.data_ptr(), layers.data_ptr())
        ctx.synchronize()
        return grad if map_grad is not None else (spatial_map, layers)

    def raw_spatial(self, pred_ptr, target_ptr, dtype, shape, map_ptr, layers_ptr=None):
        """`spatial` on raw addresses (device addresses for a CUDA context,
        queued on its stream): the map into `map_ptr` (N*H*W floats), the
        per-layer distances into `layers_ptr` (N*5 floats) unless None."""
        as_float = lambda p: ctypes.cast(p, ctypes.POINTER(ctypes.c_float)) if p else None  # noqa: E731
        _check(_lib.pl_lpips_spatial(self._handle, pred_ptr, target_ptr, DTYPES[dtype], *shape, as_float(map_ptr),
                                     as_float(layers_ptr)))

    def raw_spatial_backward(self, pred_ptr, target_ptr, dtype, shape, map_grad_ptr, grad_ptr):
        """`spatial_backward` on raw addresses, as `raw_spatial`: dL/dmap
        from `map_grad_ptr` (N*H*W floats), dL/dpred into `grad_ptr`."""
        map_grad = ctypes.cast(map_grad_ptr, ctypes.POINTER(ctypes.c_float))
        _check(_lib.pl_lpips_spatial_backward(self._handle, pred_ptr, target_ptr, DTYPES[dtype], *shape, map_grad,
                                              grad_ptr))

    def spatial_backward(self, pred, target, map_grad):
        """The gradient w.r.t. `pred` (an array of its shape and dtype) of
        the map `spatial` gives, from `map_grad` (N x 1 x H x W or N x H x
        W, the gradient of the map); 0 at a pixel whose features are all 0.
        CUDA arrays give a torch CUDA tensor, as `spatial`."""
        if _on_cuda(pred) or _on_cuda(target):
            return self._spatial_cuda(pred, target, map_grad)
        pred, target = _image_pair(pred, target)
        map_grad = np.ascontiguousarray(map_grad, np.float32)
        _check_map_grad(map_grad.shape, pred.shape)
        grad = np.empty_like(pred)
        self.raw_spatial_backward(pred.ctypes.data, target.ctypes.data, pred.dtype.name, pred.shape,
                                  map_grad.ctypes.data, grad.ctypes.data)
        return grad

    def clear_target(self):
        _check(_lib.pl_lpips_clear_target(self._handle))

    def __del__(self):
        if getattr(self, "_handle", None):
            _lib.pl_lpips_destroy(self._handle)
            self._handle = None
