//! Two-core scaling of the CPU `x · Sᵀ` and the read bandwidth it is held to, as best and median
//! of many calls: for the shared 2-vCPU machine, where criterion's medians swing with the other
//! sessions' builds, the best of a few hundred 0.1–1 ms calls is the run with both cores free.
//!
//! `cargo run --release -p deltaserve-kernels --example sign_matmul_threads -- [calls]`
//! (default 200; `SHAPES=128x4096,4096x4096` picks `N x K` shapes). Prints, for one and two rayon
//! threads: a 1 GiB streaming read (AVX-512 loads, one contiguous half per thread), and the
//! AVX-512 kernel at M = 1 with the weights cold (rotating over 640 MiB, past the 300 MiB L3) or
//! hot (one copy), called from inside the pool or (two threads only) from an outside thread as
//! the criterion bench and a server do. `BENCHMARKS.md` ("CPU kernels, third pass") has a run.

use std::hint::black_box;
use std::time::Instant;

use deltaserve_kernels::cpu::{self, SimdLevel};
use deltaserve_kernels::{words_per_row, SignsView};

const COLD_BYTES: usize = 640 << 20;

fn stats(mut t: Vec<f64>) -> (f64, f64) {
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (t[0], t[t.len() / 2])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum512(d: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 8];
    let p = d.as_ptr();
    let mut i = 0;
    while i + 128 <= d.len() {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = _mm512_add_ps(*a, _mm512_loadu_ps(p.add(i + 16 * j)));
        }
        i += 128;
    }
    let mut s = acc[0];
    for a in &acc[1..] {
        s = _mm512_add_ps(s, *a);
    }
    _mm512_reduce_add_ps(s)
}

fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().unwrap())
        .unwrap_or(200);
    let pools: Vec<rayon::ThreadPool> = [1, 2]
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        })
        .collect();

    // Read bandwidth: 1 GiB, AVX-512 loads, halves on two threads.
    let len = (1usize << 30) / 4;
    let data: Vec<f32> = (0..len).map(|i| (i % 7) as f32).collect();
    for threads in [1usize, 2] {
        let mut t = Vec::new();
        for _ in 0..8 {
            let s = Instant::now();
            std::thread::scope(|sc| {
                for c in data.chunks(len / threads) {
                    sc.spawn(move || black_box(unsafe { sum512(c) }));
                }
            });
            t.push(s.elapsed().as_secs_f64());
        }
        let (best, med) = stats(t);
        println!(
            "membw {threads} thr: best {:.2} GB/s, median {:.2} GB/s",
            (len * 4) as f64 / best / 1e9,
            (len * 4) as f64 / med / 1e9
        );
    }
    drop(data);

    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let shapes: Vec<(usize, usize)> = std::env::var("SHAPES")
        .map(|s| {
            s.split(",")
                .map(|p| {
                    let v: Vec<usize> = p.split("x").map(|x| x.parse().unwrap()).collect();
                    (v[0], v[1])
                })
                .collect()
        })
        .unwrap_or(vec![(4096, 4096), (11008, 4096), (4096, 11008)]);
    for (n, k) in shapes {
        let wpr = words_per_row(k);
        let bytes = n * wpr * 4;
        let count = COLD_BYTES.div_ceil(bytes);
        let mats: Vec<Vec<u32>> = (0..count)
            .map(|_| (0..n * wpr).map(|_| next() as u32).collect())
            .collect();
        let x: Vec<f32> = (0..k)
            .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        // The same bits in the row-interleaved layout, two threads, called from outside the pool.
        let ils: Vec<cpu::InterleavedSigns> = mats
            .iter()
            .map(|w| cpu::InterleavedSigns::new(SignsView::new(w, n, k).unwrap()))
            .collect();
        for cold in [true, false] {
            let mut t = Vec::new();
            for c in 0..calls {
                let i = if cold { c % count } else { 0 };
                let s = Instant::now();
                black_box(
                    cpu::sign_matmul_t_interleaved_with(SimdLevel::Avx512, &x, &ils[i]).unwrap(),
                );
                t.push(s.elapsed().as_secs_f64());
            }
            let (best, med) = stats(t);
            println!(
                "{n}x{k} 2 thr {} interleaved: best {:.0} us ({:.2} GB/s), median {:.0} us ({:.2} GB/s)",
                if cold { "cold" } else { "hot " },
                best * 1e6,
                bytes as f64 / best / 1e9,
                med * 1e6,
                bytes as f64 / med / 1e9
            );
        }
        drop(ils);
        for (pi, pool) in pools.iter().enumerate() {
            for (cold, inside) in [(true, true), (false, true), (true, false), (false, false)] {
                if !inside && pi == 0 {
                    continue;
                }
                let mut t = Vec::new();
                let body = |t: &mut Vec<f64>| {
                    for c in 0..calls {
                        let i = if cold { c % count } else { 0 };
                        let signs = SignsView::new(&mats[i], n, k).unwrap();
                        let s = Instant::now();
                        black_box(cpu::sign_matmul_t_with(SimdLevel::Avx512, &x, signs).unwrap());
                        t.push(s.elapsed().as_secs_f64());
                    }
                };
                if inside {
                    pool.install(|| body(&mut t));
                } else {
                    body(&mut t);
                }
                let (best, med) = stats(t);
                println!(
                    "{n}x{k} {} thr {}{}: best {:.0} us ({:.2} GB/s), median {:.0} us ({:.2} GB/s)",
                    pi + 1,
                    if cold { "cold" } else { "hot " },
                    if inside { " in-pool" } else { " outside" },
                    best * 1e6,
                    bytes as f64 / best / 1e9,
                    med * 1e6,
                    bytes as f64 / med / 1e9
                );
            }
        }
    }
}
