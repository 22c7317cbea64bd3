//! Adapter fine-tuning on a frozen base: what `deltaserve finetune` runs.
//!
//! The loss is the causal-LM negative log-likelihood of the scored tokens (every token of plain
//! text; only the assistant's tokens of chat records, as `deltaserve-eval` marks them and as the
//! demo fine-tunes were trained), averaged over all scored tokens of an optimizer step, so the
//! gradient of a step does not depend on how `--batch` × `--accum` splits it. AdamW (torch's
//! update, written here so its moments can be checkpointed) with a cosine schedule.
//!
//! Memory: by default each micro-batch's gradient is computed with gradient checkpointing per
//! decoder layer and the LM head + cross-entropy in blocks of rows
//! ([`Finetuner::set_checkpoint_layers`], [`Finetuner::set_loss_chunk`]), so the autograd graph
//! holds one layer at a time; the gradients equal the one-graph backward's (tested).
//!
//! Examples are drawn in epochs, each a permutation seeded by `(seed, epoch)`, so the examples of
//! step `k` are a function of `k`: a run stopped after a checkpoint and resumed (`--resume`)
//! continues bit for bit as if it had not stopped (tested in `tests/finetune.rs`). Checkpoints
//! hold the adapter, both AdamW moments, the step and the settings, in one safetensors file
//! written atomically (`deltaserve_format::write_atomic`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use deltaserve_eval::EvalSequence;
use deltaserve_format::Dtype;
use deltaserve_model::{ForwardOptions, Model, TenantWeights};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::distill::{cosine_lr, StepReport};
use crate::error::{Result, TrainError};
use crate::job::Progress;
use crate::lora::AdapterSet;
use crate::loss::log_softmax;
use crate::student::tensor_le_bytes;

/// Training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch (one forward/backward).
    pub batch: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub accum: usize,
    /// Peak learning rate (cosine-annealed to 0 over `steps`).
    pub lr: f64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Seed of the example order (and of the adapter's initialisation).
    pub seed: u64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            batch: 8,
            accum: 1,
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            seed: 0,
        }
    }
}

impl FinetuneConfig {
    /// Checks the ranges.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Setting(m));
        if self.steps == 0 || self.batch == 0 || self.accum == 0 {
            return bad(format!(
                "--steps {} --batch {} --accum {}: each must be at least 1",
                self.steps, self.batch, self.accum
            ));
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("--lr {}: must be a number >= 0", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "--weight-decay {}: must be a number >= 0",
                self.weight_decay
            ));
        }
        Ok(())
    }
}

/// AdamW exactly as `torch.optim.AdamW` (decoupled decay, bias-corrected moments), with state
/// that can be saved and restored.
///
/// The update is computed once for all variables together, on their values and gradients
/// concatenated into one vector (torch's `foreach`/`fused` AdamW does the same for speed): a
/// LoRA on a 7B model has 448 tensors, and one small update per tensor cost sixteen kernel
/// launches each. The moments are kept concatenated in variable order.
#[derive(Debug)]
pub struct AdamW {
    /// First moments of all variables, flattened and concatenated in variable order.
    m: Tensor,
    /// Second moments, likewise.
    v: Tensor,
    /// `(offset, shape)` of each variable in the concatenation.
    slots: Vec<(usize, Vec<usize>)>,
    /// Updates done.
    pub t: usize,
}

impl AdamW {
    /// Zero moments for `vars` (at least one).
    pub fn new(vars: &[Var]) -> Result<Self> {
        let first = vars
            .first()
            .ok_or_else(|| TrainError::Setting("AdamW: no variables to train".into()))?;
        let mut slots = Vec::with_capacity(vars.len());
        let mut n = 0;
        for v in vars {
            slots.push((n, v.dims().to_vec()));
            n += v.elem_count();
        }
        let z = Tensor::zeros(n, first.dtype(), first.device())?;
        Ok(Self {
            m: z.clone(),
            v: z,
            slots,
            t: 0,
        })
    }

    /// Variable `i`'s `(m, v)`, shaped like the variable.
    pub fn moments(&self, i: usize) -> Result<(Tensor, Tensor)> {
        let (off, shape) = &self.slots[i];
        let n: usize = shape.iter().product();
        Ok((
            self.m.narrow(0, *off, n)?.reshape(shape.as_slice())?,
            self.v.narrow(0, *off, n)?.reshape(shape.as_slice())?,
        ))
    }

