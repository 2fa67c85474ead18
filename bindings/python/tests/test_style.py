"""Style (Gram) losses and BasicSR's PerceptualLoss against PyTorch: a
float64 autograd reference written here from BasicSR's definitions
(VGGFeatureExtractor, `_gram_mat`, L1Loss / MSELoss / torch.norm 'fro')
over torchvision's VGG with the same weights, on the CPU and, where there
is one, the GPU."""
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import perceptual_loss as pl  # noqa: E402
from perceptual_loss.basicsr import PerceptualLoss as BasicsrLoss  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "scripts"))
from torch_reference import load_features, write_torchvision_weights  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
VGG19_NAMES = {"relu1_1": 1, "conv1_2": 2, "relu1_2": 3, "relu2_2": 8, "conv3_4": 16, "relu3_4": 17,
               "relu4_4": 26, "conv5_4": 34}


def seeded_weights(path, arch):
    return write_torchvision_weights(path, arch, seed=1)


def gram(f):
    n, c, h, w = f.shape
    f = f.reshape(n, c, h * w)
    return f.bmm(f.transpose(1, 2)) / (c * h * w)


def distance(criterion, a, b):
    if criterion == "l1":
        return (a - b).abs().mean()
    if criterion == "l2":
        return (a - b).pow(2).mean()
    return torch.norm(a - b, p="fro")


def basicsr_reference(features, x, gt, layer_weights, use_input_norm, range_norm, perceptual_weight,
                      style_weight, criterion):
    """BasicSR's PerceptualLoss.forward in float64."""

    def extract(v):
        if range_norm:
            v = (v + 1) / 2
        if use_input_norm:
            v = (v - MEAN.to(v.device)) / STD.to(v.device)
        out = {}
        wanted = {VGG19_NAMES[k]: k for k in layer_weights}
        for i, module in enumerate(features[: max(wanted) + 1]):
            v = torch.relu(v) if isinstance(module, torch.nn.ReLU) else module(v)
            if i in wanted:
                out[wanted[i]] = v
        return out

    xf, gf = extract(x), extract(gt.detach())
    percep = sum(distance(criterion, xf[k], gf[k]) * w for k, w in layer_weights.items()) * perceptual_weight
    style = sum(distance(criterion, gram(xf[k]), gram(gf[k])) * w for k, w in layer_weights.items()) * style_weight
    return percep, style


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("criterion", ["l1", "l2", "fro"])
def test_basicsr_perceptual_and_style_match_its_definition(tmp_path, criterion, device):
    path = seeded_weights(tmp_path / "vgg19.safetensors", "vgg19")
    layer_weights = {"conv1_2": 0.5, "relu2_2": 1.0, "conv3_4": 2.0}
    options = dict(use_input_norm=True, range_norm=True, perceptual_weight=1.0, style_weight=50.0,
                   criterion=criterion)
    module = BasicsrLoss(layer_weights, "vgg19", weights=path, **options)
    torch.manual_seed(2)
    x = (torch.rand(2, 3, 24, 20, device=device) * 2 - 1).requires_grad_(True)
    gt = torch.rand(2, 3, 24, 20, device=device) * 2 - 1
    percep, style = module(x, gt)
    (percep + style).backward()

    features = load_features(path, "vgg19", device)
    ref_x = x.detach().double().requires_grad_(True)
    ref_percep, ref_style = basicsr_reference(features, ref_x, gt.double(), layer_weights, **options)
    (ref_percep + ref_style).backward()
    assert percep.item() == pytest.approx(ref_percep.item(), rel=1e-5)
    assert style.item() == pytest.approx(ref_style.item(), rel=1e-5)
    err = ((x.grad.double() - ref_x.grad).norm() / ref_x.grad.norm()).item()
    assert err <= 1e-3, err


