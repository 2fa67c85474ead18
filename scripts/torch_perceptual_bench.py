"""PyTorch baselines for the perceptual benchmark, on the same card and in
the same run as the crate's (scripts/gpu-check.sh): VGG16 features up to
relu4_3, taps [3, 8, 15, 22], MSE, forward(pred, target) + backward(pred),
median of CUDA-event-timed runs and peak memory above the inputs and
weights. Random weights (weights=None): timing does not depend on them.

    python3 scripts/torch_perceptual_bench.py               # CUDA
    python3 scripts/torch_perceptual_bench.py --device cpu  # beside `cargo bench --bench perceptual`

On the CPU: eager f32 at the CPU benchmark's shape, on as many threads as
the crate uses (all cores; THREADS=N overrides), timed with a wall clock."""
import argparse
import os
import statistics
import time

import torch
import torchvision

TAPS = [3, 8, 15, 22]


def frozen_features():
    """VGG16 features up to the deepest tap, frozen, with out-of-place
    ReLUs (so a tap is not overwritten by the next module)."""
    features = torchvision.models.vgg16(weights=None).features[: max(TAPS) + 1].eval()
    for p in features.parameters():
        p.requires_grad_(False)
    for i, m in enumerate(features):
        if isinstance(m, torch.nn.ReLU):
            features[i] = torch.nn.ReLU(inplace=False)
    return features


def loss_fn(features):
    def f(pred, target):
        loss = 0.0
        x, y = pred, target
        for i, m in enumerate(features):
            x, y = m(x), m(y)
            if i in TAPS:
                loss = loss + torch.nn.functional.mse_loss(x, y)
        return loss
    return f


def bench(fn, pred, target, reps=30):
    for _ in range(5):
        pred.grad = None
        fn(pred, target).backward()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        pred.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(pred, target).backward()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def case(n, h, w, dtype, compile_):
    torch.backends.cudnn.allow_tf32 = False
    features = frozen_features().cuda().to(dtype=dtype, memory_format=torch.channels_last)
    pred = torch.rand(n, 3, h, w, device="cuda", dtype=dtype).to(memory_format=torch.channels_last).requires_grad_(True)
    target = torch.rand(n, 3, h, w, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    fn = loss_fn(features)
    if compile_:
        fn = torch.compile(fn)
    return bench(fn, pred, target)


def cpu_main():
    torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count())))
    fn = loss_fn(frozen_features())
    print(f"| torch {torch.__version__} CPU ({torch.get_num_threads()} threads) | median ms |")
    print("|---|---|")
    for shape in [(1, 3, 64, 64), (4, 3, 64, 64)]:
        pred, target = torch.rand(*shape, requires_grad=True), torch.rand(*shape)

        def step(grad):
            pred.grad = None
            start = time.perf_counter()
            if grad:
                fn(pred, target).backward()
            else:
                with torch.no_grad():
                    fn(pred, target)
            return (time.perf_counter() - start) * 1e3

        for grad, kind in [(True, "forward + backward"), (False, "forward only")]:
            for _ in range(2):
                step(grad)
            ms = statistics.median(step(grad) for _ in range(7))
            print(f"| eager {'x'.join(map(str, shape))} f32 {kind} | {ms:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    if ap.parse_args().device == "cpu":
        return cpu_main()
    print(f"| torch {torch.__version__} on {torch.cuda.get_device_name()} | median ms | peak extra MiB |")
    print("|---|---|---|")
    for n, h, w, dtype, name in [(8, 256, 256, torch.bfloat16, "bf16"), (8, 256, 256, torch.float32, "f32 (TF32 off)"),
                                 (16, 128, 128, torch.bfloat16, "bf16"), (1, 64, 64, torch.bfloat16, "bf16")]:
        # torch.compile only for the headline case: compiling costs ~1 min a shape.
        for compile_ in (False, True) if (n, h, dtype) == (8, 256, torch.bfloat16) else (False,):
            ms, mib = case(n, h, w, dtype, compile_)
            kind = "torch.compile" if compile_ else "eager"
            print(f"| {kind} {n}x3x{h}x{w} {name} fwd+bwd | {ms:.3f} | {mib:.0f} |")


if __name__ == "__main__":
    main()
