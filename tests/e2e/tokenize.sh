#!/usr/bin/env bash
# Text in, end to end (issue 16): `iteris-mpi -base DIR -tokenize IN.jsonl -tokenize_out OUT.jsonl`
# against an independent Python implementation of llama2.c's encode() (tests/ref/llama2c_tok_ref.py,
# the plain O(n^2) rescanning loop; the binary uses a heap), on stories260K's tok512.bin and hard texts:
# whitespace runs, digits, CJK and emoji (byte fallback), punctuation, newlines, invalid UTF-8, a long
# story. Then:
#   - stories260K's prompts.jsonl: the binary's ids from the text equal the ids the file carries;
#   - -logits from text lines equals -logits from the same ids (same bytes);
#   - a merge calibrated (and evaluated) on text equals the merge on the same ids: the demo case with a
#     tokenizer.bin of 256 pieces written here (the demo model has no tokenizer of its own);
#   - text lines without a tokenizer, or beside a malformed tokenizer.json, are input errors naming the file
#     (tokenizer.json itself: tests/e2e/tokenize_json.sh).
# Prints every check; exits 1 on any failure, 77 when ../shared/models/stories260K is absent.
# Env: ITERIS_BIN (the binary; default build/bin/iteris-mpi).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
PY=/usr/bin/python3
REF=tests/ref/llama2c_tok_ref.py
SHARED=$ROOT/../shared
[ -d "$SHARED/models/stories260K" ] || SHARED=/work/shared
S=$SHARED/models/stories260K
if [ ! -f "$S/tok512.bin" ]; then echo "SKIPPED: stories260K not found (../shared/models/stories260K, /work/shared)"; exit 77; fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export OMPI_MCA_rmaps_base_oversubscribe=1
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
ok=0; bad=0
pass() { ok=$((ok + 1)); echo "ok: $*"; }
fail() { bad=$((bad + 1)); echo "FAILED: $*"; }

# ---- hard texts ---------------------------------------------------------------------------------
$PY - "$W/hard.jsonl" "$S/prompts.jsonl" <<'PY'
import json, sys
story = " ".join(json.loads(l)["text"] for l in open(sys.argv[2]))
long_story = "\n\n".join("%d. %s" % (k, story) for k in range(60))  # ~17 KB
texts = [
    "Once upon a time, there was a little girl named Lily.",
    "   leading spaces, trailing spaces   ",
    "whitespace   runs\t\tand\ttabs \t \t and  double  spaces",
    "digits 0123456789, 3.14159, 2024-12-31, 1,000,000 and 42nd",
    "CJK: 你好，世界。日本語のテキスト 한국어",
    "emoji: 😀👍🏽🚀 family 👨‍👩‍👧 flag 🇫🇷",
    "punctuation !?.,;:'\"()[]{}<>@#$%^&*-_=+\\|/~` ... --- ???",
    "newlines\nline two\r\nline three\n\n\nafter three newlines\n",
    "accents: café, naïve, e\u0301 (combining), ñ, ü, ß, Æ",
    "a",
    " ",
    "\n",
    "",
    "The the THE tHe tHE, theeee thhhe...",
    "runs of a merge with itself (ties): lll llll lllll ooo ooooo ppp ppppp, hellllo, sooo, a hipppo lllooo",
    long_story,
]
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for t in texts:
        f.write(json.dumps({"text": t}, ensure_ascii=(t.startswith("digits"))) + "\n")
    f.write('{"input_ids": [1, 5, 300]}\n')  # an ids line passes through
    f.write('{"text": "ignored: input_ids win", "input_ids": [1, 2]}\n')
with open(sys.argv[1], "ab") as f:  # invalid UTF-8: raw bytes inside the JSON string
    f.write(b'{"text": "bad \xff\xfe bytes \xc3\x28 stray \x80\x80\x80\x80\x80\x80 cut \xe2\x82 end \xf0\x9f\x98"}\n')
PY
"$BIN" -base "$S" -tokenize "$W/hard.jsonl" -tokenize_out "$W/hard_bin.jsonl" >"$W/tok.log" 2>&1 ||
  { cat "$W/tok.log"; fail "-tokenize on the hard texts"; }
