#!/usr/bin/env python3
"""Independent reference for Hugging Face tokenizer.json BPE encoding (the `tokenizers` crate's
Tokenizer.encode), in plain Python with the `regex` module (Debian's python3-regex). It shares no
code with src/io/tokenizer_json.c and is written the slow, obvious way:

  - added tokens: one regex alternation of the escaped contents, longest first (so the leftmost
    match is the longest there), first over the raw text for tokens with normalized=false, then
    over each normalized piece for the others; lstrip/rstrip take the white space around;
  - normalizers: Sequence, Prepend (non-empty pieces), Replace (String), NFC/NFD/NFKC/NFKD
    (unicodedata);
  - pre-tokenizers: Sequence, Split (Regex or String; Isolated/Removed/MergedWith*), ByteLevel
    (GPT-2 regex when use_regex, add_prefix_space, bytes_to_unicode), Metaspace (replacement,
    prepend_scheme always/first/never, split);
  - BPE: ignore_merges, byte_fallback (<0xXX>), unk_token/fuse_unk, then repeatedly the adjacent
    pair with the lowest merge rank (the leftmost on equal rank), rescanning the whole word each
    time (O(n^2));
  - post_processor TemplateProcessing / Sequence / ByteLevel when --special, with
    tokenizer_config.json's add_bos_token / add_eos_token.

Oniguruma's \\s (which the crate uses) is Unicode White_Space; so is the regex module's.

Usage:
  hf_bpe_ref.py TOKENIZER.json IN.jsonl OUT.jsonl [--special]
      every {"text": ...} line of IN -> {"input_ids": [...]} in OUT
  hf_bpe_ref.py TOKENIZER.json --llamacpp INP OUT
      llama.cpp's test vectors (texts separated by "\\n__ggml_vocab_test__\\n", ids one line per
      text, made with add_special_tokens=False): prints each mismatch, exits 1 on any
"""
import json
import os
import sys
import unicodedata

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_CHAR = bytes_to_unicode()


