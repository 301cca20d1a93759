#!/usr/bin/env bash
# Text in through a Hugging Face tokenizer.json, end to end: `iteris-mpi -base DIR -tokenize IN
# -tokenize_out OUT` on a model folder holding a (trimmed, real) tokenizer.json of each family in
# tests/data/tokenizers (GPT-2, Llama 3, Llama 2, TinyLlama, Qwen2), against
# tests/ref/hf_bpe_ref.py, an independent Python implementation (ids with the model's special tokens,
# as calibration reads text: Hugging Face's add_special_tokens=True). Then:
#   - tokenizer.json wins over a tokenizer.bin in the same folder;
#   - malformed tokenizer.json files (truncated JSON, a merge naming an unknown token, a duplicate id,
#     an id >= vocab_size, a bad regex) and invalid UTF-8 text are exit 2 naming the file, with no output.
# Prints every check; exits 1 on any failure.
# Env: ITERIS_BIN (the binary; default build/bin/iteris-mpi).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
PY=/usr/bin/python3
REF=tests/ref/hf_bpe_ref.py
DATA=tests/data/tokenizers
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export OMPI_MCA_rmaps_base_oversubscribe=1
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
ok=0; bad=0
pass() { ok=$((ok + 1)); echo "ok: $*"; }
fail() { bad=$((bad + 1)); echo "FAILED: $*"; }

# base DIR V: a tiny Llama config.json with vocab_size V (the tokenizer needs only that)
base() {
  mkdir -p "$1"
  cat > "$1/config.json" <<EOF
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
 "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": $2,
 "max_position_embeddings": 512, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "hidden_act": "silu",
 "tie_word_embeddings": true, "torch_dtype": "float32"}
EOF
}

