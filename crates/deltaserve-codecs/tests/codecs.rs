//! The delta codecs of `deltaserve_codecs::codec` (lowrank, lowrank-mixed, DARE, DeltaDQ)
//! against float64 references written here, their stored sizes against the file, and the
//! tenant path against the merged checkpoint.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use common::*;
use deltaserve_codecs::codec::{
    decode_dense, parse_codec, Calibration, Codec, Decoded, Encoded, MatrixInput, MethodSpec,
};
use deltaserve_codecs::coded::compress_coded;
use deltaserve_codecs::dare::Dare;
use deltaserve_codecs::deltadq::{group_positions, kept_in_group, DeltaDq};
use deltaserve_codecs::numeric::FloatDtype;
use deltaserve_codecs::{load_tenant, MergeOptions};
use deltaserve_format::{
    fingerprint_safetensors, write_delta, BaseFingerprint, DeltaFile, DeltaHeader, FinetuneInfo,
};
use deltaserve_model::{Checkpoint, LinearDelta};
use safetensors::Dtype;

/// A deterministic pseudo-random stream in [-1, 1) (test data only).
fn noise(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// `D = Σ_i σ_i a_i b_iᵀ` with random (not orthogonal) a, b and geometric σ, plus small noise:
/// a delta with a decaying spectrum, as fine-tune deltas have.
fn spectral_delta(rows: usize, cols: usize, decay: f64, seed: u64) -> Vec<f32> {
    let terms = rows.min(cols);
    let a = noise(seed, rows * terms);
    let b = noise(seed + 1, cols * terms);
    let e = noise(seed + 2, rows * cols);
    let mut d = vec![0f64; rows * cols];
    for t in 0..terms {
        let s = 0.05 * decay.powi(t as i32);
        for i in 0..rows {
            let ai = s * a[i * terms + t];
            for j in 0..cols {
                d[i * cols + j] += ai * b[j * terms + t];
            }
        }
    }
    d.iter()
        .zip(&e)
        .map(|(x, n)| (x + 1e-5 * n) as f32)
        .collect()
}

/// Singular values of a row-major matrix by one-sided Jacobi in f64 (Hestenes): rotate column
/// pairs until orthogonal; the column norms are then the singular values. Descending.
fn jacobi_singular_values(m: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    // Work on the transpose when wide so columns are the short side.
    let (r, c, a): (usize, usize, Vec<f64>) = if rows >= cols {
        (rows, cols, m.iter().map(|&x| f64::from(x)).collect())
    } else {
        let mut t = vec![0f64; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = f64::from(m[i * cols + j]);
            }
        }
        (cols, rows, t)
    };
    let mut a = a;
    for _sweep in 0..60 {
        let mut off = 0f64;
        for p in 0..c {
            for q in p + 1..c {
                let (mut alpha, mut beta, mut gamma) = (0f64, 0f64, 0f64);
                for i in 0..r {
                    let (x, y) = (a[i * c + p], a[i * c + q]);
                    alpha += x * x;
                    beta += y * y;
                    gamma += x * y;
                }
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                    continue;
                }
                off = off.max(gamma.abs() / (alpha * beta).sqrt());
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let cs = 1.0 / (1.0 + t * t).sqrt();
                let sn = cs * t;
                for i in 0..r {
                    let (x, y) = (a[i * c + p], a[i * c + q]);
                    a[i * c + p] = cs * x - sn * y;
                    a[i * c + q] = sn * x + cs * y;
                }
            }
        }
        if off < 1e-13 {
            break;
        }
    }
    let mut s: Vec<f64> = (0..c)
        .map(|j| (0..r).map(|i| a[i * c + j].powi(2)).sum::<f64>().sqrt())
        .collect();
    s.sort_by(|x, y| y.total_cmp(x));
    s
}

fn input<'a>(
    name: &'a str,
    rows: usize,
    cols: usize,
    base: &'a [f32],
    ft: &'a [f32],
) -> MatrixInput<'a> {
    MatrixInput {
        name,
        rows,
        cols,
        base,
        finetuned: ft,
        base_dtype: Dtype::F32,
        calibration: None,
    }
}

