//! CPU kernels for packed sign matrices: `x · Sᵀ`, `g · S` and the multi-tenant `x · Sᵀ`.
//!
//! Three implementations of each, chosen at run time ([`SimdLevel::detect`]) or forced with the
//! `*_with` functions (tests force each level, so a machine with AVX-512 checks all three):
//!
//! - [`SimdLevel::Avx512`] (`avx512.rs`, AVX-512F + BW). `x · Sᵀ`: per call, every group of 4
//!   columns of `x` gets a 16-entry table of the signed sums its 4 sign bits can select; one
//!   vector holds one word of 16 sign rows (read with contiguous 16-byte loads and an in-register
//!   transpose for full 32-row blocks, gathered for the last short block) and each nibble is then
//!   one `vpermps` (16 rows × 4 columns) and one add. `g · S`: a 16-bit half of a word is a lane mask, and
//!   `Σ_n s_n g_n = 2 · Σ_{bit=1} g_n − Σ_n g_n` costs one masked add per 16 products.
//! - [`SimdLevel::Avx2`] (`avx2.rs`, AVX2 + FMA): a variable shift moves each bit to the float sign
//!   position, giving a `±1.0` vector per 8 columns that is shared by the rows of `x` in a tile.
//! - [`SimdLevel::Portable`] (`portable.rs`): scalar; `x · Sᵀ` looks up the same 4-column tables
//!   one row at a time, `g · S` flips sign bits with an XOR.
//!
//! [`InterleavedSigns`] is a copy of the bits with rows in groups of 16 and word `w` of a group's
//! rows contiguous, made once at load time: [`sign_matmul_t_interleaved`] then reads each vector
//! of 16 rows with one plain load (no gather, no transpose), 1.4–1.8× faster at decode. Deltas
//! loaded for serving on an AVX-512 CPU are kept only in this layout
//! ([`crate::SignBits::for_serving`]); the candle ops take either. For one row of `x` (a decode
//! step's tenant) on that layout, a CPU with AVX-512VBMI2 takes the bits 5 at a time instead of 4
//! (32-entry tables, `vpermi2ps`): fewer instructions per sign, 2–14% faster cold (`avx512.rs`,
//! `matmul_t_interleaved_m1`).
//!
//! None of them expands `S` to floats in memory (the tables are built from `x`: `16 · K` floats
//! per row of `x`, at most 16 rows at a time). Each reads a word once per call for up to
//! 16 rows of `x` (the AVX-512 and portable kernels; AVX2 tiles 4), and rayon splits the output
//! features `N` (the transposed product splits `K`); each worker thread builds its own copy of a
//! call's tables. Padding bits past `K` are ignored: the columns past `K` are read as zeros.
//!
//! Check: `cargo test --release -p deltaserve-kernels`; bench:
//! `bash crates/deltaserve-kernels/benches/run_cpu.sh` (results in `BENCHMARKS.md`, sections
//! "CPU sign-matmul kernels" and "CPU kernels, third pass").

mod portable;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::error::KernelError;
use crate::signs::{words_per_row, SignsView};

/// Output features (rows of `S`) per rayon task. 64 rows of K = 4096 are 32 KiB of bits: enough
/// work to hide a task's cost, and a llama-7B layer still splits into 64 or more tasks.
const ROWS_PER_TASK: usize = 64;

/// Output features per rayon task of the one-row kernel (`avx512::matmul_t_interleaved_m1`): each
/// chunk of its tables is read once from L2 per task and then from L1 for all of the task's rows.
const ONE_ROW_ROWS_PER_TASK: usize = 256;

/// Rows of `x` whose lookup tables are built for one pass over the bits: 16 rows of K = 11008
/// make 2.8 MiB of tables, which stay in a core's L2.
const LUT_ROWS: usize = 16;

/// Words (32 columns each) per rayon task of the transposed product `g · S`.
const WORDS_PER_TASK: usize = 8;

/// Below this many sign-times-value products a call stays on the calling thread.
const PARALLEL_MIN_PRODUCTS: usize = 1 << 18;

