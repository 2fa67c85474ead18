"""Writes torchvision VGG `features` weights to a safetensors file the crate
loads (names `features.N.weight` / `features.N.bias`).

    # a torchvision checkpoint already on disk (no network):
    python3 scripts/export_vgg.py --arch vgg16 \\
        --from-pth ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth --out vgg16.safetensors
    # pretrained ImageNet weights, downloaded by torchvision (or its cache):
    python3 scripts/export_vgg.py --arch vgg16 --out vgg16.safetensors
    # torchvision's own random initialisation, seeded (stand-in weights):
    python3 scripts/export_vgg.py --arch vgg19 --random-seed 0 --out vgg19-random.safetensors

Only `features` is written (the classifier is not used); --dtype stores
f16 or bf16 instead of f32.
"""
import argparse
import re
import sys
import urllib.error

import torch
from safetensors.torch import save_file

# torchvision is imported where it is used: converting a checkpoint file
# does not need it (and it takes longer to import than torch).

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
CONVS = {"vgg16": 13, "vgg19": 16}
CHECKPOINTS = {"vgg16": "vgg16-397923af.pth", "vgg19": "vgg19-dcbb9e9d.pth"}


def fail(message):
    """Exits with one line (library messages can span several)."""
    sys.exit("export_vgg.py: " + " ".join(str(message).split()))


def pretrained(arch):
    """torchvision's ImageNet weights; without a network, one line saying
    what to do instead."""
    import torchvision

    weights = getattr(torchvision.models, {"vgg16": "VGG16_Weights", "vgg19": "VGG19_Weights"}[arch]).IMAGENET1K_V1
    try:
        return features_of(weights.get_state_dict(progress=True), arch, weights.url)
    except (urllib.error.URLError, OSError) as e:
        fail(f"cannot download the {arch} ImageNet weights ({getattr(e, 'reason', e)}); pass a torchvision "
             f"checkpoint you have with --from-pth (e.g. ~/.cache/torch/hub/checkpoints/{CHECKPOINTS[arch]}), "
             f"or --random-seed 0 for stand-in weights")


def from_pth(path, arch):
    """The `features` tensors of a torchvision VGG checkpoint (a state
    dict, optionally under a `vgg16.`/`model.` prefix or a "state_dict" key)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"{path}: no such file")
    except Exception as e:  # a truncated or non-PyTorch file: say which file
        fail(f"{path} is not a PyTorch checkpoint ({str(e).strip().splitlines()[0]})")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return features_of(state, arch, path)


def features_of(state, arch, origin):
    """The `features.N.*` tensors of a VGG state dict, checked against `arch`."""
    features = {}
    for name, t in state.items() if isinstance(state, dict) else ():
        m = re.search(r"(?:^|\.)features\.(\d+\.(?:weight|bias))$", name)
        if m and isinstance(t, torch.Tensor):
            features[m.group(1)] = t
    convs = sum(1 for k in features if k.endswith(".weight"))
    if convs != CONVS[arch]:
        found = next((a for a, n in CONVS.items() if n == convs), None)
        hint = f" (a {found} checkpoint: pass --arch {found})" if found else ""
        fail(f"{origin} holds {convs} VGG feature convolutions, {arch} has {CONVS[arch]}{hint}")
    return features


def seeded(arch, seed):
    import torchvision

    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(weights=None).features.state_dict()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(CONVS), default="vgg16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--from-pth", metavar="PATH", help="convert a torchvision checkpoint file (no network)")
    source.add_argument("--random-seed", type=int, help="seeded random weights instead of the pretrained ones")
    args = ap.parse_args()
    if args.from_pth:
        state, origin = from_pth(args.from_pth, args.arch), "checkpoint"
    elif args.random_seed is not None:
        state, origin = seeded(args.arch, args.random_seed), "random"
    else:
        state, origin = pretrained(args.arch), "imagenet"
    tensors = {f"features.{name}": t.detach().to(DTYPES[args.dtype]).contiguous() for name, t in state.items()}
    save_file(tensors, args.out, metadata={"arch": args.arch, "source": origin})
    print(f"wrote {len(tensors)} tensors of {args.arch} features to {args.out}")


if __name__ == "__main__":
    main()
