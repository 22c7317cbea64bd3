//! AVX-512F/BW kernels.
//!
//! A 16-bit half of a sign word is exactly an AVX-512 lane mask, so with `P = Σ_{bit=1} x_k` and
//! `T = Σ_k x_k` (computed once per call),
//!
//! ```text
//! Σ_k s_k x_k = P − (T − P) = 2·P − T
//! ```
//!
//! and `P` costs one masked add (`vaddps zmm{k}`, the mask loaded straight from the word) per 16
//! columns. A tile of `RN` sign rows × `RM` input rows loads each 16-column slice of `x` once for
//! the `RN` rows and each word once for the `RM` rows.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::signs::{words_per_row, SignsView};

/// Sign rows per tile when `x` has one row (decode): 8 accumulators keep both FP ports busy
/// despite the 4-cycle add latency.
const RN_DECODE: usize = 8;

/// Sign rows per tile when `x` has several rows: `RN × RM ≤ 16` accumulators plus `2·RM` slices of
/// `x` fit the 32 vector registers.
const RN_BATCH: usize = 4;

/// `out_t (rows, m) = (x · Sᵀ)ᵀ` for the `rows = out_t.len() / m` sign rows in `words`.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW. `x` holds `m` rows of `k`, `x_sums` their sums,
/// and `words` holds `out_t.len() / m` rows of `ceil(k/32)` words.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn matmul_t_block(
    x: &[f32],
    m: usize,
    x_sums: &[f32],
    words: &[u32],
    k: usize,
    out_t: &mut [f32],
) {
    let wpr = words_per_row(k);
    let rows = out_t.len() / m;
    assert!(x.len() >= m * k && x_sums.len() >= m && words.len() >= rows * wpr);
    let rn_main = if m == 1 { RN_DECODE } else { RN_BATCH };
    let mut pos = [[0f32; 4]; RN_DECODE];
    let mut j0 = 0;
    while j0 < rows {
        let rn = if rows - j0 >= rn_main { rn_main } else { 1 };
        let wp = words.as_ptr().add(j0 * wpr);
        let mut i0 = 0;
        while i0 < m {
            let rm = (m - i0).min(4);
            let xp = x.as_ptr().add(i0 * k);
            match (rn, rm) {
                (RN_DECODE, 1) => tile::<RN_DECODE, 1>(xp, k, wp, wpr, &mut pos),
                (RN_BATCH, 1) => tile::<RN_BATCH, 1>(xp, k, wp, wpr, &mut pos),
                (RN_BATCH, 2) => tile::<RN_BATCH, 2>(xp, k, wp, wpr, &mut pos),
                (RN_BATCH, 3) => tile::<RN_BATCH, 3>(xp, k, wp, wpr, &mut pos),
                (RN_BATCH, 4) => tile::<RN_BATCH, 4>(xp, k, wp, wpr, &mut pos),
                (1, 1) => tile::<1, 1>(xp, k, wp, wpr, &mut pos),
                (1, 2) => tile::<1, 2>(xp, k, wp, wpr, &mut pos),
                (1, 3) => tile::<1, 3>(xp, k, wp, wpr, &mut pos),
                (1, 4) => tile::<1, 4>(xp, k, wp, wpr, &mut pos),
                _ => unreachable!("tile ({rn}, {rm}) not instantiated. This is a bug."),
            }
            for (r, pos) in pos.iter().enumerate().take(rn) {
                for (i, p) in pos.iter().enumerate().take(rm) {
                    out_t[(j0 + r) * m + i0 + i] = 2.0 * p - x_sums[i0 + i];
                }
            }
            i0 += rm;
        }
        j0 += rn;
    }
}

