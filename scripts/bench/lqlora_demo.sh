#!/usr/bin/env bash
# LQ-LoRA evidence on the demo family (BENCHMARKS.md, "LQ-LoRA decomposition (B1)"):
# perplexity of Q + L1L2 (rank $RANK) against NF quantization alone (rank 0) under the same ILP
# bit budget for Q, with and without Fisher weighting. CPU only.
#   scripts/bench/lqlora_demo.sh [OUT_DIR]
set -euo pipefail
BIN=${BIN:-target/release/deltaserve}
OUT=${1:-/tmp/lqlora_demo}
RANK=${RANK:-8}
CONFIGS=${CONFIGS:-nf2-b16,nf2-b64,nf2-b256,nf3-b16,nf3-b64,nf3-b256,nf4-b64,nf4-b256}
BUDGETS=${BUDGETS:-2.25 2.5 2.75 3.25}
DATA=assets/demo/data/heldout_code.txt
PPL="eval ppl --data $DATA --seq-len 512 --stride 512 --json"
mkdir -p "$OUT"
echo "base: $($BIN $PPL --model assets/demo/base)" | tee "$OUT/results.txt"
for b in $BUDGETS; do
  for fisher in "" "--fisher --data assets/demo/data/calib.txt --fisher-windows 16"; do
    tag=$([ -n "$fisher" ] && echo fisher || echo plain)
    $BIN decompose --model assets/demo/base --rank 0 --budget-bits "$b" --configs "$CONFIGS" $fisher \
      --out "$OUT/nf-$b-$tag" --force --quiet
    echo "nf b=$b $tag: $($BIN $PPL --model "$OUT/nf-$b-$tag")" | tee -a "$OUT/results.txt"
    $BIN decompose --model assets/demo/base --rank "$RANK" --budget-bits "$b" --configs "$CONFIGS" $fisher \
      --iters 10 --out "$OUT/lq-$b-$tag" --force --quiet
    echo "lq r=$RANK b=$b $tag: $($BIN $PPL --model "$OUT/lq-$b-$tag" --delta "$OUT/lq-$b-$tag/lqlora_init.delta")" \
      | tee -a "$OUT/results.txt"
  done
done
