"""PyTorch baselines for the TV benchmark, on the same card and in the same
run as the crate's (scripts/gpu-check.sh): the article's tv_loss, eager and
torch.compile, 16x3x1024x1024 f32, forward + backward, median of
CUDA-event-timed repetitions."""
import statistics

import torch


def tv_loss(x):
    # The seed article's formula, as docs/design.md ("Total variation") states it.
    n, c, h, w = x.shape
    h_tv = (x[:, :, 1:, :] - x[:, :, : h - 1, :]).pow(2).sum()
    w_tv = (x[:, :, :, 1:] - x[:, :, :, : w - 1]).pow(2).sum()
    return 2 * (h_tv / (c * (h - 1) * w) + w_tv / (c * h * (w - 1))) / n


def bench(fn, x, reps=50):
    for _ in range(5):
        x.grad = None
        fn(x).backward()
    times = []
    for _ in range(reps):
        x.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x).backward()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    x = torch.rand(16, 3, 1024, 1024, device="cuda", requires_grad=True)
    print(f"| torch {torch.__version__} on {torch.cuda.get_device_name()} | median ms |")
    print("|---|---|")
    print(f"| eager tv_loss fwd+bwd | {bench(tv_loss, x):.4f} |")
    print(f"| torch.compile tv_loss fwd+bwd | {bench(torch.compile(tv_loss), x):.4f} |")


if __name__ == "__main__":
    main()
