#!/usr/bin/env bash
# The MixLoRA forward (issue 15, items 1 and 4) against an independent float64 NumPy reference
# (tests/ref/mixlora_ref.py, the routing of github.com/TUDB-Labs/MixLoRA): adapters in the reference's format
# (adapter_config.json fields, tensor names) applied with `-adapter DIR -logits`:
#  1. Qwen2 (biases), 4 experts, top-2; Llama, 3 experts, top-1, the experts' own rank and alpha (expert_lora);
#     top-3 of 5 with only layer 1 routed (layer 0 keeps its plain feed-forward);
#  2. ties: two experts with the same router row, at top-1 (the lower index wins) and top-2;
#  3. -ensemble scores a MixLoRA adapter beside a PEFT one;
#  4. bad input: another routing strategy, a router of the wrong shape, NaN, adapter_model.bin only: exit 2,
#     the file and field named.
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
$PY $REF synth "$W/qwen" --arch qwen2 --layers 2 --hidden 32 --inter 48 --heads 4 --kv-heads 2 --vocab 40 --seed 3 >/dev/null &&
  $PY $REF synth "$W/llama" --arch llama --layers 2 --hidden 24 --inter 40 --heads 4 --kv-heads 1 --vocab 30 --seed 4 >/dev/null &&
  $PY $REF tokens "$W/t40.jsonl" --vocab 30 --lengths 9,1,14,6,11 --seed 5 >/dev/null || { echo "generator failed"; exit 1; }

check() { # LABEL MODEL ADAPTER-ARGS...
  local label=$1 model=$2; shift 2
  rm -rf "$W/mix"
  $PY $MREF adapter "$W/mix" --model "$model" "$@" || { fail "$label: generator"; return; }
  if "$BIN" -base "$model" -adapter "$W/mix" -logits "$W/t40.jsonl" -logits_out "$W/l.safetensors" >"$W/l.log" 2>&1 &&
     $PY $MREF compare "$model" "$W/t40.jsonl" "$W/l.safetensors" --adapter "$W/mix" >"$W/c.log" 2>&1; then
    pass "$label: $(tail -n 1 "$W/c.log")"
  else fail "$label"; tail -n 3 "$W/l.log" "$W/c.log"; fi
}
check "Qwen2, 4 experts, top-2" "$W/qwen" --experts 4 --top-k 2 --seed 6
check "Llama, 3 experts, top-1, expert rank 6 alpha 3" "$W/llama" --experts 3 --top-k 1 --expert-rank 6 --expert-alpha 3 --seed 7
check "5 experts, top-3, only layer 1 routed" "$W/llama" --experts 5 --top-k 3 --router-layers 1 --seed 8
check "a tie at top-1 (the lower index)" "$W/llama" --experts 3 --top-k 1 --tie --seed 9
check "a tie at top-2" "$W/qwen" --experts 4 --top-k 2 --tie --seed 10

# -ensemble with a MixLoRA adapter beside a PEFT one
$PY $REF adapter "$W/peft" --model "$W/llama" --rank 2 --alpha 4 --seed 11 >/dev/null
$PY $MREF adapter "$W/mixe" --model "$W/llama" --experts 3 --top-k 2 --seed 12
mpirun -np 2 "$BIN" -base "$W/llama" -ensemble "$W/peft,$W/mixe" -heldout "$W/t40.jsonl" >"$W/e.log" 2>&1 &&
  grep -q "mixe" "$W/e.log" && pass "-ensemble scores a MixLoRA adapter beside a PEFT one" || { fail "-ensemble with MixLoRA"; tail -n 3 "$W/e.log"; }

# bad input
expect2() { # LABEL SUBSTRING
  "$BIN" -base "$W/llama" -adapter "$W/bad" -logits "$W/t40.jsonl" -logits_out "$W/bad.safetensors" >"$W/b.log" 2>&1; local rc=$?
  if [ $rc -eq 2 ] && grep -qF -- "$2" "$W/b.log" && [ ! -e "$W/bad.safetensors" ]; then pass "$1: exit 2 ($2)"
  else fail "$1: exit $rc"; tail -n 2 "$W/b.log"; fi
}
rm -rf "$W/bad"; cp -r "$W/mixe" "$W/bad"
sed -i 's/"mixtral"/"switch"/' "$W/bad/adapter_config.json"
expect2 "routing_strategy switch" "routing_strategy 'switch' is not supported"
rm -rf "$W/bad"; cp -r "$W/mixe" "$W/bad"
$PY - "$W/bad/adapter_model.safetensors" <<'PY'
import sys
sys.path.insert(0, "tests/ref")
import llama_ref as R
import numpy as np
t = R.st_read(sys.argv[1]); t["mixlora.layers.0.gate.weight"] = np.zeros((3, 7)); R.st_write(sys.argv[1], t)
PY
expect2 "a router of the wrong shape" "mixlora.layers.0.gate.weight' has shape (3, 7), expected (3, 24)"
rm -rf "$W/bad"; cp -r "$W/mixe" "$W/bad"
$PY - "$W/bad/adapter_model.safetensors" <<'PY'
import sys
sys.path.insert(0, "tests/ref")
import llama_ref as R
t = R.st_read(sys.argv[1]); t["mixlora.layers.1.experts.2.up_proj.lora_B.weight"][0, 0] = float("nan"); R.st_write(sys.argv[1], t)
PY
expect2 "NaN in an expert" "experts.2.up_proj.lora_B.weight': element 0 at index (0, 0) is NaN"
rm -rf "$W/bad"; cp -r "$W/mixe" "$W/bad"; mv "$W/bad/adapter_model.safetensors" "$W/bad/adapter_model.bin"
expect2 "adapter_model.bin only" "there is an adapter_model.bin"

echo "mixlora_forward: $ok passed, $bad failed"
[ $bad -eq 0 ]
