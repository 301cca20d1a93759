#!/usr/bin/env bash
# IterIS on the generated demo case at -np 1, 2, 3, 4, and 5 (prime, more ranks than the demo's 4 layers), with
# -solve_groups, with other grid shapes (-grid_rows) and each Gram exchange (-gram_exchange): the
# merged updates (written in F64) must agree within 1e-10 relative (float64 statistics; only reassociation may differ).
set -euo pipefail
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
"$BIN" -make_demo "$W/demo" >/dev/null 2>&1
D=$W/demo
args=(-base "$D/base" -adapters "$D/adapter_0,$D/adapter_1,$D/adapter_2"
      -calib "$D/calib_0.jsonl,$D/calib_1.jsonl,$D/calib_2.jsonl" -max_iter 3 -out_dtype F64)
for np in 1 2 3 4 5; do
  mpirun -np $np "$BIN" "${args[@]}" -out "$W/np$np"
  test -f "$W/np$np/adapter_model.safetensors"
  test ! -e "$W/np$np.partial"
done
# process groups to which rank 0 assigns each layer's solves by cost (-solve_groups) give the same merge
mpirun -np 4 "$BIN" "${args[@]}" -solve_groups 3 -out "$W/np4g3"
mpirun -np 3 "$BIN" "${args[@]}" -solve_groups 2 -out "$W/np3g2"
# the grid's shape (-grid_rows): 4 x 1 and 1 x 4 against the default 2 x 2
mpirun -np 4 "$BIN" "${args[@]}" -grid_rows 4 -out "$W/np4r4"
mpirun -np 4 "$BIN" "${args[@]}" -grid_rows 1 -out "$W/np4r1"
# each way of forming the Grams, forced (-gram_exchange; auto takes columns or partial by their bytes)
mpirun -np 3 "$BIN" "${args[@]}" -gram_exchange partial -out "$W/np3p"
mpirun -np 2 "$BIN" "${args[@]}" -gram_exchange columns -out "$W/np2c"
# 5 tokens per sequence: 160 per task, fewer than down_proj's 172 inputs (both sides of the n < d_in branches of the norms)
mpirun -np 5 "$BIN" "${args[@]}" -solve_groups 2 -max_tokens 5 -out "$W/np5g2"
mpirun -np 1 "$BIN" "${args[@]}" -max_tokens 5 -out "$W/np1t5"
/usr/bin/python3 tests/ref/compare_adapters.py "$W/np1t5" "$W/np5g2" 1e-10
for run in np2 np3 np4 np5 np4g3 np3g2 np4r4 np4r1 np3p np2c; do
  /usr/bin/python3 tests/ref/compare_adapters.py "$W/np1" "$W/$run" 1e-10
done
