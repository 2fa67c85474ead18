"""Builds the perceptual-loss shared library with cargo into the package.

`pip install ./bindings/python` and `pip wheel ./bindings/python` run this
(in place: the crate is two folders up, so build from a checkout, not from
an sdist). The library is loaded with ctypes, not imported, so the wheel
is tagged for any Python 3 and for the oldest manylinux its glibc symbol
versions allow.
"""
import pathlib
import re
import shutil
import sys

from setuptools import setup
from setuptools_rust import Binding, RustExtension, Strip

try:
    from wheel.bdist_wheel import bdist_wheel
except ImportError:  # setuptools >= 70.1 carries its own
    from setuptools.command.bdist_wheel import bdist_wheel

# The highest GLIBC_2.N symbol version the library asks for: its .dynstr
# holds one string per version it needs. It links nothing but libc,
# libgcc_s and the loader (CUDA is opened at run time), which every
# manylinux platform has; CI checks the tag with `auditwheel show`.
_GLIBC = re.compile(rb"GLIBC_2\.([0-9]+)")


def manylinux_tag(library, arch):
    """manylinux_2_N_<arch>: the oldest glibc `library` runs on."""
    minor = max((int(m) for m in _GLIBC.findall(pathlib.Path(library).read_bytes())), default=17)
    return f"manylinux_2_{max(minor, 17)}_{arch}"


class PlatformWheel(bdist_wheel):
    """py3-none-manylinux_2_N_<arch>: one wheel for every Python 3."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        if sys.platform != "linux":
            return "py3", "none", plat
        libs = sorted(pathlib.Path(self.bdist_dir).rglob("libperceptual_loss*.so"))
        if not libs:
            # An editable install asks before anything is built; its wheel
            # holds no library and stays on this machine.
            return "py3", "none", plat
        arch = plat.split("_", 1)[1] if plat.startswith("linux_") else plat.rsplit("_", 1)[-1]
        return "py3", "none", manylinux_tag(libs[0], arch)


# setuptools stages files in build/lib* and never removes old ones: a
# library from an earlier build under another name, or a module since
# deleted, would ship beside the new ones.
for staged in (pathlib.Path(__file__).resolve().parent / "build").glob("lib*"):
    shutil.rmtree(staged, ignore_errors=True)

setup(
    rust_extensions=[
        RustExtension(
            "perceptual_loss.libperceptual_loss",
            path="../../Cargo.toml",
            binding=Binding.NoBinding,
            strip=Strip.Debug,
            # Named libperceptual_loss.abi3.so: one file for every Python 3.
            py_limited_api=True,
        )
    ],
    cmdclass={"bdist_wheel": PlatformWheel},
    zip_safe=False,
)
