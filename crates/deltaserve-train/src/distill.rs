//! Scale distillation (BitDelta, arXiv 2402.10193, §3.2): keep the sign bits, train the scales so
//! that base + compressed delta reproduces the fine-tune's logits.
//!
//! Defaults follow the reference implementation (FasterDecoding/BitDelta `bitdelta/train.py` with
//! `utils.py`'s arguments and `scripts/train_example.bash`): loss `F.mse_loss` between the logits
//! (mean over every element), `torch.optim.AdamW(lr=1e-4)` with torch's defaults (betas 0.9/0.999,
//! eps 1e-8, weight decay 0.01, applied to the scales too), `CosineAnnealingLR(T_max=steps)`
//! stepped after every optimizer step, batch size 4, 128 tokens, 200 steps.
//!
//! Each step runs the teacher (the fine-tune, a plain [`Model`]) on the batch first, without a
//! graph, and only then the student (base [`Model`] + the packed delta as [`TenantWeights`], with
//! `ForwardOptions { differentiable: true }`), so that the two models' activations are never alive
//! together. The student is never expanded to a dense copy of the fine-tune.

use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use deltaserve_model::{ForwardOptions, Model, TenantWeights};

use crate::error::{Result, TrainError};
use crate::loss::{distill_loss, kl_rows, next_token_nll_sum, DistillLoss};
use crate::student::TrainableDelta;

/// The training settings. `Default` is the reference's.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DistillConfig {
    /// Optimizer steps (one batch each).
    pub steps: usize,
    /// Windows per batch.
    pub batch_size: usize,
    /// Peak learning rate (the cosine schedule starts here).
    pub lr: f64,
    /// The loss.
    pub loss: DistillLoss,
    /// Also train the tensors the delta stores in full (embeddings, norms, `lm_head`).
    pub train_uncompressed: bool,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_size: 4,
            lr: 1e-4,
            loss: DistillLoss::Mse,
            train_uncompressed: false,
            // torch.optim.AdamW defaults.
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// torch's `CosineAnnealingLR` with `eta_min = 0`: the learning rate of 0-based step `step` of
/// `total`, `lr/2 · (1 + cos(π · step / total))`.
pub fn cosine_lr(lr: f64, step: usize, total: usize) -> f64 {
    lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total.max(1) as f64).cos())
}

/// What one training step reports.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// 1-based step.
    pub step: usize,
    /// The batch's loss before the update.
    pub loss: f64,
    /// The learning rate the update used.
    pub lr: f64,
}

/// Runs scale distillation of one delta.
pub struct ScaleDistiller<'a> {
    base: &'a Model,
    teacher: &'a Model,
    student: TrainableDelta,
    opt: AdamW,
    cfg: DistillConfig,
    step: usize,
}

/// Runs `model` (with `tenant`) on windows and returns their logits stacked as (rows, vocab).
fn logits(
    model: &Model,
    tenant: Option<&TenantWeights>,
    windows: &[Vec<u32>],
    opts: ForwardOptions,
) -> Result<Tensor> {
    let windows: Vec<&[u32]> = windows.iter().map(|w| w.as_slice()).collect();
    let out = model.window_logits(&windows, tenant, opts)?;
    Ok(Tensor::cat(&out, 0)?)
}

