#!/usr/bin/env bash
# Bad input and bad options: a clear message, exit code 2 on every rank, no hang, no partial output.
set -uo pipefail
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
"$BIN" -make_demo "$W/demo" >/dev/null 2>&1 || { echo "cannot make the demo case"; exit 1; }
rm -f "$W/demo/base/tokenizer.json"  # the demo's byte-level tokenizer.json: the checks below want a base without a tokenizer
D=$W/demo
ok=0; bad=0
# expect CODE SUBSTRING ARGS...: runs on 2 ranks under a timeout
expect() {
  local code=$1 want=$2; shift 2
  local out rc
  out=$(timeout -k 5 120 mpirun -np 2 "$BIN" "$@" 2>&1); rc=$?
  if [ "$rc" -eq "$code" ] && grep -qF -- "$want" <<<"$out" && [ ! -e "$W/out" ] && [ ! -e "$W/out.partial" ]; then
    ok=$((ok + 1))
  else
    bad=$((bad + 1)); echo "FAILED: iteris-mpi $* -> exit $rc (want $code), output:"; echo "$out" | head -n 8
  fi
}
base=(-base "$D/base" -adapters "$D/adapter_0,$D/adapter_1" -calib "$D/calib_0.jsonl,$D/calib_1.jsonl" -out "$W/out")
expect 2 "unknown option -bogus" "${base[@]}" -bogus 3
expect 2 "option -dare_p is not used by -method iteris" "${base[@]}" -dare_p 0.3
expect 2 "-calib has 1 file(s) but -adapters has 2" -base "$D/base" -adapters "$D/adapter_0,$D/adapter_1" -calib "$D/calib_0.jsonl" -out "$W/out"
expect 2 "missing -base" -adapters "$D/adapter_0" -calib "$D/calib_0.jsonl" -out "$W/out"
expect 2 "option -max_iter: 'ten' is not an integer" "${base[@]}" -max_iter ten
expect 2 "unknown method 'magic'" "${base[@]}" -method magic
expect 2 "-system must be auto, inputs or tokens, got 'bogus'" "${base[@]}" -system bogus
expect 2 "-system tokens needs a system that is a Gram of rows plus a ridge" "${base[@]}" -system tokens -alpha_2 0
expect 2 "-block_size must be in 16..1024, got 8" "${base[@]}" -block_size 8
expect 2 "-grid_rows 3 does not divide the 2 ranks" "${base[@]}" -grid_rows 3
expect 2 "option -grid_rows: -1 is out of range" "${base[@]}" -grid_rows -1
expect 2 "-gram_exchange must be auto, columns or partial, got 'rows'" "${base[@]}" -gram_exchange rows
expect 2 "cannot read the job file" -options_file "$W/nope.yaml"
# job files PETSc cannot read (issue 13, defect 3: banner and a hang, or "exiting improperly"): exit 2 naming file and line
mkdir -p "$W/jobdir.yaml"
expect 2 "the job file '$W/jobdir.yaml' is not a regular file" -options_file "$W/jobdir.yaml"
printf 'base demo/base\n-adapters a\n' > "$W/notopt.opts"
expect 2 "job file '$W/notopt.opts', line 1: 'base demo/base' is not an option" -options_file "$W/notopt.opts"
printf '# job\nbase: %s\nadapters: [a, b\n' "$D/base" > "$W/unclosed.yaml"
expect 2 "job file '$W/unclosed.yaml', line 3: the value of 'adapters' is not closed" -options_file "$W/unclosed.yaml"
printf 'base: x\nout: \001\002\n' > "$W/binary.yaml"
expect 2 "job file '$W/binary.yaml', line 2, column 6: byte 0x01 is not text" -options_file "$W/binary.yaml"
printf 'base: x\n\tout: y\n' > "$W/tab.yaml"
expect 2 "job file '$W/tab.yaml', line 2: indented with a tab" -options_file "$W/tab.yaml"
expect 2 "$W/missing" -base "$D/base" -adapters "$W/missing,$D/adapter_1" -calib "$D/calib_0.jsonl,$D/calib_1.jsonl" -out "$W/out"
# token id past the vocabulary: the message names the file and the line
printf '{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 99999]}\n' > "$W/bad.jsonl"
expect 2 "bad.jsonl" -base "$D/base" -adapters "$D/adapter_0,$D/adapter_1" -calib "$W/bad.jsonl,$D/calib_1.jsonl" -out "$W/out"
expect 2 "bad.jsonl:2: input_ids[1] = 99999" -base "$D/base" -adapters "$D/adapter_0,$D/adapter_1" -calib "$W/bad.jsonl,$D/calib_1.jsonl" -out "$W/out"
# an adapter for another base model (different hidden size)
"$BIN" -make_demo "$W/other" >/dev/null 2>&1
/usr/bin/python3 - "$W/other/base/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["hidden_size"] = 96; c["head_dim"] = 16
json.dump(c, open(sys.argv[1], "w"))
PY
expect 2 "adapter_0/adapter_model.safetensors: tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape (4, 64) but the base model's q_proj takes 96 inputs" -base "$W/other/base" -adapters "$D/adapter_0" -calib "$D/calib_0.jsonl" -out "$W/out"
expect 2 "The base model is $W/other/base/config.json: hidden_size 96" -base "$W/other/base" -adapters "$D/adapter_0" -calib "$D/calib_0.jsonl" -out "$W/out"
# -out with a trailing "/" or "/." names the same folder (issue 13, defect 1: the adapter was left hidden in
# DIR/.partial/ and the run failed at its end); "." and ".." are no folder of their own
expect 2 "does not name a folder of its own" "${base[@]}" -method task_arithmetic -out .
expect 2 "does not name a folder of its own" "${base[@]}" -method task_arithmetic -out "$W/demo/.."
for o in "$W/o/" "$W/o/." "$W/o/./"; do
  out=$(timeout -k 5 120 mpirun -np 2 "$BIN" "${base[@]}" -method task_arithmetic -out "$o" 2>&1); rc=$?
  if [ $rc -eq 0 ] && [ -f "$W/o/adapter_model.safetensors" ] && [ ! -e "$W/o/.partial" ] && [ ! -e "$W/o.partial" ]; then
    ok=$((ok + 1))
  else
    bad=$((bad + 1)); echo "FAILED: -out '$o' -> exit $rc:"; echo "$out" | tail -n 5; ls -a "$W/o" 2>&1 | head
  fi
