#!/usr/bin/env python3
"""Train deltaserve's demo model family: one small Llama base + three full fine-tunes.

Everything is derived from the Python packages installed in the running interpreter's
site-packages (source + docs), the script, and --seed.

Phases (run in order; both are needed):
  pretrain   corpus scan, train/held-out split, tokenizer, base pretraining, data samples
             -> <out>/base/, <out>/data/, <out>/pretrain_info.json
  finetune   task extraction, three fine-tunes (docstring2code, code2docstring, complete),
             transformers evaluation of every model -> <out>/<task>/ or <full-out>/<task>/,
             <out>/eval.json, <out>/README.md

--smoke runs the same code at toy size (into --out, normally a temp dir) to fail fast.

Example (what produced assets/demo; see assets/demo/README.md for the exact commands):
  python3 scripts/demo/train_family.py --phase pretrain --out assets/demo --seed 0
  python3 scripts/demo/train_family.py --phase finetune --out assets/demo --full-out .work/demo_full --seed 0
"""
import argparse
import ast
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import shlex
import sys
import sysconfig
import time

import numpy as np

SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
EOT, USER, ASSISTANT, END = 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
TASKS = ["docstring2code", "code2docstring", "complete"]
COMMITTED_TASKS = ["docstring2code"]  # full checkpoints committed under assets/demo/
PROMPTS = {
    "docstring2code": "Implement this Python function:\n\n",
    "code2docstring": "Write the docstring for this Python function:\n\n",
    "complete": "Complete this Python function:\n\n",
}
EXTS = (".py", ".md", ".rst", ".txt")
HELDOUT_PER_MILLE = 50  # ~5% of files held out
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def sha(s):
    return hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()


def is_heldout(relpath):
    return int(sha("split:" + relpath)[:8], 16) % 1000 < HELDOUT_PER_MILLE


def render_chat(messages, add_generation_prompt=False):
    """Python twin of CHAT_TEMPLATE (checked against transformers' renderer at start-up)."""
    s = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    return s + ("<|assistant|>\n" if add_generation_prompt else "")


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def settings(smoke):
    if smoke:
        return dict(train_cap=3_000_000, heldout_cap=1_500_000, tok_cap=1_000_000, vocab=1024,
                    hidden=64, layers=2, heads=4, kv=2, inter=192, seq=128, batch=8,
                    pt_steps=None, pt_warmup=5, pt_eval_every=40, ft_steps=None, ft_warmup=2, pt_min=100, ft_min=60,
                    ft_batch=4, ft_seq=512, sample_bytes=20_000, n_heldout_tasks=20,
                    train_tasks_cap=2000, eval_windows=4, code_stride=256, code_len=512)
    return dict(train_cap=150_000_000, heldout_cap=15_000_000, tok_cap=24_000_000, vocab=8192,
                hidden=256, layers=6, heads=8, kv=4, inter=768, seq=512, batch=64,
                pt_steps=None, pt_warmup=300, pt_eval_every=500, ft_steps=1000, ft_warmup=50, pt_min=500, ft_min=100,
                ft_batch=32, ft_seq=512, sample_bytes=200_000, n_heldout_tasks=300,
                train_tasks_cap=60_000, eval_windows=64, code_stride=256, code_len=512)


# ----------------------------------------------------------------------------------------------
# corpus: site-packages files, distributions, licenses
# ----------------------------------------------------------------------------------------------
PERMISSIVE = re.compile(r"\bMIT\b|BSD|Apache|\bPSF\b|Python Software Foundation|Python-2\.0", re.I)
RESTRICTIVE = re.compile(
    r"GPL|\bISC\b|Mozilla|\bMPL|\bEPL\b|Eclipse|CDDL|Proprietary|Commercial|NVIDIA|Other/|UNKNOWN|"
    r"LicenseRef|SSPL|BUSL|Business Source|non-?commercial|CC-BY-NC|Artistic", re.I)


def site_packages_root():
    root = sysconfig.get_paths()["purelib"]
    return os.path.realpath(root)


def parse_metadata(path):
    name = version = lic = expr = None
    classifiers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line in ("\n", "\r\n"):
                    break  # headers end; body follows
                if line.startswith("Name:"):
                    name = line[5:].strip()
                elif line.startswith("Version:"):
                    version = line[8:].strip()
                elif line.startswith("License-Expression:"):
                    expr = line[19:].strip()
                elif line.startswith("License:"):
                    lic = line[8:].strip()
                    if lic.upper() in ("UNKNOWN", "NONE"):
                        lic = None
                elif line.startswith("Classifier: License ::"):
                    classifiers.append(line[len("Classifier: License ::"):].strip())
    except OSError:
        pass
    parts = []
    if expr:
        parts.append(expr)
    if lic:
        parts.append(lic[:120])
    parts += [c.split("::")[-1].strip() for c in classifiers]
    text = " | ".join(dict.fromkeys(p for p in parts if p))
    permissive = bool(text) and bool(PERMISSIVE.search(text)) and not RESTRICTIVE.search(text)
    return dict(name=name, version=version, license=text or "not declared", permissive=permissive)


def scan_distributions(root):
    """Map relative file path -> distribution dict, from every *.dist-info/RECORD."""
    dists, owner = {}, {}
    for entry in sorted(os.listdir(root)):
        if not entry.endswith(".dist-info"):
            continue
        d = os.path.join(root, entry)
        md = parse_metadata(os.path.join(d, "METADATA"))
        if not md["name"]:
            continue
        key = md["name"]
        dists[key] = md
        rec = os.path.join(d, "RECORD")
        tops = set()
        if os.path.exists(rec):
            with open(rec, encoding="utf-8", errors="replace") as f:
                for line in f:
                    p = line.rsplit(",", 2)[0]
                    if p and not p.startswith(".."):
                        owner.setdefault(os.path.normpath(p), key)
                        tops.add(p.split("/")[0])
        tl = os.path.join(d, "top_level.txt")
        if os.path.exists(tl):
            tops |= set(open(tl).read().split())
        md["tops"] = sorted(t for t in tops if not t.endswith(".dist-info"))
    top_owner = {}
    for k, md in dists.items():
        for t in md["tops"]:
            top_owner.setdefault(t, k)
    return dists, owner, top_owner


