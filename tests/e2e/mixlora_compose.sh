#!/usr/bin/env bash
# -method mixlora: N task adapters composed into one MixLoRA adapter (issue 15, item 2), checked with float64
# NumPy (tests/ref/mixlora_ref.py, llama_ref.py):
#  1. the written adapter (the reference implementation's format) gives, through -logits, the logits of the
#     independent MixLoRA forward of the same files;
#  2. every router is the ridge least-squares map from the FFN inputs of the calibration tokens (under the
#     adapter's attention and the routed layers below) to the task labels, recomputed by NumPy;
#  3. expert i's updates s B A are task i's, and the attention's are those of an IterIS merge of the same
#     adapters (run separately);
#  4. np 1 and np 3 write the same adapter (within 1e-5);
#  5. bad options: exit 2, nothing written.
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
gen() { $PY $REF "$@" >/dev/null || { echo "generator failed: $*"; exit 1; }; }
gen synth "$W/m" --arch llama --layers 2 --hidden 24 --inter 40 --heads 4 --kv-heads 2 --vocab 30 --seed 1
gen adapter "$W/a0" --model "$W/m" --rank 2 --alpha 4 --seed 11
gen adapter "$W/a1" --model "$W/m" --rank 3 --alpha 3 --targets q_proj,v_proj,gate_proj,up_proj --seed 12
gen adapter "$W/a2" --model "$W/m" --rank 4 --alpha 16 --targets q_proj,k_proj,o_proj,up_proj,down_proj --seed 13
gen tokens "$W/c0.jsonl" --vocab 30 --lengths 9,7,12,5 --seed 21
gen tokens "$W/c1.jsonl" --vocab 30 --lengths 8,10,6 --seed 22
gen tokens "$W/c2.jsonl" --vocab 30 --lengths 11,4,9,7,6 --seed 23
gen tokens "$W/t.jsonl" --vocab 30 --lengths 9,1,13,6 --seed 24
A="$W/a0,$W/a1,$W/a2" C="$W/c0.jsonl,$W/c1.jsonl,$W/c2.jsonl"
run() { mpirun -np "$1" "$BIN" -base "$W/m" -adapters "$A" -calib "$C" -max_iter 2 -plots 0 "${@:2}"; }

run 2 -method mixlora -out "$W/mix" >"$W/mix.log" 2>&1 || { fail "-method mixlora"; tail -n 5 "$W/mix.log"; }
[ -f "$W/mix/compose_report.json" ] && [ ! -e "$W/mix.merge" ] && [ ! -e "$W/mix.partial" ] &&
  grep -q '"peft_type":[[:space:]]*"MIXLORA"' "$W/mix/adapter_config.json" &&
  pass "-method mixlora writes a MixLoRA adapter and compose_report.json; no OUT.merge/ or OUT.partial/ left" ||
  fail "-method mixlora: the output folder"

# 1. the format round trip through the forward
if "$BIN" -base "$W/m" -adapter "$W/mix" -logits "$W/t.jsonl" -logits_out "$W/l.safetensors" >/dev/null 2>&1 &&
   $PY $MREF compare "$W/m" "$W/t.jsonl" "$W/l.safetensors" --adapter "$W/mix" >"$W/c.log" 2>&1; then
  pass "the composed adapter's logits: $(tail -n 1 "$W/c.log")"
else fail "the composed adapter's logits"; tail -n 3 "$W/c.log"; fi

# 2. the routers
$PY $MREF routers "$W/m" "$C" "$W/mix" >"$W/r.log" 2>&1 && pass "routers against NumPy: $(tail -n 1 "$W/r.log")" ||
  { fail "routers"; cat "$W/r.log"; }

