//! RTN, GPTQ and EoRA numerics against independent references: plain float64 computations
//! written here (RTN, EoRA) and the PyTorch GPTQ reference's fixture
//! (`tests/fixtures/gptq_reference.safetensors`, made by `scripts/reference/gptq_reference.py`).

use deltaserve_codecs::codec::{pack_codes, unpack_codes};
use deltaserve_codecs::eora::eora_correction;
use deltaserve_codecs::gptq::{quantize_gptq, GptqConfig};
use deltaserve_codecs::rtn::{quantize_rtn, GridSpec};
use rand::{rngs::StdRng, Rng, SeedableRng};
use safetensors::SafeTensors;

fn randn(rng: &mut StdRng, n: usize, std: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            // Box-Muller.
            let (u1, u2): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

// ---------------------------------------------------------------- RTN

/// The min/max grid written out once more, in float64, straight from the GPTQ reference's
/// `Quantizer.find_params` / `quantize` (asymmetric, per group of a row).
fn rtn_reference(w: &[f32], rows: usize, cols: usize, bits: u32, group: usize) -> Vec<f64> {
    let maxq = (2f64).powi(bits as i32) - 1.0;
    let mut out = vec![0f64; rows * cols];
    for r in 0..rows {
        for g0 in (0..cols).step_by(group) {
            let g1 = (g0 + group).min(cols);
            let vals: Vec<f64> = (g0..g1).map(|c| w[r * cols + c] as f64).collect();
            let mut lo = vals.iter().cloned().fold(f64::INFINITY, f64::min).min(0.0);
            let mut hi = vals
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, f64::max)
                .max(0.0);
            if lo == 0.0 && hi == 0.0 {
                lo = -1.0;
                hi = 1.0;
            }
            let scale = (hi - lo) / maxq;
            let zero = (-lo / scale).round_ties_even();
            for (k, v) in vals.iter().enumerate() {
                let q = ((v / scale).round_ties_even() + zero).clamp(0.0, maxq);
                out[r * cols + g0 + k] = scale * (q - zero);
            }
        }
    }
    out
}

#[test]
fn rtn_matches_float64_reference_per_channel_and_grouped() {
    let mut rng = StdRng::seed_from_u64(1);
    let (rows, cols) = (7, 301);
    let mut w: Vec<f32> = randn(&mut rng, rows * cols, 0.02)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    w[5 * cols..6 * cols].fill(0.0); // an all-zero row
    for (bits, group) in [(8u8, None), (8, Some(128)), (4, Some(128)), (3, Some(64))] {
        let spec = GridSpec {
            bits,
            group_size: group,
            symmetric: false,
            f16_scales: false,
        };
        let q = quantize_rtn(&w, rows, cols, &spec);
        let got = q.dequantize();
        let want = rtn_reference(&w, rows, cols, bits as u32, group.unwrap_or(cols));
        // Both sides compute scale·(q − zero) in f64; ours is then rounded to f32 once.
        for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g as f64 - e).abs() <= 1e-7 * e.abs().max(1e-3),
                "bits {bits} group {group:?} element {i}: {g} vs {e}"
            );
        }
        // Round to nearest: no weight is further than half a step from its value.
        let g = spec.group_cols(cols);
        for r in 0..rows {
            for c in 0..cols {
                let step = q.scales[r * spec.groups(cols) + c / g];
                let d = (got[r * cols + c] as f64 - w[r * cols + c] as f64).abs();
                assert!(d <= step / 2.0 + 1e-9, "({r},{c}) off by {d}, step {step}");
            }
        }
    }
}

