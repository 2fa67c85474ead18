"""The CUDA libraries the library opens at run time, by name: the driver
(libcuda, from the system only), cuDNN, NVRTC (used only when the library
was built without nvcc) and NVTX. Each is taken from the system's search
path when it is there; otherwise from the NVIDIA wheels PyTorch installs
(site-packages/nvidia/*/lib), loaded here before the first CUDA context
so that the library's own lookup by name finds it already loaded.
`loaded()` says which files were used."""
import ctypes
import os
import pathlib
import site
import sys

# Candidate file names per library, newest first (the library is built
# for CUDA 13 and also takes CUDA 12's).
WHEEL_LIBRARIES = {
    "cudnn": ["libcudnn.so.9"],
    "nvrtc": ["libnvrtc.so.13", "libnvrtc.so.12"],
    "nvtx": ["libnvtx3interop.so.1", "libnvToolsExt.so.1"],
}
# What loaded() reports: file-name prefixes in the process's mappings.
_REPORTED = {"cuda": "libcuda.so", "cudnn": "libcudnn.so", "nvrtc": "libnvrtc.so", "nvtx": ("libnvtx3interop.so",
                                                                                          "libnvToolsExt.so")}


def site_dirs():
    """Where pip puts packages: site-packages of this interpreter and the
    user's, and sys.path (a virtual environment or a --target folder)."""
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    dirs.append(site.getusersitepackages())
    dirs.extend(sys.path)
    seen, out = set(), []
    for d in dirs:
        if d and d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(pathlib.Path(d))
    return out


def find_in_wheels(names, dirs):
    """The first nvidia/*/lib/<name> under `dirs`, or None."""
    for name in names:
        for d in dirs:
            hits = sorted(d.glob(f"nvidia/*/lib/{name}"))
            if hits:
                return hits[0]
    return None


def _loads_by_name(names):
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def preload(dirs=None):
    """Loads, from the NVIDIA wheels, each library the system does not
    provide. Harmless to call more than once; a library found nowhere is
    left for the CUDA call that needs it to report."""
    if not sys.platform.startswith("linux"):
        return
    dirs = site_dirs() if dirs is None else dirs
    for names in WHEEL_LIBRARIES.values():
        if _loads_by_name(names):
            continue
        path = find_in_wheels(names, dirs)
        if path is not None:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


_preloaded = False


def preload_once():
    """`preload()` from this interpreter's site directories, the first time
    a CUDA context is made (the search does not change after that)."""
    global _preloaded
    if not _preloaded:
        preload()
        _preloaded = True


def loaded():
    """{"cuda" | "cudnn" | "nvrtc" | "nvtx": path} of the CUDA libraries in
    this process now (Linux; empty elsewhere or before any CUDA use)."""
    try:
        maps = pathlib.Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in maps:
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        base = os.path.basename(fields[5]) if len(fields) == 6 else ""
        for key, prefix in _REPORTED.items():
            if key not in found and base.startswith(prefix):
                found[key] = fields[5]
    return found
