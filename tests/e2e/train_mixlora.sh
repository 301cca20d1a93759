#!/usr/bin/env bash
# MixLoRA training against independent float64 NumPy (tests/ref/mixlora_ref.py grad, on llama_ref.py's model):
#  1. gradients: `-train 1 -init_adapter MIX -grad_out G` against central differences of
#     mean loss + aux_coef * load-balancing loss (the reference's 'mixtral' router loss over the whole data as
#     one batch) with the selection held fixed, for every attention factor, router and expert factor; the mean
#     loss printed by -grad_out against the reference's; 4 experts top-2 in every layer at np 1 and np 3 (and
#     the two gradient files against each other), a tie between two experts (the lower index wins) with one
#     routed layer at np 2, and without the load-balancing term;
#  2. training from scratch (-mixlora_experts 4 -mixlora_top_k 2): the same global batch at np 1 and np 2
#     (with micro-batches) gives the same adapter; the adapter loads (-logits against the NumPy forward);
#     trainable parameters counted as E (D + r (D + F) 3) + attention per layer;
#  3. stop and -restart 1: the uninterrupted run's adapter bit for bit;
#  4. bad option combinations: exit 2 with the option named, nothing written.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
PY=/usr/bin/python3
REF=tests/ref/llama_ref.py
MREF=tests/ref/mixlora_ref.py
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1
ok=0; bad=0
pass() { ok=$((ok + 1)); echo "ok: $*"; }
fail() { bad=$((bad + 1)); echo "FAILED: $*"; }
gen() { $PY "$@" >/dev/null || { echo "generator failed: $*"; exit 1; }; }

gen $REF synth "$W/llama" --arch llama --dtype F32 --layers 2 --hidden 32 --inter 48 --heads 4 --kv-heads 2 --vocab 40 --seed 1
gen $REF tokens "$W/tok30.jsonl" --vocab 30 --lengths 7,1,12,3,9 --seed 21
gen $MREF adapter "$W/mix" --model "$W/llama" --experts 4 --top-k 2 --rank 3 --alpha 6 --expert-rank 2 --expert-alpha 4 --seed 5
gen $MREF adapter "$W/mixtie" --model "$W/llama" --experts 3 --top-k 2 --rank 2 --alpha 4 --tie --router-layers 1 --seed 7

# 1. gradients
grad_check() { # LABEL ADAPTER NP COEF
  local label=$1 ad=$2 np=$3 coef=$4 g=$W/$1.np$3.safetensors
  if ! mpirun -np "$np" "$BIN" -train 1 -base "$W/llama" -data "$W/tok30.jsonl" -init_adapter "$ad" -grad_out "$g" \
      -mixlora_aux_coef "$coef" >"$W/$label.log" 2>&1; then
    fail "$label np $np: iteris-mpi -grad_out failed:"; head -n 20 "$W/$label.log"; return
  fi
  local loss; loss=$(sed -n 's/.*mean loss \([0-9.e+-]*\) over.*/\1/p' "$W/$label.log")
  if $PY $MREF grad "$W/llama" "$W/tok30.jsonl" "$g" --adapter "$ad" --aux-coef "$coef" --loss "$loss" --tol 1e-4 \
      >"$W/$label.cmp" 2>&1; then
    pass "$label np $np (aux coef $coef): loss and every factor's gradient within 1e-4 ($(grep 'worst' "$W/$label.cmp" | sort -k6 -g | tail -n 1 | awk '{print $2, $NF}'))"
  else
    fail "$label np $np:"; cat "$W/$label.cmp"
  fi
}
grad_check mix4_top2 "$W/mix" 1 0.5
grad_check mix4_top2 "$W/mix" 3 0.5
grad_check tie_one_layer "$W/mixtie" 2 0.5
grad_check no_aux "$W/mix" 2 0
if $PY - "$W/mix4_top2.np1.safetensors" "$W/mix4_top2.np3.safetensors" <<'PY'
import os, sys
sys.path.insert(0, "tests/ref")
import numpy as np, llama_ref as R
a, b = R.st_read(sys.argv[1]), R.st_read(sys.argv[2])
e = max(float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-30)) for k in a) if set(a) == set(b) else 1.0
print("worst relative difference %.2e" % e)
sys.exit(0 if e <= 1e-4 else 1)
PY
then pass "the gradient at np 1 and np 3 agree within 1e-4 (float32 reassociation)"
else fail "np 1 and np 3 gradients differ"; fi

# 2. training from scratch, np 1 vs np 2 (micro-batches); the adapter loads
tr=(-train 1 -base "$W/llama" -data "$W/tok30.jsonl" -targets q_proj,v_proj,gate_proj,up_proj,down_proj -r 2 -lora_alpha 4
    -mixlora_experts 4 -mixlora_top_k 2 -mixlora_aux_coef 0.01 -steps 6 -batch 4 -lr 0.01 -warmup 1 -seed 3 -log_every 0)
