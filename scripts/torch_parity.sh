#!/usr/bin/env bash
# PyTorch parity of the perceptual loss: writes torchvision-initialised
# VGG16 and VGG19 weights (seeded; no download), has the crate's
# `perceptual_dump` example compute loss and gradient for each preset and
# dtype, and recomputes both in float64 with torchvision and autograd
# (torch_reference.py). One JSON line per case; the exit status is 1 when
# any case is above its tolerance or fails to run.
#
#   scripts/torch_parity.sh DUMP_BINARY [--cpu]
#
# Needs a python3 with torch, torchvision and safetensors on PATH (or in
# $PYTHON). CI runs it with --cpu; scripts/gpu-check.sh runs it on the GPU.
set -uo pipefail
dump_bin=${1:?usage: torch_parity.sh DUMP_BINARY [--cpu]}
shift
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for arch in vgg16 vgg19; do
    "$python" "$here/export_vgg.py" --arch $arch --random-seed 0 --out "$work/$arch.safetensors" >/dev/null ||
        { echo "export_vgg.py --arch $arch failed"; exit 1; }
done
status=0
for case in "vgg16 article f32" "vgg16 article bf16" "vgg16 article f16" "vgg19 basicsr f32" "vgg19 basicsr bf16"; do
    read -r arch preset dtype <<<"$case"
    dump="$work/$preset-$dtype.safetensors"
    if ! out=$("$dump_bin" "$work/$arch.safetensors" "$dump" --preset "$preset" --dtype "$dtype" "$@" 2>&1); then
        echo "{\"preset\": \"$preset\", \"dtype\": \"$dtype\", \"ok\": false, \"error\": \"perceptual_dump: $(tail -1 <<<"${out//\"/\'}")\"}"
        status=1
        continue
    fi
    "$python" "$here/torch_reference.py" "$work/$arch.safetensors" "$dump" || status=1
done
exit $status
