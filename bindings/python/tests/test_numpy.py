"""The NumPy/CPU path of the Python package, against hand-derived values,
NumPy formulas written from the definitions, and finite differences."""
import json
import struct

import numpy as np
import pytest

import perceptual_loss as pl

EXAMPLE = np.array([1, 2, 4, 7, 11, 16, 22, 29, 37], np.float32).reshape(1, 1, 3, 3)


def tv_reference(x, variant):
    """TV of float64 x, as docs/design.md defines it."""
    n, c, h, w = x.shape
    dh = x[:, :, 1:, :] - x[:, :, :-1, :]
    dw = x[:, :, :, 1:] - x[:, :, :, :-1]
    if variant == "article":
        return 2 * ((dh**2).sum() / (c * (h - 1) * w) + (dw**2).sum() / (c * h * (w - 1))) / n
    per_image = {
        "l1": lambda: np.abs(dh).sum((1, 2, 3)) + np.abs(dw).sum((1, 2, 3)),
        "l2_squared": lambda: (dh**2).sum((1, 2, 3)) + (dw**2).sum((1, 2, 3)),
        "l2": lambda: np.sqrt((dh**2).sum((1, 2, 3)) + (dw**2).sum((1, 2, 3))),
        "isotropic": lambda: np.sqrt(dh[:, :, :, :-1] ** 2 + dw[:, :, :-1, :] ** 2).sum((1, 2, 3)),
    }[variant.removesuffix("_sum")]()
    return per_image.sum() if variant.endswith("_sum") else per_image.mean()


def test_article_hand_derived():
    loss, grad = pl.tv_loss(EXAMPLE)
    assert loss == 470.0  # 2 * (1251 / 6 + 159 / 6)
    assert grad[0, 0, 0, 0] == pytest.approx(-7 * 4 / 6)


@pytest.mark.parametrize("variant", ["article", "l1", "l1_sum", "l2_squared", "l2_squared_sum", "l2", "l2_sum", "isotropic", "isotropic_sum"])
def test_tv_variants_match_formula_and_finite_differences(variant):
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 3, 5, 7)).astype(np.float32)
    loss, grad = pl.tv_loss(x, variant, weight=1.5)
    x64 = x.astype(np.float64)
    assert loss == pytest.approx(1.5 * tv_reference(x64, variant), rel=1e-6)
    for idx in [(0, 0, 0, 0), (1, 2, 4, 6), (0, 1, 2, 3), (1, 0, 3, 1)]:
        step = np.zeros_like(x64)
        step[idx] = 1e-6
        fd = 1.5 * (tv_reference(x64 + step, variant) - tv_reference(x64 - step, variant)) / 2e-6
        assert grad[idx] == pytest.approx(fd, rel=1e-4, abs=1e-5)


def test_float16_and_loss_only():
    x = np.random.default_rng(2).uniform(0, 1, (1, 3, 8, 8)).astype(np.float16)
    loss, grad = pl.tv_loss(x, "l1", grad=False)
    assert grad is None
    assert loss == pytest.approx(tv_reference(x.astype(np.float64), "l1"), rel=1e-6)


def test_per_image_values_eps_and_weight_zero():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (3, 2, 4, 5)).astype(np.float32)
    loss, grad, per = pl.tv_loss(x, "l2_squared_sum", weight=2.0, per_sample=True)
    x64 = x.astype(np.float64)
    want = [2.0 * tv_reference(x64[n : n + 1], "l2_squared") for n in range(3)]
    assert per == pytest.approx(want, rel=1e-6)
    assert loss == pytest.approx(sum(want), rel=1e-6)
    # eps inside the isotropic root: a constant image scores sqrt(eps) per term.
    flat = np.full((1, 1, 3, 3), 0.5, np.float32)
    assert pl.tv_loss(flat, "isotropic", eps=9.0, grad=False)[0] == pytest.approx(4 * 3.0)
    # A weight of 0 is a weight, not "the default".
    assert pl.tv_loss(x, "l1", weight=0.0)[0] == 0.0
    with pytest.raises(pl.Error, match="batch mean only"):
        pl.tv_loss(x, "article_sum")


