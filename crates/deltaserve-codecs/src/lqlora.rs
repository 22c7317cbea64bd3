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
pub(crate) fn rank_r_factors(
    a: MatRef<'_, f32>,
    opts: &LqOptions,
    rng: &mut StdRng,
) -> (Vec<f32>, Vec<f32>) {
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

// ================================================================================================
// A whole checkpoint: measure every (matrix, configuration), allocate bits by the ILP, write.
// ================================================================================================

/// The side file in `--out` with the packed NF codes and scales of every projection.
pub const CODES_FILE: &str = "nf_codes.safetensors";
/// The report in `--out`: the configuration chosen for each matrix, errors and bits.
pub const REPORT_FILE: &str = "decompose.json";
/// The initial L1/L2 delta in `--out` (a `lowrank` delta against `--out` itself).
pub const DELTA_FILE: &str = "lqlora_init.delta";

/// Options of [`decompose_checkpoint`].
#[derive(Debug, Clone)]
pub struct DecomposeOptions {
    /// The model directory to create.
    pub out: std::path::PathBuf,
    /// Replace `out` if it exists.
    pub force: bool,
    /// Target average bits per parameter of Q over the projection weights (codes + scales;
    /// L1/L2 are counted separately, as in LQ-LoRA §3.2).
    pub budget_bits: f64,
    /// The NF configurations the ILP chooses from.
    pub configs: Vec<NfConfig>,
    /// Decomposition settings; `rank == 0` quantizes only (NF with the ILP, no L1/L2).
    pub lq: LqOptions,
    /// Storage dtype of L1/L2 in the delta.
    pub factor_dtype: crate::numeric::FloatDtype,
    /// Seconds the ILP may search before taking its best allocation.
    pub ilp_time_limit_s: f64,
    /// Draw progress bars.
    pub progress: bool,
}

/// One projection's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MatrixChoice {
    /// The weight's name.
    pub name: String,
    /// `[rows, cols]`.
    pub shape: [usize; 2],
    /// The configuration chosen (`nf3-b64`).
    pub config: String,
    /// Exact bits of Q.
    pub q_bits: u64,
    /// Reconstruction error ‖W − Q − L1L2‖²_F (Fisher-weighted if Fisher was given).
    pub error: f64,
    /// Alternations run for the kept decomposition (0 when quantizing only).
    pub iterations: usize,
}

/// What [`decompose_checkpoint`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DecomposeReport {
    /// The model directory written.
    pub out: std::path::PathBuf,
    /// The L1/L2 delta, when `rank > 0`.
    pub delta: Option<std::path::PathBuf>,
    /// Rank of L1·L2.
    pub rank: usize,
    /// Whether errors were Fisher-weighted.
    pub fisher: bool,
    /// How Q and L1/L2 were initialised: `lqlora` (weight error), `lqlora-fisher` (Fisher-
    /// weighted weight error), `apiq` (layer-output error on calibration data, [`crate::apiq`])
    /// or `apiq-fisher-alloc` (ApiQ with the Fisher-weighted bit allocation).
    pub init: String,
    /// The bits/param asked for.
    pub budget_bits: f64,
    /// Parameters of the projection weights.
    pub params: u64,
    /// Exact bits of all Q's.
    pub q_bits: u64,
    /// Bits of the L1/L2 factors as stored.
    pub lowrank_bits: u64,
    /// Σ error over the matrices.
    pub total_error: f64,
    /// How the ILP ended (`Optimal`, `WithinGap`, `TimeLimit`).
    pub ilp_status: String,
    /// Seconds measuring every (matrix, configuration).
    pub measure_seconds: f64,
    /// Seconds in the ILP.
    pub solve_seconds: f64,
    /// Per matrix.
    pub matrices: Vec<MatrixChoice>,
}