def list_candidates(root):
    out = []
    for dp, dn, fn in os.walk(root):
        dn[:] = sorted(x for x in dn if x != "__pycache__" and not x.endswith((".dist-info", ".egg-info")))
        for f in sorted(fn):
            if not f.endswith(EXTS):
                continue
            p = os.path.join(dp, f)
            try:
                sz = os.path.getsize(p)
            except OSError:
                continue
            if 200 <= sz <= 200_000:
                out.append(os.path.relpath(p, root))
    return out


def read_text(root, rel):
    try:
        with open(os.path.join(root, rel), "rb") as f:
            b = f.read()
        t = b.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "\x00" in t or not t.strip():
        return None
    lines = t.splitlines()
    if not lines or max(len(x) for x in lines) > 1000 or len(t) / len(lines) > 200:
        return None  # minified / data-like
    return t


def has_special(t):
    return any(s in t for s in SPECIALS)


def build_corpus(S, seed):
    root = site_packages_root()
    dists, owner, top_owner = scan_distributions(root)
    cands = list_candidates(root)
    log(f"site-packages {root}: {len(dists)} distributions, {len(cands)} candidate files")

    def dist_of(rel):
        k = owner.get(os.path.normpath(rel)) or top_owner.get(rel.split("/")[0])
        return k

    train_c = sorted((c for c in cands if not is_heldout(c)), key=lambda r: sha(f"order:{seed}:{r}"))
    held_c = sorted((c for c in cands if is_heldout(c)), key=lambda r: sha("heldout-order:" + r))
    seen = set()
    train, held = [], []
    total = 0
    for rel in train_c:
        if total >= S["train_cap"]:
            break
        t = read_text(root, rel)
        if t is None:
            continue
        h = sha(t)
        if h in seen:
            continue
        seen.add(h)
        train.append((rel, t))
        total += len(t.encode())
    ttotal = total
    total = 0
    for rel in held_c:
        if total >= S["heldout_cap"]:
            break
        t = read_text(root, rel)
        if t is None:
            continue
        h = sha(t)
        if h in seen:  # identical copy of a training file (vendored duplicates)
            continue
        seen.add(h)
        held.append((rel, t))
        total += len(t.encode())
    log(f"train: {len(train)} files {ttotal/1e6:.1f} MB; held-out: {len(held)} files {total/1e6:.1f} MB "
        f"(of {len(train_c)}/{len(held_c)} candidates)")
    return dict(root=root, dists=dists, dist_of=dist_of, train=train, held=held,
                n_candidates=len(cands), train_bytes=ttotal, held_bytes=total)


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
def train_tokenizer(texts, vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    return tok


def tokenizer_config(max_len):
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, s in enumerate(SPECIALS)}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
            "additional_special_tokens": ["<|user|>", "<|assistant|>"], "bos_token": None,
            "eos_token": "<|end|>", "pad_token": "<|endoftext|>", "unk_token": None,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": max_len, "chat_template": CHAT_TEMPLATE}


def generation_config():
    return {"_from_model_config": False, "bos_token_id": None, "eos_token_id": [END, EOT],
            "pad_token_id": EOT, "do_sample": False, "max_new_tokens": 256}


def write_model_dir(model, tok_json_path, d, max_len):
    import shutil

    import torch

    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    model.to(torch.bfloat16).save_pretrained(d)  # transformers 5 always writes safetensors
    shutil.copyfile(tok_json_path, os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(max_len), f, indent=2)
        f.write("\n")
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump(generation_config(), f, indent=2)
        f.write("\n")


