#!/usr/bin/env bash
# Runs on the GPU machine (device tool): `deltaserve bench serve` on a Llama-2-7B-shaped random
# base, base alone and 1/8/32/128 tenants, 128 prompt + 128 generated tokens per request, 32 in
# flight. Writes bench_serve.json, the log and a GPU utilisation trace under $OUT.
# The binary comes from the tarball named as the first argument (default `.bin/engC.tar.xz`,
# `deltaserve` built here with `--features cuda`, see README), unpacked by env.sh.
# Budget: the whole call must fit the device allowance, so the benchmark runs under a timeout and
# rewrites its JSON after every tenant count (a cut-short run keeps what it measured).
set -u
. "$(dirname "$0")/env.sh" "${1:-.bin/engC.tar.xz}" || exit 1
DS=$B/deltaserve
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
nproc; free -g | head -2
echo "== 7B-shaped random base (bf16)"
$DS random-model --shape llama2-7b --out /tmp/l7b --tokenizer-from tests/fixtures/models/llama 2>&1 | tail -1
echo "base written after $(( $(date +%s) - T0 ))s"
nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.memory,memory.used --format=csv -lms 500 > "$OUT/gpu_util.csv" 2>/dev/null &
SMI=$!
# RUNS: space-separated TENANT_COUNTS:REQUESTS[:MAX_TOKENS], one bench process each (each reloads
# the base).
RUNS=${RUNS:-"0,32,1,8,128:64"}
k=0
for r in $RUNS; do
  k=$((k + 1))
  IFS=: read -r counts reqs maxtok <<< "$r"
  echo "== bench serve: tenants $counts (0 = base only), $reqs requests of 128 + ${maxtok:-128} tokens; BitDelta-layout deltas with their own embeddings, norms and lm_head"
  timeout "${BENCH_TIMEOUT:-300}" $DS bench serve --base /tmp/l7b --device cuda:0 \
    --tenants "$counts" --concurrency 32 --requests "$reqs" --prompt-tokens 128 --max-tokens "${maxtok:-128}" \
    --delta-memory 44GiB --work /tmp/bw --json "$OUT/bench_serve_$k.json" 2>&1 | tee "$OUT/bench_serve_$k.log" | grep -v '\[='
done
echo "bench done after $(( $(date +%s) - T0 ))s"
# With time left: the same 32-tenant mix with sign-only deltas (tenants share the base's
# embeddings and lm_head), which separates the per-tenant lm_head's cost from the sign deltas'.
if [ $(( $(date +%s) - T0 )) -lt "${SECOND_BEFORE:-330}" ]; then
  echo "== bench serve: sign-only deltas, 32 tenants"
  timeout 90 $DS bench serve --base /tmp/l7b --device cuda:0 --tenants 32 --sign-only \
    --concurrency 32 --requests 64 --prompt-tokens 128 --max-tokens 128 \
    --delta-memory 44GiB --work /tmp/bw --json "$OUT/bench_serve_sign_only.json" 2>&1 | tee "$OUT/bench_serve_sign_only.log" | grep -v '\[='
fi
kill $SMI 2>/dev/null
echo "all done after $(( $(date +%s) - T0 ))s"
