//! GPTQ (Frantar et al., arXiv 2210.17323): quantize a weight matrix column by column, each
//! column's rounding error pushed onto the columns not yet quantized through the inverse
//! Hessian of the layer's reconstruction loss, `H = 2·Σ xᵀx` over calibration inputs.
//!
//! Follows the paper's Algorithm 1 and the reference implementation's `fasterquant`
//! (IST-DASLab/gptq, `gptq.py`) step for step, so its result can be compared with the reference
//! on a small matrix (`scripts/reference/gptq_reference.py`, test `gptq_reference`):
//! 1. dead inputs (`H_ii = 0`) get `H_ii = 1` and their weights are zeroed;
//! 2. optional act-order: columns permuted by decreasing `H_ii` (off by default);
//! 3. damping `H += λ·I`, `λ = percdamp · mean(diag H)` (percdamp 0.01);
//! 4. `U = chol(H⁻¹)ᵀ` (upper Cholesky factor of the inverse; §4 "Cholesky reformulation");
//! 5. blocks of `B = 128` columns: inside a block each column is rounded on the grid of
//!    [`crate::rtn`] (group parameters fitted when a group starts, to the weights as updated so
//!    far), its error `e = (w − q) / U_jj` is subtracted from the block's later columns as
//!    `e·U_j,j+1:`; after the block, the "lazy batch" update `W[:, i2:] −= E·U[i1:i2, i2:]`
//!    (§4 "Lazy batch-updates") is one matrix product.
//!
//! All arithmetic is float64 (the reference runs in float32 on a GPU); the overall scale of `H`
//! does not matter, so callers may pass `Σ xᵀx` without the factor 2.

use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};

use crate::codec::{Codec, CodecInfo, Encoded, EncodedBuilder, MatrixInput, Setting, SpecArgs};
use crate::error::{CodecError, Result};
use crate::rtn::{GridSpec, GroupParams, QuantizedMatrix};

/// GPTQ's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    /// The grid (bits, group size, symmetric).
    pub grid: GridSpec,
    /// Columns per lazy-update block (the reference's `blocksize`, 128).
    pub block_size: usize,
    /// Damping as a fraction of the mean diagonal of `H` (the reference's `percdamp`, 0.01).
    pub percdamp: f64,
    /// Quantize columns in order of decreasing `H_ii` (the reference's `--act-order`).
    pub act_order: bool,
}

impl Default for GptqConfig {
    /// 4-bit, group size 128, asymmetric, f16 scales, block 128, damping 0.01, act-order off.
    fn default() -> Self {
        GptqConfig {
            grid: GridSpec {
                bits: 4,
                group_size: Some(128),
                symmetric: false,
                f16_scales: true,
            },
            block_size: 128,
            percdamp: 0.01,
            act_order: false,
        }
    }
}

/// Why GPTQ could not run on a matrix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GptqError {
    /// `H` is not `cols × cols` or `w` is not `rows × cols`.
    #[error("GPTQ: the Hessian has {h} values but the weight has {cols} columns (needs cols² = {})", cols * cols)]
    Shape {
        /// Values in `H`.
        h: usize,
        /// Columns of the weight.
        cols: usize,
    },
    /// The damped Hessian or its inverse is not positive definite (NaN or Inf inputs, or too
    /// little damping).
    #[error("GPTQ: the damped Hessian is not positive definite; check the calibration activations for NaN/Inf or raise the damping")]
    NotPositiveDefinite,
}

