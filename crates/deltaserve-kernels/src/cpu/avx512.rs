//! AVX-512F/BW kernels.
//!
//! `x · Sᵀ` uses 4-bit lookup tables ([`build_tables`], [`matmul_t_block`]): per call, each group
//! of 4 columns of `x` gets the 16 signed sums its 4 sign bits can select, and one `vpermps`
//! then looks up 16 output rows at once.
//!
//! For one row of `x` on the interleaved layout, [`matmul_t_interleaved_m1`] takes 5 bits per
//! lookup instead ([`build_tables5`]: 32-entry tables in two registers, `vpermi2ps`).
//!
//! `g · S` uses masks: a 16-bit half of a sign word is exactly an AVX-512 lane mask, so with
//! `P = Σ_{bit=1} g_n` and `T = Σ_n g_n` (computed once per call),
//!
//! ```text
//! Σ_n s_n g_n = P − (T − P) = 2·P − T
//! ```
//!
//! and `P` costs one masked add (`vaddps zmm{k}`, the mask loaded straight from the word) per 16
//! columns.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::signs::{words_per_row, SignsView};

/// Lookup tables for `x · Sᵀ`, shape `(m, 8 · ceil(k/32), 16)`: entry `[i, g, idx]` is
/// `Σ_{b<4} ±x[i, 4g + b]` with `+` where bit `b` of `idx` is 1. Columns past `k` count as 0, so
/// padding bits select zeros.
///
/// # Safety
/// The CPU must support AVX-512F; `x` holds `m` rows of `k`.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn build_tables(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let groups = 8 * words_per_row(k);
    let mut tables = vec![0f32; m * groups * 16];
    // signs[b][idx] = +1 if bit b of idx is set, else −1.
    let mut signs = [_mm512_setzero_ps(); 4];
    for (b, s) in signs.iter_mut().enumerate() {
        let mut lanes = [0f32; 16];
        for (idx, l) in lanes.iter_mut().enumerate() {
            *l = if (idx >> b) & 1 == 1 { 1.0 } else { -1.0 };
        }
        *s = _mm512_loadu_ps(lanes.as_ptr());
    }
    for (row, out) in x
        .chunks_exact(k)
        .take(m)
        .zip(tables.chunks_exact_mut(groups * 16))
    {
        for (g, out) in out.chunks_exact_mut(16).enumerate() {
            let c = 4 * g;
            let v = |b: usize| _mm512_set1_ps(row.get(c + b).copied().unwrap_or(0.0));
            let mut t = _mm512_mul_ps(v(0), signs[0]);
            t = _mm512_fmadd_ps(v(1), signs[1], t);
            t = _mm512_fmadd_ps(v(2), signs[2], t);
            t = _mm512_fmadd_ps(v(3), signs[3], t);
            _mm512_storeu_ps(out.as_mut_ptr(), t);
        }
    }
    tables
}

