#!/usr/bin/env bash
# Runs every test of iteris-mpi and ends with the line "N passed, N failed".
#   unit tests (gtest), the same under ASan/UBSan, MPI tests under mpirun -np 1..4, end-to-end scripts,
#   and some end-to-end scripts again with the binary built with ASan/UBSan.
# Each run is under a timeout, so a hang is a failure. Logs go to $BUILD/test-logs/.
# A skipped test is counted as skipped, never as passed: gtest's skips, and an end-to-end script that
# exits with 77 (what it needs is absent, e.g. ../shared/models). With CI=true a skip is a failure.
# The line before the last says how many checks are distinct (the unit suite runs twice, the MPI
# suite at four rank counts).
set -u
BUILD=${BUILD:-build}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1
export OPENBLAS_NUM_THREADS=1 GTEST_COLOR=no
export ITERIS_BIN=$PWD/$BUILD/bin/iteris-mpi ITERIS_BUILD=$PWD/$BUILD
LOGS=$BUILD/test-logs
rm -rf "$LOGS"; mkdir -p "$LOGS"
pass=0; fail=0; skip=0; distinct=0

# run_gtest LABEL DISTINCT TIMEOUT CMD...: adds the test counts of the GTEST_SUMMARY line (DISTINCT=1:
# these tests count as distinct ones); a missing line (crash, hang, sanitizer abort) counts as one failure.
run_gtest() {
  local label=$1 count_distinct=$2 limit=$3; shift 3
  local log=$LOGS/$label.log
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  local rc=$? line
  line=$(grep -a '^GTEST_SUMMARY' "$log" | tail -n 1)
  if [ -n "$line" ]; then
    local p f k
    p=$(sed -n 's/.*passed=\([0-9]*\).*/\1/p' <<<"$line"); f=$(sed -n 's/.*failed=\([0-9]*\).*/\1/p' <<<"$line")
    k=$(sed -n 's/.*skipped=\([0-9]*\).*/\1/p' <<<"$line"); k=${k:-0}
    pass=$((pass + p)); fail=$((fail + f)); skip=$((skip + k))
    [ "$count_distinct" -eq 1 ] && distinct=$((distinct + p + f + k))
    if [ "$f" -eq 0 ] && [ $rc -ne 0 ]; then fail=$((fail + 1)); echo "$label: exit code $rc after all tests passed"; fi
    echo "$label: $p passed, $f failed, $k skipped"
    if [ "$k" -gt 0 ]; then
      grep -a -E '^SKIPPED|\[  SKIPPED \]' "$log" | head -n 10
      if [ "${CI:-}" = true ]; then fail=$((fail + k)); echo "$label: CI=true: $k skipped test(s) count as failed"; fi
    fi
  else
    fail=$((fail + 1)); echo "$label: no summary (exit code $rc; 124 = timeout)"
  fi
  if [ $rc -ne 0 ]; then grep -a -E 'Failure|FAILED|ERROR|error:|Sanitizer|runtime error' "$log" | head -n 40; fi
}

# ONLY="unit asan mpi e2e e2e-san" (any of them) runs those parts (make test-unit, test-asan, test-mpi,
# test-e2e)
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
want unit && run_gtest unit 1 600 "$BUILD/tests/unit_tests" --gtest_color=no
if want asan && [ -x "$BUILD/asan/tests/unit_tests" ]; then
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
    run_gtest unit-asan 0 900 "$BUILD/asan/tests/unit_tests" --gtest_color=no
fi
for np in 1 2 3 4; do
  want mpi || break
  run_gtest "mpi-np$np" $([ "$np" -eq 1 ] && echo 1 || echo 0) 600 mpirun -np "$np" "$BUILD/tests/mpi_tests" --gtest_color=no
done
for t in tests/e2e/*.sh; do
  want e2e || break
  [ -e "$t" ] || continue
  name=$(basename "$t" .sh)
  distinct=$((distinct + 1))
  timeout -k 10 900 bash "$t" >"$LOGS/e2e-$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    pass=$((pass + 1)); echo "e2e $name: passed"
  elif [ $rc -eq 77 ] && [ "${CI:-}" != true ]; then
    skip=$((skip + 1)); echo "e2e $name: SKIPPED: $(tail -n 1 "$LOGS/e2e-$name.log")"
  else
    fail=$((fail + 1)); echo "e2e $name: FAILED (exit $rc; 77 = skipped, a failure with CI=true; log $LOGS/e2e-$name.log)"
    tail -n 30 "$LOGS/e2e-$name.log"
  fi
done
# The binary built with AddressSanitizer and UBSan on the end-to-end scripts that exercise the most
# input handling and recovery (leak checks off: Open MPI's own allocations would trip them).
SAN_E2E="cli_errors residual_policy merge_restart baselines features train_reference"
if want e2e-san && [ -x "$BUILD/asan/bin/iteris-mpi" ]; then
  for name in $SAN_E2E; do
    distinct=$((distinct + 1))
    ITERIS_BIN=$PWD/$BUILD/asan/bin/iteris-mpi ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
      UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 timeout -k 10 1200 bash "tests/e2e/$name.sh" \
      >"$LOGS/e2e-san-$name.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
      pass=$((pass + 1)); echo "e2e under ASan/UBSan $name: passed"
    else
      fail=$((fail + 1)); echo "e2e under ASan/UBSan $name: FAILED (exit $rc; log $LOGS/e2e-san-$name.log)"
      grep -a -E 'ERROR: AddressSanitizer|runtime error|SUMMARY' "$LOGS/e2e-san-$name.log" | head -n 10
      tail -n 20 "$LOGS/e2e-san-$name.log"
    fi
  done
fi
echo "$skip skipped (not counted as passed); $distinct distinct tests"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
