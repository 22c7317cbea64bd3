#!/usr/bin/env bash
# ApiQ-style initialisation on the demo family (BENCHMARKS.md, "ApiQ initialisation"):
# perplexity of Q + L1L2 (rank $RANK) initialised to preserve each projection's outputs on
# calibration data (`decompose --init apiq`), next to the LQ-LoRA rows of lqlora_demo.sh (same
# NF configurations, same ILP budget for Q). CPU only; ~7 min per budget on 2 shared cores.
#   scripts/bench/apiq_demo.sh [OUT_DIR]
#   EXTRA="--apiq-parallel" scripts/bench/apiq_demo.sh /tmp/apiq_parallel        # ablation
#   EXTRA="--apiq-error-feedback" scripts/bench/apiq_demo.sh /tmp/apiq_feedback  # ablation
set -euo pipefail
BIN=${BIN:-target/release/deltaserve}
OUT=${1:-/tmp/apiq_demo}
RANK=${RANK:-8}
CONFIGS=${CONFIGS:-nf2-b16,nf2-b64,nf2-b256,nf3-b16,nf3-b64,nf3-b256,nf4-b64,nf4-b256}
BUDGETS=${BUDGETS:-2.5 2.75}
EXTRA=${EXTRA:-}
DATA=assets/demo/data/heldout_code.txt
PPL="eval ppl --data $DATA --seq-len 512 --stride 512 --json"
mkdir -p "$OUT"
for b in $BUDGETS; do
  # shellcheck disable=SC2086
  $BIN decompose --model assets/demo/base --rank "$RANK" --budget-bits "$b" --configs "$CONFIGS" \
    --iters 10 --init apiq --data assets/demo/data/calib.txt --apiq-windows 32 $EXTRA \
    --out "$OUT/apiq-$b" --force --quiet
  echo "apiq r=$RANK b=$b $EXTRA: $($BIN $PPL --model "$OUT/apiq-$b" --delta "$OUT/apiq-$b/lqlora_init.delta")" \
    | tee -a "$OUT/results.txt"
done
