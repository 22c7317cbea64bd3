//! Per-core throughput measured in CPU time, for a machine shared with other work.
//!
//! Criterion (`benches/sign_matmul.rs`) times wall-clock; when other processes compete for the
//! cores, that measures the competition. This runs everything on one rayon thread and charges each
//! call only the time that thread spent on a CPU (`/proc/thread-self/schedstat`, in ns), for the
//! sign kernels, candle's dense matmul and a 1 GiB memory read alike, so the ratios between them
//! hold however busy the machine is (cache and memory traffic from others still count).
//!
//! `cargo run --release -p deltaserve-kernels --example sign_matmul_per_core`
//!
//! Weights are "cold": each call takes the next of enough distinct copies to exceed the 300 MiB
//! L3, as decoding a whole model does.

use candle_core::{DType, Device, Tensor};
use deltaserve_kernels::cpu::{self, SimdLevel};
use deltaserve_kernels::{words_per_row, SignsView};

const SHAPES: [(&str, usize, usize); 3] = [
    ("llama7b_qkvo", 4096, 4096),
    ("llama7b_up", 11008, 4096),
    ("llama7b_down", 4096, 11008),
];
/// Weight bytes to rotate over; `PER_CORE_HOT=1` uses one copy instead (it then stays in cache).
const COLD_BYTES: usize = 640 << 20;

/// CPU time of the calling thread, in seconds.
fn thread_cpu_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("Linux schedstat");
    let ns: f64 = s
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat format");
    ns / 1e9
}

/// CPU seconds per call: the median of 3 windows, each of as many calls as fill 0.4 s of CPU
/// time (`schedstat` advances in scheduler ticks of a few ms here, so one call is too short).
fn time(mut f: impl FnMut(usize)) -> f64 {
    f(0);
    let mut i = 1;
    let mut t: Vec<f64> = (0..3)
        .map(|_| {
            let start = thread_cpu_secs();
            let mut calls = 0;
            while thread_cpu_secs() - start < 0.4 {
                f(i);
                i += 1;
                calls += 1;
            }
            (thread_cpu_secs() - start) / f64::from(calls)
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[1]
}

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

fn main() {
    // Optional filter: only shapes whose name contains the first argument.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("rayon pool");
    pool.install(run);
}

fn run() {
    let mut rng = Lcg(7);
    let data: Vec<f32> = (0..(1usize << 28)).map(|i| (i % 7) as f32).collect();
    // Four streams in flight (the array's quarters, summed in lockstep), so the read rate is
    // limited by memory, not by one stream's latency.
    let sum = |d: &[f32]| {
        let q = d.len() / 4;
        let (a, rest) = d.split_at(q);
        let (b, rest) = rest.split_at(q);
        let (c, e) = rest.split_at(q);
        let mut lanes = [[0f32; 16]; 4];
        let quarters = a
            .chunks_exact(16)
            .zip(b.chunks_exact(16))
            .zip(c.chunks_exact(16))
            .zip(e.chunks_exact(16));
        for (((a, b), c), e) in quarters {
            for i in 0..16 {
                lanes[0][i] += a[i];
                lanes[1][i] += b[i];
                lanes[2][i] += c[i];
                lanes[3][i] += e[i];
            }
        }
        lanes.iter().flatten().sum::<f32>()
    };
    let bw = (data.len() * 4) as f64
        / time(|_| {
            std::hint::black_box(sum(std::hint::black_box(&data)));
        })
        / 1e9;
    drop(data);
    // (shape, m, kernel, seconds, GB/s, seconds of dense bf16, seconds of dense f32)
    let mut table: Vec<(String, usize, String, f64, f64, f64, f64)> = Vec::new();
    let dev = Device::Cpu;
    let only = std::env::args().nth(1).unwrap_or_default();
    let skip_dense = std::env::var_os("PER_CORE_NO_DENSE").is_some();
    for (name, n, k) in SHAPES.into_iter().filter(|s| s.0.contains(only.as_str())) {
        let bits = n * words_per_row(k) * 4;
        let hot = std::env::var_os("PER_CORE_HOT").is_some();
        let copies = if hot { 1 } else { COLD_BYTES.div_ceil(bits) };
        let mats: Vec<Vec<u32>> = (0..copies)
            .map(|_| (0..n * words_per_row(k)).map(|_| rng.next_u32()).collect())
            .collect();
        for m in [1, 8] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.next_f32()).collect();
            let mut dense = Vec::new();
            for (dtype, bytes) in [(DType::BF16, 2), (DType::F32, 4)] {
                if skip_dense {
                    dense.push((String::new(), f64::NAN, 0));
                    continue;
                }
                let copies = COLD_BYTES.div_ceil(n * k * bytes);
                let ws: Vec<Tensor> = (0..copies)
                    .map(|_| {
                        let w: Vec<f32> = (0..n * k).map(|_| rng.next_f32()).collect();
                        Tensor::from_vec(w, (n, k), &dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                    })
                    .collect();
                let xt = Tensor::from_vec(x.clone(), (m, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let t = time(|i| {
                    std::hint::black_box(xt.matmul(&ws[i % copies].t().unwrap()).unwrap());
                });
                dense.push((
                    format!("candle dense {dtype:?}").to_lowercase(),
                    t,
                    bytes * (n * k + m * k + m * n),
                ));
            }
            let mut rows = Vec::new();
            for level in SimdLevel::available().into_iter().rev().take(2) {
                let t = time(|i| {
                    let signs = SignsView::new(&mats[i % copies], n, k).unwrap();
                    std::hint::black_box(cpu::sign_matmul_t_with(level, &x, signs).unwrap());
                });
                rows.push((format!("x·Sᵀ {level:?}"), t, bits + 4 * m * (k + n)));
            }
            rows.extend(dense.iter().filter(|d| !d.0.is_empty()).cloned());
            let (t_bf16, t_f32) = (dense[0].1, dense[1].1);
            for (kernel, t, bytes) in rows {
                let shape = format!("{name} ({n}×{k})");
                table.push((shape, m, kernel, t, bytes as f64 / t / 1e9, t_bf16, t_f32));
            }
        }
    }
    // The reference read rate: the sum above, or candle's dense f32 GEMV when it reads faster
    // (it does, by ~15%: the sum underestimates what one core can pull).
    let dense_f32 = table
        .iter()
        .filter(|r| r.1 == 1 && r.2.contains("f32"))
        .map(|r| r.4)
        .fold(0f64, f64::max);
    let reference = bw.max(dense_f32);
    println!("memory read, one core: {bw:.2} GB/s (1 GiB f32 sum); dense f32 GEMV, M = 1: {dense_f32:.2} GB/s; reference: {reference:.2} GB/s");
    println!(
        "| shape | M | kernel | CPU time | GB/s | of reference | vs dense bf16 | vs dense f32 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (shape, m, kernel, t, gbs, t_bf16, t_f32) in table {
        println!(
            "| {shape} | {m} | {kernel} | {:.0} µs | {gbs:.2} | {:.0}% | {:.1}× | {:.1}× |",
            t * 1e6,
            100.0 * gbs / reference,
            t_bf16 / t,
            t_f32 / t
        );
    }
}
