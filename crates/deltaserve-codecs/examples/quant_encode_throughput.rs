//! Encode throughput of RTN-8, GPTQ-4 and EoRA on one matrix (default 4096 × 11008, Llama-7B's
//! `down_proj`), single process, on this machine's CPU.
//!
//! ```sh
//! cargo run --release -p deltaserve-codecs --example quant_encode_throughput [ROWS COLS [TOKENS]]
//! ```
//! The weight is N(0, 0.02); the Gram matrix `H = XᵀX` comes from TOKENS (default 512) random
//! inputs whose columns have scales spread over two decades. Building `H` is not timed.

use std::time::Instant;

use deltaserve_codecs::eora::eora_correction;
use deltaserve_codecs::gptq::{quantize_gptq, GptqConfig};
use deltaserve_codecs::rtn::{quantize_rtn, GridSpec};
use faer::{Mat, Par};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments: ROWS COLS [TOKENS]"))
        .collect();
    let (rows, cols) = (
        args.first().copied().unwrap_or(4096),
        args.get(1).copied().unwrap_or(11008),
    );
    let tokens = args.get(2).copied().unwrap_or(512);
    let mut rng = StdRng::seed_from_u64(0);
    let mut normal = move || {
        let (u1, u2): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    };
    let w: Vec<f32> = (0..rows * cols).map(|_| (0.02 * normal()) as f32).collect();
    let x = Mat::from_fn(tokens, cols, |_, j| {
        normal() * 10f64.powf(-1.0 + 2.0 * (j % 97) as f64 / 96.0)
    });
    let mut h = Mat::<f64>::zeros(cols, cols);
    faer::linalg::matmul::matmul(
        h.as_mut(),
        faer::Accum::Replace,
        x.transpose(),
        x.as_ref(),
        1.0,
        Par::rayon(0),
    );
    let h: Vec<f64> = (0..cols * cols).map(|k| h[(k / cols, k % cols)]).collect();
    let mweights = (rows * cols) as f64 / 1e6;
    println!(
        "matrix {rows}x{cols} ({mweights:.1} M weights), H from {tokens} tokens, {} threads",
        rayon::current_num_threads()
    );

    let t = Instant::now();
    let rtn8 = GridSpec {
        bits: 8,
        group_size: None,
        symmetric: false,
        f16_scales: true,
    };
    let q = quantize_rtn(&w, rows, cols, &rtn8);
    let s = t.elapsed().as_secs_f64();
    println!(
        "rtn8 (per row):          {s:8.2} s  {:8.1} M weights/s",
        mweights / s
    );

    let t = Instant::now();
    let g = quantize_gptq(&w, rows, cols, &h, &GptqConfig::default()).expect("GPTQ");
    let s = t.elapsed().as_secs_f64();
    println!(
        "gptq4 (group 128):       {s:8.2} s  {:8.1} M weights/s",
        mweights / s
    );
    drop(g);

    let deq = q.dequantize();
    let err: Vec<f32> = w.iter().zip(&deq).map(|(a, b)| a - b).collect();
    let t = Instant::now();
    let c = eora_correction(&err, rows, cols, &h, 8).expect("EoRA");
    let s = t.elapsed().as_secs_f64();
    println!(
        "eora rank 8 (correction only, on rtn8's error): {s:8.2} s  {:8.1} M weights/s",
        mweights / s
    );
    drop(c);
}
