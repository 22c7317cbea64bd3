//! `config.json` as it is on disk ([`RawConfig`]) and as the code uses it ([`ModelConfig`]).
//!
//! Follows transformers' `LlamaConfig`, `MistralConfig` and `Qwen2Config`: field names are the
//! on-disk names; defaults are resolved once, here.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The architectures this crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (Llama 2 and 3).
    Llama,
    /// `MistralForCausalLM` (sliding-window attention).
    Mistral,
    /// `Qwen2ForCausalLM` (biases on q/k/v).
    Qwen2,
}

/// `rope_scaling` of type `llama3` (transformers `_compute_llama3_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    /// Scale applied to low frequencies.
    pub factor: f64,
    /// Wavelength boundary factor for low frequencies.
    pub low_freq_factor: f64,
    /// Wavelength boundary factor for high frequencies.
    pub high_freq_factor: f64,
    /// Context length the model was pretrained with.
    pub original_max_position_embeddings: usize,
}

/// `config.json` with the names and optional fields found on disk.
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// e.g. `llama`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Hidden size.
    pub hidden_size: Option<usize>,
    /// MLP inner size.
    pub intermediate_size: Option<usize>,
    /// Decoder layers.
    pub num_hidden_layers: Option<usize>,
    /// Query heads.
    pub num_attention_heads: Option<usize>,
    /// Key/value heads (GQA); defaults to `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Per-head size; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: Option<f64>,
    /// RoPE base.
    pub rope_theta: Option<f64>,
    /// RoPE scaling dictionary.
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5 puts `rope_theta` and the scaling in here.
    pub rope_parameters: Option<serde_json::Value>,
    /// Context length.
    pub max_position_embeddings: Option<usize>,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: Option<bool>,
    /// Mistral / Qwen2 sliding window.
    pub sliding_window: Option<usize>,
    /// Qwen2: whether the sliding window is used at all.
    pub use_sliding_window: Option<bool>,
    /// Qwen2: layers from this index on use the sliding window.
    pub max_window_layers: Option<usize>,
    /// Llama: bias on q/k/v/o.
    pub attention_bias: Option<bool>,
    /// Llama: bias on the MLP projections.
    pub mlp_bias: Option<bool>,
    /// Activation; only `silu` is supported.
    pub hidden_act: Option<String>,
    /// Checkpoint dtype, informational.
    pub torch_dtype: Option<String>,
    /// transformers 5 name for `torch_dtype`.
    pub dtype: Option<String>,
    /// End-of-sequence token id(s).
    pub eos_token_id: Option<serde_json::Value>,
    /// Begin-of-sequence token id.
    pub bos_token_id: Option<serde_json::Value>,
}

/// The resolved configuration the forward pass uses.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Which architecture.
    pub arch: Architecture,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Per-head size.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Llama 3 RoPE scaling, if any.
    pub rope_llama3: Option<Llama3RopeScaling>,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Sliding window size per layer (None = full causal attention).
    pub sliding_window: Vec<Option<usize>>,
    /// Bias on q/k/v.
    pub qkv_bias: bool,
    /// Bias on o_proj.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// End-of-sequence ids from config.json.
    pub eos_token_ids: Vec<u32>,
}

fn need<T>(v: Option<T>, path: &Path, field: &'static str) -> Result<T> {
    v.ok_or_else(|| ModelError::Config {
        path: path.to_path_buf(),
        field,
        msg: "missing; every Llama-family config.json has it".into(),
    })
}

