#!/usr/bin/env bash
# LoRA training against independent float64 NumPy (tests/ref/train_ref.py on llama_ref.py's forward):
#  1. gradients: `iteris-mpi -train 1 -init_adapter AD -grad_out G` (the gradient of the mean
#     next-token loss over the data) against central differences, for every module and factor,
#     on Llama (untied, GQA), Llama bf16 tied and sharded, Qwen2 (q/k/v biases), Mistral
#     (head_dim != D/H, one kv head), with rsLoRA, rank_pattern and alpha_pattern, with LoRA dropout
#     (masks rebuilt by the reference); at np 1, 2 and 3;
#  2. AdamW: three full-batch steps (warmup, cosine, clipping, weight decay) against NumPy AdamW
#     on central-difference gradients;
#  3. rank-count independence: the same global batch at np 1, 2 and 4 (with micro-batches and LoRA
#     dropout) gives the same adapter within 1e-5;
#  4. stop (as by SIGTERM) and -restart 1: the uninterrupted run's adapter bit for bit; early stopping
#     (-val_fraction) against NumPy losses of the held-out sequences;
#  5. bad input: exit 2 with the file named, nothing written.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
PY=/usr/bin/python3
REF=tests/ref/llama_ref.py
TREF=tests/ref/train_ref.py
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1
ok=0; bad=0
pass() { ok=$((ok + 1)); echo "ok: $*"; }
fail() { bad=$((bad + 1)); echo "FAILED: $*"; }
gen() { $PY $REF "$@" >/dev/null || { echo "generator failed: $*"; exit 1; }; }

gen synth "$W/llama" --arch llama --dtype F32 --layers 2 --hidden 32 --inter 48 --heads 4 --kv-heads 2 --vocab 40 --seed 1
gen synth "$W/llama_tied" --arch llama --dtype BF16 --layers 3 --hidden 32 --inter 40 --heads 4 --kv-heads 2 --vocab 50 --tied --shards 3 --seed 2 --theta 500000
gen synth "$W/qwen2" --arch qwen2 --dtype F16 --layers 2 --hidden 24 --inter 40 --heads 6 --kv-heads 2 --vocab 30 --seed 3 --theta 1000000
gen synth "$W/mistral" --arch mistral --dtype BF16 --layers 2 --hidden 32 --inter 48 --heads 4 --kv-heads 1 --head-dim 16 --vocab 36 --seed 4
gen adapter "$W/ad_llama" --model "$W/llama" --rank 3 --alpha 6 --seed 11
gen adapter "$W/ad_tied" --model "$W/llama_tied" --rank 2 --alpha 16 --targets q_proj,v_proj,down_proj --rslora \
  --rank-pattern model.layers.1.self_attn.v_proj=5 --alpha-pattern down_proj=3 --seed 12
gen adapter "$W/ad_qwen2" --model "$W/qwen2" --rank 3 --alpha 6 --targets q_proj,k_proj,o_proj,gate_proj,up_proj --seed 13
gen adapter "$W/ad_mistral" --model "$W/mistral" --rank 4 --alpha 4 --seed 14
gen tokens "$W/tok30.jsonl" --vocab 30 --lengths 7,1,12,3,9 --seed 21

