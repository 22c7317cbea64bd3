//! Tiny random Llama checkpoints written on the fly, and the transformers fixture's location.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use deltaserve_model::{Checkpoint, LayerDelta, LinearDelta, Model, Proj, TenantWeights};

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// Deterministic pseudo-random numbers (splitmix64), roughly uniform in [-1, 1).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * amp).collect()
    }
}

pub const VOCAB: usize = 48;
pub const HIDDEN: usize = 16;
pub const INTER: usize = 40;
pub const LAYERS: usize = 2;

fn shapes() -> Vec<(String, Vec<usize>)> {
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for (m, s) in [
            ("self_attn.q_proj", [HIDDEN, HIDDEN]),
            ("self_attn.k_proj", [HIDDEN / 2, HIDDEN]),
            ("self_attn.v_proj", [HIDDEN / 2, HIDDEN]),
            ("self_attn.o_proj", [HIDDEN, HIDDEN]),
            ("mlp.gate_proj", [INTER, HIDDEN]),
            ("mlp.up_proj", [INTER, HIDDEN]),
            ("mlp.down_proj", [HIDDEN, INTER]),
        ] {
            v.push((format!("{p}.{m}.weight"), s.to_vec()));
        }
        v.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
    }
    v.push(("model.norm.weight".into(), vec![HIDDEN]));
    v.push(("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
    v
}

/// Random weights of the tiny model (norms at 1 + noise).
pub fn random_weights(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Rng::new(seed);
    shapes()
        .into_iter()
        .map(|(n, s)| {
            let numel = s.iter().product();
            let vals = if n.ends_with("norm.weight") {
                rng.vec(numel, 0.1).into_iter().map(|x| 1.0 + x).collect()
            } else {
                rng.vec(numel, 0.5)
            };
            (n, s, vals)
        })
        .collect()
}

/// The same weights with every projection moved by uniform noise of amplitude `amp`.
pub fn perturbed(
    weights: &[(String, Vec<usize>, Vec<f32>)],
    seed: u64,
    amp: f32,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Rng::new(seed);
    weights
        .iter()
        .map(|(n, s, v)| {
            let v = if Proj::parse_tensor_name(n).is_some() {
                v.iter().map(|x| x + rng.next() * amp).collect()
            } else {
                v.clone()
            };
            (n.clone(), s.clone(), v)
        })
        .collect()
}

/// Writes config.json + model.safetensors (f32) into `dir`.
pub fn write_checkpoint(dir: &Path, weights: &[(String, Vec<usize>, Vec<f32>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "eos_token_id": 1
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let tensors: HashMap<String, Tensor> = weights
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

pub struct Tiny {
    pub _dir: tempfile::TempDir,
    pub base_ckpt: Checkpoint,
    pub ft_ckpt: Checkpoint,
    pub base: Model,
    pub finetuned: Model,
}

/// A base and a fine-tune (projections perturbed by `amp`), loaded in f32.
pub fn tiny_pair(amp: f32) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let w = random_weights(7);
    write_checkpoint(&dir.path().join("base"), &w);
    write_checkpoint(&dir.path().join("ft"), &perturbed(&w, 99, amp));
    let base_ckpt = Checkpoint::open(dir.path().join("base")).unwrap();
    let ft_ckpt = Checkpoint::open(dir.path().join("ft")).unwrap();
    let base = Model::load(&base_ckpt, DType::F32, &Device::Cpu).unwrap();
    let finetuned = Model::load(&ft_ckpt, DType::F32, &Device::Cpu).unwrap();
    Tiny {
        _dir: dir,
        base_ckpt,
        ft_ckpt,
        base,
        finetuned,
    }
}

fn weight_diff(base: &Model, ft: &Model, l: usize, k: usize) -> Tensor {
    (&ft.layers[l].linears[k].weight - &base.layers[l].linears[k].weight).unwrap()
}

/// A tenant holding the exact dense difference of every projection.
pub fn dense_tenant(base: &Model, ft: &Model) -> TenantWeights {
    let mut t = TenantWeights::empty(base.layers.len());
    for (l, ld) in t.layers.iter_mut().enumerate() {
        for p in Proj::ALL {
            ld.linears[p.index()] = Some(LinearDelta::Dense {
                diff: weight_diff(base, ft, l, p.index()),
            });
        }
    }
    t
}

/// A BitDelta tenant: signs of the difference and scale mean|Δ| (times `scale_factor`).
pub fn sign_tenant(base: &Model, ft: &Model, scale_factor: f32) -> TenantWeights {
    let mut t = TenantWeights::empty(base.layers.len());
    for (l, ld) in t.layers.iter_mut().enumerate() {
        for p in Proj::ALL {
            let d = weight_diff(base, ft, l, p.index());
            let (n, k) = d.dims2().unwrap();
            let vals: Vec<f32> = d.flatten_all().unwrap().to_vec1().unwrap();
            let scale =
                vals.iter().map(|x| x.abs()).sum::<f32>() / vals.len() as f32 * scale_factor;
            let words = deltaserve_format::pack_signs(&vals, n, k);
            let bits = deltaserve_kernels::SignBits::from_words(words, n, k, &Device::Cpu).unwrap();
            ld.linears[p.index()] = Some(LinearDelta::Sign {
                bits,
                scale: Tensor::new(&[scale], &Device::Cpu).unwrap(),
            });
        }
    }
    let _ = LayerDelta::default();
    t
}