class Tokenizer:
    def __init__(self, path):
        j = json.load(open(path, encoding="utf-8"))
        m = j["model"]
        assert m.get("type", "BPE") == "BPE"
        self.vocab = m["vocab"]
        self.ranks = {}
        for i, mg in enumerate(m.get("merges") or []):
            a, b = mg.split(" ") if isinstance(mg, str) else mg
            self.ranks[(a, b)] = i
        self.byte_fallback = bool(m.get("byte_fallback"))
        self.fuse_unk = bool(m.get("fuse_unk"))
        self.ignore_merges = bool(m.get("ignore_merges"))
        self.unk = m.get("unk_token")
        self.added = j.get("added_tokens") or []
        self.normalizers = self._flatten(j.get("normalizer"), "normalizers")
        self.pre = self._flatten(j.get("pre_tokenizer"), "pretokenizers")
        self.prefix, self.suffix = [], []
        for p in self._flatten(j.get("post_processor"), "processors"):
            if p["type"] == "TemplateProcessing":
                seen = False
                for e in p["single"]:
                    if "Sequence" in e:
                        seen = True
                    else:
                        ids = p["special_tokens"][e["SpecialToken"]["id"]]["ids"]
                        (self.suffix if seen else self.prefix).extend(ids)
            elif p["type"] in ("RobertaProcessing", "BertProcessing"):
                self.prefix.append(p["cls"][1])
                self.suffix.append(p["sep"][1])
        self.bos = self.prefix[0] if self.prefix else None
        self.eos = self.suffix[-1] if self.suffix else None
        cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
        if os.path.exists(cfg):
            c = json.load(open(cfg, encoding="utf-8"))
            ids = {a["content"]: a["id"] for a in self.added}

            def tok(k):
                v = c.get(k)
                if isinstance(v, dict):
                    v = v.get("content")
                return None if v is None else ids.get(v, self.vocab.get(v))

            self.bos = tok("bos_token") if tok("bos_token") is not None else self.bos
            self.eos = tok("eos_token") if tok("eos_token") is not None else self.eos
            if c.get("add_bos_token") is True and self.bos not in self.prefix:
                self.prefix.insert(0, self.bos)
            if c.get("add_bos_token") is False:
                self.prefix = [x for x in self.prefix if x != self.bos]
            if c.get("add_eos_token") is True and self.eos not in self.suffix:
                self.suffix.append(self.eos)
            if c.get("add_eos_token") is False:
                self.suffix = [x for x in self.suffix if x != self.eos]

    @staticmethod
    def _flatten(x, key):
        if x is None:
            return []
        if x["type"] == "Sequence":
            return [y for e in x[key] for y in Tokenizer._flatten(e, key)]
        return [x]

    # ---- added tokens
    def _split_added(self, text, normalized):
        toks = [a for a in self.added if bool(a.get("normalized", not a.get("special"))) == normalized]
        if not toks or not text:
            return [(text, None)] if text else []
        toks.sort(key=lambda a: -len(a["content"]))
        by = {a["content"]: a for a in toks}
        rx = regex.compile("|".join(regex.escape(a["content"]) for a in toks))
        out, last = [], 0
        for mt in rx.finditer(text):
            a = by[mt.group(0)]
            s, e = mt.start(), mt.end()
            if a.get("single_word"):
                if (s > 0 and regex.search(r"\w$", text[:s])) or (e < len(text) and regex.match(r"\w", text[e:])):
                    continue
            if a.get("lstrip"):
                while s > last and text[s - 1].isspace():
                    s -= 1
            if a.get("rstrip"):
                while e < len(text) and text[e].isspace():
                    e += 1
            if s > last:
                out.append((text[last:s], None))
            out.append((None, a["id"]))
            last = e
        if last < len(text):
            out.append((text[last:], None))
        return out

    # ---- normalizers
    def _normalize(self, s):
        for n in self.normalizers:
            t = n["type"]
            if t == "Prepend":
                s = n["prepend"] + s if s else s
            elif t == "Replace":
                s = s.replace(n["pattern"]["String"], n["content"])
            elif t in ("NFC", "NFD", "NFKC", "NFKD"):
                s = unicodedata.normalize(t, s)
            else:
                raise SystemExit("normalizer %s not in the reference" % t)
        return s

    # ---- pre-tokenizers: lists of (string, starts at offset 0)
    @staticmethod
    def _split(pieces, rx, behavior):
        out = []
        for s, first in pieces:
            bounds = [(m.start(), m.end()) for m in rx.finditer(s) if m.end() > m.start()]
            parts, prev = [], 0
            if behavior == "Isolated":
                for a, b in bounds:
                    parts += [(prev, a), (a, b)]
                    prev = b
                parts.append((prev, len(s)))
            elif behavior == "Removed":
                for a, b in bounds:
                    parts.append((prev, a))
                    prev = b
                parts.append((prev, len(s)))
            elif behavior == "MergedWithPrevious":
                for a, b in bounds:
                    parts.append((prev, b))
                    prev = b
                parts.append((prev, len(s)))
            elif behavior == "MergedWithNext":
                for a, b in bounds:
                    parts.append((prev, a))
                    prev = a
                parts.append((prev, len(s)))
            out += [(s[a:b], first and a == 0) for a, b in parts if b > a]
        return out

    def _pretokenize(self, s, first):
        pieces = [(s, first)] if s else []
        for p in self.pre:
            t = p["type"]
            if t == "Split":
                pat = p["pattern"]
                rx = regex.compile(pat["Regex"]) if "Regex" in pat else regex.compile(regex.escape(pat["String"]))
                assert not p.get("invert")
                pieces = self._split(pieces, rx, p["behavior"])
            elif t == "ByteLevel":
                if p.get("add_prefix_space", True):
                    pieces = [(x if x.startswith(" ") else " " + x, f) for x, f in pieces]
                if p.get("use_regex", True):
                    pieces = self._split(pieces, regex.compile(GPT2_PATTERN), "Isolated")
                pieces = [("".join(BYTE_CHAR[b] for b in x.encode("utf-8")), f) for x, f in pieces]
            elif t == "Metaspace":
                r = p["replacement"]
                scheme = p.get("prepend_scheme") or ("always" if p.get("add_prefix_space", True) else "never")
                new = []
                for x, f in pieces:
                    x = x.replace(" ", r)
                    if not x.startswith(r) and (scheme == "always" or (scheme == "first" and f)):
                        x = r + x
                    if p.get("split", True):
                        cut = [0] + [i for i in range(1, len(x)) if x[i] == r] + [len(x)]
                        new += [(x[a:b], f and a == 0) for a, b in zip(cut, cut[1:]) if b > a]
                    else:
                        new.append((x, f))
                pieces = new
            else:
                raise SystemExit("pre-tokenizer %s not in the reference" % t)
        return [x for x, _ in pieces if x]

    # ---- the model
    def _bpe(self, w):
        if self.ignore_merges and w in self.vocab:
            return [self.vocab[w]]
        syms = []  # strings
        unk = None
        for ch in w:
            if ch in self.vocab:
                if unk is not None:
                    syms.append(unk)
                    unk = None
                syms.append(ch)
            else:
                fb = ["<0x%02X>" % b for b in ch.encode("utf-8")]
                if self.byte_fallback and all(f in self.vocab for f in fb):
                    syms += fb
                    continue
                if self.unk is not None:
                    if unk is not None and not self.fuse_unk:
                        syms.append(unk)
                    unk = self.unk
        if unk is not None:
            syms.append(unk)
        while True:
            best = None
            for i in range(len(syms) - 1):
                r = self.ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            syms[i:i + 2] = [syms[i] + syms[i + 1]]
        return [self.vocab[s] for s in syms]

    def units(self, text):
        """The text as added-token ids (int) and pre-tokens (str, in the model's alphabet)."""
        for i, (piece, tid) in enumerate(self._split_added(text, False)):
            if tid is not None:
                yield tid
                continue
            first = i == 0
            for j, (p2, t2) in enumerate(self._split_added(self._normalize(piece), True)):
                if t2 is not None:
                    yield t2
                    continue
                yield from self._pretokenize(p2, first and j == 0)

    def encode(self, text, special=False):
        ids = list(self.prefix) if special else []
        for u in self.units(text):
            ids += [u] if isinstance(u, int) else self._bpe(u)
        if special:
            ids += self.suffix
        return ids


def main():
    tok = Tokenizer(sys.argv[1])
    if sys.argv[2] == "--llamacpp":
        texts = open(sys.argv[3], encoding="utf-8").read().split("\n__ggml_vocab_test__\n")
        if texts and texts[-1] == "":
            texts = texts[:-1]
        want = [[int(x) for x in l.split()] for l in open(sys.argv[4]).read().split("\n")][:len(texts)]
        bad = 0
        for t, w in zip(texts, want):
            g = tok.encode(t)
            if g != w:
                bad += 1
                print("MISMATCH %r: reference %s, llama.cpp's file %s" % (t[:40], g[:12], w[:12]))
        print("%d of %d texts match" % (len(texts) - bad, len(texts)))
        sys.exit(1 if bad else 0)
    special = "--special" in sys.argv[4:]
    with open(sys.argv[3], "w", encoding="utf-8") as f:
        for line in open(sys.argv[2], encoding="utf-8"):
            text = json.loads(line)["text"]
            f.write(json.dumps({"input_ids": tok.encode(text, special)}) + "\n")


if __name__ == "__main__":
    main()
