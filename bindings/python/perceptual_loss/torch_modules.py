"""PyTorch modules over the C ABI, registered as `torch.library` custom
ops (`perceptual_loss::tv`, `::feature`, `::perceptual`) with fake
implementations and autograd formulas, so `torch.compile` traces through
them without a graph break.

Each op runs on the tensors' own memory (CUDA tensors on their GPU and
PyTorch's current stream; CPU tensors on the CPU backend) and returns the
loss, each image's loss and, when asked, the gradient from the same pass
(the perceptual op also its (perceptual, style) parts); backward scales
that gradient by the incoming ones. No copies. Without autograd
(torch.no_grad(), or an input that needs no gradient) only the losses are
computed."""
import ctypes
import itertools
import threading
import weakref

import torch

from . import (
    CRITERIA, DTYPES, REDUCTIONS, TV_VARIANTS, Context, Lpips, Perceptual, Vgg, _check, _choice, _lib, outputs,
    tv_config, weights_depth,
)

_TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_REDUCTIONS = ("mean", "sum", "none")


class _DeviceContext:
    """One library context per device. A CUDA call is queued on PyTorch's
    current stream of that device: the stream switch and the call that
    follows happen under one lock, so threads on different streams cannot
    interleave them."""

    def __init__(self, device):
        self.context = Context("cpu") if device.type == "cpu" else Context("cuda", device.index or 0)
        self.device = device
        self.lock = threading.Lock()

    def call(self, fn):
        """fn()'s result, run on PyTorch's current stream of the device."""
        with self.lock:
            if self.device.type == "cuda":
                self.context.set_stream(torch.cuda.current_stream(self.device).cuda_stream)
            return fn()


_contexts = {}
_contexts_lock = threading.Lock()


def _context(device):
    key = (device.type, device.index)
    with _contexts_lock:
        if key not in _contexts:
            _contexts[key] = _DeviceContext(device)
        return _contexts[key]


def _check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be N x C x H x W, got shape {tuple(x.shape)}")
    if x.dtype not in _TORCH_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous NCHW (call .contiguous())")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {x.device}; CPU and CUDA tensors are supported")


def _check_pair(a, b, names):
    _check_tensor(a, names[0])
    _check_tensor(b, names[1])
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{names[0]} and {names[1]} differ: {a.dtype}{tuple(a.shape)}@{a.device} vs "
                         f"{b.dtype}{tuple(b.shape)}@{b.device}")
    if torch.is_grad_enabled() and b.requires_grad:
        # The library differentiates w.r.t. the first input only; silently
        # detaching (as BasicSR does) would hide a missing gradient.
        raise ValueError(f"{names[1]} requires grad, but perceptual-loss treats it as a constant: "
                         f"pass {names[1]}.detach()")


def _check_reduction(reduction, options=None):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; one of {list(_REDUCTIONS)}")
    fro = any((options or {}).get(k) == "fro" for k in ("criterion", "style_criterion"))
    if fro and reduction != "mean":
        # A Fro term's value is a norm over the whole batch: an image's
        # value (its own norm) is not what the gradient differentiates.
        raise ValueError("the 'fro' criterion is a norm over the whole batch: use reduction='mean'")
    return reduction


def _outputs_like(x, want_grad, parts=False):
    """The op's outputs: the loss (0-d float32), each image's loss (N
    float32), dL/dx (x's shape and dtype, or empty without one) and, with
    `parts`, the two parts (2 float32)."""
    loss = x.new_empty((), dtype=torch.float32)
    per_sample = x.new_empty((x.shape[0],), dtype=torch.float32)
    grad = torch.empty_like(x) if want_grad else x.new_empty((0,))
    if parts:
        return loss, per_sample, grad, x.new_empty((2,), dtype=torch.float32)
    return loss, per_sample, grad


def _run(x, want_grad, call, parts=False):
    """Allocates the outputs and has `call(pl_outputs)` fill them."""
    results = _outputs_like(x, want_grad, parts)
    loss, per_sample, grad = results[:3]
    out = outputs(loss.data_ptr(), grad.data_ptr() if want_grad else None, per_sample.data_ptr(),
                  parts_ptr=results[3].data_ptr() if parts else None)
    _context(x.device).call(lambda: call(out))
    return results