    /// Replaces all moments, one `(m, v)` per variable in order (a restored checkpoint).
    pub fn set_moments(&mut self, m: &[Tensor], v: &[Tensor]) -> Result<()> {
        self.m = flat_cat(m)?;
        self.v = flat_cat(v)?;
        Ok(())
    }

    /// One update of `vars` with gradients `grads` at learning rate `lr`.
    pub fn step(
        &mut self,
        vars: &[Var],
        grads: &[Tensor],
        lr: f64,
        cfg: &FinetuneConfig,
    ) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - cfg.beta1.powi(self.t as i32);
        let bc2 = 1.0 - cfg.beta2.powi(self.t as i32);
        let g = flat_cat(grads)?;
        let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let p = flat_cat(&params)?;
        let m = ((&self.m * cfg.beta1)? + (&g * (1.0 - cfg.beta1))?)?;
        let v = ((&self.v * cfg.beta2)? + (g.sqr()? * (1.0 - cfg.beta2))?)?;
        let decayed = (p * (1.0 - lr * cfg.weight_decay))?;
        let denom = ((&v / bc2)?.sqrt()? + cfg.eps)?;
        let update = ((&m / bc1)? / denom)?;
        let p = (decayed - (update * lr)?)?;
        for (var, (off, shape)) in vars.iter().zip(&self.slots) {
            var.set(
                &p.narrow(0, *off, var.elem_count())?
                    .reshape(shape.as_slice())?,
            )?;
        }
        self.m = m;
        self.v = v;
        Ok(())
    }
}

/// The tensors flattened and concatenated.
fn flat_cat(ts: &[Tensor]) -> Result<Tensor> {
    let flat: Vec<Tensor> = ts
        .iter()
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&flat, 0)?)
}

/// Sum over the scored targets of `−log p(token)` for one sequence, from its `(T, vocab)`
/// logits, as a graph-carrying scalar; and the number of scored targets.
pub fn masked_nll(logits: &Tensor, seq: &EvalSequence) -> Result<(Tensor, usize)> {
    let t = seq.tokens.len();
    let weights: Vec<f32> = seq.scored[1..]
        .iter()
        .map(|&s| if s { 1.0 } else { 0.0 })
        .collect();
    let n = weights.iter().filter(|&&w| w > 0.0).count();
    let lp = log_softmax(&logits.narrow(0, 0, t - 1)?)?;
    let targets = Tensor::new(&seq.tokens[1..], logits.device())?.unsqueeze(1)?;
    let picked = lp.gather(&targets, 1)?.squeeze(1)?;
    let w = Tensor::from_vec(weights, t - 1, logits.device())?.to_dtype(picked.dtype())?;
    Ok(((picked * w)?.sum_all()?.neg()?, n))
}

/// Runs `model` + `tenant` on `seqs` and returns (summed NLL of the scored targets as a scalar
/// tensor, targets).
pub fn batch_nll(
    model: &Model,
    tenant: Option<&TenantWeights>,
    seqs: &[&EvalSequence],
    opts: ForwardOptions,
) -> Result<(Tensor, usize)> {
    let windows: Vec<&[u32]> = seqs.iter().map(|s| s.tokens.as_slice()).collect();
    let logits = model.window_logits(&windows, tenant, opts)?;
    let mut total: Option<Tensor> = None;
    let mut n = 0;
    for (l, s) in logits.iter().zip(seqs) {
        let (nll, k) = masked_nll(l, s)?;
        n += k;
        total = Some(match total {
            None => nll,
            Some(t) => (t + nll)?,
        });
    }
    let total = total.ok_or_else(|| TrainError::Setting("an empty batch".into()))?;
    Ok((total, n))
}

/// Perplexity of `model` (+ `tenant`) over the scored targets of `seqs`: exp(Σ NLL / targets),
/// sequences in batches of `batch`.
pub fn perplexity(
    model: &Model,
    tenant: Option<&TenantWeights>,
    seqs: &[EvalSequence],
    batch: usize,
) -> Result<f64> {
    let mut nll = 0f64;
    let mut n = 0usize;
    let refs: Vec<&EvalSequence> = seqs.iter().collect();
    for chunk in refs.chunks(batch.max(1)) {
        let (s, k) = batch_nll(model, tenant, chunk, ForwardOptions::default())?;
        nll += s.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        n += k;
    }
    Ok((nll / n.max(1) as f64).exp())
}

/// Seconds spent in each phase of the training steps (`--profile`), measured with a device
/// synchronisation at every phase boundary, so each phase's device work is inside its time (the
/// synchronisations themselves cost a little).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseSeconds {
    /// Forward passes: the graph-free pass through the layers when checkpointing, the whole
    /// graph-building forward otherwise.
    pub forward: f64,
    /// LM head, cross-entropy and their backward, block by block (checkpointing only).
    pub loss: f64,
    /// Backward passes: per-layer recompute plus backward when checkpointing.
    pub backward: f64,
    /// AdamW updates.
    pub optimizer: f64,
}

