//! EoRA (Liu et al., arXiv 2410.21271): a training-free rank-`r` correction of a codec's
//! compression error, fitted in the eigenspace of the layer's input activations.
//!
//! With `E = W − Ŵ` the error of the compressed weight and `H = Σ xᵀx = Q Λ Qᵀ` the Gram matrix
//! of the layer's calibration inputs, the layer's output error on those inputs is
//! `‖E Xᵀ‖_F = ‖E Q Λ^{1/2}‖_F`. EoRA (§3, eq. 4-6) therefore projects the error,
//! `E' = E Q Λ^{1/2}`, takes its best rank-`r` approximation `U_r Σ_r V_rᵀ` (Eckart-Young), and
//! projects back: `B = U_r Σ_r^{1/2}` (out × r), `A = Σ_r^{1/2} V_rᵀ Λ^{-1/2} Qᵀ` (r × in).
//! `B·A` is then the rank-`r` matrix that minimises the output error `‖(E − BA) Xᵀ‖_F`, where a
//! plain SVD of `E` would minimise the weight error instead.
//!
//! Eigenvalues: as in the EoRA reference (GPTQModel `eora.py`), non-positive eigenvalues are
//! replaced by the smallest positive one; we also floor them at `1e-10·λ_max` so that a
//! rank-deficient `H` (fewer calibration tokens than inputs) cannot blow up `Λ^{-1/2}`.
//! Factors are stored in f16 as the reference stores them; [`LowRankCorrection::round_f16`]
//! rounds them so the encoder's error accounting matches what is decoded.

use faer::{Mat, Side};
use half::f16;

/// A rank-`r` correction `B·A`.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRankCorrection {
    /// Output rows.
    pub rows: usize,
    /// Input columns.
    pub cols: usize,
    /// The rank.
    pub rank: usize,
    /// (rows, rank) row-major.
    pub b: Vec<f32>,
    /// (rank, cols) row-major.
    pub a: Vec<f32>,
}

impl LowRankCorrection {
    /// Rounds both factors to f16 (what is stored).
    pub fn round_f16(&mut self) {
        for v in self.a.iter_mut().chain(self.b.iter_mut()) {
            *v = f16::from_f32(*v).to_f32();
        }
    }

    /// Adds `B·A` to `w` ((rows, cols) row-major), accumulating each entry in f64.
    pub fn add_to(&self, w: &mut [f32]) {
        for (r, row) in w.chunks_mut(self.cols).enumerate() {
            let b = &self.b[r * self.rank..][..self.rank];
            for (c, v) in row.iter_mut().enumerate() {
                let mut s = 0f64;
                for (k, &bk) in b.iter().enumerate() {
                    s += bk as f64 * self.a[k * self.cols + c] as f64;
                }
                *v = (*v as f64 + s) as f32;
            }
        }
    }

    /// Bits per weight of the f16 factors on a `[rows, cols]` matrix.
    pub fn bits_per_param(rows: usize, cols: usize, rank: usize) -> f64 {
        16.0 * (rank * (rows + cols)) as f64 / (rows * cols) as f64
    }
}

/// Why EoRA could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EoraError {
    /// `H` is not `cols × cols`.
    #[error("EoRA: the activation Gram matrix has {h} values but the weight has {cols} columns (needs cols² = {})", cols * cols)]
    Shape {
        /// Values in `H`.
        h: usize,
        /// Columns of the weight.
        cols: usize,
    },
    /// The eigen- or singular value decomposition did not converge (NaN/Inf inputs).
    #[error("EoRA: {0} did not converge; check the error matrix and the calibration activations for NaN/Inf")]
    NoConvergence(&'static str),
}

/// The EoRA correction of `err` ((rows, cols) row-major, `W − Ŵ`) given `h` ((cols, cols)
/// row-major, `Σ xᵀx` of the layer's inputs). `rank` is capped at `min(rows, cols)`.
pub fn eora_correction(
    err: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    rank: usize,
) -> Result<LowRankCorrection, EoraError> {
    assert_eq!(
        err.len(),
        rows * cols,
        "eora_correction: data is not rows × cols"
    );
    if h.len() != cols * cols {
        return Err(EoraError::Shape { h: h.len(), cols });
    }
    let rank = rank.min(rows).min(cols);
    let hm = Mat::from_fn(cols, cols, |i, j| h[i * cols + j]);
    let evd = hm
        .self_adjoint_eigen(Side::Lower)
        .map_err(|_| EoraError::NoConvergence("the eigendecomposition of H"))?;
    let q = evd.U();
    let s = evd.S().column_vector();
    let lmax = (0..cols).map(|i| s[i]).fold(0f64, f64::max);
    let min_pos = (0..cols)
        .map(|i| s[i])
        .filter(|&l| l > 0.0)
        .fold(f64::INFINITY, f64::min);
    let floor = if min_pos.is_finite() {
        min_pos.max(1e-10 * lmax)
    } else {
        1.0
    };
    let sqrt_l: Vec<f64> = (0..cols).map(|i| s[i].max(floor).sqrt()).collect();

    // E' = E · Q · Λ^{1/2}
    let e = Mat::from_fn(rows, cols, |i, j| err[i * cols + j] as f64);
    let mut scaled_q = q.to_owned();
    for (j, &sl) in sqrt_l.iter().enumerate() {
        for i in 0..cols {
            scaled_q[(i, j)] *= sl;
        }
    }
    let ep = &e * &scaled_q;
    let svd = ep
        .thin_svd()
        .map_err(|_| EoraError::NoConvergence("the SVD of the projected error"))?;
    let (u, sv, v) = (svd.U(), svd.S().column_vector(), svd.V());

    // B = U_r Σ_r^{1/2};  A = Σ_r^{1/2} V_rᵀ Λ^{-1/2} Qᵀ
    let mut b = vec![0f32; rows * rank];
    for i in 0..rows {
        for k in 0..rank {
            b[i * rank + k] = (u[(i, k)] * sv[k].sqrt()) as f32;
        }
    }
    // V_rᵀ Λ^{-1/2}: (rank, cols) in the eigenbasis, then times Qᵀ.
    let vt_scaled = Mat::from_fn(rank, cols, |k, j| v[(j, k)] * sv[k].sqrt() / sqrt_l[j]);
    let a_m = &vt_scaled * q.transpose();
    let mut a = vec![0f32; rank * cols];
    for k in 0..rank {
        for j in 0..cols {
            a[k * cols + j] = a_m[(k, j)] as f32;
        }
    }
    Ok(LowRankCorrection {
        rows,
        cols,
        rank,
        b,
        a,
    })
}