/// An instruction set the kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimdLevel {
    /// Plain Rust; runs everywhere.
    Portable,
    /// x86-64 AVX2 + FMA.
    Avx2,
    /// x86-64 AVX-512F + AVX-512BW.
    Avx512,
}

impl SimdLevel {
    /// Every level, slowest first.
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512];

    /// The best level this CPU supports (detected once, then cached).
    pub fn detect() -> SimdLevel {
        static BEST: OnceLock<SimdLevel> = OnceLock::new();
        *BEST.get_or_init(|| {
            Self::ALL
                .into_iter()
                .rev()
                .find(|l| l.is_available())
                .unwrap_or(SimdLevel::Portable)
        })
    }

    /// Whether this CPU can run the level.
    pub fn is_available(self) -> bool {
        match self {
            SimdLevel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
            }
            #[cfg(not(target_arch = "x86_64"))]
            SimdLevel::Avx2 | SimdLevel::Avx512 => false,
        }
    }

    /// The levels this CPU can run, slowest first.
    pub fn available() -> Vec<SimdLevel> {
        Self::ALL.into_iter().filter(|l| l.is_available()).collect()
    }

    fn check(self) -> Result<(), KernelError> {
        if self.is_available() {
            Ok(())
        } else {
            Err(KernelError::SimdUnavailable { level: self })
        }
    }
}

/// One tenant's signs and scale, borrowed, for [`tenant_delta_matmul`].
#[derive(Debug, Clone, Copy)]
pub struct ScaledSigns<'a> {
    /// The `[n, k]` sign matrix.
    pub signs: SignsView<'a>,
    /// The BitDelta scale `s`.
    pub scale: f32,
}

/// `x · Sᵀ`: `x (M, K)` row-major → `(M, N)`, at the best [`SimdLevel`].
pub fn sign_matmul_t(x: &[f32], signs: SignsView<'_>) -> Result<Vec<f32>, KernelError> {
    sign_matmul_t_with(SimdLevel::detect(), x, signs)
}

/// [`sign_matmul_t`] at a chosen level (fails if the CPU lacks it).
pub fn sign_matmul_t_with(
    level: SimdLevel,
    x: &[f32],
    signs: SignsView<'_>,
) -> Result<Vec<f32>, KernelError> {
    level.check()?;
    sign_matmul_t_words(level, x, Words::RowMajor(signs))
}

/// A sign matrix copied into the row-interleaved layout that the AVX-512 `x · Sᵀ` reads with
/// plain loads:
///
/// ```text
/// rows in groups of 16 (the last padded with zero words);
/// group g = words [16·wpr·g, 16·wpr·(g+1)); word w of row 16g + r at 16·wpr·g + 16·w + r
/// ```
///
/// The format's row-major layout needs a gather or a transpose per word of 16 rows to put the
/// rows in vector lanes, and that, not memory, bounds the kernel (`BENCHMARKS.md`, "CPU kernels,
/// third pass"). Built once when a delta is loaded, it costs a copy of the bits (plus at most 15
/// padding rows) and saves that work on every call. Same bits, same results as
/// [`sign_matmul_t`].
#[derive(Debug, Clone)]
pub struct InterleavedSigns {
    words: Vec<u32>,
    n: usize,
    k: usize,
}

/// Rows per group of the interleaved layout.
pub const INTERLEAVE_ROWS: usize = 16;

impl InterleavedSigns {
    /// Copies `signs` into the interleaved layout.
    pub fn new(signs: SignsView<'_>) -> Self {
        Self {
            words: interleave(signs),
            n: signs.n(),
            k: signs.k(),
        }
    }

    /// The borrowed view the kernels take.
    pub fn view(&self) -> InterleavedView<'_> {
        InterleavedView {
            words: &self.words,
            n: self.n,
            k: self.k,
        }
    }

    /// Rows (output features, `N`).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Columns (input features, `K`).
    pub fn k(&self) -> usize {
        self.k
    }
}

/// Words an `[n, k]` matrix takes in the interleaved layout: `ceil(n / 16) · 16 · ceil(k / 32)`.
pub fn interleaved_len(n: usize, k: usize) -> usize {
    n.div_ceil(INTERLEAVE_ROWS) * INTERLEAVE_ROWS * words_per_row(k)
}

