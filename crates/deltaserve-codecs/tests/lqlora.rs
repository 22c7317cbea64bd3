//! LQ-LoRA decomposition (`lqlora`): the alternation lowers the error, beats NF alone at the
//! same quantization bits on a matrix with low-rank structure, and the low-rank product and
//! row/column weights match plain f64 computations.

use deltaserve_codecs::lqlora::{decompose, lowrank_product, row_col_weights, LqOptions};
use deltaserve_codecs::nf::{sq_error, weighted_sq_error, NfConfig, NfTensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Gaussian-ish noise plus a rank-`k` part with large singular values, like a weight matrix
/// with a few outlier directions (the case LQ-LoRA's low-rank part is for).
fn structured(rows: usize, cols: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let u: Vec<f32> = (0..rows * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let v: Vec<f32> = (0..k * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let mut w = vec![0.0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let mut s = 0.0f64;
            for t in 0..k {
                s += u[i * k + t] as f64 * v[t * cols + j] as f64;
            }
            w[i * cols + j] = 0.05 * s as f32 + 0.02 * rng.gen_range(-1.0f32..1.0);
        }
    }
    w
}

#[test]
fn lowrank_product_matches_f64() {
    let mut rng = StdRng::seed_from_u64(1);
    let (m, n, r) = (37, 23, 5);
    let l1: Vec<f32> = (0..m * r).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let l2: Vec<f32> = (0..r * n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let p = lowrank_product(&l1, &l2, m, n, r);
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..r)
                .map(|t| l1[i * r + t] as f64 * l2[t * n + j] as f64)
                .sum();
            assert!((p[i * n + j] as f64 - want).abs() < 1e-5, "({i},{j})");
        }
    }
}

#[test]
fn row_col_weights_are_root_means() {
    let f = vec![1.0f32, 3.0, 0.0, 4.0, 0.0, 8.0]; // 2 × 3
    let (r, c) = row_col_weights(&f, 2, 3);
    let want_r = [(4.0f64 / 3.0).sqrt(), 4.0f64.sqrt()];
    let want_c = [2.5f64.sqrt(), 1.5f64.sqrt(), 4.0f64.sqrt()];
    for (a, b) in r.iter().zip(want_r).chain(c.iter().zip(want_c)) {
        assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
    }
}

#[test]
fn error_falls_and_beats_nf_alone() {
    let (m, n) = (192, 256);
    let w = structured(m, n, 4, 7);
    let cfg = NfConfig::new(3, 64).unwrap();
    let opts = LqOptions {
        rank: 8,
        max_iters: 15,
        rel_tol: 0.0,
        ..LqOptions::default()
    };
    let d = decompose(&w, m, n, cfg, &opts, None).unwrap();
    assert!(d.history.len() >= 2, "history {:?}", d.history);
    // The kept error is the least seen, strictly below the first iteration's (Q = 0 start:
    // SVD of W, then quantize the rest), and recomputed from the returned parts.
    let min = d.history.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(d.error, min);
    assert!(d.error < d.history[0], "history {:?}", d.history);
    let recon = d.reconstruct();
    let e = sq_error(&w, &recon);
    assert!((e - d.error).abs() <= 1e-3 * d.error, "{e} vs {}", d.error);
    // Every kept iterate improved on the previous one.
    let kept = d.history.iter().position(|&x| x == min).unwrap();
    assert!(
        d.history[..=kept].windows(2).all(|p| p[1] < p[0]),
        "{:?}",
        d.history
    );
    // NF alone at the same quantization configuration (same bits for Q).
    let q = NfTensor::quantize(&w, cfg);
    let e_nf = sq_error(&w, &q.dequantize());
    assert!(d.error < 0.5 * e_nf, "LQ {} vs NF {e_nf}", d.error);
    assert_eq!(d.q.storage_bits(), q.storage_bits());
    // And beats NF one bit wider than Q (NF4) on this matrix, despite the low-rank part
    // being small (8·(192+256) values).
    let q4 = NfTensor::quantize(&w, NfConfig::new(4, 64).unwrap());
    let e_nf4 = sq_error(&w, &q4.dequantize());
    assert!(d.error < e_nf4, "LQ-NF3 {} vs NF4 {e_nf4}", d.error);
}