# 1. gradients
grad_check() { # LABEL MODEL ADAPTER NP [DROPOUT SEED]   (DATA: the token file, default tok30.jsonl)
  local label=$1 model=$2 ad=$3 np=$4 g=$W/$1.np$4.safetensors c=() r=() data=${DATA:-$W/tok30.jsonl}
  [ $# -ge 6 ] && c=(-lora_dropout "$5" -seed "$6") && r=(--dropout "$5" --seed "$6")
  if ! mpirun -np "$np" "$BIN" -train 1 -base "$model" -data "$data" -init_adapter "$ad" -grad_out "$g" \
      "${c[@]}" >"$W/$label.log" 2>&1; then
    fail "$label np $np: iteris-mpi -grad_out failed:"; head -n 20 "$W/$label.log"; return
  fi
  if $PY $TREF grad "$model" "$data" "$g" --adapter "$ad" --samples 3 --tol 1e-4 "${r[@]}" >"$W/$label.cmp" 2>&1; then
    pass "$label np $np: gradient of every factor within 1e-4 of central differences ($(sort -k6 -g "$W/$label.cmp" | tail -n 1 | awk '{print $2, $NF}'))"
  else
    fail "$label np $np:"; cat "$W/$label.cmp"
  fi
}
grad_check llama "$W/llama" "$W/ad_llama" 1
grad_check llama "$W/llama" "$W/ad_llama" 3
grad_check llama_tied_bf16_rslora "$W/llama_tied" "$W/ad_tied" 1
grad_check qwen2_bias "$W/qwen2" "$W/ad_qwen2" 2
grad_check mistral_headdim "$W/mistral" "$W/ad_mistral" 1
# LoRA dropout: the reference rebuilds the masks from their definition (train.h) and differentiates
# the dropped-out forward; at np 2 the masks must follow the sequences, not the ranks
grad_check llama_dropout "$W/llama" "$W/ad_llama" 2 0.3 5
grad_check qwen2_dropout "$W/qwen2" "$W/ad_qwen2" 1 0.5 9
# prompts: "prompt_len", "completion_ids", and a question's labelled choice (no loss on the prompt; the
# other choices are not trained on)
cat >"$W/sup.jsonl" <<'JSONL'
{"input_ids": [1, 5, 9, 3, 7, 2, 8], "prompt_len": 4}
{"input_ids": [1, 4, 4, 6], "completion_ids": [11, 12, 2]}
{"input_ids": [1, 20, 21, 22, 23], "choices": [[3, 2], [17, 18, 19], [5]], "label": 1}
{"input_ids": [1, 8, 8, 8, 9, 10, 11, 12]}
{"input_ids": [1, 6, 29], "choices": [[4], [14]], "label": 0}
JSONL
DATA=$W/sup.jsonl grad_check llama_prompts "$W/llama" "$W/ad_llama" 2

# full-rank: the gradient of every weight (embedding, norms, projections, Qwen2 biases, a tied or separate head)
gen synth "$W/qwen2_tied" --arch qwen2 --dtype F32 --layers 2 --hidden 24 --inter 40 --heads 6 --kv-heads 2 --vocab 30 --tied --seed 6
full_check() { # LABEL MODEL NP
  local g=$W/full_$1.safetensors
  if mpirun -np "$3" "$BIN" -train -full_rank 1 -base "$2" -data "$W/tok30.jsonl" -grad_out "$g" >"$W/full_$1.log" 2>&1 &&
     $PY $TREF grad "$2" "$W/tok30.jsonl" "$g" --full --samples 3 --tol 1e-4 >"$W/full_$1.cmp" 2>&1; then
    pass "full-rank $1 np $3: the gradient of every weight within 1e-4 of central differences ($(sort -k6 -g "$W/full_$1.cmp" | tail -n 1 | awk '{print $2, $NF}'))"
  else fail "full-rank $1 np $3:"; cat "$W/full_$1.log" "$W/full_$1.cmp" 2>/dev/null | tail -n 15; fi
}
full_check llama_untied "$W/llama" 2
full_check qwen2_tied_bias "$W/qwen2_tied" 1

# distillation (-distil): KL(teacher i || student) on teacher i's sequences, from a starting adapter
gen adapter "$W/ad_teacher2" --model "$W/llama" --rank 2 --alpha 4 --targets q_proj,v_proj,up_proj --seed 18
gen tokens "$W/tokd.jsonl" --vocab 40 --lengths 5,8,3 --seed 24
if mpirun -np 2 "$BIN" -train -base "$W/llama" -init_adapter "$W/ad_llama" -distil "$W/ad_llama,$W/ad_teacher2" \
     -distil_data "$W/tok30.jsonl,$W/tokd.jsonl" -grad_out "$W/gd.safetensors" >"$W/distil.log" 2>&1 &&
   $PY $TREF grad "$W/llama" - "$W/gd.safetensors" --adapter "$W/ad_llama" --distil "$W/ad_llama" "$W/ad_teacher2" \
     --distil-data "$W/tok30.jsonl" "$W/tokd.jsonl" --tol 1e-4 >"$W/distil.cmp" 2>&1; then
  pass "-distil np 2: the KL gradient of every factor within 1e-4 of central differences ($(sort -k6 -g "$W/distil.cmp" | tail -n 1 | awk '{print $2, $NF}'))"
else fail "-distil gradient:"; cat "$W/distil.log" "$W/distil.cmp" 2>/dev/null | tail -n 12; fi

# 2. AdamW, three full-batch steps (batch = the 5 sequences), from an adapter with B != 0
gen synth "$W/tiny" --arch llama --dtype F32 --layers 1 --hidden 16 --inter 24 --heads 2 --kv-heads 1 --vocab 20 --seed 5
gen adapter "$W/ad_tiny" --model "$W/tiny" --rank 2 --alpha 4 --targets q_proj,v_proj,down_proj --seed 15
gen tokens "$W/tok20.jsonl" --vocab 20 --lengths 6,4,9,3,5 --seed 22
hp=(-steps 3 -lr 0.02 -warmup 1 -min_lr_ratio 0.1 -weight_decay 0.1 -max_grad_norm 0.05 -adam_eps 1e-3)
if mpirun -np 2 "$BIN" -train 1 -base "$W/tiny" -data "$W/tok20.jsonl" -init_adapter "$W/ad_tiny" -batch 5 "${hp[@]}" \
    -log_every 1 -out "$W/adamw" >"$W/adamw.log" 2>&1; then
  if $PY $TREF adamw "$W/tiny" "$W/tok20.jsonl" "$W/adamw" --adapter "$W/ad_tiny" --steps 3 --lr 0.02 --warmup 1 \
      --min-lr-ratio 0.1 --weight-decay 0.1 --max-grad-norm 0.05 --eps 1e-3 --tol 1e-4 >"$W/adamw.cmp" 2>&1; then
    pass "AdamW: $(tail -n 1 "$W/adamw.cmp")"
  else
    fail "AdamW:"; cat "$W/adamw.cmp"
  fi
else
  fail "AdamW run:"; head -n 20 "$W/adamw.log"
fi

# 3. the same global batch on 1, 2 and 4 ranks, micro-batches, dropout, fresh PEFT initialisation
gen tokens "$W/tok40.jsonl" --vocab 40 --lengths 9,4,12,7,3,10,8,5,6,11,2,9 --seed 23
tr=(-train 1 -base "$W/llama" -data "$W/tok40.jsonl" -targets all -r 4 -lora_alpha 8 -steps 6 -batch 8 -lr 0.01
    -warmup 2 -lora_dropout 0.1 -seed 7 -log_every 0)
for np in 1 2 4; do
  extra=(); [ "$np" -eq 2 ] && extra=(-grad_accum 3)
  mpirun -np "$np" "$BIN" "${tr[@]}" "${extra[@]}" -out "$W/np$np" >"$W/np$np.log" 2>&1 || { fail "train np $np:"; head -n 20 "$W/np$np.log"; }
done
for np in 2 4; do
  if $PY - "$W/np1" "$W/np$np" <<'PY'
import sys, numpy as np
sys.path.insert(0, "tests/ref")
import train_ref as T
a, b = T.read_adapter(sys.argv[1]), T.read_adapter(sys.argv[2])
assert a.keys() == b.keys() and len(a) == 14, (len(a), len(b))
worst = 0.0
for k in a:
    for i in (0, 1):
        d = np.max(np.abs(a[k][i] - b[k][i])) / max(np.max(np.abs(a[k][i])), 1e-30)
        worst = max(worst, d)
print("worst relative difference %.2e" % worst)
sys.exit(0 if worst <= 1e-5 else 1)
PY
  then pass "np 1 vs np $np: same adapter within 1e-5"; else fail "np 1 vs np $np differ"; fi
done
# the loss went down, and the report is there
if $PY - "$W/np1/train_report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
l = r["loss"]
assert len(l) == 6 and l[-1] < l[0], l
PY
then pass "train_report.json: loss per step, decreasing ($(tr -d '\n\t' < "$W/np1/train_report.json" | sed 's/.*"loss":\[\(.*\)\].*/\1/'))"
else fail "train_report.json"; fi
# full-rank training from scratch: the same model at np 1 and 2, a model folder that the forward loads
fr=(-train -full_rank 1 -from_scratch 1 -base "$W/llama" -data "$W/tok40.jsonl" -steps 5 -batch 8 -lr 0.01 -seed 4 -log_every 0)
mpirun -np 1 "$BIN" "${fr[@]}" -out "$W/full1" >"$W/full1.log" 2>&1 || { fail "full-rank np 1:"; tail -n 5 "$W/full1.log"; }
mpirun -np 2 "$BIN" "${fr[@]}" -grad_accum 2 -out "$W/full2" >"$W/full2.log" 2>&1 || { fail "full-rank np 2:"; tail -n 5 "$W/full2.log"; }
if $PY - "$W/full1" "$W/full2" <<'PY'
import sys, json, numpy as np
sys.path.insert(0, "tests/ref")
import llama_ref as R
a, b = R.st_read(sys.argv[1] + "/model.safetensors"), R.st_read(sys.argv[2] + "/model.safetensors")
assert a.keys() == b.keys()
# Frobenius: AdamW's first steps move entries with gradients near adam_eps by amounts that float
# reassociation can change in the 5th digit; the tensors as a whole agree much closer
worst = max(float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(a[k]), 1e-30)) for k in a)
loss = json.load(open(sys.argv[1] + "/train_report.json"))["loss"]
print("worst relative difference %.2e; loss %s" % (worst, loss))
sys.exit(0 if worst <= 1e-5 and loss[-1] < loss[0] else 1)
PY
then pass "full-rank from scratch: np 1 and np 2 (2 micro-batches) give the same weights within 1e-5 (Frobenius, per tensor); the loss falls"
else fail "full-rank from scratch: np 1 vs np 2"; fi
if "$BIN" -base "$W/full1" -logits "$W/tok40.jsonl" -logits_out "$W/lf.safetensors" >/dev/null 2>&1 &&
   $PY $REF compare "$W/full1" "$W/tok40.jsonl" "$W/lf.safetensors" --tol 1e-4 >/dev/null; then
  pass "the trained model folder loads (-logits agrees with the NumPy forward)"