/// Quantizes `w` ((rows, cols) row-major) with GPTQ given `h` ((cols, cols) row-major, the
/// symmetric `Σ xᵀx` of the layer's inputs). With act-order, the result's codes are in the
/// permuted column order and [`QuantizedMatrix::col_order`] records it.
pub fn quantize_gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    cfg: &GptqConfig,
) -> std::result::Result<QuantizedMatrix, GptqError> {
    assert_eq!(
        w.len(),
        rows * cols,
        "quantize_gptq: data is not rows × cols"
    );
    if h.len() != cols * cols {
        return Err(GptqError::Shape { h: h.len(), cols });
    }
    let mut h = Mat::from_fn(cols, cols, |i, j| h[i * cols + j]);
    // W column-major: column j is w_col[j*rows..(j+1)*rows], so column updates are contiguous.
    let mut wc = vec![0f64; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            wc[c * rows + r] = w[r * cols + c] as f64;
        }
    }
    // Step 1: dead inputs never reach the output; their weights are irrelevant.
    for i in 0..cols {
        if h[(i, i)] == 0.0 {
            h[(i, i)] = 1.0;
            wc[i * rows..(i + 1) * rows].fill(0.0);
        }
    }
    // Step 2: act-order permutation (stable, so ties keep their original order).
    let perm: Option<Vec<usize>> = cfg.act_order.then(|| {
        let mut p: Vec<usize> = (0..cols).collect();
        p.sort_by(|&a, &b| h[(b, b)].total_cmp(&h[(a, a)]));
        p
    });
    if let Some(p) = &perm {
        h = Mat::from_fn(cols, cols, |i, j| h[(p[i], p[j])]);
        let mut permuted = vec![0f64; rows * cols];
        for (j, &src) in p.iter().enumerate() {
            permuted[j * rows..(j + 1) * rows].copy_from_slice(&wc[src * rows..(src + 1) * rows]);
        }
        wc = permuted;
    }
    // Step 3: damping, λ = percdamp · mean(diag H).
    let damp = cfg.percdamp * (0..cols).map(|i| h[(i, i)]).sum::<f64>() / cols as f64;
    for i in 0..cols {
        h[(i, i)] += damp;
    }
    // Step 4: U = upper Cholesky factor of H⁻¹ (the reference: cholesky → cholesky_inverse →
    // cholesky(upper=True)).
    let hinv = h
        .llt(Side::Lower)
        .map_err(|_| GptqError::NotPositiveDefinite)?
        .inverse();
    let l = hinv
        .llt(Side::Lower)
        .map_err(|_| GptqError::NotPositiveDefinite)?
        .L()
        .to_owned();
    let u = l.transpose().to_owned();
    drop(hinv);
    drop(h);

    let spec = cfg.grid;
    let maxq = spec.maxq();
    let g = spec.group_cols(cols);
    let groups = spec.groups(cols);
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f64; rows * groups];
    let mut zeros = vec![0f64; rows * groups];
    let mut params = vec![
        GroupParams {
            scale: 1.0,
            zero: 0.0
        };
        rows
    ];
    let bs = cfg.block_size.max(1);
    let mut err = vec![0f64; rows * bs];
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + bs).min(cols);
        let count = i2 - i1;
        // The block's columns, to be updated in place (W1 in the reference). `wc` keeps the
        // block-start values, which group fitting reads, as the reference reads `W`.
        let mut w1 = wc[i1 * rows..i2 * rows].to_vec();
        for i in 0..count {
            let col = i1 + i;
            if col.is_multiple_of(g) {
                let end = (col + g).min(cols);
                for (r, p) in params.iter_mut().enumerate() {
                    *p = GroupParams::fit((col..end).map(|c| wc[c * rows + r]), &spec);
                    scales[r * groups + col / g] = p.scale;
                    zeros[r * groups + col / g] = p.zero;
                }
            }
            let d = u[(col, col)];
            let (done, rest) = w1.split_at_mut((i + 1) * rows);
            let wcol = &done[i * rows..];
            let ecol = &mut err[i * rows..(i + 1) * rows];
            for r in 0..rows {
                let q = params[r].code(wcol[r], maxq);
                codes[r * cols + col] = q;
                ecol[r] = (wcol[r] - params[r].value(q)) / d;
            }
            propagate_in_block(rest, ecol, u.as_ref(), col);
        }
        lazy_batch_update(&mut wc, &err, u.as_ref(), rows, i1, i2);
        i1 = i2;
    }
    Ok(QuantizedMatrix {
        rows,
        cols,
        spec,
        codes,
        scales,
        zeros,
        col_order: perm.map(|p| p.into_iter().map(|c| c as u32).collect()),
    })
}

/// The `gptq` codec: GPTQ of the whole fine-tuned weight (`value: finetuned`), the BitDelta
/// paper's 4-bit baseline; needs calibration statistics. Parts as [`crate::rtn::encode_grid`],
/// plus params `damp`, `block` and `act_order`.
#[derive(Debug, Clone)]
pub struct Gptq {
    /// The settings.
    pub cfg: GptqConfig,
}

