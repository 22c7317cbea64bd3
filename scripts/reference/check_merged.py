#!/usr/bin/env python3
"""Check `deltaserve merge` against transformers and against an independent BitDelta merge.

For each fixture model (tests/fixtures/models/<name>), this script:
  1. makes a fine-tune: every parameter moved by N(0, (noise * std(param))^2) (seeded), optionally
     with extra tokens (larger embed_tokens / lm_head), saved with save_pretrained in the base's dtype;
  2. runs `deltaserve compress` (base + fine-tune -> <out>/<name>.delta) and `deltaserve merge`
     (base + delta -> a checkpoint dir, with a small --max-shard-size so it is sharded);
  3. loads the merged dir with transformers (AutoModelForCausalLM, eager, float32 compute): this
     checks that transformers reads deltaserve's shards, index and config;
  4. builds a *delta-free reference* without any deltaserve code: the base's tensors plus the delta
     decoded from docs/FORMAT.md with numpy, applied the way the BitDelta reference's `load_diff`
     does (`weight.add_(((2*bits - 1) * coeff).to(weight.dtype))`; full tensors replace the base's,
     cast to the base's dtype), and checks every merged tensor equals it bit for bit;
  5. writes <out>/<name>.safetensors with `input_ids` (from the model's reference.safetensors),
     `logits_merged` (transformers on the merged dir), `logits_reference` (transformers on the
     delta-free reference), `logits_finetuned` (transformers on the uncompressed fine-tune), all
     float32 [2, 13, vocab], and metadata (versions, command, fingerprint, max diffs).

The Rust side (crates/deltaserve-codecs/tests/reference.rs) merges <name>.delta onto the fixture base
itself and compares its own forward pass on the merged checkpoint (and on base + tenant delta) with
`logits_merged`.

Usage (repository root, on a machine with torch + transformers 5.x and a built deltaserve):
    cargo build --release -p deltaserve-cli
    python3 scripts/reference/check_merged.py --deltaserve target/release/deltaserve \
        --out tests/fixtures/merged
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

FIXTURE_VERSION = "1"
# name -> extra tokens added by the fine-tune
MODELS = {"llama": 0, "llama3_tied_bf16": 0, "mistral_sliding": 0, "qwen2_bias": 5}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "chat_template.jinja", "special_tokens_map.json"]


def log(*a):
    print("[check_merged]", *a, flush=True)


def load(d, dtype):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="eager")
    m.eval()
    return m


def stored_dtype(d):
    """The dtype of the first floating tensor in the checkpoint's files."""
    from safetensors import safe_open

    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors") and f != "reference.safetensors":
            with safe_open(os.path.join(d, f), "pt") as st:
                for k in st.keys():
                    t = st.get_tensor(k)
                    if t.is_floating_point():
                        return t.dtype
    raise SystemExit(f"{d}: no floating-point tensor")


def make_finetune(base_dir, out_dir, seed, noise, extra_tokens):
    dtype = stored_dtype(base_dir)
    m = load(base_dir, torch.float32)
    g = torch.Generator().manual_seed(seed)
    if extra_tokens:
        m.resize_token_embeddings(m.config.vocab_size + extra_tokens)
    with torch.no_grad():
        for _, p in m.named_parameters():  # tied parameters appear once
            p.add_(noise * p.float().std() * torch.randn(p.shape, generator=g))
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    m.to(dtype).save_pretrained(out_dir)
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(base_dir, f)):
            shutil.copy(os.path.join(base_dir, f), os.path.join(out_dir, f))


def run(cmd):
    log("$", shlex.join(cmd))
    subprocess.run(cmd, check=True)


# --- the delta, read as docs/FORMAT.md specifies (numpy + safetensors only) ---------------------
def load_raw(path):
    """{name: (dtype, shape, raw bytes)}, __metadata__ of a safetensors file."""
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {}) or {}
    start = 8 + n
    return {k: (v["dtype"], v["shape"], data[start + v["data_offsets"][0]:start + v["data_offsets"][1]])
            for k, v in header.items()}, meta


TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def raw_to_torch(dtype, shape, raw):
    if dtype == "BF16":
        t = torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16)
    elif dtype in ("F32", "F16"):
        t = torch.frombuffer(bytearray(raw), dtype=TORCH_DTYPES[dtype])
    else:
        raise SystemExit(f"unexpected dtype {dtype}")
    return t.reshape(shape).clone()


def base_tensors(base_dir):
    out = {}
    for f in sorted(os.listdir(base_dir)):
        if f.endswith(".safetensors") and f != "reference.safetensors":
            tensors, _ = load_raw(os.path.join(base_dir, f))
            for k, (dt, shape, raw) in tensors.items():
                out[k] = raw_to_torch(dt, shape, raw)
    return out


def reference_state_dict(base_dir, delta_path):
    """Base + delta without deltaserve: BitDelta's load_diff on the base's tensors."""
    base = base_tensors(base_dir)
    tensors, meta = load_raw(delta_path)
    header = json.loads(meta["deltaserve"])
    assert header["format_version"].split(".")[0] == "1", header["format_version"]
    sd = {}
    for name, e in header["tensors"].items():
        if e["kind"] == "sign":
            rows, cols = e["shape"]
            dt, shape, raw = tensors[e["signs"]]
            words = np.frombuffer(raw, dtype="<u4").reshape(shape)
            bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :cols]
            coeff = torch.tensor(np.frombuffer(tensors[e["scale"]][2], dtype="<f4").copy())
            w = base[name].clone()
            assert list(w.shape) == [rows, cols], (name, w.shape)
            sign = torch.from_numpy(bits.astype(np.float32)) * 2 - 1
            w.add_((sign * coeff).to(w.dtype))  # load_diff: one rounding for the product, one for the sum
            sd[name] = w
        elif e["kind"] == "full":
            t = raw_to_torch(*tensors[e["tensor"]])
            if e["value"] == "difference":
                w = base[name].clone()
                w.add_(t.to(w.dtype))
                sd[name] = w
            else:
                sd[name] = t.to(base[name].dtype) if name in base else t
        else:
            raise SystemExit(f"{delta_path}: unknown kind {e['kind']}")
    return sd, header


