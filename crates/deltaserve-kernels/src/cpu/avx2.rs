//! AVX2 + FMA kernels.
//!
//! AVX2 has no lane masks, so each bit is moved to the float sign position instead: broadcast the
//! inverted word, shift lane `l` of chunk `c` left by `31 − (8c + l)` (`vpsllvd`), keep the top bit
//! and OR it into `1.0`. That gives `s = ±1.0` for 8 columns, and `acc += x · s` is one FMA
//! (exact, as multiplying by ±1 is). The `±1.0` vector is built once per sign row and 8 columns,
//! then used by every row of `x` in the tile.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::signs::{words_per_row, SignsView};

/// Sign rows per tile when `x` has one row.
const RN_DECODE: usize = 4;
/// Sign rows per tile when `x` has several rows (`RN × RM ≤ 8` accumulators of 16 registers).
const RN_BATCH: usize = 2;

/// The four lane shift vectors: chunk `c`, lane `l` → `31 − (8c + l)`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn shifts() -> [__m256i; 4] {
    let mut s = [_mm256_setzero_si256(); 4];
    for (c, s) in s.iter_mut().enumerate() {
        let b = 31 - 8 * c as i32;
        *s = _mm256_setr_epi32(b, b - 1, b - 2, b - 3, b - 4, b - 5, b - 6, b - 7);
    }
    s
}

/// `±1.0` for the 8 columns of chunk `c` of `word`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn sign_vector(not_word: __m256i, shift: __m256i) -> __m256 {
    let bit = _mm256_and_si256(
        _mm256_sllv_epi32(not_word, shift),
        _mm256_set1_epi32(i32::MIN),
    );
    _mm256_or_ps(_mm256_set1_ps(1.0), _mm256_castsi256_ps(bit))
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// `out_t (rows, m) = (x · Sᵀ)ᵀ` for the `rows = out_t.len() / m` sign rows in `words`.
///
/// # Safety
/// The CPU must support AVX2 and FMA. `x` holds `m` rows of `k`, and `words` holds
/// `out_t.len() / m` rows of `ceil(k/32)` words.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn matmul_t_block(
    x: &[f32],
    m: usize,
    words: &[u32],
    k: usize,
    out_t: &mut [f32],
) {
    let wpr = words_per_row(k);
    let rows = out_t.len() / m;
    assert!(x.len() >= m * k && words.len() >= rows * wpr);
    let rn_main = if m == 1 { RN_DECODE } else { RN_BATCH };
    let mut dots = [[0f32; 4]; RN_DECODE];
    let mut j0 = 0;
    while j0 < rows {
        let rn = if rows - j0 >= rn_main { rn_main } else { 1 };
        let wp = words.as_ptr().add(j0 * wpr);
        let mut i0 = 0;
        while i0 < m {
            let rm = (m - i0).min(4);
            let xp = x.as_ptr().add(i0 * k);
            match (rn, rm) {
                (RN_DECODE, 1) => tile::<RN_DECODE, 1>(xp, k, wp, wpr, &mut dots),
                (RN_BATCH, 1) => tile::<RN_BATCH, 1>(xp, k, wp, wpr, &mut dots),
                (RN_BATCH, 2) => tile::<RN_BATCH, 2>(xp, k, wp, wpr, &mut dots),
                (RN_BATCH, 3) => tile::<RN_BATCH, 3>(xp, k, wp, wpr, &mut dots),
                (RN_BATCH, 4) => tile::<RN_BATCH, 4>(xp, k, wp, wpr, &mut dots),
                (1, 1) => tile::<1, 1>(xp, k, wp, wpr, &mut dots),
                (1, 2) => tile::<1, 2>(xp, k, wp, wpr, &mut dots),
                (1, 3) => tile::<1, 3>(xp, k, wp, wpr, &mut dots),
                (1, 4) => tile::<1, 4>(xp, k, wp, wpr, &mut dots),
                _ => unreachable!("tile ({rn}, {rm}) not instantiated. This is a bug."),
            }
            for (r, dots) in dots.iter().enumerate().take(rn) {
                for (i, d) in dots.iter().enumerate().take(rm) {
                    out_t[(j0 + r) * m + i0 + i] = *d;
                }
            }
            i0 += rm;
        }
        j0 += rn;
    }
}