/// Registry entry of [`Gptq`].
pub const INFO: CodecInfo = CodecInfo {
    name: "gptq",
    summary: "GPTQ of the whole fine-tuned weight (baseline; needs calibration data)",
    settings: &[
        Setting {
            key: "bits",
            help: "N: bits per weight, 1..=8 (default 4)",
        },
        Setting {
            key: "group",
            help: "N: columns per group with its own scale (default 128)",
        },
        Setting {
            key: "sym",
            help: "0|1: symmetric grid (default 0)",
        },
        Setting {
            key: "damp",
            help: "F: damping as a fraction of mean diag(H) (default 0.01)",
        },
        Setting {
            key: "act_order",
            help: "0|1: quantize columns by decreasing diag(H) (default 0)",
        },
    ],
    build: build_gptq,
    decode: crate::rtn::decode_grid,
};

fn build_gptq(args: &mut SpecArgs) -> Result<Box<dyn Codec>> {
    let grid = crate::rtn::grid_from_spec(args, 4, Some(128))?;
    let percdamp = args.f64_in("damp", 0.0, 10.0, true)?.unwrap_or(0.01);
    let act_order = args.switch("act_order")?.unwrap_or(false);
    Ok(Box::new(Gptq {
        cfg: GptqConfig {
            grid,
            block_size: 128,
            percdamp,
            act_order,
        },
    }))
}

impl Codec for Gptq {
    fn name(&self) -> &'static str {
        INFO.name
    }

    fn spec(&self) -> String {
        format!(
            "gptq:{},damp={},act_order={}",
            crate::rtn::grid_spec_string(&self.cfg.grid),
            self.cfg.percdamp,
            u8::from(self.cfg.act_order)
        )
    }

    fn needs_calibration(&self) -> bool {
        true
    }

    fn encode(&self, m: &MatrixInput<'_>) -> Result<Encoded> {
        let calib = m.required_calibration(INFO.name)?;
        let h: Vec<f64> = calib.gram.iter().map(|&v| f64::from(v)).collect();
        let q = quantize_gptq(m.finetuned, m.rows, m.cols, &h, &self.cfg).map_err(|e| {
            CodecError::BadOption {
                option: "--method",
                detail: format!("{}: {e}", m.name),
            }
        })?;
        Ok(
            crate::rtn::encode_grid(EncodedBuilder::new(INFO.name, m), &q)
                .param("damp", self.cfg.percdamp)
                .param("block", self.cfg.block_size)
                .param("act_order", self.cfg.act_order)
                .build(),
        )
    }
}

/// GPTQ Algorithm 1 inside a block: after quantizing column `col` with scaled error `ecol`
/// (`(w − q) / U[col, col]`), `W[:, col+1..block end] −= ecol · U[col, col+1..]`. `rest` holds the
/// block's later columns, column-major with `rows` entries each.
pub(crate) fn propagate_in_block(rest: &mut [f64], ecol: &[f64], u: MatRef<'_, f64>, col: usize) {
    for (k, next) in rest.chunks_mut(ecol.len()).enumerate() {
        let uk = u[(col, col + 1 + k)];
        if uk != 0.0 {
            for (x, e) in next.iter_mut().zip(ecol) {
                *x -= e * uk;
            }
        }
    }
}

/// GPTQ's lazy batch update once the block of columns `i1..i2` is quantized: every later column
/// `W[:, i2..] −= E · U[i1..i2, i2..]`, with `wc` column-major `rows × cols` and `err` the block's
/// scaled errors (column-major, `rows × (i2 − i1)`).
pub(crate) fn lazy_batch_update(
    wc: &mut [f64],
    err: &[f64],
    u: MatRef<'_, f64>,
    rows: usize,
    i1: usize,
    i2: usize,
) {
    let (cols, count) = (wc.len() / rows, i2 - i1);
    if i2 < cols {
        let e = MatRef::from_column_major_slice(&err[..rows * count], rows, count);
        let tail = MatMut::from_column_major_slice_mut(&mut wc[i2 * rows..], rows, cols - i2);
        faer::linalg::matmul::matmul(
            tail,
            Accum::Add,
            e,
            u.submatrix(i1, i2, count, cols - i2),
            -1.0,
            Par::rayon(0),
        );
    }
}