/// `out_t (rows, m) = (x · Sᵀ)ᵀ` for the `rows = out_t.len() / m` sign rows in `words`, from the
/// tables of [`build_tables`].
///
/// Output rows go 32 at a time (two vectors of 16 lanes, lane = sign row). Word `w` of the 32
/// rows is brought into lanes by [`bcast_tile`] (contiguous loads and a transpose; full blocks) or
/// by a gather ([`lut_tile`]; the last, short block); each of its 8 nibbles indexes the 16-entry table of its 4 columns with one
/// `vpermps` (which reads only the low 4 bits of each lane, so a right shift is all the decoding).
/// One `vpermps` + one add thus cover 16 rows × 4 columns, where a masked add covers 1 × 16 and
/// needs a port-5 `kmov` for its mask: four times the work per instruction on the scarce port.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW; `tables` come from [`build_tables`] for `m` rows of
/// `k`, and `words` holds `out_t.len() / m` rows of `ceil(k/32)` words.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn matmul_t_block(
    tables: &[f32],
    m: usize,
    words: &[u32],
    k: usize,
    out_t: &mut [f32],
) {
    let wpr = words_per_row(k);
    let groups = 8 * wpr;
    let rows = out_t.len() / m;
    assert!(tables.len() >= m * groups * 16 && words.len() >= rows * wpr);
    // Gather offsets are i32 word counts: row 31 of a block must be addressable.
    assert!(
        32 * wpr <= i32::MAX as usize,
        "K = {k} too large for 32-bit gather offsets"
    );
    let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let stride = _mm512_set1_epi32(wpr as i32);
    let idx_a = _mm512_mullo_epi32(lane, stride);
    let idx_b = _mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(16)), stride);
    let mut res = [[0f32; 32]; 4];
    let mut r0 = 0;
    while r0 < rows {
        let nr = (rows - r0).min(32);
        let lanes = |n: usize| ((1u32 << n) - 1) as __mmask16;
        let block = Block {
            words: words.as_ptr().add(r0 * wpr),
            wpr,
            idx_a,
            idx_b,
            ka: lanes(nr.min(16)),
            kb: lanes(nr.saturating_sub(16)),
            tables: tables.as_ptr(),
            table_stride: groups * 16,
        };
        let mut i0 = 0;
        while i0 < m {
            let rm = (m - i0).min(4);
            let b = Block {
                tables: block.tables.add(i0 * block.table_stride),
                ..block
            };
            // A full block of 32 rows is read with contiguous loads (`bcast_tile`); the last,
            // short block keeps the masked gathers, which never touch rows past `nr`.
            let fast = nr == 32 && wpr >= 4;
            match (rm, nr > 16) {
                (1, true) if fast => bcast_tile::<1>(&b, i0 == 0, &mut res),
                (2, true) if fast => bcast_tile::<2>(&b, i0 == 0, &mut res),
                (3, true) if fast => bcast_tile::<3>(&b, i0 == 0, &mut res),
                (4, true) if fast => bcast_tile::<4>(&b, i0 == 0, &mut res),
                (1, false) => lut_tile::<1, false>(&b, &mut res),
                (2, false) => lut_tile::<2, false>(&b, &mut res),
                (3, false) => lut_tile::<3, false>(&b, &mut res),
                (4, false) => lut_tile::<4, false>(&b, &mut res),
                (1, true) => lut_tile::<1, true>(&b, &mut res),
                (2, true) => lut_tile::<2, true>(&b, &mut res),
                (3, true) => lut_tile::<3, true>(&b, &mut res),
                (4, true) => lut_tile::<4, true>(&b, &mut res),
                _ => unreachable!("tile of {rm} rows not instantiated. This is a bug."),
            }
            scatter_tile(&res, rm, nr, &mut out_t[r0 * m + i0..], m);
            i0 += rm;
        }
        r0 += 32;
    }
}

/// Cache lines (16 words) ahead that [`lut_tile`] prefetches in each sign row; 0 turns it off.
const PREFETCH_LINES: usize = 2;

/// Up to 32 sign rows and up to 4 rows of tables, for [`lut_tile`].
#[derive(Clone, Copy)]
struct Block {
    /// Word 0 of the block's first row.
    words: *const u32,
    wpr: usize,
    /// Word offsets of rows 0..16 and 16..32 from the first.
    idx_a: __m512i,
    idx_b: __m512i,
    /// Lanes holding real rows (the block may be short).
    ka: __mmask16,
    kb: __mmask16,
    /// Tables of the first `x` row of the tile; the next is `table_stride` floats further.
    tables: *const f32,
    table_stride: usize,
}

/// `res[i][r] = x_i · s_r` for the `RM` table rows and the block's rows `r < 16` (`< 32` if `TWO`).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn lut_tile<const RM: usize, const TWO: bool>(b: &Block, res: &mut [[f32; 32]; 4]) {
    // [x row][half of the block][nibble parity]: two chains per half hide the add latency.
    let mut acc = [[[_mm512_setzero_ps(); 2]; 2]; RM];
    let zero = _mm512_setzero_si512();
    for wi in 0..b.wpr {
        if PREFETCH_LINES > 0 && wi % 16 == 0 {
            // Each of the block's rows is its own stream through memory: ask for the line
            // PREFETCH_LINES ahead in every row at once rather than leave it to the prefetcher.
            let ahead = wi + 16 * PREFETCH_LINES;
            if ahead < b.wpr {
                let rows = if TWO { 32 } else { 16 };
                for r in 0..rows {
                    _mm_prefetch::<_MM_HINT_T0>(
                        b.words.wrapping_add(r * b.wpr + ahead) as *const i8
                    );
                }
            }
        }
        let p = b.words.add(wi) as *const i32;
        let wa = _mm512_mask_i32gather_epi32::<4>(zero, b.ka, b.idx_a, p);
        let wb = if TWO {
            _mm512_mask_i32gather_epi32::<4>(zero, b.kb, b.idx_b, p)
        } else {
            zero
        };
        lookup_word::<RM, TWO>(b, wi, wa, wb, &mut acc);
    }
    store_acc::<RM, TWO>(&acc, res);
}

