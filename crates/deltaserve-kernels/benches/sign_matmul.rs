//! `x · Sᵀ` from packed bits against candle's dense `x · Wᵀ` (f32 and bf16) on llama-7B layer
//! shapes, beside the machine's memory-read bandwidth.
//!
//! Run: `cargo bench -p deltaserve-kernels --bench sign_matmul -- --warm-up-time 1 --measurement-time 3`
//!
//! Throughput is the bytes each call really reads and writes: the weights (sign bits, or the dense
//! matrix), `x` and the output. Two placements of the weights:
//! - `cold`: calls rotate over distinct copies of the weights adding up to more than the
//!   last-level cache, so every call reads them from DRAM, as decoding a whole model does;
//! - `hot`: one copy, called again and again, so it sits in cache (an upper bound).
//!
//! `membw/sum_1GiB` is the reference point: summing a 1 GiB `f32` array on every core.
//! `benches/report.py` turns the results into the table of `BENCHMARKS.md` ("CPU sign-matmul
//! kernels"), taking the fraction of the faster of that sum and candle's dense f32 GEMV. On a
//! machine shared with other work, `examples/sign_matmul_per_core.rs` gives CPU-time numbers.

use std::hint::black_box;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use deltaserve_kernels::cpu::{self, ScaledSigns, SimdLevel};
use deltaserve_kernels::{words_per_row, SignsView};
use rayon::prelude::*;

/// `(name, N out, K in)` of llama-7B's linear layers (`config.json`: hidden 4096, intermediate
/// 11008).
const SHAPES: [(&str, usize, usize); 3] = [
    ("llama7b_qkvo", 4096, 4096),
    ("llama7b_up", 11008, 4096),
    ("llama7b_down", 4096, 11008),
];

/// Rows of `x`: decode (one token) and a small batch.
const MS: [usize; 2] = [1, 8];

/// Weight bytes the `cold` benches rotate over: more than the 300 MiB L3 `lscpu` reports.
const COLD_BYTES: usize = 640 << 20;

/// Cheap deterministic filler (values do not change the timing).
struct Lcg(u64);

impl Lcg {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 32) as u32
    }
    fn next_f32(&mut self) -> f32 {
        self.next_u32() as f32 / u32::MAX as f32 - 0.5
    }
}

fn copies(bytes_each: usize, cold: bool) -> usize {
    if cold {
        COLD_BYTES.div_ceil(bytes_each).max(2)
    } else {
        1
    }
}

fn bench_sign(c: &mut Criterion) {
    let mut rng = Lcg(1);
    let mut levels = vec![SimdLevel::detect()];
    if SimdLevel::detect() != SimdLevel::Avx2 && SimdLevel::Avx2.is_available() {
        levels.push(SimdLevel::Avx2);
    }
    for (name, n, k) in SHAPES {
        let bits_bytes = n * words_per_row(k) * 4;
        for placement in ["cold", "hot"] {
            let count = copies(bits_bytes, placement == "cold");
            let mats: Vec<Vec<u32>> = (0..count)
                .map(|_| (0..n * words_per_row(k)).map(|_| rng.next_u32()).collect())
                .collect();
            let mut group = c.benchmark_group(format!("sign_t_{placement}/{name}"));
            for m in MS {
                let x: Vec<f32> = (0..m * k).map(|_| rng.next_f32()).collect();
                group.throughput(Throughput::Bytes(
                    (bits_bytes + 4 * m * k + 4 * m * n) as u64,
                ));
                for &level in &levels {
                    let mut i = 0;
                    group.bench_function(
                        BenchmarkId::new(format!("{level:?}"), format!("m{m}")),
                        |b| {
                            b.iter(|| {
                                i = (i + 1) % count;
                                let signs = SignsView::new(&mats[i], n, k).unwrap();
                                black_box(
                                    cpu::sign_matmul_t_with(level, black_box(&x), signs).unwrap(),
                                )
                            })
                        },
                    );
                }
            }
            group.finish();
        }
    }
}

