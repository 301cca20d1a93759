#!/usr/bin/env bash
# An allocation failure on one rank only, at many points of the pipeline (ITERIS_FAULT_ALLOC=RANK:K,
# the K-th checked allocation of that rank fails): every run must end, every rank must exit with the
# same code (0 when K is past the last allocation, else 4), the message must name the failing
# allocation, and -out must never hold a half-written adapter.
set -uo pipefail
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
"$BIN" -make_demo "$W/demo" >/dev/null 2>&1 || exit 1
D=$W/demo
args=(-base "$D/base" -adapters "$D/adapter_0,$D/adapter_1" -calib "$D/calib_0.jsonl,$D/calib_1.jsonl"
      -heldout "$D/heldout_0.jsonl,$D/heldout_1.jsonl" -max_iter 2 -out "$W/out")
bad=0; failed_runs=0; ok_runs=0
# rank 0 and rank 2 on one grid; then rank 2 alone in the second of two -solve_groups (its group solves while
# the other does: a failure there must still reach every rank)
for run in "0" "2" "2 -solve_groups 2"; do
  read -r rank extra <<<"$run"
  for k in 1 2 3 5 8 13 21 34 55 89 144 233 377 610 987 1597 2584 4181 6765 10946; do
    rm -rf "$W/out" "$W/out.partial"
    # shellcheck disable=SC2086
    out=$(ITERIS_FAULT_ALLOC="$rank:$k" timeout -k 5 120 mpirun -np 3 "$BIN" "${args[@]}" $extra 2>&1); rc=$?
    case $rc in
      0) ok_runs=$((ok_runs + 1))
         [ -f "$W/out/adapter_model.safetensors" ] || { echo "rank $rank$extra k $k: exit 0 without an adapter"; bad=$((bad + 1)); } ;;
      4) failed_runs=$((failed_runs + 1))
         grep -q "out of memory allocating" <<<"$out" || { echo "rank $rank$extra k $k: no allocation message:"; echo "$out" | head -5; bad=$((bad + 1)); }
         [ ! -e "$W/out/adapter_model.safetensors" ] || { echo "rank $rank$extra k $k: adapter written after a failure"; bad=$((bad + 1)); } ;;
      *) echo "rank $rank$extra k $k: exit code $rc (124 = hang)"; echo "$out" | tail -5; bad=$((bad + 1)) ;;
    esac
  done
done
echo "fault injection: $failed_runs runs stopped cleanly, $ok_runs completed, $bad problems"
[ "$bad" -eq 0 ] && [ "$failed_runs" -gt 15 ]