/// Times phases when `--profile` asks; a no-op otherwise.
struct PhaseTimer<'d> {
    device: Option<&'d Device>,
    at: Instant,
}

impl<'d> PhaseTimer<'d> {
    fn new(device: &'d Device, on: bool) -> Self {
        Self {
            device: on.then_some(device),
            at: Instant::now(),
        }
    }

    /// Adds the seconds since the last call to `slot` (after the device finished its work).
    fn lap(&mut self, slot: &mut f64) -> Result<()> {
        if let Some(d) = self.device {
            d.synchronize()?;
            let now = Instant::now();
            *slot += (now - self.at).as_secs_f64();
            self.at = now;
        }
        Ok(())
    }
}

/// What a checkpoint records besides the tensors, checked on `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps done.
    pub step: usize,
    /// The training settings (must match on resume).
    pub config: FinetuneConfig,
    /// The adapter settings (must match on resume).
    pub spec: crate::adapters::AdapterSpec,
    /// Number of training sequences and their total tokens (must match on resume).
    pub data: (usize, usize),
}

const STATE_KEY: &str = "deltaserve_finetune";

/// Rows per block of the chunked LM head + cross-entropy: with a 32,000-token vocabulary a block
/// of 512 rows is 66 MB of f32 logits (the whole batch of 4 × 512 would be 262 MB, and the
/// log-softmax keeps several such tensors plus their gradients).
pub const DEFAULT_LOSS_CHUNK: usize = 512;

/// Adapter fine-tuning of one model.
pub struct Finetuner<'a> {
    model: &'a Model,
    adapters: AdapterSet,
    opt: AdamW,
    cfg: FinetuneConfig,
    examples: Vec<EvalSequence>,
    step: usize,
    order: (usize, Vec<usize>),
    checkpoint_layers: bool,
    loss_chunk: usize,
    profile: Option<std::cell::RefCell<PhaseSeconds>>,
}

impl<'a> Finetuner<'a> {
    /// Sets up training of `adapters` on `model` over `examples` (each with at least one scored
    /// target).
    pub fn new(
        model: &'a Model,
        adapters: AdapterSet,
        examples: Vec<EvalSequence>,
        cfg: FinetuneConfig,
    ) -> Result<Self> {
        cfg.check()?;
        let examples: Vec<EvalSequence> = examples
            .into_iter()
            .filter(|e| e.tokens.len() >= 2 && e.scored_targets() > 0)
            .collect();
        if examples.is_empty() {
            return Err(TrainError::NoData {
                what: "no training sequence has a token to learn (chat records need an assistant turn)".into(),
            });
        }
        let opt = AdamW::new(&adapters.vars())?;
        Ok(Self {
            model,
            adapters,
            opt,
            cfg,
            examples,
            step: 0,
            order: (usize::MAX, Vec::new()),
            checkpoint_layers: true,
            loss_chunk: DEFAULT_LOSS_CHUNK,
            profile: None,
        })
    }

    /// Steps done.
    pub fn step_index(&self) -> usize {
        self.step
    }

    /// The settings.
    pub fn config(&self) -> &FinetuneConfig {
        &self.cfg
    }

    /// The adapters being trained.
    pub fn adapters(&self) -> &AdapterSet {
        &self.adapters
    }

    /// Gives the adapters back.
    pub fn into_adapters(self) -> AdapterSet {
        self.adapters
    }

    /// Training sequences.
    pub fn examples(&self) -> &[EvalSequence] {
        &self.examples
    }

