#!/usr/bin/env python3
"""BitDelta's scale distillation (FasterDecoding/BitDelta bitdelta/train.py), re-implemented on our
model pair and our exact token windows, to compare with `deltaserve calibrate`.

    # 1. on any machine: compress, calibrate once with our code, dump the windows it used
    deltaserve compress --base assets/demo/base --finetuned assets/demo/docstring2code --out d2c.delta
    deltaserve calibrate --base assets/demo/base --finetuned assets/demo/docstring2code \
        --delta d2c.delta --data assets/demo/data/calib.txt --out d2c.cal.delta \
        --dump-windows d2c.windows.json --json > ours_scales.json
    # 2. on the GPU machine (torch + transformers; triton only for --kernel triton)
    python3 scripts/reference/bitdelta_calibrate.py --base assets/demo/base \
        --finetuned assets/demo/docstring2code --windows d2c.windows.json --mode both --json ref.json

What is reproduced from the reference, line by line:
  * `compress_diff`: every `*proj` child of modules named `*mlp*`/`*self_attn*` of a copy of the
    fine-tune becomes a `BinaryDiff`: diff = W_ft - W_base computed in the model dtype, sign bit
    `diff >= 0`, coeff = diff.float().abs().mean() as an fp32 `nn.Parameter`; forward
    `x @ base.T + coeff * binary_bmm(x, mask)`. The projection's bias is dropped, as the
    reference's layer does (our models have none).
  * `binary_bmm` is a raw Triton launch without an autograd Function, so no gradient flows back
    through the sign term to `x`: only `coeff` gets the gradient of its own product. `--kernel dense`
    (default) computes the same product with `x.detach() @ S` (S = ±1 in the model dtype);
    `--kernel triton` calls the vendored kernel itself. `--exact-grad` lets the gradient flow through
    the sign term as well (what deltaserve computes).
  * Teacher logits under `torch.inference_mode()`, student logits with a graph,
    `F.mse_loss(teacher.clone(), student)`, `torch.optim.AdamW(params, lr=1e-4)` (torch defaults),
    `CosineAnnealingLR(optimizer, num_steps)` stepped after every step; models in bf16 as the
    reference's `get_model` loads them (`--dtype f32` for a precision-matched run).
  * `--mode all`: AdamW gets `model.parameters()`, which in the reference also trains the
    embeddings, norms and lm_head (everything still `requires_grad`); `--mode scales`: only the
    coeffs, as the paper describes; `--mode both` runs one after the other from the same start.

What differs from the reference, on purpose: the data. The reference takes C4 documents truncated
or padded to 128 tokens; here every step takes exactly the windows `deltaserve calibrate` trained
on (`--dump-windows`), and validation uses its held-out windows, so the numbers are comparable.
Validation: perplexity = exp(mean next-token NLL) and mean KL(fine-tune || model) per position,
in fp32 from each model's logits, one window at a time, as deltaserve-train's `evaluate` does.
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}


def load_model(path, dtype, device):
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    return m.to(device)


class BinaryDiff(nn.Module):
    """bitdelta/diff.py BinaryDiff, with the packed-mask product done by `kernel`."""

    def __init__(self, base, finetune, kernel, exact_grad):
        super().__init__()
        diff = finetune - base
        quantile = diff.float().abs().mean()
        mask = torch.ones_like(diff)
        mask[diff < 0] = 0
        self.kernel = kernel
        self.exact_grad = exact_grad
        if kernel == "triton":
            from bitdelta_binary_gemm_kernel import pack

            self.register_buffer("mask", pack(mask.bool().T))
        else:
            self.register_buffer("sign_t", (mask * 2 - 1).T.contiguous())  # (in, out), ±1
        self.register_buffer("base", base.T)
        self.register_parameter(
            "coeff",
            nn.Parameter(torch.tensor(quantile, dtype=torch.float32, requires_grad=True, device=base.device)),
        )

    def forward(self, x):
        if self.kernel == "triton":
            from bitdelta_binary_gemm_kernel import binary_bmm

            shape = x.shape
            x3 = x.reshape(-1, shape[-2], shape[-1]).contiguous()
            repeated_mask = self.mask.unsqueeze(0).repeat(x3.size(0), 1, 1)
            signed = binary_bmm(x3, repeated_mask).reshape(*shape[:-1], -1)
        else:
            signed = (x if self.exact_grad else x.detach()) @ self.sign_t
        return x @ self.base + self.coeff * signed


def compress_diff(base_model, finetuned_model, compressed_model, kernel, exact_grad):
    """bitdelta/diff.py compress_diff: same module walk, same replacement."""
    for name, module in compressed_model.named_modules():
        if "mlp" in name or "self_attn" in name:
            for subname, submodule in list(module.named_children()):
                if "proj" in subname:
                    dev = submodule.weight.device
                    base_w = base_model.get_submodule(f"{name}.{subname}").weight.detach().to(dev)
                    ft_w = finetuned_model.get_submodule(f"{name}.{subname}").weight.detach().to(dev)
                    setattr(module, subname, BinaryDiff(base_w, ft_w, kernel, exact_grad).to(dev))


@torch.no_grad()
def evaluate(teacher, models, windows, device):
    """{name: (ppl, kl)} on the validation windows; fp32 from each model's logits."""
    nll = {k: 0.0 for k in models}
    kl = {k: 0.0 for k in models}
    preds = positions = 0
    for w in windows:
        ids = torch.tensor([w], device=device)
        teacher_logits = teacher(ids).logits[0].float()
        for k, m in models.items():
            logits = m(ids).logits[0].float()
            # KL over the shared vocabulary where a model has fewer tokens than the fine-tune.
            v = min(logits.size(-1), teacher_logits.size(-1))
            lt = F.log_softmax(teacher_logits[:, :v], -1)
            ls = F.log_softmax(logits[:, :v], -1)
            kl[k] += (lt.exp() * (lt - ls)).sum().item()
            lp = F.log_softmax(logits, -1)
            nll[k] += -lp[:-1].gather(1, ids[0, 1:, None]).sum().item()
        preds += len(w) - 1
        positions += len(w)
    return {k: (math.exp(nll[k] / preds), kl[k] / positions) for k in models}