else fail "the full-rank output does not load or gives other logits"; fi

# the written config carries r, alpha and dropout
grep -Eq '"lora_dropout":[[:space:]]*0.1,' "$W/np1/adapter_config.json" && grep -Eq '"lora_alpha":[[:space:]]*8,' "$W/np1/adapter_config.json" \
  && pass "adapter_config.json: r 4, lora_alpha 8, lora_dropout 0.1" || { fail "adapter_config.json"; cat "$W/np1/adapter_config.json"; }
# the trained adapter is one the merge reads
if "$BIN" -base "$W/llama" -adapter "$W/np1" -logits "$W/tok40.jsonl" -logits_out "$W/l.safetensors" >/dev/null 2>&1 &&
   $PY $REF compare "$W/llama" "$W/tok40.jsonl" "$W/l.safetensors" --adapter "$W/np1" --tol 1e-4 >/dev/null; then
  pass "the trained adapter loads (-logits agrees with the NumPy forward of base + adapter)"
else fail "the trained adapter does not load or gives other logits"; fi

# ensembles: -ensemble scores base, each member and the probability-averaged ensemble; NumPy recomputes
# every score (tests/ref/train_ref.py ensemble)
gen adapter "$W/ad_llama2" --model "$W/llama" --rank 2 --alpha 4 --targets q_proj,v_proj,down_proj --seed 16
cat >"$W/heldout.jsonl" <<'JSONL'
{"input_ids": [1, 5, 9, 3, 7, 2, 8, 30, 31], "prompt_len": 3}
{"input_ids": [1, 20, 21, 22, 23], "choices": [[3, 2], [17, 18, 19], [5]], "label": 1}
{"input_ids": [1, 4, 4, 6, 12, 13]}
{"input_ids": [1, 6, 29], "choices": [[4], [14], [22, 23]], "label": 0}
{"input_ids": [1, 7, 7], "choices": [[9, 9], [10]], "label": 1}
{"input_ids": [1, 38, 2, 25], "choices": [[36], [37], [35], [34]], "label": 3}
JSONL
# (at np 3 with -eval_reference the second adapter: kl_ratio, top-1 agreement and share kept as well)
for np in 1 3; do
  refopt=(); refnum=0; [ $np = 3 ] && refopt=(-eval_reference "$W/ad_llama2") && refnum=2
  if mpirun -np $np "$BIN" -base "$W/llama" -ensemble "$W/ad_llama,$W/ad_llama2,$W/np1" -heldout "$W/heldout.jsonl" \
      "${refopt[@]}" -eval_out "$W/ens$np.json" >"$W/ens$np.log" 2>&1 &&
     $PY $TREF ensemble "$W/llama" "$W/heldout.jsonl" "$W/ens$np.json" --adapters "$W/ad_llama" "$W/ad_llama2" "$W/np1" \
       --reference $refnum >"$W/ens$np.cmp" 2>&1; then
    pass "-ensemble at np $np: $(tail -n 1 "$W/ens$np.cmp")"
  else fail "-ensemble at np $np:"; cat "$W/ens$np.log" "$W/ens$np.cmp" 2>/dev/null | tail -n 12; fi
