"""The PyTorch modules against pure-PyTorch autograd on the same weights.
Runs where torch is installed (the GPU machine, through
scripts/gpu-check.sh); CUDA cases need a GPU."""
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import perceptual_loss as pl  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tv_reference(x, variant):
    n, c, h, w = x.shape
    dh = x[:, :, 1:, :] - x[:, :, :-1, :]
    dw = x[:, :, :, 1:] - x[:, :, :, :-1]
    if variant == "article":
        return 2 * (dh.pow(2).sum() / (c * (h - 1) * w) + dw.pow(2).sum() / (c * h * (w - 1))) / n
    if variant == "l1":
        return (dh.abs().sum((1, 2, 3)) + dw.abs().sum((1, 2, 3))).mean()
    if variant == "l2":
        return (dh.pow(2).sum((1, 2, 3)) + dw.pow(2).sum((1, 2, 3))).sqrt().mean()
    return (dh[:, :, :, :-1].pow(2) + dw[:, :, :-1, :].pow(2)).sqrt().sum((1, 2, 3)).mean()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["article", "l1", "l2", "isotropic"])
def test_tv_matches_autograd(device, variant):
    x = torch.rand(2, 3, 33, 17, device=device, dtype=torch.float64).float().requires_grad_(True)
    (3 * pl.TVLoss(variant)(x)).backward()
    ours = x.grad.clone()
    ref_x = x.detach().double().requires_grad_(True)
    ref = tv_reference(ref_x, variant)
    (3 * ref).backward()
    assert pl.TVLoss(variant)(x.detach()).item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(ours.double(), ref_x.grad, rtol=1e-4, atol=1e-6)


def reference_features(weights_path, arch):
    from safetensors.torch import load_file

    model = getattr(torchvision.models, arch)(weights=None)
    state = {k.removeprefix("features."): v for k, v in load_file(str(weights_path)).items()}
    model.features.load_state_dict(state)
    return model.features.double().eval()


def perceptual_reference(features, pred, target, taps):
    loss, x, y = 0.0, pred, target
    for i, m in enumerate(features[: max(taps) + 1]):
        x = torch.relu(x) if isinstance(m, torch.nn.ReLU) else m(x)
        y = torch.relu(y) if isinstance(m, torch.nn.ReLU) else m(y)
        if i in taps:
            loss = loss + (x - y).pow(2).mean()
    return loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_perceptual_matches_autograd(tmp_path, device, compute):
    if device == "cpu" and compute == "bfloat16":
        pytest.skip("the CPU backend computes in f32")
    path = tmp_path / "vgg16.safetensors"
    pl.write_seeded_weights(path, "vgg16", seed=1)
    module = pl.PerceptualLoss(path, "vgg16", compute)
    pred = torch.rand(2, 3, 32, 48, device=device).requires_grad_(True)
    target = torch.rand(2, 3, 32, 48, device=device)
    value = module(pred, target)
    (2 * value).backward()
    features = reference_features(path, "vgg16").to(device)
    ref_pred = pred.detach().double().requires_grad_(True)
    ref = perceptual_reference(features, ref_pred, target.double(), [3, 8, 15, 22])
    (2 * ref).backward()
    tol = 1e-4 if compute == "float32" else 3e-2
    assert value.item() == pytest.approx(ref.item(), rel=tol)
    err = (pred.grad.double() - ref_pred.grad).norm() / ref_pred.grad.norm()
    assert err.item() <= tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_current_stream():
    x = torch.rand(1, 3, 64, 64, device="cuda")
    expected = pl.TVLoss("l1")(x).item()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        value = pl.TVLoss("l1")(x)
    side.synchronize()
    assert value.item() == expected


def test_bad_tensors_raise():
    with pytest.raises(ValueError, match="contiguous"):
        pl.TVLoss()(torch.rand(1, 3, 8, 8).transpose(2, 3))
    with pytest.raises(TypeError, match="float32"):
        pl.TVLoss()(torch.zeros(1, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(pl.Error, match="H-1"):
        pl.TVLoss()(torch.zeros(1, 3, 1, 8))