def test_a_zero_weight_gives_none_as_basicsr_does(tmp_path):
    path = seeded_weights(tmp_path / "vgg19.safetensors", "vgg19")
    x, gt = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    percep, style = BasicsrLoss({"conv5_4": 1.0}, weights=path)(x, gt)
    assert percep.item() > 0 and style is None
    percep, style = BasicsrLoss({"relu2_2": 1.0}, weights=path, perceptual_weight=0.0, style_weight=1.0)(x, gt)
    assert percep is None and style.item() > 0
    with pytest.raises(NotImplementedError, match="l3 criterion"):
        BasicsrLoss({"conv5_4": 1.0}, weights=path, criterion="l3")


def test_one_part_alone_cannot_be_backpropagated_when_both_exist(tmp_path):
    path = seeded_weights(tmp_path / "vgg19.safetensors", "vgg19")
    module = BasicsrLoss({"relu2_2": 1.0}, weights=path, style_weight=1.0)
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    percep, _ = module(x, torch.rand(1, 3, 16, 16))
    with pytest.raises(RuntimeError, match="perceptual \\+ style"):
        percep.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_style_loss_module_matches_the_gram_definition(tmp_path, device):
    # fast_neural_style's style term: relu1_2..relu4_3 Grams, MSE, on
    # ImageNet-normalised [0, 1] inputs.
    path = seeded_weights(tmp_path / "vgg16.safetensors", "vgg16")
    layers = {"relu1_2": 1.0, "relu2_2": 0.5, "relu3_3": 2.0, "relu4_3": 1.0}
    taps = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}
    module = pl.StyleLoss(path, layers, criterion="mse", weight=1e3, input_norm="imagenet")
    torch.manual_seed(3)
    x = torch.rand(2, 3, 32, 32, device=device, requires_grad=True)
    style = torch.rand(2, 3, 32, 32, device=device)
    value = module(x, style)
    value.backward()
    features = load_features(path, "vgg16", device)
    ref_x = x.detach().double().requires_grad_(True)

    def grams(v):
        v = (v - MEAN.to(v.device)) / STD.to(v.device)
        out = {}
        for i, m in enumerate(features[:23]):
            v = torch.relu(v) if isinstance(m, torch.nn.ReLU) else m(v)
            out[i] = gram(v)
        return out

    gx, gs = grams(ref_x), grams(style.double())
    ref = 1e3 * sum(w * (gx[taps[k]] - gs[taps[k]]).pow(2).mean() for k, w in layers.items())
    ref.backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    err = ((x.grad.double() - ref_x.grad).norm() / ref_x.grad.norm()).item()
    assert err <= 1e-3, err
    # Each image's value: the same formula on that image alone.
    per = pl.StyleLoss(path, layers, weight=1e3, input_norm="imagenet", reduction="none")(x.detach(), style)
    assert per.shape == (2,)
    assert per.mean().item() == pytest.approx(value.item(), rel=1e-5)


def test_style_loss_compiles_without_a_graph_break(tmp_path):
    path = seeded_weights(tmp_path / "vgg16.safetensors", "vgg16")
    style = pl.StyleLoss(path, {"relu1_2": 1.0, "relu2_2": 1.0})
    basic = BasicsrLoss({"relu1_2": 1.0}, "vgg16", weights=path, style_weight=2.0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)

    def step(x, target):
        out = net(x)
        percep, s = basic(out, target)
        return style(out, target) + percep + s

    x, target = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    explained = torch._dynamo.explain(step)(x, target)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = step(x, target)
    eager.backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x, target)
    compiled.backward()
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-6)
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)


