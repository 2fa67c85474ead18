"""The PyTorch modules against pure-PyTorch autograd on the same weights.
Runs where torch is installed: on the CPU in CI, and on the GPU machine
through scripts/gpu-check.sh, where the CUDA cases run too."""
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import perceptual_loss as pl  # noqa: E402

# The PyTorch reference of scripts/torch_reference.py (the parity script).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "scripts"))
from torch_reference import (half_grad_ok, load_features, reference, same_precision_errors,  # noqa: E402
                             write_torchvision_weights)

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


def torchvision_weights(path, arch):
    """torchvision's own (seeded) initialisation, written for the crate."""
    return write_torchvision_weights(path, arch, seed=0)


def check_perceptual(path, arch, pred, target, loss_options, ref_options, tol, compute="float32", grad_tol=None):
    """Loss and gradient of the module (scaled by 2 through autograd)
    against torchvision + autograd in float64 on the inputs it saw. In
    f32 the gradient gets a looser tolerance than the loss: a ReLU whose
    input is within rounding of 0 may switch, which moves the gradient by
    up to ~1e-3 relative (PyTorch's own f32 autograd shows the same against
    float64), while the loss barely changes. A half-precision gradient
    passes within `tol` or within 1.5 times PyTorch's own error computing
    in that dtype (see torch_reference.py: bf16 storage alone moves it by
    several percent)."""
    module = pl.PerceptualLoss(path, arch, compute, **loss_options)
    pred = pred.requires_grad_(True)
    value = module(pred, target)
    (2 * value).backward()
    features = load_features(path, arch, pred.device)
    ref_pred = pred.detach().double().requires_grad_(True)
    ref = reference(features, ref_pred, target.double(), **ref_options)
    (2 * ref).backward()
    assert value.dtype == torch.float32 and value.shape == ()
    assert value.item() == pytest.approx(ref.item(), rel=tol)
    err = ((pred.grad.double() - ref_pred.grad).norm() / ref_pred.grad.norm()).item()
    if compute == "float32":
        assert err <= (grad_tol or tol)
    else:
        _, torch_err = same_precision_errors(features, ref_pred, target.double(), getattr(torch, compute),
                                             ref.item(), ref_pred.grad / 2, **ref_options)
        assert half_grad_ok(err, torch_err, grad_tol or tol), f"{err} vs PyTorch {compute} {torch_err}"
    assert pred.grad.dtype == pred.dtype