#[test]
fn rtn_symmetric_zero_is_the_middle_code_and_f16_scales_decode_exactly() {
    let mut rng = StdRng::seed_from_u64(2);
    let (rows, cols) = (3, 50);
    let w: Vec<f32> = randn(&mut rng, rows * cols, 1.0)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let spec = GridSpec {
        bits: 8,
        group_size: None,
        symmetric: true,
        f16_scales: true,
    };
    let q = quantize_rtn(&w, rows, cols, &spec);
    for r in 0..rows {
        assert_eq!(q.zeros[r], 128.0);
        let absmax = w[r * cols..(r + 1) * cols]
            .iter()
            .fold(0f64, |m, &v| m.max((v as f64).abs()));
        let want = half::f16::from_f64(2.0 * absmax / 255.0).to_f64();
        assert_eq!(
            q.scales[r], want,
            "row {r}: scale is 2·absmax/255 rounded to f16"
        );
    }
    // The stored scale is an f16, so scale·(q − zero) is exact in f32.
    for (i, v) in q.dequantize().iter().enumerate() {
        let k = i / cols;
        let exact = q.scales[k] * (q.codes[i] as f64 - q.zeros[k]);
        assert_eq!(*v as f64, exact);
    }
}

#[test]
fn packed_codes_round_trip_and_have_the_accounted_size() {
    let mut rng = StdRng::seed_from_u64(3);
    for bits in [2u32, 3, 4, 8] {
        let n = 1000 + bits as usize;
        let codes: Vec<u8> = (0..n)
            .map(|_| rng.gen_range(0..(1u16 << bits)) as u8)
            .collect();
        let packed = pack_codes(&codes, bits);
        assert_eq!(packed.len(), (n * bits as usize).div_ceil(8));
        assert_eq!(unpack_codes(&packed, bits, n), codes);
    }
}

// ---------------------------------------------------------------- GPTQ

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/gptq_reference.safetensors"
);

fn f64s(st: &SafeTensors<'_>, name: &str) -> Vec<f64> {
    let t = st.tensor(name).unwrap_or_else(|_| {
        panic!("fixture lacks {name}; re-run scripts/reference/gptq_reference.py")
    });
    match t.dtype() {
        safetensors::Dtype::F64 => t
            .data()
            .chunks(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::F32 => t
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::I64 => t
            .data()
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::U8 => t.data().iter().map(|&b| b as f64).collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    }
}

/// GPTQ against the PyTorch reference (both float64). Codes must agree exactly: a float64 port
/// can differ from the reference only in the last bits of the Cholesky factors (LAPACK vs
/// faer), which moves a code only if a weight lands within ~1e-12 of a rounding boundary.
/// Dequantized values: 1e-12 absolute (weights are ~0.05, scales ~0.02).
#[test]
fn gptq_matches_pytorch_reference() {
    const TOL: f64 = 1e-12;
    let bytes = std::fs::read(FIXTURE).expect("read the GPTQ fixture");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default();
    assert_eq!(
        meta.get("fixture_version").map(String::as_str),
        Some("1"),
        "unknown fixture version; re-run scripts/reference/gptq_reference.py"
    );
    let (rows, cols) = (16, 300);
    let w: Vec<f32> = f64s(&st, "w").into_iter().map(|v| v as f32).collect();
    let h = f64s(&st, "h");
    for (case, act_order, f16_scales) in [
        ("plain", false, false),
        ("actorder", true, false),
        ("f16", false, true),
    ] {
        let d = GptqConfig::default();
        let cfg = GptqConfig {
            act_order,
            grid: GridSpec {
                f16_scales,
                ..d.grid
            },
            ..d
        };
        let q = quantize_gptq(&w, rows, cols, &h, &cfg).unwrap();
        let codes: Vec<f64> = q.codes.iter().map(|&c| c as f64).collect();
        let want_codes = f64s(&st, &format!("{case}.codes"));
        let mismatched = codes
            .iter()
            .zip(&want_codes)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            mismatched, 0,
            "{case}: {mismatched} codes differ from the reference"
        );
        if act_order {
            let perm: Vec<f64> = q
                .col_order
                .as_ref()
                .unwrap()
                .iter()
                .map(|&p| p as f64)
                .collect();
            assert_eq!(
                perm,
                f64s(&st, &format!("{case}.perm")),
                "{case}: column order"
            );
        } else {
            assert!(q.col_order.is_none());
        }
        for (what, got, want) in [
            (
                "scales",
                q.scales.clone(),
                f64s(&st, &format!("{case}.scales")),
            ),
            (
                "zeros",
                q.zeros.clone(),
                f64s(&st, &format!("{case}.zeros")),
            ),
        ] {
            let max = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f64, f64::max);
            assert!(max <= TOL, "{case} {what}: max abs diff {max:e}");
        }
        let deq = q.dequantize();
        let want = f64s(&st, &format!("{case}.dequantized"));
        let max = deq
            .iter()
            .zip(&want)
            .map(|(&a, b)| (a as f64 - b).abs())
            .fold(0f64, f64::max);
        // Our dequantized values are f32: the reference's f64 rounded once (≤ 2^-24 relative).
        assert!(
            max <= TOL + 1e-7 * 0.2,
            "{case}: dequantized max abs diff {max:e}"
        );
    }
}

