"""Training records for the `docstring2code` task, for `deltaserve finetune` on the demo base.

The demo's own training records (scripts/demo/train_family.py) came from the site-packages of the
training machine, which this machine does not have; this script builds records the same way
(train_family.extract_functions + make_task, same filters and prompt) from the Python standard
library here (/usr/lib/python3.X), drops any record whose function also appears in the held-out
set, shuffles with a fixed seed and keeps --n of them.

    python3 scripts/demo/make_finetune_data.py --n 2000 --out .work/finetune/docstring2code_train.jsonl
"""
import argparse
import json
import os
import random
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_family as tf  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--heldout", default="assets/demo/data/docstring2code_heldout.jsonl")
    a = ap.parse_args()
    root = sysconfig.get_paths()["stdlib"]
    held = set()
    with open(a.heldout) as f:
        for line in f:
            held.add(json.loads(line)["messages"][1]["content"])
    rels = []
    for d, _, files in os.walk(root):
        if "site-packages" in d or "/test" in d:
            continue
        for fn in files:
            if fn.endswith(".py"):
                rels.append(os.path.relpath(os.path.join(d, fn), root))
    rels.sort()
    recs = []
    for rel in rels:
        _, fns = tf.extract_functions((root, rel))
        for fn in fns:
            r = tf.make_task("docstring2code", fn)
            if r and r["messages"][1]["content"] not in held:
                recs.append(r)
    random.Random(a.seed).shuffle(recs)
    recs = recs[: a.n]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    print(f"{len(recs)} records from {len(rels)} files under {root} -> {a.out}")


if __name__ == "__main__":
    main()
