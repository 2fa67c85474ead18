"""Writes torchvision VGG `features` weights to a safetensors file the crate
loads (names `features.N.weight` / `features.N.bias`).

    # pretrained ImageNet weights (needs them cached or a network):
    python3 scripts/export_vgg.py --arch vgg16 --out vgg16.safetensors
    # torchvision's own random initialisation, seeded (no download):
    python3 scripts/export_vgg.py --arch vgg19 --random-seed 0 --out vgg19-random.safetensors

Only `features` is written (the classifier is not used); --dtype stores
f16 or bf16 instead of f32.
"""
import argparse

import torch
import torchvision
from safetensors.torch import save_file

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def build(arch, random_seed):
    ctor = getattr(torchvision.models, arch)
    if random_seed is None:
        weights = {"vgg16": "VGG16_Weights", "vgg19": "VGG19_Weights"}[arch]
        return ctor(weights=getattr(torchvision.models, weights).IMAGENET1K_V1)
    torch.manual_seed(random_seed)
    return ctor(weights=None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["vgg16", "vgg19"], default="vgg16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--random-seed", type=int, help="seeded random weights instead of the pretrained ones")
    args = ap.parse_args()
    model = build(args.arch, args.random_seed).eval()
    tensors = {
        f"features.{name}": t.detach().to(DTYPES[args.dtype]).contiguous()
        for name, t in model.features.state_dict().items()
    }
    save_file(tensors, args.out, metadata={"arch": args.arch, "source": "random" if args.random_seed is not None else "imagenet"})
    print(f"wrote {len(tensors)} tensors of {args.arch} features to {args.out}")


if __name__ == "__main__":
    main()
