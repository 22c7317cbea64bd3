//! Hugging Face checkpoints in, Llama-family logits out.
//!
//! This crate loads a model directory ([`Checkpoint`]), runs the decoder ([`Model::forward`]) for
//! several sequences at once, each with its own [`KvCache`] and optionally its own tenant delta
//! ([`TenantWeights`]), and handles text ([`TextCodec`]). It knows nothing of files other than
//! checkpoints, nor of HTTP; the delta file format lives in `deltaserve-format`, codecs that turn
//! a delta file into [`TenantWeights`] in `deltaserve-codecs`.
//!
//! The forward pass follows transformers' eager implementation and is tested against logits it
//! produced (`tests/fixtures/`, made by `scripts/reference/make_fixtures.py`).

pub mod checkpoint;
pub mod config;
pub mod error;
mod grad;
pub mod kv_cache;
pub mod llama;
pub mod random;
pub mod rope;
pub mod tenant;
pub mod tokenizer;

pub use checkpoint::{resolve_model_dir, Checkpoint, RawTensor};
pub use config::{Architecture, ModelConfig, RawConfig};
pub use error::{ModelError, Result};
pub use kv_cache::KvCache;
pub use llama::{
    rms_norm, ForwardOptions, Layer, LayerwiseForward, Linear, LogitsWanted, Model, SeqInput,
};
pub use tenant::{LayerDelta, LinearDelta, Proj, TenantWeights};
pub use tokenizer::{ChatMessage, TextCodec};

/// Picks the device named by `--device`: `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<candle_core::Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let idx = s
                .strip_prefix("cuda:")
                .map_or(Ok(0), |n| n.parse::<usize>())
                .map_err(|_| {
                    ModelError::Input(format!("--device {s}: expected cpu, cuda or cuda:N"))
                })?;
            candle_core::Device::new_cuda(idx).map_err(|e| {
                ModelError::Input(format!(
                    "--device {s}: {e}; build with `--features cuda` and check the GPU is visible"
                ))
            })
        }
        s => Err(ModelError::Input(format!(
            "--device {s}: expected cpu, cuda or cuda:N"
        ))),
    }
}
