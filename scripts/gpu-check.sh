#!/usr/bin/env bash
# Builds everything the GPU machine runs into .gpu-bundle/ (ignored by git):
# release test binaries, the TV benchmark, the example, and run.sh, which
# runs them all with PERCEPTUAL_LOSS_REQUIRE_GPU=1 and prints a short table
# last. The GPU machine has no Rust toolchain; build here, then run there:
#
#   scripts/gpu-check.sh                      # here
#   bash .gpu-bundle/run.sh                   # there, with .gpu-bundle carried
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=.gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle/bin"
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=debuginfo

# Copies the executables cargo reports for one build command into bin/,
# named <kind>-<target>.
collect() {
    python3 -c '
import json, shutil, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    kind = msg["target"]["kind"][0]
    kind = "lib" if kind in ("lib", "rlib", "cdylib", "staticlib") else kind
    shutil.copy(msg["executable"], "'"$bundle"'/bin/%s-%s" % (kind, msg["target"]["name"]))
'
}
cargo test --release --no-run --message-format=json | collect
cargo bench --bench tv --bench perceptual --no-run --message-format=json | collect
cargo build --release --examples --message-format=json | collect
# The C ABI, CLI and Python runner tests use this checkout's paths: they stay
# CPU-only tests; the Python package runs there directly, torch included.
# The CPU-only test binaries ran here (and in CI): no device time for them.
rm -f "$bundle/bin/test-c_abi" "$bundle/bin/test-python" "$bundle/bin/test-cli" \
    "$bundle/bin/test-perceptual_cpu" "$bundle/bin/test-tv_cpu" "$bundle/bin/test-feature_cpu" \
    "$bundle/bin/test-robustness" "$bundle/bin/test-nonfinite" "$bundle/bin/test-fuzz_weights" \
    "$bundle/bin/test-abuse_c_abi" "$bundle/bin/test-style_cpu" "$bundle/bin/test-lpips_cpu" \
    "$bundle/bin/test-resident_cpu"
# The CLI is tested on the CPU; leaving it out keeps the bundle under the
# 64 MiB a device call carries.
rm -f "$bundle/bin/bin-perceptual-loss"
cargo build --release --lib
mkdir -p "$bundle/lib"
cp target/release/libperceptual_loss.so "$bundle/lib/"
# The Python package and scripts keep their checkout paths (the torch tests
# import scripts/torch_reference.py).
mkdir -p "$bundle/bindings" "$bundle/scripts"
mkdir -p "$bundle/bindings/python"  # the package, its tests and examples (not a local build/)
cp -r bindings/python/perceptual_loss bindings/python/tests bindings/python/examples "$bundle/bindings/python/"
cp scripts/torch_tv_bench.py scripts/torch_perceptual_bench.py scripts/torch_style_lpips_bench.py \
    scripts/export_vgg.py scripts/torch_reference.py scripts/torch_parity.sh scripts/step_times.py \
    scripts/cupti_trace.py "$bundle/scripts/"
# NVIDIA's CUPTI bindings for the timeline (scripts/cupti_trace.py), for the
# GPU machine's Python 3.12 and CUDA 13.0 (its CUPTI library and
# cuda-bindings are there already). Without a network the step is skipped.
mkdir -p "$bundle/wheels"
"${PERCEPTUAL_LOSS_PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$bundle/wheels" "cupti-python==13.0.1" ||
    echo "(no cupti-python wheel: the bundle's timeline step will be skipped)"
# The lpips package (pure Python, BSD-2-Clause, with its lin weights) for the
# LPIPS baseline: the GPU machine cannot install it. Taken from the Python
# the tests use, when it has it.
python=${PERCEPTUAL_LOSS_PYTHON:-python3}
if lpips_dir=$("$python" -c 'import os, lpips; print(os.path.dirname(lpips.__file__))' 2>/dev/null); then
    mkdir -p "$bundle/py" && cp -r "$lpips_dir" "$bundle/py/"
fi

cat >"$bundle/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs every GPU test, the benchmarks and the example; a table comes last.
# Each step has a timeout so that one hang cannot spend the device budget.
cd "$(dirname "$0")"
# The binaries travel packed (the fatbins they each embed compress well):
# a device call carries at most 64 MiB with the working tree.
if [ ! -d bin ]; then
    tar -xJf binaries.tar.xz 2>/dev/null || python3 -m tarfile -e binaries.tar.xz .
fi
# CI runs this bundle without a GPU, with PERCEPTUAL_LOSS_REQUIRE_GPU=0,
# so that a change that breaks the script is caught before a GPU runs it.
export PERCEPTUAL_LOSS_REQUIRE_GPU=${PERCEPTUAL_LOSS_REQUIRE_GPU:-1}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
summary=()
for t in bin/lib-perceptual_loss bin/test-*; do
    [ -x "$t" ] || continue
    start=$(date +%s%N)
    skip=()  # the host-emulated kernel tests ran on the build machine
    [ "$t" = bin/lib-perceptual_loss ] && skip=(--skip ops::perceptual::cuda:: --skip ops::tv::cuda::tests --skip ops::feature::cuda::tests)
    if timeout 240 "./$t" --test-threads=1 "${skip[@]}" >"$t.log" 2>&1; then verdict=pass; else verdict=FAIL; fi
    line=$(grep -E '^test result:' "$t.log" | tail -1)
    summary+=("| ${t#bin/} | $verdict | ${line#test result: } | $(( ($(date +%s%N) - start) / 1000000 )) ms |")
    [ $verdict = pass ] || { echo "=== $t failed:"; grep -vE '^test .* ok$' "$t.log" | tail -60; }