fn bench_dense(c: &mut Criterion) {
    let mut rng = Lcg(2);
    let dev = Device::Cpu;
    for (name, n, k) in SHAPES {
        for (dtype, bytes) in [(DType::F32, 4), (DType::BF16, 2)] {
            let count = copies(n * k * bytes, true);
            let weights: Vec<Tensor> = (0..count)
                .map(|_| {
                    let w: Vec<f32> = (0..n * k).map(|_| rng.next_f32()).collect();
                    Tensor::from_vec(w, (n, k), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                })
                .collect();
            let mut group =
                c.benchmark_group(format!("dense_{dtype:?}_cold/{name}").to_lowercase());
            group.sample_size(10);
            for m in MS {
                let x: Vec<f32> = (0..m * k).map(|_| rng.next_f32()).collect();
                let x = Tensor::from_vec(x, (m, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                group.throughput(Throughput::Bytes((bytes * (n * k + m * k + m * n)) as u64));
                let mut i = 0;
                group.bench_function(format!("m{m}"), |b| {
                    b.iter(|| {
                        i = (i + 1) % count;
                        black_box(x.matmul(&weights[i].t().unwrap()).unwrap())
                    })
                });
            }
            group.finish();
        }
    }
}

/// Four tenants and base-only rows in one batch of 8 on the qkvo shape: each delta's bits read once.
fn bench_tenants(c: &mut Criterion) {
    let mut rng = Lcg(3);
    let (n, k) = (4096, 4096);
    let tenants = 4;
    let count = copies(tenants * n * words_per_row(k) * 4, true);
    let mats: Vec<Vec<u32>> = (0..count * tenants)
        .map(|_| (0..n * words_per_row(k)).map(|_| rng.next_u32()).collect())
        .collect();
    let row_slot = [
        Some(0),
        Some(1),
        Some(1),
        None,
        Some(2),
        Some(3),
        Some(3),
        None,
    ];
    let x: Vec<f32> = (0..row_slot.len() * k).map(|_| rng.next_f32()).collect();
    let mut group = c.benchmark_group("tenant_delta_cold/llama7b_qkvo");
    let bytes = tenants * n * words_per_row(k) * 4 + 4 * row_slot.len() * (k + n);
    group.throughput(Throughput::Bytes(bytes as u64));
    let mut i = 0;
    group.bench_function("m8_4tenants", |b| {
        b.iter(|| {
            i = (i + 1) % count;
            let deltas: Vec<ScaledSigns> = mats[i * tenants..(i + 1) * tenants]
                .iter()
                .map(|w| ScaledSigns {
                    signs: SignsView::new(w, n, k).unwrap(),
                    scale: 0.01,
                })
                .collect();
            black_box(cpu::tenant_delta_matmul(black_box(&x), &row_slot, &deltas).unwrap())
        })
    });
    group.finish();
}

/// Memory-read bandwidth: the sum of a 1 GiB `f32` array, split over rayon's threads (all cores)
/// or on one thread.
fn bench_membw(c: &mut Criterion) {
    let len = (1usize << 30) / 4;
    let data: Vec<f32> = (0..len).map(|i| (i % 7) as f32).collect();
    fn sum(chunk: &[f32]) -> f32 {
        // 16 independent lanes, so the compiler vectorizes and the adds never limit the reads.
        let mut lanes = [0f32; 16];
        for c in chunk.chunks_exact(16) {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l += v;
            }
        }
        lanes.iter().sum()
    }
    let mut group = c.benchmark_group("membw");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((len * 4) as u64));
    group.bench_function("sum_1GiB_all_threads", |b| {
        b.iter(|| black_box(data.par_chunks(1 << 20).map(sum).sum::<f32>()))
    });
    group.bench_function("sum_1GiB_1_thread", |b| b.iter(|| black_box(sum(&data))));
    group.finish();
}

criterion_group!(benches, bench_membw, bench_sign, bench_tenants, bench_dense);
criterion_main!(benches);