    /// The example index at global slot `g` (slot = step · batch · accum + position).
    fn example_at(&mut self, g: usize) -> usize {
        let n = self.examples.len();
        let epoch = g / n;
        if self.order.0 != epoch {
            let mut perm: Vec<usize> = (0..n).collect();
            let mut rng = StdRng::seed_from_u64(
                self.cfg.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            perm.shuffle(&mut rng);
            self.order = (epoch, perm);
        }
        self.order.1[g % n]
    }

    /// The example indices of the micro-batches of 0-based step `step`.
    pub fn step_examples(&mut self, step: usize) -> Vec<Vec<usize>> {
        let (b, a) = (self.cfg.batch, self.cfg.accum);
        (0..a)
            .map(|j| {
                (0..b)
                    .map(|i| self.example_at(step * a * b + j * b + i))
                    .collect()
            })
            .collect()
    }

    /// The loss of a set of micro-batches (mean NLL over all their scored targets) and its
    /// gradient for every trainable variable, accumulated over the micro-batches.
    pub fn loss_and_grads(&self, micro: &[Vec<usize>]) -> Result<(f64, Vec<Tensor>)> {
        let vars = self.adapters.vars();
        let total: usize = micro
            .iter()
            .flatten()
            .map(|&i| self.examples[i].scored_targets())
            .sum();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss = 0f64;
        let opts = ForwardOptions {
            differentiable: true,
        };
        for mb in micro {
            let seqs: Vec<&EvalSequence> = mb.iter().map(|&i| &self.examples[i]).collect();
            if self.checkpoint_layers {
                loss += self.micro_batch_checkpointed(&seqs, total, &vars, &mut grads)?;
                continue;
            }
            let mut timer = self.timer();
            let tenant = self.adapters.tenant(true)?;
            let (nll, _) = batch_nll(self.model, Some(&tenant), &seqs, opts)?;
            let l = (nll / total as f64)?;
            loss += l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            self.lap(&mut timer, |p| &mut p.forward)?;
            let store = l.backward()?;
            for (acc, v) in grads.iter_mut().zip(&vars) {
                if let Some(g) = store.get(v.as_tensor()) {
                    *acc = Some(match acc.take() {
                        None => g.clone(),
                        Some(a) => (a + g)?,
                    });
                }
            }
            self.lap(&mut timer, |p| &mut p.backward)?;
        }
        let grads = grads
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((loss, grads))
    }

    /// Whether [`Finetuner::loss_and_grads`] uses gradient checkpointing per decoder layer (on
    /// by default): see [`Finetuner::micro_batch_checkpointed`].
    pub fn set_checkpoint_layers(&mut self, on: bool) {
        self.checkpoint_layers = on;
    }

    /// Rows (tokens) per block of the LM head and cross-entropy in a checkpointed pass (0: all
    /// rows at once); see [`Finetuner::micro_batch_checkpointed`].
    pub fn set_loss_chunk(&mut self, rows: usize) {
        self.loss_chunk = rows;
    }

    /// Times the phases of every step from now on (see [`PhaseSeconds`]).
    pub fn set_profile(&mut self, on: bool) {
        self.profile = on.then(Default::default);
    }

    /// The phase times so far, if profiling.
    pub fn profile(&self) -> Option<PhaseSeconds> {
        self.profile.as_ref().map(|p| p.borrow().clone())
    }

    fn timer(&self) -> PhaseTimer<'a> {
        PhaseTimer::new(self.model.device(), self.profile.is_some())
    }

    /// Adds one phase's lap to the profile, if profiling.
    fn lap(
        &self,
        timer: &mut PhaseTimer<'_>,
        phase: fn(&mut PhaseSeconds) -> &mut f64,
    ) -> Result<()> {
        if let Some(p) = &self.profile {
            timer.lap(phase(&mut p.borrow_mut()))?;
        }
        Ok(())
    }

    /// The summed NLL of one micro-batch divided by `total`, and each trainable variable's
    /// gradient of it, with gradient checkpointing per decoder layer (Chen et al. 2016, §3).
    ///
    /// 1. The layers run once without a graph (detached adapters), keeping each layer's input.
    /// 2. The loss is computed from the last layer's output held in a `Var`, in blocks of
    ///    `loss_chunk` rows, each block's LM head, log-softmax and picked targets built and
    ///    back-propagated on its own, so the `(tokens, vocab)` f32 logits and their gradient
    ///    never exist whole; the blocks' gradients of that `Var` are summed.
    /// 3. From the last layer to the first, the layer is recomputed with its graph from a `Var`
    ///    holding its saved input, and the surrogate `Σ out ⊙ g` (with `g` the loss's gradient
    ///    of the layer's output, held constant) is back-propagated: its gradient of every
    ///    parameter and of the input is exactly the loss's (the chain rule, one layer at a
    ///    time), since candle's `backward` takes no upstream gradient. The input's gradient is
    ///    the next layer down's `g`.
    ///
    /// The autograd graph holds one layer (or one logits block) at a time, and the saved inputs
    /// are `layers × tokens × hidden` in the model dtype.
    fn micro_batch_checkpointed(
        &self,
        seqs: &[&EvalSequence],
        total: usize,
        vars: &[Var],
        grads: &mut [Option<Tensor>],
    ) -> Result<f64> {
        let mut timer = self.timer();
        let tokens: Vec<&[u32]> = seqs.iter().map(|s| s.tokens.as_slice()).collect();
        let pass = self.model.layerwise(&tokens)?;
        let n_layers = self.model.config().num_hidden_layers;
        let mut x = pass.embed(None)?;
        let mut saved = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let tenant = self.adapters.layer_tenant(l, false)?;
            let out = pass.layer(l, &x, Some(&tenant))?;
            saved.push(x);
            x = out;
        }

