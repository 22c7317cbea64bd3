//! Evaluation of deltas: perplexity, agreement with the fine-tune, reconstruction error, reports.
//!
//! - [`perplexity`] / [`perplexity_with`]: sliding-window perplexity exactly as Hugging Face's
//!   perplexity guide computes it (tested against transformers' number on a fixture).
//! - [`compare`]: base, fine-tune and deltas on the same data: perplexity, KL(fine-tune ‖ model),
//!   top-1 agreement, size and bits per parameter, per-tensor relative error and BitDelta scales.
//!   It takes models already loaded ([`CompareInputs`]), so a caller that goes on serving them
//!   (the `demo` command) loads nothing twice.
//! - [`CompareReport`]: a terminal table, JSON, and a Markdown report with PNG plots.
//! - [`pareto_table`] / [`pareto_png`]: many deltas of one fine-tune as perplexity and KL
//!   against bits per parameter, with the Pareto front (the `eval sweep` output).
//! - [`load_dataset`]: plain text or JSONL (`text` or chat `messages`) into scored sequences.
//!
//! Not here: loading delta files into tenants (`deltaserve-codecs`), generation (`deltaserve-engine`).

mod compare;
mod data;
mod error;
mod pareto;
mod plot;
mod ppl;
mod report;
mod stats;

pub use compare::{
    compare, proj_short, weight_errors, CompareInputs, CompareOptions, CompareReport,
    DatasetReport, DeltaInput, DeltaWeights, ModelEntry, ModelInfo, ModelKind, ModelMetrics,
    TensorError,
};
pub use data::{chunk_tokens, encode_chat, load_dataset, EvalDataset, EvalSequence, Scored};
pub use error::{EvalError, Result};
pub use pareto::{pareto_png, pareto_points, pareto_table, ParetoPoint};
pub use ppl::{
    clamp_to_context, hf_windows, perplexity, perplexity_with, perplexity_with_progress,
    windows_per_batch, PplResult, PplSettings, Window,
};
pub use report::{fmt_bytes, text_table, ReportFiles, DEFINITIONS};