/// GPTQ's point: on the calibration inputs its output error is below RTN's on the same grid.
#[test]
fn gptq_beats_rtn_on_the_layer_output() {
    let bytes = std::fs::read(FIXTURE).expect("read the GPTQ fixture");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (rows, cols) = (16, 300);
    let w: Vec<f32> = f64s(&st, "w").into_iter().map(|v| v as f32).collect();
    let h = f64s(&st, "h");
    let cfg = GptqConfig::default();
    let out_err = |wq: &[f32]| {
        // tr(E H Eᵀ) = ‖E Xᵀ‖²
        let mut total = 0f64;
        for r in 0..rows {
            let e: Vec<f64> = (0..cols)
                .map(|c| (wq[r * cols + c] - w[r * cols + c]) as f64)
                .collect();
            for i in 0..cols {
                for j in 0..cols {
                    total += e[i] * h[i * cols + j] * e[j];
                }
            }
        }
        total
    };
    let g = quantize_gptq(&w, rows, cols, &h, &cfg)
        .unwrap()
        .dequantize();
    let r = quantize_rtn(&w, rows, cols, &cfg.grid).dequantize();
    let (eg, er) = (out_err(&g), out_err(&r));
    assert!(
        eg < 0.7 * er,
        "GPTQ output error {eg:e} not clearly below RTN's {er:e}"
    );
}

// ---------------------------------------------------------------- EoRA

/// Lower Cholesky factor, textbook float64.
fn cholesky(h: &[f64], n: usize) -> Vec<f64> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            if i == j {
                l[i * n + i] = (h[i * n + i] - s).sqrt();
            } else {
                l[i * n + j] = (h[i * n + j] - s) / l[j * n + j];
            }
        }
    }
    l
}

/// Best rank-`r` approximation of `m` (rows × cols) by orthogonal (subspace) iteration on
/// `mᵀm`, float64; enough for well-separated singular values.
fn rank_r(m: &[f64], rows: usize, cols: usize, r: usize) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(9);
    let mut v = randn(&mut rng, cols * r, 1.0); // (cols, r) column-major
    for _ in 0..500 {
        // v ← mᵀ m v, then Gram-Schmidt.
        let mut mv = vec![0f64; rows * r];
        for k in 0..r {
            for i in 0..rows {
                mv[k * rows + i] = (0..cols).map(|j| m[i * cols + j] * v[k * cols + j]).sum();
            }
        }
        for k in 0..r {
            for j in 0..cols {
                v[k * cols + j] = (0..rows).map(|i| m[i * cols + j] * mv[k * rows + i]).sum();
            }
            for p in 0..k {
                let d: f64 = (0..cols).map(|j| v[k * cols + j] * v[p * cols + j]).sum();
                for j in 0..cols {
                    v[k * cols + j] -= d * v[p * cols + j];
                }
            }
            let norm = (0..cols)
                .map(|j| v[k * cols + j].powi(2))
                .sum::<f64>()
                .sqrt();
            for j in 0..cols {
                v[k * cols + j] /= norm;
            }
        }
    }
    // m·V·Vᵀ
    let mut out = vec![0f64; rows * cols];
    for i in 0..rows {
        for k in 0..r {
            let p: f64 = (0..cols).map(|j| m[i * cols + j] * v[k * cols + j]).sum();
            for j in 0..cols {
                out[i * cols + j] += p * v[k * cols + j];
            }
        }
    }
    out
}