        self.lap(&mut timer, |p| &mut p.forward)?;

        // The loss from the last hidden state, block by block. Targets and weights of the packed
        // rows: row i of a sequence predicts its token i+1 (the last row predicts nothing).
        let device = self.model.device();
        let rows = x.dim(0)?;
        let mut target = vec![0u32; rows];
        let mut weight = vec![0f32; rows];
        for ((start, len), s) in pass.rows().into_iter().zip(seqs) {
            for i in 0..len - 1 {
                target[start + i] = s.tokens[i + 1];
                weight[start + i] = if s.scored[i + 1] { 1.0 } else { 0.0 };
            }
        }
        let top = Var::from_tensor(&x)?;
        drop(x);
        let chunk = if self.loss_chunk == 0 {
            rows
        } else {
            self.loss_chunk
        };
        let mut loss_sum: Option<Tensor> = None;
        let mut grad_out: Option<Tensor> = None;
        for c0 in (0..rows).step_by(chunk) {
            let n = chunk.min(rows - c0);
            if weight[c0..c0 + n].iter().all(|&w| w == 0.0) {
                continue;
            }
            let logits = pass.logits(&top.as_tensor().narrow(0, c0, n)?, None)?;
            let lp = log_softmax(&logits)?;
            let t = Tensor::new(&target[c0..c0 + n], device)?.unsqueeze(1)?;
            let picked = lp.gather(&t, 1)?.squeeze(1)?;
            let w = Tensor::new(&weight[c0..c0 + n], device)?.to_dtype(picked.dtype())?;
            let nll = ((picked * w)?.sum_all()?.neg()? / total as f64)?;
            // Summed on the device and read once: a read waits for the device.
            loss_sum = Some(match loss_sum {
                None => nll.detach(),
                Some(a) => (a + nll.detach())?,
            });
            let store = nll.backward()?;
            if let Some(g) = store.get(top.as_tensor()) {
                grad_out = Some(match grad_out {
                    None => g.clone(),
                    Some(a) => (a + g)?,
                });
            }
        }
        self.lap(&mut timer, |p| &mut p.loss)?;
        // Read after the backward pass is queued, so the read does not stall the device.
        let read = |l: Option<Tensor>| -> Result<f64> {
            Ok(match l {
                Some(l) => l.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                None => 0.0,
            })
        };
        let Some(mut grad_out) = grad_out else {
            return read(loss_sum);
        };
        drop(top);