mpirun -np 1 "$BIN" "${tr[@]}" -out "$W/np1" >"$W/np1.log" 2>&1 || { fail "train np 1:"; tail -n 5 "$W/np1.log"; }
mpirun -np 2 "$BIN" "${tr[@]}" -grad_accum 2 -out "$W/np2" >"$W/np2.log" 2>&1 || { fail "train np 2:"; tail -n 5 "$W/np2.log"; }
if $PY - "$W/np1" "$W/np2" <<'PY'
import json, os, sys
sys.path.insert(0, "tests/ref")
import numpy as np, llama_ref as R
a = R.st_read(os.path.join(sys.argv[1], "adapter_model.safetensors"))
b = R.st_read(os.path.join(sys.argv[2], "adapter_model.safetensors"))
e = max(float(np.abs(a[k] - b[k]).max()) for k in a) if set(a) == set(b) else 1.0
moved = max(float(np.abs(a[k]).max()) for k in a if "lora_B" in k)
ac = json.load(open(os.path.join(sys.argv[1], "adapter_config.json")))
rep = json.load(open(os.path.join(sys.argv[1], "train_report.json")))
L, D, F, V, E, r = 2, 32, 48, 40, 4, 2
want = L * (E * D + E * 3 * r * (D + F) + r * (D + 32) + r * (D + 16))  # router, experts, q (32), v (2 kv heads x 8)
print("largest difference %.2e, largest |B| %.3f, %d parameters (want %d), %s experts top %s" %
      (e, moved, rep["trainable_parameters"], want, ac["num_experts"], ac["top_k"]))
sys.exit(0 if e <= 1e-5 and moved > 0 and rep["trainable_parameters"] == want and ac["num_experts"] == 4
         and ac["top_k"] == 2 and len([k for k in a if ".gate.weight" in k]) == L else 1)
PY
then pass "-mixlora_experts 4 -mixlora_top_k 2: the same adapter at np 1 and np 2 x 2 micro-batches, parameters counted"
else fail "MixLoRA training np 1 vs np 2"; fi
if "$BIN" -base "$W/llama" -adapter "$W/np1" -logits "$W/tok30.jsonl" -logits_out "$W/l.safetensors" >/dev/null 2>&1 &&
   $PY $MREF compare "$W/llama" "$W/tok30.jsonl" "$W/l.safetensors" --adapter "$W/np1" >"$W/l.cmp" 2>&1; then
  pass "the trained MixLoRA adapter loads (-logits agrees with the NumPy MixLoRA forward: $(tail -n 1 "$W/l.cmp"))"
else fail "trained adapter -logits:"; cat "$W/l.cmp" 2>/dev/null | tail -n 3; fi

# 3. stop before step 4, restart: bit for bit
ITERIS_FAULT_TRAIN_STOP_AT=3 mpirun -np 2 "$BIN" "${tr[@]}" -out "$W/stop" >"$W/stop.log" 2>&1; rc=$?
mpirun -np 2 "$BIN" "${tr[@]}" -restart 1 -out "$W/stop" >"$W/restart.log" 2>&1 || { fail "restart:"; tail -n 5 "$W/restart.log"; }
mpirun -np 2 "$BIN" "${tr[@]}" -out "$W/straight" >/dev/null 2>&1
if [ $rc -eq 5 ] && cmp -s "$W/stop/adapter_model.safetensors" "$W/straight/adapter_model.safetensors"; then
  pass "stop before step 4 (exit 5) and -restart 1: the uninterrupted run's MixLoRA adapter bit for bit"
else fail "MixLoRA stop/restart (stop exit $rc)"; tail -n 3 "$W/restart.log"; fi

# 4. bad combinations
expect2() { # SUBSTRING ARGS...
  local want=$1; shift
  local out rc
  out=$(timeout -k 5 120 mpirun -np 2 "$BIN" "$@" 2>&1); rc=$?
  if [ $rc -eq 2 ] && grep -qF -- "$want" <<<"$out" && [ ! -e "$W/bad_out" ] && [ ! -e "$W/bad_out.partial" ]; then
    pass "exit 2: $want"
  else fail "want exit 2 with '$want', got $rc:"; echo "$out" | head -n 5; fi
}
base=(-train 1 -base "$W/llama" -data "$W/tok30.jsonl" -out "$W/bad_out" -steps 1)
expect2 "-mixlora_top_k 5 must be in 1..4" "${base[@]}" -targets gate_proj -mixlora_experts 4 -mixlora_top_k 5
expect2 "-targets names no feed-forward module" "${base[@]}" -targets q_proj -mixlora_experts 4
expect2 "it does not combine with -init_adapter" "${base[@]}" -targets up_proj -mixlora_experts 2 -init_adapter "$W/mix"
expect2 "MixLoRA training has no dropout" "${base[@]}" -init_adapter "$W/mix" -lora_dropout 0.1
expect2 "-mixlora_aux_coef -1" "${base[@]}" -targets up_proj -mixlora_experts 2 -mixlora_aux_coef -1

echo "train_mixlora: $ok passed, $bad failed"
[ "$bad" -eq 0 ]