done
rm -rf "$W/o"
# -log_view into a folder that cannot be written: refused before the merge (it used to spin in PetscFinalize)
expect 2 "-log_view :/proc/nonexistent/log.txt: cannot write into the folder" "${base[@]}" -log_view :/proc/nonexistent/log.txt
# issue 13, defect 7: an absurd lora_alpha (finite) names the adapter's config and the field, not the calibration data
cp -r "$D/adapter_1" "$W/alpha_big"
/usr/bin/python3 - "$W/alpha_big/adapter_config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["lora_alpha"] = 1e300
json.dump(c, open(sys.argv[1], "w"))
PY
expect 2 "alpha_big/adapter_config.json: lora_alpha 1e+300" -base "$D/base" -adapters "$D/adapter_0,$W/alpha_big" -calib "$D/calib_0.jsonl,$D/calib_1.jsonl" -out "$W/out"
# issue 13, defect 8: layers_to_transform is PEFT's: tensors of a layer it excludes are refused (PEFT would
# not apply them); an adapter listing every layer it has merges; a layers_pattern other than "layers" is refused
for v in '[0]' '[0, 1, 2, 3]' '"blocks"'; do
  rm -rf "$W/ltt"; cp -r "$D/adapter_1" "$W/ltt"
  /usr/bin/python3 - "$W/ltt/adapter_config.json" "$v" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); v = json.loads(sys.argv[2])
if isinstance(v, str): c["layers_pattern"] = v
else: c["layers_to_transform"] = v
json.dump(c, open(sys.argv[1], "w"))
PY
  case $v in
    '[0]') expect 2 "is for layer 1, which layers_to_transform in $W/ltt/adapter_config.json excludes" -base "$D/base" -adapters "$D/adapter_0,$W/ltt" -calib "$D/calib_0.jsonl,$D/calib_1.jsonl" -out "$W/out" ;;
    '"blocks"') expect 2 "layers_pattern is 'blocks'" -base "$D/base" -adapters "$D/adapter_0,$W/ltt" -calib "$D/calib_0.jsonl,$D/calib_1.jsonl" -out "$W/out" ;;
    *) if timeout -k 5 120 mpirun -np 2 "$BIN" -base "$D/base" -adapters "$D/adapter_0,$W/ltt" -method task_arithmetic -out "$W/ltt_out" >/dev/null 2>&1; then ok=$((ok + 1)); else bad=$((bad + 1)); echo "FAILED: layers_to_transform $v refused"; fi
       rm -rf "$W/ltt_out" ;;
  esac
