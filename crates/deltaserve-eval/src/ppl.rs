//! Sliding-window perplexity, computed exactly as Hugging Face's perplexity guide
//! (<https://huggingface.co/docs/transformers/perplexity>, token-counting version) and the BitDelta
//! reference's `eval_ppl.py` loop do:
//!
//! ```text
//! for begin in range(0, N, stride):
//!     end = min(begin + seq_len, N); trg_len = end - prev_end
//!     labels = ids[begin:end]; labels[:-trg_len] = -100          # the overlap is context only
//!     loss = mean CE of the shifted pairs (logits[t-1], labels[t]) with labels[t] != -100
//!     nll_sum += loss * ((labels != -100).sum() - 1); n_tokens += (labels != -100).sum() - 1
//!     prev_end = end; if end == N: break
//! ppl = exp(nll_sum / n_tokens)
//! ```
//!
//! The guide's weight subtracts `batch_size` (1) for the label shift even in windows whose first
//! label is masked, so every window after the first scores `trg_len` targets but weighs
//! `trg_len - 1`; we reproduce that to match transformers' number, and also report the plain
//! token mean (`ppl_token_mean`: every scored target weighted 1).

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{EvalError, Result};
use crate::stats::{nll, row_norm, HostRows};
use deltaserve_model::{ForwardOptions, Model, TenantWeights};

/// One window of the sliding-window loop over a token stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    /// First token of the window in the stream.
    pub begin: usize,
    /// One past its last token.
    pub end: usize,
    /// `end - prev_end`: how many of its last labels are targets (the rest is context).
    pub trg_len: usize,
}

impl Window {
    /// Tokens in the window.
    pub fn len(&self) -> usize {
        self.end - self.begin
    }

    /// Whether the window has no tokens (never true for windows from [`hf_windows`]).
    pub fn is_empty(&self) -> bool {
        self.end == self.begin
    }

    /// Labels that are not −100: the last `trg_len` (all of them when `trg_len` ≥ the length).
    pub fn valid_labels(&self) -> usize {
        self.trg_len.min(self.len())
    }

    /// Position (within the window) of the first scored target; targets run to the window's end.
    /// Position 0 is never a target: nothing predicts it.
    pub fn first_target(&self) -> usize {
        (self.len() - self.valid_labels()).max(1)
    }

    /// Targets the window's loss averages over.
    pub fn scored_targets(&self) -> usize {
        self.len() - self.first_target()
    }

    /// The guide's weight of the window's mean loss: valid labels minus the batch size (1).
    pub fn guide_weight(&self) -> usize {
        self.valid_labels().saturating_sub(1)
    }
}

/// The windows of the guide's loop over `n` tokens.
pub fn hf_windows(n: usize, seq_len: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    if n == 0 || seq_len == 0 || stride == 0 {
        return out;
    }
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < n {
        let end = (begin + seq_len).min(n);
        out.push(Window {
            begin,
            end,
            trg_len: end - prev_end,
        });
        prev_end = end;
        if end == n {
            break;
        }
        begin += stride;
    }
    out
}

/// Window length and stride of a perplexity run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PplSettings {
    /// Tokens per window (the guide's `max_length`).
    pub seq_len: usize,
    /// Tokens the window moves each step.
    pub stride: usize,
}

impl PplSettings {
    fn check(&self) -> Result<()> {
        if self.seq_len < 2 {
            return Err(EvalError::Input(format!(
                "--seq-len {}: a window needs at least 2 tokens",
                self.seq_len
            )));
        }
        if self.stride == 0 || self.stride > self.seq_len {
            return Err(EvalError::Input(format!(
                "--stride {}: must be between 1 and --seq-len ({}); a larger stride skips tokens",
                self.stride, self.seq_len
            )));
        }
        Ok(())
    }
}

/// The outcome of a perplexity run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PplResult {
    /// exp(Σ window mean nll × guide weight / Σ guide weight): transformers' number.
    pub ppl: f64,
    /// The exponent of `ppl`: the guide's weighted mean nll (nats per token).
    pub mean_nll: f64,
    /// Σ guide weights (the guide's `n_tokens`).
    pub loss_tokens: usize,
    /// exp(mean nll over every scored target, each weighted 1).
    pub ppl_token_mean: f64,
    /// Targets scored, overlaps excluded.
    pub scored_targets: usize,
    /// Tokens in the stream.
    pub tokens: usize,
    /// Windows evaluated.
    pub windows: usize,
    /// The settings used (after clamping `seq_len` to the model's context).
    pub settings: PplSettings,
}