/// `dots[r][i] = x_i · s_r` for `RN` rows of words at `w` (stride `wpr`) and `RM` rows of `x`
/// at `x` (stride `k`).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const RN: usize, const RM: usize>(
    x: *const f32,
    k: usize,
    w: *const u32,
    wpr: usize,
    dots: &mut [[f32; 4]; RN_DECODE],
) {
    let full = k / 32;
    let tail = k % 32;
    let shift = shifts();
    let mut acc = [[_mm256_setzero_ps(); RM]; RN];
    let mut rows = [x; RM];
    for (i, r) in rows.iter_mut().enumerate() {
        *r = x.add(i * k);
    }
    for wi in 0..full {
        for (r, acc) in acc.iter_mut().enumerate() {
            let not_word = _mm256_set1_epi32(!*w.add(r * wpr + wi) as i32);
            for (c, shift) in shift.iter().enumerate() {
                let s = sign_vector(not_word, *shift);
                for (a, row) in acc.iter_mut().zip(&rows) {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(32 * wi + 8 * c)), s, *a);
                }
            }
        }
    }
    if tail > 0 {
        // Copy the last partial word's columns of x into zero-padded buffers: the padding columns
        // then contribute ±0 whatever their bits say.
        let mut pad = [[0f32; 32]; RM];
        for (p, row) in pad.iter_mut().zip(&rows) {
            std::ptr::copy_nonoverlapping(row.add(32 * full), p.as_mut_ptr(), tail);
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let not_word = _mm256_set1_epi32(!*w.add(r * wpr + full) as i32);
            for (c, shift) in shift.iter().enumerate() {
                let s = sign_vector(not_word, *shift);
                for (a, p) in acc.iter_mut().zip(&pad) {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(p.as_ptr().add(8 * c)), s, *a);
                }
            }
        }
    }
    for (dots, acc) in dots.iter_mut().zip(&acc) {
        for (d, a) in dots.iter_mut().zip(acc) {
            *d = hsum(*a);
        }
    }
}

/// Words per column tile of `g · S`: 8 accumulators.
const KW: usize = 2;

/// `out (m, cols) = g · S` restricted to the columns of words `w`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `g` holds `m` rows of `signs.n()`, `w` lies within a row of
/// words and `out` holds `m` rows of the columns of `w` below K.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn matmul_n_block(
    g: &[f32],
    m: usize,
    signs: SignsView<'_>,
    w: Range<usize>,
    out: &mut [f32],
) {
    let (n, k, wpr) = (signs.n(), signs.k(), signs.words_per_row());
    let cols = out.len() / m;
    assert!(g.len() >= m * n && w.end <= wpr && cols == (32 * w.end).min(k) - 32 * w.start);
    for i in 0..m {
        let mut wb = w.start;
        while wb < w.end {
            let kw = if w.end - wb >= KW { KW } else { 1 };
            let c = 32 * (wb - w.start);
            let valid = (k - 32 * wb).min(32 * kw);
            let g_row = g.as_ptr().add(i * n);
            let words = signs.words().as_ptr().add(wb);
            let dst = &mut out[i * cols + c..i * cols + c + valid];
            if kw == KW {
                col_tile::<KW>(g_row, n, words, wpr, dst);
            } else {
                col_tile::<1>(g_row, n, words, wpr, dst);
            }
            wb += kw;
        }
    }
}

/// One row of `g` times `Q` words of every row of `S` (row `j` at `words + j·wpr`), written to
/// `dst` (the columns below K).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn col_tile<const Q: usize>(
    g: *const f32,
    n: usize,
    words: *const u32,
    wpr: usize,
    dst: &mut [f32],
) {
    let shift = shifts();
    let mut acc = [[_mm256_setzero_ps(); 4]; Q];
    for j in 0..n {
        let gb = _mm256_set1_ps(*g.add(j));
        let row = words.add(j * wpr);
        for (q, acc) in acc.iter_mut().enumerate() {
            let not_word = _mm256_set1_epi32(!*row.add(q) as i32);
            for (a, shift) in acc.iter_mut().zip(&shift) {
                *a = _mm256_fmadd_ps(gb, sign_vector(not_word, *shift), *a);
            }
        }
    }
    let mut buf = [0f32; 8];
    for (q, acc) in acc.iter().enumerate() {
        for (c, a) in acc.iter().enumerate() {
            let col = 32 * q + 8 * c;
            if col >= dst.len() {
                return;
            }
            _mm256_storeu_ps(buf.as_mut_ptr(), *a);
            let lanes = (dst.len() - col).min(8);
            dst[col..col + lanes].copy_from_slice(&buf[..lanes]);
        }
    }
}
