//! Random Llama-shaped checkpoints for tests and benchmarks (no model hub is reachable here, and
//! speed must be measured on real shapes such as Llama-2-7B's).
//!
//! A fine-tune can be made from a base as `W_base + noise·N(0,1)`, so compression and calibration
//! can be exercised on pairs of any size.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};

/// Shapes of a random Llama checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RandomShape {
    /// Hidden size.
    pub hidden: usize,
    /// MLP inner size.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Context length.
    pub max_positions: usize,
}

impl RandomShape {
    /// Named presets: `tiny` (fixture-sized), `llama-100m`, `llama2-7b`.
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "tiny" => Self {
                hidden: 64,
                intermediate: 160,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                vocab: 512,
                max_positions: 512,
            },
            "llama-100m" => Self {
                hidden: 768,
                intermediate: 2048,
                layers: 12,
                heads: 12,
                kv_heads: 12,
                vocab: 32000,
                max_positions: 2048,
            },
            "llama2-7b" => Self {
                hidden: 4096,
                intermediate: 11008,
                layers: 32,
                heads: 32,
                kv_heads: 32,
                vocab: 32000,
                max_positions: 4096,
            },
            _ => return None,
        })
    }

    /// Every tensor (name, shape) of a Llama checkpoint with untied embeddings.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let hd = self.hidden / self.heads;
        let (h, i) = (self.hidden, self.intermediate);
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            v.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![self.heads * hd, h],
            ));
            v.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![self.kv_heads * hd, h],
            ));
            v.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![self.kv_heads * hd, h],
            ));
            v.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, self.heads * hd],
            ));
            v.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            v.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            v.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            v.push((format!("{p}.input_layernorm.weight"), vec![h]));
            v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        v.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        v
    }

    /// `config.json` for these shapes.
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_positions,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "bos_token_id": 1,
            "eos_token_id": 2
        })
    }
}

/// Values of a tensor: norms near 1, weights N(0, std) with std = 1/sqrt(fan_in) scaled down.
fn random_values(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    if name.ends_with("norm.weight") {
        return (0..n)
            .map(|_| 1.0 + 0.1 * (rng.gen::<f32>() - 0.5))
            .collect();
    }
    let std = 0.5 / (*shape.last().unwrap_or(&1) as f32).sqrt();
    gaussian(&mut rng, n, std)
}

/// Box-Muller normals; fast enough to write gigabytes.
fn gaussian(rng: &mut impl Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f32 = rng.gen::<f32>().max(1e-12);
        let u2: f32 = rng.gen();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
        out.push(r * c);
        out.push(r * s);
    }
    out.truncate(n);
    out
}

fn seed_for(name: &str, seed: u64) -> u64 {
    name.bytes()
        .fold(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
        })
}

/// How a random checkpoint is made.
pub struct RandomCheckpoint<'a> {
    /// Shapes.
    pub shape: RandomShape,
    /// Stored dtype: `bf16` or `f32`.
    pub bf16: bool,
    /// Seed.
    pub seed: u64,
    /// Make a fine-tune of this base instead: W = W_base + noise·N(0,1)·std(W_base-row scale).
    pub finetune_of: Option<(&'a Checkpoint, f32)>,
    /// Largest shard in bytes.
    pub max_shard_bytes: usize,
    /// Copy tokenizer files from here, if given.
    pub tokenizer_from: Option<&'a Path>,
}

impl RandomCheckpoint<'_> {
    /// Writes the checkpoint directory (config.json, shards, index) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let io = |e: std::io::Error| ModelError::BadFile {
            path: dir.to_path_buf(),
            msg: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let tensors = self.shape.tensors();
        let elem = if self.bf16 { 2 } else { 4 };
        // Group tensors into shards by size.
        let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![vec![]];
        let mut size = 0usize;
        for (name, shape) in tensors {
            let b = shape.iter().product::<usize>() * elem;
            if size + b > self.max_shard_bytes && !shards.last().is_some_and(|s| s.is_empty()) {
                shards.push(vec![]);
                size = 0;
            }
            size += b;
            shards
                .last_mut()
                .expect("one shard exists. This is a bug.")
                .push((name, shape));
        }
        let n = shards.len();
        let mut weight_map = BTreeMap::new();
        let mut total = 0usize;
        for (si, shard) in shards.iter().enumerate() {
            let file = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
            };
            let data: Vec<(String, Vec<usize>, Vec<u8>)> = shard
                .par_iter()
                .map(|(name, shape)| -> Result<_> {
                    let mut v = random_values(name, shape, seed_for(name, self.seed));
                    if let Some((base, noise)) = self.finetune_of {
                        let b = base.load_any(
                            name,
                            candle_core::DType::F32,
                            &candle_core::Device::Cpu,
                        )?;
                        let b: Vec<f32> = b.flatten_all()?.to_vec1()?;
                        let scale = noise
                            * (b.iter().map(|x| x * x).sum::<f32>() / b.len().max(1) as f32).sqrt();
                        for (x, bb) in v.iter_mut().zip(&b) {
                            // A fine-tune moves weights a little: noise relative to the weights' RMS.
                            *x = bb
                                + scale * *x
                                    / (0.5 / (*shape.last().unwrap_or(&1) as f32).sqrt())
                                        .max(1e-12);
                        }
                    }
                    let bytes = if self.bf16 {
                        v.iter()
                            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                            .collect()
                    } else {
                        v.iter().flat_map(|x| x.to_le_bytes()).collect()
                    };
                    Ok((name.clone(), shape.clone(), bytes))
                })
                .collect::<Result<_>>()?;
            let dtype = if self.bf16 {
                safetensors::Dtype::BF16
            } else {
                safetensors::Dtype::F32
            };
            let views: Vec<(String, safetensors::tensor::TensorView)> = data
                .iter()
                .map(|(n, s, b)| {
                    safetensors::tensor::TensorView::new(dtype, s.clone(), b)
                        .map(|v| (n.clone(), v))
                        .map_err(|e| ModelError::Input(format!("{n}: {e}")))
                })
                .collect::<Result<_>>()?;
            for (name, _, b) in &data {
                weight_map.insert(name.clone(), file.clone());
                total += b.len();
            }
            safetensors::serialize_to_file(views, None, &dir.join(&file)).map_err(|e| {
                ModelError::BadFile {
                    path: dir.join(&file),
                    msg: e.to_string(),
                }
            })?;
        }
        if n > 1 {
            let index =
                serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())
                .map_err(io)?;
        }
        let mut cfg = self.shape.config_json();
        cfg["torch_dtype"] = if self.bf16 { "bfloat16" } else { "float32" }.into();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&cfg).unwrap_or_default(),
        )
        .map_err(io)?;
        if let Some(src) = self.tokenizer_from {
            for f in [
                "tokenizer.json",
                "tokenizer_config.json",
                "generation_config.json",
            ] {
                if src.join(f).exists() {
                    std::fs::copy(src.join(f), dir.join(f)).map_err(io)?;
                }
            }
        }
        Ok(())
    }
}