/// `res[i][r] = x_i · s_r` for a full block of 32 sign rows and `RM` rows of tables, with no
/// gathers.
///
/// A `vpgatherdd` of 16 words costs about 15 cycles here (measured: replacing the gathers of
/// [`lut_tile`] by broadcasts doubles its speed), more than the 8 `vpermps` it feeds. So the words
/// are read 4 at a time (16 bytes) from each row with plain loads, and a 4 × 4 transpose in each
/// 128-bit lane turns them into what the gather gave: for word `w`, a vector whose lane `r` is word
/// `w` of row `r`.
///
/// - `z[i]` takes words `4p..4p+4` of rows `i`, `4 + i`, `8 + i` and `12 + i` into its four
///   128-bit lanes (one broadcast load and three masked ones);
/// - two rounds of `unpack{lo,hi}` transpose each lane's 4 × 4 block, so `v[d]` lane `4q + i` is
///   word `4p + d` of row `4q + i`: rows in lane order, as the gather gave.
///
/// The `wpr mod 4` last words of each row go through gathers. With `prefetch`, every chunk also
/// prefetches 8 cache lines of the next block of 32 rows (contiguous in memory, and usually the
/// next one this thread takes), so the next block streams from DRAM into L2 while this one runs:
/// one sequential stream per thread, one block (16 KiB at K = 4096) ahead.
///
/// # Safety
/// As [`matmul_t_block`]; the block has 32 rows and `b.wpr >= 4`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn bcast_tile<const RM: usize>(b: &Block, prefetch: bool, res: &mut [[f32; 32]; 4]) {
    let mut acc = [[[_mm512_setzero_ps(); 2]; 2]; RM];
    let chunks = b.wpr / 4;
    let next = (b.words as *const u8).wrapping_add(32 * 4 * b.wpr);
    for p in 0..chunks {
        if PREFETCH_NEXT_BLOCK && prefetch {
            // 32 rows × 16 bytes = 8 lines per chunk: the whole next block over this one's chunks.
            for l in 0..8 {
                _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(512 * p + 64 * l) as *const i8);
            }
        }
        let mut v = [[_mm512_setzero_si512(); 4]; 2];
        for (h, v) in v.iter_mut().enumerate() {
            let mut z = [_mm512_setzero_si512(); 4];
            for (i, z) in z.iter_mut().enumerate() {
                let row = |q: usize| {
                    _mm_loadu_si128(b.words.add((16 * h + 4 * q + i) * b.wpr + 4 * p) as *const _)
                };
                let mut t = _mm512_broadcast_i32x4(row(0));
                t = _mm512_mask_broadcast_i32x4(t, 0x00f0, row(1));
                t = _mm512_mask_broadcast_i32x4(t, 0x0f00, row(2));
                *z = _mm512_mask_broadcast_i32x4(t, 0xf000, row(3));
            }
            let t0 = _mm512_unpacklo_epi32(z[0], z[1]);
            let t1 = _mm512_unpackhi_epi32(z[0], z[1]);
            let t2 = _mm512_unpacklo_epi32(z[2], z[3]);
            let t3 = _mm512_unpackhi_epi32(z[2], z[3]);
            v[0] = _mm512_unpacklo_epi64(t0, t2);
            v[1] = _mm512_unpackhi_epi64(t0, t2);
            v[2] = _mm512_unpacklo_epi64(t1, t3);
            v[3] = _mm512_unpackhi_epi64(t1, t3);
        }
        let [va, vb] = v;
        for (d, (wa, wb)) in va.into_iter().zip(vb).enumerate() {
            lookup_word::<RM, true>(b, 4 * p + d, wa, wb, &mut acc);
        }
    }
    let zero = _mm512_setzero_si512();
    for wi in 4 * chunks..b.wpr {
        let p = b.words.add(wi) as *const i32;
        let wa = _mm512_mask_i32gather_epi32::<4>(zero, b.ka, b.idx_a, p);
        let wb = _mm512_mask_i32gather_epi32::<4>(zero, b.kb, b.idx_b, p);
        lookup_word::<RM, true>(b, wi, wa, wb, &mut acc);
    }
    store_acc::<RM, true>(&acc, res);
}