def _fake(x, *_args):
    return _outputs_like(x, _args[-1])


def _fake_with_parts(x, *_args):
    return _outputs_like(x, _args[-1], parts=True)


def _setup_context(ctx, inputs, output):
    # inputs: (x, ..., summed, want_grad); the batch reduction the loss
    # was computed with decides how an image's gradient follows from it.
    ctx.summed = inputs[-2]
    # The gradient output is a constant to autograd: its own derivative
    # (a second derivative of the loss) is not computed, so asking for one
    # is an error rather than a silent zero.
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2])


def _backward(ctx, grad_loss, grad_per_sample, _grad_of_grad, grad_parts=None):
    """dL/dx for loss = r(l_1..l_N), r a mean (c = 1/N) or a sum (c = 1):
    the library's gradient G is c * dl_n/dx_n on image n, since each image's
    loss depends on that image alone. So an incoming gradient g on the
    loss and g_n on l_n give G * (g + g_n / c) on image n. Scaled in
    float32 and rounded once: a loss scale such as 2**16 would itself
    overflow to inf in float16.

    The parts (perceptual P, style S) sum to the loss and G is the
    gradient of that sum only, so the incoming gradients on them count as
    one on the loss, and must be equal when both parts have terms (as in
    `P + S`); a part without terms is a constant 0 and its gradient is
    ignored."""
    (grad,) = ctx.saved_tensors
    scale = grad.new_zeros((grad.shape[0],), dtype=torch.float32)
    if grad_loss is not None:
        scale = scale + grad_loss.float()
    if grad_parts is not None:
        present = [k for k in (0, 1) if ctx.parts[k]]
        if len(present) == 2:
            message = ("perceptual-loss computes the gradient of perceptual + style only: backpropagate through "
                       "their sum (or use two losses)")
            if torch.compiler.is_compiling() or type(grad_parts) is not torch.Tensor:
                # A traced backward (fake or functional tensors) cannot
                # branch on values; a mismatch then fails on the device.
                torch._assert_async(grad_parts[0] == grad_parts[1], message)
            elif not torch.equal(grad_parts[0], grad_parts[1]):
                raise RuntimeError(message)
        scale = scale + grad_parts[present[0]].float()
    if grad_per_sample is not None:
        scale = scale + grad_per_sample.float() * (1.0 if ctx.summed else grad.shape[0])
    x_grad = (grad.float() * scale.view(-1, 1, 1, 1)).to(grad.dtype)
    return (x_grad,) + (None,) * (ctx.num_inputs - 1)


def _register(op, num_inputs, parts=False, key_at=2):
    op.register_fake(_fake_with_parts if parts else _fake)

    def setup(ctx, inputs, output):
        ctx.num_inputs = num_inputs
        if parts:
            # inputs[key_at] is the loss's key: which parts have terms
            ctx.parts = _perceptual_losses[inputs[key_at]].parts
        _setup_context(ctx, inputs, output)

    op.register_autograd(_backward, setup_context=setup)


# The library may allocate and wait on the host in a call (a new shape's
# plan, check_finite), which a CUDA graph capture forbids: inductor's
# CUDA graphs ("reduce-overhead") leave these ops out of their graphs.
_TAGS = tuple(t for t in [getattr(torch.Tag, "cudagraph_unsafe", None)] if t is not None)


