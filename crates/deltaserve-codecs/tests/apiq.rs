//! ApiQ-style initialisation (`apiq`): each step against a plain f64 computation written
//! here (Cholesky, Jacobi eigenvalues, a column-by-column GPTQ sweep, normal equations), and
//! the point of the method: on inputs with anisotropic activations its layer-output error is
//! lower than LQ-LoRA's weight-space initialisation at the same NF configuration and rank.

use deltaserve_codecs::apiq::{
    corrected_target, decompose, nf_error_feedback, weighted_lowrank, ActivationMetric, ApiqOptions,
};
use deltaserve_codecs::lqlora::{self, LqOptions};
use deltaserve_codecs::nf::{code_values, NfConfig, NfTensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// `n × cols` activations whose channels have very different scales (e^-3 … e^1.5, and a few
/// outlier channels ×8, as LLM activations do) and some correlation between channels.
fn anisotropic_inputs(n: usize, cols: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let scale: Vec<f64> = (0..cols)
        .map(|j| {
            let s = (-3.0 + 4.5 * j as f64 / (cols - 1) as f64).exp();
            if j % 17 == 3 {
                8.0 * s
            } else {
                s
            }
        })
        .collect();
    let mut x = vec![0.0; n * cols];
    for t in 0..n {
        let shared = normal(&mut rng);
        for j in 0..cols {
            x[t * cols + j] = scale[j] * (normal(&mut rng) + 0.3 * shared);
        }
    }
    x
}

/// `n × cols` activations driven by a few shared factors plus small independent noise: the
/// strongly correlated channels that give GPTQ-style error feedback something to work with.
fn correlated_inputs(n: usize, cols: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let k = 6;
    let mix: Vec<f64> = (0..k * cols).map(|_| normal(&mut rng)).collect();
    let mut x = vec![0.0; n * cols];
    for t in 0..n {
        let z: Vec<f64> = (0..k).map(|_| normal(&mut rng)).collect();
        for j in 0..cols {
            let f: f64 = (0..k).map(|a| z[a] * mix[a * cols + j]).sum();
            x[t * cols + j] = f + 0.05 * normal(&mut rng);
        }
    }
    x
}

/// AᵀB for `n × a` and `n × b` row-major matrices.
fn at_b(a: &[f64], b: &[f64], n: usize, ca: usize, cb: usize) -> Vec<f64> {
    let mut out = vec![0.0; ca * cb];
    for t in 0..n {
        for i in 0..ca {
            let ai = a[t * ca + i];
            for j in 0..cb {
                out[i * cb + j] += ai * b[t * cb + j];
            }
        }
    }
    out
}

/// Σ_i d_i H d_iᵀ.
fn act_err(d: &[f64], rows: usize, cols: usize, h: &[f64]) -> f64 {
    let mut s = 0.0;
    for i in 0..rows {
        for a in 0..cols {
            for b in 0..cols {
                s += d[i * cols + a] * h[a * cols + b] * d[i * cols + b];
            }
        }
    }
    s
}

/// Lower Cholesky factor of a symmetric positive definite `n × n` matrix.
fn cholesky(a: &[f64], n: usize) -> Vec<f64> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            l[i * n + j] = if i == j {
                assert!(s > 0.0, "not positive definite");
                s.sqrt()
            } else {
                s / l[j * n + j]
            };
        }
    }
    l
}

/// Inverse by Gauss–Jordan elimination with partial pivoting.
fn inverse(a: &[f64], n: usize) -> Vec<f64> {
    let mut m = a.to_vec();
    let mut inv = vec![0.0; n * n];
    for i in 0..n {
        inv[i * n + i] = 1.0;
    }
    for c in 0..n {
        let p = (c..n)
            .max_by(|&x, &y| m[x * n + c].abs().total_cmp(&m[y * n + c].abs()))
            .unwrap();
        for k in 0..n {
            m.swap(c * n + k, p * n + k);
            inv.swap(c * n + k, p * n + k);
        }
        let d = m[c * n + c];
        for k in 0..n {
            m[c * n + k] /= d;
            inv[c * n + k] /= d;
        }
        for r in 0..n {
            if r != c {
                let f = m[r * n + c];
                for k in 0..n {
                    m[r * n + k] -= f * m[c * n + k];
                    inv[r * n + k] -= f * inv[c * n + k];
                }
            }
        }
    }
    inv
}

