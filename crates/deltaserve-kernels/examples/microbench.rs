use deltaserve_kernels::cpu::{self, SimdLevel};
use deltaserve_kernels::SignsView;
use std::time::Instant;
fn main() {
    let n: usize = std::env::var("N")
        .map(|v| v.parse().unwrap())
        .unwrap_or(4096);
    let k = 4096usize;
    let words: Vec<u32> = (0..n * k / 32)
        .map(|i| (i as u32).wrapping_mul(2654435761))
        .collect();
    for m in [1usize, 4, 8] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32).collect();
        let s = SignsView::new(&words, n, k).unwrap();
        for level in [SimdLevel::Avx512, SimdLevel::Avx2, SimdLevel::Portable] {
            let iters = 40;
            let t = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(cpu::sign_matmul_t_with(level, &x, s).unwrap());
            }
            let dt = t.elapsed().as_secs_f64() / iters as f64;
            let bitops = (m * n * k) as f64;
            println!(
                "{level:?} m={m}: {:.1} us, {:.2} Gbitop/s",
                dt * 1e6,
                bitops / dt / 1e9
            );
        }
    }
}
