"""Recomputes a perceptual loss and its gradient with torchvision's VGG and
autograd, from the weights file and a dump written by the crate's
`perceptual_dump` example, and prints the relative errors.

    python3 scripts/torch_reference.py WEIGHTS DUMP [--device cuda|cpu]

The reference runs in float64 on the given device (TF32 is irrelevant
there), so the errors printed are the crate's own. The exit status is 1
when either relative error is above the tolerance for the dump's dtype:
1e-5 for f32 (TF32 off), 2e-2 for f16 and bf16, except that a half-
precision gradient also passes when it is within 1.5 times PyTorch's own
error computing in that dtype: storing weights and activations in bf16
alone moves a VGG input gradient by several percent (PyTorch's pure-bf16
gradient is ~5e-2 off float64 on the article preset, ~0.25 with L1 taps,
where a difference near 0 flips the sign), so 2e-2 is out of reach of any
bf16 implementation there. Both errors are printed.
"""
import argparse
import copy
import functools
import json
import sys

import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

# The presets of examples/perceptual_dump.rs: arch, taps (features indices),
# tap weights, criterion, ImageNet input normalisation.
# Largest relative error of loss and gradient accepted, by the crate's dtype.
TOLERANCE = {"f32": 1e-5, "f16": 2e-2, "bf16": 2e-2}
# How much worse than PyTorch at the same precision a half gradient may be.
TORCH_MARGIN = 1.5
HALF = {"f16": torch.float16, "bf16": torch.bfloat16}

PRESETS = {
    "article": ("vgg16", [3, 8, 15, 22], [1.0, 1.0, 1.0, 1.0], "mse", False),
    # VGG19 conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 (pre-activation).
    "basicsr": ("vgg19", [2, 7, 16, 25, 34], [0.1, 0.1, 1.0, 1.0, 1.0], "l1", True),
}


def load_features(weights_path, arch, device):
    """torchvision's `features` of `arch` with the file's weights, float64.
    The model is built on the meta device (its 120M-parameter classifier
    is never initialised) and the file's tensors are assigned to it."""
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)(weights=None)
    state = {k.removeprefix("features."): v.double() for k, v in load_file(str(weights_path)).items()
             if k.startswith("features.")}
    model.features.load_state_dict(state, assign=True)
    return model.features.to(device).eval()


@functools.cache
def _seeded_features(arch, seed):
    from export_vgg import seeded  # beside this file

    return {f"features.{k}": v.contiguous() for k, v in seeded(arch, seed).items()}


def write_torchvision_weights(path, arch, seed):
    """Writes the `features` of torchvision's own initialisation of `arch`
    after `torch.manual_seed(seed)` as safetensors; returns `path`. Built
    once per (arch, seed) in a process (a VGG takes seconds to initialise)."""
    save_file(_seeded_features(arch, seed), str(path))
    return path


def reference(features, pred, target, taps, weights, criterion, imagenet):
    """The perceptual loss by torchvision modules: `weights[i]` times the
    mean squared (or absolute, "l1") difference at `features` index
    `taps[i]`, summed; autograd gives its gradient."""
    if imagenet:
        mean, std = MEAN.to(pred), STD.to(pred)
        pred, target = (pred - mean) / std, (target - mean) / std
    loss = 0.0
    x, y = pred, target
    for i, module in enumerate(features[: max(taps) + 1]):
        # Out of place: torchvision's ReLUs are inplace and would overwrite a
        # conv output that is itself a tap.
        x = torch.relu(x) if isinstance(module, torch.nn.ReLU) else module(x)
        y = torch.relu(y) if isinstance(module, torch.nn.ReLU) else module(y)
        if i in taps:
            d = x - y
            dist = d.abs().mean() if criterion == "l1" else d.pow(2).mean()
            loss = loss + weights[taps.index(i)] * dist
    return loss


def same_precision_errors(features, pred, target, dtype, ref_loss, ref_grad, *options, **named):
    """Relative errors of loss and gradient against the float64 reference
    when PyTorch itself computes in `dtype` (weights, activations and
    gradients stored in it): the yardstick for a half-precision result.
    `options` and `named` are `reference`'s taps, weights, criterion and
    imagenet."""
    low = copy.deepcopy(features).to(dtype)
    p = pred.detach().to(dtype).requires_grad_(True)
    loss = reference(low, p, target.to(dtype), *options, **named)
    loss.backward()
    return (abs(loss.item() - ref_loss) / abs(ref_loss),
            ((p.grad.double() - ref_grad).norm() / ref_grad.norm()).item())


def half_grad_ok(grad_err, torch_grad_err, tolerance):
    return grad_err <= tolerance or grad_err <= TORCH_MARGIN * torch_grad_err


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("dump")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    with safe_open(args.dump, "pt") as f:
        meta = f.metadata()
    dump = load_file(args.dump)
    arch, taps, weights, criterion, imagenet = PRESETS[meta["preset"]]
    features = load_features(args.weights, arch, args.device)
    pred = dump["pred"].double().to(args.device).requires_grad_(True)
    target = dump["target"].double().to(args.device)
    loss = reference(features, pred, target, taps, weights, criterion, imagenet)
    loss.backward()
    got_loss, got_grad = dump["loss"].double().item(), dump["grad"].double().to(args.device)
    loss_err = abs(got_loss - loss.item()) / abs(loss.item())
    grad_err = ((got_grad - pred.grad).norm() / pred.grad.norm()).item()
    tolerance = TOLERANCE[meta["dtype"]]
    report = {"preset": meta["preset"], "dtype": meta["dtype"], "device": meta["device"],
              "loss": got_loss, "torch_loss": loss.item(),
              "loss_rel_err": loss_err, "grad_rel_err": grad_err, "tolerance": tolerance}
    if meta["dtype"] in HALF:
        same = same_precision_errors(features, pred, target, HALF[meta["dtype"]], loss.item(), pred.grad,
                                     taps, weights, criterion, imagenet)
        report["torch_same_dtype_loss_rel_err"], report["torch_same_dtype_grad_rel_err"] = same
        ok = loss_err <= tolerance and half_grad_ok(grad_err, same[1], tolerance)
    else:
        ok = loss_err <= tolerance and grad_err <= tolerance
    report["ok"] = ok
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
