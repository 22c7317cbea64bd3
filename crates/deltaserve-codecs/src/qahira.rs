//! Block-wise asymmetric quantization whose blocks match QA-HiRA's adapter (arXiv 2407.17029,
//! §3.3), and the fold of a trained QA-HiRA adapter into it.
//!
//! A weight `(rows, cols)` is cut into `block_rows × block_cols` tiles; each tile stores `bits`-bit
//! codes `c` and one (scale, offset) pair, `w ≈ scale · c + offset` (min-max round-to-nearest,
//! the INT-with-zero-point format QA-LoRA folds into). A QA-HiRA adapter with groups
//! `g_o = block_rows`, `g_i = block_cols` changes the weight by a value that is constant on each
//! tile (`deltaserve_train::adapters`), so adding it to the tile's offset reproduces
//! `dequantize(Q) + ΔW` exactly up to f32 rounding of one addition: the fine-tuned model is again
//! a quantized model, with no adapter left at inference.
//!
//! Why not NormalFloat: NF stores `absmax · level[c]` with no offset, so a constant shift of a
//! block is not representable and the adapter could only be absorbed by re-quantizing (lossy).

use crate::error::{CodecError, Result};

/// A block-quantized matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockQuantized {
    /// Rows (`out_features`).
    pub rows: usize,
    /// Columns (`in_features`).
    pub cols: usize,
    /// Rows per block (QA-HiRA's `g_o`).
    pub block_rows: usize,
    /// Columns per block (QA-HiRA's `g_i`).
    pub block_cols: usize,
    /// Bits per code, 1..=8.
    pub bits: u8,
    /// One code per weight, row-major.
    pub codes: Vec<u8>,
    /// One scale per block, blocks row-major (`rows/block_rows` × `cols/block_cols`).
    pub scales: Vec<f32>,
    /// One offset per block.
    pub offsets: Vec<f32>,
}

fn bad(detail: String) -> CodecError {
    CodecError::BadOption {
        option: "qahira",
        detail,
    }
}

impl BlockQuantized {
    /// Blocks per row of blocks.
    pub fn blocks_per_row(&self) -> usize {
        self.cols / self.block_cols
    }

    fn block_of(&self, r: usize, c: usize) -> usize {
        (r / self.block_rows) * self.blocks_per_row() + c / self.block_cols
    }

