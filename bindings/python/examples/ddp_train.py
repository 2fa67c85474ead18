"""One perceptual-loss instance per GPU under multi-GPU data-parallel
training: one process per GPU (torchrun), each with its own CUDA context
(created by the module on first use, on that process's device and current
stream) and its own resident VGG weights. Gradients flow through the loss
into the model; DDP averages the model's gradients as usual.

    torchrun --nproc_per_node=NUM_GPUS bindings/python/examples/ddp_train.py \
        --weights vgg16.safetensors [--steps 20]

Without --weights, seeded stand-in weights are written first (demo only).
On a machine without GPUs it runs one CPU process (gloo backend).
"""
import argparse
import os
import tempfile

import torch
import torch.distributed as dist

import perceptual_loss as pl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    weights = args.weights
    if weights is None:
        weights = os.path.join(tempfile.gettempdir(), "ddp-seeded-vgg16.safetensors")
        if rank == 0:
            pl.write_seeded_weights(weights, "vgg16", seed=0)
        dist.barrier()

    # A tiny image-to-image model; each rank sees its own shard of data.
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 3, 3, padding=1)
    ).to(device)
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    perceptual = pl.PerceptualLoss(weights, "vgg16", "bfloat16" if cuda else "float32")
    tv = pl.TVLoss("l1", weight=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    for step in range(args.steps):
        target = torch.rand(4, 3, args.size, args.size, generator=gen).to(device)
        noisy = (target + 0.1 * torch.randn(target.shape, generator=gen).to(device)).clamp(0, 1)
        out = model(noisy).contiguous()
        loss = perceptual(out, target) + tv(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.5f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