$PY "$REF" "$S/tok512.bin" 512 "$W/hard.jsonl" "$W/hard_ref.jsonl" || fail "the Python reference"
$PY - "$W/hard.jsonl" "$W/hard_bin.jsonl" "$W/hard_ref.jsonl" <<'PY' && pass "hard texts: binary == reference" || fail "hard texts"
import json, sys
src = open(sys.argv[1], "rb").read().splitlines()
got = [json.loads(l)["input_ids"] for l in open(sys.argv[2])]
want = [json.loads(l)["input_ids"] for l in open(sys.argv[3])]
assert len(got) == len(want) == len(src), (len(got), len(want), len(src))
bad = 0
for k, (g, w) in enumerate(zip(got, want)):
    what = src[k][:48].decode("utf-8", "replace").replace("\n", " ")
    fallback = sum(1 for x in w if 3 <= x <= 258)
    print("  line %2d: %5d tokens (%3d byte fallback) %s  %s" % (k + 1, len(w), fallback, "same" if g == w else "DIFFERENT", what))
    if g != w:
        bad += 1
        i = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
        print("    first difference at %d: binary %s, reference %s" % (i, g[i:i + 8], w[i:i + 8]))
assert got[0] == [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
assert got[12] == [1], got[12]  # empty text: BOS only (no dummy prefix)
assert got[-3] == [1, 5, 300] and got[-2] == [1, 2]
assert any(3 <= x <= 258 for x in got[4]) and any(3 <= x <= 258 for x in got[-1]), "CJK / bad bytes: no byte fallback?"
sys.exit(1 if bad else 0)
PY

# ---- stories260K's prompts: the ids they carry -----------------------------------------------------
$PY -c 'import json,sys; [print(json.dumps({"text": json.loads(l)["text"]})) for l in open(sys.argv[1])]' \
  "$S/prompts.jsonl" > "$W/prompts_text.jsonl"
"$BIN" -base "$S" -tokenize "$W/prompts_text.jsonl" -tokenize_out "$W/prompts_bin.jsonl" >/dev/null 2>&1
$PY - "$S/prompts.jsonl" "$W/prompts_bin.jsonl" <<'PY' && pass "prompts.jsonl: ids from text == the file's ids" || fail "prompts.jsonl"
import json, sys
want = [json.loads(l)["input_ids"] for l in open(sys.argv[1])]
got = [json.loads(l)["input_ids"] for l in open(sys.argv[2])]
print("  %d prompts, %d tokens" % (len(want), sum(map(len, want))))
sys.exit(0 if got == want else 1)
PY

# ---- -logits from text == -logits from ids --------------------------------------------------------
"$BIN" -base "$S" -logits "$W/prompts_text.jsonl" -logits_out "$W/lt.safetensors" >/dev/null 2>&1 &&
  "$BIN" -base "$S" -logits "$S/prompts.jsonl" -logits_out "$W/li.safetensors" >/dev/null 2>&1 &&
  cmp -s "$W/lt.safetensors" "$W/li.safetensors" && pass "-logits: text lines == input_ids lines (same bytes)" ||
  fail "-logits from text differs from -logits from ids"

# ---- a merge from text == the merge from the same ids ---------------------------------------------
"$BIN" -make_demo "$W/demo" >/dev/null 2>&1 || { fail "-make_demo"; echo "$ok passed, $bad failed"; exit 1; }
rm -f "$W/demo/base/tokenizer.json"  # the demo's byte-level tokenizer.json: these checks give the base their own tokenizers
D=$W/demo
# A 256-piece tokenizer.bin for the demo's vocab_size 256: <unk>, BOS, EOS, '\n' and printable ASCII,
# then 157 merges learnt greedily (most frequent pair first) from the texts, scored -rank. Calibration
# and held-out texts: sentences of the stories (ASCII only, so no byte fallback is needed).
$PY - "$D/base/tokenizer.bin" "$W" "$S/prompts.jsonl" <<'PY'
import json, struct, sys, collections
out, w = sys.argv[1], sys.argv[2]
base = [json.loads(l)["text"] for l in open(sys.argv[3])]
words = "the a little girl boy dog cat ran saw big red ball park happy sad sun tree went played".split()
texts = []
for k in range(96):
    s = " ".join(words[(k * 7 + j * 3) % len(words)] for j in range(6 + k % 9))
    texts.append("%s %s. %s!" % (base[k % 4], s.capitalize(), words[k % len(words)].upper()))
for i in range(3):
    with open("%s/calib_text_%d.jsonl" % (w, i), "w") as f:
        for t in texts[i * 24:(i + 1) * 24]: f.write(json.dumps({"text": t}) + "\n")
    with open("%s/heldout_text_%d.jsonl" % (w, i), "w") as f:
        for t in texts[72 + i * 8:72 + (i + 1) * 8]: f.write(json.dumps({"text": t}) + "\n")
pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b"\n"] + [bytes([c]) for c in range(32, 127)]
corpus = [[bytes([c]) for c in (" " + t).encode()] for t in texts]
while len(pieces) < 256:  # greedy BPE on the texts
    pairs = collections.Counter((a, b) for s in corpus for a, b in zip(s, s[1:]) if a + b not in pieces)
    (a, b), _ = pairs.most_common(1)[0]
    pieces.append(a + b)
    for s in corpus:
        i = 0
        while i < len(s) - 1:
            if s[i] == a and s[i + 1] == b: s[i:i + 2] = [a + b]
            i += 1
