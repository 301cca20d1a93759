#!/usr/bin/env bash
# Runs every libFuzzer target of BUILD/fuzz (make fuzz): first over its seed corpus
# (tests/fuzz/corpus/<target>/: small valid files and every crash found so far, kept as fixtures),
# then for FUZZ_SECONDS of new inputs. A crash, leak, timeout (10 s per input) or out-of-memory
# fails the target; its input is kept as BUILD/fuzz/artifacts/<target>-crash-... (copy it into the
# corpus once fixed). Ends with "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build/fuzz}
SECS=${FUZZ_SECONDS:-60}
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
mkdir -p "$BUILD/artifacts"
pass=0 fail=0
for bin in "$BUILD"/fuzz/fuzz_*; do
  t=$(basename "$bin")
  seeds=tests/fuzz/corpus/$t
  work=$(mktemp -d)
  # MPI and PETSc keep allocations until exit: no leak report for the target that starts them
  leaks=1; [ "$t" = fuzz_job_file ] && leaks=0
  if ASAN_OPTIONS=detect_leaks=$leaks:allocator_may_return_null=1 \
    "$bin" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$BUILD/artifacts/$t-" "$work" "$seeds" >"$BUILD/artifacts/$t.log" 2>&1; then
    runs=$(grep -m1 -oE 'stat::number_of_executed_units: *[0-9]+' "$BUILD/artifacts/$t.log" | grep -oE '[0-9]+$')
    echo "fuzz $t: passed (${runs:-?} inputs in ${SECS} s, $(ls "$seeds" | wc -l) seeds)"
    pass=$((pass + 1))
  else
    echo "fuzz $t: FAILED (log $BUILD/artifacts/$t.log):"
    grep -E 'ERROR|SUMMARY|artifact|Test unit written' "$BUILD/artifacts/$t.log" | head -n 8
    fail=$((fail + 1))
  fi
  rm -rf "$work"
done
[ $((pass + fail)) -gt 0 ] || { echo "fuzz: no target in $BUILD/fuzz"; fail=1; }
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