def check_chat_template(tok_dir):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tok_dir, "tokenizer.json"),
                                 eos_token="<|end|>", pad_token="<|endoftext|>", bos_token=None,
                                 chat_template=CHAT_TEMPLATE)
    msgs = [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"}]
    for agp in (False, True):
        got = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
        assert got == render_chat(msgs, agp), (got, render_chat(msgs, agp))


# ----------------------------------------------------------------------------------------------
# function extraction (ast) -> chat tasks
# ----------------------------------------------------------------------------------------------
def _strip_indent(lines, n):
    out = []
    for ln in lines:
        if ln.strip() == "":
            out.append(ln.lstrip(" \t") if ln.endswith("\n") else ln.strip())
            continue
        if not ln[:n].isspace() and n > 0:
            return None
        out.append(ln[n:])
    return out


def extract_functions(args):
    root, rel = args
    if not rel.endswith(".py"):
        return rel, []
    t = read_text(root, rel)
    if t is None or has_special(t):
        return rel, []
    try:
        tree = ast.parse(t)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return rel, []
    lines = t.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if len(body) < 2 or not isinstance(body[0], ast.Expr):
            continue
        c = body[0].value
        if not (isinstance(c, ast.Constant) and isinstance(c.value, str)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc or len(doc) < 20 or len(doc) > 1200:
            continue
        start, end = node.lineno - 1, node.end_lineno
        d0, d1 = body[0].lineno - 1, body[0].end_lineno
        if d0 <= start or body[1].lineno - 1 < d1:
            continue  # docstring on the def line, or code on the docstring's last line
        if lines[start][:node.col_offset].strip():
            continue
        if lines[d0][:body[0].col_offset].strip():
            continue
        ind = node.col_offset
        header = _strip_indent(lines[start:d0], ind)
        docl = _strip_indent(lines[d0:d1], ind)
        rest = _strip_indent(lines[d1:end], ind)
        if header is None or docl is None or rest is None:
            continue
        src = "".join(header + docl + rest).rstrip()
        if len(src) > 1600 or len(src) < 80 or len([x for x in rest if x.strip()]) < 2:
            continue
        out.append(dict(rel=rel, header="".join(header), doc_src="".join(docl),
                        rest="".join(rest).rstrip(), doc=doc, src=src))
    return rel, out


def extract_hashes(args):
    rel, fns = extract_functions(args)
    return rel, [sha(f["src"]) for f in fns]


def make_task(task, fn):
    if task == "docstring2code":
        u = PROMPTS[task] + (fn["header"] + fn["doc_src"]).rstrip()
        a = fn["src"]
    elif task == "code2docstring":
        u = PROMPTS[task] + (fn["header"] + fn["rest"]).rstrip()
        a = fn["doc"]
    else:
        ls = fn["src"].split("\n")
        if len(ls) < 6:
            return None
        k = len(ls) // 2
        u = PROMPTS[task] + "\n".join(ls[:k])
        a = "\n".join(ls[k:])
    return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}


def extract_all(pool, root, rels):
    res = {}
    for rel, fns in pool.imap_unordered(extract_functions, [(root, r) for r in rels], chunksize=16):
        res[rel] = fns
    # deterministic order: by relpath, then source position
    funcs = []
    for rel in sorted(res):
        funcs.extend(res[rel])
    return funcs


def encode_chat(tok, records, max_len):
    """-> list of (ids np.int32, start, stop): targets are ids[start:stop] = tokens after the last
    <|assistant|> up to and including the closing <|end|>."""
    texts = [render_chat(r["messages"]) for r in records]
    out = []
    for enc in tok.encode_batch_fast(texts):
        ids = np.asarray(enc.ids, dtype=np.int32)
        if len(ids) > max_len:
            out.append(None)
            continue
        a = int(np.where(ids == ASSISTANT)[0][-1])
        e = int(np.where(ids == END)[0][-1])
        assert e > a + 1
        out.append((ids, a + 1, e + 1))
    return out


# ----------------------------------------------------------------------------------------------
# torch helpers
# ----------------------------------------------------------------------------------------------
def make_config(S):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=S["vocab"], hidden_size=S["hidden"], num_hidden_layers=S["layers"],
                       num_attention_heads=S["heads"], num_key_value_heads=S["kv"],
                       intermediate_size=S["inter"], tie_word_embeddings=True,
                       max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5,
                       initializer_range=0.02, bos_token_id=None, eos_token_id=END, pad_token_id=EOT,
                       hidden_act="silu", attention_bias=False, mlp_bias=False)


def lr_at(step, total, warmup, peak, floor_frac):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def param_groups(model, wd):
    dec, nodec = [], []
    for n, p in model.named_parameters():
        (dec if p.ndim >= 2 and "embed" not in n else nodec).append(p)
    return [{"params": dec, "weight_decay": wd}, {"params": nodec, "weight_decay": 0.0}]


def ppl_hf_guide(model, ids, max_length, stride, device):
    """Hugging Face perplexity-guide loop (token-counting version); batch 1; see MANIFEST of
    tests/fixtures for the exact weighting.  Returns (ppl, n_tokens)."""
    import torch

    enc = torch.as_tensor(ids, dtype=torch.long, device=device).view(1, -1)
    seq_len = enc.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = enc[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            nll = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += nll.double() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp((nll_sum / n_tokens).item()), n_tokens


def chat_ppl(model, encoded, device, batch=16):
    """Assistant-token perplexity: exp(sum nll / count) over all records, targets as encode_chat."""
    import torch
    import torch.nn.functional as F

    tot, cnt = 0.0, 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    for b in range(0, len(order), batch):
        items = [encoded[i] for i in order[b:b + batch]]
        L = max(len(x[0]) for x in items)
        ids = torch.zeros((len(items), L), dtype=torch.long)
        lab = torch.full((len(items), L), -100, dtype=torch.long)
        for j, (x, s, e) in enumerate(items):
            ids[j, :len(x)] = torch.from_numpy(x.astype(np.int64))
            lab[j, s:e] = ids[j, s:e]
        ids, lab = ids.to(device), lab.to(device)
        with torch.no_grad():
            logits = model(ids).logits.float()  # right padding + causal mask: pads never seen
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), lab[:, 1:].reshape(-1),
                              ignore_index=-100, reduction="sum")
        tot += nll.double().item()
        cnt += int((lab[:, 1:] != -100).sum().item())
    return math.exp(tot / cnt), cnt


