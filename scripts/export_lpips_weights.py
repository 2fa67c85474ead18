"""Writes the LPIPS v0.1 VGG "lin" weights (five per-channel weights, 64,
128, 256, 512 and 512 of them) as safetensors with keys lin0..lin4, shape
(1, C, 1, 1), float32: the file the crate embeds as its default
(assets/lpips/vgg-v0.1.safetensors). The source is `lpips/weights/v0.1/
vgg.pth` from the `lpips` PyPI package (BSD-2-Clause; its licence is
assets/lpips/LICENSE), read from the installed package or from --pth.

    pip install --no-deps lpips==0.1.4
    python3 scripts/export_lpips_weights.py --out assets/lpips/vgg-v0.1.safetensors

The written file is read back and compared with the source tensors bit for
bit; the script fails on any difference, on a missing key, a wrong shape or
a negative weight.
"""
import argparse
import importlib.util
import pathlib
import sys

import torch
from safetensors.torch import load_file, save_file

CHANNELS = [64, 128, 256, 512, 512]


def source_path(pth):
    if pth:
        return pathlib.Path(pth)
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the lpips package is not installed: `pip install --no-deps lpips==0.1.4`, or pass --pth")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pth", help="vgg.pth of the lpips package (default: the installed package's)")
    args = ap.parse_args()
    src = source_path(args.pth)
    state = torch.load(src, map_location="cpu", weights_only=True)
    tensors = {}
    for k, c in enumerate(CHANNELS):
        key = f"lin{k}.model.1.weight"
        if key not in state:
            sys.exit(f"{src}: no {key}")
        w = state[key].float().contiguous()
        if tuple(w.shape) != (1, c, 1, 1):
            sys.exit(f"{src}: {key} has shape {tuple(w.shape)}, want (1, {c}, 1, 1)")
        if (w < 0).any():
            sys.exit(f"{src}: {key} has a negative weight")
        tensors[f"lin{k}"] = w
    save_file(tensors, args.out, metadata={"source": "lpips 0.1.4 lpips/weights/v0.1/vgg.pth"})
    back = load_file(args.out)
    for name, w in tensors.items():
        if not torch.equal(back[name], w):
            sys.exit(f"{args.out}: {name} differs from the source")
    print(f"wrote {args.out}: {', '.join(f'{k} {tuple(v.shape)}' for k, v in tensors.items())}")


if __name__ == "__main__":
    main()
