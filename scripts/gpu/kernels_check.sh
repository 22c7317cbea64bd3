#!/usr/bin/env bash
# One GPU session for the CUDA packed-delta kernels (issue 5): tests, compute-sanitizer on the tests,
# `deltaserve bench kernels`, BitDelta's Triton kernel on the same shapes, and the SASS of the
# tensor-core kernel. Run from the repository root on the GPU machine, with the binaries built on
# the build machine and copied into .bin/:
#   .bin/deltaserve          cargo build --release --features cuda -p deltaserve-cli
#   .bin/kernels-cuda-tests  cargo test --release --features cuda -p deltaserve-kernels --no-run
#                            (the `cuda-*` test executable it prints)
# Stripped, the two are ~105 MB, over what a device call carries; ship them as
# `.bin/bin.tar.xz` (tar | xz -6: ~14 MB) and start the call with
# `tar xJf .bin/bin.tar.xz -C .bin && bash scripts/gpu/kernels_check.sh`.
# Logs, JSON and the SASS land in $OUT (or ./gpu-out when OUT is unset): 7 files.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv

echo "== tests"
timeout 150 .bin/kernels-cuda-tests --test-threads=4 --nocapture 2>&1 | tee "$OUT/tests.log" | tail -25

echo "== compute-sanitizer (memcheck) on the tests"
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 .bin/kernels-cuda-tests --test-threads=1 \
  tenant_delta_matmul_many_rows prefill_sizes leading_dims sign_matmul_n gradient_flows 2>&1 \
  | tee "$OUT/sanitizer.log" | grep -E "ERROR SUMMARY|test result|panicked|Invalid|error" | head -20
echo "sanitizer exit ${PIPESTATUS[0]}"

echo "== bench kernels"
timeout 150 .bin/deltaserve bench kernels --device cuda:0 --iters 50 --json "$OUT/ours.json" 2>&1 | tee "$OUT/bench.log"

echo "== BitDelta Triton"
timeout 130 python3 scripts/reference/bitdelta_triton_bench.py --iters 30 --ours "$OUT/ours.json" --json "$OUT/triton.json" 2>&1 | tee "$OUT/triton.log"

echo "== SASS"
if nvcc --cubin -O3 -std=c++17 -arch=sm_90 -Xptxas -v -o /tmp/sm.cubin crates/deltaserve-kernels/src/cuda/sign_matmul.cu > /tmp/ptxas.log 2>&1; then
  cuobjdump -sass -fun ds_tc_bf16_t4_r1_v /tmp/sm.cubin > /tmp/t4.sass 2>&1
  for op in LOP3 HMMA SHF LDG IMAD IADD3 BRA; do echo "$op $(grep -c "\b$op" /tmp/t4.sass)"; done
  cp /tmp/t4.sass "$OUT/tc_t4_r1_v.sass"
fi
