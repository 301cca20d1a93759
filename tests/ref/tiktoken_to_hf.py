#!/usr/bin/env python3
"""Converts a tiktoken BPE file (one "base64(token bytes) rank" per line, e.g. Qwen's qwen.tiktoken)
into a Hugging Face tokenizer.json with Qwen2's pipeline, and writes Qwen2's tokenizer_config.json
beside it.

  - vocab: each token's bytes written in GPT-2's byte-level alphabet (bytes_to_unicode), id = rank;
  - merges: for every token of two or more bytes, the pair that forms it when its bytes are merged
    by rank with only the tokens of lower rank (the usual tiktoken -> merges conversion,
    "bpe(mergeable_ranks, token, max_rank=rank)"), in the order of the tokens' ranks, so a merge's
    rank is its token's rank less 256 - which is how tiktoken picks the next merge too;
  - added tokens <|endoftext|>, <|im_start|>, <|im_end|> after the last rank (151643..151645 for
    Qwen), special, not normalized;
  - normalizer NFC; pre_tokenizer Sequence[Split(Qwen2's regex, Isolated), ByteLevel(no prefix
    space, no regex)]; model BPE without dropout, unk, byte_fallback or ignore_merges;
    post_processor and decoder ByteLevel (no BOS, no EOS).

A token whose bytes do not come out as exactly two parts would have no merge and could never be
produced by Hugging Face's BPE; the script counts them and stops if there are any.

Usage: tiktoken_to_hf.py FILE.tiktoken OUT_DIR
"""
import base64
import json
import os
import sys

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


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


def bpe_parts(ranks, token, max_rank):
    """token's bytes merged pair by pair, lowest rank first, using only ranks below max_rank."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def main():
    src, out_dir = sys.argv[1:3]
    ranks = {}
    for line in open(src, "rb"):
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    assert sorted(ranks.values()) == list(range(len(ranks))), "ranks are not 0..n-1"
    bc = bytes_to_unicode()

    def name(b):
        return "".join(bc[x] for x in b)

    vocab, merges, bad = {}, [], []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[name(tok)] = rank
        if len(tok) == 1:
            continue
        parts = bpe_parts(ranks, tok, rank)
        if len(parts) != 2:
            bad.append((rank, tok, parts))
            continue
        merges.append(name(parts[0]) + " " + name(parts[1]))
    print("%s: %d tokens (%d single bytes), %d merges, %d tokens without a merge"
          % (src, len(ranks), sum(len(t) == 1 for t in ranks), len(merges), len(bad)))
    for rank, tok, parts in bad[:20]:
        print("  no merge for rank %d %r: %r" % (rank, tok, parts))
    if bad:
        raise SystemExit("tokens without a merge: not a Qwen2-style vocabulary")
    n = len(ranks)
    added = [{"id": n + i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, c in enumerate(SPECIALS)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    j = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": merges},
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "additional_special_tokens": SPECIALS[1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": SPECIALS[0],
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": SPECIALS[0],
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