/// Sliding-window perplexity of `ids` with logits from `logits_fn`.
///
/// `logits_fn` gets up to `windows_per_batch` windows at a time and returns one f32 logits tensor
/// (window length, vocab) per window; row `t` predicts token `t + 1`. The model is a closure so
/// tests can feed fixed logits; [`perplexity`] runs a [`Model`].
pub fn perplexity_with<F>(
    ids: &[u32],
    settings: PplSettings,
    windows_per_batch: usize,
    mut logits_fn: F,
) -> Result<PplResult>
where
    F: FnMut(&[&[u32]]) -> Result<Vec<Tensor>>,
{
    settings.check()?;
    if ids.len() < 2 {
        return Err(EvalError::Input(format!(
            "{} token(s) to evaluate; perplexity needs at least 2",
            ids.len()
        )));
    }
    let windows = hf_windows(ids.len(), settings.seq_len, settings.stride);
    let (mut guide_sum, mut guide_tokens) = (0f64, 0usize);
    let (mut token_sum, mut token_count) = (0f64, 0usize);
    for batch in windows.chunks(windows_per_batch.max(1)) {
        let inputs: Vec<&[u32]> = batch.iter().map(|w| &ids[w.begin..w.end]).collect();
        let logits = logits_fn(&inputs)?;
        if logits.len() != batch.len() {
            return Err(EvalError::Input(format!(
                "the model returned logits for {} of {} windows. This is a bug.",
                logits.len(),
                batch.len()
            )));
        }
        for (w, lg) in batch.iter().zip(&logits) {
            let toks = &ids[w.begin..w.end];
            let first = w.first_target();
            let rows: Vec<usize> = (first - 1..w.len() - 1).collect();
            let host = HostRows::gather(lg, &rows)?;
            if let Some(&bad) = toks[first..].iter().find(|&&t| t as usize >= host.vocab) {
                return Err(EvalError::Input(format!(
                    "token id {bad} is outside the logits' vocabulary of {}",
                    host.vocab
                )));
            }
            let sum: f64 = (0..host.len())
                .map(|i| {
                    let row = host.row(i);
                    nll(row, row_norm(row), toks[first + i] as usize)
                })
                .sum();
            let count = w.scored_targets();
            // HF guide: outputs.loss (mean over the scored targets) × (valid labels − batch_size).
            guide_sum += sum / count as f64 * w.guide_weight() as f64;
            guide_tokens += w.guide_weight();
            token_sum += sum;
            token_count += count;
        }
    }
    let mean_nll = guide_sum / guide_tokens as f64;
    Ok(PplResult {
        ppl: mean_nll.exp(),
        mean_nll,
        loss_tokens: guide_tokens,
        ppl_token_mean: (token_sum / token_count as f64).exp(),
        scored_targets: token_count,
        tokens: ids.len(),
        windows: windows.len(),
        settings,
    })
}

/// How many windows of `seq_len` tokens to run per forward call so the (tokens, vocab) f32 logits
/// of one call stay near 256 MiB.
pub fn windows_per_batch(seq_len: usize, vocab: usize) -> usize {
    const LOGITS_BUDGET_BYTES: usize = 256 << 20;
    (LOGITS_BUDGET_BYTES / (seq_len.max(1) * vocab.max(1) * 4)).clamp(1, 64)
}

/// Sliding-window perplexity of `model` (with `tenant`'s delta applied, if any) on `ids`.
///
/// A `seq_len` beyond the model's context (`max_position_embeddings`) is clamped to it (and the
/// stride with it); the result's `settings` say what was used.
pub fn perplexity(
    model: &Model,
    tenant: Option<&TenantWeights>,
    ids: &[u32],
    settings: PplSettings,
) -> Result<PplResult> {
    perplexity_with_progress(
        model,
        tenant,
        ids,
        settings,
        &indicatif::ProgressBar::hidden(),
    )
}

/// [`perplexity`], advancing `bar` by one per window (its length is set here).
pub fn perplexity_with_progress(
    model: &Model,
    tenant: Option<&TenantWeights>,
    ids: &[u32],
    settings: PplSettings,
    bar: &indicatif::ProgressBar,
) -> Result<PplResult> {
    let settings = clamp_to_context(settings, model.config().max_position_embeddings);
    let per_batch = windows_per_batch(settings.seq_len, model.config().vocab_size);
    bar.set_length(hf_windows(ids.len(), settings.seq_len, settings.stride).len() as u64);
    let r = perplexity_with(ids, settings, per_batch, |windows| {
        let out = model.window_logits(windows, tenant, ForwardOptions::default())?;
        bar.inc(windows.len() as u64);
        Ok(out)
    });
    bar.finish_and_clear();
    r
}

/// `settings` with `seq_len` (and the stride with it) no larger than the model's context.
pub fn clamp_to_context(settings: PplSettings, context: usize) -> PplSettings {
    if settings.seq_len <= context {
        return settings;
    }
    tracing::warn!(
        "seq_len {} exceeds the model's context; using {context}",
        settings.seq_len
    );
    PplSettings {
        seq_len: context,
        stride: settings.stride.min(context),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_guide_loop() {
        // N=300, seq 64, stride 16 (the transformers fixture's setting): begins 0, 16, ..., 240.
        let w = hf_windows(300, 64, 16);
        assert_eq!(w.len(), 16);
        assert_eq!(
            w[0],
            Window {
                begin: 0,
                end: 64,
                trg_len: 64
            }
        );
        assert_eq!(
            (
                w[0].first_target(),
                w[0].scored_targets(),
                w[0].guide_weight()
            ),
            (1, 63, 63)
        );
        assert_eq!(
            w[1],
            Window {
                begin: 16,
                end: 80,
                trg_len: 16
            }
        );
        assert_eq!(
            (
                w[1].first_target(),
                w[1].scored_targets(),
                w[1].guide_weight()
            ),
            (48, 16, 15)
        );
        // The last window ends the stream and scores only what the previous one did not reach.
        assert_eq!(
            w[15],
            Window {
                begin: 240,
                end: 300,
                trg_len: 12
            }
        );
        assert_eq!(
            (
                w[15].first_target(),
                w[15].scored_targets(),
                w[15].guide_weight()
            ),
            (48, 12, 11)
        );
        assert_eq!(
            w.iter().map(|w| w.guide_weight()).sum::<usize>(),
            63 + 14 * 15 + 11
        );
        // Every token after the first is scored exactly once.
        assert_eq!(w.iter().map(|w| w.scored_targets()).sum::<usize>(), 299);
    }

    #[test]
    fn short_streams_give_one_window() {
        assert_eq!(
            hf_windows(5, 64, 16),
            vec![Window {
                begin: 0,
                end: 5,
                trg_len: 5
            }]
        );
        assert!(hf_windows(0, 64, 16).is_empty());
    }
}