impl std::fmt::Display for DecomposeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut hist: std::collections::BTreeMap<&str, usize> = Default::default();
        for m in &self.matrices {
            *hist.entry(m.config.as_str()).or_default() += 1;
        }
        let hist: Vec<String> = hist.iter().map(|(k, v)| format!("{k}×{v}")).collect();
        write!(
            f,
            "{} matrices, Q at {:.4} bits/param (budget {}), L1/L2 rank {} at {:.4} bits/param, \
             error {:.6e}{}; configs {}; measured in {:.1} s, ILP {} in {:.2} s",
            self.matrices.len(),
            self.q_bits as f64 / self.params as f64,
            self.budget_bits,
            self.rank,
            self.lowrank_bits as f64 / self.params as f64,
            self.total_error,
            if self.fisher {
                " (Fisher-weighted)"
            } else {
                ""
            },
            hist.join(", "),
            self.measure_seconds,
            self.ilp_status,
            self.solve_seconds
        )
    }
}

/// One projection weight, decoded to f32 (shared with [`crate::apiq`]).
pub(crate) struct Matrix {
    pub(crate) name: String,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) dtype: deltaserve_format::Dtype,
    pub(crate) w: Vec<f32>,
}

/// Every attention/MLP projection of `ckpt` decoded to f32, after checking the options that
/// do not depend on the method (output, configurations, budget, rank, Fisher shapes).
pub(crate) fn projections(
    ckpt: &deltaserve_model::Checkpoint,
    fisher: Option<&std::collections::BTreeMap<String, Vec<f32>>>,
    opts: &DecomposeOptions,
) -> Result<Vec<Matrix>, CodecError> {
    use crate::numeric::FloatDtype;
    if !opts.force && opts.out.symlink_metadata().is_ok() {
        return Err(CodecError::OutputExists {
            path: opts.out.clone(),
        });
    }
    if opts.configs.is_empty() {
        return Err(CodecError::BadOption {
            option: "--configs",
            detail: "no NF configuration to choose from".into(),
        });
    }
    if !(opts.budget_bits.is_finite() && opts.budget_bits > 0.0) {
        return Err(CodecError::BadOption {
            option: "--budget-bits",
            detail: format!(
                "{} is not a positive number of bits per parameter",
                opts.budget_bits
            ),
        });
    }
    let mut mats = Vec::new();
    for name in ckpt.tensor_names() {
        let raw = ckpt.raw(name)?;
        if !crate::bitdelta::is_compressed(name, raw.shape) {
            continue;
        }
        let fd = FloatDtype::from_safetensors(raw.dtype).ok_or_else(|| {
            CodecError::UnsupportedDtype {
                tensor: name.to_owned(),
                dir: ckpt.dir().to_owned(),
                dtype: raw.dtype.to_string(),
            }
        })?;
        let (rows, cols) = (raw.shape[0], raw.shape[1]);
        if opts.lq.rank > rows.min(cols) {
            return Err(CodecError::BadOption {
                option: "--rank",
                detail: format!(
                    "{} exceeds the smaller side of {name} [{rows}, {cols}]; use at most {}",
                    opts.lq.rank,
                    rows.min(cols)
                ),
            });
        }
        if let Some(f) = fisher {
            match f.get(name) {
                Some(v) if v.len() == rows * cols => {}
                _ => {
                    return Err(CodecError::BadOption {
                        option: "--fisher",
                        detail: format!("no Fisher estimate of shape [{rows}, {cols}] for {name}"),
                    })
                }
            }
        }
        mats.push(Matrix {
            name: name.to_owned(),
            rows,
            cols,
            dtype: raw.dtype,
            w: fd.decode(raw.data),
        });
    }
    if mats.is_empty() {
        return Err(CodecError::BadOption {
            option: "--model",
            detail: format!(
                "{} has no attention/MLP projection weights",
                ckpt.dir().display()
            ),
        });
    }
    Ok(mats)
}

