#!/usr/bin/env python3
"""One headline CUDA call's timeline, recorded with CUPTI on the GPU.

nsys cannot run where the GPU checks run, so this records what it would
show: CUPTI is the process's NVTX injection (the crate's ranges reach it
as marker records) and records every kernel, memcpy and memset with the
driver or runtime call that launched it. The output is a Chrome/Perfetto
trace JSON (open it at ui.perfetto.dev or chrome://tracing) and a table
of each NVTX range's kernels and GPU time. The check fails when a step of
the schedule has no range of its own with work in it, or a kernel of the
call was launched outside every step's range.

    python3 cupti_trace.py --out DIR [--shape 8,3,256,256] [--dtype bfloat16]

Needs the `cupti-python` package (NVIDIA's CUPTI bindings; the GPU bundle
carries its wheel), PyTorch with CUDA and the perceptual_loss package.
`analyse` and `chrome_trace` take plain records, so the logic is tested
without a GPU (bindings/python/tests/test_cupti_trace.py).
"""
import argparse
import json
import os
import sys

# CUPTI_ACTIVITY_FLAG_MARKER_START / _END (cupti_activity.h).
MARKER_START, MARKER_END = 1 << 1, 1 << 2


def ranges_of(markers):
    """NVTX ranges from marker records (dicts: id, flags, timestamp, name,
    thread): each START paired with the END of its id, as (name, thread,
    start, end, depth), ordered by start; depth counts the ranges open
    around it on its thread."""
    open_, done = {}, []
    for m in sorted(markers, key=lambda m: m["timestamp"]):
        if m["flags"] & MARKER_START:
            open_[m["id"]] = m
        elif m["flags"] & MARKER_END and m["id"] in open_:
            s = open_.pop(m["id"])
            done.append({"name": s["name"], "thread": s["thread"], "start": s["timestamp"],
                         "end": m["timestamp"]})
    done.sort(key=lambda r: (r["start"], -r["end"]))
    for r in done:
        r["depth"] = sum(1 for o in done if o is not r and o["thread"] == r["thread"]
                         and o["start"] <= r["start"] and r["end"] <= o["end"])
    return done


def innermost(ranges, thread, t):
    """The deepest range open on `thread` at time `t`, or None."""
    best = None
    for r in ranges:
        if r["thread"] == thread and r["start"] <= t <= r["end"]:
            if best is None or r["depth"] > best["depth"]:
                best = r
    return best


def analyse(markers, apis, work, call_prefix="perceptual "):
    """Attributes each GPU activity in `work` (dicts: kind, name, start,
    end, correlation, stream) to the innermost NVTX range around the API
    call (dicts: correlation, thread, start, end) that launched it.

    Returns (ranges, problems): every range with its `work` list, and the
    check's findings. The call is each outermost range whose name starts
    with `call_prefix`; its steps are the ranges directly inside it. A
    problem is a step with no GPU work, or work of the call launched inside
    the call's range but outside every step's."""
    ranges = ranges_of(markers)
    for r in ranges:
        r["work"] = []
    by_correlation = {a["correlation"]: a for a in apis}
    for w in work:
        api = by_correlation.get(w["correlation"])
        if api is None:
            continue
        r = innermost(ranges, api["thread"], api["start"])
        if r is not None:
            r["work"].append(w)
    problems = []
    calls = [r for r in ranges if r["depth"] == 0 and r["name"].startswith(call_prefix)]
    if not calls:
        problems.append(f"no NVTX range named {call_prefix!r}...: the call was not traced")
    for call in calls:
        steps = [r for r in ranges if r["depth"] == 1 and r["thread"] == call["thread"]
                 and call["start"] <= r["start"] and r["end"] <= call["end"]]
        if not steps:
            problems.append(f"{call['name']}: no step ranges inside it")
        for w in call["work"]:
            problems.append(f"{call['name']}: {w['kind']} {w['name']} was launched outside every step's range")
        for s in steps:
            nested = [r for r in ranges if r["thread"] == s["thread"] and r["depth"] > s["depth"]
                      and s["start"] <= r["start"] and r["end"] <= s["end"]]
            if not s["work"] and not any(r["work"] for r in nested):
                problems.append(f"{call['name']}: step {s['name']!r} launched no GPU work")
    return ranges, problems


def table(ranges):
    """Markdown: each range (indented by depth) with its own kernels,
    memcpys and memsets, and their GPU time."""
    lines = ["| NVTX range | kernels | copies/sets | GPU us | kernel names |", "|---|---|---|---|---|"]
    for r in ranges:
        kernels = [w for w in r["work"] if w["kind"] == "kernel"]
        other = len(r["work"]) - len(kernels)
        us = sum(w["end"] - w["start"] for w in r["work"]) / 1e3
        names = sorted({w["name"][:48] for w in kernels})
        shown = ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")
        lines.append(f"| {'. ' * r['depth']}{r['name']} | {len(kernels)} | {other} | {us:.1f} | {shown} |")
    return "\n".join(lines)


