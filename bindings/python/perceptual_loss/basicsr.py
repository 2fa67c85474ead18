"""BasicSR's `PerceptualLoss` (basicsr/losses/basic_loss.py) with its exact
constructor, over perceptual-loss: one forward over pred and target gives
both the perceptual and the style value.

    from perceptual_loss.basicsr import PerceptualLoss
    loss = PerceptualLoss({"conv5_4": 1.0}, weights="vgg19.safetensors",
                          perceptual_weight=1.0, style_weight=0.0)
    percep, style = loss(sr, gt)    # style is None: its weight is 0

As in BasicSR: `layer_weights` names the layers (a `conv` name is the
output before its ReLU) and weighs both losses; the style loss compares
Gram matrices F F^T / (C H W) with the same criterion; "l1" and "l2" are
means over all elements, "fro" the norm of the whole batch's difference;
each value is None when its weight is not positive. The gradient reaching
the image is that of percep + style: backpropagate through their sum.
`weights` is the safetensors file of the VGG (scripts/export_vgg.py); the
other keyword arguments are `perceptual_loss.PerceptualLoss`'s.
"""
import torch

from .torch_modules import PerceptualLoss as _Loss
from .torch_modules import _check_tensor

_CRITERIA = {"l1": "mae", "l2": "mse", "fro": "fro"}


class PerceptualLoss(torch.nn.Module):
    """(percep_loss, style_loss) of `x` against the constant `gt`."""

    def __init__(self, layer_weights, vgg_type="vgg19", use_input_norm=True, range_norm=False,
                 perceptual_weight=1.0, style_weight=0.0, criterion="l1", *, weights, **options):
        super().__init__()
        if criterion not in _CRITERIA:
            raise NotImplementedError(f"{criterion} criterion has not been supported.")
        if not layer_weights:
            raise ValueError("layer_weights names no layer")
        if perceptual_weight <= 0 and style_weight <= 0:
            raise ValueError("perceptual_weight and style_weight are both 0: the loss would compute nothing")
        norm = {(True, True): "imagenet_from_pm1", (True, False): "imagenet", (False, True): "from_pm1",
                (False, False): "none"}[(bool(use_input_norm), bool(range_norm))]
        names, layer_w = list(layer_weights), [float(w) for w in layer_weights.values()]
        self.perceptual_weight, self.style_weight = float(perceptual_weight), float(style_weight)
        percep, style = self.perceptual_weight > 0, self.style_weight > 0
        self.loss = _Loss(
            weights, arch=vgg_type, input_norm=norm, criterion=_CRITERIA[criterion],
            taps=names if percep else [], tap_weights=layer_w if percep else None,
            weight=self.perceptual_weight if percep else 1.0,
            style_taps=names if style else None, style_tap_weights=layer_w if style else None,
            style_criterion=_CRITERIA[criterion], style_weight=self.style_weight if style else 1.0, **options)

    def forward(self, x, gt):
        _check_tensor(gt, "gt")  # always passed: never the kept target
        _, _, _, parts = self.loss._outputs(x, gt, ("x", "gt"))
        percep = parts[0] if self.perceptual_weight > 0 else None
        style = parts[1] if self.style_weight > 0 else None
        return percep, style