/// Decomposes every attention/MLP projection of `ckpt` (LQ-LoRA §3: Q + L1L2 with the NF
/// configuration of each matrix chosen by the ILP of eq. 5 under `budget_bits`) and writes:
///
/// - `out/`: a Hugging Face directory, the base with each projection replaced by its
///   dequantized Q in the model's dtype (loads anywhere; saves no memory until an engine
///   dequantizes on load);
/// - `out/nf_codes.safetensors`: the packed NF codes, 8-bit scale codes, FP32 group scales and
///   offset of each Q (metadata: bits, block size, shape, exact storage bits);
/// - `out/decompose.json`: the [`DecomposeReport`];
/// - `out/lqlora_init.delta` (rank > 0): L1/L2 as `lowrank` entries (down = L2, up = L1)
///   against `out/` itself, so base `out/` + this delta runs Q + L1L2.
///
/// `fisher` (weight name → per-weight values) weights the errors and the SVD.
pub fn decompose_checkpoint(
    ckpt: &deltaserve_model::Checkpoint,
    fisher: Option<&std::collections::BTreeMap<String, Vec<f32>>>,
    opts: &DecomposeOptions,
) -> Result<DecomposeReport, CodecError> {
    use rayon::prelude::*;
    use std::time::Instant;

    let mats = projections(ckpt, fisher, opts)?;
    let fisher_of = |m: &Matrix| fisher.map(|f| f[&m.name].as_slice());

    // One (error, iterations, NfTensor?, L1, L2) per matrix and configuration. Only errors are
    // kept from this pass; the chosen configuration is recomputed (deterministic seed).
    let run = |m: &Matrix, cfg: NfConfig| -> Result<LqDecomposition, CodecError> {
        if opts.lq.rank == 0 {
            let q = NfTensor::quantize(&m.w, cfg);
            let d = q.dequantize();
            let error = match fisher_of(m) {
                Some(f) => crate::nf::weighted_sq_error(&m.w, &d, f),
                None => crate::nf::sq_error(&m.w, &d),
            };
            Ok(LqDecomposition {
                rows: m.rows,
                cols: m.cols,
                rank: 0,
                q,
                l1: Vec::new(),
                l2: Vec::new(),
                error,
                history: Vec::new(),
            })
        } else {
            decompose(&m.w, m.rows, m.cols, cfg, &opts.lq, fisher_of(m))
        }
    };
    let start = Instant::now();
    let pairs: Vec<(usize, usize)> = (0..mats.len())
        .flat_map(|i| (0..opts.configs.len()).map(move |c| (i, c)))
        .collect();
    let bar = progress_bar(opts.progress, pairs.len() as u64, "measuring configs");
    let errors: Vec<f64> = pairs
        .par_iter()
        .map(|&(i, c)| {
            let e = run(&mats[i], opts.configs[c]).map(|d| d.error);
            bar.inc(1);
            e
        })
        .collect::<Result<_, _>>()?;
    bar.finish_and_clear();
    let measure_seconds = start.elapsed().as_secs_f64();

    let alloc = allocate(&mats, &errors, opts)?;

    let bar = progress_bar(opts.progress, mats.len() as u64, "decomposing");
    let finals: Vec<LqDecomposition> = mats
        .par_iter()
        .zip(alloc.picks.par_iter())
        .map(|(m, &p)| {
            let d = run(m, opts.configs[p]);
            bar.inc(1);
            d
        })
        .collect::<Result<_, _>>()?;
    bar.finish_and_clear();

    write_outputs(
        ckpt,
        &mats,
        &finals,
        &alloc,
        measure_seconds,
        opts,
        if fisher.is_some() {
            "lqlora-fisher"
        } else {
            "lqlora"
        },
    )
}

/// The ILP of LQ-LoRA eq. 5 over `errors` (matrix-major, one per configuration of
/// `opts.configs`): the configuration of each matrix so that Q stays within the budget.
pub(crate) fn allocate(
    mats: &[Matrix],
    errors: &[f64],
    opts: &DecomposeOptions,
) -> Result<crate::budget::Allocation, CodecError> {
    use crate::budget::{solve_with, BudgetOptions, Choice, Item};
    let params: u64 = mats.iter().map(|m| (m.rows * m.cols) as u64).sum();
    let items: Vec<Item> = mats
        .iter()
        .enumerate()
        .map(|(i, m)| Item {
            name: m.name.clone(),
            choices: opts
                .configs
                .iter()
                .enumerate()
                .map(|(c, cfg)| Choice {
                    bits: cfg.storage_bits(m.rows * m.cols),
                    error: errors[i * opts.configs.len() + c],
                })
                .collect(),
        })
        .collect();
    let budget = (opts.budget_bits * params as f64).floor() as u64;
    Ok(solve_with(
        &items,
        budget,
        &BudgetOptions {
            params,
            time_limit_s: opts.ilp_time_limit_s,
            ..BudgetOptions::default()
        },
    )?)
}