/// `res[i][r] = Σ` of the two accumulator chains of half `r / 16` (rows 16..32 only if `TWO`),
/// for the `RM` table rows of a tile.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn store_acc<const RM: usize, const TWO: bool>(
    acc: &[[[__m512; 2]; 2]; RM],
    res: &mut [[f32; 32]; 4],
) {
    for (res, acc) in res.iter_mut().zip(acc) {
        _mm512_storeu_ps(res.as_mut_ptr(), _mm512_add_ps(acc[0][0], acc[0][1]));
        if TWO {
            _mm512_storeu_ps(
                res.as_mut_ptr().add(16),
                _mm512_add_ps(acc[1][0], acc[1][1]),
            );
        }
    }
}

/// Writes a tile's `rm × nr` results into the transposed output: `out_t[r · m + i] = res[i][r]`,
/// `out_t` starting at the tile's first (sign row, x row).
#[inline]
fn scatter_tile(res: &[[f32; 32]; 4], rm: usize, nr: usize, out_t: &mut [f32], m: usize) {
    for (i, res) in res.iter().enumerate().take(rm) {
        for (r, v) in res.iter().enumerate().take(nr) {
            out_t[r * m + i] = *v;
        }
    }
}

/// Whether [`bcast_tile`] prefetches the next block into L2.
const PREFETCH_NEXT_BLOCK: bool = true;

/// Adds word `wi` of up to 32 sign rows (`wa`: rows 0..16, `wb`: rows 16..32 if `TWO`, one word
/// per lane) times the `RM` table rows to `acc`: each nibble is one `vpermps` (16 rows × 4
/// columns) and one add.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn lookup_word<const RM: usize, const TWO: bool>(
    b: &Block,
    wi: usize,
    wa: __m512i,
    wb: __m512i,
    acc: &mut [[[__m512; 2]; 2]; RM],
) {
    let tp = b.tables.add(128 * wi);
    macro_rules! nibble {
        ($j:literal) => {
            let ia = _mm512_srli_epi32::<{ 4 * $j }>(wa);
            let ib = _mm512_srli_epi32::<{ 4 * $j }>(wb);
            for (i, acc) in acc.iter_mut().enumerate() {
                let tab = _mm512_loadu_ps(tp.add(i * b.table_stride + 16 * $j));
                acc[0][$j & 1] = _mm512_add_ps(acc[0][$j & 1], _mm512_permutexvar_ps(ia, tab));
                if TWO {
                    acc[1][$j & 1] = _mm512_add_ps(acc[1][$j & 1], _mm512_permutexvar_ps(ib, tab));
                }
            }
        };
    }
    nibble!(0);
    nibble!(1);
    nibble!(2);
    nibble!(3);
    nibble!(4);
    nibble!(5);
    nibble!(6);
    nibble!(7);
}