done
# issue 13, defect 6: sizes the machine cannot hold are input errors naming the file and field or option
# (they were "out of memory", exit 4, after the allocation)
cp -r "$D/base" "$W/bigvocab"
/usr/bin/python3 - "$W/bigvocab/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["vocab_size"] = 1073741824
json.dump(c, open(sys.argv[1], "w"))
PY
expect 2 "bigvocab/config.json: vocab_size 1073741824 x hidden_size" -base "$W/bigvocab" -adapters "$D/adapter_0" -calib "$D/calib_0.jsonl" -out "$W/out"
/usr/bin/python3 -c 'import json; print(json.dumps({"input_ids": [1, 2, 3]})); print(json.dumps({"input_ids": [5] * 400000}))' > "$W/long.jsonl"
expect 2 "long.jsonl: sequence 2 (counting non-blank lines) has 400000 tokens" -base "$D/base" -adapters "$D/adapter_0" -calib "$W/long.jsonl" -out "$W/out"
expect 2 "Give -max_tokens" -base "$D/base" -adapters "$D/adapter_0" -calib "$W/long.jsonl" -out "$W/out"
# issue 13, smaller ones: an absurd relative ridge; a -out whose folder is missing or read-only, refused at the
# start (it was refused at the first checkpoint, after a whole iteration); a folder in place of
# adapter_model.safetensors, and a symbolic link loop, are not "missing"
expect 2 "-alpha_2 1e+308: these are ridges relative to a Gram's Frobenius norm" "${base[@]}" -alpha_2 1e308
expect 2 "the folder '$W/nodir' does not exist" "${base[@]}" -out "$W/nodir/merged"
mkdir -p "$W/ro"; chmod 555 "$W/ro"
if [ "$(id -u)" -eq 0 ] && touch "$W/ro/probe" 2>/dev/null; then
  rm -f "$W/ro/probe"; echo "(root: a read-only folder is writable here; that check is not run)"
else
  expect 2 "the folder '$W/ro' is not writable" "${base[@]}" -out "$W/ro/merged"
fi
chmod 755 "$W/ro"
cp -r "$D/adapter_1" "$W/dir_st" && rm "$W/dir_st/adapter_model.safetensors" && mkdir "$W/dir_st/adapter_model.safetensors"
expect 2 "dir_st/adapter_model.safetensors: is a folder, not a safetensors file" -base "$D/base" -adapters "$D/adapter_0,$W/dir_st" -calib "$D/calib_0.jsonl,$D/calib_1.jsonl" -out "$W/out"
cp -r "$D/adapter_1" "$W/loop_st" && rm "$W/loop_st/adapter_model.safetensors" && ln -s adapter_model.safetensors "$W/loop_st/adapter_model.safetensors"
expect 2 "loop_st/adapter_model.safetensors: is a symbolic link loop" -base "$D/base" -adapters "$D/adapter_0,$W/loop_st" -calib "$D/calib_0.jsonl,$D/calib_1.jsonl" -out "$W/out"
# -tokenize (issue 16): its required options, a mode of its own, and text without a tokenizer (the demo has none)
expect 2 "-tokenize needs -tokenize_out OUT.jsonl" -base "$D/base" -tokenize "$D/calib_0.jsonl"
expect 2 "-tokenize needs -base DIR" -tokenize "$D/calib_0.jsonl" -tokenize_out "$W/t.jsonl"
expect 2 "-inspect, -make_demo, -logits, -tokenize, -train and -ensemble are separate modes" -base "$D/base" -tokenize "$D/calib_0.jsonl" -tokenize_out "$W/t.jsonl" -logits "$D/calib_0.jsonl"
expect 2 "option -adapters is not used in this mode" -base "$D/base" -tokenize "$D/calib_0.jsonl" -tokenize_out "$W/t.jsonl" -adapters "$D/adapter_0"
printf '{"text": "hello"}\n' > "$W/text.jsonl"
expect 2 "text.jsonl:1: has 'text', but the base folder $D/base has no tokenizer" -base "$D/base" -adapters "$D/adapter_0,$D/adapter_1" -calib "$W/text.jsonl,$D/calib_1.jsonl" -out "$W/out"
# a help that lists the options, exit 0
out=$("$BIN" -help); if grep -q -- "-alpha_2" <<<"$out" && grep -q -- "-tokenize_out" <<<"$out" && grep -q "exit codes" <<<"$out"; then ok=$((ok + 1)); else bad=$((bad + 1)); echo "FAILED: -help"; fi
echo "cli_errors: $ok ok, $bad failed"
[ "$bad" -eq 0 ]