def test_feature_distance_against_numpy():
    rng = np.random.default_rng(6)
    a = rng.uniform(-1, 1, (2, 3, 4, 5)).astype(np.float32)
    b = rng.uniform(-1, 1, (2, 3, 4, 5)).astype(np.float32)
    d = a.astype(np.float64) - b.astype(np.float64)
    loss, grad, per = pl.feature_loss(a, b, "mse", weight=0.5, per_sample=True)
    assert loss == pytest.approx(0.5 * (d**2).mean(), rel=1e-6)
    assert per == pytest.approx(0.5 * (d**2).mean((1, 2, 3)), rel=1e-6)
    assert grad == pytest.approx(0.5 * 2 * d / d.size, rel=1e-5)
    loss, grad = pl.feature_loss(a, b, "mae")
    assert loss == pytest.approx(np.abs(d).mean(), rel=1e-6)
    assert grad == pytest.approx(np.sign(d) / d.size, rel=1e-6)
    with pytest.raises(ValueError, match="unknown criterion"):
        pl.feature_loss(a, b, "huber")


def test_bad_inputs_raise_with_the_library_message():
    with pytest.raises(pl.Error, match="H-1") as e:
        pl.tv_loss(np.zeros((1, 1, 1, 8), np.float32))
    assert e.value.status == 2
    with pytest.raises(ValueError, match="contiguous"):
        pl.tv_loss(np.zeros((1, 1, 8, 8), np.float32)[:, :, :, ::2])
    with pytest.raises(TypeError, match="float32 or float16"):
        pl.tv_loss(np.zeros((1, 1, 8, 8), np.int32))
    with pytest.raises(ValueError, match="N x C x H x W"):
        pl.tv_loss(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="unknown TV variant"):
        pl.tv_loss(EXAMPLE, "tv9")