/// Writes the Q directory, the packed codes, the L1/L2 delta and the report for `finals`
/// (one per matrix, in the configuration `alloc` picked). `init` names the initialisation in
/// the report and the delta header (`lqlora`, `lqlora-fisher`, `apiq`).
pub(crate) fn write_outputs(
    ckpt: &deltaserve_model::Checkpoint,
    mats: &[Matrix],
    finals: &[LqDecomposition],
    alloc: &crate::budget::Allocation,
    measure_seconds: f64,
    opts: &DecomposeOptions,
    init: &str,
) -> Result<DecomposeReport, CodecError> {
    use crate::numeric::FloatDtype;
    use deltaserve_format::{
        fingerprint_safetensors, write_delta, DeltaFile, DeltaHeader, FullValue, OwnedTensor,
        TensorEntry,
    };
    let params: u64 = mats.iter().map(|m| (m.rows * m.cols) as u64).sum();
    let fisher = init == "lqlora-fisher";
    // 1. The Q model directory, through merge (a scratch delta of full Q entries).
    let parent = opts
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let scratch = tempfile_dir(parent)?;
    let scratch_delta = scratch.join("q.delta");
    let (info, extra) = crate::files::finetune_files(ckpt, ckpt)?;
    let mut header = DeltaHeader::new("nf-q", fingerprint_safetensors(&ckpt.weight_files())?, info);
    header.extra.extend(extra.clone());
    let mut tensors = Vec::new();
    for (m, d) in mats.iter().zip(finals) {
        let fd = FloatDtype::from_safetensors(m.dtype).expect("checked above");
        let mut bytes = Vec::new();
        fd.encode_into(&d.q.dequantize(), &mut bytes);
        header.tensors.insert(
            m.name.clone(),
            TensorEntry::full(&m.name, FullValue::Finetuned, vec![m.rows, m.cols], m.dtype),
        );
        tensors.push((
            m.name.clone(),
            OwnedTensor::new(m.dtype, vec![m.rows, m.cols], bytes),
        ));
    }
    // Every other tensor unchanged (merge writes what the delta holds).
    for name in ckpt.tensor_names() {
        if header.tensors.contains_key(name) {
            continue;
        }
        let raw = ckpt.raw(name)?;
        header.tensors.insert(
            name.to_owned(),
            TensorEntry::full(name, FullValue::Finetuned, raw.shape.to_vec(), raw.dtype),
        );
        tensors.push((
            name.to_owned(),
            OwnedTensor::new(raw.dtype, raw.shape.to_vec(), raw.data.to_vec()),
        ));
    }
    write_delta(&scratch_delta, &header, tensors, true)?;
    let merged = crate::merge::merge(
        ckpt,
        &DeltaFile::open(&scratch_delta)?,
        &crate::merge::MergeOptions {
            out: opts.out.clone(),
            force: opts.force,
            max_shard_size: crate::merge::DEFAULT_MAX_SHARD_SIZE,
            dtype: None,
            progress: opts.progress,
        },
    )?;
    let _ = std::fs::remove_dir_all(&scratch);
    drop(merged);

    // 2. The packed codes.
    write_codes(&opts.out.join(CODES_FILE), mats, finals)?;

    // 3. The L1/L2 delta against the Q directory.
    let mut lowrank_bits = 0u64;
    let delta = if opts.lq.rank > 0 {
        let q_ckpt = deltaserve_model::Checkpoint::open(&opts.out)?;
        let (info, extra) = crate::files::finetune_files(&q_ckpt, &q_ckpt)?;
        let mut header = DeltaHeader::new(
            match init {
                i if i.starts_with("apiq") => format!(
                    "lqlora:rank={},budget_bits={},init={i}",
                    opts.lq.rank, opts.budget_bits
                ),
                _ => format!(
                    "lqlora:rank={},budget_bits={}",
                    opts.lq.rank, opts.budget_bits
                ),
            },
            fingerprint_safetensors(&q_ckpt.weight_files())?,
            info,
        );
        header.extra.extend(extra);
        header.extra.insert(
            "lqlora".into(),
            serde_json::json!({
                "paper": "arXiv 2311.12023",
                "base": "the directory this file sits in: Q, NF-quantized (codes in nf_codes.safetensors)",
                "entries": "lowrank: up = L1 [out, r], down = L2 [r, in]; W ≈ Q + up·down",
                "rank": opts.lq.rank,
                "budget_bits": opts.budget_bits,
                "fisher": fisher,
                "init": init,
            }),
        );
        let mut tensors = Vec::new();
        for (m, d) in mats.iter().zip(finals) {
            let input = crate::codec::MatrixInput {
                name: &m.name,
                rows: m.rows,
                cols: m.cols,
                base: &[],
                finetuned: &[],
                base_dtype: m.dtype,
                calibration: None,
            };
            let r = d.rank;
            let enc = crate::codec::EncodedBuilder::new("lowrank", &input)
                .param("rank", r)
                .part(
                    "down",
                    crate::codec::float_tensor(opts.factor_dtype, vec![r, m.cols], &d.l2),
                )
                .part(
                    "up",
                    crate::codec::float_tensor(opts.factor_dtype, vec![m.rows, r], &d.l1),
                )
                .build();
            lowrank_bits += (r * (m.rows + m.cols) * opts.factor_dtype.size() * 8) as u64;
            header.tensors.insert(m.name.clone(), enc.entry);
            tensors.extend(enc.tensors);
        }
        let path = opts.out.join(DELTA_FILE);
        write_delta(&path, &header, tensors, true)?;
        Some(path)
    } else {
        None
    };

    let report = DecomposeReport {
        out: opts.out.clone(),
        delta,
        rank: opts.lq.rank,
        fisher,
        init: init.to_owned(),
        budget_bits: opts.budget_bits,
        params,
        q_bits: finals.iter().map(|d| d.q.storage_bits()).sum(),
        lowrank_bits,
        total_error: finals.iter().map(|d| d.error).sum(),
        ilp_status: format!("{:?}", alloc.status),
        measure_seconds,
        solve_seconds: alloc.solve_seconds,
        matrices: mats
            .iter()
            .zip(finals)
            .zip(&alloc.picks)
            .map(|((m, d), &p)| MatrixChoice {
                name: m.name.clone(),
                shape: [m.rows, m.cols],
                config: opts.configs[p].label(),
                q_bits: d.q.storage_bits(),
                error: d.error,
                iterations: d.history.len(),
            })
            .collect(),
    };
    let json = serde_json::to_vec_pretty(&report).expect("report serializes");
    let path = opts.out.join(REPORT_FILE);
    deltaserve_format::write_atomic(&path, true, |w| w.write_all(&json))?;
    Ok(report)
}