/// Writes `encoded` alone into a delta file and reopens it, so decoding goes through the file.
fn through_file(encoded: &Encoded, name: &str, dir: &std::path::Path) -> DeltaFile {
    let base = BaseFingerprint {
        algorithm: "blake3-v1".into(),
        hex: "ab".repeat(32),
        tensors: 1,
    };
    let mut header = DeltaHeader::new("test", base, FinetuneInfo::default());
    header
        .tensors
        .insert(name.to_owned(), encoded.entry.clone());
    let path = dir.join(format!("{}.delta", encoded.entry.codec()));
    write_delta(&path, &header, encoded.tensors.clone(), true).unwrap();
    DeltaFile::open(&path).unwrap()
}

fn sq_err(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum()
}

/// Base, fine-tune and their delta for a `[rows, cols]` test matrix.
fn pair(rows: usize, cols: usize, decay: f64, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = spectral_delta(rows, cols, decay, seed);
    let base: Vec<f32> = noise(seed + 9, rows * cols)
        .iter()
        .map(|x| *x as f32)
        .collect();
    let ft: Vec<f32> = base.iter().zip(&d).map(|(b, x)| b + x).collect();
    // The delta the codec sees is ft − base in f32.
    let d = ft.iter().zip(&base).map(|(f, b)| f - b).collect();
    (base, ft, d)
}

/// Low-rank error equals the f64 tail energy `Σ_{i>r} σ_i²` (Eckart–Young), for the exact SVD
/// path (small sketch/side ratio false) and the randomised one, with factors stored in f32.
#[test]
fn lowrank_error_is_the_tail_energy_of_an_f64_svd() {
    let tmp = tempfile::tempdir().unwrap();
    // (rows, cols, rank): 40x24 rank 10 takes the exact path (sketch 18 ≥ 24/2); 200x120 rank 6
    // the randomised one (sketch 14 < 60).
    for (rows, cols, rank) in [(40, 24, 10), (200, 120, 6), (120, 200, 6)] {
        let (base, ft, d) = pair(rows, cols, 0.6, rows as u64);
        let sigma = jacobi_singular_values(&d, rows, cols);
        let tail: f64 = sigma[rank..].iter().map(|s| s * s).sum();
        let codec = parse_codec(&format!("lowrank:rank={rank},dtype=f32")).unwrap();
        let enc = codec.encode(&input("w", rows, cols, &base, &ft)).unwrap();
        let file = through_file(&enc, "w", tmp.path());
        let got = decode_dense(&file, "w", file.entry("w").unwrap()).unwrap();
        let err = sq_err(&got, &d);
        // Never below the optimum (beyond f32 rounding), and within 0.1% of it: f32 factors and
        // a randomised range finder with 2 power iterations on a 0.6-geometric spectrum.
        let total: f64 = sigma.iter().map(|s| s * s).sum();
        assert!(
            err >= tail - 1e-6 * total && err <= tail * 1.001 + 1e-6 * total,
            "{rows}x{cols} rank {rank}: error {err:e}, tail energy {tail:e}"
        );
    }
}

#[test]
fn lowrank_energy_threshold_picks_the_f64_rank() {
    let (rows, cols) = (150, 90);
    let (base, ft, d) = pair(rows, cols, 0.8, 7);
    let sigma = jacobi_singular_values(&d, rows, cols);
    let total: f64 = sigma.iter().map(|s| s * s).sum();
    for frac in [0.5, 0.9, 0.99] {
        let mut acc = 0.0;
        let want = sigma
            .iter()
            .position(|s| {
                acc += s * s;
                acc >= frac * total
            })
            .unwrap()
            + 1;
        let enc = parse_codec(&format!("lowrank:energy={frac}"))
            .unwrap()
            .encode(&input("w", rows, cols, &base, &ft))
            .unwrap();
        let deltaserve_format::TensorEntry::Coded { params, .. } = &enc.entry else {
            panic!("not coded")
        };
        assert_eq!(params["rank"], want, "energy {frac}");
    }
}

