#!/usr/bin/env python3
"""Prints the markdown tables of BENCHMARKS.md ("CPU sign-matmul kernels") from criterion's
results: run `cargo bench -p deltaserve-kernels --bench sign_matmul` first, then
`python3 crates/deltaserve-kernels/benches/report.py [target/criterion]`.

GB/s are 10^9 bytes per second of the bytes each call reads and writes (Throughput::Bytes). The
fraction is of a reference read rate from the same run: `membw/sum_1GiB_all_threads`, or candle's
dense f32 GEMV (M = 1) where that reads faster, so the fraction is never flattered by a weak
baseline."""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
runs = {}
for bench in root.glob("**/new/benchmark.json"):
    meta = json.loads(bench.read_text())
    est = json.loads((bench.parent / "estimates.json").read_text())
    ns = est["median"]["point_estimate"]
    nbytes = meta.get("throughput", {}).get("Bytes")
    runs[meta["full_id"]] = (ns, nbytes / ns if nbytes else None)

bw_sum = runs["membw/sum_1GiB_all_threads"][1]
bw1 = runs["membw/sum_1GiB_1_thread"][1]
gemv = max((r[1] for key, r in runs.items() if key.startswith("dense_f32_cold/") and key.endswith("/m1")), default=0)
bw = max(bw_sum, gemv)
print(f"Read bandwidth: sum of 1 GiB f32 {bw_sum:.1f} GB/s on all threads ({bw1:.1f} on one); "
      f"candle dense f32 GEMV up to {gemv:.1f} GB/s; reference = {bw:.1f} GB/s\n")

shapes = [("llama7b_qkvo", 4096, 4096), ("llama7b_up", 11008, 4096), ("llama7b_down", 4096, 11008)]
print("| shape (N×K) | M | weights | kernel | time | GB/s | of reference | vs dense bf16 | vs dense f32 |")
print("|---|---|---|---|---|---|---|---|---|")
for name, n, k in shapes:
    for m in (1, 8):
        bf16 = runs.get(f"dense_bf16_cold/{name}/m{m}")
        f32 = runs.get(f"dense_f32_cold/{name}/m{m}")
        rows = []
        for placement in ("cold", "hot"):
            for level in ("Avx512", "Avx2", "Portable"):
                r = runs.get(f"sign_t_{placement}/{name}/{level}/m{m}")
                if r:
                    rows.append((f"sign bits, {placement}", f"x·Sᵀ {level}", r))
        if bf16:
            rows.append(("dense bf16, cold", "candle matmul", bf16))
        if f32:
            rows.append(("dense f32, cold", "candle matmul", f32))
        for weights, kernel, (ns, gbs) in rows:
            t = f"{ns / 1e3:.0f} µs" if ns < 1e6 else f"{ns / 1e6:.2f} ms"
            vs_bf16 = f"{bf16[0] / ns:.1f}×" if bf16 else "-"
            vs_f32 = f"{f32[0] / ns:.1f}×" if f32 else "-"
            print(f"| {name} ({n}×{k}) | {m} | {weights} | {kernel} | {t} | {gbs:.1f} | {gbs / bw:.0%} | {vs_bf16} | {vs_f32} |")

t = runs.get("tenant_delta_cold/llama7b_qkvo/m8_4tenants")
if t:
    print(f"\nMulti-tenant (`tenant_delta_cold/llama7b_qkvo/m8_4tenants`: 8 rows, 4 tenants + 2 base-only rows): "
          f"{t[0] / 1e3:.0f} µs, {t[1]:.1f} GB/s ({t[1] / bw:.0%} of bandwidth)")