#[test]
fn fisher_weighted_decomposition_lowers_weighted_error() {
    let (m, n) = (128, 192);
    let w = structured(m, n, 3, 11);
    let mut rng = StdRng::seed_from_u64(12);
    // Importance concentrated on a few rows and columns, as Fisher information is.
    let rw: Vec<f32> = (0..m)
        .map(|i| {
            if i % 9 == 0 {
                50.0
            } else {
                rng.gen_range(0.1..1.0)
            }
        })
        .collect();
    let cw: Vec<f32> = (0..n)
        .map(|j| {
            if j % 13 == 0 {
                30.0
            } else {
                rng.gen_range(0.1..1.0)
            }
        })
        .collect();
    let f: Vec<f32> = (0..m * n).map(|k| rw[k / n] * cw[k % n]).collect();
    let cfg = NfConfig::new(2, 64).unwrap();
    let opts = LqOptions {
        rank: 6,
        max_iters: 10,
        ..LqOptions::default()
    };
    let plain = decompose(&w, m, n, cfg, &opts, None).unwrap();
    let weighted = decompose(&w, m, n, cfg, &opts, Some(&f)).unwrap();
    let we_plain = weighted_sq_error(&w, &plain.reconstruct(), &f);
    let we_weighted = weighted_sq_error(&w, &weighted.reconstruct(), &f);
    assert!((we_weighted - weighted.error).abs() <= 1e-3 * weighted.error);
    assert!(
        we_weighted < we_plain,
        "weighted decomposition {we_weighted} not below the unweighted one's {we_plain}"
    );
}

#[test]
fn bad_rank_and_shapes_are_errors() {
    let w = vec![0.1f32; 64 * 32];
    let cfg = NfConfig::new(4, 64).unwrap();
    let opts = LqOptions {
        rank: 40,
        ..LqOptions::default()
    };
    let e = decompose(&w, 64, 32, cfg, &opts, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--rank") && e.contains("1 to 32"), "{e}");
    let e = decompose(&w, 64, 31, cfg, &LqOptions::default(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("64×31"), "{e}");
}

/// Decomposition time of one 4096×4096 matrix (rank 64, NF3 with blocks of 64, LQ-LoRA's
/// setting for Llama-2-7B), for BENCHMARKS.md. Ignored by default (tens of seconds):
/// `cargo test --release -p deltaserve-codecs --test lqlora -- --ignored --nocapture`.
#[test]
#[ignore]
fn time_4096_square() {
    let n = 4096;
    let mut rng = StdRng::seed_from_u64(3);
    let w: Vec<f32> = (0..n * n)
        .map(|_| 0.02 * rng.gen_range(-1.0f32..1.0))
        .collect();
    let cfg = NfConfig::new(3, 64).unwrap();
    for iters in [1, 5] {
        let opts = LqOptions {
            rank: 64,
            max_iters: iters,
            rel_tol: 0.0,
            ..LqOptions::default()
        };
        let t = std::time::Instant::now();
        let d = decompose(&w, n, n, cfg, &opts, None).unwrap();
        eprintln!(
            "4096x4096 rank 64 nf3-b64: {} iterations in {:.2} s ({:.2} s/iteration), error {:.4e}",
            d.history.len(),
            t.elapsed().as_secs_f64(),
            t.elapsed().as_secs_f64() / d.history.len() as f64,
            d.error
        );
    }
    let t = std::time::Instant::now();
    let q = NfTensor::quantize(&w, cfg);
    let _ = q.dequantize();
    eprintln!(
        "4096x4096 NF quantize+dequantize: {:.3} s",
        t.elapsed().as_secs_f64()
    );
}
