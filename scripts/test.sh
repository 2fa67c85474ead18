#!/usr/bin/env bash
# The README's test command: `cargo test` (arguments are passed on), then a
# list of every test that skipped and why (no CUDA device, no C++
# compiler, no Python with torch), grouped by test binary and reason.
# Exits with cargo's status.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
log="$PWD/target/test-skips.log"
: >"$log"
PERCEPTUAL_LOSS_SKIP_LOG="$log" cargo test "$@"
status=$?
echo
if [ -s "$log" ]; then
    echo "skipped, by test binary and reason (the README's \"GPU checks\" runs the GPU ones):"
    # suite<TAB>test<TAB>reason -> "  suite: N tests: reason"
    sort "$log" | awk -F'\t' '{ key = $1 "\t" $3; n[key]++ } END { for (k in n) { split(k, f, "\t");
        printf "  %s: %d test%s: %s\n", f[1], n[k], n[k] == 1 ? "" : "s", f[2] } }' | sort
elif [ "$status" -eq 0 ]; then
    echo "nothing skipped"
fi
exit $status
