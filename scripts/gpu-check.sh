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
    "$bundle/bin/test-perceptual_cpu" "$bundle/bin/test-tv_cpu" "$bundle/bin/test-feature_cpu"
cargo build --release --lib
mkdir -p "$bundle/lib"
cp target/release/libperceptual_loss.so "$bundle/lib/"
cp -r bindings/python "$bundle/python"
cp scripts/torch_tv_bench.py scripts/torch_perceptual_bench.py scripts/export_vgg.py scripts/torch_reference.py "$bundle/"

cat >"$bundle/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs every GPU test, the benchmarks and the example; a table comes last.
# Each step has a timeout so that one hang cannot spend the device budget.
cd "$(dirname "$0")"
export PERCEPTUAL_LOSS_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
summary=()
for t in bin/lib-perceptual_loss bin/test-*; do
    [ -x "$t" ] || continue
    start=$(date +%s%N)
    skip=()  # the host-emulated kernel tests ran on the build machine
    [ "$t" = bin/lib-perceptual_loss ] && skip=(--skip cuda::perceptual::tests --skip cuda::tv::tests --skip cuda::feature::tests)
    if timeout 240 "./$t" --test-threads=1 "${skip[@]}" >"$t.log" 2>&1; then verdict=pass; else verdict=FAIL; fi
    line=$(grep -E '^test result:' "$t.log" | tail -1)
    summary+=("| ${t#bin/} | $verdict | ${line#test result: } | $(( ($(date +%s%N) - start) / 1000000 )) ms |")
    [ $verdict = pass ] || { echo "=== $t failed:"; grep -vE '^test .* ok$' "$t.log" | tail -60; }
done
echo "=== Python package (NumPy and PyTorch paths)"
if PERCEPTUAL_LOSS_LIB="$PWD/lib/libperceptual_loss.so" timeout 300 python3 -m pytest -q -p no:cacheprovider python/tests >python.log 2>&1; then
    verdict=pass; else verdict=FAIL; fi
tail -15 python.log
summary+=("| python (pytest) | $verdict | $(tail -1 python.log) | |")
echo "=== example"
./bin/example-losses 2>&1 | tail -12
echo "=== PyTorch parity (float64 torchvision + autograd vs the crate)"
parity=()
python3 export_vgg.py --arch vgg16 --random-seed 0 --out /tmp/vgg16.safetensors >/dev/null &&
python3 export_vgg.py --arch vgg19 --random-seed 0 --out /tmp/vgg19.safetensors >/dev/null || echo "(export failed)"
for run in "vgg16 article f32" "vgg16 article bf16" "vgg19 basicsr f32" "vgg19 basicsr bf16"; do
    set -- $run
    dump=/tmp/dump-$2-$3.safetensors
    if ./bin/example-perceptual_dump /tmp/$1.safetensors "$dump" --preset "$2" --dtype "$3" >/dev/null 2>&1; then
        parity+=("$(python3 torch_reference.py /tmp/$1.safetensors "$dump" 2>&1 | tail -1)")
    else
        parity+=("$run: perceptual_dump failed: $(./bin/example-perceptual_dump /tmp/$1.safetensors "$dump" --preset "$2" --dtype "$3" 2>&1 | tail -1)")
    fi
done
printf '%s\n' "${parity[@]}"
echo "=== PyTorch anchors on this card"
timeout 120 python3 torch_tv_bench.py 2>&1 | tail -6 || echo "(torch TV benchmark failed or timed out)"
timeout 300 python3 torch_perceptual_bench.py 2>&1 | tail -8 || echo "(torch perceptual benchmark failed or timed out)"
echo "=== crate benchmarks"
timeout 120 ./bin/bench-tv 2>&1 | tail -10
timeout 180 ./bin/bench-perceptual 2>&1 | tail -10
echo
printf 'parity: %s\n' "${parity[@]}"
echo "| test binary | verdict | counts | wall |"
echo "|---|---|---|---|"
printf '%s\n' "${summary[@]}"
RUN
chmod +x "$bundle/run.sh"
du -sh "$bundle"
echo "run on the GPU machine: bash $bundle/run.sh (carry $bundle)"