pub(crate) fn progress_bar(show: bool, len: u64, msg: &'static str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b.set_message(msg);
    b
}

fn tempfile_dir(parent: &std::path::Path) -> Result<std::path::PathBuf, CodecError> {
    let dir = parent.join(format!(".deltaserve-decompose-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(CodecError::io("create directory", &dir))?;
    Ok(dir)
}

/// `nf_codes.safetensors`: per matrix `{name}.codes` (U8, [`crate::nf::pack_bits`] stream),
/// `{name}.scale_codes` (U8), `{name}.group_scales` (F32), `{name}.offset` (F32, one value);
/// the metadata maps each name to `{bits, block_size, shape, storage_bits}`.
fn write_codes(
    path: &std::path::Path,
    mats: &[Matrix],
    finals: &[LqDecomposition],
) -> Result<(), CodecError> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut meta = std::collections::HashMap::new();
    meta.insert(
        "format".to_owned(),
        "deltaserve NF codes (LQ-LoRA): codes are a little-endian bit stream, `bits` per weight, \
         row-major; block scale j = scale_codes[j] * group_scales[j / 256] / 255 + offset; \
         weight = nf_values(bits)[code] * scale of its block of block_size weights"
            .to_owned(),
    );
    for (m, d) in mats.iter().zip(finals) {
        let q = &d.q;
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let packed = crate::nf::pack_bits(&q.codes, q.config.bits);
        owned.push((
            format!("{}.codes", m.name),
            Dtype::U8,
            vec![packed.len()],
            packed,
        ));
        owned.push((
            format!("{}.scale_codes", m.name),
            Dtype::U8,
            vec![q.scale_codes.len()],
            q.scale_codes.clone(),
        ));
        owned.push((
            format!("{}.group_scales", m.name),
            Dtype::F32,
            vec![q.group_scales.len()],
            f32_bytes(&q.group_scales),
        ));
        owned.push((
            format!("{}.offset", m.name),
            Dtype::F32,
            vec![1],
            f32_bytes(&[q.offset]),
        ));
        meta.insert(
            m.name.clone(),
            serde_json::json!({
                "bits": q.config.bits,
                "block_size": q.config.block_size,
                "shape": [m.rows, m.cols],
                "storage_bits": q.storage_bits(),
            })
            .to_string(),
        );
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, dt, s, b)| {
            (
                n.clone(),
                TensorView::new(*dt, s.clone(), b).expect("sizes match"),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| CodecError::BadOption {
        option: "--out",
        detail: format!("cannot serialize {}: {e}", path.display()),
    })?;
    let bytes = with_sorted_header(bytes);
    deltaserve_format::write_atomic(path, true, |w| w.write_all(&bytes))?;
    Ok(())
}

/// safetensors writes its metadata map in hash order, so two runs of the same decomposition gave
/// files that differed in their header. This rewrites the header's JSON with sorted keys (the
/// same keys and values, so the same length) and leaves the data alone; should the header not
/// parse, the bytes are returned unchanged.
fn with_sorted_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let Some(n) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    else {
        return bytes;
    };
    let Some(header) = bytes.get(8..8 + n) else {
        return bytes;
    };
    // serde_json's map is ordered by key (no `preserve_order` in this workspace).
    let Ok(sorted) =
        serde_json::from_slice::<serde_json::Value>(header).and_then(|v| serde_json::to_vec(&v))
    else {
        return bytes;
    };
    if sorted.len() <= n {
        bytes[8..8 + sorted.len()].copy_from_slice(&sorted);
        bytes[8 + sorted.len()..8 + n].fill(b' ');
    }
    bytes
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};

    /// Metadata maps built in opposite orders give the same bytes once sorted, and the file still
    /// reads back with every tensor and metadata value.
    #[test]
    fn sorted_header_makes_the_bytes_deterministic_and_stays_readable() {
        let data: Vec<u8> = (0..24u8).collect();
        let write = |keys: &mut dyn Iterator<Item = usize>| {
            let meta: HashMap<String, String> = keys
                .map(|i| (format!("key{i:02}"), format!("value {i}")))
                .collect();
            let views = vec![
                (
                    "b".to_string(),
                    TensorView::new(Dtype::U8, vec![8], &data[..8]).unwrap(),
                ),
                (
                    "a".to_string(),
                    TensorView::new(Dtype::U8, vec![2, 8], &data[8..]).unwrap(),
                ),
            ];
            super::with_sorted_header(safetensors::serialize(views, Some(meta)).unwrap())
        };
        let one = write(&mut (0..40));
        let two = write(&mut (0..40).rev());
        assert_eq!(one, two);
        let st = SafeTensors::deserialize(&one).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), &data[8..]);
        assert_eq!(st.tensor("b").unwrap().data(), &data[..8]);
        let (_, meta) = SafeTensors::read_metadata(&one).unwrap();
        let meta = meta.metadata().as_ref().unwrap();
        assert_eq!(meta.len(), 40);
        assert_eq!(meta["key07"], "value 7");
    }
}