def merged_tensors(merged_dir):
    out = {}
    for f in sorted(os.listdir(merged_dir)):
        if f.endswith(".safetensors"):
            tensors, meta = load_raw(os.path.join(merged_dir, f))
            assert meta.get("format") == "pt", (f, meta)
            for k, v in tensors.items():
                out[k] = raw_to_torch(*v)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deltaserve", default="target/release/deltaserve")
    ap.add_argument("--fixtures", default="tests/fixtures/models")
    ap.add_argument("--out", default="tests/fixtures/merged")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--work", default=None, help="keep intermediate checkpoints here (default: a temp dir)")
    args = ap.parse_args()
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(min(8, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="check_merged-")
    summary = {}
    for i, name in enumerate(args.models):
        base_dir = os.path.join(args.fixtures, name)
        ft_dir = os.path.join(work, f"{name}_ft")
        merged_dir = os.path.join(work, f"{name}_merged")
        delta = os.path.join(args.out, f"{name}.delta")
        make_finetune(base_dir, ft_dir, args.seed + i, args.noise, MODELS.get(name, 0))
        run([args.deltaserve, "compress", "--base", base_dir, "--finetuned", ft_dir, "--out", delta,
             "--force", "--quiet"])
        run([args.deltaserve, "merge", "--base", base_dir, "--delta", delta, "--out", merged_dir,
             "--force", "--quiet", "--max-shard-size", "100KB"])

        # 4. merged tensors == delta-free reference, bit for bit
        sd, header = reference_state_dict(base_dir, delta)
        merged = merged_tensors(merged_dir)
        assert set(merged) == set(sd), sorted(set(merged) ^ set(sd))
        unequal = [k for k in sd if merged[k].dtype != sd[k].dtype or not torch.equal(merged[k], sd[k])]
        assert not unequal, f"{name}: merged tensors differ from the reference merge: {unequal[:5]}"
        log(f"{name}: {len(sd)} merged tensors equal the delta-free reference bit for bit")

        # 3 + 5. logits
        from safetensors import safe_open
        with safe_open(os.path.join(base_dir, "reference.safetensors"), "pt") as f:
            input_ids = f.get_tensor("input_ids")
        with torch.no_grad():
            logits_merged = load(merged_dir, torch.float32)(input_ids).logits.float().contiguous()
            cfg = AutoConfig.from_pretrained(merged_dir)
            ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
            missing, unexpected = ref.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
            # A tied lm_head is not in the state dict; everything else must be.
            assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
            if "lm_head.weight" in missing:
                ref.tie_weights()
            ref.eval()
            logits_reference = ref(input_ids).logits.float().contiguous()
            logits_finetuned = load(ft_dir, torch.float32)(input_ids).logits.float().contiguous()
        d_ref = (logits_merged - logits_reference).abs().max().item()
        d_ft = (logits_merged - logits_finetuned).abs().max().item()
        log(f"{name}: max |merged - reference| = {d_ref:.3g}; max |merged - fine-tune| = {d_ft:.3g} (BitDelta error)")
        assert d_ref < 1e-5, d_ref
        meta = {
            "fixture_version": FIXTURE_VERSION,
            "command": "python3 " + shlex.join(sys.argv),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "base_fingerprint": header["base"]["hex"],
            "noise": repr(args.noise),
            "extra_tokens": str(MODELS.get(name, 0)),
            "merged_vs_reference_max_abs_diff": repr(d_ref),
            "merged_vs_finetuned_max_abs_diff": repr(d_ft),
            "tensors_equal_reference": "true",
        }
        save_file({"input_ids": input_ids, "logits_merged": logits_merged, "logits_reference": logits_reference,
                   "logits_finetuned": logits_finetuned}, os.path.join(args.out, f"{name}.safetensors"),
                  metadata=meta)
        summary[name] = {"merged_vs_reference": d_ref, "merged_vs_finetuned": d_ft,
                         "delta_bytes": os.path.getsize(delta)}
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write("# Merged-checkpoint fixtures\n\n")
        f.write("Generated by `scripts/reference/check_merged.py`; do not edit by hand.\n\n")
        f.write(f"- Regenerate: `python3 {shlex.join(sys.argv)}` (repository root, with a built deltaserve)\n")
        f.write(f"- transformers {transformers.__version__}, torch {torch.__version__}, CPU, float32, eager.\n")
        f.write("- `<name>.delta`: `deltaserve compress` of the fixture base and a noisy fine-tune of it "
                f"(noise {args.noise} x std per parameter; `qwen2_bias` adds {MODELS['qwen2_bias']} tokens).\n")
        f.write("- `<name>.safetensors`: `input_ids` and float32 logits of transformers on the merged checkpoint "
                "(`logits_merged`), on a merge computed without deltaserve from docs/FORMAT.md "
                "(`logits_reference`), and on the uncompressed fine-tune (`logits_finetuned`).\n\n")
        f.write("| model | max abs(merged - reference) | max abs(merged - fine-tune) | delta bytes |\n|---|---|---|---|\n")
        for k, v in summary.items():
            f.write(f"| `{k}` | {v['merged_vs_reference']:.3g} | {v['merged_vs_finetuned']:.3g} | {v['delta_bytes']} |\n")
    if not args.work:
        shutil.rmtree(work)
    log("done:", json.dumps(summary))


if __name__ == "__main__":
    main()
