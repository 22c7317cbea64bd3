"""The same LoRA fine-tuning step as `deltaserve finetune` in PyTorch + PEFT, timed on the GPU.

LlamaForCausalLM in bf16 (eager attention, as our differentiable path; sdpa also reported),
LoRA (PEFT) of rank --rank with alpha 16 on q/k/v/o/gate/up/down, adapter weights in f32 as
ours, AdamW on the adapter only, causal-LM loss on --batch sequences of --seq tokens, no gradient
checkpointing (with --grad-ckpt also with it). Prints one JSON line per attention implementation with the per-step wall times.

    python3 scripts/reference/bench_finetune_peft.py --model /tmp/l7b --rank 16 --batch 4 --seq 512 --steps 6
"""
import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--attn", default="eager,sdpa")
    ap.add_argument("--grad-ckpt", action="store_true",
                    help="also run with transformers' gradient checkpointing (per decoder layer)")
    a = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    runs = [(attn, False) for attn in a.attn.split(",")]
    if a.grad_ckpt:
        runs += [(attn, True) for attn in a.attn.split(",")]
    for attn, ckpt in runs:
        model = LlamaForCausalLM.from_pretrained(
            a.model, torch_dtype=torch.bfloat16, attn_implementation=attn
        ).cuda()
        cfg = LoraConfig(r=a.rank, lora_alpha=16, lora_dropout=0.0, bias="none",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                         "gate_proj", "up_proj", "down_proj"])
        if ckpt:
            # Non-reentrant checkpointing, as PEFT recommends; inputs need grads for it to reach LoRA.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        times = []
        for _ in range(a.steps):
            ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g).cuda()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        print(json.dumps({"impl": f"peft+transformers ({attn}{', grad ckpt' if ckpt else ''})", "rank": a.rank,
                          "trainable": sum(p.numel() for p in params), "batch": a.batch,
                          "seq": a.seq, "step_seconds": times,
                          "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}))
        del model, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
