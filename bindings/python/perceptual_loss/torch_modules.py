"""PyTorch modules over the C ABI: the forward runs on the tensors' own
memory (CUDA tensors on their GPU and PyTorch's current stream; CPU tensors
on the CPU backend), computes the gradient in the same pass and keeps it
for backward, which scales it by the incoming gradient. No copies. Without
autograd (torch.no_grad(), or an input that needs no gradient) only the
loss is computed."""
import ctypes

import torch

from . import Context, DTYPES, Perceptual, Vgg, _check, _lib, outputs, tv_config, weights_depth

_TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_contexts = {}


def _context(device):
    """One context per device, on PyTorch's current stream of that device."""
    key = (device.type, device.index)
    if key not in _contexts:
        _contexts[key] = Context("cpu") if device.type == "cpu" else Context("cuda", device.index or 0)
    ctx = _contexts[key]
    if device.type == "cuda":
        ctx.set_stream(torch.cuda.current_stream(device).cuda_stream)
    return ctx


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


def _run(run, x, with_grad):
    """The loss as a 0-d float32 tensor on x's device, and dL/dx or None."""
    loss = torch.empty(1, dtype=torch.float32, device=x.device)
    grad = torch.empty_like(x) if with_grad else None
    run(loss.data_ptr(), None if grad is None else grad.data_ptr())
    return loss.reshape(()), grad


class _LossFunction(torch.autograd.Function):
    """forward(run, x, *others) -> loss; `run(loss_out, grad_out)` fills both."""

    @staticmethod
    def forward(ctx, run, x, *others):
        loss, grad = _run(run, x, True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # Scaled in float32 and rounded once: a loss scale such as 2**16
        # would itself overflow to inf in float16.
        scaled = (grad.float() * grad_output.float()).to(grad.dtype)
        # No gradient for `run` or the constant inputs (the target).
        return (None, scaled) + (None,) * (len(ctx.needs_input_grad) - 2)


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


def _apply(run, x, *others):
    """Through autograd when x needs a gradient; otherwise the loss alone,
    with no gradient work (as under torch.no_grad())."""
    if _needs_grad(x):
        return _LossFunction.apply(run, x, *others)
    return _run(run, x, False)[0]


class TVLoss(torch.nn.Module):
    """Total-variation loss; `variant` as in `perceptual_loss.tv_loss`."""

    def __init__(self, variant="article", weight=1.0, eps=0.0, check_finite=False):
        super().__init__()
        self.config = tv_config(variant, float(weight), float(eps), check_finite)  # checks the variant now

    def forward(self, x):
        _check_tensor(x, "x")
        x = _widened(x)
        ctx = _context(x.device)

        def run(loss_ptr, grad_ptr):
            out = outputs(loss_ptr, grad_ptr)
            _check(_lib.pl_tv_loss(ctx._handle, ctypes.byref(self.config), x.data_ptr(),
                                   DTYPES[_TORCH_DTYPES[x.dtype]], *x.shape, ctypes.byref(out)))

        return _apply(run, x)


class PerceptualLoss(torch.nn.Module):
    """VGG perceptual loss of `pred` against a constant `target`. Weights
    come from a safetensors file (scripts/export_vgg.py) and are loaded once
    per device, on first use there. Options as in `perceptual_loss.Perceptual`."""

    def __init__(self, weights, arch="vgg16", compute="float32", **options):
        super().__init__()
        # Fails now, with the library's message, on a missing or malformed
        # file (the header is checked; the weights load on first use).
        weights_depth(weights, arch)
        self.weights, self.arch, self.compute, self.options = str(weights), arch, compute, options
        self._losses = {}

    def _loss(self, device):
        key = (device.type, device.index)
        if key not in self._losses:
            ctx = _context(device)
            self._losses[key] = Perceptual(Vgg(self.weights, self.arch, self.compute, context=ctx), **self.options)
        _context(device)  # follow the current stream
        return self._losses[key]

    def forward(self, pred, target):
        _check_tensor(pred, "pred")
        _check_tensor(target, "target")
        if pred.shape != target.shape or pred.dtype != target.dtype or pred.device != target.device:
            raise ValueError(f"pred and target differ: {pred.dtype}{tuple(pred.shape)}@{pred.device} vs "
                             f"{target.dtype}{tuple(target.shape)}@{target.device}")
        loss = self._loss(pred.device)
        widened = _widened(pred)
        if widened is not pred:
            pred, target = widened, target.float()
        target = target.detach()

        def run(loss_ptr, grad_ptr):
            loss.raw(pred.data_ptr(), target.data_ptr(), _TORCH_DTYPES[pred.dtype], tuple(pred.shape),
                     outputs(loss_ptr, grad_ptr))

        return _apply(run, pred, target)
