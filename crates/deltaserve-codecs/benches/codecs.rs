//! Encode throughput of each delta codec on one 4096x11008 matrix (a 7B MLP projection).
//!
//! ```text
//! cargo bench -p deltaserve-codecs --bench codecs [-- SPEC ...]
//! ```
//!
//! Base and fine-tune are bf16-valued f32 matrices: a random base plus a delta with a decaying
//! spectrum (a sum of 64 random rank-one terms with geometric weights, plus noise), so
//! energy-threshold ranks are meaningful. Each spec is encoded twice; the faster wall time is
//! reported, with throughput in millions of weights per second and in GB/s of bf16 fine-tune
//! (2 bytes per weight). `RAYON_NUM_THREADS` sets the thread count (faer's matrix products run
//! on rayon). Without arguments every codec is measured at a typical setting.

use std::time::Instant;

use deltaserve_codecs::codec::{parse_codec, MatrixInput};
use safetensors::Dtype;

const ROWS: usize = 4096;
const COLS: usize = 11008;

const DEFAULT_SPECS: &[&str] = &[
    "lowrank:rank=16",
    "lowrank:rank=64",
    "lowrank:energy=0.5",
    "lowrank-mixed:ranks=2/32/64,bits=8/3/2",
    "dare:p=0.9",
    "deltadq:ratio=32",
];

/// A deterministic stream in [-1, 1).
fn stream(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn main() {
    let specs: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let specs: Vec<String> = if specs.is_empty() {
        DEFAULT_SPECS.iter().map(|s| s.to_string()).collect()
    } else {
        specs
    };
    let bf16 = |x: f32| half::bf16::from_f32(x).to_f32();
    let base: Vec<f32> = stream(1, ROWS * COLS)
        .iter()
        .map(|x| bf16(0.02 * x))
        .collect();
    let terms = 64;
    let a = stream(2, ROWS * terms);
    let b = stream(3, COLS * terms);
    let noise = stream(4, ROWS * COLS);
    let mut ft = vec![0f32; ROWS * COLS];
    for i in 0..ROWS {
        let row = &mut ft[i * COLS..][..COLS];
        for t in 0..terms {
            let w = 1e-3 * 0.93f32.powi(t as i32) * a[i * terms + t];
            for (v, bj) in row.iter_mut().zip(b.chunks(terms).map(|c| c[t])) {
                *v += w * bj;
            }
        }
        for (j, v) in row.iter_mut().enumerate() {
            *v = bf16(base[i * COLS + j] + *v + 2e-5 * noise[i * COLS + j]);
        }
    }
    let m = MatrixInput {
        name: "model.layers.0.mlp.down_proj.weight",
        rows: ROWS,
        cols: COLS,
        base: &base,
        finetuned: &ft,
        base_dtype: Dtype::BF16,
        calibration: None,
    };
    println!("{ROWS}x{COLS}, {} threads", rayon::current_num_threads());
    println!(
        "{:<42} {:>9} {:>10} {:>9} {:>11}",
        "spec", "seconds", "Mweights/s", "GB/s", "bits/param"
    );
    for spec in &specs {
        let codec = match parse_codec(spec) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        };
        let mut best = f64::INFINITY;
        let mut bits = 0.0;
        for _ in 0..2 {
            let t = Instant::now();
            let enc = codec.encode(&m).expect("encode");
            best = best.min(t.elapsed().as_secs_f64());
            bits = enc.bits_per_param();
        }
        let n = (ROWS * COLS) as f64;
        println!(
            "{:<42} {:>9.3} {:>10.1} {:>9.3} {:>11.4}",
            codec.spec(),
            best,
            n / best / 1e6,
            2.0 * n / best / 1e9,
            bits
        );
    }
}
