//! Calibration statistics for data-aware codecs: the Gram matrix `H = Σ xᵀx` of every
//! projection's input over calibration tokens, which GPTQ (arXiv 2210.17323, §3: the layer-wise
//! Hessian is `2XXᵀ`) and EoRA (arXiv 2410.21271, §3: the eigenspace of `XXᵀ`) need.
//!
//! The model runs over windows of calibration tokens with
//! [`deltaserve_model::Model::forward_observed`]; each projection's input rows are multiplied
//! out on the model's device in f32 and summed on the host in f64. `q/k/v_proj` share one input,
//! as do `gate/up_proj`, so their Gram matrix is computed once and copied.
//! Tokenizing text is the caller's job (the CLI uses `deltaserve-train`'s data loader).

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use deltaserve_model::{ForwardOptions, LogitsWanted, Model, Proj, SeqInput};

use crate::codec::{Calibration, CalibrationSet};
use crate::error::{CodecError, Result};

/// How much calibration data to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalibStatsOptions {
    /// Tokens per window (each window is one sequence from position 0).
    pub seq_len: usize,
    /// Stop after this many tokens.
    pub max_tokens: usize,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for CalibStatsOptions {
    /// 128 windows of 256 tokens at most (GPTQ's reference uses 128 × 2048 on 7B models; the
    /// statistics only need more tokens than the widest input).
    fn default() -> Self {
        CalibStatsOptions {
            seq_len: 256,
            max_tokens: 128 * 256,
            progress: false,
        }
    }
}

/// The checkpoint name of projection `proj` of layer `layer`.
pub fn weight_name(layer: usize, proj: Proj) -> String {
    format!("model.layers.{layer}.{}.weight", proj.module())
}

/// Runs `model` (the base, no tenant) over `tokens` cut into windows and returns `Σ xᵀx` per
/// projection weight, keyed by checkpoint name.
pub fn collect_calibration(
    model: &Model,
    tokens: &[u32],
    opts: &CalibStatsOptions,
) -> Result<CalibrationSet> {
    let bad = |detail: String| CodecError::BadOption {
        option: "--data",
        detail,
    };
    if opts.seq_len == 0 {
        return Err(bad("calibration windows need at least 1 token".into()));
    }
    let used = tokens.len().min(opts.max_tokens);
    if used == 0 {
        return Err(bad(
            "the calibration data holds no tokens; give a text or JSONL file with some text".into(),
        ));
    }
    let seq_len = opts
        .seq_len
        .min(model.config().max_position_embeddings)
        .max(1);
    let windows: Vec<&[u32]> = tokens[..used].chunks(seq_len).collect();
    let layers = model.config().num_hidden_layers;
    // Sums for the projections whose input is distinct: (layer, proj) → (in, in) f64.
    let mut sums: HashMap<(usize, Proj), Vec<f64>> = HashMap::new();
    let mut first_err: Option<candle_core::Error> = None;
    let bar = if opts.progress {
        let bar = indicatif::ProgressBar::new(windows.len() as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "calibration statistics [{bar:40}] {pos}/{len} windows eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut count = 0usize;
    for w in &windows {
        let mut observer = |l: usize, proj: Proj, x: &Tensor| {
            if first_err.is_some() || matches!(proj, Proj::K | Proj::V | Proj::Up) {
                return;
            }
            let gram = (|| -> candle_core::Result<Vec<f32>> {
                let x = x.to_dtype(DType::F32)?;
                x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f32>()
            })();
            match gram {
                Ok(g) => {
                    let acc = sums.entry((l, proj)).or_insert_with(|| vec![0f64; g.len()]);
                    for (a, v) in acc.iter_mut().zip(&g) {
                        *a += f64::from(*v);
                    }
                }
                Err(e) => first_err = Some(e),
            }
        };
        let mut seqs = [SeqInput {
            tokens: w,
            cache: None,
            tenant: None,
            logits: LogitsWanted::Last,
        }];
        model
            .forward_observed(&mut seqs, ForwardOptions::default(), &mut observer)
            .map_err(|e| bad(format!("running the model over calibration data: {e}")))?;
        if let Some(e) = first_err.take() {
            return Err(bad(format!("collecting layer inputs: {e}")));
        }
        count += w.len();
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut out = CalibrationSet::new();
    for l in 0..layers {
        for proj in Proj::ALL {
            let source = match proj {
                Proj::K | Proj::V => Proj::Q,
                Proj::Up => Proj::Gate,
                p => p,
            };
            if let Some(sum) = sums.get(&(l, source)) {
                out.insert(
                    weight_name(l, proj),
                    Calibration {
                        gram: sum.iter().map(|&v| v as f32).collect(),
                        tokens: count,
                    },
                );
            }
        }
    }
    Ok(out)
}