        // Back through the layers, recomputing each with its graph.
        let layer_of: Vec<usize> = self
            .adapters
            .adapters
            .iter()
            .flat_map(|a| std::iter::repeat_n(a.layer, a.params.len()))
            .collect();
        for l in (0..n_layers).rev() {
            let input = saved.pop().ok_or_else(|| {
                TrainError::Setting("gradient checkpointing lost a layer input".into())
            })?;
            // The first layer's input gradient is not needed (the embeddings are frozen).
            let input = if l > 0 {
                Var::from_tensor(&input)?.as_tensor().clone()
            } else {
                input
            };
            let tenant = self.adapters.layer_tenant(l, true)?;
            let out = pass.layer(l, &input, Some(&tenant))?;
            let store = (out * &grad_out)?.sum_all()?.backward()?;
            for (i, v) in vars.iter().enumerate() {
                if layer_of[i] != l {
                    continue;
                }
                if let Some(g) = store.get(v.as_tensor()) {
                    grads[i] = Some(match grads[i].take() {
                        None => g.clone(),
                        Some(a) => (a + g)?,
                    });
                }
            }
            if l > 0 {
                grad_out = store
                    .get(&input)
                    .ok_or_else(|| {
                        TrainError::Setting(format!(
                            "gradient checkpointing: layer {l}'s input received no gradient"
                        ))
                    })?
                    .clone();
            }
        }
        self.lap(&mut timer, |p| &mut p.backward)?;
        read(loss_sum)
    }

    /// One optimizer step; returns its report (the loss before the update).
    pub fn train_step(&mut self) -> Result<StepReport> {
        let micro = self.step_examples(self.step);
        let lr = cosine_lr(self.cfg.lr, self.step, self.cfg.steps);
        let (loss, grads) = self.loss_and_grads(&micro)?;
        self.step += 1;
        if !loss.is_finite() {
            return Err(TrainError::NonFinite {
                what: "the loss".into(),
                value: loss,
                step: self.step,
                steps: self.cfg.steps,
            });
        }
        let vars = self.adapters.vars();
        let mut timer = self.timer();
        self.opt.step(&vars, &grads, lr, &self.cfg)?;
        self.lap(&mut timer, |p| &mut p.optimizer)?;
        Ok(StepReport {
            step: self.step,
            loss,
            lr,
        })
    }

    /// Trains until `until` steps are done (at most `config().steps`), saving a checkpoint to
    /// `checkpoint` every `save_every` steps (0: never) and after the last step. `on_step` sees
    /// each report. Returns the losses of the steps run.
    pub fn train_until(
        &mut self,
        until: usize,
        save_every: usize,
        checkpoint: Option<&Path>,
        mut on_step: impl FnMut(&StepReport),
    ) -> Result<Vec<f64>> {
        let until = until.min(self.cfg.steps);
        let mut losses = Vec::new();
        while self.step < until {
            let r = self.train_step()?;
            losses.push(r.loss);
            on_step(&r);
            if let Some(path) = checkpoint {
                if (save_every > 0 && self.step.is_multiple_of(save_every)) || self.step == until {
                    self.save_checkpoint(path)?;
                }
            }
        }
        TrainError::check_finite(self.adapters.first_non_finite()?, self.step, self.cfg.steps)?;
        Ok(losses)
    }

    fn state(&self) -> CheckpointState {
        CheckpointState {
            step: self.step,
            config: self.cfg.clone(),
            spec: self.adapters.spec,
            data: (
                self.examples.len(),
                self.examples.iter().map(|e| e.tokens.len()).sum(),
            ),
        }
    }

    /// Writes the adapter, the AdamW moments and the step to `path` (atomically).
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let names = self.adapters.var_names();
        let vars = self.adapters.vars();
        let mut owned: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
        for (i, (name, v)) in names.iter().zip(&vars).enumerate() {
            let dt = if v.dtype() == DType::F64 {
                Dtype::F64
            } else {
                Dtype::F32
            };
            let (m, v2) = self.opt.moments(i)?;
            for (prefix, t) in [("param", v.as_tensor()), ("adam_m", &m), ("adam_v", &v2)] {
                owned.push((
                    format!("{prefix}.{name}"),
                    t.dims().to_vec(),
                    dt,
                    tensor_le_bytes(&t.to_device(&Device::Cpu)?, dt)?,
                ));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
            .iter()
            .map(|(n, s, d, b)| {
                safetensors::tensor::TensorView::new(*d, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| TrainError::Setting(format!("checkpoint tensor {n}: {e}")))
            })
            .collect::<Result<_>>()?;
        let mut meta = HashMap::new();
        let state =
            serde_json::to_string(&self.state()).map_err(|e| TrainError::Setting(e.to_string()))?;
        meta.insert(STATE_KEY.to_string(), state);
        let bytes = safetensors::tensor::serialize(views, Some(meta))
            .map_err(|e| TrainError::Setting(format!("checkpoint: {e}")))?;
        deltaserve_format::write_atomic(path, true, |w| w.write_all(&bytes))?;
        Ok(())
    }

    /// Restores a checkpoint written by [`Finetuner::save_checkpoint`] for the same settings,
    /// adapter and data; afterwards training continues from its step.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let bad = |msg: String| TrainError::BadData {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(|e| {
            bad(format!(
                "cannot read the checkpoint: {e}; drop --resume to start over"
            ))
        })?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a finetune checkpoint (safetensors: {e})")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a finetune checkpoint (safetensors: {e})")))?;
        let state: CheckpointState = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(STATE_KEY))
            .ok_or_else(|| bad("not a finetune checkpoint (no training state)".into()))
            .and_then(|s| {
                serde_json::from_str(s).map_err(|e| bad(format!("bad training state: {e}")))
            })?;
        let mine = self.state();
        let differs = |what: &str, a: String, b: String| {
            bad(format!(
                "was written with {what} {a}, this run has {b}; resume with the same settings or drop --resume"
            ))
        };
        if state.config != mine.config {
            return Err(differs(
                "settings",
                serde_json::to_string(&state.config).unwrap_or_default(),
                serde_json::to_string(&mine.config).unwrap_or_default(),
            ));
        }
        if state.spec != mine.spec {
            return Err(differs(
                "adapter",
                serde_json::to_string(&state.spec).unwrap_or_default(),
                serde_json::to_string(&mine.spec).unwrap_or_default(),
            ));
        }
        if state.data != mine.data {
            return Err(differs(
                "data (sequences, tokens)",
                format!("{:?}", state.data),
                format!("{:?}", mine.data),
            ));
        }
        let device = self.model.device().clone();
        let load = |name: &str, like: &Tensor| -> Result<Tensor> {
            let v = st
                .tensor(name)
                .map_err(|e| bad(format!("tensor {name}: {e}")))?;
            let dt = if v.dtype() == Dtype::F64 {
                DType::F64
            } else {
                DType::F32
            };
            let t = Tensor::from_raw_buffer(v.data(), dt, v.shape(), &Device::Cpu)?;
            if t.dims() != like.dims() {
                return Err(bad(format!(
                    "tensor {name} is {:?}, expected {:?}",
                    t.dims(),
                    like.dims()
                )));
            }
            Ok(t.to_dtype(like.dtype())?.to_device(&device)?)
        };
        let names = self.adapters.var_names();
        let vars = self.adapters.vars();
        let (mut ms, mut vs) = (Vec::new(), Vec::new());
        for (name, v) in names.iter().zip(&vars) {
            v.set(&load(&format!("param.{name}"), v.as_tensor())?)?;
            ms.push(load(&format!("adam_m.{name}"), v.as_tensor())?);
            vs.push(load(&format!("adam_v.{name}"), v.as_tensor())?);
        }
        self.opt.set_moments(&ms, &vs)?;
        self.opt.t = state.step;
        self.step = state.step;
        Ok(())
    }
}