def read_safetensors(path):
    """Float32 tensors of a safetensors file, parsed by hand (format: an
    8-byte little-endian header length, a JSON header, then the data)."""
    raw = open(path, "rb").read()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    data = raw[8 + size :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        assert info["dtype"] == "F32"
        out[name] = np.frombuffer(data[begin:end], np.float32).reshape(info["shape"]).astype(np.float64)
    return out


def vgg16_features(weights, x, last):
    """Outputs of VGG16 `features` modules 0..last for one C x H x W image."""
    cfg = [64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0]
    outs, index = [], 0
    for c in cfg:
        if index > last:
            break
        if c == 0:
            h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
            x = x[:, :h, :w].reshape(x.shape[0], h // 2, 2, w // 2, 2).max((2, 4))
            outs.append(x)
            index += 1
            continue
        k, b = weights[f"features.{index}.weight"], weights[f"features.{index}.bias"]
        p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
        win = np.stack([p[:, dy : dy + x.shape[1], dx : dx + x.shape[2]] for dy in range(3) for dx in range(3)], 1)
        x = np.einsum("ock,ckhw->ohw", k.reshape(k.shape[0], k.shape[1], 9), win) + b[:, None, None]
        outs.append(x)
        x = np.maximum(x, 0)
        outs.append(x)
        index += 2
    return outs


def perceptual_reference(weights, pred, target, taps, tap_weights):
    total = 0.0
    for j, tap in enumerate(taps):
        sq, count = 0.0, 0
        for n in range(pred.shape[0]):
            fp = vgg16_features(weights, pred[n], tap)[tap]
            ft = vgg16_features(weights, target[n], tap)[tap]
            sq += ((fp - ft) ** 2).sum()
            count += fp.size
        total += tap_weights[j] * sq / count
    return total


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "vgg16.safetensors"
    pl.write_seeded_weights(path, "vgg16", seed=3)
    return path


def test_perceptual_matches_numpy_vgg_and_finite_differences(seeded):
    weights = read_safetensors(seeded)
    vgg = pl.Vgg(seeded)
    taps, tap_weights = [3, 8], [1.0, 2.0]
    loss = pl.Perceptual(vgg, taps=taps, tap_weights=tap_weights)
    rng = np.random.default_rng(4)
    pred = rng.uniform(0, 1, (2, 3, 10, 12)).astype(np.float32)
    target = rng.uniform(0, 1, (2, 3, 10, 12)).astype(np.float32)
    value, grad = loss(pred, target)
    p64, t64 = pred.astype(np.float64), target.astype(np.float64)
    assert value == pytest.approx(perceptual_reference(weights, p64, t64, taps, tap_weights), rel=2e-5)
    for idx in [(0, 0, 0, 0), (1, 2, 9, 11), (0, 1, 5, 6)]:
        step = np.zeros_like(p64)
        step[idx] = 1e-6
        up = perceptual_reference(weights, p64 + step, t64, taps, tap_weights)
        down = perceptual_reference(weights, p64 - step, t64, taps, tap_weights)
        assert grad[idx] == pytest.approx((up - down) / 2e-6, rel=2e-3, abs=1e-6)


def test_perceptual_defaults_names_and_errors(seeded):
    vgg = pl.Vgg(seeded)
    x = np.random.default_rng(5).uniform(0, 1, (1, 3, 16, 16)).astype(np.float32)
    value, grad = pl.Perceptual(vgg)(x, x)
    assert value == 0.0 and not grad.any()
    two = np.concatenate([x, np.ascontiguousarray(x[:, :, ::-1])])
    total, _, per = pl.Perceptual(vgg)(two, np.concatenate([x, x]), per_sample=True)
    assert per[0] == 0.0 and per[1] > 0 and total == pytest.approx(per.mean(), rel=1e-6)
    shallow = pl.Vgg(seeded, depth=8)  # up to relu2_2
    assert pl.Perceptual(shallow, taps=["relu2_2"])(two, two)[0] == 0.0
    with pytest.raises(pl.Error, match="deeper than the loaded weights"):
        pl.Perceptual(shallow)
    named = pl.Perceptual(vgg, taps=["relu1_2", "relu2_2"], criterion="mae", input_norm="imagenet")
    value, _ = named(x, np.ascontiguousarray(x[:, ::-1]))
    assert value > 0
    with pytest.raises(pl.Error, match="relu9_9"):
        pl.Perceptual(vgg, taps=["relu9_9"])
    with pytest.raises(pl.Error, match="2 taps but 1 tap weights"):
        pl.Perceptual(vgg, taps=[3, 8], tap_weights=[1.0])
    with pytest.raises(ValueError, match="memory_budget"):
        pl.Perceptual(vgg, memory_budget=0)
    budgeted = pl.Perceptual(vgg, taps=["relu1_2", "relu2_2"], criterion="mae", input_norm="imagenet",
                             memory_budget=1 << 20)  # chunks on CUDA only: the same loss here
    assert budgeted(x, np.ascontiguousarray(x[:, ::-1]))[0] == value
    with pytest.raises(ValueError, match="unknown criterion"):
        pl.Perceptual(vgg, criterion="l3")
    with pytest.raises(pl.Error, match="3 channels"):
        pl.Perceptual(vgg)(np.zeros((1, 2, 16, 16), np.float32), np.zeros((1, 2, 16, 16), np.float32))
    with pytest.raises(pl.Error) as e:
        pl.Vgg(seeded, arch="vgg19")
    assert "features." in str(e.value)


def test_weights_depth_bad_paths_and_the_cpu_compute_dtype(seeded, tmp_path):
    assert pl.weights_depth(seeded) == 30
    assert pl.weights_depth(seeded, depth=15) == 15
    with pytest.raises(pl.Error, match="No such file") as e:
        pl.weights_depth(tmp_path / "nope.safetensors")
    assert e.value.status == 8
    with pytest.raises(pl.Error, match="is a directory, not a regular file"):
        pl.weights_depth(tmp_path)
    with pytest.warns(UserWarning, match="the CPU backend computes in float32"):
        pl.Vgg(seeded, compute="bfloat16")


def test_check_finite_names_the_first_bad_element():
    x = np.random.default_rng(8).uniform(0, 1, (2, 1, 4, 4)).astype(np.float32)
    x[1, 0, 2, 3] = np.nan
    assert np.isnan(pl.tv_loss(x, "l1")[0])
    with pytest.raises(pl.Error, match=r"x holds a non-finite value \(NaN\) at element 27 \(image 1, channel 0, row 2, column 3\)"):
        pl.tv_loss(x, "l1", check_finite=True)
    with pytest.raises(pl.Error, match="b holds a non-finite value"):
        pl.feature_loss(np.zeros_like(x), x, check_finite=True)


class Foreign:
    """An array from another library, seen only through DLPack."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def test_dlpack_inputs_are_used_without_a_copy(seeded):
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, (2, 3, 9, 11)).astype(np.float32)
    y = rng.uniform(0, 1, (2, 3, 9, 11)).astype(np.float32)
    for got, want in [
        (pl.tv_loss(Foreign(x), "l1", per_sample=True), pl.tv_loss(x, "l1", per_sample=True)),
        (pl.feature_loss(Foreign(x), Foreign(y), "mae"), pl.feature_loss(x, y, "mae")),
        (pl.Perceptual(pl.Vgg(seeded), taps=[3])(Foreign(x), Foreign(y)),
         pl.Perceptual(pl.Vgg(seeded), taps=[3])(x, y)),
    ]:
        assert got[0] == want[0]
        for a, b in zip(got[1:], want[1:]):
            np.testing.assert_array_equal(a, b)
    # The batch the library reads is the producer's memory itself.
    shared = pl._as_image_batch(Foreign(x), "x")
    assert np.shares_memory(shared, x)


def test_dlpack_inputs_the_library_cannot_take_are_refused():
    x = np.zeros((1, 3, 4, 4), np.float64)
    with pytest.raises(TypeError, match="float32 or float16"):
        pl.tv_loss(Foreign(x))

    class Elsewhere(Foreign):
        def __dlpack_device__(self):
            return (14, 0)  # kDLOneAPI

    with pytest.raises(TypeError, match="device type 14"):
        pl.tv_loss(Elsewhere(np.zeros((1, 3, 4, 4), np.float32)))
    with pytest.raises(TypeError, match="NumPy array or have __dlpack__"):
        pl.tv_loss([[1.0]])


def test_feature_inputs_of_different_shapes_are_refused():
    a = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(ValueError, match="a and b differ"):
        pl.feature_loss(a, np.zeros((1, 3, 8, 4), np.float32))
    with pytest.raises(ValueError, match="a and b differ"):
        pl.feature_loss(a, np.zeros((1, 3, 8, 8), np.float16))


def test_plan_report_counts_a_small_call(seeded):
    # By hand, as src/ops/perceptual/cuda/cost.rs's test: one 4x4 pair
    # tapped at relu1_1, f32 throughout.
    loss = pl.Perceptual(pl.Vgg(seeded), taps=["relu1_1"])
    r = loss.plan_report((1, 3, 4, 4), "float32")
    act, mask = 64 * 16 * 4, 1024 // 8
    assert r == {
        "chunks": 1,
        "kernel_launches": 6,
        "cudnn_calls": 3,
        "kernel_bytes_read": 2 * 48 * 4 + 2 * act + 2 * act + act + mask + 8 * 16 * 4,
        "kernel_bytes_written": 2 * 8 * 16 * 4 + 2 * act + mask + act + act + 48 * 4,
        "conv_flops": 3 * 2 * 64 * 8 * 9 * 16,
        "gram_flops": 0,
        "graph_nodes": 6 + 3 + 1,  # and pl_vgg_publish
    }
    assert loss.plan_report((1, 3, 4, 4), grad=False)["kernel_launches"] == 4
    # Against a kept target: pred's half of the forward alone.
    kept = loss.plan_report((1, 3, 4, 4), "float32", kept=True)
    assert (kept["kernel_launches"], kept["cudnn_calls"]) == (5, 2)
    assert kept["kernel_bytes_read"] == 48 * 4 + act + 2 * act + act + mask + 8 * 16 * 4
    assert kept["conv_flops"] == 2 * 2 * 64 * 8 * 9 * 16
    with pytest.raises(pl.Error, match="channels"):
        loss.plan_report((1, 2, 4, 4))


@pytest.mark.parametrize(
    "struct, init",
    [
        ("Outputs", "pl_outputs_init"),
        ("TvConfig", "pl_tv_config_init"),
        ("FeatureConfig", "pl_feature_config_init"),
        ("VggOptions", "pl_vgg_options_init"),
        ("PerceptualConfig", "pl_perceptual_config_init"),
        ("LpipsConfig", "pl_lpips_config_init"),
    ],
)
def test_the_ctypes_structs_are_the_librarys_size(struct, init):
    """Each options struct's init writes the library's sizeof into
    struct_size: the ctypes copy must be exactly that big (a smaller one
    would be written past its end)."""
    import ctypes

    from perceptual_loss import _lib

    cfg = getattr(_lib, struct)()
    assert getattr(_lib, init)(ctypes.byref(cfg)) == 0
    assert cfg.struct_size == ctypes.sizeof(cfg)


def test_cuda_graphs_is_accepted_on_the_cpu_and_changes_nothing(seeded):
    """The switch reaches the C config (a CPU loss ignores it): the same
    bits with it on, for the perceptual loss and LPIPS."""
    vgg = pl.Vgg(seeded)
    rng = np.random.default_rng(6)
    pred = rng.uniform(0, 1, (2, 3, 16, 16)).astype(np.float32)
    target = rng.uniform(0, 1, (2, 3, 16, 16)).astype(np.float32)
    for kind in (pl.Perceptual, pl.Lpips):
        plain, graphed = kind(vgg)(pred, target), kind(vgg, cuda_graphs=True)(pred, target)
        assert plain[0] == graphed[0] and np.array_equal(plain[1], graphed[1])
