#!/usr/bin/env python3
"""Generate tiny reference checkpoints + transformers reference outputs for deltaserve tests.

Writes, under --out (default tests/fixtures):
  models/<name>/            Hugging Face checkpoint dirs (config.json, *.safetensors, tokenizer.json,
                            tokenizer_config.json, generation_config.json) + reference.safetensors
  tokenizer_cases.json      encode/decode/chat-template cases for the shared fixture tokenizer
  MANIFEST.md               what each fixture is and how it was made

Everything is deterministic (fixed seeds, CPU, float32 eager attention).  The fixture tokenizer is
trained on the source files of the installed `transformers` package, so it is reproducible bit for
bit only with the same transformers version (recorded in the metadata).

Usage (on a machine with torch + transformers 5.x):
    python3 scripts/reference/make_fixtures.py --out tests/fixtures
"""
import argparse
import copy
import hashlib
import json
import os
import shlex
import shutil
import sys

import torch

FIXTURE_VERSION = "1"
SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Jinja chat template (HF style: '\n' inside Jinja string literals is an escape for newline).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
VOCAB = 512
SEQ = 13
GREEDY_PROMPT_LEN = 7
GREEDY_NEW = 20
PPL_LEN = 300
PPL_SEQ_LEN = 64
PPL_STRIDE = 16
PROMPT_TEXT = "def fibonacci(n):\n    return"


def log(*a):
    print("[fixtures]", *a, flush=True)


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
def tokenizer_corpus(max_bytes=300_000):
    """A few hundred KB of .py text from the installed transformers package, deterministic order."""
    import transformers

    root = os.path.dirname(transformers.__file__)
    files = []
    for dp, dn, fn in os.walk(root):
        dn.sort()
        for f in sorted(fn):
            if f.endswith(".py"):
                p = os.path.join(dp, f)
                rel = os.path.relpath(p, root)
                files.append((hashlib.sha256(rel.encode()).hexdigest(), rel, p))
    files.sort()
    texts, total = [], 0
    for _, rel, p in files:
        try:
            with open(p, "r", encoding="utf-8") as fh:
                t = fh.read()
        except (UnicodeDecodeError, OSError):
            continue
        if not t.strip() or len(t) > 20_000:
            continue
        texts.append(t)
        total += len(t.encode())
        if total >= max_bytes:
            break
    return texts, total


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def tokenizer_config(model_max_length):
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(SPECIALS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|user|>", "<|assistant|>"],
        "bos_token": None,
        "eos_token": "<|end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer_files(tok, d, model_max_length):
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(model_max_length), f, indent=2)
        f.write("\n")


def load_fast_tokenizer(d):
    from transformers import PreTrainedTokenizerFast

    cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
    return PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(d, "tokenizer.json"),
        eos_token=cfg["eos_token"],
        pad_token=cfg["pad_token"],
        bos_token=None,
        chat_template=cfg["chat_template"],
    )


