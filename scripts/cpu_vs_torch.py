"""The CPU backend beside PyTorch eager on the same machine, threads and
process: each case alternates one call of each, many times, and reports
the median of the per-pair time ratios (perceptual-loss / PyTorch), so
drift in the machine's speed cancels. Random weights (timing does not
depend on them); two targets alternate so neither side reuses a target.

    PERCEPTUAL_LOSS_LIB=target/release/libperceptual_loss.so \\
        PYTHONPATH=bindings/python python3 scripts/cpu_vs_torch.py [--reps 15] [--only tv] [--settle-ms 300]

Cases: VGG16 perceptual (taps [3, 8, 15, 22], MSE, f32) forward + backward
at 1x3x64x64, 2x3x128x128 and 1x3x256x256, the article's TV forward +
backward at 4x3x256x256, LPIPS (VGG16) forward + backward at 1x3x64x64
against the `lpips` package (`--only lpips`; needs it installed), and a
call against a kept target over the same call with the target passed
(`--only kept`: content relu2_2 + style Grams relu1_2..relu4_3 at
2x3x128x128; the "torch" column is then ours with the target passed)."""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torchvision

import perceptual_loss as pl

TAPS = [3, 8, 15, 22]


def torch_perceptual(path):
    from safetensors.torch import load_file

    features = torchvision.models.vgg16(weights=None).features[: max(TAPS) + 1].eval()
    state = {k.removeprefix("features."): v for k, v in load_file(path).items()}
    features.load_state_dict({k: v for k, v in state.items() if int(k.split(".")[0]) <= max(TAPS)})
    for p in features.parameters():
        p.requires_grad_(False)
    for i, m in enumerate(features):
        if isinstance(m, torch.nn.ReLU):
            features[i] = torch.nn.ReLU(inplace=False)

    def run(pred, target):
        pred = pred.clone().requires_grad_(True)
        loss, x, y = 0.0, pred, target
        for i, m in enumerate(features):
            x, y = m(x), m(y)
            if i in TAPS:
                loss = loss + torch.nn.functional.mse_loss(x, y)
        loss.backward()
        return loss.item()

    return run


def torch_tv(x):
    x = x.clone().requires_grad_(True)
    n, c, h, w = x.shape
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).sum()
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).sum()
    loss = 2 * (dh / (c * (h - 1) * w) + dw / (c * h * (w - 1))) / n
    loss.backward()
    return loss.item()


def paired(ours, theirs, inputs, reps, settle=0.0):
    """Median of ours/theirs over `reps` alternating pairs (after a warm-up),
    and each side's median time in ms. With `settle` (seconds), each call
    starts after that long idle, so the other side's worker threads (PyTorch's
    OpenMP workers spin for a while after each of its calls) are asleep."""
    for args in inputs[:2]:
        ours(*args), theirs(*args)
    ratios, a, b = [], [], []
    for k in range(reps):
        args = inputs[k % len(inputs)]
        time.sleep(settle)
        t0 = time.perf_counter()
        ours(*args)
        t1 = time.perf_counter()
        time.sleep(settle)
        t2 = time.perf_counter()
        theirs(*args)
        t3 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t3 - t2)
        ratios.append((t1 - t0) / (t3 - t2))
    return statistics.median(ratios), 1e3 * statistics.median(a), 1e3 * statistics.median(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--only", choices=["tv", "perceptual", "lpips", "kept"])
    ap.add_argument("--settle-ms", type=float, default=0.0,
                    help="idle time before each timed call (0: back to back, as in a training loop)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    settle = args.settle_ms / 1e3
    rng = np.random.default_rng(0)
    rows = []
    if args.only in (None, "tv"):
        shape = (4, 3, 256, 256)
        xs = [rng.random(shape, dtype=np.float32) for _ in range(2)]
        ratio, ours, theirs = paired(lambda x, t: pl.tv_loss(x), lambda x, t: torch_tv(t),
                                     [(x, torch.from_numpy(x)) for x in xs], args.reps * 4, settle)
        rows.append(("TV article " + "x".join(map(str, shape)), ratio, ours, theirs))
    if args.only in (None, "perceptual"):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "vgg16.safetensors")
            pl.write_seeded_weights(path, "vgg16", seed=0)
            ours_loss, theirs_loss = pl.Perceptual(pl.Vgg(path, depth=max(TAPS)), taps=TAPS), torch_perceptual(path)
            for shape in [(1, 3, 64, 64), (2, 3, 128, 128), (1, 3, 256, 256)]:
                pred = rng.random(shape, dtype=np.float32)
                targets = [rng.random(shape, dtype=np.float32) for _ in range(2)]
                inputs = [(pred, t, torch.from_numpy(pred), torch.from_numpy(t)) for t in targets]
                ratio, ours, theirs = paired(lambda p, t, tp, tt: ours_loss(p, t),
                                             lambda p, t, tp, tt: theirs_loss(tp, tt), inputs, args.reps, settle)
                rows.append(("perceptual " + "x".join(map(str, shape)), ratio, ours, theirs))
    if args.only in (None, "lpips", "kept"):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "vgg16.safetensors")
            pl.write_seeded_weights(path, "vgg16", seed=0)
            vgg = pl.Vgg(path)
            if args.only in (None, "lpips"):
                import lpips

                theirs_model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()

                def theirs_lpips(p, t):
                    p = p.clone().requires_grad_(True)
                    d = theirs_model(p, t)
                    d.mean().backward()
                    return d

                ours_lpips = pl.Lpips(vgg)
                shape = (1, 3, 64, 64)
                pred = rng.uniform(-1, 1, shape).astype(np.float32)
                targets = [rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(2)]
                inputs = [(pred, t, torch.from_numpy(pred), torch.from_numpy(t)) for t in targets]
                ratio, ours, theirs = paired(lambda p, t, tp, tt: ours_lpips(p, t),
                                             lambda p, t, tp, tt: theirs_lpips(tp, tt), inputs, args.reps, settle)
                rows.append(("LPIPS " + "x".join(map(str, shape)), ratio, ours, theirs))
            if args.only in (None, "kept"):
                style = dict(taps=["relu2_2"], style_taps=["relu1_2", "relu2_2", "relu3_3", "relu4_3"])
                kept, passed = pl.Perceptual(vgg, **style), pl.Perceptual(vgg, **style)
                shape = (2, 3, 128, 128)
                pred = rng.random(shape, dtype=np.float32)
                target = rng.random(shape, dtype=np.float32)
                kept.set_target(target)
                # Passed targets alternate, so the explicit call cannot reuse one.
                targets = [target, rng.random(shape, dtype=np.float32)]
                ratio, ours, theirs = paired(lambda t: kept(pred), lambda t: passed(pred, t),
                                             [(t,) for t in targets], args.reps, settle)
                rows.append(("kept / passed target " + "x".join(map(str, shape)), ratio, ours, theirs))
    print(f"{os.cpu_count()} threads, torch {torch.__version__}, median of {args.reps}+ alternating pairs, "
          f"{args.settle_ms:g} ms idle before each call")
    print(f"{'case (f32, fwd+bwd)':34} {'ours/torch':>10} {'ours ms':>9} {'torch ms':>9}")
    for name, ratio, ours, theirs in rows:
        print(f"{name:34} {ratio:10.2f} {ours:9.2f} {theirs:9.2f}")


if __name__ == "__main__":
    main()