def test_numpy_parts_sum_to_the_loss(tmp_path):
    path = seeded_weights(tmp_path / "vgg16.safetensors", "vgg16")
    vgg = pl.Vgg(str(path))
    loss = pl.Perceptual(vgg, taps=["relu2_2"], style_taps=["relu1_2", "relu2_2"], style_weight=10.0,
                         style_criterion="fro")
    rng = np.random.default_rng(4)
    pred, target = (rng.random((2, 3, 16, 16), dtype=np.float32) for _ in range(2))
    value, grad, parts = loss(pred, target, parts=True)
    assert parts.shape == (2,) and parts[0] > 0 and parts[1] > 0
    assert parts.sum() == pytest.approx(value, rel=1e-6)
    assert grad.shape == pred.shape
    style_only = pl.Perceptual(vgg, taps=[], style_taps=["relu1_2", "relu2_2"], style_weight=10.0,
                               style_criterion="fro")
    value, _, parts = style_only(pred, target, grad=False, parts=True)
    assert parts[0] == 0.0 and parts[1] == pytest.approx(value)
    with pytest.raises(pl.Error, match="at least one tap or style tap"):
        pl.Perceptual(vgg, taps=[])


@pytest.mark.parametrize("device", DEVICES)
def test_a_kept_style_target_gives_the_loss_of_a_passed_one(tmp_path, device):
    # Style transfer's loop: one style image kept, a batch of predictions.
    path = seeded_weights(tmp_path / "vgg16.safetensors", "vgg16")
    module = pl.StyleLoss(path, {"relu1_2": 1.0, "relu2_2": 1.0}, weight=1e3)
    torch.manual_seed(9)
    style = torch.rand(1, 3, 24, 24, device=device)
    x = torch.rand(3, 3, 24, 24, device=device, requires_grad=True)
    want = module(x, style.expand(3, -1, -1, -1).contiguous())
    want.backward()
    want_grad = x.grad.clone()
    x.grad = None
    kept = style.clone()
    module.set_target(kept)
    kept.zero_()  # the module keeps its own copy
    got = module(x)
    got.backward()
    assert got.item() == want.item()
    assert torch.equal(x.grad, want_grad)
    module.clear_target()
    with pytest.raises(pl.Error, match="no kept target"):
        module(x)


def test_a_kept_numpy_target_and_lpips(tmp_path):
    path = seeded_weights(tmp_path / "vgg16.safetensors", "vgg16")
    vgg = pl.Vgg(str(path))
    rng = np.random.default_rng(10)
    pred, target = (rng.random((2, 3, 16, 16), dtype=np.float32) for _ in range(2))
    for loss in (pl.Perceptual(vgg, style_taps=["relu1_2"]), pl.Lpips(vgg, normalize=True)):
        want, want_grad = loss(pred, target)
        loss.set_target(target.copy())
        got, got_grad = loss(pred)
        assert got == want and np.array_equal(got_grad, want_grad)
    lp = pl.LPIPS(path, normalize=True)
    lp.set_target(torch.from_numpy(target))
    assert torch.equal(lp(torch.from_numpy(pred)), pl.LPIPS(path, normalize=True)(torch.from_numpy(pred),
                                                                                   torch.from_numpy(target)))


def test_the_kept_target_op_checks_and_compiles(tmp_path):
    from perceptual_loss import torch_modules as tm

    path = seeded_weights(tmp_path / "vgg16.safetensors", "vgg16")
    module = pl.PerceptualLoss(path, taps=["relu1_2"], style_taps=["relu2_2"])
    module.set_target(torch.rand(1, 3, 16, 16))
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    torch.library.opcheck(tm._perceptual_kept_op, (x, module.losses.key, False, True))
    torch.library.opcheck(tm._perceptual_op, (x, torch.rand(2, 3, 16, 16), module.losses.key, False, True))
    explained = torch._dynamo.explain(lambda v: module(v * 2))(x)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_fro_takes_the_mean_reduction_only(tmp_path):
    path = seeded_weights(tmp_path / "vgg16.safetensors", "vgg16")
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match="fro"):
            pl.StyleLoss(path, {"relu1_2": 1.0}, criterion="fro", reduction=reduction)
        with pytest.raises(ValueError, match="fro"):
            pl.PerceptualLoss(path, taps=["relu1_2"], criterion="fro", reduction=reduction)
    pl.StyleLoss(path, {"relu1_2": 1.0}, criterion="fro")  # the mean is fine