impl<'a> ScaleDistiller<'a> {
    /// Sets up training of `student` on top of `base` towards `teacher`.
    pub fn new(
        base: &'a Model,
        teacher: &'a Model,
        student: TrainableDelta,
        cfg: DistillConfig,
    ) -> Result<Self> {
        if cfg.steps == 0 || cfg.batch_size == 0 {
            return Err(TrainError::Setting(format!(
                "--steps {} --batch-size {}: both must be at least 1",
                cfg.steps, cfg.batch_size
            )));
        }
        if cfg.lr.is_nan() || cfg.lr < 0.0 {
            return Err(TrainError::Setting(format!(
                "--lr {}: must be a number >= 0",
                cfg.lr
            )));
        }
        let params = ParamsAdamW {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        };
        let opt = AdamW::new(student.trainable_vars(), params)?;
        Ok(Self {
            base,
            teacher,
            student,
            opt,
            cfg,
            step: 0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &DistillConfig {
        &self.cfg
    }

    /// The parameters being trained.
    pub fn student(&self) -> &TrainableDelta {
        &self.student
    }

    /// Gives the trained parameters back.
    pub fn into_student(self) -> TrainableDelta {
        self.student
    }

    /// The `Var`s the optimizer updates.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.student.trainable_vars()
    }

    /// The teacher's logits for a batch, (rows, vocab), without a graph.
    pub fn teacher_logits(&self, windows: &[Vec<u32>]) -> Result<Tensor> {
        Ok(logits(self.teacher, None, windows, ForwardOptions::default())?.detach())
    }

    /// The distillation loss of a batch, with a graph reaching every trainable `Var`.
    pub fn loss(&self, windows: &[Vec<u32>]) -> Result<Tensor> {
        let target = self.teacher_logits(windows)?;
        let tenant = self.student.tenant(true)?;
        let student = logits(
            self.base,
            Some(&tenant),
            windows,
            ForwardOptions {
                differentiable: true,
            },
        )?;
        Ok(distill_loss(self.cfg.loss, &student, &target)?)
    }

    /// One optimizer step on a batch; returns the loss before the update. Fails, naming the
    /// step, when the loss is not finite.
    pub fn step(&mut self, windows: &[Vec<u32>]) -> Result<StepReport> {
        let lr = cosine_lr(self.cfg.lr, self.step, self.cfg.steps);
        self.step += 1;
        let loss = self.loss(windows)?;
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(TrainError::NonFinite {
                what: "the loss".into(),
                value,
                step: self.step,
                steps: self.cfg.steps,
            });
        }
        let grads = loss.backward()?;
        self.opt.set_learning_rate(lr);
        self.opt.step(&grads)?;
        Ok(StepReport {
            step: self.step,
            loss: value,
            lr,
        })
    }

    /// Runs every batch (one step each) and returns the losses. `on_step` sees each step's report
    /// (for a progress bar). After the last step, the parameters are checked to be finite.
    pub fn train(
        &mut self,
        batches: &[Vec<Vec<u32>>],
        mut on_step: impl FnMut(&StepReport),
    ) -> Result<Vec<f64>> {
        let mut losses = Vec::with_capacity(batches.len());
        for batch in batches {
            let r = self.step(batch)?;
            losses.push(r.loss);
            on_step(&r);
        }
        TrainError::check_finite(self.student.first_non_finite()?, self.step, self.cfg.steps)?;
        Ok(losses)
    }
}

/// One model evaluated on the held-out windows.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalRow {
    /// "base", "fine-tune", "delta (before)", ...
    pub model: String,
    /// exp(mean next-token NLL).
    pub ppl: f64,
    /// Mean over positions of KL(fine-tune ‖ model), in nats.
    pub kl: f64,
    /// Next-token predictions scored.
    pub predictions: usize,
}

/// A model to evaluate: base weights plus an optional tenant.
pub struct Candidate<'a> {
    /// The name in the table.
    pub name: String,
    /// The weights.
    pub model: &'a Model,
    /// The delta applied, if any.
    pub tenant: Option<&'a TenantWeights>,
}

/// Validation perplexity and mean KL(teacher ‖ candidate) of each candidate on `windows`, in
/// batches of `batch_size`. The teacher runs once per batch. Where a candidate's vocabulary is
/// smaller than the teacher's (a base without the fine-tune's added tokens), KL is taken over the
/// shared part of the vocabulary.
pub fn evaluate(
    teacher: &Model,
    candidates: &[Candidate<'_>],
    windows: &[Vec<u32>],
    batch_size: usize,
) -> Result<Vec<EvalRow>> {
    let mut nll = vec![0f64; candidates.len()];
    let mut kl = vec![0f64; candidates.len()];
    let mut predictions = 0usize;
    let mut positions = 0usize;
    let opts = ForwardOptions::default();
    for batch in windows.chunks(batch_size.max(1)) {
        let seqs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        let target = teacher.window_logits(&seqs, None, opts)?;
        for (i, c) in candidates.iter().enumerate() {
            let out = c.model.window_logits(&seqs, c.tenant, opts)?;
            for ((w, l), t) in batch.iter().zip(&out).zip(&target) {
                nll[i] += next_token_nll_sum(l, w)?;
                let v = l.dim(1)?.min(t.dim(1)?);
                let rows = kl_rows(&t.narrow(1, 0, v)?, &l.narrow(1, 0, v)?)?;
                kl[i] += rows
                    .to_dtype(candle_core::DType::F64)?
                    .sum_all()?
                    .to_scalar::<f64>()?;
            }
        }
        predictions += batch.iter().map(|w| w.len() - 1).sum::<usize>();
        positions += batch.iter().map(Vec::len).sum::<usize>();
    }
    Ok(candidates
        .iter()
        .enumerate()
        .map(|(i, c)| EvalRow {
            model: c.name.clone(),
            ppl: (nll[i] / predictions.max(1) as f64).exp(),
            kl: kl[i] / positions.max(1) as f64,
            predictions,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_matches_torch() {
        // torch CosineAnnealingLR(T_max=200) from lr 1e-4: step 0 at the peak, step 100 at half,
        // the last step (199) just above 0.
        assert_eq!(cosine_lr(1e-4, 0, 200), 1e-4);
        assert!((cosine_lr(1e-4, 100, 200) - 5e-5).abs() < 1e-18);
        let last = cosine_lr(1e-4, 199, 200);
        assert!(last > 0.0 && last < 1e-8, "{last}");
    }
}
