"""LPIPS against the `lpips` package itself: `lpips.LPIPS(net='vgg',
pretrained=True, pnet_rand=True)` holds the shipped v0.1 lin weights over a
random VGG16 trunk, which is exported to safetensors for the crate; the
distances must agree within 1e-5 relative in f32, and the gradient with the
package's autograd (in float64). CI installs the package; elsewhere these
tests skip without it."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
lpips = pytest.importorskip("lpips")

import perceptual_loss as pl  # noqa: E402

# The package builds torchvision's VGG with the deprecated `pretrained=`.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The package's model (random trunk, real lin weights) and the
    trunk's weights as a safetensors file with torchvision's names."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    trunk = {}
    for name, value in model.net.state_dict().items():
        _, index, kind = name.split(".")  # sliceK.N.weight
        trunk[f"features.{index}.{kind}"] = value.contiguous()
    path = tmp_path_factory.mktemp("lpips") / "vgg16-random.safetensors"
    save_file(trunk, str(path))
    return model, path


def package_distances(model, x0, x1, normalize=False, grad=False):
    """The package's distances (N,) in float64 and, with `grad`, the
    gradient of their mean w.r.t. x0."""
    m = model.double()
    a = x0.detach().double().requires_grad_(grad)
    d = m(a, x1.double(), normalize=normalize).reshape(-1)
    if not grad:
        return d.detach(), None
    d.mean().backward()
    return d.detach(), a.grad


@pytest.mark.parametrize("device", DEVICES)
def test_distances_and_gradient_match_the_package(reference, device):
    model, path = reference
    torch.manual_seed(6)
    x0 = (torch.rand(3, 3, 32, 48) * 2 - 1).to(device).requires_grad_(True)
    x1 = (torch.rand(3, 3, 32, 48) * 2 - 1).to(device)
    ours = pl.LPIPS(path)(x0, x1)
    assert ours.shape == (3, 1, 1, 1) and ours.dtype == torch.float32
    ours.mean().backward()
    want, want_grad = package_distances(model.to(device), x0, x1, grad=True)
    torch.testing.assert_close(ours.reshape(-1).double(), want, rtol=1e-5, atol=0)
    assert_gradient_close(x0.grad.double(), want_grad)


def assert_gradient_close(got, want):
    """Image by image within 1e-3, but for at most one within 2e-2: a ReLU
    whose input lies within f32 rounding of 0 takes the side the summation
    order gives it, and the gradient through it with it (image 0 of the
    seed above has a relu4_1 input at 4.6e-8 of that layer's largest; a
    change of summation order once moved that image's gradient by 4e-3
    while the distances stayed within 1e-7). A wrong gradient is off
    everywhere."""
    errs = [((g - w).norm() / w.norm()).item() for g, w in zip(got, want)]
    assert sum(e > 1e-3 for e in errs) <= 1 and max(errs) <= 2e-2, errs


def test_unit_inputs_and_plain_sums_match_the_package(reference, tmp_path):
    model, path = reference
    torch.manual_seed(7)
    x0, x1 = torch.rand(2, 3, 24, 24), torch.rand(2, 3, 24, 24)
    ours = pl.LPIPS(path, normalize=True)(x0, x1).reshape(-1)
    want, _ = package_distances(model, x0, x1, normalize=True)
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=0)
    plain = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, lpips=False, verbose=False).eval()
    plain.net.load_state_dict(model.net.state_dict())
    ours = pl.LPIPS(path, lin=False)(x0 * 2 - 1, x1 * 2 - 1).reshape(-1)
    want, _ = package_distances(plain, x0 * 2 - 1, x1 * 2 - 1)
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=0)


def test_the_numpy_call_and_explicit_lin_weights(reference, tmp_path):
    from safetensors.torch import save_file

    model, path = reference
    # The package's own lin weights, written as a file: the same distances.
    lins = {f"lin{k}": model.lins[k].model[1].weight.detach().float().contiguous() for k in range(5)}
    lin_path = tmp_path / "lin.safetensors"
    save_file(lins, str(lin_path))
    rng = np.random.default_rng(8)
    x0, x1 = (rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32) for _ in range(2))
    vgg = pl.Vgg(str(path))
    mean, grad, per = pl.Lpips(vgg, lin_weights=lin_path)(x0, x1, per_sample=True)
    want, _ = package_distances(model, torch.from_numpy(x0), torch.from_numpy(x1))
    np.testing.assert_allclose(per, want.numpy(), rtol=1e-5)
    assert mean == pytest.approx(float(want.mean()), rel=1e-5) and grad.shape == x0.shape
    lins["lin3"] = -lins["lin3"]
    save_file(lins, str(lin_path))
    with pytest.raises(pl.Error, match="non-negative"):
        pl.Lpips(vgg, lin_weights=lin_path)
    same, _, per = pl.Lpips(vgg)(x0, x0, per_sample=True)
    assert same == 0.0 and (per == 0).all()


def test_the_spatial_map_and_per_layer_values_match_the_package(reference):
    model, path = reference
    spatial = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, spatial=True, verbose=False).eval().double()
    spatial.net.load_state_dict(model.net.state_dict())
    torch.manual_seed(11)
    x0, x1 = torch.rand(2, 3, 20, 28) * 2 - 1, torch.rand(2, 3, 20, 28) * 2 - 1
    with torch.no_grad():
        ours = pl.LPIPS(path, spatial=True)(x0, x1)
        want, want_layers = spatial(x0.double(), x1.double(), retPerLayer=True)
    assert ours.shape == (2, 1, 20, 28)
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-7)
    _, layers = pl.Lpips(pl.Vgg(str(path))).spatial(x0.numpy(), x1.numpy())
    # The package's per-layer values with spatial=False: each layer's mean.
    _, plain_layers = model.double()(x0.double(), x1.double(), retPerLayer=True)
    np.testing.assert_allclose(layers, torch.cat([v.reshape(-1, 1) for v in plain_layers], 1).detach().numpy(), rtol=1e-5)
    assert len(want_layers) == 5

    class CudaArray:  # what a CUDA array shows by DLPack, for a CPU network
        def __dlpack__(self, stream=None):
            raise AssertionError("a CPU network must not import a CUDA array")

        def __dlpack_device__(self):
            return (2, 0)

    with pytest.raises(TypeError, match="weights are on the CPU"):
        pl.Lpips(pl.Vgg(str(path))).spatial(CudaArray(), CudaArray())
    with torch.no_grad():
        half = pl.LPIPS(path, spatial=True)(x0.bfloat16(), x1.bfloat16())
        torch.testing.assert_close(half, pl.LPIPS(path, spatial=True)(x0.bfloat16().float(), x1.bfloat16().float()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_spatial_map_and_its_gradient_on_cuda(reference):
    # The CUDA map (on the device, on PyTorch's stream) and its gradient
    # through autograd, against the package's float64 ones.
    model, path = reference
    spatial = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, spatial=True, verbose=False).eval().double()
    spatial.net.load_state_dict(model.net.state_dict())
    torch.manual_seed(13)
    x0, x1 = torch.rand(2, 3, 36, 44) * 2 - 1, torch.rand(2, 3, 36, 44) * 2 - 1
    g = torch.randn(2, 1, 36, 44)
    want_x = x0.double().requires_grad_(True)
    want = spatial(want_x, x1.double())
    (want * g.double()).sum().backward()
    got_x = x0.cuda().requires_grad_(True)
    got = pl.LPIPS(path, spatial=True)(got_x, x1.cuda())
    assert got.device.type == "cuda" and got.shape == (2, 1, 36, 44)
    (got * g.cuda()).sum().backward()
    torch.testing.assert_close(got.detach().cpu().double(), want.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_x.grad.cpu().double(), want_x.grad, rtol=1e-3, atol=1e-6)
    # On a stream of the caller's own, the same bits as on the default one.
    module = pl.LPIPS(path, spatial=True)
    side = torch.cuda.Stream()
    with torch.no_grad():
        default = module(x0.cuda(), x1.cuda())
        with torch.cuda.stream(side):
            on_side = module(x0.cuda(), x1.cuda())
        side.synchronize()
    assert torch.equal(default, on_side)
    torch.library.opcheck(torch.ops.perceptual_loss.lpips_spatial.default,
                          (x0.cuda().requires_grad_(True), x1.cuda(), module.losses.key))
    # The NumPy-level functions take CUDA arrays (DLPack) and give CUDA tensors.
    cuda_lpips = pl.Lpips(pl.Vgg(str(path), context=pl.Context("cuda", 0)))
    cuda_map, cuda_layers = cuda_lpips.spatial(x0.cuda(), x1.cuda())
    cpu_map, cpu_layers = pl.Lpips(pl.Vgg(str(path))).spatial(x0.numpy(), x1.numpy())
    assert cuda_map.device.type == "cuda"
    np.testing.assert_allclose(cuda_map.cpu().numpy(), cpu_map, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cuda_layers.cpu().numpy(), cpu_layers, rtol=1e-4, atol=1e-6)
    cuda_grad = cuda_lpips.spatial_backward(x0.cuda(), x1.cuda(), g.cuda())
    np.testing.assert_allclose(cuda_grad.cpu().double().numpy(), want_x.grad.numpy(), rtol=1e-3, atol=1e-6)


def test_the_spatial_maps_gradient_matches_the_packages_autograd(reference):
    # d sum(map * g) / dx0 for a random g, against the package's float64
    # autograd of spatial=True; through the NumPy function, the module and
    # torch.compile (no graph break).
    model, path = reference
    spatial = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, spatial=True, verbose=False).eval().double()
    spatial.net.load_state_dict(model.net.state_dict())
    torch.manual_seed(12)
    x0, x1 = torch.rand(2, 3, 20, 28) * 2 - 1, torch.rand(2, 3, 20, 28) * 2 - 1
    g = torch.randn(2, 1, 20, 28)
    want_x = x0.double().requires_grad_(True)
    (spatial(want_x, x1.double()) * g.double()).sum().backward()
    module = pl.LPIPS(path, spatial=True)
    for run in (module, torch.compile(module, backend="aot_eager", fullgraph=True)):
        got_x = x0.clone().requires_grad_(True)
        (run(got_x, x1) * g).sum().backward()
        torch.testing.assert_close(got_x.grad.double(), want_x.grad, rtol=1e-4, atol=1e-7)
    numpy_grad = pl.Lpips(pl.Vgg(str(path))).spatial_backward(x0.numpy(), x1.numpy(), g.numpy())
    np.testing.assert_allclose(numpy_grad, want_x.grad.numpy(), rtol=1e-4, atol=1e-7)
    torch.library.opcheck(torch.ops.perceptual_loss.lpips_spatial.default,
                          (x0.clone().requires_grad_(True), x1, module.losses.key))
    with pytest.raises(ValueError, match="N x 1 x H x W"):
        pl.Lpips(pl.Vgg(str(path))).spatial_backward(x0.numpy(), x1.numpy(), g.numpy()[:1])
    with pytest.raises(ValueError, match="N x 1 x H x W"):  # as many values, transposed
        pl.Lpips(pl.Vgg(str(path))).spatial_backward(x0.numpy(), x1.numpy(), g.numpy().reshape(2, 1, 28, 20))
    with pytest.raises(ValueError, match="N x 1 x H x W"):  # the op itself, called directly
        torch.ops.perceptual_loss.lpips_spatial_backward(x0, x1, module.losses.key, g[:1])
    # A second derivative is refused by name, not silently wrong.
    x = x0.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad((module(x, x1) * g).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivative only"):
        gx.sum().backward()
