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
#  5. bad options: exit 2, nothing written;
#  6. -refine_steps (compose, then distil; src/cli/refine.c): np 1 and np 2 give the same adapter, a MixLoRA
#     adapter whose -logits NumPy reproduces; its distillation KL(base + A_i || student) on -calib i, computed by
#     NumPy, is below the plain composition's; -refine_train_only routers moves the routers only; a stop and
#     -restart 1 give the uninterrupted run's bytes; bad combinations exit 2.
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
for opt in "-mixlora_top_k 4" "-mixlora_ridge 0" "-refine_steps 5 -refine_lr -1" "-refine_train_only routers" \
           "-refine_steps 5 -refine_train_only bogus" "-refine_steps 5 -refine_train_only ,"; do
  # shellcheck disable=SC2086
  run 2 -method mixlora $opt -out "$W/bad" >"$W/bad.log" 2>&1; rc=$?
  [ $rc -eq 2 ] && [ ! -e "$W/bad" ] && [ ! -e "$W/bad.merge" ] && [ ! -e "$W/bad.partial" ] &&
    pass "-method mixlora $opt: exit 2, nothing written" || { fail "-method mixlora $opt: exit $rc"; tail -n 2 "$W/bad.log"; }
done

# 6. compose, then distil
rf=(-method mixlora -refine_steps 6 -refine_lr 0.02 -refine_batch 4 -refine_val 0)
run 2 "${rf[@]}" -out "$W/ref2" >"$W/ref2.log" 2>&1 && run 1 "${rf[@]}" -out "$W/ref1" >/dev/null 2>&1 ||
  { fail "-method mixlora -refine_steps"; tail -n 5 "$W/ref2.log"; }
[ -f "$W/ref2/compose_report.json" ] && [ -f "$W/ref2/train_report.json" ] && [ ! -e "$W/ref2.merge" ] &&
  [ ! -e "$W/ref2.compose" ] && [ ! -e "$W/ref2.partial" ] && grep -q '"peft_type":[[:space:]]*"MIXLORA"' "$W/ref2/adapter_config.json" &&
  pass "-refine_steps: OUT holds a MixLoRA adapter, compose_report.json and train_report.json; no stage folder left" ||
  fail "-method mixlora -refine_steps: the output folder"
if "$BIN" -base "$W/m" -adapter "$W/ref2" -logits "$W/t.jsonl" -logits_out "$W/lr.safetensors" >/dev/null 2>&1 &&
   $PY $MREF compare "$W/m" "$W/t.jsonl" "$W/lr.safetensors" --adapter "$W/ref2" >"$W/c.log" 2>&1; then
  pass "the refined adapter loads (-logits): $(tail -n 1 "$W/c.log")"
