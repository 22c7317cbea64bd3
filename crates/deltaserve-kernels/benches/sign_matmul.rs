//! `x · Sᵀ` from packed bits against this machine's memory-read bandwidth and candle's dense
//! `x · Wᵀ` (f32 and bf16), on llama-7B layer shapes.
//!
//! Run the whole CPU table (under 3 minutes once built): `bash crates/deltaserve-kernels/benches/run_cpu.sh`,
//! which runs `cargo bench -p deltaserve-kernels --bench sign_matmul -- --warm-up-time 1
//! --measurement-time 2` into a fresh `CRITERION_HOME` and prints `benches/report.py`'s table.
//!
//! Throughput is the bytes each call really reads and writes: the weights (sign bits, or the dense
//! matrix), `x` and the output. Two placements of the weights:
//! - `cold`: calls rotate over distinct copies of the weights adding up to more than twice the
//!   last-level cache (`lscpu`: 300 MiB L3), so every call reads them from DRAM, as decoding a
//!   whole model does;
//! - `hot`: one copy, called again and again, so it sits in cache (the kernel's compute bound).
//!
//! The bandwidth floor, `membw/read_1GiB_all_threads`, is read the way the kernel reads: a 1 GiB
//! buffer (well past the L3) streamed once per call by every rayon thread, each over its own
//! contiguous part, with 64-byte AVX-512 loads where the CPU has them. `read_1GiB_1_thread` is one
//! core's rate. `benches/report.py` takes each kernel's fraction of the all-threads figure.

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

/// Rows of `x`: decode (one token) and two batch sizes of the table.
const MS: [usize; 3] = [1, 8, 32];

/// Weight bytes the `cold` benches rotate over: more than twice the 300 MiB L3 `lscpu` reports.
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

fn random_words(rng: &mut Lcg, n: usize, k: usize) -> Vec<u32> {
    (0..n * words_per_row(k)).map(|_| rng.next_u32()).collect()
}

/// Decode (`M = 1`) cold and hot at the detected level, plus cold `M = 1` at AVX2 for comparison
/// and cold batches of 8 and 32 rows (one tenant) at the detected level.
fn bench_sign(c: &mut Criterion) {
    let mut rng = Lcg(1);
    let best = SimdLevel::detect();
    for (name, n, k) in SHAPES {
        let bits_bytes = n * words_per_row(k) * 4;
        for placement in ["cold", "hot"] {
            let count = copies(bits_bytes, placement == "cold");
            let mats: Vec<Vec<u32>> = (0..count).map(|_| random_words(&mut rng, n, k)).collect();
            let mut group = c.benchmark_group(format!("sign_t_{placement}/{name}"));
            for m in MS {
                if placement == "hot" && m > 1 {
                    continue;
                }
                let x: Vec<f32> = (0..m * k).map(|_| rng.next_f32()).collect();
                group.throughput(Throughput::Bytes(
                    (bits_bytes + 4 * m * k + 4 * m * n) as u64,
                ));
                let mut levels = vec![best];
                if m == 1 && placement == "cold" && best != SimdLevel::Avx2 {
                    levels.extend(SimdLevel::Avx2.is_available().then_some(SimdLevel::Avx2));
                }
                for level in levels {
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
            if placement == "cold" {
                // The same bits in the row-interleaved layout a loader would keep for the CPU.
                let ils: Vec<cpu::InterleavedSigns> = mats
                    .iter()
                    .map(|w| cpu::InterleavedSigns::new(SignsView::new(w, n, k).unwrap()))
                    .collect();
                let x: Vec<f32> = (0..k).map(|_| rng.next_f32()).collect();
                group.throughput(Throughput::Bytes((bits_bytes + 4 * k + 4 * n) as u64));
                let mut i = 0;
                group.bench_function(
                    BenchmarkId::new(format!("{best:?}_interleaved"), "m1"),
                    |b| {
                        b.iter(|| {
                            i = (i + 1) % count;
                            black_box(
                                cpu::sign_matmul_t_interleaved_with(best, black_box(&x), &ils[i])
                                    .unwrap(),
                            )
                        })
                    },
                );
            }
            group.finish();
        }
    }
}

/// candle's dense GEMV on the same shapes (cold), for "faster than dense bf16".
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
            let m = 1;
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
            group.finish();
        }
    }
}