def train(finetuned, compressed, batches, params, lr, device):
    """bitdelta/train.py's loop."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, len(batches))
    losses = []
    t0 = time.time()
    for step, batch in enumerate(batches):
        ids = torch.tensor(batch, device=device)
        with torch.inference_mode():
            finetuned_outputs = finetuned(input_ids=ids)
        compressed_outputs = compressed(input_ids=ids)
        loss = F.mse_loss(finetuned_outputs.logits.clone(), compressed_outputs.logits)
        if not torch.isfinite(loss):
            raise SystemExit(f"loss is {loss.item()} at step {step + 1}")
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 20 == 0 or step == 0:
            print(f"  step {step + 1}/{len(batches)} loss {loss.item():.6f}", flush=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return losses, (time.time() - t0) / max(1, len(batches))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--finetuned", required=True)
    ap.add_argument("--windows", required=True, help="JSON from `deltaserve calibrate --dump-windows`")
    ap.add_argument("--mode", choices=["scales", "all", "both"], default="both")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--kernel", choices=["dense", "triton"], default="dense")
    ap.add_argument("--exact-grad", action="store_true", help="backpropagate through the sign term too")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.kernel == "triton" and args.exact_grad:
        ap.error("--exact-grad needs --kernel dense: the Triton kernel has no backward pass")
    if args.kernel == "triton":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "third_party"))
    torch.manual_seed(args.seed)
    with open(args.windows) as f:
        win = json.load(f)
    batches, val = win["train"], win["val"]
    dtype, dev = DTYPES[args.dtype], args.device

    with torch.no_grad():
        base_model = load_model(args.base, dtype, dev).eval()
        finetuned_model = load_model(args.finetuned, dtype, dev).eval()
    start = load_model(args.finetuned, dtype, dev)
    compress_diff(base_model, finetuned_model, start, args.kernel, args.exact_grad)
    start.eval()  # no dropout in Llama; eval() only silences training-mode branches

    print(f"evaluating base, fine-tune, uncalibrated delta on {len(val)} windows", flush=True)
    table = evaluate(finetuned_model, {"base": base_model, "fine-tune": finetuned_model,
                                       "delta, uncalibrated": start}, val, dev)
    results = {"settings": {**vars(args), "steps": len(batches), "batch_size": len(batches[0]),
                            "seq_len": win["seq_len"], "torch": torch.__version__},
               "table": {k: {"ppl": p, "kl": q} for k, (p, q) in table.items()}, "runs": {}}
    modes = ["scales", "all"] if args.mode == "both" else [args.mode]
    for i, mode in enumerate(modes):
        # A copy for every mode but the last, so each starts from the same uncalibrated delta
        # (and a single-mode run, e.g. a 7B speed run, holds one compressed model, as the reference).
        model = copy.deepcopy(start) if i + 1 < len(modes) else start
        if mode == "scales":
            for n, p in model.named_parameters():
                p.requires_grad_(n.endswith(".coeff"))
            params = [p for n, p in model.named_parameters() if n.endswith(".coeff")]
        else:
            params = list(model.parameters())  # the reference: every parameter
        n_coeff = sum(1 for n, _ in model.named_parameters() if n.endswith(".coeff"))
        print(f"mode {mode}: {len(params)} parameter tensors ({n_coeff} scales)", flush=True)
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        losses, sps = train(finetuned_model, model, batches, params, args.lr, dev)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None
        after = evaluate(finetuned_model, {"delta, calibrated": model}, val, dev)["delta, calibrated"]
        results["runs"][mode] = {"ppl": after[0], "kl": after[1], "losses": losses, "seconds_per_step": sps,
                                 "peak_gpu_gib": peak}
        del model

    print(f"\n{'model':<34} {'val ppl':>12} {'KL(ft || model)':>16}")
    for k, v in results["table"].items():
        print(f"{k:<34} {v['ppl']:>12.4f} {v['kl']:>16.6f}")
    for mode, r in results["runs"].items():
        print(f"{'delta, calibrated (' + mode + ')':<34} {r['ppl']:>12.4f} {r['kl']:>16.6f}"
              f"   loss {r['losses'][0]:.5f} -> {r['losses'][-1]:.5f}, {r['seconds_per_step']:.3f} s/step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
