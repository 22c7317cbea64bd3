//! Distillation losses and the validation metrics, written with plain candle ops so that every
//! one has a backward pass.

use candle_core::{DType, Tensor, D};

/// What the student is trained to match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistillLoss {
    /// Mean squared error between the logits, averaged over every element (batch × positions ×
    /// vocabulary): `F.mse_loss` in the BitDelta reference's `train.py`.
    Mse,
    /// KL(fine-tune ‖ student) over the vocabulary, averaged over positions.
    Kl,
}

impl std::str::FromStr for DistillLoss {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mse" => Ok(Self::Mse),
            "kl" => Ok(Self::Kl),
            other => Err(format!("--loss {other}: expected mse or kl")),
        }
    }
}

impl std::fmt::Display for DistillLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Mse => "mse",
            Self::Kl => "kl",
        })
    }
}

/// `log_softmax` over the last dimension. The max is subtracted for stability and detached: the
/// result does not depend on it, so its gradient is zero anyway (candle's `max` backward would
/// only add work).
pub fn log_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// KL(p_teacher ‖ p_student) per row: `Σ_v p_t (log p_t − log p_s)`; both `(rows, vocab)` logits.
pub fn kl_rows(teacher: &Tensor, student: &Tensor) -> candle_core::Result<Tensor> {
    let lt = log_softmax(teacher)?;
    let ls = log_softmax(student)?;
    (lt.exp()? * (lt - ls)?)?.sum(D::Minus1)
}

/// The training loss between `(rows, vocab)` logits; a scalar.
pub fn distill_loss(
    kind: DistillLoss,
    student: &Tensor,
    teacher: &Tensor,
) -> candle_core::Result<Tensor> {
    match kind {
        DistillLoss::Mse => (student - teacher)?.sqr()?.mean_all(),
        DistillLoss::Kl => kl_rows(teacher, student)?.mean_all(),
    }
}

/// Sum of `−log p(tokens[i+1] | tokens[..=i])` over a window, from its `(T, vocab)` logits; the
/// count of predictions is `T − 1`.
pub fn next_token_nll_sum(logits: &Tensor, tokens: &[u32]) -> candle_core::Result<f64> {
    let t = tokens.len();
    if t < 2 {
        return Ok(0.0);
    }
    let lp = log_softmax(&logits.narrow(0, 0, t - 1)?)?;
    let targets = Tensor::new(&tokens[1..], logits.device())?.unsqueeze(1)?;
    let picked = lp.gather(&targets, 1)?;
    Ok(-picked.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn kl_matches_hand_computation_and_is_zero_on_itself() {
        let t = Tensor::new(&[[1f64, 2., 3.], [0., 0., 0.]], &Device::Cpu).unwrap();
        let s = Tensor::new(&[[3f64, 2., 1.], [0., 0., 0.]], &Device::Cpu).unwrap();
        let kl = kl_rows(&t, &s).unwrap().to_vec1::<f64>().unwrap();
        let p: Vec<f64> = {
            let e: Vec<f64> = [1f64, 2., 3.].iter().map(|v| v.exp()).collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|v| v / z).collect()
        };
        // q is p reversed, so log p - log q = [-2, 0, 2].
        let expect = p[0] * -2.0 + p[2] * 2.0;
        assert!((kl[0] - expect).abs() < 1e-12, "{kl:?} vs {expect}");
        assert!(kl[1].abs() < 1e-15);
        let zero = kl_rows(&t, &t)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(zero.abs() < 1e-15);
    }

    #[test]
    fn mse_is_the_mean_over_every_element() {
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1f32, 0.], [0., 4.]], &Device::Cpu).unwrap();
        let l = distill_loss(DistillLoss::Mse, &a, &b)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(l, (4.0 + 9.0) / 4.0);
    }

    #[test]
    fn nll_picks_the_next_token() {
        // Uniform over 4 tokens: every prediction costs ln 4.
        let logits = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        let nll = next_token_nll_sum(&logits, &[0, 1, 2]).unwrap();
        assert!((nll - 2.0 * 4f64.ln()).abs() < 1e-6);
    }
}
