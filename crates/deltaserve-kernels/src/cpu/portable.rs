//! Portable kernels: plain Rust, no `unsafe`.
//!
//! `x · Sᵀ` looks up 4 columns at a time in per-call tables of signed sums ([`build_tables`]), as
//! the AVX-512 kernel does 16 rows at a time. `g · S` flips the sign bit of `g` where the sign bit
//! is 0 (`g · (−1)` is exact), so each product is an XOR and each sum an add.

use crate::signs::{words_per_row, SignsView};

/// Input rows of `x` that share one pass over a row of sign words.
const RM: usize = 4;

/// `± v`: `v` if `bit` is 1, `−v` if it is 0.
#[inline(always)]
fn signed(v: f32, word: u32, bit: usize) -> f32 {
    let flip = ((!word >> bit) & 1) << 31;
    f32::from_bits(v.to_bits() ^ flip)
}

/// Lookup tables for `x · Sᵀ`, shape `(m, 8 · ceil(k/32), 16)`: entry `[i, g, idx]` is
/// `Σ_{b<4} ±x[i, 4g + b]` with `+` where bit `b` of `idx` is 1 (summed in order `b = 0..4`).
/// Columns past `k` count as 0, so padding bits select zeros.
pub(super) fn build_tables(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let groups = 8 * words_per_row(k);
    let mut tables = vec![0f32; m * groups * 16];
    for (row, out) in x
        .chunks_exact(k)
        .take(m)
        .zip(tables.chunks_exact_mut(groups * 16))
    {
        for (g, out) in out.chunks_exact_mut(16).enumerate() {
            let v: [f32; 4] = std::array::from_fn(|b| row.get(4 * g + b).copied().unwrap_or(0.0));
            for (idx, t) in out.iter_mut().enumerate() {
                let mut sum = 0f32;
                for (b, v) in v.iter().enumerate() {
                    sum += signed(*v, idx as u32, b);
                }
                *t = sum;
            }
        }
    }
    tables
}

/// `out_t (rows, m) = (x · Sᵀ)ᵀ` for the `rows = out_t.len() / m` sign rows in `words`: each
/// nibble of a word picks one entry of its group's table, so a word costs 8 loads and adds.
pub(super) fn matmul_t_block(tables: &[f32], m: usize, words: &[u32], k: usize, out_t: &mut [f32]) {
    let wpr = words_per_row(k);
    let stride = 8 * wpr * 16;
    for (j, row_words) in words.chunks_exact(wpr).enumerate() {
        let mut i0 = 0;
        while i0 < m {
            let rm = (m - i0).min(RM);
            // One partial sum per nibble position: independent adds.
            let mut acc = [[0f32; 8]; RM];
            for (w, &word) in row_words.iter().enumerate() {
                for (i, acc) in acc.iter_mut().enumerate().take(rm) {
                    let start = (i0 + i) * stride + 128 * w;
                    let t: &[f32; 128] = tables[start..start + 128]
                        .try_into()
                        .expect("128-entry slice. This is a bug.");
                    for (nib, a) in acc.iter_mut().enumerate() {
                        *a += t[16 * nib + ((word >> (4 * nib)) & 15) as usize];
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate().take(rm) {
                out_t[j * m + i0 + i] = acc.iter().sum();
            }
            i0 += rm;
        }
    }
}

/// `out (m, cols) = g · S` restricted to the columns of words `w`.
pub(super) fn matmul_n_block(
    g: &[f32],
    m: usize,
    signs: SignsView<'_>,
    w: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let (n, k, wpr) = (signs.n(), signs.k(), signs.words_per_row());
    let cols = out.len() / m;
    let c0 = 32 * w.start;
    for i in 0..m {
        let acc = &mut out[i * cols..(i + 1) * cols];
        for j in 0..n {
            let gv = g[i * n + j];
            let row_words = &signs.words()[j * wpr + w.start..j * wpr + w.end];
            for (wi, &word) in row_words.iter().enumerate() {
                let start = 32 * wi;
                let valid = (k - c0 - start).min(32);
                for (b, a) in acc[start..start + valid].iter_mut().enumerate() {
                    *a += signed(gv, word, b);
                }
            }
        }
    }
}