/// f16 factors: the extra error over the tail is f16 rounding of the factors, bounded.
#[test]
fn lowrank_f16_factors_add_only_rounding_error() {
    let (rows, cols, rank) = (96, 64, 8);
    let (base, ft, d) = pair(rows, cols, 0.6, 3);
    let sigma = jacobi_singular_values(&d, rows, cols);
    let tail: f64 = sigma[rank..].iter().map(|s| s * s).sum();
    let enc = parse_codec(&format!("lowrank:rank={rank}"))
        .unwrap()
        .encode(&input("w", rows, cols, &base, &ft))
        .unwrap();
    assert_eq!(
        enc.bits_per_param(),
        16.0 * (rank * (rows + cols)) as f64 / (rows * cols) as f64
    );
    let tmp = tempfile::tempdir().unwrap();
    let file = through_file(&enc, "w", tmp.path());
    let got = decode_dense(&file, "w", file.entry("w").unwrap()).unwrap();
    let kept: f64 = sigma[..rank].iter().map(|s| s * s).sum();
    // Relative f16 rounding 2^-11 per factor entry, two factors: ~1e-3 of the kept norm.
    let err = sq_err(&got, &d);
    assert!(
        err - tail < (2e-3f64).powi(2) * kept * 4.0,
        "error {err:e}, tail {tail:e}, kept {kept:e}"
    );
}

/// Delta-CoMe: per-vector uniform quantization, checked code by code against an f64
/// reimplementation on the decoded factors, and the error ordering across bit-widths.
#[test]
fn lowrank_mixed_quantizes_each_singular_vector_like_an_f64_reference() {
    let (rows, cols) = (120, 80);
    let (base, ft, d) = pair(rows, cols, 0.7, 11);
    let tmp = tempfile::tempdir().unwrap();
    let spec = "lowrank-mixed:ranks=2/8/16,bits=8/3/2";
    let enc = parse_codec(spec)
        .unwrap()
        .encode(&input("w", rows, cols, &base, &ft))
        .unwrap();
    let file = through_file(&enc, "w", tmp.path());
    let entry = file.entry("w").unwrap();
    let Decoded::LowRank { rank, down, up } =
        deltaserve_codecs::codec::decode(&file, "w", entry).unwrap()
    else {
        panic!("mixed low-rank decodes to factors")
    };
    assert_eq!(rank, 26);
    // Each decoded vector lies on its own uniform grid of 2^b levels spanning [min, max].
    let bits_of = |k: usize| {
        if k < 2 {
            8
        } else if k < 10 {
            3
        } else {
            2
        }
    };
    for k in 0..rank {
        let b = bits_of(k);
        let col: Vec<f64> = (0..rows).map(|i| f64::from(up[i * rank + k])).collect();
        let row: Vec<f64> = down[k * cols..][..cols]
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        for v in [col, row] {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let step = (hi - lo) / f64::from((1u32 << b) - 1);
            for x in &v {
                let q = (x - lo) / step;
                assert!((q - q.round()).abs() < 1e-3, "vector {k} ({b} bits): {q}");
            }
        }
    }
    // 8-bit everywhere is close to the exact rank-26 truncation; 8/3/2 is worse but bounded.
    let sigma = jacobi_singular_values(&d, rows, cols);
    let tail: f64 = sigma[26..].iter().map(|s| s * s).sum();
    let total: f64 = sigma.iter().map(|s| s * s).sum();
    let dense = |spec: &str| {
        let enc = parse_codec(spec)
            .unwrap()
            .encode(&input("w", rows, cols, &base, &ft))
            .unwrap();
        let f = through_file(&enc, "w", tmp.path());
        (
            sq_err(&decode_dense(&f, "w", f.entry("w").unwrap()).unwrap(), &d),
            enc.bits_per_param(),
        )
    };
    let (e8, b8) = dense("lowrank-mixed:ranks=2/8/16,bits=8/8/8");
    let (emix, bmix) = dense(spec);
    assert!(
        e8 < tail + 1e-3 * total,
        "8-bit error {e8:e}, tail {tail:e}"
    );
    assert!(emix > e8 && emix < 0.5 * total, "mixed error {emix:e}");
    // Sizes: codes at b bits per element plus two f32 per vector.
    let want = |bits: [usize; 3]| {
        let ranks = [2, 8, 16];
        let bytes: usize = ranks
            .iter()
            .zip(bits)
            .map(|(&r, b)| (r * rows * b).div_ceil(8) + (r * cols * b).div_ceil(8) + 16 * r)
            .sum();
        bytes as f64 * 8.0 / (rows * cols) as f64
    };
    assert_eq!(b8, want([8, 8, 8]));
    assert_eq!(bmix, want([8, 3, 2]));
}

