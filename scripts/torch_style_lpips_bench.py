"""PyTorch baselines for the style and LPIPS rows of the perceptual benchmark
(`cargo bench --bench perceptual`), on the same card and in the same run
(scripts/gpu-check.sh): forward + backward w.r.t. pred at 8x3x256x256,
median of CUDA-event-timed runs and peak memory above the inputs and
weights. Random VGG weights: timing does not depend on them.

- LPIPS: `lpips.LPIPS(net='vgg')` (the lpips package, its v0.1 lin weights,
  a random trunk), eager, in f32 as the package runs and in bf16 (model and
  inputs converted), beside the crate's LPIPS row.
- BasicSR's PerceptualLoss as its forward computes it (VGGFeatureExtractor
  with ImageNet input normalisation, the feature and Gram distances summed
  over the layers, `percep + style` differentiated), here on VGG16 at
  relu1_2, relu2_2, relu3_3, relu4_3 with MSE for both terms and weights 1,
  the crate's "+ Grams" row; the Grams in the features' dtype, as BasicSR's
  `_gram_mat`. Eager and torch.compile; and against a kept target, the
  target's features and Grams computed once under no_grad, as a PyTorch
  user would keep them.

    python3 scripts/torch_style_lpips_bench.py
    MODES=all python3 scripts/torch_style_lpips_bench.py  # + "reduce-overhead", "max-autotune-no-cudagraphs"
    python3 scripts/torch_style_lpips_bench.py --check    # CPU, tiny: the losses run, kept == passed

The lpips package is imported if present (the GPU bundle carries it)."""
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_perceptual_bench import bench  # noqa: E402

LAYERS = [3, 8, 15, 22]
SHAPE = (8, 3, 256, 256)
DEVICE = "cuda"


def gram(f):
    n, c, h, w = f.shape
    f = f.reshape(n, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def vgg16_to(deepest, dtype):
    """VGG16 features to `deepest`, frozen, channels-last, with out-of-place
    ReLUs (a tap is not overwritten by the next module)."""
    features = torchvision.models.vgg16(weights=None).features[: deepest + 1].eval()
    for i, m in enumerate(features):
        if isinstance(m, torch.nn.ReLU):
            features[i] = torch.nn.ReLU(inplace=False)
    for p in features.parameters():
        p.requires_grad_(False)
    return features.to(device=DEVICE, dtype=dtype, memory_format=torch.channels_last)


def basicsr_losses(dtype):
    """(loss(pred, target), kept(target) -> loss(pred)) of BasicSR's
    PerceptualLoss forward: percep + style."""
    features = vgg16_to(max(LAYERS), dtype)
    mean = torch.tensor([0.485, 0.456, 0.406], device=DEVICE, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=DEVICE, dtype=dtype).view(1, 3, 1, 1)
    mse = torch.nn.functional.mse_loss

    def taps(x):
        x = (x - mean) / std
        out = []
        for i, m in enumerate(features):
            x = m(x)
            if i in LAYERS:
                out.append(x)
        return out

    def against(xs, ys, grams):
        percep = sum(mse(x, y) for x, y in zip(xs, ys))
        style = sum(mse(gram(x), g) for x, g in zip(xs, grams))
        return percep + style

    def loss(pred, target):
        ys = taps(target.detach())
        return against(taps(pred), ys, [gram(y) for y in ys])

    def kept(target):
        with torch.no_grad():
            ys = taps(target)
            grams = [gram(y) for y in ys]
        return lambda pred, _target: against(taps(pred), ys, grams)

    return loss, kept


def inputs(dtype, low):
    def one():
        x = torch.rand(*SHAPE, device=DEVICE, dtype=dtype) * (1 - low) + low
        return x.to(memory_format=torch.channels_last)

    return one().requires_grad_(True), one()


def lpips_rows():
    try:
        import lpips
    except ImportError:
        print("| lpips.LPIPS(net='vgg') | (skipped: no lpips package) | |")
        return
    for dtype, name in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
        net = net.to(device=DEVICE, dtype=dtype, memory_format=torch.channels_last)
        for p in net.parameters():
            p.requires_grad_(False)
        pred, target = inputs(dtype, -1.0)
        ms, mib = bench(lambda p, t: net(p, t).sum(), pred, target)
        print(f"| eager lpips.LPIPS(net='vgg') {'x'.join(map(str, SHAPE))} {name} fwd+bwd | {ms:.3f} | {mib:.0f} |")


def basicsr_rows():
    modes = [None, "default"]
    if os.environ.get("MODES") == "all":
        modes += ["reduce-overhead", "max-autotune-no-cudagraphs"]
    loss, kept = basicsr_losses(torch.bfloat16)
    pred, target = inputs(torch.bfloat16, 0.0)
    for against_kept in (False, True):
        fn = kept(target) if against_kept else loss
        for mode in modes:
            if mode is None:
                run, kind = fn, "eager"
            else:
                torch._dynamo.reset()
                run = torch.compile(fn) if mode == "default" else torch.compile(fn, mode=mode)
                kind = "torch.compile" + ("" if mode == "default" else f" {mode}")
            ms, mib = bench(run, pred, target)
            what = "kept target" if against_kept else "target passed"
            print(f"| {kind} BasicSR percep + style (Grams relu1_2..relu4_3) bf16, {what} fwd+bwd | {ms:.3f} | {mib:.0f} |")


def check():
    """On the CPU at 2x3x32x32: both BasicSR forms give the same loss and
    gradient, and the LPIPS row's call runs."""
    global DEVICE, SHAPE
    DEVICE, SHAPE = "cpu", (2, 3, 32, 32)
    torch.manual_seed(0)
    loss, kept = basicsr_losses(torch.float32)
    pred, target = inputs(torch.float32, 0.0)
    grads = []
    for fn in (loss, kept(target)):
        pred.grad = None
        value = fn(pred, target)
        value.backward()
        grads.append((value.detach(), pred.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])
    assert grads[0][0] > 0
    try:
        import lpips
    except ImportError:
        print("check: no lpips package; the BasicSR forms agree")
        return
    net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    pred, target = inputs(torch.float32, -1.0)
    net(pred, target).sum().backward()
    assert pred.grad.abs().sum() > 0
    print("check: the BasicSR forms agree; lpips runs")


def main():
    if "--check" in sys.argv[1:]:
        return check()
    torch.backends.cudnn.allow_tf32 = False
    print(f"| torch {torch.__version__} on {torch.cuda.get_device_name()} | median ms | peak extra MiB |")
    print("|---|---|---|")
    lpips_rows()
    basicsr_rows()


if __name__ == "__main__":
    main()
