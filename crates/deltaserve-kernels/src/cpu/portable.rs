//! Portable kernels: plain Rust, no `unsafe`. A sign bit of 0 flips the sign bit of the value
//! (`x · (−1)` is exact), so each product is an XOR and each sum an add.

use crate::signs::{words_per_row, SignsView};

/// Input rows of `x` that share one pass over a row of sign words.
const RM: usize = 4;

/// Independent partial sums per output, so the adds of a row do not wait on each other.
const LANES: usize = 8;

/// `± v`: `v` if `bit` is 1, `−v` if it is 0.
#[inline(always)]
fn signed(v: f32, word: u32, bit: usize) -> f32 {
    let flip = ((!word >> bit) & 1) << 31;
    f32::from_bits(v.to_bits() ^ flip)
}

/// `out_t (rows, m) = (x · Sᵀ)ᵀ` for the `rows = out_t.len() / m` sign rows in `words`.
pub(super) fn matmul_t_block(x: &[f32], m: usize, words: &[u32], k: usize, out_t: &mut [f32]) {
    let wpr = words_per_row(k);
    for (j, row_words) in words.chunks_exact(wpr).enumerate() {
        let mut i0 = 0;
        while i0 < m {
            let rm = (m - i0).min(RM);
            let mut acc = [[0f32; LANES]; RM];
            for (w, &word) in row_words.iter().enumerate() {
                let c0 = 32 * w;
                // The last word may be partial: its padding bits are never looked at.
                let cols = (k - c0).min(32);
                for (i, acc) in acc.iter_mut().enumerate().take(rm) {
                    let xs = &x[(i0 + i) * k + c0..(i0 + i) * k + c0 + cols];
                    for (b, &v) in xs.iter().enumerate() {
                        acc[b % LANES] += signed(v, word, b);
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