@torch.library.custom_op("perceptual_loss::tv", mutates_args=(), tags=_TAGS)
def _tv_op(x: torch.Tensor, variant: int, weight: float, eps: float, check_finite: bool, summed: bool,
           want_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = _lib.TvConfig()
    _check(_lib.pl_tv_config_init(ctypes.byref(cfg)))
    cfg.variant, cfg.reduction = variant, REDUCTIONS["sum" if summed else "mean"]
    cfg.weight, cfg.eps, cfg.check_finite = weight, eps, int(check_finite)

    def call(out):
        _check(_lib.pl_tv_loss(_context(x.device).context._handle, ctypes.byref(cfg), x.data_ptr(),
                               DTYPES[_TORCH_DTYPES[x.dtype]], *x.shape, ctypes.byref(out)))

    return _run(x, want_grad, call)


@torch.library.custom_op("perceptual_loss::feature", mutates_args=(), tags=_TAGS)
def _feature_op(a: torch.Tensor, b: torch.Tensor, criterion: int, weight: float, check_finite: bool, summed: bool,
                want_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = _lib.FeatureConfig()
    _check(_lib.pl_feature_config_init(ctypes.byref(cfg)))
    cfg.criterion, cfg.weight, cfg.check_finite = criterion, weight, int(check_finite)

    def call(out):
        _check(_lib.pl_feature_loss(_context(a.device).context._handle, ctypes.byref(cfg), a.data_ptr(),
                                    b.data_ptr(), DTYPES[_TORCH_DTYPES[a.dtype]], *a.shape, ctypes.byref(out)))

    return _run(a, want_grad, call)


class _PerceptualLosses:
    """A PerceptualLoss module's library objects: its weights and loss,
    loaded on first use on each device. Registered under a key of its own
    (custom ops take tensors and plain values, so a module passes the key);
    a copy or an unpickled one is a new object with a new key, which loads
    its own weights, and the registry forgets an object once its module
    is gone."""

    def __init__(self, weights, arch, compute, options, kind=Perceptual):
        self.weights, self.arch, self.compute, self.options, self.kind = weights, arch, compute, options, kind
        # (perceptual terms, style terms); the default taps are perceptual
        self.parts = (options.get("taps") is None or len(options["taps"]) > 0,
                      len(options.get("style_taps") or ()) > 0)
        self.by_device = {}
        self.lock = threading.Lock()
        self.key = next(_perceptual_keys)
        _perceptual_losses[self.key] = self

    def __getstate__(self):
        return (self.weights, self.arch, self.compute, self.options, self.kind)

    def __setstate__(self, state):
        self.__init__(*state)

    def on(self, device):
        key = (device.type, device.index)
        with self.lock:
            if key not in self.by_device:
                ctx = _context(device)
                # Loaded on the stream the call runs on, under its lock.
                vgg = ctx.call(lambda: Vgg(self.weights, self.arch, self.compute, context=ctx.context))
                self.by_device[key] = self.kind(vgg, **self.options)
            return self.by_device[key]


_perceptual_losses = weakref.WeakValueDictionary()
_perceptual_keys = itertools.count()


@torch.library.custom_op("perceptual_loss::perceptual", mutates_args=(), tags=_TAGS)
def _perceptual_op(pred: torch.Tensor, target: torch.Tensor, key: int, summed: bool,
                   want_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss = _perceptual_losses[key].on(pred.device)

    def call(out):
        loss.raw(pred.data_ptr(), target.data_ptr(), _TORCH_DTYPES[pred.dtype], tuple(pred.shape), out)

    return _run(pred, want_grad, call, parts=True)


@torch.library.custom_op("perceptual_loss::perceptual_kept", mutates_args=(), tags=_TAGS)
def _perceptual_kept_op(pred: torch.Tensor, key: int, summed: bool,
                        want_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The perceptual op against the target the loss kept (set_target)."""
    loss = _perceptual_losses[key].on(pred.device)

    def call(out):
        loss.raw(pred.data_ptr(), None, _TORCH_DTYPES[pred.dtype], tuple(pred.shape), out)

    return _run(pred, want_grad, call, parts=True)


def _numpy_pair(pred, target):
    """CPU tensors as NumPy arrays for the LPIPS map (float32 holds
    bfloat16 exactly; NumPy has no bfloat16)."""
    if pred.dtype == torch.bfloat16:
        pred, target = pred.float(), target.float()
    return pred.detach().contiguous().numpy(), target.detach().contiguous().numpy()


@torch.library.custom_op("perceptual_loss::lpips_spatial", mutates_args=(), tags=_TAGS)
def _lpips_spatial_op(pred: torch.Tensor, target: torch.Tensor, key: int) -> torch.Tensor:
    """LPIPS's N x 1 x H x W map, float32, on pred's device."""
    lpips = _perceptual_losses[key].on(pred.device)
    if pred.device.type == "cuda":
        pred, target = pred.contiguous(), target.contiguous()
        n, _, h, w = pred.shape
        spatial_map = pred.new_empty((n, 1, h, w), dtype=torch.float32)
        _context(pred.device).call(lambda: lpips.raw_spatial(
            pred.data_ptr(), target.data_ptr(), _TORCH_DTYPES[pred.dtype], tuple(pred.shape),
            spatial_map.data_ptr()))
        return spatial_map
    p, t = _numpy_pair(pred, target)
    spatial_map, _ = _context(pred.device).call(lambda: lpips.spatial(p, t))
    return torch.from_numpy(spatial_map)


@_lpips_spatial_op.register_fake
def _(pred, target, key):
    n, _, h, w = pred.shape
    return pred.new_empty((n, 1, h, w), dtype=torch.float32)


@torch.library.custom_op("perceptual_loss::lpips_spatial_backward", mutates_args=(), tags=_TAGS)
def _lpips_spatial_backward_op(pred: torch.Tensor, target: torch.Tensor, key: int,
                               map_grad: torch.Tensor) -> torch.Tensor:
    """dL/dpred of the map from dL/dmap, in pred's dtype, on pred's device."""
    lpips = _perceptual_losses[key].on(pred.device)
    n, _, h, w = pred.shape
    if map_grad.numel() != n * h * w:
        raise ValueError(f"map_grad has shape {tuple(map_grad.shape)}; the map of {tuple(pred.shape)} has "
                         f"N x 1 x H x W = {(n, 1, h, w)}")
    if pred.device.type == "cuda":
        pred, target = pred.contiguous(), target.contiguous()
        g = map_grad.detach().to(device=pred.device, dtype=torch.float32).contiguous()
        grad = torch.empty_like(pred)
        _context(pred.device).call(lambda: lpips.raw_spatial_backward(
            pred.data_ptr(), target.data_ptr(), _TORCH_DTYPES[pred.dtype], tuple(pred.shape), g.data_ptr(),
            grad.data_ptr()))
        return grad
    p, t = _numpy_pair(pred, target)
    g = map_grad.detach().float().contiguous().numpy()
    grad = _context(pred.device).call(lambda: lpips.spatial_backward(p, t, g))
    return torch.from_numpy(grad).to(pred.dtype)


@_lpips_spatial_backward_op.register_fake
def _(pred, target, key, map_grad):
    return torch.empty_like(pred)


def _spatial_setup(ctx, inputs, output):
    pred, target, ctx.key = inputs
    ctx.save_for_backward(pred, target)


def _spatial_backward(ctx, map_grad):
    pred, target = ctx.saved_tensors
    return _lpips_spatial_backward_op(pred, target, ctx.key, map_grad), None, None


def _no_second_derivative(ctx, grad):
    raise RuntimeError("perceptual-loss gives the LPIPS map's first derivative only")


_lpips_spatial_op.register_autograd(_spatial_backward, setup_context=_spatial_setup)
_lpips_spatial_backward_op.register_autograd(_no_second_derivative, setup_context=lambda ctx, inputs, output: None)
_register(_tv_op, 7)
_register(_feature_op, 7)
_register(_perceptual_op, 5, parts=True)
_register(_perceptual_kept_op, 4, parts=True, key_at=1)


class _KeptTarget:
    """set_target / clear_target, and the op's outputs against a passed or
    the kept target, for modules over `self.losses` (a _PerceptualLosses)."""

    def set_target(self, target):
        """Keeps what the loss needs of `target` on its device for calls
        without one: its features are computed once and later calls run the
        network over pred alone. A target of one image
        serves any batch; later preds have its C, H, W and dtype (float16
        is kept, and later preds computed, as float32)."""
        _check_tensor(target, "target")
        t = target.detach()
        if t.dtype == torch.float16:
            t = t.float()
        loss = self.losses.on(t.device)
        _context(t.device).call(lambda: loss.raw_set_target(t.data_ptr(), _TORCH_DTYPES[t.dtype], tuple(t.shape)))

    def clear_target(self):
        """Drops the kept target on every device."""
        for loss in list(self.losses.by_device.values()):
            loss.clear_target()

    def _outputs(self, pred, target, names=("pred", "target")):
        """(loss, per-image values, gradient, parts) of `pred` against
        `target`, or against the kept target when it is None."""
        if target is None:
            _check_tensor(pred, names[0])
            if pred.dtype == torch.float16:
                pred = pred.float()
            return _perceptual_kept_op(pred, self.losses.key, False, _needs_grad(pred))
        _check_pair(pred, target, names)
        widened = _widened(pred)
        if widened is not pred:
            pred, target = widened, target.float()
        return _perceptual_op(pred, target.detach(), self.losses.key, False, _needs_grad(pred))


def _needs_grad(x):
    return torch.is_grad_enabled() and x.requires_grad


def _widened(x):
    """float16 inputs that need a gradient as float32 (exact): a float16
    gradient of a mean over many elements falls below float16's normal
    range, and is rounded to zero or a few bits, before a GradScaler's
    scale (the incoming gradient) reaches it. In float32 the gradient is
    scaled first and cast back to float16 by autograd afterwards, as when
    autocast runs PyTorch's own losses in float32. The loss value is the
    same."""
    return x.float() if x.dtype == torch.float16 and _needs_grad(x) else x


def _reduced(loss, per_sample, reduction, summed):
    """The module's result from the op's outputs; `summed` says whether
    `loss` already is the batch sum."""
    if reduction == "none":
        return per_sample
    if reduction == "sum" and not summed:
        return per_sample.sum()
    return loss


class TVLoss(torch.nn.Module):
    """Total-variation loss; `variant` as in `perceptual_loss.tv_loss`
    ("article", "l1", "l2_squared", "l2", "isotropic"). `reduction` over
    the batch: "mean" (default), "sum", or "none" for each image's loss."""

    def __init__(self, variant="article", weight=1.0, eps=0.0, check_finite=False, reduction="mean"):
        super().__init__()
        if variant.endswith("_sum"):
            raise ValueError(f"TVLoss takes reduction='sum' instead of the {variant!r} variant name")
        tv_config(variant, float(weight), float(eps), check_finite)  # checks the variant now
        self.variant, self.weight, self.eps, self.check_finite = TV_VARIANTS[variant], float(weight), float(eps), \
            bool(check_finite)
        self.reduction = _check_reduction(reduction)
        # The article's TV is a mean over the batch only.
        self.summed = reduction == "sum" and variant != "article"

    def forward(self, x):
        _check_tensor(x, "x")
        x = _widened(x)
        loss, per_sample, _ = _tv_op(x, self.variant, self.weight, self.eps, self.check_finite, self.summed,
                                     _needs_grad(x))
        return _reduced(loss, per_sample, self.reduction, self.summed)


class FeatureLoss(torch.nn.Module):
    """weight * the mean of (a-b)^2 ("mse") or |a-b| ("mae") over each
    image, reduced over the batch by `reduction`; `b` is a constant."""

    def __init__(self, criterion="mse", weight=1.0, check_finite=False, reduction="mean"):
        super().__init__()
        self.criterion = _choice(CRITERIA, criterion, "criterion")
        self.weight, self.check_finite = float(weight), bool(check_finite)
        self.reduction = _check_reduction(reduction)

    def forward(self, a, b):
        _check_pair(a, b, ("a", "b"))
        widened = _widened(a)
        if widened is not a:
            a, b = widened, b.float()
        loss, per_sample, _ = _feature_op(a, b.detach(), self.criterion, self.weight, self.check_finite, False,
                                          _needs_grad(a))
        return _reduced(loss, per_sample, self.reduction, False)


class PerceptualLoss(_KeptTarget, torch.nn.Module):
    """VGG perceptual loss of `pred` against a constant `target` (or, given
    none, the one `set_target` kept). Weights come from a safetensors file
    (scripts/export_vgg.py) and are loaded once per device, on first use
    there. Options as in `perceptual_loss.Perceptual`; `reduction` over the
    batch: "mean" (default), "sum" or "none"."""

    def __init__(self, weights, arch="vgg16", compute="float32", reduction="mean", **options):
        super().__init__()
        # Fails now, with the library's message, on a missing or malformed
        # file (the header is checked; the weights load on first use).
        weights_depth(weights, arch)
        self.reduction = _check_reduction(reduction, options)
        self.losses = _PerceptualLosses(str(weights), arch, compute, options)

    def plan_report(self, shape, dtype=torch.float32, device="cpu", grad=True, kept=False):
        """What a CUDA call on `shape` costs, from its schedule (see
        `perceptual_loss.Perceptual.plan_report`; `kept`: against a kept
        target), in the compute dtype of the weights as loaded on `device`
        (float32 on the CPU)."""
        loss = self.losses.on(torch.device(device))
        return loss.plan_report(tuple(shape), _TORCH_DTYPES[dtype], grad, kept)

    def forward(self, pred, target=None):
        loss, per_sample, _, _ = self._outputs(pred, target)
        return _reduced(loss, per_sample, self.reduction, False)


class StyleLoss(PerceptualLoss):
    """Style (Gram) loss: weight * sum_j w_j D(G_j(pred), G_j(target)),
    G = F F^T / (C H W) of each image's C x HW features at layer j (names
    or indices, with their weights w_j, in `layers`), D the mean over the
    batch's N*C*C entries of squares ("mse") or absolute values ("l1"), or
    the norm of the whole difference ("fro"). Other options as
    in `PerceptualLoss`."""

    def __init__(self, weights, layers=None, criterion="mse", weight=1.0, arch="vgg16", **options):
        layers = dict(layers or {"relu1_2": 1.0, "relu2_2": 1.0, "relu3_3": 1.0, "relu4_3": 1.0})
        super().__init__(weights, arch=arch, taps=[], style_taps=list(layers),
                         style_tap_weights=[float(w) for w in layers.values()], style_criterion=criterion,
                         style_weight=float(weight), **options)


class LPIPS(_KeptTarget, torch.nn.Module):
    """LPIPS v0.1 (VGG16), as `lpips.LPIPS(net='vgg')`: forward(pred, target)
    returns each image's distance, shape (N, 1, 1, 1). `vgg_weights` is the
    VGG16 safetensors file (scripts/export_vgg.py); `normalize=True` takes
    inputs in [0, 1]; `lin=False` weighs every channel 1; `lin_weights`
    names a safetensors file of lin weights instead of the embedded v0.1
    ones. `spatial=True` returns the N x 1 x H x W map instead (float32,
    on the inputs' device), with its gradient; on CUDA each such call
    allocates its scratch, so it cannot be captured in a CUDA graph.
    `target` is a constant;
    other options as in `perceptual_loss.Lpips`."""

    def __init__(self, vgg_weights, normalize=False, lin=True, spatial=False, lin_weights=None,
                 compute="float32", **options):
        super().__init__()
        self.spatial = bool(spatial)
        weights_depth(vgg_weights, "vgg16")
        options = dict(options, normalize=bool(normalize), lin=bool(lin),
                       lin_weights=None if lin_weights is None else str(lin_weights))
        self.losses = _PerceptualLosses(str(vgg_weights), "vgg16", compute, options, kind=Lpips)

    def _spatial(self, pred, target):
        if target is None:
            raise ValueError("LPIPS(spatial=True) needs the target passed")
        _check_pair(pred, target, ("pred", "target"))
        return _lpips_spatial_op(pred, target, self.losses.key)

    def forward(self, pred, target=None):
        if self.spatial:
            return self._spatial(pred, target)
        return self._outputs(pred, target)[1].view(-1, 1, 1, 1)