#[test]
fn dare_keeps_rescaled_values_and_the_expectation() {
    let (rows, cols) = (64, 48);
    let (base, ft, d) = pair(rows, cols, 0.9, 5);
    let tmp = tempfile::tempdir().unwrap();
    let p = 0.75;
    let mut mean = vec![0f64; rows * cols];
    let trials = 400;
    for seed in 0..trials {
        let codec = parse_codec(&format!("dare:p={p},seed={seed},dtype=f32")).unwrap();
        let enc = codec.encode(&input("w", rows, cols, &base, &ft)).unwrap();
        let file = through_file(&enc, "w", tmp.path());
        let got = decode_dense(&file, "w", file.entry("w").unwrap()).unwrap();
        let mut kept = 0;
        for ((g, x), m) in got.iter().zip(&d).zip(mean.iter_mut()) {
            if *g != 0.0 {
                kept += 1;
                // f32 storage: exactly x / (1 − p) rounded once.
                assert_eq!(*g, (f64::from(*x) / (1.0 - p)) as f32);
            }
            *m += f64::from(*g) / f64::from(trials);
        }
        // Binomial(3072, 0.25): 5 standard deviations.
        let n = (rows * cols) as f64;
        assert!((kept as f64 - n * (1.0 - p)).abs() < 5.0 * (n * p * (1.0 - p)).sqrt());
        if seed == 0 {
            // mask=seed decodes the same matrix without storing the mask.
            let enc2 = parse_codec(&format!("dare:p={p},seed=0,dtype=f32,mask=seed"))
                .unwrap()
                .encode(&input("w", rows, cols, &base, &ft))
                .unwrap();
            assert_eq!(
                enc2.stored_bytes() + (rows * cols / 8) as u64,
                enc.stored_bytes()
            );
            let f2 = through_file(&enc2, "w", tmp.path());
            assert_eq!(decode_dense(&f2, "w", f2.entry("w").unwrap()).unwrap(), got);
        }
    }
    // E[D̃] = D: the mean over seeds is within 5 standard errors of D, elementwise in bulk.
    let var_factor = p / (1.0 - p) / f64::from(trials);
    let z2: f64 = mean
        .iter()
        .zip(&d)
        .map(|(m, x)| (m - f64::from(*x)).powi(2) / (var_factor * f64::from(*x).powi(2)).max(1e-30))
        .sum::<f64>()
        / (rows * cols) as f64;
    assert!((z2 - 1.0).abs() < 0.15, "mean squared z-score {z2}");
    let _ = Dare {
        p,
        seed: 0,
        store_mask: true,
        dtype: FloatDtype::F16,
    };
}

