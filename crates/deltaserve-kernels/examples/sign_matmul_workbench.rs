//! Workbench for the CPU `x · Sᵀ` kernels, in the manner of llm.c's `dev/cuda`: checks every SIMD
//! level against the reference, then prints time and throughput for each level on one shape.
//!
//! `cargo run --release -p deltaserve-kernels --example sign_matmul_workbench -- [N K M]`
//! (default 4096 4096 1). Set `RAYON_NUM_THREADS=1` for per-core numbers. The criterion bench
//! (`benches/sign_matmul.rs`) is the reference for reported numbers; this is for quick iteration.

use std::time::Instant;

use deltaserve_kernels::cpu::{self, SimdLevel};
use deltaserve_kernels::reference::sign_matmul_t_ref;
use deltaserve_kernels::{words_per_row, SignsView};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("N K M as integers"))
        .collect();
    let (n, k, m) = match args[..] {
        [n, k, m] => (n, k, m),
        [] => (4096, 4096, 1),
        _ => panic!("usage: sign_matmul_workbench [N K M]"),
    };
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let words: Vec<u32> = (0..n * words_per_row(k)).map(|_| next() as u32).collect();
    let x: Vec<f32> = (0..m * k)
        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let signs = SignsView::new(&words, n, k).expect("shape");

    // Validate first: a fast wrong kernel is worth nothing.
    let reference = sign_matmul_t_ref(&x, &words, n, k);
    for level in SimdLevel::available() {
        let out = cpu::sign_matmul_t_with(level, &x, signs).expect("level is available");
        let (mut diff, mut norm) = (0f64, 0f64);
        for (o, r) in out.iter().zip(&reference) {
            diff += (f64::from(*o) - f64::from(*r)).powi(2);
            norm += f64::from(*r).powi(2);
        }
        let rel = (diff / norm).sqrt();
        assert!(rel < 1e-5, "{level:?}: relative error {rel:.2e}");
        println!("{level:?}: matches the reference (relative error {rel:.1e})");
    }

    let bytes = (n * words_per_row(k) * 4 + 4 * m * (k + n)) as f64;
    for level in SimdLevel::available().into_iter().rev() {
        let run = || cpu::sign_matmul_t_with(level, &x, signs).expect("level is available");
        std::hint::black_box(run());
        let iters = 20;
        let start = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(run());
        }
        let secs = start.elapsed().as_secs_f64() / f64::from(iters);
        println!(
            "{level:?} [{n}x{k}] M={m}: {:.1} us, {:.2} GB/s read+written, {:.1} G sign-products/s",
            secs * 1e6,
            bytes / secs / 1e9,
            (n * k * m) as f64 / secs / 1e9
        );
    }
}