/// The words of `signs` in the interleaved layout (see [`InterleavedSigns`]).
pub fn interleave(signs: SignsView<'_>) -> Vec<u32> {
    let (n, k, wpr) = (signs.n(), signs.k(), signs.words_per_row());
    let mut words = vec![0u32; interleaved_len(n, k)];
    for (r, row) in signs.words().chunks_exact(wpr).enumerate() {
        let (g, lane) = (r / INTERLEAVE_ROWS, r % INTERLEAVE_ROWS);
        for (w, &word) in row.iter().enumerate() {
            words[INTERLEAVE_ROWS * (wpr * g + w) + lane] = word;
        }
    }
    words
}

/// A borrowed sign matrix in the interleaved layout of [`InterleavedSigns`], checked to hold
/// [`interleaved_len`] words.
#[derive(Debug, Clone, Copy)]
pub struct InterleavedView<'a> {
    words: &'a [u32],
    n: usize,
    k: usize,
}

impl<'a> InterleavedView<'a> {
    /// Wraps `words` (interleaved, see [`InterleavedSigns`]) as an `[n, k]` matrix.
    pub fn new(words: &'a [u32], n: usize, k: usize) -> Result<Self, KernelError> {
        if k == 0 {
            return Err(KernelError::EmptyInner { n });
        }
        if words.len() != interleaved_len(n, k) {
            return Err(KernelError::WordCount {
                n: n.div_ceil(INTERLEAVE_ROWS) * INTERLEAVE_ROWS,
                k,
                words_per_row: words_per_row(k),
                expected: interleaved_len(n, k),
                got: words.len(),
            });
        }
        Ok(Self { words, n, k })
    }

    /// Rows (output features, `N`).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Columns (input features, `K`).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The words of the groups holding rows `n0..n0 + rows` (`n0` a multiple of 16).
    fn group_words(&self, n0: usize, rows: usize) -> &'a [u32] {
        let per_group = INTERLEAVE_ROWS * words_per_row(self.k);
        &self.words
            [n0 / INTERLEAVE_ROWS * per_group..(n0 + rows).div_ceil(INTERLEAVE_ROWS) * per_group]
    }

    /// Rows `n0..n0 + rows` back in the row-major layout, for the levels without an interleaved
    /// kernel.
    fn row_major(&self, n0: usize, rows: usize) -> Vec<u32> {
        let wpr = words_per_row(self.k);
        let mut out = vec![0u32; rows * wpr];
        for (r, row) in out.chunks_exact_mut(wpr).enumerate() {
            let (g, lane) = ((n0 + r) / INTERLEAVE_ROWS, (n0 + r) % INTERLEAVE_ROWS);
            for (w, word) in row.iter_mut().enumerate() {
                *word = self.words[INTERLEAVE_ROWS * (wpr * g + w) + lane];
            }
        }
        out
    }

    /// All rows in the row-major layout (the format's), `n · ceil(k / 32)` words.
    pub fn to_row_major(&self) -> Vec<u32> {
        self.row_major(0, self.n)
    }
}

/// [`sign_matmul_t`] on an [`InterleavedSigns`], at the best [`SimdLevel`].
pub fn sign_matmul_t_interleaved(
    x: &[f32],
    signs: &InterleavedSigns,
) -> Result<Vec<f32>, KernelError> {
    sign_matmul_t_interleaved_with(SimdLevel::detect(), x, signs)
}

/// [`sign_matmul_t_interleaved`] at a chosen level. Only AVX-512 reads the interleaved words
/// directly; the other levels copy each task's rows back to row-major first.
pub fn sign_matmul_t_interleaved_with(
    level: SimdLevel,
    x: &[f32],
    signs: &InterleavedSigns,
) -> Result<Vec<f32>, KernelError> {
    level.check()?;
    sign_matmul_t_words(level, x, Words::Interleaved(signs.view()))
}

