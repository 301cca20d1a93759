#!/usr/bin/python3
"""Converts the emotion-classification sets shipped with the official IterIS code
(github.com/HKUST-LongGroup/IterIS-merging, data/Emotion_v2.5/<task>/{train,test}.json: ISEAR, EmoInt, TEC,
Emotion-Cause; public research data sets in Alpaca-style records {"instruction", "output"}) into iteris-mpi's
text JSONL for a small model:
  train:   {"text": "<sentence>\\nFeeling:", "completion": "<label>"}            (the loss is on the label only)
  heldout: {"text": "<sentence>\\nFeeling:", "choices": [labels...], "label": j} (scored by -ensemble)
  calib:   {"text": "<sentence>\\nFeeling: <label>"}                            (unlabelled-style rows for merges)
The instruction's fixed preamble ("Classify the sentiment ... categories:a,b,c:") is cut: the label set is the
task's, in the order listed there. Rows are shuffled with a fixed seed and capped.

usage: make_emotion.py REPO_DIR TASK OUT_DIR [--train 800] [--heldout 200] [--calib 50] [--max-chars 160]
"""
import argparse
import json
import os
import random
import re
import subprocess


def load(repo, task, split):
    path = "data/Emotion_v2.5/%s/%s.json" % (task, split)
    if os.path.isdir(os.path.join(repo, ".git")) or os.path.exists(os.path.join(repo, "HEAD")):
        raw = subprocess.run(["git", "-C", repo, "show", "HEAD:" + path], capture_output=True, check=True).stdout
        return json.loads(raw)
    with open(os.path.join(repo, path)) as f:
        return json.load(f)


def parse(rec):
    m = re.match(r"^Classify the sentiment of the following text into one of these categories:([a-z,]+):(.*)$",
                 rec["instruction"], re.S)
    labels = m.group(1).split(",")
    text = " ".join(m.group(2).replace("\u00e1", " ").split())
    if text.endswith("?"):
        text = text[:-1]
    return text, labels, rec["output"].strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo")
    ap.add_argument("task")
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--calib", type=int, default=50)
    ap.add_argument("--max-chars", type=int, default=160)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(2026)
    for split, n in (("train", a.train), ("test", a.heldout)):
        rows = [parse(r) for r in load(a.repo, a.task, split)]
        rows = [r for r in rows if 0 < len(r[0]) <= a.max_chars and r[2] in r[1]]
        rng.shuffle(rows)
        if split == "train":
            with open(os.path.join(a.out, "train.jsonl"), "w") as f:
                for text, labels, y in rows[:n]:
                    f.write(json.dumps({"text": text + "\nFeeling:", "completion": y}) + "\n")
            with open(os.path.join(a.out, "calib.jsonl"), "w") as f:
                for text, labels, y in rows[n:n + a.calib]:
                    f.write(json.dumps({"text": text + "\nFeeling: " + y}) + "\n")
        else:
            with open(os.path.join(a.out, "heldout.jsonl"), "w") as f:
                for text, labels, y in rows[:n]:
                    f.write(json.dumps({"text": text + "\nFeeling:", "choices": labels, "label": labels.index(y)}) + "\n")


if __name__ == "__main__":
    main()