/// Eigenvalues and eigenvectors (columns of the returned row-major matrix) of a symmetric
/// matrix by cyclic Jacobi rotations.
fn jacobi(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut m = a.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _ in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i * n + j] * m[i * n + j])
            .sum();
        if off < 1e-26 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (m[q * n + q] - m[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (mkp, mkq) = (m[k * n + p], m[k * n + q]);
                    m[k * n + p] = c * mkp - s * mkq;
                    m[k * n + q] = s * mkp + c * mkq;
                }
                for k in 0..n {
                    let (mpk, mqk) = (m[p * n + k], m[q * n + k]);
                    m[p * n + k] = c * mpk - s * mqk;
                    m[q * n + k] = s * mpk + c * mqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| m[i * n + i]).collect(), v)
}

fn random_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows * cols)
        .map(|_| (0.05 * normal(&mut rng)) as f32)
        .collect()
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn weighted_lowrank_leaves_the_tail_of_the_weighted_singular_values() {
    let (rows, cols, rank) = (20, 12, 3);
    let x = anisotropic_inputs(80, cols, 1);
    let h = at_b(&x, &x, 80, cols, cols);
    let metric = ActivationMetric::new(&h, cols, 0.0).unwrap();
    let t = random_matrix(rows, cols, 2);
    let opts = LqOptions {
        rank,
        ..LqOptions::default()
    };
    let (l1, l2) = weighted_lowrank(&t, rows, &metric, &opts, &mut StdRng::seed_from_u64(0));
    let lr = lqlora::lowrank_product(&l1, &l2, rows, cols, rank);
    let d: Vec<f64> = t
        .iter()
        .zip(&lr)
        .map(|(&a, &b)| a as f64 - b as f64)
        .collect();
    let err = act_err(&d, rows, cols, &h);

    // Reference: H = R Rᵀ, the weighted singular values of T are those of T·R, i.e. the
    // square roots of the eigenvalues of (TR)ᵀ(TR); the optimum leaves the smallest ones.
    let r = cholesky(&h, cols);
    let tf = to_f64(&t);
    let mut b = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            b[i * cols + j] = (0..cols).map(|k| tf[i * cols + k] * r[k * cols + j]).sum();
        }
    }
    let (mut ev, _) = jacobi(&at_b(&b, &b, rows, cols, cols), cols);
    ev.sort_by(f64::total_cmp);
    let tail: f64 = ev[..cols - rank].iter().sum();
    assert!(
        (err - tail).abs() <= 1e-4 * tail,
        "error {err} vs weighted tail {tail}"
    );
    // The module's own error report is the same number.
    let d32: Vec<f32> = d.iter().map(|&v| v as f32).collect();
    let reported = metric.error(&d32, rows);
    assert!((reported - err).abs() <= 1e-4 * err, "{reported} vs {err}");

    // The unweighted rank-r truncation (what LQ-LoRA's SVD step does) is worse under H.
    let (_, v) = jacobi(&at_b(&tf, &tf, rows, cols, cols), cols);
    let (evt, _) = jacobi(&at_b(&tf, &tf, rows, cols, cols), cols);
    let mut order: Vec<usize> = (0..cols).collect();
    order.sort_by(|&a, &b| evt[b].total_cmp(&evt[a]));
    let mut d_plain = tf.clone();
    for &k in &order[..rank] {
        for i in 0..rows {
            let proj: f64 = (0..cols).map(|j| tf[i * cols + j] * v[j * cols + k]).sum();
            for j in 0..cols {
                d_plain[i * cols + j] -= proj * v[j * cols + k];
            }
        }
    }
    let plain_err = act_err(&d_plain, rows, cols, &h);
    assert!(
        err < 0.9 * plain_err,
        "weighted {err} should beat unweighted {plain_err}"
    );
}