done

# 4. stop and restart: a stop before step 4 (as by SIGTERM) exits 5 with the checkpoint in OUT.partial/ and no
#    OUT; -restart 1 then gives the adapter of the uninterrupted run bit for bit (same ranks); a restart with
#    other options is refused
ITERIS_FAULT_TRAIN_STOP_AT=3 mpirun -np 2 "$BIN" "${tr[@]}" -out "$W/stop" >"$W/stop.log" 2>&1; rc=$?
if [ $rc -eq 5 ] && [ -f "$W/stop.partial/train_checkpoint.safetensors" ] && [ ! -e "$W/stop" ] && grep -q "restart 1" "$W/stop.log"; then
  pass "a stop before step 4: exit 5, checkpoint in OUT.partial/, no OUT"
else fail "stop: exit $rc"; tail -n 5 "$W/stop.log"; fi
mpirun -np 2 "$BIN" "${tr[@]}" -lr 0.02 -restart 1 -out "$W/stop" >"$W/other.log" 2>&1; rc=$?
[ $rc -eq 2 ] && grep -q "written by a run with other options" "$W/other.log" && pass "a restart with another -lr: exit 2" \
  || { fail "restart with other options: exit $rc"; tail -n 5 "$W/other.log"; }
mpirun -np 2 "$BIN" "${tr[@]}" -restart 1 -out "$W/stop" >"$W/restart.log" 2>&1 || { fail "restart:"; tail -n 5 "$W/restart.log"; }
mpirun -np 2 "$BIN" "${tr[@]}" -out "$W/straight" >/dev/null 2>&1
if cmp -s "$W/stop/adapter_model.safetensors" "$W/straight/adapter_model.safetensors" && [ ! -e "$W/stop.partial" ] &&
   [ ! -e "$W/stop/train_checkpoint.safetensors" ] && $PY - "$W/stop/train_report.json" "$W/straight/train_report.json" <<'PY'