# 3. experts are the task adapters, attention is IterIS's
run 2 -method iteris -out "$W/iteris" >/dev/null 2>&1 || fail "the IterIS merge"
if $PY - "$W" <<'PY'
import json, sys
import numpy as np
sys.path.insert(0, "tests/ref")
import llama_ref as R
w = sys.argv[1]
mix = R.st_read(w + "/mix/adapter_model.safetensors")
cfg = json.load(open(w + "/mix/adapter_config.json"))
sa, se = cfg["lora_alpha"] / cfg["r"], cfg["expert_lora"]["lora_alpha"] / cfg["expert_lora"]["r"]
def peft(d):
    ac = json.load(open(d + "/adapter_config.json")); t = R.st_read(d + "/adapter_model.safetensors"); out = {}
    for k, A in t.items():
        if k.endswith("lora_A.weight"):
            path = k[len("base_model.model."):-len(".lora_A.weight")]
            r = int(R._pattern(ac.get("rank_pattern"), path, ac["r"])); al = float(R._pattern(ac.get("alpha_pattern"), path, ac["lora_alpha"]))
            out[path] = (al / r) * t[k.replace("lora_A", "lora_B")] @ A
    return out
worst = 0.0
it = peft(w + "/iteris")
for l in range(2):
    for m in ["q_proj", "k_proj", "v_proj", "o_proj"]:
        p = "model.layers.%d.self_attn.%s" % (l, m)
        ref = it.get(p)
        got = sa * mix["mixlora.layers.%d.self_attn.%s.lora_B.weight" % (l, m)] @ mix["mixlora.layers.%d.self_attn.%s.lora_A.weight" % (l, m)]
        worst = max(worst, np.abs(got - (ref if ref is not None else 0)).max() / max(np.abs(got).max(), 1e-30))
for e in range(3):
    task = peft(w + "/a%d" % e)
    for l in range(2):
        for m in ["gate_proj", "up_proj", "down_proj"]:
            got = se * mix["mixlora.layers.%d.experts.%d.%s.lora_B.weight" % (l, e, m)] @ mix["mixlora.layers.%d.experts.%d.%s.lora_A.weight" % (l, e, m)]
            ref = task.get("model.layers.%d.mlp.%s" % (l, m))
            d = np.abs(got - (ref if ref is not None else 0)).max()
            worst = max(worst, d / max(np.abs(ref).max(), 1e-30) if ref is not None else d)
print("  worst relative difference of s B A: %.2e" % worst)
sys.exit(0 if worst <= 1e-6 else 1)
PY
then pass "experts = the task adapters' FFN updates (zero where a task has none); attention = IterIS's"
else fail "experts or attention differ"; fi

# 4. rank-count independence
run 1 -method mixlora -out "$W/mix1" >/dev/null 2>&1 && run 3 -method mixlora -out "$W/mix3" >/dev/null 2>&1 || fail "np 1 / np 3 runs"
if $PY - "$W/mix1" "$W/mix3" <<'PY'
import sys
import numpy as np
sys.path.insert(0, "tests/ref")
import llama_ref as R
a, b = (R.st_read(p + "/adapter_model.safetensors") for p in sys.argv[1:3])
worst = max(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-30) for k in a)
print("  np 1 vs np 3: worst relative difference %.2e" % worst)
sys.exit(0 if a.keys() == b.keys() and worst <= 1e-5 else 1)
PY
then pass "np 1 and np 3 compose the same adapter"
else fail "-method mixlora depends on the rank count"; fi

# 5. bad options
for opt in "-mixlora_top_k 4" "-mixlora_ridge 0" "-refine_steps 5"; do
  # shellcheck disable=SC2086
  run 2 -method mixlora $opt -out "$W/bad" >"$W/bad.log" 2>&1; rc=$?
  [ $rc -eq 2 ] && [ ! -e "$W/bad" ] && [ ! -e "$W/bad.merge" ] && [ ! -e "$W/bad.partial" ] &&
    pass "-method mixlora $opt: exit 2, nothing written" || { fail "-method mixlora $opt: exit $rc"; tail -n 2 "$W/bad.log"; }
done

echo "mixlora_compose: $ok passed, $bad failed"
[ $bad -eq 0 ]
