#!/usr/bin/env bash
# Runs on the GPU machine (device tool): the model tests on CUDA, then generation speed of a
# Llama-2-7B-shaped random model, ours against transformers' generate, with and without a delta.
# Binaries come from the tarball named as the first argument (default `.bin/cuda.tar.xz`, built
# here with `--features cuda`, see README), unpacked by env.sh.
set -u
. "$(dirname "$0")/env.sh" "${1:-.bin/cuda.tar.xz}" || exit 1
echo "== model tests on cuda:0"
for t in reference_logits tenant_batching; do
  DELTASERVE_TEST_DEVICE=cuda:0 $B/$t --test-threads 1 2>&1 | grep -E "^test |test result|panicked|bf16 vs" 
done
echo "== 7B-shaped random model, bf16"
$B/deltaserve random-model --shape llama2-7b --out /tmp/l7b --tokenizer-from tests/fixtures/models/llama
for i in 1 2; do $B/deltaserve generate --model /tmp/l7b --device cuda:0 --random-prompt 512 --max-tokens 128 2>&1 >/dev/null | tail -1; done
python3 scripts/reference/bench_generate_hf.py --model /tmp/l7b --prompt-tokens 512 --new-tokens 128 2>&1 | tail -1
echo "== with a BitDelta delta (fine-tune = base + 1% noise)"
timeout 240 $B/deltaserve random-model --shape llama2-7b --out /tmp/l7b-ft --finetune-of /tmp/l7b --noise 0.01 --seed 1 --tokenizer-from tests/fixtures/models/llama \
  && timeout 200 $B/deltaserve compress --base /tmp/l7b --finetuned /tmp/l7b-ft --method bitdelta --out /tmp/l7b-ft.delta 2>&1 | tail -6 \
  && for i in 1 2; do $B/deltaserve generate --model /tmp/l7b --delta /tmp/l7b-ft.delta --device cuda:0 --random-prompt 512 --max-tokens 128 2>&1 >/dev/null | tail -1; done