    /// Quantizes `w` (row-major `rows × cols`) with min-max round-to-nearest per block:
    /// `scale = (max − min) / (2^bits − 1)`, `offset = min`, `c = round((w − min) / scale)`.
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        bits: u8,
        block_rows: usize,
        block_cols: usize,
    ) -> Result<Self> {
        if !(1..=8).contains(&bits) {
            return Err(bad(format!("{bits} bits: expected 1 to 8")));
        }
        if block_rows == 0
            || block_cols == 0
            || !rows.is_multiple_of(block_rows)
            || !cols.is_multiple_of(block_cols)
        {
            return Err(bad(format!(
                "a [{rows}, {cols}] matrix does not divide into {block_rows}x{block_cols} blocks"
            )));
        }
        if w.len() != rows * cols {
            return Err(bad(format!(
                "{} values for a [{rows}, {cols}] matrix",
                w.len()
            )));
        }
        let mut q = Self {
            rows,
            cols,
            block_rows,
            block_cols,
            bits,
            codes: vec![0; rows * cols],
            scales: Vec::new(),
            offsets: Vec::new(),
        };
        let levels = ((1u32 << bits) - 1) as f32;
        let nb = (rows / block_rows) * (cols / block_cols);
        let (mut lo, mut hi) = (vec![f32::INFINITY; nb], vec![f32::NEG_INFINITY; nb]);
        for r in 0..rows {
            for c in 0..cols {
                let b = q.block_of(r, c);
                let x = w[r * cols + c];
                if !x.is_finite() {
                    return Err(bad(format!("value {x} at [{r}, {c}]")));
                }
                lo[b] = lo[b].min(x);
                hi[b] = hi[b].max(x);
            }
        }
        q.scales = lo
            .iter()
            .zip(&hi)
            .map(|(l, h)| if h > l { (h - l) / levels } else { 1.0 })
            .collect();
        q.offsets = lo;
        for r in 0..rows {
            for c in 0..cols {
                let b = q.block_of(r, c);
                let code = ((w[r * cols + c] - q.offsets[b]) / q.scales[b]).round();
                q.codes[r * cols + c] = code.clamp(0.0, levels) as u8;
            }
        }
        Ok(q)
    }

    /// `scale · c + offset` for every weight, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for c in 0..self.cols {
                let b = self.block_of(r, c);
                out[r * self.cols + c] =
                    self.scales[b] * f32::from(self.codes[r * self.cols + c]) + self.offsets[b];
            }
        }
        out
    }

    /// Folds a block-constant difference `delta` (row-major, e.g. a QA-HiRA adapter's `up·down`)
    /// into the offsets: afterwards `dequantize()` is the old one plus `delta`. Fails, naming
    /// the block, where `delta` varies inside a block by more than `tolerance` (an adapter whose
    /// groups do not match the blocks).
    pub fn fold(&mut self, delta: &[f32], tolerance: f32) -> Result<()> {
        if delta.len() != self.rows * self.cols {
            return Err(bad(format!(
                "a difference of {} values for a [{}, {}] matrix",
                delta.len(),
                self.rows,
                self.cols
            )));
        }
        let nb = self.scales.len();
        let mut value = vec![f32::NAN; nb];
        for r in 0..self.rows {
            for c in 0..self.cols {
                let b = self.block_of(r, c);
                let d = delta[r * self.cols + c];
                if value[b].is_nan() {
                    value[b] = d;
                } else if (d - value[b]).abs() > tolerance {
                    return Err(bad(format!(
                        "the difference is not constant on the {}x{} block at [{}, {}] ({} vs {}); \
                         the adapter's --hira-groups must equal the quantization block",
                        self.block_rows,
                        self.block_cols,
                        r - r % self.block_rows,
                        c - c % self.block_cols,
                        value[b],
                        d
                    )));
                }
            }
        }
        for (o, v) in self.offsets.iter_mut().zip(value) {
            *o += v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i as f32) * 0.713).sin() * 0.1)
            .collect()
    }

    #[test]
    fn quantization_error_is_at_most_half_a_step() {
        let (rows, cols) = (16, 12);
        let w = matrix(rows, cols);
        let q = BlockQuantized::quantize(&w, rows, cols, 4, 8, 4).unwrap();
        let d = q.dequantize();
        for r in 0..rows {
            for c in 0..cols {
                let b = (r / 8) * 3 + c / 4;
                let err = (d[r * cols + c] - w[r * cols + c]).abs();
                assert!(err <= 0.5 * q.scales[b] * (1.0 + 1e-5), "[{r},{c}] {err}");
            }
        }
    }

    #[test]
    fn folding_a_block_constant_difference_adds_it_exactly() {
        let (rows, cols) = (16, 12);
        let w = matrix(rows, cols);
        let mut q = BlockQuantized::quantize(&w, rows, cols, 3, 8, 4).unwrap();
        let before = q.dequantize();
        let delta: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                ((r / 8) as f32 - 0.5) * 0.01 + (c / 4) as f32 * 0.003
            })
            .collect();
        let codes = q.codes.clone();
        q.fold(&delta, 0.0).unwrap();
        assert_eq!(q.codes, codes, "codes are untouched");
        let after = q.dequantize();
        for i in 0..rows * cols {
            // One extra f32 addition per weight: |error| ≤ 2 ulp of the magnitude.
            let expect = f64::from(before[i]) + f64::from(delta[i]);
            assert!(
                (f64::from(after[i]) - expect).abs() <= 2.0 * f64::from(f32::EPSILON) * 0.2,
                "{i}: {} vs {expect}",
                after[i]
            );
        }
    }

    #[test]
    fn a_difference_that_varies_inside_a_block_is_refused() {
        let w = matrix(8, 8);
        let mut q = BlockQuantized::quantize(&w, 8, 8, 4, 4, 4).unwrap();
        let mut delta = vec![0f32; 64];
        delta[1] = 0.5;
        let e = q.fold(&delta, 1e-6).unwrap_err().to_string();
        assert!(e.contains("not constant") && e.contains("[0, 0]"), "{e}");
        assert!(BlockQuantized::quantize(&w, 8, 8, 4, 3, 4)
            .unwrap_err()
            .to_string()
            .contains("3x4"));
        assert!(BlockQuantized::quantize(&w, 8, 8, 9, 4, 4).is_err());
    }
}
