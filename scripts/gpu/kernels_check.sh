#!/usr/bin/env bash
# One GPU session for the CUDA packed-delta kernels (issue 5): tests, compute-sanitizer on the tests,
# `deltaserve bench kernels` (the default kernels beside the second pass's bf16 kernel, unfused
# and fused decode steps, same run) and BitDelta's Triton kernel on the same shapes. Run from the
# repository root on the GPU machine, with the binaries built on the build machine:
#   deltaserve          cargo build --release --features cuda -p deltaserve-cli
#   kernels-cuda-tests  cargo test --release --features cuda -p deltaserve-kernels --no-run
#                       (the `cuda-*` test executable it prints)
#   reference_logits,   cargo test --release --features cuda -p deltaserve-model --test reference_logits
#   tenant_batching     --test tenant_batching --no-run (optional: the model's CUDA tests, run first
#                       when present; env.sh links the build worktree's path, DS_WORKTREE, to
#                       $PWD so that they find their fixtures)
# Stripped and packed as one tarball (tar | xz: ~15 MB for the first two, ~11 MB for all four with
# a large dictionary; the carried tree, tracked files included, must stay under 64 MiB):
#   strip -o .bin/x/deltaserve ...; strip -o .bin/x/kernels-cuda-tests ...
#   tar cf - -C .bin/x deltaserve kernels-cuda-tests [reference_logits tenant_batching] \
#     | xz --lzma2=preset=9e,dict=256MiB > .bin/<name>.tar.xz
# then call `bash scripts/gpu/kernels_check.sh .bin/<name>.tar.xz` (carry: [".bin/<name>.tar.xz"]).
# Logs and JSON land in $OUT (or ./gpu-out when OUT is unset). Timeouts keep the whole call
# under ~5 minutes. BENCH_ARGS adds flags to the bench (e.g. `--mixes 32x32`), BENCH_TIMEOUT
# its time limit in seconds (100); SKIP_TRITON=1
# leaves out the Triton script.
set -uo pipefail
. "$(dirname "$0")/env.sh" "${1:-.bin/bin.tar.xz}" || exit 1
t0=$SECONDS

if [ -x $B/reference_logits ]; then
  echo "== model CUDA tests"
  for t in reference_logits tenant_batching; do
    timeout 60 $B/$t --test-threads=1 2>&1 | tee "$OUT/$t.log" | grep -E "^test |test result|panicked" | head -12
  done
fi

echo "== tests"
timeout 120 $B/kernels-cuda-tests --test-threads=4 --nocapture 2>&1 | tee "$OUT/tests.log" | grep -E "^test |test result|panicked|error" | head -30
echo "tests done at $((SECONDS - t0)) s"

echo "== compute-sanitizer (memcheck) on the tests"
# Two runs, so that a timeout in the larger int8/bf16 sweep cannot hide the others.
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 $B/kernels-cuda-tests --test-threads=1 \
  tenant_delta_matmul_add_fuses delta_linear_overlapped delta_linear_fused tenant_delta_matmul_many_rows leading_dims gradient_flows \
  decode_groups 2>&1 \
  | tee "$OUT/sanitizer.log" | grep -E "ERROR SUMMARY|test result|panicked|Invalid|error" | head -20
echo "sanitizer exit ${PIPESTATUS[0]} at $((SECONDS - t0)) s"
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 $B/kernels-cuda-tests --test-threads=1 \
  int8_and_bf16 2>&1 | tee "$OUT/sanitizer_int8.log" | grep -E "ERROR SUMMARY|test result|panicked|Invalid|error" | head -20
echo "sanitizer (binary/int8/bf16 sweep) exit ${PIPESTATUS[0]} at $((SECONDS - t0)) s"

echo "== bench kernels"
timeout ${BENCH_TIMEOUT:-100} $B/deltaserve bench kernels --device cuda:0 --iters 30 --prefill "" ${BENCH_ARGS:-} --json "$OUT/ours.json" 2>&1 | tee "$OUT/bench.log"
echo "bench done at $((SECONDS - t0)) s"

[ -n "${SKIP_TRITON:-}" ] && { echo "all done at $((SECONDS - t0)) s (Triton skipped)"; exit 0; }
echo "== BitDelta Triton"
timeout 70 python3 scripts/reference/bitdelta_triton_bench.py --iters 20 --ours "$OUT/ours.json" --json "$OUT/triton.json" 2>&1 | tee "$OUT/triton.log"
echo "all done at $((SECONDS - t0)) s"