/// Batch mixes on the qkvo shape, cold: `rows` rows spread round-robin over `tenants` distinct
/// deltas (plus, in the first mix, base-only rows). Each delta's bits are read once per call, so
/// the bytes are `tenants ×` one delta's bits.
fn bench_tenants(c: &mut Criterion) {
    let mut rng = Lcg(3);
    let (n, k) = (4096, 4096);
    let bits_bytes = n * words_per_row(k) * 4;
    let mut group = c.benchmark_group("tenants_cold/llama7b_qkvo");
    // (rows, tenants, base-only rows among them)
    for (rows, tenants, base_only) in [(8, 4, 2), (8, 8, 0), (32, 8, 0), (32, 32, 0)] {
        let count = copies(tenants * bits_bytes, true);
        let mats: Vec<Vec<u32>> = (0..count * tenants)
            .map(|_| random_words(&mut rng, n, k))
            .collect();
        let row_slot: Vec<Option<u32>> = (0..rows)
            .map(|r| (r >= base_only).then_some(((r - base_only) % tenants) as u32))
            .collect();
        let x: Vec<f32> = (0..rows * k).map(|_| rng.next_f32()).collect();
        let bytes = tenants * bits_bytes + 4 * rows * (k + n);
        group.throughput(Throughput::Bytes(bytes as u64));
        let mut i = 0;
        let id = if base_only > 0 {
            format!("m{rows}_{tenants}tenants_{base_only}base")
        } else {
            format!("m{rows}_{tenants}tenants")
        };
        group.bench_function(&id, |b| {
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
        // The same mix on the row-interleaved copies.
        let ils: Vec<cpu::InterleavedSigns> = mats
            .iter()
            .map(|w| cpu::InterleavedSigns::new(SignsView::new(w, n, k).unwrap()))
            .collect();
        let mut i = 0;
        group.bench_function(format!("{id}_interleaved"), |b| {
            b.iter(|| {
                i = (i + 1) % count;
                let deltas: Vec<cpu::ScaledInterleaved> = ils[i * tenants..(i + 1) * tenants]
                    .iter()
                    .map(|signs| cpu::ScaledInterleaved { signs, scale: 0.01 })
                    .collect();
                black_box(
                    cpu::tenant_delta_matmul_interleaved(black_box(&x), &row_slot, &deltas)
                        .unwrap(),
                )
            })
        });
    }
    group.finish();
}

/// Sum of `data` with 8 independent 64-byte accumulators, so neither the adds nor the load width
/// limit the read rate.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(data: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 8];
    let mut blocks = data.chunks_exact(128);
    for b in &mut blocks {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = _mm512_add_ps(*a, _mm512_loadu_ps(b.as_ptr().add(16 * j)));
        }
    }
    let mut s = acc[0];
    for a in &acc[1..] {
        s = _mm512_add_ps(s, *a);
    }
    _mm512_reduce_add_ps(s) + blocks.remainder().iter().sum::<f32>()
}

fn sum(data: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected.
        return unsafe { sum_avx512(data) };
    }
    // 16 independent lanes, so the compiler vectorizes and the adds never limit the reads.
    let mut lanes = [0f32; 16];
    let mut chunks = data.chunks_exact(16);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Memory-read bandwidth: 1 GiB streamed once per call, split into one contiguous part per rayon
/// thread (all cores), or on one thread. Measured first and again last (`*_end`), so a change in
/// the machine's load during the run shows; the report takes the higher of the two.
fn bench_membw(c: &mut Criterion) {
    membw(c, "");
}

fn bench_membw_end(c: &mut Criterion) {
    membw(c, "_end");
}

fn membw(c: &mut Criterion, suffix: &str) {
    let len = (1usize << 30) / 4;
    let data: Vec<f32> = (0..len).map(|i| (i % 7) as f32).collect();
    let threads = rayon::current_num_threads();
    let mut group = c.benchmark_group("membw");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((len * 4) as u64));
    group.bench_function(format!("read_1GiB_all_threads{suffix}"), |b| {
        b.iter(|| black_box(data.par_chunks(len.div_ceil(threads)).map(sum).sum::<f32>()))
    });
    group.bench_function(format!("read_1GiB_1_thread{suffix}"), |b| {
        b.iter(|| black_box(sum(&data)))
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_membw,
    bench_sign,
    bench_tenants,
    bench_dense,
    bench_membw_end
);
criterion_main!(benches);
