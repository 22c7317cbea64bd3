#!/usr/bin/env bash
# Nsight Compute profile of the fused decode kernel and the unfused step (issue 5, fifth pass):
#   bash scripts/gpu/kernels_profile.sh .bin/<name>.tar.xz   (binaries as for kernels_check.sh)
# Reports land in $OUT as text; PROF_SPECS (name:kernel regex:count:mix ...), PROF_SHAPE and
# PROF_TIMEOUT override the defaults. Clocks are not locked (--clock-control none), so durations are
# comparable to the bench's; the bench runs under CUDA graphs, whose kernel nodes ncu profiles
# one by one (its default --graph-profiling node).
set -uo pipefail
. "$(dirname "$0")/env.sh" "${1:-.bin/bin.tar.xz}" || exit 1
NCU=$(ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"; ls /usr/local/cuda*/bin | tr '\n' ' '; echo
SECS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats"
prof() {  # name, kernel regex, count, mixes, [extra env]
  timeout ${PROF_TIMEOUT:-70} $NCU --clock-control none --kernel-name "regex:$2" --launch-skip 2 --launch-count $3 $SECS \
    $B/deltaserve bench kernels --device cuda:0 --shapes ${PROF_SHAPE:-4096x4096} --mixes $4 --iters 3 --prefill "" \
    > "$OUT/ncu_$1.txt" 2>&1
  echo "$1 exit $?"; grep -E "^  [a-z_]|Duration|Memory Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occ|Block Limit|Warp Cycles Per Issued|Issued Warp|No Eligible|One or More" "$OUT/ncu_$1.txt" | head -60
}
t0=$SECONDS
for spec in ${PROF_SPECS:-"f32x1:ds_fused_bf16_r4:2:32x1" "f8x1:ds_fused_bf16_r1:2:8x1" "u32x8:^(ds_t|ds_p|gemv|gemm|sm90|cutlass|ampere|Kernel):8:32x8"}; do
  IFS=: read -r name re cnt mix <<< "$spec"
  prof "$name" "$re" "$cnt" "$mix"
  echo "at $((SECONDS - t0)) s"
done