/// Reads token ids given as a number or a list of numbers.
pub fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl RawConfig {
    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ModelError::MissingFile {
                    path: path.to_path_buf(),
                    what: "model configuration",
                    hint: "pass a Hugging Face model directory that contains config.json",
                }
            } else {
                ModelError::BadFile {
                    path: path.to_path_buf(),
                    msg: e.to_string(),
                }
            }
        })?;
        serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
            path: path.to_path_buf(),
            msg: format!("not a valid config.json: {e}"),
        })
    }

    /// Resolves defaults and checks that the architecture is one we run.
    pub fn resolve(&self, path: &Path) -> Result<ModelConfig> {
        let name = self.architectures.first().cloned().unwrap_or_default();
        let arch = match name.as_str() {
            "LlamaForCausalLM" => Architecture::Llama,
            "MistralForCausalLM" => Architecture::Mistral,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            _ => {
                return Err(ModelError::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    name: if name.is_empty() {
                        "<none: `architectures` is empty>".into()
                    } else {
                        name
                    },
                })
            }
        };
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(ModelError::Config {
                    path: path.to_path_buf(),
                    field: "hidden_act",
                    msg: format!("`{act}` is not supported; only `silu`"),
                });
            }
        }
        let hidden_size = need(self.hidden_size, path, "hidden_size")?;
        let num_attention_heads = need(self.num_attention_heads, path, "num_attention_heads")?;
        let num_hidden_layers = need(self.num_hidden_layers, path, "num_hidden_layers")?;
        let num_key_value_heads = self.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                field: "num_key_value_heads",
                msg: format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            });
        }
        let head_dim = self.head_dim.unwrap_or(hidden_size / num_attention_heads);
        // transformers 5 moved rope settings into `rope_parameters`; read both places.
        let rope_params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let rope_theta = self
            .rope_theta
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10000.0);
        let rope_llama3 = match rope_params {
            Some(p) => {
                let kind = p
                    .get("rope_type")
                    .or_else(|| p.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &'static str| {
                            p.get(k)
                                .and_then(|v| v.as_f64())
                                .ok_or_else(|| ModelError::Config {
                                    path: path.to_path_buf(),
                                    field: "rope_scaling",
                                    msg: format!("llama3 scaling needs `{k}`"),
                                })
                        };
                        Some(Llama3RopeScaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f("original_max_position_embeddings")?
                                as usize,
                        })
                    }
                    other => {
                        return Err(ModelError::Config {
                            path: path.to_path_buf(),
                            field: "rope_scaling",
                            msg: format!(
                                "rope type `{other}` is not supported (supported: default, llama3)"
                            ),
                        })
                    }
                }
            }
            None => None,
        };
        let window = match arch {
            Architecture::Mistral => self.sliding_window,
            Architecture::Qwen2 if self.use_sliding_window.unwrap_or(false) => self.sliding_window,
            _ => None,
        };
        // Qwen2 applies the window only to layers at or above `max_window_layers`.
        let sliding_window = (0..num_hidden_layers)
            .map(|i| match (arch, window) {
                (Architecture::Qwen2, Some(w))
                    if i >= self.max_window_layers.unwrap_or(num_hidden_layers) =>
                {
                    Some(w)
                }
                (Architecture::Qwen2, _) => None,
                (_, w) => w,
            })
            .collect();
        let attention_bias = self.attention_bias.unwrap_or(false);
        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size: need(self.intermediate_size, path, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: need(self.vocab_size, path, "vocab_size")?,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_llama3,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            sliding_window,
            qkv_bias: matches!(arch, Architecture::Qwen2) || attention_bias,
            o_bias: attention_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            eos_token_ids: token_ids(&self.eos_token_id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig> {
        let raw: RawConfig = serde_json::from_str(s).unwrap();
        raw.resolve(Path::new("config.json"))
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let e = parse(r#"{"architectures":["GPT2LMHeadModel"],"hidden_size":8}"#).unwrap_err();
        assert!(e.to_string().contains("GPT2LMHeadModel"), "{e}");
    }

    #[test]
    fn missing_field_is_named() {
        let e = parse(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,"num_attention_heads":2}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("num_hidden_layers"), "{e}");
    }

    #[test]
    fn qwen2_window_applies_from_max_window_layers() {
        let c = parse(
            r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":8,"num_attention_heads":2,"num_hidden_layers":3,
            "intermediate_size":16,"vocab_size":10,"use_sliding_window":true,"sliding_window":4,"max_window_layers":1}"#,
        )
        .unwrap();
        assert_eq!(c.sliding_window, vec![None, Some(4), Some(4)]);
        assert!(c.qkv_bias);
    }
}