done
# The same perceptual tests with algorithms timed on the device instead of
# taken from cuDNN's heuristics.
if PERCEPTUAL_LOSS_CUDNN_BENCHMARK=1 timeout 240 ./bin/test-gpu_perceptual --test-threads=1 >timed.log 2>&1; then
    verdict=pass; else verdict=FAIL; grep -vE '^test .* ok$' timed.log | tail -40; fi
summary+=("| test-gpu_perceptual, PERCEPTUAL_LOSS_CUDNN_BENCHMARK=1 | $verdict | $(grep -E '^test result:' timed.log | tail -1) | |")
# Every perceptual test again with each loss's calls replayed from its own
# CUDA graphs: the results must not change.
if PERCEPTUAL_LOSS_CUDA_GRAPHS=1 timeout 240 ./bin/test-gpu_perceptual --test-threads=1 >graphs.log 2>&1; then
    verdict=pass; else verdict=FAIL; grep -vE '^test .* ok$' graphs.log | tail -40; fi
summary+=("| test-gpu_perceptual, PERCEPTUAL_LOSS_CUDA_GRAPHS=1 | $verdict | $(grep -E '^test result:' graphs.log | tail -1) | |")
echo "=== Python package (NumPy and PyTorch paths)"
if PERCEPTUAL_LOSS_LIB="$PWD/lib/libperceptual_loss.so" PERCEPTUAL_LOSS_REQUIRE_TORCH=1 \
    timeout 300 python3 -m pytest -q -p no:cacheprovider bindings/python/tests >python.log 2>&1; then
    verdict=pass; else verdict=FAIL; fi
tail -15 python.log
summary+=("| python (pytest) | $verdict | $(tail -1 python.log) | |")
echo "=== example"
./bin/example-losses 2>&1 | tail -12
echo "=== the main job on this device: feature inversion, then style transfer against a kept target"
for style in "" "--style generated"; do
    if timeout 60 ./bin/example-feature_inversion --steps 40 --out "main-job${style:+-style}" $style >main-job.log 2>&1; then
        verdict=pass; else verdict=FAIL; fi
    tail -3 main-job.log
    summary+=("| main job ${style:-(feature inversion)} | $verdict | $(tail -1 main-job.log) | |")
done
echo "=== PyTorch parity (float64 torchvision + autograd vs the crate on the GPU)"
timeout 240 scripts/torch_parity.sh bin/example-perceptual_dump >parity.log 2>&1
parity_status=$?
cat parity.log
echo "=== PyTorch anchors on this card"
# TORCH_ANCHORS=0 skips them (a rerun on a card they were already taken on).
if [ "${TORCH_ANCHORS:-1}" = 0 ]; then
    echo "(skipped: TORCH_ANCHORS=0)"
elif python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    timeout 120 python3 scripts/torch_tv_bench.py 2>&1 | tail -6 || echo "(torch TV benchmark failed or timed out)"
    timeout 300 python3 scripts/torch_perceptual_bench.py 2>&1 | tail -8 || echo "(torch perceptual benchmark failed or timed out)"
    PYTHONPATH="$PWD/py${PYTHONPATH:+:$PYTHONPATH}" timeout 300 python3 scripts/torch_style_lpips_bench.py 2>&1 |
        grep -E '^\|' || echo "(torch style/LPIPS benchmark failed or timed out)"
else
    echo "(skipped: torch has no CUDA device here)"
    # The style/LPIPS baselines' losses, on the CPU at a tiny shape.
    if PYTHONPATH="$PWD/py${PYTHONPATH:+:$PYTHONPATH}" timeout 120 python3 scripts/torch_style_lpips_bench.py --check \
        >style-lpips-check.log 2>&1; then verdict=pass; else verdict=FAIL; tail -20 style-lpips-check.log; fi
    summary+=("| torch_style_lpips_bench.py --check | $verdict | $(tail -1 style-lpips-check.log) | |")
fi
echo "=== crate benchmarks"
timeout 120 ./bin/bench-tv 2>&1 | tail -10
PERCEPTUAL_LOSS_LOG_PLANS=1 timeout 180 ./bin/bench-perceptual 2>plans.log | tail -15
echo "=== again, with cuDNN timing its algorithms (PERCEPTUAL_LOSS_CUDNN_BENCHMARK=1)"
PERCEPTUAL_LOSS_CUDNN_BENCHMARK=1 PERCEPTUAL_LOSS_LOG_PLANS=1 timeout 180 ./bin/bench-perceptual --gpu-only \
    2>plans-timed.log | tail -9
