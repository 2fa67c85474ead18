#!/usr/bin/env bash
# Installs nvcc 13.0 (and NVRTC, for the run-time compile test, and the NVTX
# library and headers, for the NVTX test) from PyPI
# wheels into the project-local venv .cuda/, where build.rs finds it. No GPU
# or system CUDA toolkit is needed. Pinned to 13.0: PTX from a newer nvcc
# cannot be JIT-compiled by a CUDA 13.0 driver.
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc_glob=".cuda/lib/python3*/site-packages/nvidia/cu13/bin/nvcc"
if compgen -G "$nvcc_glob" >/dev/null && compgen -G ".cuda/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13" >/dev/null \
    && compgen -G ".cuda/lib/python3*/site-packages/nvidia/cu13/lib/libnvtx3interop.so.1" >/dev/null; then
    echo "nvcc already installed: $(ls $nvcc_glob)"
    exit 0
fi
python3 -m venv .cuda
.cuda/bin/pip install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-nvtx==13.0.*"
echo "installed: $(ls $nvcc_glob)"