with open(out, "wb") as f:
    f.write(struct.pack("<i", max(map(len, pieces))))
    for i, p in enumerate(pieces):
        f.write(struct.pack("<fi", 0.0 if i < 99 else -float(i - 99), len(p)) + p)
PY
ok_tok=1
for i in 0 1 2; do
  for kind in calib heldout; do
    "$BIN" -base "$D/base" -tokenize "$W/${kind}_text_$i.jsonl" -tokenize_out "$W/${kind}_ids_$i.jsonl" >/dev/null 2>&1 || ok_tok=0
    $PY "$REF" "$D/base/tokenizer.bin" 256 "$W/${kind}_text_$i.jsonl" "$W/${kind}_ref_$i.jsonl" &&
      cmp -s "$W/${kind}_ids_$i.jsonl" "$W/${kind}_ref_$i.jsonl" || ok_tok=0
  done
done
[ $ok_tok = 1 ] && pass "demo tokenizer: binary == reference on the calibration and held-out texts" || fail "demo tokenizer"
merge() { # merge KIND OUT: calibration and held-out files named ${KIND}_{text,ids}
  mpirun -np 2 "$BIN" -base "$D/base" -adapters "$D/adapter_0,$D/adapter_1,$D/adapter_2" \
    -calib "$W/calib_$1_0.jsonl,$W/calib_$1_1.jsonl,$W/calib_$1_2.jsonl" \
    -heldout "$W/heldout_$1_0.jsonl,$W/heldout_$1_1.jsonl,$W/heldout_$1_2.jsonl" \
    -max_iter 2 -plots 0 -out "$2" >"$2.log" 2>&1 || { cat "$2.log"; return 1; }
}
if merge text "$W/m_text" && merge ids "$W/m_ids"; then
  $PY - "$W/m_text" "$W/m_ids" <<'PY' && pass "merge: calibration from text == calibration from ids" || fail "merge from text"
import json, sys
a, b = sys.argv[1], sys.argv[2]
same = open(a + "/adapter_model.safetensors", "rb").read() == open(b + "/adapter_model.safetensors", "rb").read()
ra, rb = json.load(open(a + "/merge_report.json")), json.load(open(b + "/merge_report.json"))
fa = [(t["kl_ratio"], t["top1"]) for t in ra["tasks"]]
fb = [(t["kl_ratio"], t["top1"]) for t in rb["tasks"]]
print("  adapter_model.safetensors %s; held-out (kl_ratio, top1) per task: text %s, ids %s" %
      ("identical" if same else "DIFFERENT", fa, fb))
sys.exit(0 if same and fa == fb else 1)
PY
else
  fail "a merge failed"
fi