/// What to fine-tune, on what, and how (the whole `deltaserve finetune` command).
#[derive(Debug, Clone)]
pub struct FinetuneJob {
    /// Base model directory (frozen).
    pub model: PathBuf,
    /// Training data: text or JSONL (`text` / chat `messages`) files or directories of them.
    pub data: Vec<PathBuf>,
    /// Held-out data to report perplexity on before and after (optional).
    pub eval: Option<PathBuf>,
    /// Where the adapter delta goes.
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub overwrite: bool,
    /// The adapter.
    pub spec: crate::adapters::AdapterSpec,
    /// Start LoRA from this `lowrank` delta.
    pub init: Option<PathBuf>,
    /// Training settings.
    pub config: FinetuneConfig,
    /// Tokens per sequence (longer records are truncated).
    pub seq_len: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// The checkpoint file.
    pub checkpoint: PathBuf,
    /// Continue from the checkpoint.
    pub resume: bool,
    /// Stop after this many steps (a checkpoint is written; `--resume` continues). Testing aid.
    pub stop_after: Option<usize>,
    /// Where the model runs.
    pub device: Device,
    /// Model dtype.
    pub dtype: DType,
    /// Gradient checkpointing per decoder layer (see `Finetuner::set_checkpoint_layers`).
    pub checkpoint_layers: bool,
    /// Rows per block of the chunked LM head + cross-entropy (0: all at once).
    pub loss_chunk: usize,
    /// Time the phases of each step and report them.
    pub profile: bool,
}

/// What a finished fine-tune reports.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneOutcome {
    /// Each step's loss (of the steps this run did).
    pub losses: Vec<f64>,
    /// Mean seconds per optimizer step.
    pub seconds_per_step: f64,
    /// Wall seconds of each step of this run (forward, backward and update of all its
    /// micro-batches; the loss is read back every step, so device work is included).
    pub step_seconds: Vec<f64>,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Held-out perplexity of the base, if `eval` was given.
    pub eval_ppl_base: Option<f64>,
    /// Held-out perplexity with the adapter after training.
    pub eval_ppl_adapter: Option<f64>,
    /// Steps done in all.
    pub steps_done: usize,
    /// Whether the adapter delta was written (false when stopped early).
    pub wrote: Option<PathBuf>,
    /// Seconds per phase summed over this run's steps, with `profile`.
    pub profile: Option<PhaseSeconds>,
}

fn load_sequences(
    paths: &[PathBuf],
    codec: &deltaserve_model::TextCodec,
    seq_len: usize,
) -> Result<Vec<EvalSequence>> {
    let files = crate::data::list_files(paths)?;
    let mut out = Vec::new();
    for (p, _) in files {
        let ds = deltaserve_eval::load_dataset(&p, codec, seq_len, None).map_err(|e| {
            TrainError::BadData {
                path: p.clone(),
                msg: e.to_string(),
            }
        })?;
        out.extend(ds.sequences);
    }
    Ok(out)
}

