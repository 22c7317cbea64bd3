#!/bin/bash
# QA-HiRA on a 4-bit block-quantized demo base, and its merge into a quantized model
# (BENCHMARKS.md, "QA-HiRA merged into a quantized model"). CPU, ~40 min on 2 shared cores.
#
#   scripts/bench/qahira_demo.sh [OUT_DIR] [DELTASERVE]
#
# Needs the training data of the fine-tuning table:
#   python3 scripts/demo/make_finetune_data.py --n 2000 --out .work/finetune/docstring2code_train.jsonl
set -euo pipefail
OUT=${1:-.work/qahira_demo}
B=${2:-target/release/deltaserve}
TRAIN=.work/finetune/docstring2code_train.jsonl
HELD=assets/demo/data/docstring2code_heldout.jsonl
mkdir -p "$OUT"

# 1. The quantized base: 4-bit codes, 8x4 blocks (OUT x IN), F32 scale + offset per block.
$B quantize --model assets/demo/base --method blockq:bits=4,rows=8,cols=4 --out "$OUT/base-q4" --force --quiet

# 2. Adapters on the quantized base, the settings of the fine-tuning table.
for spec in "qahira --rank 5 --hira-groups 4,8" "lora --rank 5"; do
  name=${spec%% *}
  $B finetune --model "$OUT/base-q4" --data $TRAIN --eval $HELD --out "$OUT/$name.delta" \
    --adapter $spec --steps 80 --batch 4 --seq 256 --lr 2e-3 --save-every 40 --json --force \
    > "$OUT/$name.json"
done

# 3. The QA-HiRA adapter folded into the codes: a quantized model, no adapter.
$B merge --base "$OUT/base-q4" --delta "$OUT/qahira.delta" --out "$OUT/merged-q4" --force --quiet

# 4. The merged model's held-out perplexity by the same code path as finetune --eval
#    (the base perplexity of a run that stops before its first step).
$B finetune --model "$OUT/merged-q4" --data $TRAIN --eval $HELD --out "$OUT/unused.delta" \
  --checkpoint "$OUT/unused.ckpt" --adapter lora --steps 1 --stop-after 0 --batch 4 --seq 256 \
  --json --force > "$OUT/merged.json"
rm -f "$OUT/unused.ckpt"

# 5. Sliding-window perplexity on the held-out code text (windows of 512).
ppl() { $B eval ppl --data assets/demo/data/heldout_code.txt --seq-len 512 --stride 512 --json "$@"; }
{
  echo "base $(ppl --model assets/demo/base)"
  echo "base-q4 $(ppl --model "$OUT/base-q4")"
  echo "base-q4+qahira $(ppl --model "$OUT/base-q4" --delta "$OUT/qahira.delta")"
  echo "merged-q4 $(ppl --model "$OUT/merged-q4")"
  echo "base-q4+lora $(ppl --model "$OUT/base-q4" --delta "$OUT/lora.delta")"
} > "$OUT/ppl_code.txt"
# 6. The same with the quantized base's weights in f32 (`quantize --dtype f32`): the merged
#    model then equals base + adapter to f32 rounding (the bf16 base above rounds each weight).
$B quantize --model assets/demo/base --method blockq:bits=4,rows=8,cols=4 --dtype f32 --out "$OUT/base-q4f32" --force --quiet
$B finetune --model "$OUT/base-q4f32" --data $TRAIN --eval $HELD --out "$OUT/qahira-f32.delta" \
  --adapter qahira --rank 5 --hira-groups 4,8 --steps 80 --batch 4 --seq 256 --lr 2e-3 --save-every 40 --json --force \
  > "$OUT/qahira-f32.json"
$B merge --base "$OUT/base-q4f32" --delta "$OUT/qahira-f32.delta" --out "$OUT/merged-q4f32" --force --quiet
$B finetune --model "$OUT/merged-q4f32" --data $TRAIN --eval $HELD --out "$OUT/unused.delta" \
  --checkpoint "$OUT/unused.ckpt" --adapter lora --steps 1 --stop-after 0 --batch 4 --seq 256 \
  --json --force > "$OUT/merged-f32.json"
rm -f "$OUT/unused.ckpt"
{
  echo "base-q4f32 $(ppl --model "$OUT/base-q4f32")"
  echo "base-q4f32+qahira $(ppl --model "$OUT/base-q4f32" --delta "$OUT/qahira-f32.delta")"
  echo "merged-q4f32 $(ppl --model "$OUT/merged-q4f32")"
} >> "$OUT/ppl_code.txt"

for f in qahira lora merged qahira-f32 merged-f32; do
  python3 -c "import json,sys; d=json.load(open('$OUT/$f.json')); print('$f', {k: d.get(k) for k in ('trainable_params','seconds_per_step','eval_ppl_base','eval_ppl_adapter')})"
done
cat "$OUT/ppl_code.txt"
$B inspect "$OUT/merged-q4/quantization.delta" | sed -n 1,8p