/// DeltaDQ's dropout + quantization against an f64 reimplementation: the same kept positions
/// (the codec's documented generator), rescaled by h/k, quantized on the row's f16 grid.
#[test]
fn deltadq_matches_an_f64_reimplementation() {
    let (rows, cols) = (32, 200); // 200 is not a multiple of the group size: a short last group
    let (base, ft, d) = pair(rows, cols, 0.9, 21);
    let tmp = tempfile::tempdir().unwrap();
    for (keep, bits, group) in [(4usize, 4u32, 16usize), (8, 2, 64), (2, 8, 8)] {
        let spec = format!("deltadq:keep={keep},bits={bits},group={group},seed=3");
        let enc = parse_codec(&spec)
            .unwrap()
            .encode(&input("w", rows, cols, &base, &ft))
            .unwrap();
        let file = through_file(&enc, "w", tmp.path());
        let got = decode_dense(&file, "w", file.entry("w").unwrap()).unwrap();
        let key = deltaserve_codecs::dare::stream_key(3, "w");
        let levels = f64::from((1u32 << bits) - 1);
        let f16 = |x: f64| f64::from(half::f16::from_f64(x).to_f32());
        let mut n_kept = 0;
        for r in 0..rows {
            let mut kept: Vec<(usize, f64)> = Vec::new();
            for g in 0..cols.div_ceil(group) {
                let len = (cols - g * group).min(group);
                let k = len.div_ceil(keep);
                assert_eq!(kept_in_group(len, keep), k);
                let pos = group_positions(key, r, g, len, k);
                assert_eq!(pos.len(), k);
                for j in pos {
                    let c = g * group + j;
                    kept.push((c, f64::from(d[r * cols + c]) * len as f64 / k as f64));
                }
            }
            n_kept += kept.len();
            let lo = kept.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
            let hi = kept.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
            let (min, scale) = (f16(lo), f16((hi - lo) / levels));
            let mut want = vec![0f64; cols];
            for (c, v) in &kept {
                let code = ((v - min) / scale).round().clamp(0.0, levels);
                want[*c] = min + code * scale;
            }
            for c in 0..cols {
                let g = f64::from(got[r * cols + c]);
                // Values off the kept set are exactly 0; kept ones match to f32 rounding of
                // min + code·scale (and never differ by a whole step).
                assert!(
                    (g - want[c]).abs() <= 1e-6 * (min.abs() + levels * scale),
                    "{spec} row {r} col {c}: got {g}, want {}",
                    want[c]
                );
            }
        }
        let bytes = (n_kept * bits as usize).div_ceil(8) + 4 * rows;
        assert_eq!(enc.stored_bytes(), bytes as u64, "{spec}");
    }
}

#[test]
fn deltadq_keeps_the_expectation_and_hits_the_ratio() {
    let (rows, cols) = (16, 128);
    let (base, ft, d) = pair(rows, cols, 0.9, 2);
    let trials = 300;
    let mut mean = vec![0f64; rows * cols];
    let tmp = tempfile::tempdir().unwrap();
    for seed in 0..trials {
        let enc = parse_codec(&format!("deltadq:keep=4,bits=8,group=16,seed={seed}"))
            .unwrap()
            .encode(&input("w", rows, cols, &base, &ft))
            .unwrap();
        let f = through_file(&enc, "w", tmp.path());
        for (m, g) in mean
            .iter_mut()
            .zip(decode_dense(&f, "w", f.entry("w").unwrap()).unwrap())
        {
            *m += f64::from(g) / f64::from(trials);
        }
    }
    let rel = (sq_err(&mean.iter().map(|&x| x as f32).collect::<Vec<_>>(), &d)
        / d.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>())
    .sqrt();
    // One draw has relative error ≈ √(keep−1) = 1.7; the mean of 300 ≈ 1.7/√300 = 0.1.
    assert!(rel < 0.15, "relative error of the mean {rel}");
    // ratio=32 at 4 bits keeps one in 8: 0.5 bits per weight plus 32 bits of row grid.
    let enc = parse_codec("deltadq:ratio=32")
        .unwrap()
        .encode(&input("w", rows, cols, &base, &ft))
        .unwrap();
    assert_eq!(enc.bits_per_param(), 0.5 + 32.0 / cols as f64);
}