# ---- every family: the binary against the reference ---------------------------------------------
grep -v '"text": ""' "$DATA/hard_texts.jsonl" > "$W/texts.jsonl"  # "" gives no tokens without a BOS: below
for fam in gpt2:50257 llama3:128256 llama2:32000 tinyllama:32000 qwen2:151936; do
  f=${fam%%:*}; V=${fam##*:}; D=$W/$f
  base "$D" "$V"
  cp "$DATA/$f"/tokenizer*.json "$D/"
  "$BIN" -base "$D" -tokenize "$W/texts.jsonl" -tokenize_out "$D/bin.jsonl" >"$D/log" 2>&1 ||
    { cat "$D/log"; fail "$f: -tokenize"; continue; }
  $PY "$REF" "$D/tokenizer.json" "$W/texts.jsonl" "$D/ref.jsonl" --special || { fail "$f: the reference"; continue; }
  n=$(wc -l < "$W/texts.jsonl")
  if cmp -s "$D/bin.jsonl" "$D/ref.jsonl"; then
    pass "$f: $n hard texts with the model's special tokens: binary == reference"
  else
    fail "$f: binary and reference differ"
    diff <(cat "$D/bin.jsonl") "$D/ref.jsonl" | head -n 6
  fi
  grep -qF "tokenizer $D/tokenizer.json" "$D/log" && pass "$f: the log names the tokenizer.json" ||
    { cat "$D/log"; fail "$f: the log does not name $D/tokenizer.json"; }
done

# a published id, independent of both implementations: Llama 3 "Hello" = 9906 after <|begin_of_text|>
echo '{"text": "Hello"}' > "$W/hello.jsonl"
"$BIN" -base "$W/llama3" -tokenize "$W/hello.jsonl" -tokenize_out "$W/hello_ids.jsonl" >/dev/null 2>&1
grep -qE '"input_ids": ?\[128000, ?9906\]' "$W/hello_ids.jsonl" && pass "Llama 3: Hello -> [128000, 9906]" ||
  fail "Llama 3 Hello: $(cat "$W/hello_ids.jsonl" 2>/dev/null)"
# and Qwen2 (Qwen1.5-7B's tokenizer in llama.cpp's ggml-vocab-qwen2.gguf.out): "Hello world" = 9707 1879, no BOS
echo '{"text": "Hello world"}' > "$W/hello.jsonl"
"$BIN" -base "$W/qwen2" -tokenize "$W/hello.jsonl" -tokenize_out "$W/hello_ids.jsonl" >/dev/null 2>&1
grep -qE '"input_ids": ?\[9707, ?1879\]' "$W/hello_ids.jsonl" && pass "Qwen2: Hello world -> [9707, 1879]" ||
  fail "Qwen2 Hello world: $(cat "$W/hello_ids.jsonl" 2>/dev/null)"

# ---- tokenizer.json before tokenizer.bin -----------------------------------------------------------
printf '\x05\x00\x00\x00' > "$W/gpt2/tokenizer.bin"  # would be refused if it were read
"$BIN" -base "$W/gpt2" -tokenize "$W/texts.jsonl" -tokenize_out "$W/both.jsonl" >"$W/both.log" 2>&1 &&
  cmp -s "$W/both.jsonl" "$W/gpt2/ref.jsonl" && pass "tokenizer.json is used before a tokenizer.bin beside it" ||
  { cat "$W/both.log"; fail "tokenizer.json beside tokenizer.bin"; }
rm -f "$W/gpt2/tokenizer.bin"

# ---- errors -----------------------------------------------------------------------------------------
expect2() { # expect2 DIR SUBSTRING...: -tokenize on DIR is exit 2, the message holds every substring, no output
  local d=$1; shift
  local out rc
  rm -f "$W/x.jsonl"
  out=$("$BIN" -base "$d" -tokenize "${IN:-$W/texts.jsonl}" -tokenize_out "$W/x.jsonl" 2>&1); rc=$?
  local miss=""
  for s in "$@"; do grep -qF -- "$s" <<<"$out" || miss="$miss '$s'"; done
  if [ $rc -eq 2 ] && [ -z "$miss" ] && [ ! -e "$W/x.jsonl" ]; then pass "error: $*"
  else fail "want exit 2 naming$miss and no output, got $rc: $out"; fi
}
mk() { # mk NAME PYTHON-EXPR-ON-j: a copy of the gpt2 fixture edited by the expression
  base "$W/$1" 50257
  $PY - "$DATA/gpt2/tokenizer.json" "$W/$1/tokenizer.json" "$2" <<'PY'
import json, sys
j = json.load(open(sys.argv[1], encoding="utf-8"))
exec(sys.argv[3])
json.dump(j, open(sys.argv[2], "w", encoding="utf-8"), ensure_ascii=False)
PY
}
base "$W/trunc" 50257
head -c 5000 "$DATA/gpt2/tokenizer.json" > "$W/trunc/tokenizer.json"
expect2 "$W/trunc" "$W/trunc/tokenizer.json" "not valid JSON"
mk unknown 'j["model"]["merges"][3] = "Ġ zzzq"'
expect2 "$W/unknown" "$W/unknown/tokenizer.json" "model.merges[3] names the token 'zzzq'"
mk dupid 'j["model"]["vocab"]["zzzq"] = j["model"]["vocab"]["the"]'
expect2 "$W/dupid" "$W/dupid/tokenizer.json" "gives id" "twice"
mk bigid 'j["model"]["vocab"]["zzzq"] = 50257'
expect2 "$W/bigid" "$W/bigid/tokenizer.json" "'zzzq' has id 50257" "vocab_size is 50257"
mk regex 'j["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(?<!x+)a["}, "behavior": "Isolated", "invert": False}'
expect2 "$W/regex" "$W/regex/tokenizer.json" "pre_tokenizer.pattern: the regex" "does not compile"
printf '{"text": "ok"}\n{"text": "bad \xff byte"}\n' > "$W/bad_utf8.jsonl"
IN=$W/bad_utf8.jsonl expect2 "$W/gpt2" "bad_utf8.jsonl:2" "not valid UTF-8 at byte offset 4"
printf '{"text": "ok"}\n{"text": ""}\n' > "$W/empty.jsonl"
IN=$W/empty.jsonl expect2 "$W/gpt2" "empty.jsonl:2: 'text' gives no tokens" "adds no BOS"

echo "$ok passed, $bad failed"
[ $bad -eq 0 ]
