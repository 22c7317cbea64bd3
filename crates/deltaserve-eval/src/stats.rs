//! Per-position statistics of next-token distributions: log-normaliser, negative log-likelihood,
//! KL divergence and top-1 token.
//!
//! Logits arrive in f32 (as `Model::forward` returns them, and as transformers' loss upcasts
//! them); differences `x - max` are taken in f32, exponentials and sums in f64, so the only f32
//! rounding is the one transformers' own f32 loss has too.

use candle_core::{DType, Device, Tensor};

use crate::error::{EvalError, Result};

/// One row of logits, summarised.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowNorm {
    /// log Σ exp(logit), i.e. log-softmax(x)_i = x_i − lse.
    pub lse: f64,
    /// Index of the largest logit (the first one on ties).
    pub argmax: usize,
}

/// Log-sum-exp and argmax of one logits row.
pub(crate) fn row_norm(row: &[f32]) -> RowNorm {
    let mut max = f32::NEG_INFINITY;
    let mut argmax = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > max {
            max = x;
            argmax = i;
        }
    }
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    RowNorm {
        lse: max as f64 + sum.ln(),
        argmax,
    }
}

/// −log p(target) from a row and its normaliser.
pub(crate) fn nll(row: &[f32], norm: RowNorm, target: usize) -> f64 {
    norm.lse - row[target] as f64
}

/// KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) between two rows' softmaxes, in f64.
///
/// For `q == p` every term is exactly zero, so a model's KL to itself is exactly 0.
pub(crate) fn kl(p_row: &[f32], p_norm: RowNorm, q_row: &[f32], q_norm: RowNorm) -> f64 {
    p_row
        .iter()
        .zip(q_row)
        .map(|(&a, &b)| {
            let lp = a as f64 - p_norm.lse;
            let lq = b as f64 - q_norm.lse;
            if lp == f64::NEG_INFINITY {
                0.0
            } else {
                lp.exp() * (lp - lq)
            }
        })
        .sum()
}

/// Selected rows of a (T, vocab) logits tensor, in host memory as f32, row-major.
pub(crate) struct HostRows {
    pub data: Vec<f32>,
    pub vocab: usize,
}

impl HostRows {
    /// Copies `rows` (indices into the first dimension) of `logits` to the host.
    pub fn gather(logits: &Tensor, rows: &[usize]) -> Result<HostRows> {
        let (t, vocab) = logits.dims2()?;
        if let Some(&bad) = rows.iter().find(|&&r| r >= t) {
            return Err(EvalError::Input(format!(
                "row {bad} asked of logits with {t} rows. This is a bug."
            )));
        }
        let picked = if rows.len() == t && rows.iter().enumerate().all(|(i, &r)| i == r) {
            logits.clone()
        } else if let (Some(&first), true) =
            (rows.first(), rows.windows(2).all(|w| w[1] == w[0] + 1))
        {
            logits.narrow(0, first, rows.len())?
        } else {
            let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            logits.index_select(&Tensor::new(idx.as_slice(), logits.device())?, 0)?
        };
        let data = picked
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(HostRows { data, vocab })
    }

    /// Row `i` of the gathered rows.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// How many rows were gathered.
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.vocab).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_norm_matches_f64_log_softmax() {
        let row = [1.0f32, -2.0, 3.5, 0.25];
        let n = row_norm(&row);
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        assert!((n.lse - lse).abs() < 1e-12);
        assert_eq!(n.argmax, 2);
        assert!((nll(&row, n, 1) - (lse + 2.0)).abs() < 1e-12);
    }

    #[test]
    fn kl_is_zero_to_itself_and_positive_otherwise() {
        let p = [0.3f32, 1.0, -0.7, 2.0];
        let q = [0.0f32, 0.0, 0.0, 0.0];
        let (np, nq) = (row_norm(&p), row_norm(&q));
        assert_eq!(kl(&p, np, &p, np), 0.0);
        let probs: Vec<f64> = p.iter().map(|&x| (x as f64 - np.lse).exp()).collect();
        let expect: f64 = probs.iter().map(|&pp| pp * (pp.ln() - 0.25f64.ln())).sum();
        assert!((kl(&p, np, &q, nq) - expect).abs() < 1e-12);
        assert!(expect > 0.0);
    }
}
