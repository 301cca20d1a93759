#!/usr/bin/env python3
"""Cuts a real Hugging Face tokenizer.json down to what a set of test texts needs, keeping the
original ids, and writes the test cases with their expected ids.

Kept: every vocabulary entry that is a substring of some pre-token of some text (in the model's
alphabet: byte-level mapped, or "▁"-normalised), every merge whose merged string is such a
substring, all <0xXX> byte tokens, the unk token and all added tokens. BPE merges only ever build
substrings of the pre-token, and dropping a merge that is never applicable cannot change which
merge is the lowest-ranked at any step, so the ids stay the same; the script checks it anyway by
encoding every case with tests/ref/hf_bpe_ref.py on both the full and the trimmed file.

Usage: trim_tokenizer.py FULL_DIR OUT_DIR HARD.jsonl [LLAMACPP.inp LLAMACPP.out]
  FULL_DIR holds tokenizer.json (and maybe tokenizer_config.json, copied as is). OUT_DIR gets the
  trimmed tokenizer.json and cases.jsonl: one {"text", "special", "ids", "source"} per line:
  source "llama.cpp" (ids from llama.cpp's .out, made by Hugging Face with add_special_tokens=False;
  the reference must agree with them on the full file) or "hf_bpe_ref" (ids of the reference on
  the full file), each text of HARD.jsonl also once with special=true (--special ids).
"""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_bpe_ref  # noqa: E402


def main():
    full_dir, out_dir, hard = sys.argv[1:4]
    full_path = os.path.join(full_dir, "tokenizer.json")
    full = hf_bpe_ref.Tokenizer(full_path)
    cases = []
    if len(sys.argv) > 5:
        texts = open(sys.argv[4], encoding="utf-8").read().split("\n__ggml_vocab_test__\n")
        if texts and texts[-1] == "":
            texts = texts[:-1]
        want = [[int(x) for x in l.split()] for l in open(sys.argv[5]).read().split("\n")][:len(texts)]
        for t, w in zip(texts, want):
            got = full.encode(t)
            if got != w:
                raise SystemExit("the reference disagrees with llama.cpp's ids on %r: %s vs %s" % (t, got, w))
            cases.append({"text": t, "special": False, "ids": w, "source": "llama.cpp"})
    for line in open(hard, encoding="utf-8"):
        t = json.loads(line)["text"]
        for sp in (False, True):
            cases.append({"text": t, "special": sp, "ids": full.encode(t, sp), "source": "hf_bpe_ref"})
    subs = set()
    for c in cases:
        for u in full.units(c["text"]):
            if isinstance(u, str):
                subs.update(u[i:j] for i in range(len(u)) for j in range(i + 1, len(u) + 1))
    j = json.load(open(full_path, encoding="utf-8"))
    m = j["model"]
    added = {a["content"] for a in j.get("added_tokens") or []}
    keep = {k: v for k, v in m["vocab"].items()
            if k in subs or k in added or k == m.get("unk_token") or (len(k) == 6 and k.startswith("<0x") and k.endswith(">"))}
    merges = []
    for mg in m.get("merges") or []:
        a, b = mg.split(" ") if isinstance(mg, str) else mg
        if a + b in subs and a in keep and b in keep:
            merges.append(mg)
    print("%s: vocab %d -> %d, merges %d -> %d" % (full_path, len(m["vocab"]), len(keep), len(m.get("merges") or []), len(merges)))
    m["vocab"] = keep
    m["merges"] = merges
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, "tokenizer.json")
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    cfg = os.path.join(full_dir, "tokenizer_config.json")
    if os.path.exists(cfg):
        shutil.copy(cfg, os.path.join(out_dir, "tokenizer_config.json"))
    trimmed = hf_bpe_ref.Tokenizer(out_path)
    for c in cases:
        if trimmed.encode(c["text"], c["special"]) != c["ids"]:
            raise SystemExit("trimming changed the ids of %r" % c["text"])
    with open(os.path.join(out_dir, "cases.jsonl"), "w", encoding="utf-8") as f:
        for c in cases:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    print("%d cases, the same ids on the trimmed file" % len(cases))


if __name__ == "__main__":
    main()