def tokenizer_cases(tok_dir):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    hf = load_fast_tokenizer(tok_dir)
    texts = [
        "def forward(self, hidden_states):\n    return self.proj(hidden_states)\n",
        "Hello, world!  Ünïcödé — 日本語 😀\ttab\n\nnewlines",
        "    indented = [x ** 2 for x in range(10)]  # comment",
        "<|user|>\nhi<|end|>\n<|assistant|>\n",
        "",
    ]
    cases = []
    for t in texts:
        ids = raw.encode(t).ids
        assert hf.encode(t, add_special_tokens=True) == ids, t
        cases.append(
            {
                "text": t,
                "ids": ids,
                "tokens": raw.encode(t).tokens,
                "decoded": raw.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": raw.decode(ids, skip_special_tokens=True),
            }
        )
    chats = []
    conv = [
        {"role": "user", "content": "Write a function that adds two numbers."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        {"role": "user", "content": "Now subtract."},
    ]
    for msgs, agp in [(conv, True), (conv[:2], False)]:
        rendered = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
        ids = raw.encode(rendered).ids
        chats.append(
            {"messages": msgs, "add_generation_prompt": agp, "rendered": rendered, "ids": ids}
        )
    expected = (
        "<|user|>\nWrite a function that adds two numbers.<|end|>\n<|assistant|>\n"
        "def add(a, b):\n    return a + b<|end|>\n<|user|>\nNow subtract.<|end|>\n<|assistant|>\n"
    )
    assert chats[0]["rendered"] == expected, repr(chats[0]["rendered"])
    return {"encode": cases, "chat": chats}


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
COMMON = dict(
    vocab_size=VOCAB,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=3,
    pad_token_id=0,
    hidden_act="silu",
    attention_dropout=0.0,
)


def build_specs():
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    return [
        dict(
            name="llama",
            cls=LlamaForCausalLM,
            cfg=LlamaConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=160,
                tie_word_embeddings=False,
                rope_theta=10000.0,
                max_position_embeddings=256,
                **COMMON,
            ),
            save_dtype=torch.float32,
            legacy_config=False,
            shards=1,
            tests="Llama f32, GQA (4 q heads / 2 kv heads), untied lm_head, default RoPE; "
            "config in transformers-5 format (`rope_parameters`). Also the perplexity fixture.",
        ),
        dict(
            name="llama3_tied_bf16",
            cls=LlamaForCausalLM,
            cfg=LlamaConfig(
                hidden_size=48,
                head_dim=16,  # 4 heads * 16 = 64 != hidden 48: head_dim must be read from config
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=1,
                intermediate_size=128,
                tie_word_embeddings=True,
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    # 64 (not 32) so that all three llama3 bands occur with head_dim 16 and
                    # theta 5e5: wavelengths 6.3 (< 16, unchanged), 32.4 (16..64, smoothed),
                    # >= 167 (> 64, divided by factor).
                    "original_max_position_embeddings": 64,
                },
                max_position_embeddings=512,
                **COMMON,
            ),
            save_dtype=torch.bfloat16,
            legacy_config=True,
            shards=1,
            tests="Llama-3 style: bf16 storage, tied embeddings (no lm_head.weight in the file), "
            "llama3 RoPE scaling (all three frequency bands), MQA (4 q heads / 1 kv head), "
            "explicit head_dim 16 with hidden 48; config.json in the legacy (transformers 4) format "
            "with top-level `rope_theta` + `rope_scaling`.",
        ),
        dict(
            name="mistral_sliding",
            cls=MistralForCausalLM,
            cfg=MistralConfig(
                hidden_size=64,
                head_dim=16,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=160,
                tie_word_embeddings=False,
                rope_theta=10000.0,
                max_position_embeddings=256,
                sliding_window=5,
                **COMMON,
            ),
            save_dtype=torch.float32,
            legacy_config=True,
            shards=2,
            tests="Mistral f32 with sliding_window 5 < sequence length 13 (query i attends keys j "
            "with i-5 < j <= i, transformers semantics), checkpoint sharded into 2 files with "
            "model.safetensors.index.json; legacy config format (`rope_theta`).",
        ),
        dict(
            name="qwen2_bias",
            cls=Qwen2ForCausalLM,
            cfg=Qwen2Config(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=160,
                tie_word_embeddings=True,
                use_sliding_window=False,
                sliding_window=None,
                rope_theta=1000000.0,
                max_position_embeddings=256,
                **COMMON,
            ),
            save_dtype=torch.float32,
            legacy_config=False,
            shards=1,
            tests="Qwen2 f32: non-zero q/k/v biases (std 0.02), tied embeddings, "
            "use_sliding_window false; transformers-5 config format.",
        ),
    ]


