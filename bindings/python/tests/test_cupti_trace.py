"""scripts/cupti_trace.py's analysis on hand-made CUPTI records: which
range each kernel belongs to, and the check that every step has a range
with work in it and no kernel of the call falls outside the steps. (The
recording itself needs a GPU and runs in the GPU bundle.)"""
import importlib.util
import json
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[3] / "scripts" / "cupti_trace.py"
spec = importlib.util.spec_from_file_location("cupti_trace", SCRIPT)
trace = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace)

START, END = trace.MARKER_START, trace.MARKER_END


def marker(i, flags, t, name="", thread=7):
    return {"id": i, "flags": flags, "timestamp": t, "name": name, "thread": thread}


def ranges(*spans):
    """Markers of (id, name, start, end) ranges on thread 7."""
    out = []
    for i, name, s, e in spans:
        out += [marker(i, START, s, name), marker(i, END, e)]
    return out


def launch(c, t, thread=7):
    return {"correlation": c, "thread": thread, "start": t, "end": t + 1}


def kernel(c, name, s):
    return {"kind": "kernel", "name": name, "start": s, "end": s + 10_000, "correlation": c, "stream": 1}  # ns


def call(extra_launch=None):
    markers = ranges((1, "perceptual 1x3x8x8", 0, 100), (2, "preprocess", 10, 20),
                     (3, "forward conv1_1", 30, 40), (4, "input gradient", 60, 70))
    apis = [launch(1, 12), launch(2, 32), launch(3, 35), launch(4, 62), launch(9, 200)]
    work = [kernel(1, "pl_vgg_preprocess", 1000), kernel(2, "cudnn_a", 1010), kernel(3, "cudnn_b", 1020),
            kernel(4, "pl_vgg_input_grad", 1030), kernel(9, "torch_fill", 1040)]
    if extra_launch is not None:
        apis.append(launch(5, extra_launch))
        work.append(kernel(5, "stray", 1050))
    return markers, apis, work


def test_each_kernel_goes_to_the_range_that_launched_it():
    rs, problems = trace.analyse(*call())
    assert problems == []
    by_name = {r["name"]: [w["name"] for w in r["work"]] for r in rs}
    assert by_name == {"perceptual 1x3x8x8": [], "preprocess": ["pl_vgg_preprocess"],
                       "forward conv1_1": ["cudnn_a", "cudnn_b"], "input gradient": ["pl_vgg_input_grad"]}
    assert [r["depth"] for r in rs] == [0, 1, 1, 1]
    table = trace.table(rs)
    assert "| . forward conv1_1 | 2 | 0 | 20.0 |" in table


def test_a_kernel_outside_the_steps_and_an_empty_step_are_problems():
    markers, apis, work = call(extra_launch=50)  # between two steps, inside the call
    _, problems = trace.analyse(markers, apis, work)
    assert problems == ["perceptual 1x3x8x8: kernel stray was launched outside every step's range"]
    markers += ranges((5, "backward relu1_2", 80, 90))
    _, problems = trace.analyse(markers, apis, work)
    assert "perceptual 1x3x8x8: step 'backward relu1_2' launched no GPU work" in problems
    _, problems = trace.analyse([], apis, work)
    assert problems and "not traced" in problems[0]


def test_the_chrome_trace_has_every_range_call_and_kernel():
    markers, apis, work = call()
    rs, _ = trace.analyse(markers, apis, work)
    doc = json.loads(json.dumps(trace.chrome_trace(rs, apis, work)))
    cats = [e["cat"] for e in doc["traceEvents"]]
    assert cats.count("nvtx") == 4 and cats.count("cuda_api") == 5 and cats.count("kernel") == 5
    first = min(e["ts"] for e in doc["traceEvents"])
    assert first == 0 and all(e["dur"] >= 0 for e in doc["traceEvents"])