/// [`matmul_t_block`] on the row-interleaved layout of [`super::InterleavedSigns`]: `words`
/// holds whole groups of 16 rows, word `w` of a group's 16 rows contiguous (64 bytes), so one
/// plain load gives the vector that [`bcast_tile`] builds with loads and a transpose, and
/// [`lut_tile`] with a gather. Rows of the last group past `rows` are zero words: computed, never
/// stored.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW; `tables` come from [`build_tables`] for `m` rows of
/// `k`, and `words` holds the `ceil(rows / 16)` groups of `16 · ceil(k/32)` words of the
/// `rows = out_t.len() / m` rows.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn matmul_t_block_interleaved(
    tables: &[f32],
    m: usize,
    words: &[u32],
    k: usize,
    out_t: &mut [f32],
) {
    let wpr = words_per_row(k);
    let groups = 8 * wpr;
    let rows = out_t.len() / m;
    assert!(tables.len() >= m * groups * 16 && words.len() >= rows.div_ceil(16) * 16 * wpr);
    let zero = _mm512_setzero_si512();
    let mut res = [[0f32; 32]; 4];
    let mut r0 = 0;
    while r0 < rows {
        let nr = (rows - r0).min(32);
        let block = Block {
            // r0 is a multiple of 32: group r0 / 16 starts at word r0 · wpr.
            words: words.as_ptr().add(r0 * wpr),
            wpr,
            idx_a: zero,
            idx_b: zero,
            ka: 0,
            kb: 0,
            tables: tables.as_ptr(),
            table_stride: groups * 16,
        };
        let mut i0 = 0;
        while i0 < m {
            let rm = (m - i0).min(4);
            let b = Block {
                tables: block.tables.add(i0 * block.table_stride),
                ..block
            };
            let prefetch = i0 == 0;
            match (rm, nr > 16) {
                (1, false) => interleaved_tile::<1, false>(&b, prefetch, &mut res),
                (2, false) => interleaved_tile::<2, false>(&b, prefetch, &mut res),
                (3, false) => interleaved_tile::<3, false>(&b, prefetch, &mut res),
                (4, false) => interleaved_tile::<4, false>(&b, prefetch, &mut res),
                (1, true) => interleaved_tile::<1, true>(&b, prefetch, &mut res),
                (2, true) => interleaved_tile::<2, true>(&b, prefetch, &mut res),
                (3, true) => interleaved_tile::<3, true>(&b, prefetch, &mut res),
                (4, true) => interleaved_tile::<4, true>(&b, prefetch, &mut res),
                _ => unreachable!("tile of {rm} rows not instantiated. This is a bug."),
            }
            scatter_tile(&res, rm, nr, &mut out_t[r0 * m + i0..], m);
            i0 += rm;
        }
        r0 += 32;
    }
}

/// One tile of [`matmul_t_block_interleaved`]: 16 rows (32 if `TWO`: the next group is `16 · wpr`
/// words on) and `RM` rows of tables. With `prefetch`, each word also prefetches the two lines of
/// the next 32-row block at the same offset into L2 (the layout keeps the block contiguous).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn interleaved_tile<const RM: usize, const TWO: bool>(
    b: &Block,
    prefetch: bool,
    res: &mut [[f32; 32]; 4],
) {
    let mut acc = [[[_mm512_setzero_ps(); 2]; 2]; RM];
    let next = (b.words as *const u8).wrapping_add(32 * 4 * b.wpr);
    for wi in 0..b.wpr {
        if prefetch {
            _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(128 * wi) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(128 * wi + 64) as *const i8);
        }
        let wa = _mm512_loadu_si512(b.words.add(16 * wi) as *const _);
        let wb = if TWO {
            _mm512_loadu_si512(b.words.add(16 * b.wpr + 16 * wi) as *const _)
        } else {
            _mm512_setzero_si512()
        };
        lookup_word::<RM, TWO>(b, wi, wa, wb, &mut acc);
    }
    store_acc::<RM, TWO>(&acc, res);
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

/// Groups of sign bits per pair of words (64 columns) in the one-row kernel
/// [`matmul_t_interleaved_m1`]: twelve of 5 bits and one of 4.
const PAIR_GROUPS: usize = 13;

/// Floats of [`build_tables5`] per pair of words: a 32-entry table per group.
const PAIR_TABLE: usize = 32 * PAIR_GROUPS;