import json, sys
a, b = (json.load(open(p))["loss"] for p in sys.argv[1:3])
sys.exit(0 if a == b else 1)
PY
then pass "-restart 1 after the stop: the same adapter bytes and loss curve as the uninterrupted run"
else fail "restart differs from the uninterrupted run"; fi
# a periodic checkpoint is written and removed at the end
mpirun -np 2 "$BIN" "${tr[@]}" -checkpoint_every 2 -out "$W/periodic" >/dev/null 2>&1 && cmp -s "$W/periodic/adapter_model.safetensors" \
  "$W/straight/adapter_model.safetensors" && [ ! -e "$W/periodic.partial" ] && pass "-checkpoint_every 2: same adapter, no checkpoint left" \
  || fail "-checkpoint_every"

# 4b. early stopping (-val_fraction): float64 NumPy recomputes the loss of the held-out sequences (listed in the
#     report) for the starting adapter (the curve's first point) and for the written adapter (the reported best,
#     which must be the curve's minimum); with a large learning rate the best is not the last step; a stop and
#     -restart 1 keep the best found before the stop
es=(-train 1 -base "$W/llama" -data "$W/tok40.jsonl" -init_adapter "$W/ad_llama" -steps 8 -batch 4 -lr 0.08
    -val_fraction 0.25 -eval_every 2 -seed 2 -log_every 0)
