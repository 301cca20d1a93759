#!/usr/bin/python3
"""Builds the SentencePiece fixtures under tests/data/tokenizers/ and their expected ids, with
Debian's python3-sentencepiece (libsentencepiece 0.1.97) as the reference. Rerun after changing the
texts; the unit test (tests/unit/tokenizer_spm_test.cc) reads the files, so CI needs no Python.

  llama2-spm/  Llama 2's vocabulary from llama.cpp's models/ggml-vocab-llama-spm.gguf, written as a
               tokenizer.model (the gguf's tokens, scores, types; Llama 2's normaliser: identity,
               add_dummy_prefix, no remove_extra_whitespaces). python3-sentencepiece must reproduce
               the published Hugging Face ids of models/ggml-vocab-llama-spm.gguf.out on every text of
               .gguf.inp (this validates the conversion). Then trimmed to the pieces that are
               substrings of the normalised texts (merges only build substrings of the text) plus every
               UNKNOWN / CONTROL / BYTE piece, renumbered; the expected ids are the published ids
               mapped through the renumbering, and python3-sentencepiece must give them on the trimmed
               model too.
  trained-bpe/ a BPE model trained here (byte_fallback, user-defined symbols, identity normaliser)
               and variants of it with other normaliser / trainer flags and UNUSED pieces; expected ids
               from python3-sentencepiece on hard texts (whitespace runs, tabs, newlines, digits, CJK,
               emoji, accents, user-defined symbols inside words, invalid UTF-8).

Each folder gets cases.jsonl: {"model": file, "hex": text bytes in hex, "text": the text (readable),
"ids": [...]} per line (ids without BOS / EOS).

Usage: tests/ref/spm_fixtures.py [LLAMA_CPP_GIT_DIR]   (default /work/.mirror/ggerganov+llama.cpp/repo)"""
import io
import json
import os
import random
import subprocess
import sys

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spm_model as M  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data", "tokenizers")
SP = "\u2581"


def processor(model_bytes):
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    return sp


def write_cases(folder, cases):
    with open(os.path.join(folder, "cases.jsonl"), "w") as f:
        for model, text, ids in cases:
            b = text if isinstance(text, bytes) else text.encode("utf-8")
            f.write(json.dumps({"model": model, "hex": b.hex(), "text": b.decode("utf-8", "replace"),
                                "ids": ids}, ensure_ascii=True) + "\n")


# ---- Llama 2 ------------------------------------------------------------------------------------------
def llama(git_dir):
    rev = subprocess.check_output(["git", "-C", git_dir, "rev-parse", "HEAD"], text=True).strip()
    show = lambda p: subprocess.check_output(["git", "-C", git_dir, "show", "HEAD:" + p])  # noqa: E731
    gguf = "/tmp/ggml-vocab-llama-spm.gguf"
    open(gguf, "wb").write(show("models/ggml-vocab-llama-spm.gguf"))
    kv = M.read_gguf_kv(gguf)
    toks, scores, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.scores"], kv["tokenizer.ggml.token_type"]
    assert kv["tokenizer.ggml.model"] == "llama" and len(toks) == 32000
    texts = show("models/ggml-vocab-llama-spm.gguf.inp").decode("utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    outs = show("models/ggml-vocab-llama-spm.gguf.out").decode("utf-8").split("\n")[:-1]
    assert len(texts) == len(outs), (len(texts), len(outs))
    want = [[int(x) for x in o.split()] for o in outs]
    opts = dict(model_type=M.BPE, byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
                escape_whitespaces=True)
    full = M.write_model(list(zip(toks, scores, types)), **opts)
    sp = processor(full)
    bad = [k for k, t in enumerate(texts) if sp.encode(t) != want[k]]
    print("llama2-spm: %d texts, python3-sentencepiece on the converted gguf == published ids on %d" %
          (len(texts), len(texts) - len(bad)))
    for k in bad:
        print("  DIFFERENT on text %d %r: %s vs %s" % (k, texts[k][:40], sp.encode(texts[k])[:12], want[k][:12]))
    assert not bad, "the conversion does not reproduce the published ids"
    # trim: special pieces, and pieces that are substrings of a normalised text
    norm = [SP + t.replace(" ", SP) for t in texts if t]
    keep = [i for i, (p, t) in enumerate(zip(toks, types))
            if t in (M.UNKNOWN, M.CONTROL, M.BYTE) or any(p in n for n in norm)]
    new_id = {old: new for new, old in enumerate(keep)}
    small = M.write_model([(toks[i], scores[i], types[i]) for i in keep], **opts)
    sp2 = processor(small)
    mapped = [[new_id[i] for i in w] for w in want]
    assert all(sp2.encode(t) == mapped[k] for k, t in enumerate(texts)), "the trimmed model differs"
    d = os.path.join(DATA, "llama2-spm")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "tokenizer.model"), "wb").write(small)
    write_cases(d, [("tokenizer.model", t, mapped[k]) for k, t in enumerate(texts)])
    print("  trimmed to %d of 32000 pieces (%d bytes); python3-sentencepiece on it == the mapped ids on all %d" %
          (len(keep), len(small), len(texts)))
    print("  ggerganov/llama.cpp commit %s" % rev)