#[test]
fn error_feedback_matches_a_plain_f64_gptq_sweep() {
    // 40 columns with NF blocks of 16 (blocks cross row ends) and lazy-update blocks of 8.
    let (rows, cols, n) = (6, 40, 200);
    let x = correlated_inputs(n, cols, 3);
    let h = at_b(&x, &x, n, cols, cols);
    let damp = 0.01;
    let metric = ActivationMetric::new(&h, cols, damp).unwrap();
    let t = random_matrix(rows, cols, 4);
    let cfg = NfConfig::new(3, 16).unwrap();
    let got = nf_error_feedback(&t, rows, cfg, &metric, 8);

    // Reference: scales of plain NF, U = upper Cholesky factor of (H + λI)⁻¹, then for each
    // column: nearest NF value, error e = (w − q)/U_jj, w_k −= e·U_jk for every later column.
    let plain = NfTensor::quantize(&t, cfg);
    let scales = plain.block_scales();
    let values = code_values(3);
    let mean_diag = (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
    let mut hd = h.clone();
    for i in 0..cols {
        hd[i * cols + i] += damp * mean_diag;
    }
    let l = cholesky(&inverse(&hd, cols), cols);
    let u = |i: usize, j: usize| l[j * cols + i];
    let mut w = to_f64(&t);
    let mut want = vec![0u8; rows * cols];
    for c in 0..cols {
        for r in 0..rows {
            let s = scales[(r * cols + c) / 16] as f64;
            let y = w[r * cols + c] / s;
            let code = (0..values.len())
                .min_by(|&a, &b| (values[a] - y).abs().total_cmp(&(values[b] - y).abs()))
                .unwrap();
            want[r * cols + c] = code as u8;
            let e = (w[r * cols + c] - values[code] * s) / u(c, c);
            for k in c + 1..cols {
                w[r * cols + k] -= e * u(c, k);
            }
        }
    }
    let same = got.codes.iter().zip(&want).filter(|(a, b)| a == b).count();
    assert_eq!(same, rows * cols, "codes differ from the f64 sweep");
    assert_eq!(got.scale_codes, plain.scale_codes);
    assert_eq!(got.storage_bits(), plain.storage_bits());

    // And it lowers the layer-output error against plain rounding with the same scales.
    let err_of = |q: &NfTensor| {
        let d: Vec<f64> = t
            .iter()
            .zip(q.dequantize())
            .map(|(&a, b)| a as f64 - b as f64)
            .collect();
        act_err(&d, rows, cols, &h)
    };
    let (eg, ep) = (err_of(&got), err_of(&plain));
    assert!(eg < 0.8 * ep, "error feedback {eg} vs plain {ep}");
}

#[test]
fn corrected_target_is_the_least_squares_optimum() {
    // X_q = X_fp + perturbation (the inputs after quantized earlier layers).
    let (rows, cols, n) = (5, 8, 60);
    let xf = anisotropic_inputs(n, cols, 5);
    let mut rng = StdRng::seed_from_u64(6);
    let xq: Vec<f64> = xf.iter().map(|&v| v + 0.1 * normal(&mut rng)).collect();
    let h = at_b(&xq, &xq, n, cols, cols);
    let cross = at_b(&xf, &xq, n, cols, cols); // Σ x_fpᵀ x_q
    let metric = ActivationMetric::new(&h, cols, 0.0).unwrap();
    let w = random_matrix(rows, cols, 7);
    let got = corrected_target(&w, rows, &h, &cross, &metric);

    // Reference: the normal equations H Ŵᵀ = X_qᵀ X_fp Wᵀ.
    let hinv = inverse(&h, cols);
    let qf = at_b(&xq, &xf, n, cols, cols);
    let wf = to_f64(&w);
    for i in 0..rows {
        let rhs: Vec<f64> = (0..cols)
            .map(|a| (0..cols).map(|b| qf[a * cols + b] * wf[i * cols + b]).sum())
            .collect();
        for j in 0..cols {
            let want: f64 = (0..cols).map(|k| hinv[j * cols + k] * rhs[k]).sum();
            let g = got[i * cols + j] as f64;
            assert!(
                (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "({i},{j}) {g} vs {want}"
            );
        }
    }
    // The identity the module relies on: output error of any Ŵ = tr((W̃−Ŵ)H(W̃−Ŵ)ᵀ) + const.
    let out_err = |what: &[f64]| -> f64 {
        let mut s = 0.0;
        for t in 0..n {
            for i in 0..rows {
                let a: f64 = (0..cols).map(|j| xf[t * cols + j] * wf[i * cols + j]).sum();
                let b: f64 = (0..cols)
                    .map(|j| xq[t * cols + j] * what[i * cols + j])
                    .sum();
                s += (a - b) * (a - b);
            }
        }
        s
    };
    let tilde = to_f64(&got);
    let other = to_f64(&random_matrix(rows, cols, 8));
    let d: Vec<f64> = tilde.iter().zip(&other).map(|(a, b)| a - b).collect();
    let lhs = out_err(&other) - out_err(&tilde);
    let rhs = act_err(&d, rows, cols, &h);
    assert!((lhs - rhs).abs() <= 1e-4 * rhs, "{lhs} vs {rhs}");
}

#[test]
fn apiq_init_has_lower_output_error_than_lqlora_init() {
    let (rows, cols, n, rank) = (64, 96, 600, 8);
    let x = anisotropic_inputs(n, cols, 9);
    let h = at_b(&x, &x, n, cols, cols);
    let metric = ActivationMetric::new(&h, cols, 0.01).unwrap();
    let w = random_matrix(rows, cols, 10);
    let cfg = NfConfig::new(2, 64).unwrap();
    let lq_opts = LqOptions {
        rank,
        max_iters: 10,
        ..LqOptions::default()
    };
    let lq = lqlora::decompose(&w, rows, cols, cfg, &lq_opts, None).unwrap();
    let output_error = |rec: &[f32]| {
        let d: Vec<f64> = w
            .iter()
            .zip(rec)
            .map(|(&a, &b)| a as f64 - b as f64)
            .collect();
        act_err(&d, rows, cols, &h)
    };
    let e_lq = output_error(&lq.reconstruct());
    for error_feedback in [true, false] {
        let opts = ApiqOptions {
            lq: lq_opts,
            error_feedback,
            ..ApiqOptions::default()
        };
        let ap = decompose(&w, rows, cfg, &metric, &opts).unwrap();
        let e_ap = output_error(&ap.reconstruct());
        assert!(
            (ap.error - e_ap).abs() <= 1e-3 * e_ap,
            "reported {} vs f64 {e_ap}",
            ap.error
        );
        assert!(
            e_ap < 0.7 * e_lq,
            "ApiQ (error feedback {error_feedback}) {e_ap} vs LQ-LoRA {e_lq}"
        );
        // Same bits: the configuration fixes them.
        assert_eq!(ap.q.storage_bits(), lq.q.storage_bits());
        assert!(ap.history[0] >= ap.error);
    }
}

#[test]
fn bad_metric_input_is_an_error_not_a_panic() {
    let e = ActivationMetric::new(&[1.0, 0.0, 0.0], 2, 0.01).unwrap_err();
    assert!(e.to_string().contains("--data"), "{e}");
    let e = ActivationMetric::new(&[1.0, f64::NAN, f64::NAN, 1.0], 2, 0.01).unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
    let metric = ActivationMetric::new(&[1.0, 0.0, 0.0, 1.0], 2, 0.01).unwrap();
    let cfg = NfConfig::new(2, 16).unwrap();
    let e = decompose(&[0.0; 6], 3, cfg, &metric, &ApiqOptions::default()).unwrap_err();
    assert!(e.to_string().contains("--rank"), "{e}");
}

/// Seconds for one 4096×4096 matrix (rank 64, nf3-b64, with error feedback): the metric's factorisation (once per
/// distinct layer input, shared by q/k/v and every configuration) and each alternation.
/// `cargo test --release -p deltaserve-codecs --test apiq -- --ignored --nocapture time_4096`
#[test]
#[ignore]
fn time_4096_square() {
    use std::time::Instant;
    let n = 4096;
    let mut rng = StdRng::seed_from_u64(11);
    // H = A Aᵀ + diag: 64 strong shared directions over anisotropic channel variances.
    let k = 64;
    let a: Vec<f64> = (0..n * k).map(|_| normal(&mut rng)).collect();
    let mut h = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..k).map(|t| a[i * k + t] * a[j * k + t]).sum();
            h[i * n + j] = s;
            h[j * n + i] = s;
        }
        h[i * n + i] += (-3.0 + 4.5 * i as f64 / n as f64).exp() * k as f64;
    }
    let w = random_matrix(n, n, 12);
    let t0 = Instant::now();
    let metric = ActivationMetric::new(&h, n, 0.01).unwrap();
    let setup = t0.elapsed().as_secs_f64();
    for iters in [1, 3] {
        let opts = ApiqOptions {
            lq: LqOptions {
                rank: 64,
                max_iters: iters,
                rel_tol: 0.0,
                ..LqOptions::default()
            },
            error_feedback: true,
            ..ApiqOptions::default()
        };
        let t = Instant::now();
        let d = decompose(&w, n, NfConfig::new(3, 64).unwrap(), &metric, &opts).unwrap();
        println!(
            "4096x4096 rank 64 nf3-b64: metric setup {setup:.1} s; {iters} alternation(s) {:.1} s (error {:.4e})",
            t.elapsed().as_secs_f64(),
            d.error
        );
    }
}