/// The group-size criterion, recomputed in f64 here: a row whose intermediate results change
/// scale every 32 columns is balanced only within groups of at most 32.
#[test]
fn deltadq_group_size_minimises_the_dropout_variance() {
    let (rows, cols) = (8, 256);
    let base = vec![0f32; rows * cols];
    let mut ft = vec![0f32; rows * cols];
    let wobble = noise(4, rows * cols);
    for (i, v) in ft.iter_mut().enumerate() {
        let c = i % cols;
        let level = if (c / 32) % 2 == 0 { 1.0 } else { 0.01 };
        *v = (level * (1.0 + 0.1 * wobble[i])) as f32;
    }
    let score = |h: usize, x: &[f64]| -> f64 {
        let mut s = 0.0;
        for r in 0..rows {
            for g0 in (0..cols).step_by(h) {
                let n = (cols - g0).min(h);
                let k = n.div_ceil(4);
                let t: Vec<f64> = (g0..g0 + n)
                    .map(|c| f64::from(ft[r * cols + c]) * x[c])
                    .collect();
                let mean = t.iter().sum::<f64>() / n as f64;
                let var = t.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
                s += (n * n) as f64 / k as f64 * (1.0 - k as f64 / n as f64) * var;
            }
        }
        s
    };
    let best = |x: &[f64]| {
        let mut h = 4;
        let mut best = (f64::INFINITY, 0);
        while h <= cols {
            let s = score(h, x);
            if s < best.0 {
                best = (s, h);
            }
            h *= 2;
        }
        best.1
    };
    let dq = DeltaDq {
        keep: 4,
        bits: 4,
        group: None,
        seed: 0,
    };
    let m = input("w", rows, cols, &base, &ft);
    let ones = vec![1.0; cols];
    let h = dq.choose_group(&m, &m.delta());
    assert_eq!(h, best(&ones));
    assert!(h <= 32, "chose {h}");
    // With calibration that silences the large columns, the balance changes.
    let x: Vec<f64> = (0..cols)
        .map(|c| if (c / 32) % 2 == 0 { 0.01 } else { 1.0 })
        .collect();
    let gram: Vec<f32> = (0..cols * cols)
        .map(|i| {
            if i / cols == i % cols {
                (x[i % cols] * x[i % cols] * 10.0) as f32
            } else {
                0.0
            }
        })
        .collect();
    let calib = Calibration { gram, tokens: 10 };
    let m2 = MatrixInput {
        calibration: Some(&calib),
        ..m
    };
    let xf: Vec<f64> = x
        .iter()
        .map(|v| f64::from(((v * v * 10.0) as f32) / 10.0).sqrt())
        .collect();
    assert_eq!(dq.choose_group(&m2, &m2.delta()), best(&xf));
}

#[test]
fn bad_specs_give_one_line_errors() {
    for (spec, want) in [
        ("lowrank:rank=4,energy=0.5", "give rank or energy, not both"),
        ("lowrank:energy=1.5", "energy=1.5 is not a number in (0, 1]"),
        ("lowrank:dtype=f8", "dtype=f8 is not one of f16, bf16, f32"),
        (
            "lowrank-mixed:ranks=2/4,bits=8",
            "ranks has 2 groups but bits has 1",
        ),
        ("lowrank-mixed:bits=9/3/2", "bits=9"),
        ("dare:p=1", "p=1 is not a number in (0, 1)"),
        ("dare:mask=zip", "mask=zip is not bitmap or seed"),
        ("deltadq:ratio=3", "ratio=3 at bits=4"),
        ("deltadq:ratio=10", "ratio=10 at bits=4"),
        ("deltadq:ratio=32,keep=8", "give ratio or keep, not both"),
        (
            "deltadq:keep=8,group=12",
            "group=12 is not a multiple of keep=8",
        ),
        (
            "deltadq:colour=red",
            "unknown setting \"colour\" for deltadq (valid: ratio=R, keep=Q",
        ),
    ] {
        let err = MethodSpec::parse(spec).unwrap_err().to_string();
        assert!(err.contains(want), "{spec}: {err}");
        assert!(err.starts_with("--method: \""), "{spec}: {err}");
        assert!(!err.contains('\n'), "{spec}: {err}");
    }
}