# ---- a trained BPE model and variants ------------------------------------------------------------------
USER = ["<sep>", "[MASK]", "@@", "user_tok"]


def corpus():
    rng = random.Random(7)
    words = ("once upon a time there was a little girl named lily she liked to play outside with her dog max "
             "the sun was shining and the birds were singing happily in the tall green trees near the river "
             "one day they found a big red ball under an old wooden bench and played until it was dark").split()
    lines = []
    for k in range(400):
        w = [rng.choice(words) for _ in range(rng.randint(4, 14))]
        if k % 5 == 0:
            w.insert(rng.randint(0, len(w)), str(rng.randint(0, 99999)))
        if k % 7 == 0:
            w.append(rng.choice(["café", "naïve", "über", "señor", "你好", "世界", "😀", "…"]))
        s = " ".join(w)
        lines.append(s.capitalize() + rng.choice([".", "!", "?", ",", ""]))
    return lines


HARD = [
    "Once upon a time, there was a little girl named Lily.",
    "   leading spaces, trailing spaces   ",
    "whitespace   runs\t\tand\ttabs \t \t and  double  spaces",
    "newlines\nline two\r\nline three\n\n\nafter three newlines\n",
    "digits 0123456789, 3.14159, 2024-12-31, 1,000,000 and 42nd",
    "CJK: 你好，世界。日本語のテキスト 한국어",
    "emoji: 😀👍🏽🚀 family 👨‍👩‍👧 flag 🇫🇷",
    "accents: café, naïve, e\u0301 (combining), ñ, ü, ß, Æ",
    "user symbols: a<sep>b [MASK] the@@dog user_tokuser_tok <sep><sep> x[MASK]y",
    "punctuation !?.,;:'\"()[]{}<>@#$%^&*-_=+\\|/~` ... --- ???",
    "a", " ", "  ", "\n", "\t", "", "▁", " ▁ x ▁▁", "the the the the", "sssssssssssssssssssss",
    "the little dog played with the red ball under the tall green trees",
    "\u00a0non-breaking\u3000ideographic space",
    "<s> and </s> and <unk> as text",
    b"bad \xff\xfe bytes \xc3\x28 stray \x80\x80 cut \xe2\x82 end \xf0\x9f\x98",
    b"overlong \xc0\xaf surrogate \xed\xa0\x80 big \xf4\x90\x80\x80 replacement \xef\xbf\xbd ok",
]


def variant(pieces, **kw):
    base = dict(model_type=M.BPE, byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=True,
                escape_whitespaces=True, treat_whitespace_as_suffix=False)
    base.update(kw)
    return M.write_model(pieces, **base)


def trained():
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=buf, model_type="bpe",
                                   vocab_size=420, byte_fallback=True, user_defined_symbols=USER,
                                   normalization_rule_name="identity", character_coverage=1.0,
                                   minloglevel=2)
    pieces, trainer, normalizer = M.read_model(buf.getvalue())
    assert trainer[3] == M.BPE and trainer.get(35) == 1 and not normalizer.get(2)
    unused = [(p, s, M.UNUSED if t == M.NORMAL and len(p) >= 2 and k % 3 == 0 else t)
              for k, (p, s, t) in enumerate(pieces)]
    no_bytes = [(p, s, M.UNUSED if t == M.BYTE else t) for p, s, t in pieces]
    variants = {
        "bpe.model": variant(pieces),
        "bpe_keep_ws.model": variant(pieces, remove_extra_whitespaces=False),
        "bpe_no_prefix.model": variant(pieces, add_dummy_prefix=False, remove_extra_whitespaces=False),
        "bpe_no_escape.model": variant(pieces, escape_whitespaces=False),
        "bpe_suffix.model": variant(pieces, treat_whitespace_as_suffix=True),
        "bpe_unk.model": variant(no_bytes, byte_fallback=False),
        "bpe_unused.model": variant(unused, remove_extra_whitespaces=False),
    }
    d = os.path.join(DATA, "trained-bpe")
    os.makedirs(d, exist_ok=True)
    cases, total = [], 0
    for name, blob in variants.items():
        open(os.path.join(d, name), "wb").write(blob)
        total += len(blob)
        sp = processor(blob)
        for t in HARD:
            cases.append((name, t, sp.encode(t)))
    write_cases(d, cases)
    print("trained-bpe: %d pieces, %d models (%d bytes), %d cases" % (len(pieces), len(variants), total, len(cases)))


if __name__ == "__main__":
    llama(sys.argv[1] if len(sys.argv) > 1 else "/work/.mirror/ggerganov+llama.cpp/repo")
    trained()