/// `x · Sᵀ` on either layout, at a checked level.
pub(crate) fn sign_matmul_t_words(
    level: SimdLevel,
    x: &[f32],
    signs: Words<'_>,
) -> Result<Vec<f32>, KernelError> {
    let m = rows_of(x.len(), signs.k(), "sign_matmul_t", "x")?;
    let out_t = matmul_t_transposed(level, x, m, signs);
    Ok(transpose(&out_t, signs.n(), m))
}

/// The sign words a product reads: the format's row-major layout or the interleaved copy.
#[derive(Clone, Copy)]
pub(crate) enum Words<'a> {
    RowMajor(SignsView<'a>),
    Interleaved(InterleavedView<'a>),
}

impl Words<'_> {
    fn n(&self) -> usize {
        match self {
            Words::RowMajor(s) => s.n(),
            Words::Interleaved(s) => s.n(),
        }
    }
    fn k(&self) -> usize {
        match self {
            Words::RowMajor(s) => s.k(),
            Words::Interleaved(s) => s.k(),
        }
    }
}

/// `g · S`: `g (M, N)` row-major → `(M, K)`; the gradient of `x · Sᵀ` with respect to `x`.
pub fn sign_matmul_n(g: &[f32], signs: SignsView<'_>) -> Result<Vec<f32>, KernelError> {
    sign_matmul_n_with(SimdLevel::detect(), g, signs)
}

/// [`sign_matmul_n`] at a chosen level (fails if the CPU lacks it).
pub fn sign_matmul_n_with(
    level: SimdLevel,
    g: &[f32],
    signs: SignsView<'_>,
) -> Result<Vec<f32>, KernelError> {
    level.check()?;
    let (n, k) = (signs.n(), signs.k());
    if n == 0 {
        // S has no rows: g must be empty too, and every output is an empty sum.
        if !g.is_empty() {
            return Err(KernelError::InputLength {
                op: "sign_matmul_n",
                what: "g",
                expected: 0,
                got: g.len(),
            });
        }
        return Ok(Vec::new());
    }
    let m = rows_of(g.len(), n, "sign_matmul_n", "g")?;
    if m == 0 {
        return Ok(Vec::new());
    }
    let g_sums = row_sums(g, m, n);
    let wpr = signs.words_per_row();
    let blocks = wpr.div_ceil(WORDS_PER_TASK);
    let block = |b: usize| {
        let w0 = b * WORDS_PER_TASK;
        let w1 = (w0 + WORDS_PER_TASK).min(wpr);
        let cols = (32 * w1).min(k) - 32 * w0;
        let mut out = vec![0f32; m * cols];
        matmul_n_block(level, g, m, &g_sums, signs, w0..w1, &mut out);
        out
    };
    let parts: Vec<Vec<f32>> = if m * n * k < PARALLEL_MIN_PRODUCTS {
        (0..blocks).map(block).collect()
    } else {
        (0..blocks).into_par_iter().map(block).collect()
    };
    let mut out = vec![0f32; m * k];
    for (b, part) in parts.iter().enumerate() {
        let c0 = 32 * b * WORDS_PER_TASK;
        let cols = part.len() / m;
        for i in 0..m {
            out[i * k + c0..i * k + c0 + cols].copy_from_slice(&part[i * cols..(i + 1) * cols]);
        }
    }
    Ok(out)
}

