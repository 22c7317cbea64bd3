//! Every fast CPU kernel against `reference.rs`, at every SIMD level this CPU has, on shapes that
//! are not multiples of any tile: K ∈ {1, 7, 31, 32, 33, 100, 257} (partial words, one word, a
//! word and a bit), N ∈ {1, 3, 65} (tile and task remainders), M ∈ {1, 2, 5, 17} (decode, and
//! batches with every remainder of the 4-row tile).

use deltaserve_kernels::cpu::{self, ScaledSigns, SimdLevel};
use deltaserve_kernels::reference::{
    sign_matmul_n_ref, sign_matmul_t_ref, tenant_delta_matmul_ref,
};
use deltaserve_kernels::{words_per_row, SignDelta, SignsView};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// ‖out − ref‖₂ / ‖ref‖₂ allowed. The kernels accumulate in `f32` in another order than the
/// `f64` reference (and the AVX-512 path computes `2·Σ_{bit=1} x − Σ x`), so each output carries
/// a rounding error of order √K·ε·‖x‖ with ε = 6e-8: about 1e-6 relative at K = 257, so 1e-5
/// leaves a margin of ten without hiding a wrong sign (one flipped sign of 257 gives ~1e-1).
const REL_TOL: f64 = 1e-5;

const KS: [usize; 7] = [1, 7, 31, 32, 33, 100, 257];
const NS: [usize; 3] = [1, 3, 65];
const MS: [usize; 4] = [1, 2, 5, 17];

