//! LQ-LoRA: a weight matrix as a quantized part plus a low-rank part, W ≈ Q + L1·L2.
//!
//! Guo et al., "LQ-LoRA: Low-rank plus Quantized Matrix Decomposition for Efficient Language
//! Model Finetuning" (arXiv 2311.12023), §3.1, Algorithm 1: starting from Q = 0, alternate
//!
//! ```text
//!   L1, L2 ← SVD_r(W − Q)            (the best rank-r approximation, eq. 2)
//!   Q      ← Quantize(W − L1 L2)      (NF with double-quantized scales, [`crate::nf`])
//! ```
//!
//! and stop when ‖W − (Q + L1L2)‖_F stops falling (or after `max_iters`); the best iterate is
//! kept. The rank-r SVD is randomised (Halko, Martinsson & Tropp 2011, Alg. 4.4: a Gaussian
//! sketch with oversampling and power iterations, QR-orthonormalised each pass), through
//! `faer`; the factors split the singular values evenly, L1 = U√S, L2 = √S Vᵀ, as the paper's
//! reference does, so fine-tuning starts from balanced factors.
//!
//! **Fisher-weighted variant** (§3.3, eq. 6): with a diagonal Fisher estimate F (one value per
//! weight) the objective becomes ‖√F ⊙ (W − Q − L1L2)‖²_F. A weighted low-rank approximation
//! has no closed form, so — as the paper does — F is reduced to row and column weights
//! r_i = √(mean_j F_ij), c_j = √(mean_i F_ij) and the SVD is taken of diag(r)·(W − Q)·diag(c);
//! the factors are then unscaled, L1 = diag(r)⁻¹·L1', L2 = L2'·diag(c)⁻¹. The quantization step
//! stays unweighted (NF has no per-weight importance); the stopping rule and the reported
//! error use the weighted norm.

use faer::{Mat, MatRef};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::nf::{NfConfig, NfTensor};
use crate::CodecError;

/// Options of [`decompose`].
#[derive(Debug, Clone, Copy)]
pub struct LqOptions {
    /// Rank r of L1·L2.
    pub rank: usize,
    /// Most alternations (the paper's reference uses up to 100 with early stopping).
    pub max_iters: usize,
    /// Stop when an iteration improves the error by less than this fraction.
    pub rel_tol: f64,
    /// Extra sketch columns of the randomised SVD (Halko et al.'s p).
    pub oversample: usize,
    /// Power iterations of the randomised SVD (Halko et al.'s q).
    pub power_iters: usize,
    /// Seed of the Gaussian sketch.
    pub seed: u64,
}

impl Default for LqOptions {
    fn default() -> Self {
        Self {
            rank: 64,
            max_iters: 20,
            rel_tol: 1e-4,
            oversample: 10,
            power_iters: 2,
            seed: 2311,
        }
    }
}

/// The result of [`decompose`] for one matrix.
#[derive(Debug, Clone)]
pub struct LqDecomposition {
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// The rank.
    pub rank: usize,
    /// Q, quantized.
    pub q: NfTensor,
    /// L1, `[rows, rank]` row-major (the `up` factor).
    pub l1: Vec<f32>,
    /// L2, `[rank, cols]` row-major (the `down` factor).
    pub l2: Vec<f32>,
    /// ‖W − (Q + L1L2)‖²_F (Fisher-weighted when weights were given) of the kept iterate.
    pub error: f64,
    /// The same error after each alternation, including a final one that was not kept
    /// because it did not improve.
    pub history: Vec<f64>,
}

impl LqDecomposition {
    /// Q + L1·L2, row-major.
    pub fn reconstruct(&self) -> Vec<f32> {
        let mut out = self.q.dequantize();
        let lr = lowrank_product(&self.l1, &self.l2, self.rows, self.cols, self.rank);
        for (o, l) in out.iter_mut().zip(&lr) {
            *o += l;
        }
        out
    }
}

/// Decomposes the row-major `rows × cols` matrix `w` into NF(`config`) + rank-`opts.rank`.
///
/// `fisher`, if given, is a per-weight importance of the same shape (row-major); see the
/// module docs for how it enters.
pub fn decompose(
    w: &[f32],
    rows: usize,
    cols: usize,
    config: NfConfig,
    opts: &LqOptions,
    fisher: Option<&[f32]>,
) -> Result<LqDecomposition, CodecError> {
    if w.len() != rows * cols {
        return Err(CodecError::BadOption {
            option: "matrix",
            detail: format!("{} values for a {rows}×{cols} matrix", w.len()),
        });
    }
    if opts.rank == 0 || opts.rank > rows.min(cols) {
        return Err(CodecError::BadOption {
            option: "--rank",
            detail: format!(
                "{} does not fit a {rows}×{cols} matrix; use 1 to {}",
                opts.rank,
                rows.min(cols)
            ),
        });
    }
    if let Some(f) = fisher {
        if f.len() != w.len() {
            return Err(CodecError::BadOption {
                option: "--fisher",
                detail: format!("{} weights for a {rows}×{cols} matrix", f.len()),
            });
        }
    }
    let (rw, cw) = match fisher {
        Some(f) => {
            let (r, c) = row_col_weights(f, rows, cols);
            (Some(r), Some(c))
        }
        None => (None, None),
    };
    let err_of = |target: &[f32], approx: &[f32]| -> f64 {
        match fisher {
            Some(f) => crate::nf::weighted_sq_error(target, approx, f),
            None => crate::nf::sq_error(target, approx),
        }
    };

    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut q_deq = vec![0.0f32; w.len()];
    let mut best: Option<LqDecomposition> = None;
    let mut history = Vec::new();
    for _ in 0..opts.max_iters.max(1) {
        // L1, L2 ← SVD_r(W − Q), optionally row/column weighted.
        let a = Mat::<f32>::from_fn(rows, cols, |i, j| {
            let x = w[i * cols + j] - q_deq[i * cols + j];
            match (&rw, &cw) {
                (Some(r), Some(c)) => r[i] * x * c[j],
                _ => x,
            }
        });
        let (mut l1, mut l2) = rank_r_factors(a.as_ref(), opts, &mut rng);
        if let (Some(r), Some(c)) = (&rw, &cw) {
            for i in 0..rows {
                for k in 0..opts.rank {
                    l1[i * opts.rank + k] /= r[i];
                }
            }
            for k in 0..opts.rank {
                for j in 0..cols {
                    l2[k * cols + j] /= c[j];
                }
            }
        }
        // Q ← Quantize(W − L1 L2).
        let lr = lowrank_product(&l1, &l2, rows, cols, opts.rank);
        let resid: Vec<f32> = w.iter().zip(&lr).map(|(a, b)| a - b).collect();
        let q = NfTensor::quantize(&resid, config);
        let qd = q.dequantize();
        // W − (Q + L1L2) = (W − L1L2) − Q.
        let err = err_of(&resid, &qd);
        history.push(err);
        let prev = best.as_ref().map(|b| b.error);
        if prev.is_some_and(|p| err >= p) {
            break;
        }
        q_deq = qd;
        best = Some(LqDecomposition {
            rows,
            cols,
            rank: opts.rank,
            q,
            l1,
            l2,
            error: err,
            history: Vec::new(),
        });
        if let Some(p) = prev {
            if (p - err) <= opts.rel_tol * p {
                break;
            }
        }
    }
    let mut best = best.expect("at least one iteration");
    best.history = history;
    Ok(best)
}

