//! Small Llama-shaped Hugging Face checkpoints with random weights, written to temp dirs, and
//! helpers to read tensors back and run models.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use deltaserve_codecs::numeric::FloatDtype;
use deltaserve_model::{Checkpoint, ForwardOptions, LogitsWanted, Model, SeqInput, TenantWeights};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// The shape of a tiny model.
#[derive(Debug, Clone)]
pub struct Spec {
    pub arch: &'static str,
    pub model_type: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tie: bool,
    pub qkv_bias: bool,
    pub dtype: Dtype,
}

impl Spec {
    /// Llama with GQA and awkward sizes (hidden not a multiple of 32).
    pub fn llama(dtype: Dtype) -> Spec {
        Spec {
            arch: "LlamaForCausalLM",
            model_type: "llama",
            hidden: 48,
            intermediate: 100,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 67,
            tie: false,
            qkv_bias: false,
            dtype,
        }
    }

    /// Qwen2: biases on q/k/v.
    pub fn qwen2(dtype: Dtype) -> Spec {
        Spec {
            arch: "Qwen2ForCausalLM",
            model_type: "qwen2",
            qkv_bias: true,
            ..Spec::llama(dtype)
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    pub fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": [self.arch],
            "model_type": self.model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 128,
            "tie_word_embeddings": self.tie,
            "hidden_act": "silu",
            "torch_dtype": FloatDtype::from_safetensors(self.dtype).unwrap().torch_name(),
        })
    }

    /// Every tensor name with its shape.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let q = self.heads * self.head_dim();
        let kv = self.kv_heads * self.head_dim();
        let mut out = vec![
            ("model.embed_tokens.weight".to_owned(), vec![v, h]),
            ("model.norm.weight".to_owned(), vec![h]),
        ];
        if !self.tie {
            out.push(("lm_head.weight".to_owned(), vec![v, h]));
        }
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("self_attn.q_proj", vec![q, h]),
                ("self_attn.k_proj", vec![kv, h]),
                ("self_attn.v_proj", vec![kv, h]),
                ("self_attn.o_proj", vec![h, q]),
                ("mlp.gate_proj", vec![i, h]),
                ("mlp.up_proj", vec![i, h]),
                ("mlp.down_proj", vec![h, i]),
            ] {
                let out_features = shape[0];
                out.push((format!("{p}.{name}.weight"), shape));
                if self.qkv_bias && name.starts_with("self_attn.") && name != "self_attn.o_proj" {
                    out.push((format!("{p}.{name}.bias"), vec![out_features]));
                }
            }
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        out
    }
}

/// Tensors by name: shape and f32 values (rounded to the checkpoint dtype when written).
pub type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Random weights: matrices uniform in ±0.15, norm weights 1 ± 0.1, biases ±0.02.
pub fn random_weights(spec: &Spec, seed: u64) -> Weights {
    let mut rng = StdRng::seed_from_u64(seed);
    let dtype = FloatDtype::from_safetensors(spec.dtype).unwrap();
    spec.shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    let v = if name.contains("norm") {
                        1.0 + rng.gen_range(-0.1..0.1)
                    } else if name.ends_with(".bias") {
                        rng.gen_range(-0.02..0.02)
                    } else {
                        rng.gen_range(-0.15..0.15)
                    };
                    dtype.round(v)
                })
                .collect();
            (name, (shape, values))
        })
        .collect()
}

/// A fine-tune: every value moved by uniform noise of size `noise`, except every 7th value of
/// each tensor, which is left equal to the base's (zero differences must count as +).
pub fn finetune_of(base: &Weights, spec: &Spec, seed: u64, noise: f32) -> Weights {
    let mut rng = StdRng::seed_from_u64(seed);
    let dtype = FloatDtype::from_safetensors(spec.dtype).unwrap();
    base.iter()
        .map(|(name, (shape, values))| {
            let moved = values
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    if i % 7 == 3 {
                        v
                    } else {
                        dtype.round(v + rng.gen_range(-noise..noise))
                    }
                })
                .collect();
            (name.clone(), (shape.clone(), moved))
        })
        .collect()
}

/// Writes a checkpoint directory: config.json, a tokenizer_config.json, and the weights in
/// `spec.dtype`, as one `model.safetensors` or (with `shards > 1`) several files plus an index.
pub fn write_model(dir: &Path, spec: &Spec, weights: &Weights, shards: usize) {
    write_model_with_config(dir, &spec.config(), spec.dtype, weights, shards);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"}"#,
    )
    .unwrap();
}