/// `pos[r][i] = Σ_{bit=1} x[i, c]` over sign row `r` of the tile, for `RN` rows of words at `w`
/// (stride `wpr`) and `RM` rows of `x` at `x` (stride `k`).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn tile<const RN: usize, const RM: usize>(
    x: *const f32,
    k: usize,
    w: *const u32,
    wpr: usize,
    pos: &mut [[f32; 4]; RN_DECODE],
) {
    let full = k / 32;
    let tail = k % 32;
    let mut acc = [[_mm512_setzero_ps(); RM]; RN];
    for wi in 0..full {
        let mut xv = [[_mm512_setzero_ps(); 2]; RM];
        for (i, xv) in xv.iter_mut().enumerate() {
            let p = x.add(i * k + 32 * wi);
            xv[0] = _mm512_loadu_ps(p);
            xv[1] = _mm512_loadu_ps(p.add(16));
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let word = *w.add(r * wpr + wi);
            let (lo, hi) = (word as __mmask16, (word >> 16) as __mmask16);
            for (a, xv) in acc.iter_mut().zip(&xv) {
                *a = _mm512_mask_add_ps(*a, lo, *a, xv[0]);
                *a = _mm512_mask_add_ps(*a, hi, *a, xv[1]);
            }
        }
    }
    if tail > 0 {
        // Columns past K load as 0.0 and their (padding) bits are cleared, so neither counts.
        let valid = (1u32 << tail) - 1;
        let (vlo, vhi) = (valid as __mmask16, (valid >> 16) as __mmask16);
        let mut xv = [[_mm512_setzero_ps(); 2]; RM];
        for (i, xv) in xv.iter_mut().enumerate() {
            let p = x.add(i * k + 32 * full);
            xv[0] = _mm512_maskz_loadu_ps(vlo, p);
            if vhi != 0 {
                xv[1] = _mm512_maskz_loadu_ps(vhi, p.add(16));
            }
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let word = *w.add(r * wpr + full) & valid;
            let (lo, hi) = (word as __mmask16, (word >> 16) as __mmask16);
            for (a, xv) in acc.iter_mut().zip(&xv) {
                *a = _mm512_mask_add_ps(*a, lo, *a, xv[0]);
                *a = _mm512_mask_add_ps(*a, hi, *a, xv[1]);
            }
        }
    }
    for (pos, acc) in pos.iter_mut().zip(&acc) {
        for (p, a) in pos.iter_mut().zip(acc) {
            *p = _mm512_reduce_add_ps(*a);
        }
    }
}

/// Words (32 columns each) per column tile of `g · S`: 16 accumulators.
const KW: usize = 8;

/// `out (m, cols) = g · S` restricted to the columns of words `w`, via the same identity:
/// `Σ_n g_n s_nk = 2 · Σ_{bit=1} g_n − Σ_n g_n`.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW; `g` holds `m` rows of `signs.n()`, `g_sums` their
/// sums, `w` lies within a row of words and `out` holds `m` rows of the columns of `w` below K.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn matmul_n_block(
    g: &[f32],
    m: usize,
    g_sums: &[f32],
    signs: SignsView<'_>,
    w: Range<usize>,
    out: &mut [f32],
) {
    let (n, k, wpr) = (signs.n(), signs.k(), signs.words_per_row());
    let cols = out.len() / m;
    assert!(
        g.len() >= m * n
            && g_sums.len() >= m
            && w.end <= wpr
            && cols == (32 * w.end).min(k) - 32 * w.start
    );
    for (i, &g_sum) in g_sums.iter().enumerate().take(m) {
        let mut wb = w.start;
        while wb < w.end {
            let kw = if w.end - wb >= KW { KW } else { 1 };
            let c = 32 * (wb - w.start);
            let valid = (k - 32 * wb).min(32 * kw);
            let args = ColTile {
                g: g.as_ptr().add(i * n),
                n,
                words: signs.words().as_ptr().add(wb),
                wpr,
                g_sum,
                valid,
                out: out.as_mut_ptr().add(i * cols + c),
            };
            if kw == KW {
                col_tile::<KW>(args);
            } else {
                col_tile::<1>(args);
            }
            wb += kw;
        }
    }
}

/// One column tile of `g · S`: one row of `g`, `Q` words of every row of `S`.
struct ColTile {
    g: *const f32,
    n: usize,
    /// Word `wb` of row 0; row `j` is `wpr` words further.
    words: *const u32,
    wpr: usize,
    g_sum: f32,
    /// Columns of the tile below K (the rest are not written).
    valid: usize,
    out: *mut f32,
}

#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn col_tile<const Q: usize>(t: ColTile) {
    let mut acc = [[_mm512_setzero_ps(); 2]; Q];
    for j in 0..t.n {
        let gb = _mm512_set1_ps(*t.g.add(j));
        let row = t.words.add(j * t.wpr);
        for (q, acc) in acc.iter_mut().enumerate() {
            let word = *row.add(q);
            acc[0] = _mm512_mask_add_ps(acc[0], word as __mmask16, acc[0], gb);
            acc[1] = _mm512_mask_add_ps(acc[1], (word >> 16) as __mmask16, acc[1], gb);
        }
    }
    let two = _mm512_set1_ps(2.0);
    let sum = _mm512_set1_ps(t.g_sum);
    for (q, acc) in acc.iter().enumerate() {
        for (h, a) in acc.iter().enumerate() {
            let c = 32 * q + 16 * h;
            if c >= t.valid {
                return;
            }
            let lanes = (t.valid - c).min(16);
            let mask = ((1u32 << lanes) - 1) as __mmask16;
            // 2·P is exact, so fmsub rounds once like `2.0 * p - sum`.
            _mm512_mask_storeu_ps(t.out.add(c), mask, _mm512_fmsub_ps(two, *a, sum));
        }
    }
}