/// Lookup tables for one row of `x` and the one-row kernel [`matmul_t_interleaved_m1`]: per pair
/// of words `p` (columns `64p ..`), group `g < 12` covers the 5 columns `64p + 5g ..` and group 12
/// the 4 columns `64p + 60 ..`; entry `idx` of a group is `Σ_b ±x[c + b]`, `+` where bit `b` of
/// `idx` is 1. Columns past `k` count as 0 (so padding bits, and a missing last word of an odd
/// pair, select zeros), and so does bit 4 of group 12's index, which is always clear.
///
/// # Safety
/// The CPU must support AVX-512F; `x` holds `k` values.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn build_tables5(x: &[f32], k: usize) -> Vec<f32> {
    let pairs = words_per_row(k).div_ceil(2);
    let mut tables = vec![0f32; pairs * PAIR_TABLE];
    let mut signs = [_mm512_setzero_ps(); 4];
    for (b, s) in signs.iter_mut().enumerate() {
        let mut lanes = [0f32; 16];
        for (idx, l) in lanes.iter_mut().enumerate() {
            *l = if (idx >> b) & 1 == 1 { 1.0 } else { -1.0 };
        }
        *s = _mm512_loadu_ps(lanes.as_ptr());
    }
    let at = |c: usize| x.get(c).copied().unwrap_or(0.0);
    for (p, out) in tables.chunks_exact_mut(PAIR_TABLE).enumerate() {
        for (g, out) in out.chunks_exact_mut(32).enumerate() {
            let c = 64 * p + 5 * g;
            let v = |b: usize| _mm512_set1_ps(at(c + b));
            let mut t = _mm512_mul_ps(v(0), signs[0]);
            t = _mm512_fmadd_ps(v(1), signs[1], t);
            t = _mm512_fmadd_ps(v(2), signs[2], t);
            t = _mm512_fmadd_ps(v(3), signs[3], t);
            // Entries 16..32 have bit 4 set: +x[c + 4]; entries 0..16 −x[c + 4]. Group 12 has
            // only 4 columns (its index's bit 4 is always clear), so its fifth is none.
            let x4 = if g + 1 < PAIR_GROUPS { at(c + 4) } else { 0.0 };
            let x4 = _mm512_set1_ps(x4);
            _mm512_storeu_ps(out.as_mut_ptr(), _mm512_sub_ps(t, x4));
            _mm512_storeu_ps(out.as_mut_ptr().add(16), _mm512_add_ps(t, x4));
        }
    }
    tables
}

/// Pairs of words per pass of [`matmul_t_interleaved_m1`]: 16 pairs (1024 columns) make 26 KiB of
/// tables, which stay in L1 while every 32-row block of the call's rows reads them.
const CHUNK_PAIRS: usize = 16;

/// `out = x · Sᵀ` for one row of `x` on the interleaved layout (as
/// [`matmul_t_block_interleaved`] with `m = 1`), from the tables of [`build_tables5`].
///
/// A decode step has one row of `x` per tenant, and there the nibble kernel's cost is its
/// instructions, not memory: per word of 16 rows it takes 7 shifts, 8 `vpermps` and 8 adds. Taking
/// the bits 5 at a time (`vpermi2ps` picks from a 32-entry table held in two registers) covers a
/// pair of words with 13 lookups: 12 shifts (one `vpshrdd` for the group that straddles the two
/// words), 13 permutes and 13 adds, 38 instructions per 1024 signs where the nibbles take 46.
/// Its tables are 1.6× larger and it reads them 1.6× as often, which L2 cannot feed: so the
/// columns go in chunks of [`CHUNK_PAIRS`] pairs whose tables stay in L1, each chunk over all of
/// `out`'s rows, the partial sums added in `out`.
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512BW and AVX-512VBMI2; `tables` come from
/// [`build_tables5`] for `k`, and `words` holds the `ceil(rows / 16)` groups of `16 · ceil(k/32)`
/// words of the `rows = out.len()` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2")]
pub(super) unsafe fn matmul_t_interleaved_m1(
    tables: &[f32],
    words: &[u32],
    k: usize,
    out: &mut [f32],
) {
    let wpr = words_per_row(k);
    let pairs = wpr.div_ceil(2);
    let rows = out.len();
    assert!(tables.len() >= pairs * PAIR_TABLE && words.len() >= rows.div_ceil(16) * 16 * wpr);
    out.fill(0.0);
    let mut res = [0f32; 32];
    for p0 in (0..pairs).step_by(CHUNK_PAIRS) {
        let chunk = p0..(p0 + CHUNK_PAIRS).min(pairs);
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(32);
            // r0 is a multiple of 32: group r0 / 16 starts at word r0 · wpr.
            let block = words.as_ptr().add(r0 * wpr);
            // The next block's bits of this chunk, or the first block's of the next chunk.
            let next = if r0 + 32 < rows {
                block.wrapping_add(32 * wpr)
            } else {
                words.as_ptr().wrapping_add(2 * 16 * chunk.end)
            };
            if nr > 16 {
                pair_tile::<true>(block, next, wpr, chunk.clone(), tables.as_ptr(), &mut res);
            } else {
                pair_tile::<false>(block, next, wpr, chunk.clone(), tables.as_ptr(), &mut res);
            }
            for (o, r) in out[r0..r0 + nr].iter_mut().zip(&res) {
                *o += r;
            }
            r0 += 32;
        }
    }
}