/// EoRA's `B·A` is the minimiser of `‖(E − M) Xᵀ‖_F` over rank-r `M`. Reference, by another
/// route: with `H = L Lᵀ` (Cholesky), `‖(E − M) Xᵀ‖² = ‖(E − M) L‖²`, so
/// `M* = [E L]_r L⁻¹` (Eckart-Young in the L-weighted space). Tolerance 1e-6 relative to
/// ‖E‖: the two routes agree to float64 rounding; the f32 output factors set the floor.
#[test]
fn eora_matches_float64_reference_and_beats_plain_svd() {
    let mut rng = StdRng::seed_from_u64(4);
    let (rows, cols, samples, r) = (12, 20, 60, 3);
    let x: Vec<f64> = randn(&mut rng, samples * cols, 1.0)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1.0 + (i % cols) as f64)) // anisotropic inputs
        .collect();
    let mut h = vec![0f64; cols * cols];
    for s in 0..samples {
        for i in 0..cols {
            for j in 0..cols {
                h[i * cols + j] += x[s * cols + i] * x[s * cols + j];
            }
        }
    }
    let e: Vec<f64> = randn(&mut rng, rows * cols, 0.01);
    let e32: Vec<f32> = e.iter().map(|&v| v as f32).collect();
    let e: Vec<f64> = e32.iter().map(|&v| v as f64).collect();

    let corr = eora_correction(&e32, rows, cols, &h, r).unwrap();
    assert_eq!((corr.b.len(), corr.a.len()), (rows * r, r * cols));
    let mut ba = vec![0f32; rows * cols];
    corr.add_to(&mut ba);

    let l = cholesky(&h, cols);
    let mut el = vec![0f64; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            el[i * cols + j] = (j..cols).map(|k| e[i * cols + k] * l[k * cols + j]).sum();
        }
    }
    let el_r = rank_r(&el, rows, cols, r);
    // M = el_r · L⁻¹: solve M L = el_r row by row (back substitution on Lᵀ).
    let mut m = vec![0f64; rows * cols];
    for i in 0..rows {
        for j in (0..cols).rev() {
            let s: f64 = (j + 1..cols)
                .map(|k| m[i * cols + k] * l[k * cols + j])
                .sum();
            m[i * cols + j] = (el_r[i * cols + j] - s) / l[j * cols + j];
        }
    }
    let enorm = e.iter().map(|v| v * v).sum::<f64>().sqrt();
    let max = ba
        .iter()
        .zip(&m)
        .map(|(&a, b)| (a as f64 - b).abs())
        .fold(0f64, f64::max);
    assert!(
        max <= 1e-6 * enorm,
        "EoRA vs reference: max abs diff {max:e} (‖E‖ {enorm:e})"
    );

    // Output error after correction is below a plain (unweighted) rank-r SVD of E.
    let out_err = |m: &[f64]| {
        let mut t = 0f64;
        for i in 0..rows {
            let d: Vec<f64> = (0..cols)
                .map(|j| e[i * cols + j] - m[i * cols + j])
                .collect();
            for a in 0..cols {
                for b in 0..cols {
                    t += d[a] * h[a * cols + b] * d[b];
                }
            }
        }
        t
    };
    let plain = rank_r(&e, rows, cols, r);
    let ba64: Vec<f64> = ba.iter().map(|&v| v as f64).collect();
    assert!(
        out_err(&ba64) < out_err(&plain),
        "EoRA must beat a plain SVD on the output error"
    );
    assert!(out_err(&ba64) < out_err(&vec![0.0; rows * cols]));
}

#[test]
fn eora_rejects_a_gram_matrix_of_the_wrong_size() {
    let err = eora_correction(&[0.0; 6], 2, 3, &[1.0; 4], 1).unwrap_err();
    assert!(err.to_string().contains("3 columns"), "{err}");
}
