"""Finding the CUDA libraries in NVIDIA wheels when the system has none:
a fake site-packages holding a real NVRTC from the nvidia wheel that
scripts/install-nvcc.sh installs, in a child process without
LD_LIBRARY_PATH, so the library can only be found there."""
import os
import pathlib
import subprocess
import sys

import pytest

from perceptual_loss import _cuda_libs

REPO = pathlib.Path(__file__).resolve().parents[3]


def real_nvrtc():
    hits = sorted(REPO.glob(".cuda/lib/python3*/site-packages/nvidia/*/lib/libnvrtc.so.13"))
    return hits[0] if hits else None


def test_a_wheel_library_is_found_and_reported(tmp_path):
    nvrtc = real_nvrtc()
    if nvrtc is None:
        pytest.skip("no NVRTC wheel in .cuda/ (scripts/install-nvcc.sh installs one)")
    lib = tmp_path / "site" / "nvidia" / "cuda_nvrtc" / "lib"
    lib.mkdir(parents=True)
    (lib / "libnvrtc.so.13").symlink_to(nvrtc)
    assert _cuda_libs.find_in_wheels(["libnvrtc.so.13"], [tmp_path / "site"]) == lib / "libnvrtc.so.13"
    assert _cuda_libs.find_in_wheels(["libnvrtc.so.13"], [tmp_path]) is None

    # The child imports the same package this process did (checkout or installed).
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    script = (
        "import ctypes, pathlib, sys; from perceptual_loss import _cuda_libs as c\n"
        "if c._loads_by_name(c.WHEEL_LIBRARIES['nvrtc']): print('system'); sys.exit()\n"
        "c.preload([pathlib.Path(sys.argv[1])])\n"
        "print(c.loaded()['nvrtc'])\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "site")], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "system":
        pytest.skip("this system provides NVRTC itself, so the wheel's is not needed")
    assert pathlib.Path(out.stdout.strip()).resolve() == nvrtc.resolve()


def test_site_dirs_include_sys_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    assert tmp_path in _cuda_libs.site_dirs()