/// One tile of [`matmul_t_interleaved_m1`]: 16 rows (32 if `TWO`), the word pairs of `chunk`.
/// Each pair also prefetches the same pair of the block at `next` (both of its 16-row groups)
/// into L2.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2")]
#[inline]
unsafe fn pair_tile<const TWO: bool>(
    words: *const u32,
    next: *const u32,
    wpr: usize,
    chunk: Range<usize>,
    tables: *const f32,
    res: &mut [f32; 32],
) {
    let zero = _mm512_setzero_si512();
    let mut acc = [[_mm512_setzero_ps(); 4]; 2];
    let load = |w: usize, half: usize| {
        if w < wpr {
            _mm512_loadu_si512(words.add(16 * wpr * half + 16 * w) as *const _)
        } else {
            zero
        }
    };
    for p in chunk {
        for half in 0..2 {
            let line = next.wrapping_add(16 * wpr * half + 32 * p) as *const i8;
            _mm_prefetch::<_MM_HINT_T1>(line);
            _mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(64));
        }
        let (lo_a, hi_a) = (load(2 * p, 0), load(2 * p + 1, 0));
        let (lo_b, hi_b) = if TWO {
            (load(2 * p, 1), load(2 * p + 1, 1))
        } else {
            (zero, zero)
        };
        let tp = tables.add(PAIR_TABLE * p);
        macro_rules! lookup {
            ($g:literal, $ia:expr, $ib:expr) => {
                let t0 = _mm512_loadu_ps(tp.add(32 * $g));
                let t1 = _mm512_loadu_ps(tp.add(32 * $g + 16));
                acc[0][$g % 4] = _mm512_add_ps(acc[0][$g % 4], _mm512_permutex2var_ps(t0, $ia, t1));
                if TWO {
                    acc[1][$g % 4] =
                        _mm512_add_ps(acc[1][$g % 4], _mm512_permutex2var_ps(t0, $ib, t1));
                }
            };
        }
        lookup!(0, lo_a, lo_b);
        lookup!(
            1,
            _mm512_srli_epi32::<5>(lo_a),
            _mm512_srli_epi32::<5>(lo_b)
        );
        lookup!(
            2,
            _mm512_srli_epi32::<10>(lo_a),
            _mm512_srli_epi32::<10>(lo_b)
        );
        lookup!(
            3,
            _mm512_srli_epi32::<15>(lo_a),
            _mm512_srli_epi32::<15>(lo_b)
        );
        lookup!(
            4,
            _mm512_srli_epi32::<20>(lo_a),
            _mm512_srli_epi32::<20>(lo_b)
        );
        lookup!(
            5,
            _mm512_srli_epi32::<25>(lo_a),
            _mm512_srli_epi32::<25>(lo_b)
        );
        // Bits 30..35 of the pair: the top two of the low word and the bottom three of the high.
        lookup!(
            6,
            _mm512_shrdi_epi32::<30>(lo_a, hi_a),
            _mm512_shrdi_epi32::<30>(lo_b, hi_b)
        );
        lookup!(
            7,
            _mm512_srli_epi32::<3>(hi_a),
            _mm512_srli_epi32::<3>(hi_b)
        );
        lookup!(
            8,
            _mm512_srli_epi32::<8>(hi_a),
            _mm512_srli_epi32::<8>(hi_b)
        );
        lookup!(
            9,
            _mm512_srli_epi32::<13>(hi_a),
            _mm512_srli_epi32::<13>(hi_b)
        );
        lookup!(
            10,
            _mm512_srli_epi32::<18>(hi_a),
            _mm512_srli_epi32::<18>(hi_b)
        );
        lookup!(
            11,
            _mm512_srli_epi32::<23>(hi_a),
            _mm512_srli_epi32::<23>(hi_b)
        );
        lookup!(
            12,
            _mm512_srli_epi32::<28>(hi_a),
            _mm512_srli_epi32::<28>(hi_b)
        );
    }
    let sum = |a: &[__m512; 4]| _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    _mm512_storeu_ps(res.as_mut_ptr(), sum(&acc[0]));
    if TWO {
        _mm512_storeu_ps(res.as_mut_ptr().add(16), sum(&acc[1]));
    }
}
