#!/usr/bin/env bash
# Runs on the GPU machine (device tool): LoRA / Q-BaRA / QA-HiRA fine-tuning step time on a
# Llama-2-7B-shaped random model (bf16, batch $BATCH x 512 tokens; batch 4 runs out of memory in ours: candle keeps every
# intermediate and a gradient for each), `deltaserve finetune` vs PyTorch +
# PEFT (if installed). Binary from .bin/b2.tar.xz. Step time of ours = (total of a 5-step run −
# total of a 2-step run) / 3, so the first step's CUDA warm-up is left out; the loss is read back
# every step, so each step's device work is finished inside its time.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
mkdir -p /tmp/b && tar -xJf .bin/b2.tar.xz -C /tmp/b
B=/tmp/b/deltaserve
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import peft, transformers, torch; print('peft', peft.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)" 2>&1 | tail -1
[ -f /tmp/l7b/config.json ] || ( time $B random-model --shape llama2-7b --out /tmp/l7b --tokenizer-from tests/fixtures/models/llama ) 2>&1 | tail -4
BATCH=${BATCH:-1}
for spec in "lora --rank 16" "qahira --rank 16 --hira-groups 8,16"; do
  name=$(echo $spec | cut -d' ' -f1)
  for n in 2 5; do
    timeout 120 $B finetune --model /tmp/l7b --data assets/demo/data/heldout_code.txt --out /tmp/$name.delta \
      --adapter $spec --steps $n --batch $BATCH --seq 512 --device cuda:0 --save-every 0 --json --force \
      > $OUT/ours_${name}_$n.json 2> $OUT/ours_${name}_$n.err || tail -n 3 $OUT/ours_${name}_$n.err
  done
  python3 -c "
import json
a=json.load(open('$OUT/ours_${name}_2.json')); b=json.load(open('$OUT/ours_${name}_5.json'))
print('ours $name trainable', b['trainable_params'], 'steady s/step', round((5*b['seconds_per_step']-2*a['seconds_per_step'])/3, 4), 'mean5', round(b['seconds_per_step'],4))" 2>&1 | tail -1
done
nvidia-smi --query-gpu=memory.used --format=csv,noheader
timeout 150 python3 scripts/reference/bench_finetune_peft.py --model /tmp/l7b --rank 16 --batch $BATCH --seq 512 --steps 5 2>&1 | tee $OUT/peft.jsonl | tail -n 4
