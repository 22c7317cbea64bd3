"""Decode and prefill speed of Hugging Face transformers' `generate` on a checkpoint, for the
side-by-side comparison with `deltaserve generate` (BENCHMARKS.md, "Foundation: generation speed").

Run on the GPU machine:
    python3 scripts/reference/bench_generate_hf.py --model DIR --prompt-tokens 512 --new-tokens 128

Prints one JSON line: prefill tokens/s, decode tokens/s, the measured device copy bandwidth and the
bandwidth floor for decode (weight bytes / bandwidth).
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def copy_bandwidth():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / reps
    return 2 * n / dt  # bytes read + written


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").cuda().eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(vocab, 500), (1, args.prompt_tokens), generator=g).cuda()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(ids)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        one = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=args.new_tokens + 1, min_new_tokens=args.new_tokens + 1, do_sample=False)
        torch.cuda.synchronize()
        full = time.perf_counter() - t
    decode_s = full - one
    bw = copy_bandwidth()
    print(json.dumps({
        "impl": "transformers.generate",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "weight_bytes": weight_bytes,
        "prefill_tokens": args.prompt_tokens,
        "prefill_tok_s": args.prompt_tokens / prefill,
        "decode_tokens": args.new_tokens,
        "decode_tok_s": args.new_tokens / decode_s,
        "copy_bandwidth_GBps": bw / 1e9,
        "decode_floor_tok_s": bw / weight_bytes,
    }))


if __name__ == "__main__":
    main()