def randomize_(model, seed):
    """Deterministic random init: weights N(0, 0.1), norms 1 + N(0, 0.1), biases N(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied params appear once
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def quick_fit_(model, spec, ids, prompt, seed, max_rounds=12):
    """Short deterministic CPU fit so that greedy decoding is not a single repeated token."""
    g = torch.Generator().manual_seed(seed + 77)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    steps = 0
    for rnd in range(max_rounds):
        for _ in range(50):
            off = torch.randint(0, ids.numel() - 33, (16,), generator=g)
            x = ids[off[:, None] + torch.arange(33)]
            logits = model(x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        if rnd == 0:
            continue
        chk = copy.deepcopy(model).eval()
        if spec["save_dtype"] == torch.bfloat16:
            chk = chk.to(torch.bfloat16).to(torch.float32)
        out = greedy_nocache(chk, prompt, GREEDY_NEW)
        nd = len(set(out.tolist()))
        log(f"{spec['name']}: fit {steps} steps, loss {loss.item():.3f}, greedy distinct {nd}")
        if nd >= 6:
            break
    model.eval()
    return steps


def legacy_rope_config(path):
    """Rewrite config.json from transformers-5 `rope_parameters` to the transformers-4 layout."""
    cfg = json.load(open(path))
    rp = cfg.pop("rope_parameters")
    rp = dict(rp)
    cfg["rope_theta"] = rp.pop("rope_theta")
    if rp.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rp
    else:
        cfg["rope_scaling"] = None
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def write_generation_config(d):
    gc = {
        "_from_model_config": False,
        "bos_token_id": None,
        "eos_token_id": [3, 0],
        "pad_token_id": 0,
        "do_sample": False,
    }
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump(gc, f, indent=2)
        f.write("\n")


def state_nbytes(model):
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


def save_model(spec, model, d):
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    m = model.to(spec["save_dtype"])
    if spec["shards"] == 1:
        m.save_pretrained(d)  # transformers 5 always writes safetensors
    else:
        total = state_nbytes(m)
        for frac in (0.6, 0.55, 0.7, 0.5, 0.65, 0.75):
            for f in os.listdir(d):
                os.remove(os.path.join(d, f))
            m.save_pretrained(d, max_shard_size=int(total * frac))
            shards = [f for f in os.listdir(d) if f.endswith(".safetensors")]
            if len(shards) == spec["shards"]:
                break
        assert len(shards) == spec["shards"], shards
        assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    if spec["legacy_config"]:
        legacy_rope_config(os.path.join(d, "config.json"))
    write_generation_config(d)


def load_model(spec, d, dtype):
    m = spec["cls"].from_pretrained(d, dtype=dtype, attn_implementation="eager")
    m.eval()
    return m


def greedy_nocache(model, prompt, n):
    ids = prompt.clone()
    for _ in range(n):
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids[0, prompt.shape[1]:]


def greedy_generate(model, prompt, n):
    gc = copy.deepcopy(model.generation_config)
    saved = model.generation_config
    gc.do_sample = False
    gc.eos_token_id = None
    gc.max_new_tokens = n
    gc.min_new_tokens = None
    gc.pad_token_id = 0
    gc.num_beams = 1
    model.generation_config = gc  # so no default eos can sneak back in
    try:
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                generation_config=gc,
            )
    finally:
        model.generation_config = saved
    new = out[0, prompt.shape[1]:]
    assert new.shape[0] == n, new.shape
    return new


def ref_llama_logits(sd, cfg, ids, dtype):
    """Independent plain-torch Llama forward (default RoPE, GQA, untied head) in `dtype`.
    Used in float64 for `ppl_f64` (transformers' eager path keeps softmax and RMSNorm statistics in
    float32 even for float64 weights) and, in float32, as a cross-check of transformers' logits."""
    import math

    W = {k: v.to(dtype) for k, v in sd.items()}
    B, T = ids.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps, theta = cfg.rms_norm_eps, cfg.rope_parameters["rope_theta"]

    def rms(x, w):
        return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps))

    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=dtype) / hd))
    fr = torch.outer(torch.arange(T, dtype=dtype), inv)
    emb = torch.cat([fr, fr], -1)
    cos, sin = emb.cos(), emb.sin()

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    mask = torch.full((T, T), float("-inf"), dtype=dtype).triu(1)
    x = W["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = (h @ W[p + "self_attn.q_proj.weight"].T).view(B, T, nh, hd).transpose(1, 2)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).view(B, T, nkv, hd).transpose(1, 2)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).view(B, T, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(B, T, nh * hd)
        x = x + o @ W[p + "self_attn.o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        g = torch.nn.functional.silu(h @ W[p + "mlp.gate_proj.weight"].T)
        x = x + (g * (h @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
    x = rms(x, W["model.norm.weight"])
    return x @ W["lm_head.weight"].T


def hf_guide_ppl(model, ids, max_length, stride, logits_fn=None):
    """Sliding-window perplexity exactly as the Hugging Face perplexity guide (token-counting
    version): for each window the nll is outputs.loss (mean over valid shifted targets) weighted by
    num_loss_tokens = (#labels != -100) - batch_size; ppl = exp(sum / count).
    With logits_fn (float64 reference forward) the same loop runs with the loss computed in float64
    (transformers' own loss upcasts to float32 only)."""
    enc = ids.view(1, -1)
    seq_len = enc.size(1)
    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = enc[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            if logits_fn is None:
                outputs = model(input_ids, labels=target_ids)
                neg_log_likelihood = outputs.loss
            else:
                logits = logits_fn(input_ids)
                assert logits.dtype == torch.float64
                neg_log_likelihood = torch.nn.functional.cross_entropy(
                    logits[0, :-1], target_ids[0, 1:], ignore_index=-100
                )
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    avg_nll = nll_sum / n_tokens
    ppl = torch.exp(avg_nll)
    return ppl.item(), n_tokens


def make_reference(spec, d, tok, seed, meta, text_ids):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed + 1000)
    input_ids = torch.randint(4, VOCAB, (2, SEQ), generator=g, dtype=torch.int64)
    prompt = torch.tensor(tok.encode(PROMPT_TEXT).ids[:GREEDY_PROMPT_LEN], dtype=torch.int64)
    assert prompt.numel() == GREEDY_PROMPT_LEN, prompt

    tensors = {"input_ids": input_ids, "greedy_prompt": prompt}
    md = dict(meta)
    m32 = load_model(spec, d, torch.float32)
    with torch.no_grad():
        logits32 = m32(input_ids).logits.float()
    if spec["save_dtype"] == torch.bfloat16:
        mbf = load_model(spec, d, torch.bfloat16)
        with torch.no_grad():
            lbf = mbf(input_ids).logits.float()
        tensors["logits"] = lbf.contiguous()
        tensors["logits_f32"] = logits32.contiguous()
        gap = (lbf - logits32).abs().max().item()
        md["bf16_vs_f32_max_abs_diff"] = repr(gap)
        log(f"{spec['name']}: transformers bf16 vs f32 max|dlogit| = {gap:.4g}")
    else:
        tensors["logits"] = logits32.contiguous()
    # Sanity: the sliding window must actually matter for the mistral fixture.
    if spec["name"] == "mistral_sliding":
        alt = spec["cls"].from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                          sliding_window=None)
        alt.eval()
        with torch.no_grad():
            lfull = alt(input_ids).logits
        diff = (lfull - logits32).abs().max().item()
        md["no_window_max_abs_diff"] = repr(diff)
        log(f"mistral: logits without sliding window differ by {diff:.4g}")
        assert diff > 1e-3, "sliding window has no effect?"
    new = greedy_generate(m32, prompt.view(1, -1), GREEDY_NEW)
    ref = greedy_nocache(m32, prompt.view(1, -1), GREEDY_NEW)
    match = bool(torch.equal(new, ref))
    if not match:
        log(f"WARNING {spec['name']}: generate() and no-cache argmax loop differ: {new.tolist()} vs {ref.tolist()}")
    md["greedy_matches_nocache_loop"] = "true" if match else "false"
    tensors["greedy_output"] = new.to(torch.int64).contiguous()
    log(f"{spec['name']}: greedy {prompt.tolist()} -> {new.tolist()} (distinct {len(set(new.tolist()))})")
    assert len(set(new.tolist())) >= 4, "greedy output degenerate"

    if spec["name"] == "llama":
        # real text (a slice of the tokenizer/fit text), so the perplexity is in a realistic range
        start = int(torch.randint(0, text_ids.numel() - PPL_LEN, (1,), generator=g))
        ppl_ids = text_ids[start:start + PPL_LEN].clone()
        tensors["ppl_input_ids"] = ppl_ids
        ppl, ntok = hf_guide_ppl(m32, ppl_ids, PPL_SEQ_LEN, PPL_STRIDE)
        sd = {k: v.detach().clone() for k, v in m32.state_dict().items()}
        ref32 = ref_llama_logits(sd, m32.config, input_ids, torch.float32)
        xdiff = (ref32 - logits32).abs().max().item()
        log(f"llama: plain-torch reference vs transformers f32 logits max|d| = {xdiff:.3g}")
        assert xdiff < 1e-3, xdiff
        md["plain_torch_f32_vs_transformers_max_abs_diff"] = repr(xdiff)
        ppl64, ntok64 = hf_guide_ppl(None, ppl_ids, PPL_SEQ_LEN, PPL_STRIDE,
                                     logits_fn=lambda x: ref_llama_logits(sd, m32.config, x, torch.float64))
        assert ntok == ntok64
        md.update(ppl_seq_len=str(PPL_SEQ_LEN), ppl_stride=str(PPL_STRIDE), ppl=repr(ppl),
                  ppl_f64=repr(ppl64), ppl_num_loss_tokens=str(ntok))
        log(f"llama ppl (guide loop, seq {PPL_SEQ_LEN} stride {PPL_STRIDE}): f32 {ppl!r} f64 {ppl64!r} tokens {ntok}")
    save_file(tensors, os.path.join(d, "reference.safetensors"), metadata=md)
    return tensors, md


def window_story(n, seq_len, stride):
    """Describe the guide loop's windows: scored targets and weights."""
    parts, prev, wins = [], 0, 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        trg = end - prev
        scored = min(trg, end - begin - 1)
        parts.append((begin, end, scored, trg - 1))
        wins += 1
        prev = end
        if end == n:
            break
    first, mid, last = parts[0], parts[1:-1], parts[-1]
    assert all(p[2:] == mid[0][2:] for p in mid)
    return (f"{wins} windows; the first ([0, {first[1]})) scores {first[2]} targets with weight {first[3]}, the next "
            f"{len(mid)} score their last {mid[0][2]} targets with weight {mid[0][3]}, the last ([{last[0]}, {last[1]})) "
            f"scores {last[2]} targets with weight {last[3]}")


def manifest(out, specs, meta, summary):
    L = []
    L.append("# Test fixtures\n")
    L.append("Generated by `scripts/reference/make_fixtures.py`; do not edit by hand.\n")
    L.append(f"- Regenerate: `{meta['command']}` (run from the repository root)")
    L.append(f"- fixture_version {meta['fixture_version']}, transformers {meta['transformers_version']}, "
             f"torch {meta['torch_version']}, computed on CPU, float32, `attn_implementation=\"eager\"`.")
    L.append("- Weights: random init (torch.Generator seeded per model: matrices N(0, 0.1), RMSNorm weights "
             "1 + N(0, 0.1), biases N(0, 0.02)), then a short deterministic fit on CPU (AdamW lr 3e-3, batch 16 x 32 "
             "tokens of the tokenizer's training text, in rounds of 50 steps, at least 100, until greedy decoding "
             "of the prompt gives >= 6 distinct tokens in 20). Purely random weights decode greedily into one "
             "repeated token, which would not exercise KV-cache decoding.\n")
    L.append("## Tokenizer (shared by all models)\n")
    L.append("Byte-level BPE (`tokenizers`, vocab 512, no normalizer, ByteLevel pre-tokenizer with "
             "add_prefix_space=false and the GPT-2 regex, ByteLevel decoder, no post-processor), trained on "
             f"{summary['tok_bytes']} bytes of the installed transformers package's .py files. Special tokens: "
             "`<|endoftext|>`=0, `<|user|>`=1, `<|assistant|>`=2, `<|end|>`=3. tokenizer_config.json: "
             "eos_token `<|end|>`, pad_token `<|endoftext|>`, bos_token null, and the chat template:\n")
    L.append("```jinja\n" + CHAT_TEMPLATE + "\n```\n")
    L.append("generation_config.json: `eos_token_id` [3, 0], `pad_token_id` 0, `bos_token_id` null.\n")
    L.append("`tokenizer_cases.json`: strings with their ids/tokens/decodes from the `tokenizers` library, and "
             "chat conversations rendered with transformers' `apply_chat_template` (`rendered`) and their ids.\n")
    L.append("## Models (`models/<name>/`)\n")
    for s in specs:
        nm = s["name"]
        L.append(f"### `{nm}`\n")
        L.append(s["tests"] + "\n")
        L.append(f"- files: {', '.join(summary[nm]['files'])}")
        L.append(f"- parameters: {summary[nm]['params']}, stored as {str(s['save_dtype']).replace('torch.', '')}")
        L.append("")
    L.append("## reference.safetensors (in every model dir)\n")
    L.append("| tensor | dtype, shape | meaning |\n|---|---|---|")
    L.append(f"| `input_ids` | int64 [2, {SEQ}] | random ids in [4, 512), no padding |")
    L.append(f"| `logits` | float32 [2, {SEQ}, 512] | transformers logits for `input_ids` (model loaded in its stored dtype: "
             "f32, or bf16 for `llama3_tied_bf16`, cast to f32 for saving) |")
    L.append(f"| `logits_f32` | float32 [2, {SEQ}, 512] | `llama3_tied_bf16` only: same weights upcast to f32; "
             "metadata `bf16_vs_f32_max_abs_diff` = transformers' own bf16-vs-f32 gap |")
    L.append(f"| `greedy_prompt` | int64 [{GREEDY_PROMPT_LEN}] | first 7 tokens of `def fibonacci(n):\\n    return` |")
    L.append(f"| `greedy_output` | int64 [{GREEDY_NEW}] | the {GREEDY_NEW} new tokens of `generate(do_sample=False, "
             f"max_new_tokens={GREEDY_NEW}, eos_token_id=None)` on the f32 model (never stops early); metadata "
             "`greedy_matches_nocache_loop` says whether a plain no-KV-cache argmax loop gives the same tokens |")
    L.append(f"| `ppl_input_ids` | int64 [{PPL_LEN}] | `llama` only: 300 consecutive token ids of the tokenizer's training text, for the perplexity fixture |")
    L.append("")
    L.append("Metadata (strings): `fixture_version`, `command`, `transformers_version`, `torch_version`, and for "
             "`llama`: `ppl_seq_len`, `ppl_stride`, `ppl` (transformers, float32 model and loss), `ppl_f64` (same "
             "weights through an independent plain-torch Llama forward computed entirely in float64 — "
             "transformers' eager path keeps softmax and RMSNorm statistics in float32 — with the loss in "
             "float64), `ppl_num_loss_tokens`, `plain_torch_f32_vs_transformers_max_abs_diff`.\n")
    L.append("### Perplexity algorithm (Hugging Face perplexity guide, token-counting version)\n")
    L.append("```python\nnll_sum, n_tokens, prev_end = 0.0, 0, 0\nfor begin in range(0, N, stride):\n"
             "    end = min(begin + seq_len, N)\n    trg_len = end - prev_end\n    ids = x[begin:end]\n"
             "    labels = ids.clone(); labels[:-trg_len] = -100\n"
             "    loss = mean CE over shifted pairs (logits[t], labels[t+1]) with labels[t+1] != -100\n"
             "    num_loss_tokens = (labels != -100).sum() - 1      # guide subtracts batch_size (=1)\n"
             "    nll_sum += loss * num_loss_tokens; n_tokens += num_loss_tokens\n"
             "    prev_end = end\n    if end == N: break\nppl = exp(nll_sum / n_tokens)\n```\n")
    L.append(f"With N={PPL_LEN}, seq_len={PPL_SEQ_LEN}, stride={PPL_STRIDE}: " + window_story(PPL_LEN, PPL_SEQ_LEN, PPL_STRIDE)
             + f" (the guide's `- batch_size`), so n_tokens = {summary.get('ppl_tokens', '?')}. "
             "Reproduce this weighting exactly to match `ppl`.\n")
    L.append("## Values\n")
    for s in specs:
        nm = s["name"]
        L.append(f"- `{nm}`: fit steps {summary['fit_steps'][nm]}; greedy_output {summary[nm]['greedy']}" +
                 (f"; bf16 vs f32 max |Δlogit| {summary[nm]['gap']}" if summary[nm].get('gap') else ""))
    if "ppl" in summary:
        L.append(f"- `llama` perplexity: ppl {summary['ppl']}, ppl_f64 {summary['ppl_f64']}")
    with open(os.path.join(out, "MANIFEST.md"), "w") as f:
        f.write("\n".join(L) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    import transformers

    torch.manual_seed(args.seed)
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    meta = {
        "fixture_version": FIXTURE_VERSION,
        "command": "python3 " + shlex.join(sys.argv),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    out = args.out
    models_dir = os.path.join(out, "models")
    os.makedirs(models_dir, exist_ok=True)

    texts, nbytes = tokenizer_corpus()
    tok = train_tokenizer(texts, VOCAB)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    log(f"tokenizer trained on {nbytes} bytes ({len(texts)} files), vocab {tok.get_vocab_size()}")

    fit_ids = torch.tensor([i for t in texts for i in tok.encode(t).ids + [0]], dtype=torch.int64)
    prompt_ids = torch.tensor(tok.encode(PROMPT_TEXT).ids[:GREEDY_PROMPT_LEN], dtype=torch.int64).view(1, -1)
    specs = build_specs()
    summary = {"tok_bytes": nbytes}
    for i, spec in enumerate(specs):
        d = os.path.join(models_dir, spec["name"])
        torch.manual_seed(args.seed + i)
        model = spec["cls"](copy.deepcopy(spec["cfg"]))
        randomize_(model, args.seed + i)
        summary.setdefault("fit_steps", {})[spec["name"]] = quick_fit_(model, spec, fit_ids, prompt_ids, args.seed + i)
        model.eval()
        save_model(spec, model, d)
        write_tokenizer_files(tok, d, spec["cfg"].max_position_embeddings)
        cfg_loaded = json.load(open(os.path.join(d, "config.json")))
        log(f"{spec['name']}: config keys: rope_theta={cfg_loaded.get('rope_theta')} "
            f"rope_scaling={cfg_loaded.get('rope_scaling')} rope_parameters={cfg_loaded.get('rope_parameters')}")
        # the reloaded config must carry the intended rope parameters
        reloaded = spec["cls"].config_class.from_pretrained(d)
        assert reloaded.rope_parameters == spec["cfg"].rope_parameters, (reloaded.rope_parameters, spec["cfg"].rope_parameters)
        tensors, md = make_reference(spec, d, tok, args.seed + i, meta, fit_ids)
        nparams = sum(p.numel() for p in model.parameters())
        summary[spec["name"]] = {
            "files": sorted(os.listdir(d)),
            "params": nparams,
            "greedy": tensors["greedy_output"].tolist(),
            "gap": md.get("bf16_vs_f32_max_abs_diff"),
        }
        if "ppl" in md:
            summary.update(ppl=md["ppl"], ppl_f64=md["ppl_f64"], ppl_tokens=md["ppl_num_loss_tokens"])
    # bias sanity for qwen2
    from safetensors import safe_open
    with safe_open(os.path.join(models_dir, "qwen2_bias", "model.safetensors"), "pt") as f:
        b = f.get_tensor("model.layers.0.self_attn.q_proj.bias")
        assert b.abs().min() > 0 and b.std() > 0.005, b.std()
        assert "lm_head.weight" not in f.keys()

    cases = tokenizer_cases(os.path.join(models_dir, "llama"))
    with open(os.path.join(out, "tokenizer_cases.json"), "w") as f:
        json.dump(cases, f, indent=1, ensure_ascii=False)
        f.write("\n")
    manifest(out, specs, meta, summary)
    total = 0
    for dp, _, fn in os.walk(out):
        for f in fn:
            total += os.path.getsize(os.path.join(dp, f))
    log(f"total fixture size {total/1e6:.2f} MB")
    assert total < 5e6


if __name__ == "__main__":
    main()
