#!/usr/bin/env bash
# The CPU kernel table of BENCHMARKS.md ("CPU kernels, third pass") in one command, under 3 minutes
# once built: `bash crates/deltaserve-kernels/benches/run_cpu.sh` from the repository root.
# Prints the machine's load before and after (the numbers mean little on a busy machine), runs the
# criterion bench into a fresh CRITERION_HOME and prints benches/report.py's tables.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out="$PWD/target/criterion-cpu-kernels"
cargo bench -p deltaserve-kernels --bench sign_matmul --no-run 2>&1 | tail -1
echo "start: $(date -u +%H:%M:%S) $(uptime | sed 's/.*load/load/'); cpu pressure $(head -1 /proc/pressure/cpu 2>/dev/null || echo n/a)"
rm -rf "$out"
CRITERION_HOME="$out" cargo bench -q -p deltaserve-kernels --bench sign_matmul -- \
    --warm-up-time 1 --measurement-time 2 "$@" >"$out.log" 2>&1 || { tail -20 "$out.log"; exit 1; }
echo "end:   $(date -u +%H:%M:%S) $(uptime | sed 's/.*load/load/'); cpu pressure $(head -1 /proc/pressure/cpu 2>/dev/null || echo n/a)"
echo
python3 crates/deltaserve-kernels/benches/report.py "$out"
