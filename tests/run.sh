#!/usr/bin/env bash
# Runs every test of iteris-mpi and ends with the line "N passed, N failed".
#   unit tests (gtest), the same under ASan/UBSan, MPI tests under mpirun -np 1..4, end-to-end scripts.
# Each run is under a timeout, so a hang is a failure. Logs go to $BUILD/test-logs/.
set -u
BUILD=${BUILD:-build}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1
export OPENBLAS_NUM_THREADS=1 GTEST_COLOR=no
export ITERIS_BIN=$PWD/$BUILD/bin/iteris-mpi ITERIS_BUILD=$PWD/$BUILD
LOGS=$BUILD/test-logs
rm -rf "$LOGS"; mkdir -p "$LOGS"
pass=0; fail=0

# run_gtest LABEL TIMEOUT CMD...: adds the test counts of the GTEST_SUMMARY line; a missing line
# (crash, hang, sanitizer abort) counts as one failure.
run_gtest() {
  local label=$1 limit=$2; shift 2
  local log=$LOGS/$label.log
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  local rc=$? line
  line=$(grep -a '^GTEST_SUMMARY' "$log" | tail -n 1)
  if [ -n "$line" ]; then
    local p f
    p=$(sed -n 's/.*passed=\([0-9]*\).*/\1/p' <<<"$line"); f=$(sed -n 's/.*failed=\([0-9]*\).*/\1/p' <<<"$line")
    pass=$((pass + p)); fail=$((fail + f))
    if [ "$f" -eq 0 ] && [ $rc -ne 0 ]; then fail=$((fail + 1)); echo "$label: exit code $rc after all tests passed"; fi
    echo "$label: $p passed, $f failed"
  else
    fail=$((fail + 1)); echo "$label: no summary (exit code $rc; 124 = timeout)"
  fi
  if [ $rc -ne 0 ]; then grep -a -E 'Failure|FAILED|ERROR|error:|Sanitizer|runtime error' "$log" | head -n 40; fi
}

run_gtest unit 600 "$BUILD/tests/unit_tests" --gtest_color=no
if [ -x "$BUILD/asan/tests/unit_tests" ]; then
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
    run_gtest unit-asan 900 "$BUILD/asan/tests/unit_tests" --gtest_color=no
fi
for np in 1 2 3 4; do
  run_gtest "mpi-np$np" 600 mpirun -np "$np" "$BUILD/tests/mpi_tests" --gtest_color=no
done
for t in tests/e2e/*.sh; do
  [ -e "$t" ] || continue
  name=$(basename "$t" .sh)
  if timeout -k 10 900 bash "$t" >"$LOGS/e2e-$name.log" 2>&1; then
    pass=$((pass + 1)); echo "e2e $name: passed"
  else
    fail=$((fail + 1)); echo "e2e $name: FAILED (log $LOGS/e2e-$name.log)"; tail -n 30 "$LOGS/e2e-$name.log"
  fi
done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
