"""Summarises the per-step device times a perceptual call prints with
PERCEPTUAL_LOSS_STEP_TIMES=1 (src/cuda/step_times.rs): the median of each
step over the calls of one case, summed by kind of step, then the slowest
steps.

    PERCEPTUAL_LOSS_STEP_TIMES=1 cargo bench --bench perceptual -- --gpu-only 2>steps.log
    python3 scripts/step_times.py "[8, 3, 256, 256] bf16 fwd+bwd" <steps.log"""
import collections
import statistics
import sys


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    prefix = f"step-times {sys.argv[1]} |"
    times = collections.defaultdict(list)
    for line in sys.stdin:
        if line.startswith(prefix):
            _, kind, label, ms = (field.strip() for field in line.split("|"))
            times[(kind, label)].append(float(ms))
    if not times:
        sys.exit(f"no step times for {sys.argv[1]!r}")
    steps = {key: statistics.median(v) for key, v in times.items()}
    total = sum(steps.values())
    by_kind = collections.Counter()
    for (kind, _), ms in steps.items():
        by_kind[kind] += ms
    print(f"| {sys.argv[1]}: step kind | ms | share |")
    print("|---|---|---|")
    for kind, ms in by_kind.most_common():
        print(f"| {kind} | {ms:.3f} | {100 * ms / total:.0f}% |")
    print(f"| all {len(steps)} steps | {total:.3f} | |")
    print("\n| slowest steps | kind | ms |")
    print("|---|---|---|")
    for (kind, label), ms in sorted(steps.items(), key=lambda kv: -kv[1])[:12]:
        print(f"| {label} | {kind} | {ms:.3f} |")


if __name__ == "__main__":
    main()