# ---- random vocabularies with many tied scores: binary == reference ---------------------------------
# 12 vocabularies over a small alphabet (pieces up to 5 characters, scores from {-1, -2, -3}: ties
# everywhere), 40 random texts each (runs, spaces, a 2-byte letter, stray bytes)
$PY - "$W/rand" "$D/base/config.json" <<'PY'
import json, os, random, struct, sys
root, cfg = sys.argv[1], json.load(open(sys.argv[2]))
rng = random.Random(16)
alpha = ["a", "b", "c", " ", "\u00e9"]
for v in range(12):
    d = "%s/v%d" % (root, v)
    os.makedirs(d)
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)] + [c.encode() for c in alpha]
    while len(pieces) < 259 + len(alpha) + 40:
        p = "".join(rng.choice(alpha) for _ in range(rng.randint(2, 5))).encode()
        if p not in pieces: pieces.append(p)
    with open(d + "/tokenizer.bin", "wb") as f:
        f.write(struct.pack("<i", max(map(len, pieces))))
        for i, p in enumerate(pieces):
            f.write(struct.pack("<fi", 0.0 if i < 259 else float(rng.choice([-1, -2, -3])), len(p)) + p)
    c = dict(cfg, vocab_size=len(pieces))
    json.dump(c, open(d + "/config.json", "w"))
    with open(d + "/texts.jsonl", "w", encoding="utf-8", errors="surrogateescape") as f:
        for t in range(40):
            text = "".join(rng.choice(alpha + ["aaaa", "   ", "\udc80", "\udcff"]) for _ in range(rng.randint(0, 30)))
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    open(d + "/V", "w").write(str(len(pieces)))
PY
ok_rand=1
for v in "$W"/rand/v*; do
  "$BIN" -base "$v" -tokenize "$v/texts.jsonl" -tokenize_out "$v/bin.jsonl" >"$v/log" 2>&1 || { cat "$v/log"; ok_rand=0; }
  $PY "$REF" "$v/tokenizer.bin" "$(cat "$v/V")" "$v/texts.jsonl" "$v/ref.jsonl" && cmp -s "$v/bin.jsonl" "$v/ref.jsonl" ||
    { ok_rand=0; echo "  $v: the binary and the reference differ"; }
done
[ $ok_rand = 1 ] && pass "12 random vocabularies with tied scores x 40 texts: binary == reference" || fail "random vocabularies"

# ---- errors ---------------------------------------------------------------------------------------
expect2() { # expect2 SUBSTRING ARGS...: exit 2 and the message
  local want=$1; shift
  local out rc
  out=$("$BIN" "$@" 2>&1); rc=$?
  if [ $rc -eq 2 ] && grep -qF -- "$want" <<<"$out"; then pass "error: $want"; else fail "want exit 2 and '$want', got $rc: $out"; fi
}
printf '{"input_ids": [1, 2]}\n{"text": "hello"}\n' > "$W/mixed.jsonl"
rm "$D/base/tokenizer.bin"
expect2 "mixed.jsonl:2: has 'text', but the base folder $D/base has no tokenizer" -base "$D/base" -tokenize "$W/mixed.jsonl" -tokenize_out "$W/x.jsonl"
expect2 "mixed.jsonl:2: has 'text', but the base folder $D/base has no tokenizer" -base "$D/base" -logits "$W/mixed.jsonl" -logits_out "$W/x.safetensors"
out=$(mpirun -np 2 "$BIN" -base "$D/base" -adapters "$D/adapter_0" -calib "$W/mixed.jsonl" -out "$W/m_none" 2>&1); rc=$?
[ $rc -eq 2 ] && grep -qF "mixed.jsonl:2: has 'text', but the base folder" <<<"$out" && [ ! -e "$W/m_none" ] &&
  pass "merge: text without a tokenizer is exit 2 naming file and line" || fail "merge without a tokenizer: $rc $out"
echo '{}' > "$D/base/tokenizer.json"
expect2 "tokenizer.json: 'model' must be an object" -base "$D/base" -tokenize "$W/mixed.jsonl" -tokenize_out "$W/x.jsonl"
[ ! -e "$W/x.jsonl" ] && pass "no output after an error" || fail "-tokenize left $W/x.jsonl after an error"
# ids-only files keep working with no tokenizer at all (tokenizer.json is never opened)
"$BIN" -base "$D/base" -tokenize "$D/calib_0.jsonl" -tokenize_out "$W/c0.jsonl" >/dev/null 2>&1 &&
  cmp -s "$D/calib_0.jsonl" "$W/c0.jsonl" && pass "input_ids files need no tokenizer" || fail "input_ids files without a tokenizer"

echo "$ok passed, $bad failed"
[ $bad -eq 0 ]