else fail "the refined adapter's logits"; tail -n 3 "$W/c.log"; fi
# the distillation objective, recomputed: mean over -calib i's targets of KL(base + A_i || student), float64
kl() {
  $PY - "$W" "$@" <<'PY'
import sys
import numpy as np
sys.path.insert(0, "tests/ref")
import llama_ref as R
import mixlora_ref as M
w, names = sys.argv[1], sys.argv[2:]
cfg, W = R.Cfg(w + "/m"), R.load_model_tensors(w + "/m")
def logp(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
students = [M.load_mixlora(cfg, w + "/" + n) for n in names]
tot, cnt = np.zeros(len(names)), 0
for i in range(3):
    Wt = dict(W)
    R.fold_adapter(Wt, cfg, w + "/a%d" % i)
    for ids in R.read_tokens(w + "/c%d.jsonl" % i):
        pt = logp(R.forward(cfg, Wt, ids))[:-1]  # targets: every position but the last
        for j, s in enumerate(students):
            tot[j] += (np.exp(pt) * (pt - logp(M.forward(cfg, W, ids, s))[:-1])).sum()
        cnt += len(ids) - 1
print(" ".join("%.6f" % (x / cnt) for x in tot))
PY
}
read -r k_mix k_ref < <(kl mix ref2)
if $PY -c "import sys; sys.exit(0 if $k_ref < 0.9 * $k_mix else 1)" 2>/dev/null; then
  pass "distillation KL on the calibration rows (NumPy): composition $k_mix, refined $k_ref"
else fail "the refinement did not lower the distillation KL: composition $k_mix, refined ${k_ref:-?}"; fi
if $PY - "$W/ref1" "$W/ref2" <<'PY'
import sys
import numpy as np
sys.path.insert(0, "tests/ref")
import llama_ref as R
a, b = (R.st_read(p + "/adapter_model.safetensors") for p in sys.argv[1:3])
worst = max(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-30) for k in a)
print("  np 1 vs np 2: worst relative difference %.2e" % worst)
sys.exit(0 if a.keys() == b.keys() and worst <= 1e-5 else 1)
PY
then pass "np 1 and np 2 refine to the same adapter"
else fail "-method mixlora -refine_steps depends on the rank count"; fi
# -refine_train_only routers: the routers move, attention and experts keep the composition's values
run 2 "${rf[@]}" -refine_train_only routers -out "$W/rto" >"$W/rto.log" 2>&1 || { fail "-refine_train_only routers"; tail -n 3 "$W/rto.log"; }
if $PY - "$W/mix" "$W/rto" <<'PY'
import sys
import numpy as np
sys.path.insert(0, "tests/ref")
import llama_ref as R
a, b = (R.st_read(p + "/adapter_model.safetensors") for p in sys.argv[1:3])
rt = [k for k in a if k.endswith("gate.weight")]
moved = max(float(np.abs(a[k] - b[k]).max()) for k in rt)
kept = max(float(np.abs(a[k] - b[k]).max()) for k in a if k not in rt)
print("  routers moved up to %.3g; every other tensor up to %.3g" % (moved, kept))
sys.exit(0 if a.keys() == b.keys() and moved > 1e-4 and kept == 0 else 1)
PY
then pass "-refine_train_only routers: only the routers change"
else fail "-refine_train_only routers changed other tensors or none"; fi
# a stop during the refinement keeps OUT.compose/; -restart 1 skips the merge and composition
ITERIS_FAULT_TRAIN_STOP_AT=3 run 2 "${rf[@]}" -out "$W/stop" >"$W/stop.log" 2>&1; rc=$?
[ $rc -eq 5 ] && [ -d "$W/stop.compose" ] && [ ! -e "$W/stop" ] && [ ! -e "$W/stop.merge" ] &&
  run 2 "${rf[@]}" -restart 1 -out "$W/stop" >"$W/restart.log" 2>&1 && grep -q "is complete; continuing" "$W/restart.log" &&
  cmp -s "$W/stop/adapter_model.safetensors" "$W/ref2/adapter_model.safetensors" && [ ! -e "$W/stop.compose" ] &&
  pass "stop (exit 5) keeps OUT.compose/; -restart 1 continues to the uninterrupted run's bytes" ||
  { fail "compose + refine stop/restart (stop exit $rc)"; tail -n 3 "$W/restart.log"; }
# bad combinations
for opt in "-method iteris -refine_steps 5 -refine_train_only routers" "-method mixlora -refine_steps 5 -refine_batch 0"; do
  # shellcheck disable=SC2086
  mpirun -np 2 "$BIN" -base "$W/m" -adapters "$A" -calib "$C" -max_iter 2 -plots 0 $opt -out "$W/bad" >"$W/bad.log" 2>&1; rc=$?
  [ $rc -eq 2 ] && [ ! -e "$W/bad" ] && [ ! -e "$W/bad.merge" ] && [ ! -e "$W/bad.compose" ] &&
    pass "$opt: exit 2, nothing written ($(grep -m1 '^error:' "$W/bad.log" | cut -c8-90)...)" ||
    { fail "$opt: exit $rc"; tail -n 2 "$W/bad.log"; }
done
mpirun -np 2 "$BIN" -train -base "$W/m" -init_adapter "$W/a0" -distil "$W/a0" -distil_data "$W/c0.jsonl" -steps 2 \
  -train_only routers -out "$W/bad" >"$W/bad.log" 2>&1; rc=$?
[ $rc -eq 2 ] && [ ! -e "$W/bad" ] && grep -q "train_only.*not a MixLoRA adapter" "$W/bad.log" &&
  pass "-train -train_only on a plain LoRA adapter: exit 2" || { fail "-train_only on plain LoRA: exit $rc"; tail -n 2 "$W/bad.log"; }

echo "mixlora_compose: $ok passed, $bad failed"
[ $bad -eq 0 ]