/// Row and column weights of a Fisher matrix: r_i = √(mean_j F_ij), c_j = √(mean_i F_ij)
/// (LQ-LoRA reference: the mean is taken before the square root). Zeros (a row no gradient
/// reached) are lifted to 1e-6 of the mean weight so the unscaling stays finite.
pub fn row_col_weights(f: &[f32], rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
    let mut r = vec![0.0f64; rows];
    let mut c = vec![0.0f64; cols];
    for i in 0..rows {
        for j in 0..cols {
            let v = f[i * cols + j].max(0.0) as f64;
            r[i] += v;
            c[j] += v;
        }
    }
    let total: f64 = r.iter().sum::<f64>() / (rows * cols) as f64;
    let floor = (total * 1e-6).max(f64::MIN_POSITIVE);
    let fin = |v: Vec<f64>, n: usize| -> Vec<f32> {
        v.into_iter()
            .map(|s| (s / n as f64).max(floor).sqrt() as f32)
            .collect()
    };
    (fin(r, cols), fin(c, rows))
}

/// L1·L2 row-major, from row-major `[rows, rank]` and `[rank, cols]`.
pub fn lowrank_product(l1: &[f32], l2: &[f32], rows: usize, cols: usize, rank: usize) -> Vec<f32> {
    // faer is column-major: (L1 L2)ᵀ = L2ᵀ L1ᵀ as a cols × rows column-major matrix has exactly
    // the row-major layout of L1 L2. L1ᵀ (rank × rows, column-major) is L1's row-major buffer.
    let l1t = MatRef::from_column_major_slice(l1, rank, rows);
    let l2t = MatRef::from_column_major_slice(l2, cols, rank);
    let prod: Mat<f32> = l2t * l1t;
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        out.extend_from_slice(prod.col_as_slice(i));
    }
    out
}

/// The rank-r factors of `a` (L1 = U√S `[m, r]`, L2 = √S Vᵀ `[r, n]`, both row-major).
fn rank_r_factors(a: MatRef<'_, f32>, opts: &LqOptions, rng: &mut StdRng) -> (Vec<f32>, Vec<f32>) {
    let (m, n) = (a.nrows(), a.ncols());
    let r = opts.rank;
    let l = (r + opts.oversample).min(m.min(n));
    let (u, s, v) = if 2 * l >= m.min(n) {
        // The sketch would be as big as the matrix: an exact thin SVD is as cheap.
        let svd = a.thin_svd().expect("SVD converges");
        (
            svd.U().to_owned(),
            svd.S().column_vector().to_owned(),
            svd.V().to_owned(),
        )
    } else {
        // Halko et al. Alg. 4.4 (randomised subspace iteration).
        let omega = gaussian(n, l, rng);
        let mut qm = (a * &omega).qr().compute_thin_Q();
        for _ in 0..opts.power_iters {
            let z = (a.transpose() * &qm).qr().compute_thin_Q();
            qm = (a * &z).qr().compute_thin_Q();
        }
        let b: Mat<f32> = qm.transpose() * a; // l × n
        let svd = b.thin_svd().expect("SVD converges");
        let u = &qm * svd.U();
        (u, svd.S().column_vector().to_owned(), svd.V().to_owned())
    };
    let mut l1 = vec![0.0f32; m * r];
    let mut l2 = vec![0.0f32; r * n];
    for k in 0..r {
        let sq = s[k].max(0.0).sqrt();
        for i in 0..m {
            l1[i * r + k] = u[(i, k)] * sq;
        }
        for j in 0..n {
            l2[k * n + j] = v[(j, k)] * sq;
        }
    }
    (l1, l2)
}

/// An `rows × cols` matrix of independent standard normals (Box–Muller).
fn gaussian(rows: usize, cols: usize, rng: &mut StdRng) -> Mat<f32> {
    Mat::from_fn(rows, cols, |_, _| {
        let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
        let u2: f64 = rng.gen();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    })
}
