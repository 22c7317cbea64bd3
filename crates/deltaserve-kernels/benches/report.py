#!/usr/bin/env python3
"""Prints the tables of BENCHMARKS.md ("CPU kernels, third pass") from criterion's results of
`benches/sign_matmul.rs`: `python3 crates/deltaserve-kernels/benches/report.py [CRITERION_HOME]`
(`benches/run_cpu.sh` runs the bench and then this).

GB/s are 10^9 bytes per second of the bytes each call reads and writes (Throughput::Bytes), from
criterion's median time. The bandwidth floor is `membw/read_1GiB_all_threads` (a 1 GiB buffer
streamed by every thread, each over its own contiguous part), measured at the start and again at
the end of the run; the higher of the two is used, so a fraction is never flattered by a slow
moment of the machine."""
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


def rate(key):
    r = runs.get(key)
    return r[1] if r else float("nan")


starts = (rate("membw/read_1GiB_all_threads"), rate("membw/read_1GiB_1_thread"))
ends = (rate("membw/read_1GiB_all_threads_end"), rate("membw/read_1GiB_1_thread_end"))
floor = max(x for x in (starts[0], ends[0]) if x == x)
print(f"Read bandwidth (1 GiB streamed, all threads / one thread): start {starts[0]:.1f} / {starts[1]:.1f} GB/s, "
      f"end {ends[0]:.1f} / {ends[1]:.1f} GB/s; floor = {floor:.1f} GB/s\n")


def fmt_t(ns):
    return f"{ns / 1e3:.0f} µs" if ns < 1e6 else f"{ns / 1e6:.2f} ms"


shapes = [("llama7b_qkvo", 4096, 4096), ("llama7b_up", 11008, 4096), ("llama7b_down", 4096, 11008)]
print("Decode, M = 1:\n")
print("| shape (N×K) | kernel | weights | time | GB/s | of floor | vs candle bf16 | vs candle f32 |")
print("|---|---|---|---|---|---|---|---|")
for name, n, k in shapes:
    bf16 = runs.get(f"dense_bf16_cold/{name}/m1")
    f32 = runs.get(f"dense_f32_cold/{name}/m1")
    rows = []
    for level in ("Avx512_interleaved", "Avx512", "Avx2", "Portable"):
        for placement in ("cold", "hot"):
            r = runs.get(f"sign_t_{placement}/{name}/{level}/m1")
            if r:
                rows.append((f"x·Sᵀ {level}", f"sign bits, {placement}", r))
    if bf16:
        rows.append(("candle matmul", "dense bf16, cold", bf16))
    if f32:
        rows.append(("candle matmul", "dense f32, cold", f32))
    for kernel, weights, (ns, gbs) in rows:
        vs_bf16 = f"{bf16[0] / ns:.1f}×" if bf16 else "-"
        vs_f32 = f"{f32[0] / ns:.1f}×" if f32 else "-"
        print(f"| {name} ({n}×{k}) | {kernel} | {weights} | {fmt_t(ns)} | {gbs:.1f} | {gbs / floor:.0%} | {vs_bf16} | {vs_f32} |")

print("\nBatches of one tenant, cold (compute-bound: G sign-products/s = M·N·K / time):\n")
print("| shape (N×K) | M | kernel | time | G products/s | GB/s | of floor |")
print("|---|---|---|---|---|---|---|")
for name, n, k in shapes:
    for m in (1, 8, 32):
        for level in ("Avx512", "Avx2", "Portable"):
            r = runs.get(f"sign_t_cold/{name}/{level}/m{m}")
            if r and (m > 1 or level == "Avx512"):
                ns, gbs = r
                print(f"| {name} ({n}×{k}) | {m} | {level} | {fmt_t(ns)} | {m * n * k / ns:.0f} | {gbs:.1f} | {gbs / floor:.0%} |")

mixes = sorted((key, r) for key, r in runs.items() if key.startswith("tenants_cold/"))
if mixes:
    print("\nBatch mixes, `tenant_delta_matmul` on 4096×4096, cold (bytes = distinct tenants × 2 MiB of bits + x + out):\n")
    print("| mix | time | GB/s | of floor |")
    print("|---|---|---|---|")
    for key, (ns, gbs) in mixes:
        print(f"| {key.split('/')[-1]} | {fmt_t(ns)} | {gbs:.1f} | {gbs / floor:.0%} |")