def chrome_trace(ranges, apis, work):
    """The Chrome trace event format: ranges and API calls on the host
    threads, GPU work on one track per stream, microseconds from the first
    record."""
    times = [r["start"] for r in ranges] + [a["start"] for a in apis] + [w["start"] for w in work]
    t0 = min(times, default=0)
    us = lambda t: (t - t0) / 1e3  # noqa: E731
    events = [{"name": r["name"], "ph": "X", "pid": "host", "tid": r["thread"], "ts": us(r["start"]),
               "dur": us(r["end"]) - us(r["start"]), "cat": "nvtx"} for r in ranges]
    events += [{"name": a.get("name", "api"), "ph": "X", "pid": "host", "tid": a["thread"],
                "ts": us(a["start"]), "dur": us(a["end"]) - us(a["start"]), "cat": "cuda_api",
                "args": {"correlation": a["correlation"]}} for a in apis]
    events += [{"name": w["name"], "ph": "X", "pid": "GPU", "tid": f"stream {w['stream']}",
                "ts": us(w["start"]), "dur": us(w["end"]) - us(w["start"]), "cat": w["kind"],
                "args": {"correlation": w["correlation"]}} for w in work]
    return {"traceEvents": events, "displayTimeUnit": "ns"}


def inject():
    """Loads CUPTI and names it as the NVTX injection, before anything in
    the process opens an NVTX range (the NVTX library reads the variable
    once, at its first range)."""
    from cupti import cupti

    cupti.get_timestamp()  # loads libcupti
    with open("/proc/self/maps") as maps:
        lib = next((line.split()[-1] for line in maps if "libcupti.so" in line), None)
    if lib is None:
        sys.exit("cupti_trace: libcupti is not loaded")
    os.environ["NVTX_INJECTION64_PATH"] = lib
    return lib


def record(run):
    """Runs `run()` with CUPTI's activity records on and returns (markers,
    apis, work) as plain dicts."""
    from cupti import cupti

    markers, apis, work = [], [], []
    kinds = {
        cupti.ActivityKind.CONCURRENT_KERNEL: "kernel",
        cupti.ActivityKind.MEMCPY: "memcpy",
        cupti.ActivityKind.MEMSET: "memset",
    }

    def completed(activities):
        for a in activities:
            if a.kind == cupti.ActivityKind.MARKER:
                markers.append({"id": a.id, "flags": int(a.flags_), "timestamp": a.timestamp,
                                "name": a.name or "", "thread": a.object_id.pt.thread_id})
            elif a.kind in (cupti.ActivityKind.DRIVER, cupti.ActivityKind.RUNTIME):
                apis.append({"correlation": a.correlation_id, "thread": a.thread_id,
                             "start": a.start, "end": a.end, "name": f"cbid {a.cbid}"})
            elif a.kind in kinds:
                name = getattr(a, "name", None) or kinds[a.kind]
                work.append({"kind": kinds[a.kind], "name": name, "start": a.start, "end": a.end,
                             "correlation": a.correlation_id, "stream": a.stream_id})

    cupti.activity_register_callbacks(lambda: (8 << 20, 0), completed)
    for kind in [cupti.ActivityKind.MARKER, cupti.ActivityKind.DRIVER, cupti.ActivityKind.RUNTIME, *kinds]:
        cupti.activity_enable(kind)
    run()
    cupti.activity_flush_all(1)
    for kind in [cupti.ActivityKind.MARKER, cupti.ActivityKind.DRIVER, cupti.ActivityKind.RUNTIME, *kinds]:
        cupti.activity_disable(kind)
    return markers, apis, work


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for cupti-trace.json and cupti-ranges.md")
    ap.add_argument("--shape", default="8,3,256,256")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--weights", default=None, help="VGG16 safetensors (default: seeded stand-in weights)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print("CUPTI:", inject())

    import tempfile

    import torch

    import perceptual_loss as pl

    weights = args.weights
    if weights is None:
        weights = os.path.join(tempfile.mkdtemp(), "vgg16.safetensors")
        pl.write_seeded_weights(weights, "vgg16", seed=0)
    n, c, h, w = (int(v) for v in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    # Graphs off: each step's range then holds its own kernels.
    loss = pl.PerceptualLoss(weights, "vgg16", args.dtype, cuda_graphs=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    pred = torch.rand(n, c, h, w, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    target = torch.rand(n, c, h, w, device="cuda", dtype=dtype, generator=gen)

    def step():
        pred.grad = None
        loss(pred, target).backward()
        torch.cuda.synchronize()

    step()  # plans the shape: the traced call is a planned one
    markers, apis, work = record(step)
    ranges, problems = analyse(markers, apis, work)
    with open(os.path.join(args.out, "cupti-trace.json"), "w") as f:
        json.dump(chrome_trace(ranges, apis, work), f)
    text = table([r for r in ranges if r["work"] or r["depth"] <= 1])
    with open(os.path.join(args.out, "cupti-ranges.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"{len(ranges)} ranges, {sum(w['kind'] == 'kernel' for w in work)} kernels, "
          f"trace in {os.path.join(args.out, 'cupti-trace.json')}")
    for p in problems:
        print("problem:", p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