pub fn write_model_with_config(
    dir: &Path,
    config: &serde_json::Value,
    dtype: Dtype,
    weights: &Weights,
    shards: usize,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    let float = FloatDtype::from_safetensors(dtype).unwrap();
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(name, (shape, values))| {
            let mut bytes = Vec::new();
            float.encode_into(values, &mut bytes);
            (name.clone(), shape.clone(), bytes)
        })
        .collect();
    fn views(
        dtype: Dtype,
        items: &[(String, Vec<usize>, Vec<u8>)],
    ) -> Vec<(String, TensorView<'_>)> {
        items
            .iter()
            .map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
            .collect()
    }
    if shards <= 1 {
        safetensors::serialize_to_file(
            views(dtype, &encoded),
            None,
            &dir.join("model.safetensors"),
        )
        .unwrap();
        return;
    }
    let per = encoded.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in encoded.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        safetensors::serialize_to_file(views(dtype, chunk), None, &dir.join(&file)).unwrap();
        for (name, _, _) in chunk {
            weight_map.insert(name.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// A base and a fine-tune of `spec` in a temp dir.
pub struct Pair {
    pub tmp: tempfile::TempDir,
    pub spec: Spec,
    pub base: Weights,
    pub finetuned: Weights,
    pub base_dir: PathBuf,
    pub ft_dir: PathBuf,
}

impl Pair {
    pub fn new(spec: Spec) -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let base = random_weights(&spec, 1);
        let finetuned = finetune_of(&base, &spec, 2, 0.01);
        let base_dir = tmp.path().join("base");
        let ft_dir = tmp.path().join("finetuned");
        write_model(&base_dir, &spec, &base, 1);
        write_model(&ft_dir, &spec, &finetuned, 1);
        Pair {
            tmp,
            spec,
            base,
            finetuned,
            base_dir,
            ft_dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

/// A tensor of a checkpoint as f32 values.
pub fn read_f32(ckpt: &Checkpoint, name: &str) -> Vec<f32> {
    let raw = ckpt.raw(name).unwrap();
    FloatDtype::from_safetensors(raw.dtype)
        .unwrap()
        .decode(raw.data)
}

/// All-position logits of `tokens` through `model` (with `tenant` applied, if any), as f32.
pub fn logits(model: &Model, tenant: Option<&TenantWeights>, tokens: &[u32]) -> Vec<f32> {
    let mut seqs = [SeqInput {
        tokens,
        cache: None,
        tenant,
        logits: LogitsWanted::All,
    }];
    let out = model.forward(&mut seqs, ForwardOptions::default()).unwrap();
    out[0].flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Loads a checkpoint directory as an f32 CPU model.
pub fn load_f32(dir: &Path) -> (Checkpoint, Model) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let model = Model::load(&ckpt, DType::F32, &Device::Cpu).unwrap();
    (ckpt, model)
}

/// max |a - b| / max |b|, printing the first differing pairs on failure (llm.c check_tensor).
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rel_tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let max_diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    if max_diff / scale > rel_tol {
        let firsts: Vec<String> = got
            .iter()
            .zip(want)
            .enumerate()
            .filter(|(_, (a, b))| (*a - *b).abs() / scale > rel_tol)
            .take(5)
            .map(|(i, (a, b))| format!("[{i}] {a} vs {b}"))
            .collect();
        panic!(
            "{what}: max |diff| {max_diff} = {} of max |want| {scale} > {rel_tol}; first: {}",
            max_diff / scale,
            firsts.join(", ")
        );
    }
}

/// A tensor as an f32 CPU candle tensor (for tests that build one by hand).
pub fn tensor(values: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// The fixture checkpoint `name` under tests/fixtures/models, or `None` (with a visible
/// SKIPPED line) while another engineer has not committed it yet.
pub fn fixture(name: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name);
    if dir.join("config.json").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: fixture {} is missing (generate it with scripts/reference/make_fixtures.py)",
            dir.display()
        );
        None
    }
}

/// Compresses a pair to `{tmp}/ft.delta` (no progress bar) and returns its path.
pub fn compress_pair(pair: &Pair) -> PathBuf {
    let out = pair.path("ft.delta");
    compress_dirs(&pair.base_dir, &pair.ft_dir, &out);
    out
}

pub fn compress_dirs(
    base: &Path,
    finetuned: &Path,
    out: &Path,
) -> deltaserve_codecs::bitdelta::CompressReport {
    let base = Checkpoint::open(base).unwrap();
    let finetuned = Checkpoint::open(finetuned).unwrap();
    let opts = deltaserve_codecs::bitdelta::CompressOptions {
        out: out.to_owned(),
        force: false,
        progress: false,
    };
    deltaserve_codecs::bitdelta::compress(&base, &finetuned, &opts).unwrap()
}

/// Merge options writing to `out`, one shard, dtype as the base.
pub fn merge_opts(out: &Path) -> deltaserve_codecs::MergeOptions {
    deltaserve_codecs::MergeOptions {
        out: out.to_owned(),
        force: false,
        max_shard_size: deltaserve_codecs::merge::DEFAULT_MAX_SHARD_SIZE,
        dtype: None,
        progress: false,
    }
}

/// Merges `delta` onto `base` into `out`.
pub fn merge_to(
    base: &Path,
    delta: &Path,
    opts: &deltaserve_codecs::MergeOptions,
) -> deltaserve_codecs::MergeReport {
    let base = Checkpoint::open(base).unwrap();
    let delta = deltaserve_format::DeltaFile::open(delta).unwrap();
    deltaserve_codecs::merge(&base, &delta, opts).unwrap()
}

/// Names of the entries of a directory, sorted.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