/// Runs a fine-tune end to end: load, (resume), train, evaluate, write the adapter delta.
pub fn finetune(job: &FinetuneJob, progress: &mut dyn Progress) -> Result<FinetuneOutcome> {
    if !job.overwrite && !job.resume && job.out.symlink_metadata().is_ok() {
        return Err(deltaserve_format::FormatError::OutputExists {
            path: job.out.clone(),
        }
        .into());
    }
    if job.seq_len < 2 {
        return Err(TrainError::Setting(format!(
            "--seq {}: a sequence needs at least 2 tokens",
            job.seq_len
        )));
    }
    job.config.check()?;
    progress.phase("opening the base model");
    let ckpt = deltaserve_model::Checkpoint::open(&job.model)?;
    let max_pos = ckpt.config().max_position_embeddings;
    if job.seq_len > max_pos {
        return Err(TrainError::Setting(format!(
            "--seq {} exceeds the model's context of {max_pos} tokens (max_position_embeddings)",
            job.seq_len
        )));
    }
    let codec = deltaserve_model::TextCodec::from_dir(ckpt.dir(), &ckpt.config().eos_token_ids)?;
    progress.phase("reading training data");
    let train = load_sequences(&job.data, &codec, job.seq_len)?;
    let eval = match &job.eval {
        Some(p) => Some(load_sequences(
            std::slice::from_ref(p),
            &codec,
            job.seq_len,
        )?),
        None => None,
    };
    progress.phase("loading the base");
    let model = Model::load(&ckpt, job.dtype, &job.device)?;
    let adapters = match &job.init {
        Some(p) => {
            let file = deltaserve_format::DeltaFile::open(p)?;
            AdapterSet::from_init_delta(&model, job.spec, job.config.seed, &file, &ckpt)?
        }
        None => AdapterSet::new(&model, job.spec, job.config.seed)?,
    };
    let trainable_params = adapters.param_count();
    let mut ft = Finetuner::new(&model, adapters, train, job.config.clone())?;
    ft.set_checkpoint_layers(job.checkpoint_layers);
    ft.set_loss_chunk(job.loss_chunk);
    ft.set_profile(job.profile);
    if job.resume {
        progress.phase("resuming from the checkpoint");
        ft.load_checkpoint(&job.checkpoint)?;
    }
    let eval_batch = job.config.batch;
    let eval_ppl_base = match &eval {
        Some(e) => {
            progress.phase("evaluating the base on the held-out data");
            Some(perplexity(&model, None, e, eval_batch)?)
        }
        None => None,
    };
    let until = job.stop_after.unwrap_or(job.config.steps);
    let start = ft.step_index();
    progress.start_training(until.saturating_sub(start));
    let t0 = Instant::now();
    let mut last = Instant::now();
    let mut step_seconds = Vec::new();
    let trained = ft.train_until(until, job.save_every, Some(&job.checkpoint), |r| {
        step_seconds.push(last.elapsed().as_secs_f64());
        progress.step(r);
        last = Instant::now();
    });
    progress.end_training();
    let losses = trained?;
    let seconds_per_step = t0.elapsed().as_secs_f64() / losses.len().max(1) as f64;
    let steps_done = ft.step_index();
    let finished = steps_done >= job.config.steps;
    let eval_ppl_adapter = match (&eval, finished) {
        (Some(e), true) => {
            progress.phase("evaluating the adapter on the held-out data");
            let t = ft.adapters().tenant(false)?;
            Some(perplexity(&model, Some(&t), e, eval_batch)?)
        }
        _ => None,
    };
    let mut wrote = None;
    if finished {
        progress.phase("writing the adapter delta");
        let info = serde_json::json!({
            "adapter": job.spec,
            "config": job.config,
            "seq_len": job.seq_len,
            "data": job.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "train_sequences": ft.examples().len(),
            "trainable_params": trainable_params,
            "init": job.init.as_ref().map(|p| p.display().to_string()),
            "losses": losses,
            "eval_ppl_base": eval_ppl_base,
            "eval_ppl_adapter": eval_ppl_adapter,
        });
        ft.adapters()
            .write_delta(&ckpt, &job.out, info, job.overwrite || job.resume)?;
        wrote = Some(job.out.clone());
    }
    Ok(FinetuneOutcome {
        losses,
        seconds_per_step,
        step_seconds,
        trainable_params,
        eval_ppl_base,
        eval_ppl_adapter,
        steps_done,
        wrote,
        profile: ft.profile(),
    })
}
