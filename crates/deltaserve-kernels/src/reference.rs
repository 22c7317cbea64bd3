//! The specification: plain loops, `f64` accumulation, no SIMD, no threads.
//!
//! Every fast kernel in [`crate::cpu`] (and later `cuda`) computes what these functions compute,
//! up to `f32` rounding; `tests/matches_reference.rs` checks that on awkward shapes. These expand
//! the signs one element at a time, which the fast kernels never do.
//!
//! Shapes: `x: (M, K)`, `g: (M, N)`, `signs: (N, ceil(K/32)) u32` (layout in the
//! [crate docs](crate#layout)).

use crate::signs::{check_words, words_per_row, SignDelta};

/// The sign of element `[row, col]` as `+1.0` or `-1.0`.
fn sign_at(words: &[u32], wpr: usize, row: usize, col: usize) -> f64 {
    let word = words[row * wpr + col / 32];
    if (word >> (col % 32)) & 1 == 1 {
        1.0
    } else {
        -1.0
    }
}

fn check(op: &str, words: &[u32], n: usize, k: usize) {
    if let Err(e) = check_words(words.len(), n, k) {
        panic!("{op}: {e}");
    }
}

/// Expands packed signs to a dense row-major `[n, k]` matrix of `±1.0` (padding bits ignored).
///
/// # Panics
/// If `words.len() != n * ceil(k/32)` or `k == 0`.
pub fn unpack_to_f32(words: &[u32], n: usize, k: usize) -> Vec<f32> {
    check("unpack_to_f32", words, n, k);
    let wpr = words_per_row(k);
    let mut out = Vec::with_capacity(n * k);
    for row in 0..n {
        for col in 0..k {
            out.push(sign_at(words, wpr, row, col) as f32);
        }
    }
    out
}

/// `x · Sᵀ`: `x (M, K)`, `S (N, K)` → `(M, N)`, row-major. The forward of a delta linear layer
/// without its scale.
///
/// # Panics
/// If the words do not hold an `[n, k]` matrix or `x.len()` is not a multiple of `k`.
pub fn sign_matmul_t_ref(x: &[f32], words: &[u32], n: usize, k: usize) -> Vec<f32> {
    check("sign_matmul_t_ref", words, n, k);
    assert!(
        x.len().is_multiple_of(k),
        "sign_matmul_t_ref: x has {} values, K = {k}",
        x.len()
    );
    let m = x.len() / k;
    let wpr = words_per_row(k);
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for c in 0..k {
                acc += f64::from(x[i * k + c]) * sign_at(words, wpr, j, c);
            }
            out[i * n + j] = acc as f32;
        }
    }
    out
}

/// `g · S`: `g (M, N)`, `S (N, K)` → `(M, K)`. The gradient of `x · Sᵀ` with respect to `x`.
///
/// # Panics
/// If the words do not hold an `[n, k]` matrix or `g.len()` is not a multiple of `n`.
pub fn sign_matmul_n_ref(g: &[f32], words: &[u32], n: usize, k: usize) -> Vec<f32> {
    check("sign_matmul_n_ref", words, n, k);
    let m = if n == 0 {
        0
    } else {
        assert!(
            g.len().is_multiple_of(n),
            "sign_matmul_n_ref: g has {} values, N = {n}",
            g.len()
        );
        g.len() / n
    };
    let wpr = words_per_row(k);
    let mut out = vec![0f32; m * k];
    for i in 0..m {
        for c in 0..k {
            let mut acc = 0f64;
            for j in 0..n {
                acc += f64::from(g[i * n + j]) * sign_at(words, wpr, j, c);
            }
            out[i * k + c] = acc as f32;
        }
    }
    out
}

/// Many tenants in one batch: row `m` of the `(M, N)` result is `s · (x_m · Sᵀ)` for the delta in
/// `deltas[row_slot[m]]`, or zeros where `row_slot[m]` is `None` (a base-only row).
///
/// # Errors
/// If a delta's words cannot be read to the host.
///
/// # Panics
/// If shapes disagree: `x.len() != row_slot.len() * k`, a slot out of range, or a delta that is
/// not `[n, k]`.
pub fn tenant_delta_matmul_ref(
    x: &[f32],
    row_slot: &[Option<u32>],
    deltas: &[SignDelta],
    n: usize,
    k: usize,
) -> candle_core::Result<Vec<f32>> {
    let m = row_slot.len();
    assert_eq!(
        x.len(),
        m * k,
        "tenant_delta_matmul_ref: x has {} values for {m} rows of K = {k}",
        x.len()
    );
    let mut host = Vec::with_capacity(deltas.len());
    for (i, d) in deltas.iter().enumerate() {
        assert!(
            d.n() == n && d.k() == k,
            "tenant_delta_matmul_ref: delta {i} is [{}, {}], expected [{n}, {k}]",
            d.n(),
            d.k()
        );
        host.push(d.signs().to_host_words()?);
    }
    let mut out = vec![0f32; m * n];
    for (row, slot) in row_slot.iter().enumerate() {
        let Some(slot) = slot else { continue };
        let slot = *slot as usize;
        assert!(
            slot < deltas.len(),
            "tenant_delta_matmul_ref: row {row} uses slot {slot} of {}",
            deltas.len()
        );
        let scale = f64::from(deltas[slot].scale());
        let wpr = words_per_row(k);
        for j in 0..n {
            let mut acc = 0f64;
            for c in 0..k {
                acc += f64::from(x[row * k + c]) * sign_at(&host[slot], wpr, j, c);
            }
            out[row * n + j] = (scale * acc) as f32;
        }
    }
    Ok(out)
}

/// `x · wᵀ + delta` for `x (M, K)`, a dense `w (N, K)` and a precomputed `delta (M, N)` (e.g.
/// [`tenant_delta_matmul_ref`]'s): what `delta_linear` computes, the dot products in `f64`.
pub fn base_plus_delta_ref(
    x: &[f32],
    w: &[f32],
    delta: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for o in 0..n {
            let dot: f64 = (0..k)
                .map(|c| f64::from(x[i * k + c]) * f64::from(w[o * k + c]))
                .sum();
            out[i * n + o] = (dot + f64::from(delta[i * n + o])) as f32;
        }
    }
    out
}