fn random_x(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// Random words, padding bits included: every kernel must ignore them.
fn random_words(rng: &mut StdRng, n: usize, k: usize) -> Vec<u32> {
    (0..n * words_per_row(k)).map(|_| rng.gen()).collect()
}

/// The same signs with every padding bit cleared (`pad = false`) or set (`pad = true`).
fn with_padding(words: &[u32], k: usize, pad: bool) -> Vec<u32> {
    let wpr = words_per_row(k);
    let tail = k % 32;
    let mut out = words.to_vec();
    if tail != 0 {
        let valid = (1u32 << tail) - 1;
        for row in out.chunks_mut(wpr) {
            let last = &mut row[wpr - 1];
            *last = if pad { *last | !valid } else { *last & valid };
        }
    }
    out
}

fn rel_err(out: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(out.len(), reference.len(), "output length");
    let (mut diff, mut norm) = (0f64, 0f64);
    for (o, r) in out.iter().zip(reference) {
        diff += (f64::from(*o) - f64::from(*r)).powi(2);
        norm += f64::from(*r).powi(2);
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// Largest relative error seen by this test binary, printed by the tests (`--nocapture`).
static WORST: std::sync::Mutex<f64> = std::sync::Mutex::new(0.0);

fn assert_close(what: &str, out: &[f32], reference: &[f32]) {
    let err = rel_err(out, reference);
    let mut worst = WORST.lock().unwrap();
    if err > *worst {
        *worst = err;
        eprintln!("worst relative error so far: {err:.2e} ({what})");
    }
    drop(worst);
    assert!(
        err < REL_TOL,
        "{what}: relative error {err:.3e} >= {REL_TOL:e}; first pairs {:?}",
        out.iter().zip(reference).take(5).collect::<Vec<_>>()
    );
}

/// The levels this CPU runs, printed so a run on a machine without AVX-512 shows what it skipped.
fn levels() -> Vec<SimdLevel> {
    let levels = SimdLevel::available();
    let skipped: Vec<_> = SimdLevel::ALL
        .into_iter()
        .filter(|l| !levels.contains(l))
        .collect();
    if !skipped.is_empty() {
        eprintln!("SKIPPED on this CPU: SIMD levels {skipped:?}");
    }
    levels
}

#[test]
fn sign_matmul_t_matches_reference_odd_shapes() {
    let mut rng = StdRng::seed_from_u64(1);
    for level in levels() {
        for k in KS {
            for n in NS {
                for m in MS {
                    let x = random_x(&mut rng, m * k);
                    let words = random_words(&mut rng, n, k);
                    let signs = SignsView::new(&words, n, k).unwrap();
                    let out = cpu::sign_matmul_t_with(level, &x, signs).unwrap();
                    let reference = sign_matmul_t_ref(&x, &words, n, k);
                    assert_close(
                        &format!("{level:?} x·Sᵀ M={m} N={n} K={k}"),
                        &out,
                        &reference,
                    );
                }
            }
        }
    }
}

#[test]
fn sign_matmul_n_matches_reference_odd_shapes() {
    let mut rng = StdRng::seed_from_u64(2);
    for level in levels() {
        for k in KS {
            for n in NS {
                for m in MS {
                    let g = random_x(&mut rng, m * n);
                    let words = random_words(&mut rng, n, k);
                    let signs = SignsView::new(&words, n, k).unwrap();
                    let out = cpu::sign_matmul_n_with(level, &g, signs).unwrap();
                    let reference = sign_matmul_n_ref(&g, &words, n, k);
                    assert_close(
                        &format!("{level:?} g·S M={m} N={n} K={k}"),
                        &out,
                        &reference,
                    );
                }
            }
        }
    }
}

/// Large enough that rayon splits the work (N over several 64-row tasks, K over several 256-column
/// tasks) and the register tiles run their main loops many times.
#[test]
fn parallel_paths_match_reference() {
    let mut rng = StdRng::seed_from_u64(3);
    let (n, k) = (300, 1000);
    let words = random_words(&mut rng, n, k);
    let signs = SignsView::new(&words, n, k).unwrap();
    for level in levels() {
        for m in [1, 6] {
            let x = random_x(&mut rng, m * k);
            let out = cpu::sign_matmul_t_with(level, &x, signs).unwrap();
            assert_close(
                &format!("{level:?} x·Sᵀ M={m}"),
                &out,
                &sign_matmul_t_ref(&x, &words, n, k),
            );
            let g = random_x(&mut rng, m * n);
            let out = cpu::sign_matmul_n_with(level, &g, signs).unwrap();
            assert_close(
                &format!("{level:?} g·S M={m}"),
                &out,
                &sign_matmul_n_ref(&g, &words, n, k),
            );
        }
    }
}

/// Each worker thread keeps the lookup tables of the last call it worked on: calls one after
/// another with different `x`, and calls made at once from several threads (rayon tasks that
/// themselves call the kernel, so a thread may switch between calls), must each use their own.
#[test]
fn successive_and_concurrent_calls_use_their_own_x() {
    use rayon::prelude::*;
    let mut rng = StdRng::seed_from_u64(7);
    // 300 × 1000 products per row: above the size where a call goes parallel.
    let (n, k) = (300, 1000);
    let words = random_words(&mut rng, n, k);
    let signs = SignsView::new(&words, n, k).unwrap();
    let xs: Vec<Vec<f32>> = (0..8)
        .map(|i| random_x(&mut rng, (1 + i % 3) * k))
        .collect();
    for level in levels() {
        for x in &xs {
            let out = cpu::sign_matmul_t_with(level, x, signs).unwrap();
            assert_close(
                &format!("{level:?} successive M={}", x.len() / k),
                &out,
                &sign_matmul_t_ref(x, &words, n, k),
            );
        }
        let outs: Vec<Vec<f32>> = xs
            .par_iter()
            .map(|x| cpu::sign_matmul_t_with(level, x, signs).unwrap())
            .collect();
        for (x, out) in xs.iter().zip(&outs) {
            assert_close(
                &format!("{level:?} concurrent M={}", x.len() / k),
                out,
                &sign_matmul_t_ref(x, &words, n, k),
            );
        }
    }
}

/// The row-interleaved copy gives the reference's products at every level: odd shapes (groups of
/// 16 rows with a padded last group, N = 17 and 33 straddling one and two 32-row blocks), and
/// shapes large enough to run in parallel tasks.
#[test]
fn interleaved_signs_match_reference() {
    let mut rng = StdRng::seed_from_u64(8);
    let mut shapes: Vec<(usize, usize, usize)> = Vec::new();
    for k in KS {
        for n in [1, 3, 16, 17, 33, 65] {
            for m in MS {
                shapes.push((n, k, m));
            }
        }
    }
    // One row of x over several 1024-column chunks of the 5-bit one-row kernel, an odd number of
    // words per row (a last pair of one word) and three 256-row tasks, the last one short.
    shapes.extend([
        (300, 1000, 1),
        (300, 1000, 6),
        (130, 4096 + 33, 1),
        (600, 2017, 1),
    ]);
    for level in levels() {
        for &(n, k, m) in &shapes {
            let x = random_x(&mut rng, m * k);
            let words = random_words(&mut rng, n, k);
            let signs = SignsView::new(&words, n, k).unwrap();
            let il = cpu::InterleavedSigns::new(signs);
            assert_eq!((il.n(), il.k()), (n, k));
            let out = cpu::sign_matmul_t_interleaved_with(level, &x, &il).unwrap();
            assert_close(
                &format!("{level:?} interleaved x·Sᵀ M={m} N={n} K={k}"),
                &out,
                &sign_matmul_t_ref(&x, &words, n, k),
            );
        }
    }
}

#[test]
fn tenant_delta_matmul_matches_reference_mixed_slots() {
    let mut rng = StdRng::seed_from_u64(4);
    let dev = candle_core::Device::Cpu;
    for level in levels() {
        for k in KS {
            for n in NS {
                let words: Vec<Vec<u32>> = (0..3).map(|_| random_words(&mut rng, n, k)).collect();
                let scales = [0.5f32, -0.03, 2.0];
                let deltas: Vec<SignDelta> = words
                    .iter()
                    .zip(scales)
                    .map(|(w, s)| SignDelta::from_words(w.clone(), n, k, s, &dev).unwrap())
                    .collect();
                let views: Vec<ScaledSigns> = words
                    .iter()
                    .zip(scales)
                    .map(|(w, scale)| ScaledSigns {
                        signs: SignsView::new(w, n, k).unwrap(),
                        scale,
                    })
                    .collect();
                for m in MS {
                    // Slot 2 is never used; the rest repeat, and about a quarter of rows have none.
                    let row_slot: Vec<Option<u32>> = (0..m)
                        .map(|i| match (i, rng.gen_range(0..4)) {
                            (0, _) => Some(1),
                            (1, _) => None,
                            (_, 0) => None,
                            (_, s) => Some(s as u32 % 2),
                        })
                        .collect();
                    let x = random_x(&mut rng, m * k);
                    let out = cpu::tenant_delta_matmul_with(level, &x, &row_slot, &views).unwrap();
                    let reference = tenant_delta_matmul_ref(&x, &row_slot, &deltas, n, k).unwrap();
                    let what = format!("{level:?} tenants M={m} N={n} K={k} slots {row_slot:?}");
                    assert_close(&what, &out, &reference);
                    // The same deltas in the interleaved layout give the same products.
                    let il: Vec<cpu::InterleavedSigns> = views
                        .iter()
                        .map(|v| cpu::InterleavedSigns::new(v.signs))
                        .collect();
                    let il_views: Vec<cpu::ScaledInterleaved> = il
                        .iter()
                        .zip(scales)
                        .map(|(signs, scale)| cpu::ScaledInterleaved { signs, scale })
                        .collect();
                    let out_il =
                        cpu::tenant_delta_matmul_interleaved_with(level, &x, &row_slot, &il_views)
                            .unwrap();
                    assert_close(&format!("{what} interleaved"), &out_il, &reference);
                    for (i, slot) in row_slot.iter().enumerate() {
                        if slot.is_none() {
                            assert!(
                                out[i * n..(i + 1) * n].iter().all(|v| *v == 0.0),
                                "{what}: row {i} has no delta but got values"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Padding bits are 0 in files, but a kernel must not depend on it: results with every padding
/// bit set are bit-for-bit those with every padding bit clear.
#[test]
fn padding_bits_do_not_change_results() {
    let mut rng = StdRng::seed_from_u64(5);
    for level in levels() {
        for k in [1, 7, 31, 33, 100, 257] {
            let (n, m) = (65, 5);
            let words = random_words(&mut rng, n, k);
            let clear = with_padding(&words, k, false);
            let set = with_padding(&words, k, true);
            let (clear, set) = (
                SignsView::new(&clear, n, k).unwrap(),
                SignsView::new(&set, n, k).unwrap(),
            );
            let x = random_x(&mut rng, m * k);
            let g = random_x(&mut rng, m * n);
            assert_eq!(
                cpu::sign_matmul_t_with(level, &x, clear).unwrap(),
                cpu::sign_matmul_t_with(level, &x, set).unwrap(),
                "{level:?} x·Sᵀ K={k}"
            );
            assert_eq!(
                cpu::sign_matmul_n_with(level, &g, clear).unwrap(),
                cpu::sign_matmul_n_with(level, &g, set).unwrap(),
                "{level:?} g·S K={k}"
            );
            let slots = [Some(0), None, Some(0), Some(0), None];
            assert_eq!(
                cpu::tenant_delta_matmul_with(
                    level,
                    &x,
                    &slots,
                    &[ScaledSigns {
                        signs: clear,
                        scale: 0.1
                    }]
                )
                .unwrap(),
                cpu::tenant_delta_matmul_with(
                    level,
                    &x,
                    &slots,
                    &[ScaledSigns {
                        signs: set,
                        scale: 0.1
                    }]
                )
                .unwrap(),
                "{level:?} tenants K={k}"
            );
        }
    }
}

#[test]
fn reference_unpacks_the_documented_layout() {
    // Row 0: bits 0 and 2 of word 0 → [+1, -1, +1, -1 ...]; row 1: bit 1 of word 1 → column 33.
    let k = 40;
    let words = [0b101, 0xFFFF_FF00, 0, 0b10];
    let dense = deltaserve_kernels::reference::unpack_to_f32(&words, 2, k);
    let mut expect = vec![-1f32; 2 * k];
    expect[0] = 1.0;
    expect[2] = 1.0;
    expect[k + 33] = 1.0;
    // 0xFFFF_FF00 sets columns 40..64 of row 0: all padding (K = 40), so ignored.
    assert_eq!(dense, expect);
}

#[test]
fn kernels_reject_bad_shapes() {
    let words = vec![0u32; 6];
    assert!(
        SignsView::new(&words, 3, 65).is_err(),
        "6 words cannot hold [3, 65]"
    );
    assert!(SignsView::new(&words, 3, 0).is_err(), "K = 0");
    let signs = SignsView::new(&words, 3, 33).unwrap();
    let err = cpu::sign_matmul_t(&[0.0; 34], signs).unwrap_err();
    assert!(err.to_string().contains("33"), "{err}");
    let delta = ScaledSigns { signs, scale: 1.0 };
    let err = cpu::tenant_delta_matmul(&[0.0; 66], &[Some(0), Some(1)], &[delta]).unwrap_err();
    assert!(err.to_string().contains("row 1 uses slot 1"), "{err}");
    let err = cpu::tenant_delta_matmul(&[0.0; 66], &[None], &[delta]).unwrap_err();
    assert!(
        err.to_string()
            .contains("row_slot has 1 entries, x has 2 rows"),
        "{err}"
    );
    assert!(
        cpu::tenant_delta_matmul(&[0.0; 66], &[None, None], &[]).is_err(),
        "no deltas"
    );
}