/// Every codec through the whole pipeline on a random Llama pair: the reported size is the
/// bytes in the file, every projection is coded, and merge / load_tenant agree.
#[test]
fn pipeline_sizes_equal_the_file_and_tenant_matches_merged() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let base = Checkpoint::open(&pair.base_dir).unwrap();
    let ft = Checkpoint::open(&pair.ft_dir).unwrap();
    let fp = fingerprint_safetensors(&base.weight_files()).unwrap();
    for spec in [
        "lowrank:rank=4,dtype=f32",
        "lowrank:energy=0.9",
        "lowrank-mixed:ranks=2/4,bits=8/4",
        "dare:p=0.5",
        "dare:p=0.5,mask=seed",
        "deltadq:keep=2,bits=8",
    ] {
        let codec: Box<dyn Codec> = parse_codec(spec).unwrap();
        let out = pair.path(&format!(
            "{}.delta",
            spec.replace([':', ',', '=', '/', '.'], "_")
        ));
        let opts = deltaserve_codecs::bitdelta::CompressOptions {
            out: out.clone(),
            force: false,
            progress: false,
        };
        let report = compress_coded(&base, &ft, codec.as_ref(), None, &opts).unwrap();
        let delta = DeltaFile::open(&out).unwrap();
        assert_eq!(delta.header().method, codec.spec());
        // Bytes of every coded part, read from the file itself.
        let mut part_bytes = 0u64;
        let mut params = 0u64;
        let mut coded = 0;
        for (name, entry) in &delta.header().tensors {
            if let deltaserve_format::TensorEntry::Coded { parts, shape, .. } = entry {
                coded += 1;
                params += (shape[0] * shape[1]) as u64;
                for role in parts.keys() {
                    part_bytes += delta.part(entry, role).unwrap().0.len() as u64;
                }
                // Re-encoding the tensor alone reports the same size.
                let enc = deltaserve_codecs::coded::encode_tensor(
                    codec.as_ref(),
                    name,
                    &base.raw(name).unwrap(),
                    &ft.raw(name).unwrap(),
                    None,
                )
                .unwrap();
                assert_eq!(
                    enc.stored_bytes(),
                    parts
                        .keys()
                        .map(|r| delta.part(entry, r).unwrap().0.len() as u64)
                        .sum::<u64>(),
                    "{spec} {name}"
                );
            }
        }
        assert_eq!(coded, 7 * pair.spec.layers, "{spec}");
        assert_eq!(
            report.bits_per_param,
            part_bytes as f64 * 8.0 / params as f64,
            "{spec}"
        );

        // The tenant path against the merged checkpoint (both f32).
        let tenant = load_tenant(&delta, &base, &fp, DType::F32, &Device::Cpu).unwrap();
        if spec.starts_with("lowrank") {
            assert!(tenant.layers.iter().all(|l| l
                .linears
                .iter()
                .all(|x| matches!(x, Some(LinearDelta::LowRank { .. })))));
        } else {
            assert!(tenant.layers.iter().all(|l| l
                .linears
                .iter()
                .all(|x| matches!(x, Some(LinearDelta::Dense { .. })))));
        }
        let merged = pair.path(&format!("merged-{coded}-{}", spec.len()));
        let _ = std::fs::remove_dir_all(&merged);
        merge_to(
            &pair.base_dir,
            &out,
            &MergeOptions {
                dtype: Some(FloatDtype::F32),
                ..merge_opts(&merged)
            },
        );
        let (_, base_model) = load_f32(&pair.base_dir);
        let (_, merged_model) = load_f32(&merged);
        let tokens = [1u32, 5, 9, 2, 33, 60, 4];
        let via_tenant = logits(&base_model, Some(&tenant), &tokens);
        let via_merged = logits(&merged_model, None, &tokens);
        // Same model, two summation orders in f32 (x·Wᵀ + x·downᵀ·upᵀ vs x·(W + up·down)ᵀ).
        assert_close(spec, &via_tenant, &via_merged, 1e-5);
    }
    let _: BTreeMap<(), ()> = BTreeMap::new();
}