/// Many tenants in one batch: row `i` of the `(M, N)` result is `s · (x_i · Sᵀ)` for
/// `deltas[row_slot[i]]`, or zeros where `row_slot[i]` is `None`. Rows are grouped by slot, so a
/// delta's bits are read once per call however many rows use it.
pub fn tenant_delta_matmul(
    x: &[f32],
    row_slot: &[Option<u32>],
    deltas: &[ScaledSigns<'_>],
) -> Result<Vec<f32>, KernelError> {
    tenant_delta_matmul_with(SimdLevel::detect(), x, row_slot, deltas)
}

/// [`tenant_delta_matmul`] at a chosen level (fails if the CPU lacks it).
pub fn tenant_delta_matmul_with(
    level: SimdLevel,
    x: &[f32],
    row_slot: &[Option<u32>],
    deltas: &[ScaledSigns<'_>],
) -> Result<Vec<f32>, KernelError> {
    level.check()?;
    let deltas: Vec<(Words<'_>, f32)> = deltas
        .iter()
        .map(|d| (Words::RowMajor(d.signs), d.scale))
        .collect();
    tenant_matmul(level, x, row_slot, &deltas)
}

/// One tenant's [`InterleavedSigns`] and scale, for [`tenant_delta_matmul_interleaved`].
#[derive(Debug, Clone, Copy)]
pub struct ScaledInterleaved<'a> {
    /// The `[n, k]` sign matrix, interleaved.
    pub signs: &'a InterleavedSigns,
    /// The BitDelta scale `s`.
    pub scale: f32,
}

/// [`tenant_delta_matmul`] on deltas kept in the interleaved layout, at the best [`SimdLevel`].
pub fn tenant_delta_matmul_interleaved(
    x: &[f32],
    row_slot: &[Option<u32>],
    deltas: &[ScaledInterleaved<'_>],
) -> Result<Vec<f32>, KernelError> {
    tenant_delta_matmul_interleaved_with(SimdLevel::detect(), x, row_slot, deltas)
}

/// [`tenant_delta_matmul_interleaved`] at a chosen level (fails if the CPU lacks it).
pub fn tenant_delta_matmul_interleaved_with(
    level: SimdLevel,
    x: &[f32],
    row_slot: &[Option<u32>],
    deltas: &[ScaledInterleaved<'_>],
) -> Result<Vec<f32>, KernelError> {
    level.check()?;
    let deltas: Vec<(Words<'_>, f32)> = deltas
        .iter()
        .map(|d| (Words::Interleaved(d.signs.view()), d.scale))
        .collect();
    tenant_matmul(level, x, row_slot, &deltas)
}

/// The multi-tenant product on either layout, at a checked level.
pub(crate) fn tenant_matmul(
    level: SimdLevel,
    x: &[f32],
    row_slot: &[Option<u32>],
    deltas: &[(Words<'_>, f32)],
) -> Result<Vec<f32>, KernelError> {
    let first = deltas.first().ok_or(KernelError::NoDeltas)?.0;
    let (n, k) = (first.n(), first.k());
    for (index, (d, _)) in deltas.iter().enumerate() {
        if (d.n(), d.k()) != (n, k) {
            return Err(KernelError::DeltaShapeMismatch {
                index,
                n: d.n(),
                k: d.k(),
                n0: n,
                k0: k,
            });
        }
    }
    let m = rows_of(x.len(), k, "tenant_delta_matmul", "x")?;
    if row_slot.len() != m {
        return Err(KernelError::RowSlotLength {
            m,
            got: row_slot.len(),
        });
    }
    // Rows of each slot, in batch order (the SGMV "segments").
    let mut rows_of_slot: Vec<Vec<usize>> = vec![Vec::new(); deltas.len()];
    for (row, slot) in row_slot.iter().enumerate() {
        if let Some(slot) = *slot {
            let rows = rows_of_slot
                .get_mut(slot as usize)
                .ok_or(KernelError::SlotOutOfRange {
                    row,
                    slot,
                    num_deltas: deltas.len(),
                })?;
            rows.push(row);
        }
    }
    let mut out = vec![0f32; m * n];
    let mut xs = Vec::new();
    for (&(signs, scale), rows) in deltas.iter().zip(&rows_of_slot) {
        if rows.is_empty() {
            continue;
        }
        xs.clear();
        for &row in rows {
            xs.extend_from_slice(&x[row * k..(row + 1) * k]);
        }
        let out_t = matmul_t_transposed(level, &xs, rows.len(), signs);
        for (i, &row) in rows.iter().enumerate() {
            let dst = &mut out[row * n..(row + 1) * n];
            for (j, o) in dst.iter_mut().enumerate() {
                *o = scale * out_t[j * rows.len() + i];
            }
        }
    }
    Ok(out)
}

/// `len / width`, or an error if `len` is not a multiple of `width`.
fn rows_of(
    len: usize,
    width: usize,
    op: &'static str,
    what: &'static str,
) -> Result<usize, KernelError> {
    if width == 0 || !len.is_multiple_of(width) {
        return Err(KernelError::InputLength {
            op,
            what,
            expected: width,
            got: len,
        });
    }
    Ok(len / width)
}

/// `Σ_c a[i, c]` for each row of an `(m, width)` matrix, accumulated in `f64`: the AVX-512 kernels
/// subtract it from twice a partial sum, so its rounding error should not add to theirs.
fn row_sums(a: &[f32], m: usize, width: usize) -> Vec<f32> {
    (0..m)
        .map(|i| {
            let mut lanes = [0f64; 4];
            let row = &a[i * width..(i + 1) * width];
            let mut chunks = row.chunks_exact(4);
            for c in &mut chunks {
                for (l, v) in lanes.iter_mut().zip(c) {
                    *l += f64::from(*v);
                }
            }
            let tail: f64 = chunks.remainder().iter().map(|v| f64::from(*v)).sum();
            (lanes.iter().sum::<f64>() + tail) as f32
        })
        .collect()
}

/// Whether a product takes the 5-bit one-row kernel ([`avx512::matmul_t_interleaved_m1`]): one
/// row of `x` (a decode step's tenant) on the interleaved layout, on a CPU with AVX-512VBMI2 (for
/// the `vpshrdd` that joins a group straddling two words).
fn one_row_kernel(level: SimdLevel, m: usize, signs: &Words<'_>) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        m == 1
            && level == SimdLevel::Avx512
            && matches!(signs, Words::Interleaved(_))
            && is_x86_feature_detected!("avx512vbmi2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (level, m, signs);
        false
    }
}

/// `(x · Sᵀ)ᵀ`, shape `(N, M)`: each task owns whole rows of it, so the tasks write disjoint
/// contiguous chunks.
fn matmul_t_transposed(level: SimdLevel, x: &[f32], m: usize, signs: Words<'_>) -> Vec<f32> {
    let (n, k) = (signs.n(), signs.k());
    if m > LUT_ROWS && level != SimdLevel::Avx2 {
        // Tables for all rows would outgrow L2: take LUT_ROWS rows per pass over the bits.
        let mut out_t = vec![0f32; n * m];
        for (c, chunk) in x.chunks(LUT_ROWS * k).enumerate() {
            let mc = chunk.len() / k;
            let part = matmul_t_transposed(level, chunk, mc, signs);
            for j in 0..n {
                out_t[j * m + c * LUT_ROWS..j * m + c * LUT_ROWS + mc]
                    .copy_from_slice(&part[j * mc..(j + 1) * mc]);
            }
        }
        return out_t;
    }
    let mut out_t = vec![0f32; n * m];
    if n == 0 || m == 0 {
        return out_t;
    }
    let five = one_row_kernel(level, m, &signs);
    // The one-row kernel reuses each chunk of its tables over a task's rows: give it more rows.
    let rows_per_task = if five {
        ONE_ROW_ROWS_PER_TASK
    } else {
        ROWS_PER_TASK
    };
    let build = |tables: &mut Vec<f32>| match level {
        // SAFETY: `five` holds only where AVX-512 is checked.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if five => *tables = unsafe { avx512::build_tables5(x, k) },
        SimdLevel::Portable => *tables = portable::build_tables(x, m, k),
        SimdLevel::Avx2 => tables.clear(),
        // SAFETY: every public entry point checked `level.is_available()`.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => *tables = unsafe { avx512::build_tables(x, m, k) },
        #[cfg(not(target_arch = "x86_64"))]
        SimdLevel::Avx512 => *tables = portable::build_tables(x, m, k),
    };
    let task = |tables: &[f32], (b, chunk): (usize, &mut [f32])| {
        let n0 = b * rows_per_task;
        let rows = chunk.len() / m;
        match signs {
            Words::RowMajor(signs) => matmul_t_block(
                level,
                x,
                m,
                tables,
                signs.row_words(n0..n0 + rows),
                k,
                chunk,
            ),
            // SAFETY: every public entry point checked `level.is_available()`.
            #[cfg(target_arch = "x86_64")]
            Words::Interleaved(il) if five => unsafe {
                avx512::matmul_t_interleaved_m1(tables, il.group_words(n0, rows), k, chunk)
            },
            // SAFETY: every public entry point checked `level.is_available()`.
            #[cfg(target_arch = "x86_64")]
            Words::Interleaved(il) if level == SimdLevel::Avx512 => unsafe {
                avx512::matmul_t_block_interleaved(tables, m, il.group_words(n0, rows), k, chunk)
            },
            Words::Interleaved(il) => {
                matmul_t_block(level, x, m, tables, &il.row_major(n0, rows), k, chunk)
            }
        }
    };
    if m * n * k < PARALLEL_MIN_PRODUCTS {
        let mut tables = Vec::new();
        build(&mut tables);
        out_t
            .chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|c| task(&tables, c));
    } else {
        // Each worker thread builds its own copy of the tables (the first time it runs a task of
        // this call) rather than all reading the caller's: building them is a few µs at K = 11008
        // (16 floats per 4 columns), while pulling 64–176 KiB that another core just wrote costs
        // a cross-core transfer per cache line. Measured on 128 × 4096 (two tasks), the shared
        // tables made the two-thread call slower than the one-thread call.
        static CALLS: AtomicU64 = AtomicU64::new(0);
        thread_local! {
            /// (call id, that call's tables) of this thread's last task.
            static TABLES: RefCell<(u64, Vec<f32>)> = const { RefCell::new((u64::MAX, Vec::new())) };
        }
        let call = CALLS.fetch_add(1, Ordering::Relaxed);
        out_t
            .par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|c| {
                TABLES.with(|t| {
                    // The borrow holds only over plain compute (no rayon call that could run
                    // another task of this thread inside it).
                    let mut t = t.borrow_mut();
                    if t.0 != call {
                        build(&mut t.1);
                        t.0 = call;
                    }
                    task(&t.1, c);
                })
            });
    }
    out_t
}

/// `(N, M)` → `(M, N)`; a copy only when `M > 1`.
fn transpose(out_t: &[f32], n: usize, m: usize) -> Vec<f32> {
    if m <= 1 {
        return out_t.to_vec();
    }
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
}

/// One task of `x · Sᵀ`: `words` holds `out_t.len() / m` whole rows of `S`; `tables` are the
/// level's lookup tables for `x` (empty for AVX2, which reads `x`).
fn matmul_t_block(
    level: SimdLevel,
    x: &[f32],
    m: usize,
    tables: &[f32],
    words: &[u32],
    k: usize,
    out_t: &mut [f32],
) {
    match level {
        SimdLevel::Portable => portable::matmul_t_block(tables, m, words, k, out_t),
        // SAFETY: every public entry point checked `level.is_available()`.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { avx2::matmul_t_block(x, m, words, k, out_t) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { avx512::matmul_t_block(tables, m, words, k, out_t) },
        #[cfg(not(target_arch = "x86_64"))]
        SimdLevel::Avx2 | SimdLevel::Avx512 => {
            let _ = x;
            portable::matmul_t_block(tables, m, words, k, out_t)
        }
    }
}

/// One task of `g · S`: columns of words `w` (all rows of `S`), written to `out` `(m, cols)`.
fn matmul_n_block(
    level: SimdLevel,
    g: &[f32],
    m: usize,
    g_sums: &[f32],
    signs: SignsView<'_>,
    w: std::ops::Range<usize>,
    out: &mut [f32],
) {
    match level {
        SimdLevel::Portable => portable::matmul_n_block(g, m, signs, w, out),
        // SAFETY: every public entry point checked `level.is_available()`.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { avx2::matmul_n_block(g, m, signs, w, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { avx512::matmul_n_block(g, m, g_sums, signs, w, out) },
        #[cfg(not(target_arch = "x86_64"))]
        SimdLevel::Avx2 | SimdLevel::Avx512 => {
            let _ = g_sums;
            portable::matmul_n_block(g, m, signs, w, out)
        }
    }
}