ARTICLE = dict(taps=[3, 8, 15, 22], weights=[1.0] * 4, criterion="mse", imagenet=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_perceptual_matches_autograd(tmp_path, device, compute):
    if device == "cpu" and compute == "bfloat16":
        pytest.skip("the CPU backend computes in f32")
    path = torchvision_weights(tmp_path / "vgg16.safetensors", "vgg16")
    pred = torch.rand(2, 3, 32, 48, device=device)
    target = torch.rand(2, 3, 32, 48, device=device)
    if compute == "float32":
        check_perceptual(path, "vgg16", pred, target, {}, ARTICLE, 1e-5, compute, grad_tol=1e-3)
    else:
        check_perceptual(path, "vgg16", pred, target, {}, ARTICLE, 3e-2, compute)


@pytest.mark.parametrize("device", DEVICES)
def test_perceptual_options_match_autograd(tmp_path, device):
    # VGG19 pre-activation taps by name, per-tap weights, L1, ImageNet
    # normalisation, on a size that pooling floors (20 -> 10 -> 5 -> 2 -> 1).
    path = torchvision_weights(tmp_path / "vgg19.safetensors", "vgg19")
    names = ["conv1_2", "conv2_2", "conv3_4", "conv4_4", "conv5_4"]
    weights = [0.1, 0.1, 1.0, 1.0, 1.0]
    pred = torch.rand(1, 3, 20, 28, device=device)
    target = torch.rand(1, 3, 20, 28, device=device)
    check_perceptual(path, "vgg19", pred, target,
                     dict(taps=names, tap_weights=weights, criterion="mae", input_norm="imagenet"),
                     dict(taps=[2, 7, 16, 25, 34], weights=weights, criterion="l1", imagenet=True), 1e-5,
                     grad_tol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perceptual_half_inputs(tmp_path, device, dtype):
    # Half inputs and gradient; the reference sees the same rounded inputs.
    path = torchvision_weights(tmp_path / "vgg16.safetensors", "vgg16")
    pred = torch.rand(2, 3, 24, 16, device=device).to(dtype)
    target = torch.rand(2, 3, 24, 16, device=device).to(dtype)
    # A loss weight keeps the f16 gradient of a mean out of the subnormals.
    module_weight = 1024.0
    check_perceptual(path, "vgg16", pred, target, dict(weight=module_weight),
                     dict(ARTICLE, weights=[module_weight] * 4), 2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_without_autograd_no_gradient_is_kept(tmp_path, device):
    path = torchvision_weights(tmp_path / "vgg16.safetensors", "vgg16")
    module = pl.PerceptualLoss(path, "vgg16")
    pred = torch.rand(1, 3, 16, 16, device=device, requires_grad=True)
    target = torch.rand(1, 3, 16, 16, device=device)
    with_grad = module(pred, target)
    with torch.no_grad():
        without = module(pred, target)
    assert without.grad_fn is None and with_grad.grad_fn is not None
    assert without.item() == with_grad.item()
    # The TV module, too, on a tensor that does not require a gradient.
    x = torch.rand(1, 3, 9, 9, device=device)
    assert pl.TVLoss("l1")(x).grad_fn is None


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


def test_a_bad_weights_path_fails_at_construction(tmp_path):
    with pytest.raises(pl.Error, match="nope.safetensors") as e:
        pl.PerceptualLoss(tmp_path / "nope.safetensors")
    assert e.value.status == 8  # PL_ERR_IO
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(pl.Error, match="header is not valid"):
        pl.PerceptualLoss(broken)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_gradients_survive_a_loss_scale(tmp_path, device):
    # Gradients of means this small are zero in float16; a GradScaler-style
    # scale on the loss must bring them back, as for PyTorch's own losses.
    scale = 2.0**16
    x = torch.rand(1, 3, 48, 40, device=device).half().requires_grad_(True)
    (scale * pl.TVLoss("article", weight=1e-3)(x)).backward()
    ref_x = x.detach().double().requires_grad_(True)
    (1e-3 * tv_reference(ref_x, "article")).backward()
    assert x.grad.dtype == torch.float16
    err = (x.grad.double() / scale - ref_x.grad).norm() / ref_x.grad.norm()
    assert err.item() <= 2e-2

    path = torchvision_weights(tmp_path / "vgg16.safetensors", "vgg16")
    weight = 2.0**-10
    pred = torch.rand(1, 3, 32, 32, device=device).half().requires_grad_(True)
    target = torch.rand(1, 3, 32, 32, device=device).half()
    (scale * pl.PerceptualLoss(path, "vgg16", weight=weight)(pred, target)).backward()
    features = load_features(path, "vgg16", device)
    ref_pred = pred.detach().double().requires_grad_(True)
    reference(features, ref_pred, target.double(), **dict(ARTICLE, weights=[weight] * 4)).backward()
    assert ref_pred.grad.abs().max().item() < 6e-5, "the reference gradient should be below f16's normal range"
    err = (pred.grad.double() / scale - ref_pred.grad).norm() / ref_pred.grad.norm()
    assert err.item() <= 2e-2


def per_image_weights(n, device):
    """Distinct incoming gradients per image, so a wrong image's gradient shows."""
    return torch.arange(1, n + 1, device=device, dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["article", "l1"])
def test_tv_reductions_match_autograd(device, variant):
    x = torch.rand(3, 2, 9, 7, device=device, dtype=torch.float64).float()
    ref_x = x.double().requires_grad_(True)
    per_ref = torch.stack([tv_reference(ref_x[i:i + 1], variant) for i in range(3)])
    for reduction, reduce in [("mean", torch.mean), ("sum", torch.sum), ("none", lambda v: v)]:
        ours_x = x.clone().requires_grad_(True)
        value = pl.TVLoss(variant, weight=0.5, reduction=reduction)(ours_x)
        ref = 0.5 * reduce(per_ref)
        assert value.shape == ref.shape
        torch.testing.assert_close(value.double(), ref.detach(), rtol=1e-5, atol=0)
        g = per_image_weights(3, device) if reduction == "none" else torch.tensor(2.0, device=device)
        (value * g).sum().backward()
        (want,) = torch.autograd.grad((ref * g.double()).sum(), ref_x, retain_graph=True)
        torch.testing.assert_close(ours_x.grad.double(), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_feature_and_perceptual_reductions_match_autograd(tmp_path, device):
    path = torchvision_weights(tmp_path / "vgg16.safetensors", "vgg16")
    features = load_features(path, "vgg16", device)
    pred = torch.rand(3, 3, 16, 20, device=device)
    target = torch.rand(3, 3, 16, 20, device=device)
    ref_pred = pred.double().requires_grad_(True)
    per_percep = torch.stack([reference(features, ref_pred[i:i + 1], target[i:i + 1].double(), **ARTICLE)
                              for i in range(3)])
    per_feature = ((ref_pred - target.double()) ** 2).mean((1, 2, 3))
    cases = [(lambda r: pl.PerceptualLoss(path, "vgg16", reduction=r), per_percep, 1e-3),
             (lambda r: pl.FeatureLoss("mse", reduction=r), per_feature, 1e-5)]
    for make, per_ref, grad_tol in cases:
        for reduction, reduce in [("mean", torch.mean), ("sum", torch.sum), ("none", lambda v: v)]:
            ours = pred.clone().requires_grad_(True)
            value = make(reduction)(ours, target)
            ref = reduce(per_ref)
            torch.testing.assert_close(value.double(), ref.detach(), rtol=1e-5, atol=0)
            g = per_image_weights(3, device) if reduction == "none" else torch.tensor(1.5, device=device)
            (value * g).sum().backward()
            (want,) = torch.autograd.grad((ref * g.double()).sum(), ref_pred, retain_graph=True)
            err = ((ours.grad.double() - want).norm() / want.norm()).item()
            assert err <= grad_tol, (reduction, err)


def test_a_target_that_requires_grad_is_an_error(tmp_path):
    path = torchvision_weights(tmp_path / "vgg16.safetensors", "vgg16")
    pred = torch.rand(1, 3, 16, 16, requires_grad=True)
    target = torch.rand(1, 3, 16, 16, requires_grad=True)
    for module in (pl.PerceptualLoss(path), pl.FeatureLoss()):
        with pytest.raises(ValueError, match=r"requires grad.*detach\(\)"):
            module(pred, target)
        assert module(pred, target.detach()).item() > 0
        with torch.no_grad():
            assert module(pred, target).item() > 0
    with pytest.raises(ValueError, match="unknown reduction"):
        pl.TVLoss(reduction="avg")
    with pytest.raises(ValueError, match="reduction='sum'"):
        pl.TVLoss("l1_sum")


def test_torch_compile_traces_the_losses_without_a_graph_break(tmp_path):
    path = torchvision_weights(tmp_path / "vgg16.safetensors", "vgg16")
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    percep, tv = pl.PerceptualLoss(path, taps=["relu1_2", "relu2_2"]), pl.TVLoss("l1", weight=1e-3)
    feature = pl.FeatureLoss("mae", reduction="sum")

    def step(x, target):
        out = net(x)
        return percep(out, target) + tv(out) + feature(out, target)

    x, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    explained = torch._dynamo.explain(step)(x, target)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    # Compiled through AOT autograd (fake tensors, the registered
    # backward) it gives eager's loss and gradients.
    eager = step(x, target)
    eager.backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x, target)
    compiled.backward()
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-6)
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)


def test_the_ops_have_fake_implementations():
    # torch.library's own checker: schema, fake (meta) implementation and
    # autograd registration agree with the real op.
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    from perceptual_loss import torch_modules as tm

    torch.library.opcheck(tm._tv_op, (x, 1, 1.0, 0.0, False, True, True))
    torch.library.opcheck(tm._feature_op, (x, torch.rand(2, 3, 8, 8), 0, 2.0, False, False, True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_dlpack_arrays_run_on_their_gpu(tmp_path):
    from test_numpy import Foreign

    x = torch.rand(2, 3, 16, 16, device="cuda")
    y = torch.rand(2, 3, 16, 16, device="cuda")
    loss, grad = pl.tv_loss(Foreign(x), "l1")
    want = pl.TVLoss("l1")(x.requires_grad_(True))
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(grad, x.grad)
    assert pl.feature_loss(Foreign(x.detach()), Foreign(y))[0] == pytest.approx(
        pl.FeatureLoss()(x.detach(), y).item(), rel=1e-6)
    path = torchvision_weights(tmp_path / "vgg16.safetensors", "vgg16")
    vgg = pl.Vgg(path, context=pl.Context("cuda", 0))
    value, g = pl.Perceptual(vgg)(Foreign(x.detach()), Foreign(y))
    assert value == pytest.approx(pl.PerceptualLoss(path)(x.detach(), y).item(), rel=1e-5)
    assert g.shape == x.shape and g.device.type == "cuda"
    assert set(pl.cuda_libraries()) >= {"cuda", "cudnn"}


def test_a_dropped_module_releases_its_weights(tmp_path):
    import gc

    from perceptual_loss import torch_modules as tm

    path = torchvision_weights(tmp_path / "vgg16.safetensors", "vgg16")
    module = pl.PerceptualLoss(path)
    module(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    key = module.losses.key
    assert key in tm._perceptual_losses
    del module
    gc.collect()
    assert key not in tm._perceptual_losses


def test_copies_and_pickles_load_their_own_weights(tmp_path):
    import copy
    import gc
    import pickle

    path = torchvision_weights(tmp_path / "vgg16.safetensors", "vgg16")
    pred, target = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    module = pl.PerceptualLoss(path, taps=["relu1_2"])
    want = module(pred, target).item()
    copied, pickled = copy.deepcopy(module), pickle.loads(pickle.dumps(module))
    assert len({module.losses.key, copied.losses.key, pickled.losses.key}) == 3
    del module
    gc.collect()  # the original's weights go; the copies keep their own
    assert copied(pred, target).item() == want
    assert pickled(pred, target).item() == want


def test_a_second_derivative_is_an_error_not_a_zero():
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    (g,) = torch.autograd.grad(pl.TVLoss("l2_squared")(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad((g * g).sum(), x)


def test_cuda_array_checks_run_before_the_library():
    # The CUDA path's checks, on CPU tensors standing in for CUDA arrays.
    from test_numpy import Foreign

    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="contiguous"):
        pl._from_dlpack_cuda((Foreign(x.transpose(2, 3)), "x"))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        pl._from_dlpack_cuda((Foreign(x.double()), "x"))
    with pytest.raises(ValueError, match="a and b differ"):
        pl._from_dlpack_cuda((Foreign(x), "a"), (Foreign(x[:, :, :4].contiguous()), "b"))


def test_the_module_reports_its_plan(tmp_path):
    path = torchvision_weights(tmp_path / "vgg16.safetensors", "vgg16")
    module = pl.PerceptualLoss(path, taps=["relu2_2"])
    got = module.plan_report((2, 3, 32, 32), torch.bfloat16)
    want = pl.Perceptual(pl.Vgg(path), taps=["relu2_2"]).plan_report((2, 3, 32, 32), "bfloat16")
    assert got == want and got["kernel_launches"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_planned_training_step_is_captured_with_torch_cuda_graph(tmp_path):
    # Warm-up on the capture stream plans the shape there; the captured
    # step, replayed on new data, gives the eager step's loss and gradient.
    path = torchvision_weights(tmp_path / "vgg16.safetensors", "vgg16")
    module = pl.PerceptualLoss(path, compute="bfloat16")
    net = torch.nn.Conv2d(3, 3, 3, padding=1).cuda()
    x, target = torch.rand(2, 3, 32, 32, device="cuda"), torch.rand(2, 3, 32, 32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            module(net(x), target).backward()
    torch.cuda.current_stream().wait_stream(side)
    net.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        static_loss = module(net(x), target)
        static_loss.backward()
    # New data in the captured input, NaN where the replay must write.
    x.copy_(torch.rand_like(x))
    static_loss.fill_(float("nan"))
    net.weight.grad.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    replayed_grad = net.weight.grad.clone()
    net.zero_grad(set_to_none=True)
    eager = module(net(x), target)
    eager.backward()
    assert static_loss.item() == eager.item()
    torch.testing.assert_close(replayed_grad, net.weight.grad, rtol=1e-5, atol=1e-7)
    # A shape the capture stream has not planned is refused, saying why.
    with pytest.raises(pl.Error, match="before capturing"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=side):
            module(net(x[:1]), target[:1])
