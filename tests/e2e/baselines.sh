#!/usr/bin/env bash
# The data-free baselines through the binary: TIES against an independent NumPy implementation
# (written at full rank, so the SVD truncation is exact), DARE's determinism (same seed, same
# adapter; other seed, another one), KnOTS runs, and the dense methods refuse to run without -out_rank.
set -euo pipefail
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
"$BIN" -make_demo "$W/demo" >/dev/null 2>&1
D=$W/demo
A=(-base "$D/base" -adapters "$D/adapter_0,$D/adapter_1,$D/adapter_2" -out_dtype F64)
mpirun -np 2 "$BIN" "${A[@]}" -method ties -density 0.3 -ta_lambda 1.5 -out_rank 64 -out "$W/ties" >/dev/null 2>&1
/usr/bin/python3 tests/ref/ties_ref.py "$W/ties" 0.3 1.5 1e-10 "$D/adapter_0" "$D/adapter_1" "$D/adapter_2"
for s in 1 1 2; do
  mpirun -np 2 "$BIN" "${A[@]}" -method dare -dare_p 0.4 -seed $s -out_rank 64 -out "$W/dare_$s" >/dev/null 2>&1
  mv "$W/dare_$s" "$W/dare_${s}_$RANDOM"
done
d1=$(ls -d "$W"/dare_1_* | head -n 1); d1b=$(ls -d "$W"/dare_1_* | tail -n 1); d2=$(ls -d "$W"/dare_2_*)
cmp "$d1/adapter_model.safetensors" "$d1b/adapter_model.safetensors"
! cmp -s "$d1/adapter_model.safetensors" "$d2/adapter_model.safetensors"
mpirun -np 3 "$BIN" "${A[@]}" -method knots -density 0.5 -out "$W/knots" >/dev/null 2>&1
test -f "$W/knots/adapter_model.safetensors"
set +e
out=$(mpirun -np 2 "$BIN" "${A[@]}" -method ties -out "$W/x" 2>&1); rc=$?
set -e
[ "$rc" -eq 2 ] && grep -q "give -out_rank k" <<<"$out" && [ ! -e "$W/x" ]
echo "baselines: ok"
