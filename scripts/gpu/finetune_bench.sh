#!/usr/bin/env bash
# Runs on the GPU machine (device tool): `deltaserve finetune` step time, phase profile and peak
# GPU memory on a Llama-2-7B-shaped random model (bf16, sequences of 512 tokens), optionally next
# to PyTorch + PEFT (scripts/reference/bench_finetune_peft.py) in the same call.
#
#   BIN=.bin/F.tar.xz RUNS="lora:1:true lora:4:true lora:1:false qahira:1:true" PEFT="1 4" \
#     bash scripts/gpu/finetune_bench.sh
#
# RUNS: ADAPTER:BATCH:CHECKPOINT_LAYERS entries. Each run does STEPS optimizer steps (default 4)
# with --profile; its step time is the median of steps 2..STEPS (the first step's CUDA warm-up is
# left out; the loss is read back every step, so each step's device work is inside its time).
# Peak memory: the maximum of `nvidia-smi --query-gpu=memory.used` polled every 100 ms during the
# run (the whole process: CUDA context, weights, candle's allocations). PEFT: one JSON line per
# attention implementation and batch; PEFT_CKPT=1 adds a run with transformers' gradient
# checkpointing. Results: $OUT/*.json, *.err, and a summary on stdout.
set -u
BIN=${BIN:-.bin/F.tar.xz}
RUNS=${RUNS:-"lora:1:true lora:4:true lora:1:false qahira:1:true"}
STEPS=${STEPS:-4}
PEFT=${PEFT:-}
OUT=${OUT:-/tmp/out}
. "$(dirname "$0")/env.sh" "$BIN" || exit 1
DS=$B/deltaserve
[ -f /tmp/l7b/config.json ] || ( time $DS random-model --shape llama2-7b --out /tmp/l7b --tokenizer-from tests/fixtures/models/llama ) 2>&1 | tail -4
# Warm-up, numbers discarded: on a fresh machine the first CUDA run JIT-compiles candle's PTX
# kernels (the 2026-11-26 call lost its first 150 s run to this).
timeout 300 $DS finetune --model /tmp/l7b --data assets/demo/data/heldout_code.txt --out /tmp/warm.delta \
  --adapter lora --rank 16 --steps 1 --batch 1 --seq 64 --device cuda:0 --save-every 0 --force > /dev/null 2>&1
for run in $RUNS; do
  IFS=: read -r adapter batch ckpt <<< "$run"
  case $adapter in
    qahira) spec="--adapter qahira --rank 16 --hira-groups 8,16" ;;
    *) spec="--adapter $adapter --rank 16" ;;
  esac
  name=${adapter}_b${batch}_ckpt${ckpt}
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/$name.mem" &
  poll=$!
  timeout 150 $DS finetune --model /tmp/l7b --data assets/demo/data/heldout_code.txt --out /tmp/$name.delta \
    $spec --steps "$STEPS" --batch "$batch" --seq 512 --device cuda:0 --save-every 0 --json --force \
    --checkpoint-layers "$ckpt" --profile > "$OUT/$name.json" 2> "$OUT/$name.err"
  rc=$?
  kill $poll 2>/dev/null; wait $poll 2>/dev/null
  peak=$(sort -n "$OUT/$name.mem" | tail -1)
  python3 - "$OUT/$name.json" "$name" "$rc" "$peak" <<'EOF'
import json, statistics, sys
path, name, rc, peak = sys.argv[1:]
try:
    r = json.load(open(path))
except Exception:
    print(f"{name}: exit {rc}, no report (see {name}.err), peak {peak} MiB")
    sys.exit(0)
s = r["step_seconds"]
n = len(s)
p = {k: round(v / n, 4) for k, v in (r.get("profile") or {}).items()}
print(f"{name}: trainable {r['trainable_params']}, s/step median(2..) {statistics.median(s[1:]):.4f}, "
      f"steps {[round(x, 3) for x in s]}, peak {peak} MiB, per-step profile {p}")
EOF
  tail -n 2 "$OUT/$name.err" | grep -iE "error|out of memory" || true
done
for b in $PEFT; do
  timeout 200 python3 scripts/reference/bench_finetune_peft.py --model /tmp/l7b --rank 16 --batch "$b" --seq 512 \
    --steps 5 ${PEFT_ATTN:+--attn $PEFT_ATTN} ${PEFT_CKPT:+--grad-ckpt} 2>&1 | tee "$OUT/peft_b$b.jsonl" | grep impl \
    | python3 -c "
import json, statistics, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r['impl'], 'batch', r['batch'], 's/step median(2..)', round(statistics.median(r['step_seconds'][1:]), 4), 'peak', round(r['peak_mem_gb'], 1), 'GiB')"
done
