"""scripts/export_vgg.py: converting a torchvision checkpoint from disk,
and failing in one clear line when it cannot download."""
import os
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
safetensors_torch = pytest.importorskip("safetensors.torch")

import perceptual_loss as pl  # noqa: E402

SCRIPT = pathlib.Path(__file__).resolve().parents[3] / "scripts" / "export_vgg.py"


def start(*args, env=None):
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def export(*args, env=None):
    return finish(start(*args, env=env))


def finish(process):
    out, err = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def checkpoint(arch):
    """A torchvision `arch` with every tensor of its checkpoint (classifier
    included), the features seeded random and the classifier zero: built on
    the meta device and filled, since initialising its 120M-parameter
    classifier takes seconds."""
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)(weights=None)
    model = model.to_empty(device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.features.parameters():
            p.normal_()
        for p in model.classifier.parameters():
            p.zero_()
    return model


def test_a_checkpoint_on_disk_converts_exactly(tmp_path):
    model = checkpoint("vgg16")
    pth = tmp_path / "vgg16-397923af.pth"
    torch.save(model.state_dict(), pth)  # the layout of torchvision's download
    out = tmp_path / "vgg16.safetensors"
    done = export("--from-pth", pth, "--out", out)
    assert done.returncode == 0, done.stderr
    written = safetensors_torch.load_file(str(out))
    assert len(written) == 26
    for name, t in model.features.state_dict().items():
        assert torch.equal(written[f"features.{name}"], t)
    assert pl.weights_depth(out) == 30


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    torch.save(checkpoint("vgg19").state_dict(), tmp_path / "vgg19.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    cases = [(tmp_path / "vgg19.pth", "16 VGG feature convolutions, vgg16 has 13 (a vgg19 checkpoint"),
             (tmp_path / "junk.pth", "is not a PyTorch checkpoint"),
             (tmp_path / "missing.pth", "missing.pth: no such file")]
    # The three conversions run at once (each spends most of its time importing torch).
    running = [start("--from-pth", pth, "--out", tmp_path / f"out{i}.safetensors") for i, (pth, _) in enumerate(cases)]
    for process, (_, message) in zip(running, cases):
        done = finish(process)
        assert done.returncode != 0 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_without_a_network_the_download_says_what_to_do(tmp_path):
    # An empty torch hub cache and a proxy nobody listens on: no download.
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "hub"), https_proxy="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    done = export("--arch", "vgg16", "--out", tmp_path / "out.safetensors", env=env)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert "--from-pth" in done.stderr and "vgg16-397923af.pth" in done.stderr and "--random-seed" in done.stderr