# ----------------------------------------------------------------------------------------------
# phase 1: corpus, tokenizer, data samples, base pretraining
# ----------------------------------------------------------------------------------------------
def write_jsonl(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def pick_sample(files, C, cap, key):
    out, total = [], 0
    for rel, t in sorted(files, key=lambda x: sha(key + x[0])):
        if not rel.endswith(".py") or has_special(t):
            continue
        k = C["dist_of"](rel)
        if not k or not C["dists"][k]["permissive"]:
            continue
        n = len(t.encode())
        if n < 1000 or n > 20_000:
            continue
        if total + n > cap:
            continue
        out.append((rel, t))
        total += n
        if total > cap * 0.97:
            break
    return out


def phase_pretrain(args, S):
    import torch

    out = args.out
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    C = build_corpus(S, args.seed)
    # the pool forks before CUDA is initialised
    pool = mp.get_context("fork").Pool(max(2, (os.cpu_count() or 4) - 2))
    train_fn_async = pool.map_async(extract_hashes, [(C["root"], r) for r, _ in C["train"]], chunksize=16)
    held_fn_async = pool.map_async(extract_functions, [(C["root"], r) for r, _ in C["held"]], chunksize=16)

    # tokenizer
    tok_texts, n = [], 0
    for _, t in C["train"]:
        tok_texts.append(t)
        n += len(t)
        if n >= S["tok_cap"]:
            break
    tok = train_tokenizer(tok_texts, S["vocab"])
    tok_path = os.path.join(out, "tokenizer.json.tmp")
    tok.save(tok_path)
    log(f"tokenizer: vocab {tok.get_vocab_size()} trained on {n/1e6:.1f} M chars")

    def encode_stream(texts):
        chunks = []
        for i in range(0, len(texts), 2000):
            for e in tok.encode_batch_fast(texts[i:i + 2000]):
                chunks.append(np.asarray(e.ids, dtype=np.int32))
                chunks.append(np.array([EOT], dtype=np.int32))
        return np.concatenate(chunks)

    train_ids = encode_stream([t for _, t in C["train"]])
    held_py = [t for r, t in C["held"] if r.endswith(".py")]
    held_ids = encode_stream(held_py)
    log(f"tokens: train {len(train_ids)/1e6:.2f} M, held-out .py {len(held_ids)/1e6:.2f} M "
        f"({C['train_bytes']/len(train_ids):.2f} bytes/token)")

    # data samples (permissive licenses only)
    held_sample = pick_sample(C["held"], C, S["sample_bytes"], "sample-heldout:")
    calib_sample = pick_sample(C["train"], C, S["sample_bytes"], "sample-calib:")
    for name, smp in (("heldout_code.txt", held_sample), ("calib.txt", calib_sample)):
        with open(os.path.join(data, name), "w", encoding="utf-8") as f:
            f.write("\n\n".join(t.rstrip("\n") for _, t in smp) + "\n")

    # held-out chat tasks (permissive licenses only), deduplicated against training functions
    train_src = {h for _, hs in train_fn_async.get() for h in hs}
    n_train_funcs = sum(len(hs) for _, hs in train_fn_async.get())
    held_funcs = [f for _, fs in held_fn_async.get() for f in fs]
    pool.close()
    held_ok, seen = [], set()
    for f in sorted(held_funcs, key=lambda f: sha("task:" + f["src"])):
        h = sha(f["src"])
        k = C["dist_of"](f["rel"])
        if h in train_src or h in seen or not k or not C["dists"][k]["permissive"]:
            continue
        seen.add(h)
        held_ok.append(f)
    log(f"functions with docstrings: train {n_train_funcs}, held-out {len(held_funcs)} "
        f"({len(held_ok)} usable: permissive, not in train)")
    task_sources = {}
    for task in TASKS:
        recs, srcs = [], []
        for f in held_ok:
            r = make_task(task, f)
            if r is None:
                continue
            ids = tok.encode(render_chat(r["messages"])).ids
            if len(ids) > S["ft_seq"]:
                continue
            recs.append(r)
            srcs.append(f["rel"])
            if len(recs) >= S["n_heldout_tasks"]:
                break
        write_jsonl(os.path.join(data, f"{task}_heldout.jsonl"), recs)
        task_sources[task] = srcs
        log(f"{task}: {len(recs)} held-out records")

    write_notice(data, C, {"heldout_code.txt": [r for r, _ in held_sample],
                           "calib.txt": [r for r, _ in calib_sample],
                           **{f"{t}_heldout.jsonl": task_sources[t] for t in TASKS}})

    # ---------------- pretraining ----------------
    dev = "cuda"
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    from transformers import LlamaForCausalLM

    cfg = make_config(S)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").to(dev)
    model.train()
    nparams = sum(p.numel() for p in model.parameters())
    log(f"base model: {nparams/1e6:.3f} M parameters")
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=args.pt_lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=True)
    stream = torch.from_numpy(train_ids.astype(np.int64)).to(dev)
    hstream = torch.from_numpy(held_ids.astype(np.int64)).to(dev)
    T, B = S["seq"], S["batch"]
    g = torch.Generator(device=dev).manual_seed(args.seed)
    ar = torch.arange(T + 1, device=dev)
    heval_g = torch.Generator(device=dev).manual_seed(12345)
    hoff = torch.randint(0, len(hstream) - T - 1, (S["eval_windows"],), generator=heval_g, device=dev)
    hbatch = hstream[hoff[:, None] + ar]

    def heldout_ppl():
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            tot = 0.0
            for i in range(0, len(hbatch), 16):
                x = hbatch[i:i + 16]
                lg = model(x[:, :-1]).logits.float()
                tot += torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)),
                                                         x[:, 1:].reshape(-1), reduction="sum").item()
        model.train()
        return math.exp(tot / (hbatch.size(0) * T))

    total = args.pretrain_steps or S["pt_steps"]
    budget = args.pretrain_seconds
    curve = []
    t_start = time.time()
    step = 0
    t_cal = None
    while True:
        if total is not None and step >= total:
            break
        if args.deadline_seconds and time.time() - T0 > args.deadline_seconds:
            log(f"WARNING: deadline hit at step {step}; stopping early")
            break
        if step == 10:
            torch.cuda.synchronize()
            t_cal = time.time()
        if total is None and step == 60:
            torch.cuda.synchronize()
            dt = (time.time() - t_cal) / 50
            remaining = budget - (time.time() - t_start)
            if args.deadline_seconds:  # leave ~30 s after training for saving / writing
                remaining = min(remaining, args.deadline_seconds - (time.time() - T0) - 30)
            total = int(60 + remaining / (dt * 1.04))  # ~4% for held-out evals
            total = max(S["pt_min"], min(40_000, total // 100 * 100))
            log(f"step time {dt*1000:.1f} ms -> pretraining steps fixed at {total} "
                f"(reproduce with --pretrain-steps {total})")
        lr = lr_at(step, total or 10**9, S["pt_warmup"], args.pt_lr, 0.1)
        for gr in opt.param_groups:
            gr["lr"] = lr
        off = torch.randint(0, len(stream) - T - 1, (B,), generator=g, device=dev)
        x = stream[off[:, None] + ar]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lg = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(lg.float().reshape(-1, lg.size(-1)), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % S["pt_eval_every"] == 0 or step == total:
            hp = heldout_ppl()
            curve.append({"step": step, "train_loss": round(loss.item(), 4), "heldout_ppl": round(hp, 3),
                          "lr": lr, "seconds": round(time.time() - t_start, 1)})
            log(f"step {step}/{total} loss {loss.item():.4f} held-out ppl {hp:.3f} lr {lr:.2e}")
    torch.cuda.synchronize()
    pt_time = time.time() - t_start
    log(f"pretraining done: {step} steps in {pt_time:.1f}s ({step*B*T/pt_time/1e6:.2f} M tok/s)")

    base_dir = os.path.join(out, "base")
    write_model_dir(model, tok_path, base_dir, 1024)
    os.remove(tok_path)
    check_chat_template(base_dir)
    info = {
        "seed": args.seed,
        "command": "python3 " + shlex.join(sys.argv),
        "reproduce_command": "python3 " + shlex.join(
            strip_opt(sys.argv, "--deadline-seconds") + ([] if args.pretrain_steps else ["--pretrain-steps", str(total)])),
        "versions": versions(),
        "gpu": torch.cuda.get_device_name(0),
        "site_packages": C["root"],
        "corpus": {"candidate_files": C["n_candidates"], "train_files": len(C["train"]),
                   "train_bytes": C["train_bytes"], "train_tokens": int(len(train_ids)),
                   "heldout_files": len(C["held"]), "heldout_bytes": C["held_bytes"],
                   "heldout_py_tokens": int(len(held_ids)), "tokenizer_train_chars": n,
                   "heldout_rule": f"sha256('split:'+relpath)[:8] as int % 1000 < {HELDOUT_PER_MILLE}"},
        "model": {"params": nparams, **{k: S[k] for k in ("vocab", "hidden", "layers", "heads", "kv", "inter")}},
        "pretrain": {"steps": step, "batch": B, "seq": T, "tokens": step * B * T, "lr": args.pt_lr,
                     "warmup": S["pt_warmup"], "schedule": "linear warmup, cosine to 10% of peak",
                     "optimizer": "AdamW(0.9,0.95) wd 0.1 on matrices except embedding, clip 1.0",
                     "precision": "bf16 autocast, f32 master weights, sdpa attention",
                     "seconds": round(pt_time, 1), "curve": curve},
        "functions": {"train": n_train_funcs, "heldout": len(held_funcs), "heldout_usable": len(held_ok)},
    }
    with open(os.path.join(out, "pretrain_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    log("phase pretrain done")


def strip_opt(argv, opt):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == opt:
            skip = True
        elif not a.startswith(opt + "="):
            out.append(a)
    return out


def versions():
    import tokenizers
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def write_notice(data, C, samples):
    used = {}
    L = ["# Data samples: sources and licenses\n",
         "Every file below comes from a package installed in the training machine's site-packages "
         f"(`{C['root']}`). Only distributions whose METADATA declares a permissive license "
         "(MIT, BSD, Apache, PSF/Python; nothing GPL/MPL/proprietary/unknown) were sampled. "
         "Each text keeps its original copyright header, if it had one. License = the distribution's "
         "declared `License-Expression` / `License` / license classifiers, verbatim.\n",
         "- `heldout_code.txt`, `calib.txt`: whole files, joined with one blank line, in the order listed.",
         "- `<task>_heldout.jsonl`: chat records built from functions of the listed files "
         "(record i comes from the i-th listed file).\n"]
    for name, rels in samples.items():
        L.append(f"## {name}\n")
        L.append("| # | file (relative to site-packages) | package | version | license |")
        L.append("|---|---|---|---|---|")
        for i, rel in enumerate(rels):
            k = C["dist_of"](rel)
            d = C["dists"][k]
            used[k] = d
            L.append(f"| {i} | `{rel}` | {d['name']} | {d['version']} | {d['license'].replace('|', '/')} |")
        L.append("")
    L.append("## Packages used\n")
    L.append("| package | version | license |\n|---|---|---|")
    for k in sorted(used, key=str.lower):
        d = used[k]
        L.append(f"| {d['name']} | {d['version']} | {d['license'].replace('|', '/')} |")
    with open(os.path.join(data, "NOTICE.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(L) + "\n")
    pk = {k: {x: v for x, v in d.items() if x != "tops"} for k, d in C["dists"].items()}
    with open(os.path.join(data, "packages.json"), "w") as f:
        json.dump(dict(sorted(pk.items(), key=lambda kv: kv[0].lower())), f, indent=1)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# phase 2: fine-tunes + evaluation
# ----------------------------------------------------------------------------------------------
def load_tok(base_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(base_dir, "tokenizer.json"))


def finetune(args, S, base_dir, task, enc, dest, seed):
    import torch
    from transformers import LlamaForCausalLM

    dev = "cuda"
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa").to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.ft_lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    rng = np.random.default_rng(seed)
    B = S["ft_batch"]
    perm, pi = rng.permutation(len(enc)), 0
    total = args.ft_steps or S["ft_steps"]
    t0 = time.time()
    step, t_cal, losses, epochs = 0, None, [], 0
    while True:
        if total is not None and step >= total:
            break
        if step == 5:
            torch.cuda.synchronize()
            t_cal = time.time()
        if total is None and step == 35:
            torch.cuda.synchronize()
            dt = (time.time() - t_cal) / 30
            total = int(35 + (args.ft_seconds - (time.time() - t0)) / dt)
            total = max(S["ft_min"], min(20_000, total // 50 * 50))
            log(f"{task}: step time {dt*1000:.1f} ms -> fine-tune steps fixed at {total}")
        if pi + B > len(perm):
            perm, pi, epochs = rng.permutation(len(enc)), 0, epochs + 1
        items = [enc[i] for i in perm[pi:pi + B]]
        pi += B
        L = max(len(x[0]) for x in items)
        ids = torch.zeros((B, L), dtype=torch.long)
        lab = torch.full((B, L), -100, dtype=torch.long)
        for j, (x, s, e) in enumerate(items):
            ids[j, :len(x)] = torch.from_numpy(x.astype(np.int64))
            lab[j, s:e] = ids[j, s:e]
        ids, lab = ids.to(dev, non_blocking=True), lab.to(dev, non_blocking=True)
        lr = lr_at(step, total or 10**9, S["ft_warmup"], args.ft_lr, 0.0)
        for gr in opt.param_groups:
            gr["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lg = model(ids).logits
        loss = torch.nn.functional.cross_entropy(lg[:, :-1].float().reshape(-1, lg.size(-1)),
                                                 lab[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == total:
            losses.append({"step": step, "loss": round(loss.item(), 4)})
            log(f"{task}: step {step}/{total} loss {loss.item():.4f} lr {lr:.2e}")
    torch.cuda.synchronize()
    secs = time.time() - t0
    write_model_dir(model, os.path.join(base_dir, "tokenizer.json"), dest, 1024)
    return {"steps": step, "batch": B, "lr": args.ft_lr, "warmup": S["ft_warmup"],
            "schedule": "linear warmup, cosine to 0", "seconds": round(secs, 1),
            "examples_seen": step * B, "train_records": len(enc), "epochs": round(step * B / len(enc), 2),
            "curve": losses}


def load_f32(d, dev):
    import torch
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").to(dev)
    m.eval()
    return m


def bitdelta_(model, base_sd, keep_embedding):
    """In place: W = W_base + mean|Δ| * sign(Δ) for every 2-D weight (embedding optionally exact)."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            b = base_sd[n].to(p.device, torch.float32)
            d = p.data.float() - b
            if p.ndim == 2 and not (keep_embedding and "embed" in n):
                p.data.copy_(b + d.abs().mean() * torch.where(d >= 0, 1.0, -1.0))


def delta_stats(model, base_sd):
    rel = []
    for name, p in model.named_parameters():
        if p.ndim == 2:
            b = base_sd[name].to(p.device, torch_f32())
            rel.append(((p.data.float() - b).norm() / b.norm()).item())
    return {"mean_rel_delta_norm": float(np.mean(rel)), "max_rel_delta_norm": float(np.max(rel))}


def torch_f32():
    import torch

    return torch.float32


def greedy_sample(model, tok, user, dev, n=96):
    import torch

    ids = tok.encode(render_chat([{"role": "user", "content": user}], add_generation_prompt=True)).ids
    x = torch.tensor([ids], device=dev)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                             eos_token_id=[END, EOT], pad_token_id=EOT)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def phase_finetune(args, S):
    import torch

    out = args.out
    base_dir = os.path.join(out, "base")
    data = os.path.join(out, "data")
    info = json.load(open(os.path.join(out, "pretrain_info.json")))
    tok = load_tok(base_dir)
    check_chat_template(base_dir)

    C = build_corpus(S, args.seed)
    pool = mp.get_context("fork").Pool(max(2, (os.cpu_count() or 4) - 2))
    train_funcs = extract_all(pool, C["root"], [r for r, _ in C["train"]])
    pool.close()
    held = {t: read_jsonl(os.path.join(data, f"{t}_heldout.jsonl")) for t in TASKS}
    held_src = {sha(r["messages"][1]["content"]) for r in held["docstring2code"]}
    log(f"train functions: {len(train_funcs)}")
    ft_info = {}
    enc_held = {t: [e for e in encode_chat(tok, held[t], S["ft_seq"]) if e is not None] for t in TASKS}
    for t in TASKS:
        assert len(enc_held[t]) == len(held[t]), t
    train_enc = {}
    uniq = {}
    for f in train_funcs:
        uniq.setdefault(sha(f["src"]), f)
    funcs = [uniq[h] for h in sorted(uniq, key=lambda h: sha(f"ft:{args.seed}:" + h))
             if sha(uniq[h]["src"]) not in held_src]
    for ti, task in enumerate(TASKS):
        recs = [r for r in (make_task(task, f) for f in funcs) if r is not None][:S["train_tasks_cap"] * 2]
        enc = [e for e in encode_chat(tok, recs, S["ft_seq"]) if e is not None][:S["train_tasks_cap"]]
        train_enc[task] = enc
        log(f"{task}: {len(enc)} training records")

    dests = {}
    for ti, task in enumerate(TASKS):
        dest = os.path.join(out, task) if task in COMMITTED_TASKS else os.path.join(args.full_out, task)
        dests[task] = dest
        ft_info[task] = finetune(args, S, base_dir, task, train_enc[task], dest, args.seed + 1 + ti)
        ft_info[task]["dir"] = dest
        torch.cuda.empty_cache()

    # ---------------- evaluation: transformers, float32, eager ----------------
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    code_text = open(os.path.join(data, "heldout_code.txt"), encoding="utf-8").read()
    code_ids = tok.encode(code_text).ids
    calib_ids = tok.encode(open(os.path.join(data, "calib.txt"), encoding="utf-8").read()).ids
    models = {"base": base_dir, **dests}
    base_sd = {k: v.float().cpu() for k, v in load_f32(base_dir, "cpu").state_dict().items()}
    results = {}
    samples = {}

    def eval_model(m):
        r = {}
        r["heldout_code"], ntok = ppl_hf_guide(m, code_ids, S["code_len"], S["code_stride"], dev)
        for t in TASKS:
            r[t], _ = chat_ppl(m, enc_held[t], dev)
        return r, ntok

    for name, d in models.items():
        m = load_f32(d, dev)
        r, ntok = eval_model(m)
        r["calib_code"], _ = ppl_hf_guide(m, calib_ids, S["code_len"], S["code_stride"], dev)
        if name != "base":
            r.update(delta_stats(m, base_sd))
            for keep in (False, True):
                bitdelta_(m, base_sd, keep)
                rb, _ = eval_model(m)
                results[f"{name}+bitdelta_sim" + ("_embexact" if keep else "")] = rb
                m = load_f32(d, dev)
        results[name] = r
        samples[name] = {}
        for t in TASKS:
            user = held[t][0]["messages"][0]["content"]
            samples[name][t] = greedy_sample(m, tok, user, dev)
        log(f"eval {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
        del m
    ev = {
        "method": {
            "precision": "transformers LlamaForCausalLM, weights loaded from the bf16 checkpoint into float32, "
                         "attn_implementation=eager, TF32 off, CUDA",
            "heldout_code": f"data/heldout_code.txt tokenized as one string; Hugging Face perplexity-guide loop "
                            f"(max_length={S['code_len']}, stride={S['code_stride']}, token-counting version, "
                            f"see tests/fixtures/MANIFEST.md; window nlls accumulated in float64); {ntok} scored tokens",
            "calib_code": "data/calib.txt (a training-split sample), same loop",
            "tasks": "data/<task>_heldout.jsonl rendered with the chat template (no generation prompt); "
                     "perplexity over the assistant tokens: targets are every token after <|assistant|> "
                     "up to and including the closing <|end|>; exp(total nll / total targets)",
            "bitdelta_sim": "fine-tune with every 2-D weight replaced by W_base + mean(|Δ|)·sign(Δ) "
                            "(no scale distillation); _embexact keeps the tied embedding delta exact",
        },
        "ppl": results,
        "heldout_records": {t: len(held[t]) for t in TASKS},
        "finetune": ft_info,
        "samples_greedy": samples,
        "versions": versions(),
        "command": "python3 " + shlex.join(sys.argv),
    }
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(ev, f, indent=1, ensure_ascii=False)
    write_readme(out, info, ev, args)
    log("phase finetune done")


def write_readme(out, info, ev, args):
    P = ev["ppl"]
    rows = ["base"] + TASKS
    cols = ["heldout_code"] + TASKS
    L = ["# deltaserve demo model family\n",
         "A small Llama base trained from scratch on Python source and docs, plus three full-parameter "
         "chat fine-tunes of it. Produced by `scripts/demo/train_family.py` (seed "
         f"{info['seed']}); every number here was computed by that script.\n",
         "| model | what it is | where |\n|---|---|---|",
         "| `base` | LlamaForCausalLM pretrained on site-packages Python source + .md/.rst/.txt docs | `assets/demo/base/` |",
         "| `docstring2code` | base fine-tuned: user gives a signature + docstring, assistant writes the function | `assets/demo/docstring2code/` |",
         "| `code2docstring` | base fine-tuned: user gives a function without its docstring, assistant writes the docstring | not committed: `.work/demo_full/code2docstring/` (to be stored as a BitDelta delta) |",
         "| `complete` | base fine-tuned: user gives the first half of a function, assistant writes the rest | not committed: `.work/demo_full/complete/` (to be stored as a BitDelta delta) |",
         "",
         "All checkpoints are full Hugging Face directories (config.json, model.safetensors in bf16, tokenizer.json, "
         "tokenizer_config.json with the chat template, generation_config.json).\n",
         "## Architecture\n",
         f"LlamaForCausalLM: vocab {info['model']['vocab']}, hidden {info['model']['hidden']}, "
         f"{info['model']['layers']} layers, {info['model']['heads']} heads, {info['model']['kv']} kv heads (head_dim "
         f"{info['model']['hidden'] // info['model']['heads']}), intermediate {info['model']['inter']}, tied embeddings, "
         f"max_position_embeddings 1024, rope_theta 10000, rms_norm_eps 1e-5; {info['model']['params']:,} parameters.\n",
         f"Tokenizer: byte-level BPE (vocab {info['model']['vocab']}) trained by the script; special tokens `<|endoftext|>`=0, "
         "`<|user|>`=1, `<|assistant|>`=2, `<|end|>`=3. Chat format: "
         "`<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n`; generation stops at "
         "`<|end|>` or `<|endoftext|>` (generation_config eos_token_id [3, 0]).\n",
         "## Held-out perplexity (transformers, float32, eager)\n",
         "Lower is better. Rows: models; columns: evaluation sets (diagonal of the task block = each "
         "fine-tune on its own task).\n",
         "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        L.append(f"| {r} | " + " | ".join(f"{P[r][c]:.3f}" for c in cols) + " |")
    L.append("")
    L.append("Python simulation of plain BitDelta (every 2-D weight of the fine-tune replaced by "
             "`W_base + mean(|Δ|)·sign(Δ)`, no scale distillation; `embexact` keeps the tied embedding's "
             "delta exact), same evaluation:\n")
    L.append("| model | " + " | ".join(cols) + " |")
    L.append("|---" * (len(cols) + 1) + "|")
    for t in TASKS:
        for suf in ("+bitdelta_sim", "+bitdelta_sim_embexact"):
            L.append(f"| {t}{suf} | " + " | ".join(f"{P[t + suf][c]:.3f}" for c in cols) + " |")
    L.append("")
    L.append("Size of the fine-tuning change (per 2-D weight, ‖W_ft − W_base‖ / ‖W_base‖ on the bf16 checkpoints): " +
             "; ".join(f"{t}: mean {P[t]['mean_rel_delta_norm']:.4f}, max {P[t]['max_rel_delta_norm']:.4f}" for t in TASKS) + ".\n")
    L.append("How each number is computed:\n")
    for k, v in ev["method"].items():
        L.append(f"- **{k}**: {v}")
    L.append(f"- training-split sample `data/calib.txt`: base {P['base']['calib_code']:.3f}"
             + "".join(f", {t} {P[t]['calib_code']:.3f}" for t in TASKS))
    L.append("\nThe full numbers (and a greedy sample of each model on the first held-out prompt of each task) "
             "are in `eval.json`; pretraining details and the held-out perplexity curve in `pretrain_info.json`.\n")
    pt = info["pretrain"]
    L.append("## Training\n")
    L.append(f"Corpus: the `.py`, `.md`, `.rst`, `.txt` files (200 B–200 KB, UTF-8, not minified, deduplicated by content) "
             f"of `{info['site_packages']}` on the training machine ({info['corpus']['candidate_files']} candidates). "
             f"Split by file: held out if {info['corpus']['heldout_rule']}. Training used "
             f"{info['corpus']['train_files']} files ({info['corpus']['train_bytes']/1e6:.0f} MB, "
             f"{info['corpus']['train_tokens']/1e6:.1f} M tokens; a seed-ordered sample capped at 150 MB); "
             f"held-out pool {info['corpus']['heldout_files']} files. Licenses per package: `data/packages.json`.\n")
    L.append(f"- Pretraining: {pt['steps']} steps × {pt['batch']} × {pt['seq']} tokens "
             f"({pt['tokens']/1e6:.0f} M tokens), AdamW lr {pt['lr']}, {pt['schedule']}, {pt['precision']}; "
             f"{pt['seconds']:.0f} s on {info['gpu']}. Held-out ppl curve (bf16, 64 random windows): " +
             ", ".join(f"{c['step']}: {c['heldout_ppl']}" for c in pt["curve"]) + ".")
    for t in TASKS:
        f = ev["finetune"][t]
        L.append(f"- `{t}`: full-parameter fine-tune from the bf16 base, {f['steps']} steps × batch {f['batch']} "
                 f"({f['examples_seen']} examples, {f['epochs']} epochs of {f['train_records']} training records from "
                 f"training-split functions), AdamW lr {f['lr']} ({f['schedule']}), loss on assistant tokens only; "
                 f"{f['seconds']:.0f} s.")
    L.append("")
    L.append("Commands (run from the repository root on one GPU; the pretraining step count was calibrated to a "
             "~4-minute budget on the first run and is fixed in the reproduce command):\n")
    L.append("```sh\n" + info["reproduce_command"] + "\n" + ev["command"] + "\n```\n")
    L.append(f"Versions: {json.dumps(ev['versions'])}. Bitwise reproduction also needs the same installed packages "
             "(the corpus is the interpreter's site-packages) and is subject to GPU non-determinism.\n")
    L.append("## Data (`data/`)\n")
    L.append("- `heldout_code.txt`: ~200 KB of held-out `.py` files (permissive licenses only).")
    L.append("- `calib.txt`: ~200 KB of training-split `.py` files (permissive licenses only), e.g. for calibration.")
    L.append("- `<task>_heldout.jsonl`: held-out chat records `{\"messages\": [{\"role\": \"user\", ...}, "
             "{\"role\": \"assistant\", ...}]}` from held-out files' functions, not present in the training split.")
    L.append("- `NOTICE.md`: source file, package, version and license of everything in the samples; "
             "`packages.json`: declared license of every installed distribution.")
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(L) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["pretrain", "finetune", "all"], required=True)
    ap.add_argument("--out", default="assets/demo")
    ap.add_argument("--full-out", default=".work/demo_full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="toy sizes, to check the code end to end")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="default: calibrate to --pretrain-seconds")
    ap.add_argument("--pretrain-seconds", type=float, default=240.0)
    ap.add_argument("--deadline-seconds", type=float, default=None,
                    help="pretraining step calibration also keeps the whole process within this many seconds")
    ap.add_argument("--pt-lr", type=float, default=2e-3)
    ap.add_argument("--ft-steps", type=int, default=None, help="default 1000 (--smoke: calibrate to --ft-seconds)")
    ap.add_argument("--ft-seconds", type=float, default=55.0)
    ap.add_argument("--ft-lr", type=float, default=5e-5)
    args = ap.parse_args()
    S = settings(args.smoke)
    if args.smoke:
        args.pretrain_seconds = min(args.pretrain_seconds, 3.0)
        args.ft_seconds = min(args.ft_seconds, 1.0)
    os.makedirs(args.out, exist_ok=True)
    if args.phase in ("pretrain", "all"):
        phase_pretrain(args, S)
    if args.phase in ("finetune", "all"):
        phase_finetune(args, S)


if __name__ == "__main__":
    main()
