#!/usr/bin/env bash
# Runs on the GPU machine (device tool): the model's CUDA tests, decode speed with and without a
# BitDelta delta (the fused delta_linear path), then `bench serve` with the base alone, 1 and 32
# tenants. Binaries come from the tarball named as the first argument (default `.bin/cuda.tar.xz`,
# unpacked by env.sh): `deltaserve` plus the model's CUDA test binaries `reference_logits` and
# `tenant_batching` (built here with `--features cuda`). Output in $OUT (default gpu-out).
set -u
. "$(dirname "$0")/env.sh" "${1:-.bin/cuda.tar.xz}" || exit 1
T0=$(date +%s)
echo "== model tests on cuda:0"
for t in reference_logits tenant_batching; do
  DELTASERVE_TEST_DEVICE=cuda:0 $B/$t --test-threads 1 2>&1 | grep -E "^test |test result|panicked|bf16 vs"
done
echo "== 7B-shaped random model and a BitDelta delta (fine-tune = base + 1% noise)"
$B/deltaserve random-model --shape llama2-7b --out /tmp/l7b --tokenizer-from tests/fixtures/models/llama 2>&1 | tail -1
$B/deltaserve random-model --shape llama2-7b --out /tmp/l7b-ft --finetune-of /tmp/l7b --noise 0.01 --seed 1 --tokenizer-from tests/fixtures/models/llama 2>&1 | tail -1
$B/deltaserve compress --base /tmp/l7b --finetuned /tmp/l7b-ft --method bitdelta --out /tmp/l7b-ft.delta 2>&1 | tail -2
echo "== decode, base then with the delta (512 prompt + 128 tokens)"
$B/deltaserve generate --model /tmp/l7b --device cuda:0 --random-prompt 512 --max-tokens 128 2>&1 >/dev/null | tail -1
for i in 1 2; do $B/deltaserve generate --model /tmp/l7b --delta /tmp/l7b-ft.delta --device cuda:0 --random-prompt 512 --max-tokens 128 2>&1 >/dev/null | tail -1; done
echo "after $(( $(date +%s) - T0 ))s"
echo "== bench serve: base, 1 and 32 tenants, 128 + 128 tokens, 32 in flight"
timeout "${BENCH_TIMEOUT:-330}" $B/deltaserve bench serve --base /tmp/l7b --delta /tmp/l7b-ft.delta --device cuda:0 \
  --tenants "${TENANTS:-0,1,32}" --concurrency 32 --requests 64 --prompt-tokens 128 --max-tokens 128 \
  --delta-memory 44GiB --work /tmp/bw --json "$OUT/bench_serve.json" 2>&1 | grep -v '\[='
echo "all done after $(( $(date +%s) - T0 ))s"
