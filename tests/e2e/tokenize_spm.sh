#!/usr/bin/env bash
# SentencePiece tokenizer.model, end to end: `iteris-mpi -base DIR -tokenize IN -tokenize_out OUT` with
# DIR holding config.json and a tokenizer.model, against python3-sentencepiece run live (Debian's
# libsentencepiece 0.1.97, the C++ library this reader reimplements in C):
#   - the committed fixtures (tests/data/tokenizers: Llama 2's vocabulary trimmed, a trained BPE model
#     and its 6 variants) on hard texts and 200 random texts each (runs of spaces, tabs, newlines,
#     pieces glued together, user-defined symbols, CJK / emoji, invalid UTF-8), BOS first as for
#     calibration;
#   - malformed tokenizer.model files (truncated, a bad wire type, a length past the end, more pieces
#     than config.json's vocab_size, no pieces) are exit 2 naming the file, with no output left.
# Prints every check; exits 1 on any failure, 77 when python3-sentencepiece is not installed.
# Env: ITERIS_BIN (the binary; default build/bin/iteris-mpi).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
PY=/usr/bin/python3
if ! $PY -c 'import sentencepiece' 2>/dev/null; then echo "SKIPPED: python3-sentencepiece is not installed"; exit 77; fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export OMPI_MCA_rmaps_base_oversubscribe=1
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
ok=0; bad=0
pass() { ok=$((ok + 1)); echo "ok: $*"; }
fail() { bad=$((bad + 1)); echo "FAILED: $*"; }

"$BIN" -make_demo "$W/demo" >/dev/null 2>&1 || { fail "-make_demo"; echo "$ok passed, $bad failed"; exit 1; }

# one base folder per model: the demo's config.json with vocab_size = the model's piece count
$PY - "$W" "$W/demo/base/config.json" tests/data/tokenizers <<'PY'
import glob, json, os, random, sys
import sentencepiece as spm
w, cfg, data = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
sys.path.insert(0, "tests/ref")
from spm_fixtures import HARD, USER
rng = random.Random(17)
models = sorted(glob.glob(data + "/*/*.model"))
for k, m in enumerate(models):
    d = "%s/m%d" % (w, k)
    os.makedirs(d)
    blob = open(m, "rb").read()
    open(d + "/tokenizer.model", "wb").write(blob)
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(blob)
    json.dump(dict(cfg, vocab_size=sp.get_piece_size()), open(d + "/config.json", "w"))
    open(d + "/name", "w").write(m)
    # random texts from the model's own pieces (with U+2581 back to ' '), user symbols and odd bytes
    pieces = [sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    extra = [" ", "  ", "   ", "\t", "\n", "\r\n", "\u2581", "你", "😀", "é", "e\u0301", "1", "42"] + USER
    texts = [t if isinstance(t, bytes) else t.encode() for t in HARD]
    for _ in range(200):
        parts = [rng.choice(pieces if rng.random() < 0.7 else extra) for _ in range(rng.randint(0, 25))]
        t = "".join(parts).encode()
        if rng.random() < 0.1:
            t += bytes([rng.choice([0x80, 0xbf, 0xc3, 0xe2, 0xf0, 0xff])])
        texts.append(t)
    with open(d + "/texts.jsonl", "wb") as f:
        for t in texts:  # raw bytes inside the JSON string (json.dumps of the text decoded with surrogateescape)
            s = json.dumps(t.decode("utf-8", "surrogateescape"), ensure_ascii=False)
            f.write(b'{"text": ' + s.encode("utf-8", "surrogateescape") + b"}\n")
    with open(d + "/ref.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"input_ids": sp.encode(t, add_bos=True)}) + "\n")
PY
[ $? -eq 0 ] || fail "writing the test folders"

for d in "$W"/m*; do
  name=$(cat "$d/name")
  if "$BIN" -base "$d" -tokenize "$d/texts.jsonl" -tokenize_out "$d/bin.jsonl" >"$d/log" 2>&1; then
    $PY - "$d/bin.jsonl" "$d/ref.jsonl" "$d/texts.jsonl" "$name" <<'PY' && pass "$name: binary == python3-sentencepiece" || fail "$name"
import json, sys
got = [json.loads(l)["input_ids"] for l in open(sys.argv[1])]
want = [json.loads(l)["input_ids"] for l in open(sys.argv[2])]
src = open(sys.argv[3], "rb").read().splitlines()
same = sum(g == w for g, w in zip(got, want))
print("  %s: %d texts, %d tokens, %d same" % (sys.argv[4], len(want), sum(map(len, want)), same))
for k, (g, w) in enumerate(zip(got, want)):
    if g != w:
        print("    line %d %r: binary %s, reference %s" % (k + 1, src[k][:60], g[:12], w[:12]))
sys.exit(0 if len(got) == len(want) and same == len(want) else 1)
PY
  else
    cat "$d/log"; fail "$name: -tokenize"
  fi
done

# ---- malformed models: exit 2 naming the file, no output ---------------------------------------------
D=$W/m0
good=$D/tokenizer.model
bad_case() { # bad_case LABEL SUBSTRING VOCAB (reads the model from $W/bad.model)
  local label=$1 want=$2 vocab=$3 b=$W/bad_$RANDOM
  mkdir -p "$b" && cp "$W/bad.model" "$b/tokenizer.model"
  $PY -c 'import json,sys; c=json.load(open(sys.argv[1])); c["vocab_size"]=int(sys.argv[2]); json.dump(c, open(sys.argv[3],"w"))' \
    "$D/config.json" "$vocab" "$b/config.json"
  local out rc
  out=$("$BIN" -base "$b" -tokenize "$D/texts.jsonl" -tokenize_out "$b/out.jsonl" 2>&1); rc=$?
  if [ $rc -eq 2 ] && grep -qF -- "$b/tokenizer.model" <<<"$out" && grep -qF -- "$want" <<<"$out" && [ ! -e "$b/out.jsonl" ]; then
    pass "$label: exit 2 naming the file ($want)"
  else
    fail "$label: want exit 2, '$b/tokenizer.model' and '$want', no output; got $rc: $out"
  fi
}
V=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["vocab_size"])' "$D/config.json")
size=$(stat -c %s "$good")
head -c $((size - 5)) "$good" > "$W/bad.model"; bad_case "truncated" "byte(s) are left" "$V"
{ cat "$good"; printf '\x4f'; } > "$W/bad.model"; bad_case "bad wire type" "wire type 7" "$V"
{ printf '\x0a\x7f\x0a\x01a'; cat "$good"; } > "$W/bad.model"; bad_case "length past the end" "piece 0" "$V"
cp "$good" "$W/bad.model"; bad_case "a piece id >= vocab_size" "vocab_size (config.json) is $((V - 1))" $((V - 1))
: > "$W/bad.model"; bad_case "zero pieces" "holds no pieces" "$V"

echo "$ok passed, $bad failed"
[ $bad -eq 0 ]