mpirun -np 2 "$BIN" "${es[@]}" -out "$W/es" >"$W/es.log" 2>&1 || { fail "-val_fraction run"; tail -n 5 "$W/es.log"; }
ITERIS_FAULT_TRAIN_STOP_AT=5 mpirun -np 2 "$BIN" "${es[@]}" -out "$W/es_stop" >/dev/null 2>&1
mpirun -np 2 "$BIN" "${es[@]}" -restart 1 -out "$W/es_stop" >/dev/null 2>&1
if $PY - "$W/llama" "$W/tok40.jsonl" "$W/ad_llama" "$W/es" <<'PY'
import json, sys
import numpy as np
sys.path.insert(0, "tests/ref")
import llama_ref as R
mdir, data, init, out = sys.argv[1:5]
cfg, W0 = R.Cfg(mdir), R.load_model_tensors(mdir)
rows = [json.loads(l)["input_ids"] for l in open(data) if l.strip()]
v = json.load(open(out + "/train_report.json"))["validation"]
def loss(adir):
    W = dict(W0); R.fold_adapter(W, cfg, adir); tot = cnt = 0
    for i in v["held_out"]:
        ids = rows[i]; z = R.forward(cfg, W, ids)[:-1]; t = np.asarray(ids[1:])
        tot += float((z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) - z[np.arange(len(t)), t]).sum()); cnt += len(t)
    return tot / cnt
curve = v["curve"]; l0, lb = loss(init), loss(out)
print("validation: %d sequences, curve %s, best after step %d; NumPy: start %.6f, written %.6f" %
      (len(v["held_out"]), [round(c[1], 4) for c in curve], v["best_step"], l0, lb))
ok = abs(curve[0][1] - l0) <= 1e-5 * l0 and abs(v["best_loss"] - lb) <= 1e-5 * lb
ok = ok and v["best_loss"] == min(c[1] for c in curve) and [c[0] for c in curve] == [0, 2, 4, 6, 8] and v["best_step"] < 8
sys.exit(0 if ok else 1)
PY
then pass "-val_fraction 0.25: the validation curve's start and the written adapter's loss match NumPy; the best (not the last) is written"
else fail "-val_fraction: early stopping"; fi
cmp -s "$W/es/adapter_model.safetensors" "$W/es_stop/adapter_model.safetensors" &&
  pass "-val_fraction with a stop and -restart 1: the same adapter (the best before the stop is kept)" ||
  fail "-val_fraction: the restarted run wrote another adapter"

# 5. bad input
expect2() { # SUBSTRING ARGS...
  local want=$1; shift
  local out rc
  out=$(timeout -k 5 120 mpirun -np 2 "$BIN" "$@" 2>&1); rc=$?
  if [ $rc -eq 2 ] && grep -qF -- "$want" <<<"$out" && [ ! -e "$W/bad_out" ] && [ ! -e "$W/bad_out.partial" ]; then
    pass "exit 2: $want"
  else fail "want exit 2 with '$want', got $rc:"; echo "$out" | head -n 5; fi
}
printf '{"input_ids": [1, 2]}\n{"input_ids": [1, 77]}\n' > "$W/bad.jsonl"
expect2 "bad.jsonl:2" -train 1 -base "$W/llama" -data "$W/bad.jsonl" -out "$W/bad_out"
expect2 "-targets: unknown module 'qq_proj'" -train 1 -base "$W/llama" -data "$W/tok40.jsonl" -targets qq_proj -out "$W/bad_out"
expect2 "-lora_dropout 1 must be in [0, 1)" -train 1 -base "$W/llama" -data "$W/tok40.jsonl" -lora_dropout 1 -out "$W/bad_out"
expect2 "-train needs -data" -train 1 -base "$W/llama" -out "$W/bad_out"
expect2 "option -max_iter is not used in this mode" -train 1 -base "$W/llama" -data "$W/tok40.jsonl" -max_iter 3 -out "$W/bad_out"

echo "train_reference: $ok passed, $bad failed"
[ "$bad" -eq 0 ]