echo "=== where the headline case spends its time (PERCEPTUAL_LOSS_STEP_TIMES=1, medians over calls)"
PERCEPTUAL_LOSS_STEP_TIMES=1 timeout 180 ./bin/bench-perceptual --gpu-only 2>steps.log >/dev/null
python3 scripts/step_times.py "[8, 3, 256, 256] bf16 fwd+bwd" <steps.log
echo "=== one headline call's timeline, recorded with CUPTI (scripts/cupti_trace.py)"
# The trace JSON and the ranges' table land in $OUT when the device tool
# sets it (it brings them back), else here.
: >cupti.log
if ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    verdict="skipped (torch has no CUDA device here)"
elif ls wheels/cupti_python-*.whl >/dev/null 2>&1 &&
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/cupti-site wheels/cupti_python-*.whl >cupti-pip.log 2>&1; then
    if PERCEPTUAL_LOSS_LIB="$PWD/lib/libperceptual_loss.so" \
        PYTHONPATH="/tmp/cupti-site:$PWD/bindings/python${PYTHONPATH:+:$PYTHONPATH}" \
        timeout 120 python3 scripts/cupti_trace.py --out "${OUT:-$PWD}/cupti" >cupti.log 2>&1; then
        verdict=pass; else verdict=FAIL; fi
    tail -70 cupti.log
else
    verdict="skipped (no cupti-python wheel, or it did not install: cupti-pip.log)"
fi
summary+=("| cupti_trace.py (timeline; every step ranged) | $verdict | $(tail -1 cupti.log) | |")
echo "=== Nsight Compute on the fused relu1_2+pool1+tap pass (the slowest of our kernels)"
if command -v ncu >/dev/null; then
    timeout 90 ncu --kernel-name regex:bias_act_pool_tap --launch-count 1 --section SpeedOfLight \
        --section Occupancy --section MemoryWorkloadAnalysis ./bin/example-losses 2>&1 |
        grep -E "Duration|Throughput|Occupancy|Registers|Block Limit" || echo "(ncu failed or timed out)"
else
    echo "(skipped: no ncu)"
fi
echo "=== cuDNN plans of the headline case (PERCEPTUAL_LOSS_LOG_PLANS=1), from heuristics and timed"
for log in plans.log plans-timed.log; do
    grep -m1 -A14 "plan for \[8, 3, 256, 256\] computing in bf16" $log || tail -20 $log
done
echo "=== compute-sanitizer: every GPU test binary under memcheck, initcheck, synccheck and racecheck"
# In the time left of RUN_BUDGET_S, shared among the runs still to go (a
# run whose share is under 20 s is skipped and says so). The 1,000-cycle
# memory test is left out: under a sanitizer it would take the whole budget.
sanitizer_bins=(bin/test-gpu bin/test-gpu_perceptual bin/test-gpu_nvrtc)
runs_left=$(( 4 * ${#sanitizer_bins[@]} ))
for tool in memcheck initcheck synccheck racecheck; do
    for t in "${sanitizer_bins[@]}"; do
        log="sanitizer-$tool-${t#bin/}.log"
        : >"$log"
        share=$(( (${RUN_BUDGET_S:-420} - SECONDS - 15) / runs_left ))
        runs_left=$(( runs_left - 1 ))
        if ! command -v compute-sanitizer >/dev/null; then verdict="skipped (no compute-sanitizer)"
        elif [ ! -x "$t" ]; then verdict="skipped (no $t)"
        elif [ $share -lt 20 ]; then verdict="skipped (no time left)"
        elif timeout $share compute-sanitizer --tool $tool --error-exitcode 1 "$t" --test-threads=1 \
            --skip create_and_destroy_cycles >"$log" 2>&1; then verdict=pass
        elif [ $? = 124 ]; then verdict="FAIL (timed out after ${share} s)"
        else verdict=FAIL; fi
        case "$verdict" in FAIL*) grep -B2 -A12 "Invalid\|Error\|Race\|Uninitialized\|Barrier" "$log" | head -40 ;; esac
        summary+=("| compute-sanitizer $tool ${t#bin/} | $verdict | $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1) | |")
    done
done
echo
echo "parity (exit $parity_status):"
cat parity.log
echo "| test binary | verdict | counts | wall |"
echo "|---|---|---|---|"
printf '%s\n' "${summary[@]}"
RUN
chmod +x "$bundle/run.sh"
# Packed; run.sh unpacks them first.
tar -C "$bundle" -cf - bin lib | xz -6 -T2 >"$bundle/binaries.tar.xz"
rm -rf "$bundle/bin" "$bundle/lib"
size=$(du -sm "$bundle" | cut -f1)
if [ "$size" -gt 56 ]; then
    echo "error: the bundle is $size MiB; a device call carries 64 MiB with the working tree" >&2
    exit 1
fi
du -sh "$bundle"
echo "run on the GPU machine: bash $bundle/run.sh (carry $bundle)"
