//! Tiny Llama-shaped model pairs written to a temp dir: a random base, a fine-tune that is the base
//! plus structured noise, a byte-level tokenizer, calibration text, and a BitDelta delta of the
//! pair (signs of W_ft − W_base, scale mean|W_ft − W_base|, everything else stored in full).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use deltaserve_format::{
    fingerprint_safetensors, pack_signs, write_delta, DeltaHeader, Dtype, FinetuneInfo, FullValue,
    OwnedTensor, TensorEntry,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const VOCAB: usize = 260;
pub const HIDDEN: usize = 32;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const INTER: usize = 64;
const PROJS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// A base/fine-tune pair with its delta and data.
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub base: PathBuf,
    pub finetuned: PathBuf,
    pub delta: PathBuf,
    pub data: PathBuf,
}

impl Pair {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub fn config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "eos_token_id": 256,
    })
}

/// A Qwen2 config (biases on q/k/v) of the same shape.
pub fn qwen2_config() -> serde_json::Value {
    let mut c = config();
    c["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    c["model_type"] = "qwen2".into();
    c
}

/// Adds q/k/v biases (as Qwen2 has) to a list of tensors, seeded.
pub fn with_qkv_biases(
    mut tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    seed: u64,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let hd = HIDDEN / HEADS;
    for l in 0..LAYERS {
        for (proj, out) in [
            ("q_proj", HEADS * hd),
            ("k_proj", KV_HEADS * hd),
            ("v_proj", KV_HEADS * hd),
        ] {
            let name = format!("model.layers.{l}.self_attn.{proj}.bias");
            tensors.push((name, vec![out], randn(&mut rng, out, 0.5)));
        }
    }
    tensors
}

fn shapes() -> Vec<(String, Vec<usize>)> {
    let hd = HIDDEN / HEADS;
    let mut v = vec![
        ("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN]),
        ("model.norm.weight".to_string(), vec![HIDDEN]),
        ("lm_head.weight".to_string(), vec![VOCAB, HIDDEN]),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let outs = [
            HEADS * hd,
            KV_HEADS * hd,
            KV_HEADS * hd,
            HIDDEN,
            INTER,
            INTER,
            HIDDEN,
        ];
        let ins = [HIDDEN, HIDDEN, HIDDEN, HEADS * hd, HIDDEN, HIDDEN, INTER];
        for ((proj, o), i) in PROJS.iter().zip(outs).zip(ins) {
            v.push((format!("{p}.{proj}.weight"), vec![o, i]));
        }
        v.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
    }
    v
}

fn randn(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    // Box-Muller.
    (0..n)
        .map(|_| {
            let u: f32 = rng.gen_range(1e-7f32..1.0);
            let v: f32 = rng.gen_range(0f32..1.0);
            std * (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
        })
        .collect()
}

/// Random base weights: projections ~ N(0, 0.2²) (large enough that logits are far from uniform),
/// norms near 1.
pub fn random_base(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values = if shape.len() == 1 {
                randn(&mut rng, n, 0.1)
                    .into_iter()
                    .map(|v| 1.0 + v)
                    .collect()
            } else {
                randn(&mut rng, n, 0.2)
            };
            (name, shape, values)
        })
        .collect()
}

/// The base plus structured noise: per matrix a rank-2 change with its own magnitude plus small
/// dense noise (so one scale per matrix cannot represent it exactly), and small changes to
/// embeddings, norms and lm_head.
pub fn finetune_of(
    base: &[(String, Vec<usize>, Vec<f32>)],
    seed: u64,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    base.iter()
        .map(|(name, shape, values)| {
            let mut v = values.clone();
            if shape.len() == 2 && name.starts_with("model.layers.") {
                let (r, c) = (shape[0], shape[1]);
                let magnitude = rng.gen_range(0.02f32..0.08);
                for _ in 0..2 {
                    let u = randn(&mut rng, r, 1.0);
                    let w = randn(&mut rng, c, 1.0);
                    for i in 0..r {
                        for j in 0..c {
                            v[i * c + j] += magnitude * u[i] * w[j];
                        }
                    }
                }
                for (x, e) in v.iter_mut().zip(randn(&mut rng, r * c, 0.005)) {
                    *x += e;
                }
            } else {
                for (x, e) in v.iter_mut().zip(randn(&mut rng, values.len(), 0.02)) {
                    *x += e;
                }
            }
            (name.clone(), shape.clone(), v)
        })
        .collect()
}

/// GPT-2's byte-to-unicode table: the characters a byte-level BPE vocabulary uses for bytes.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (u32::from('!')..=u32::from('~')).collect();
    bs.extend(u32::from('¡')..=u32::from('¬'));
    bs.extend(u32::from('®')..=u32::from('ÿ'));
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// A byte-level BPE tokenizer with no merges (one token per byte, ids 0..256) plus four special
/// tokens (256..260), a chat template and `<|end|>` as EOS.
pub fn write_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    for (b, c) in bytes_to_unicode().into_iter().enumerate() {
        vocab.insert(c.to_string(), b.into());
    }
    let specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"];
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            vocab.insert(s.to_string(), (256 + i).into());
            serde_json::json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []},
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let template = "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";
    let cfg = serde_json::json!({"eos_token": "<|end|>", "pad_token": "<|endoftext|>", "bos_token": null,
                                 "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
}

pub fn write_model(
    dir: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    config: &serde_json::Value,
) {
    std::fs::create_dir_all(dir).unwrap();
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    write_tokenizer(dir);
}

/// BitDelta compression of a pair written by [`write_model`] (F32 weights): projections become
/// signs + mean|D|, everything else is stored as the fine-tune's value.
pub fn compress(base_dir: &Path, ft_dir: &Path, out: &Path) {
    compress_with_scale_factor(base_dir, ft_dir, out, 1.0)
}

/// [`compress`], with every scale multiplied by `factor` (a deliberately mis-initialised delta).
pub fn compress_with_scale_factor(base_dir: &Path, ft_dir: &Path, out: &Path, factor: f32) {
    let load = |d: &Path| {
        candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap()
    };
    let (base, ft) = (load(base_dir), load(ft_dir));
    let ft_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ft_dir.join("config.json")).unwrap())
            .unwrap();
    let fp = fingerprint_safetensors(&[base_dir.join("model.safetensors")]).unwrap();
    let mut header = DeltaHeader::new(
        "bitdelta",
        fp,
        FinetuneInfo {
            config: Some(ft_config),
            ..Default::default()
        },
    );
    let mut tensors = Vec::new();
    let mut names: Vec<&String> = ft.keys().collect();
    names.sort();
    for name in names {
        let w = &ft[name];
        let is_proj = name.starts_with("model.layers.") && w.rank() == 2;
        if is_proj {
            let (r, c) = w.dims2().unwrap();
            let d: Vec<f32> = (w - &base[name])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            // BitDelta eq. (2): alpha = mean |W_ft - W_base|.
            let scale = factor
                * (d.iter().map(|x| f64::from(x.abs())).sum::<f64>() / d.len() as f64) as f32;
            let words = pack_signs(&d, r, c);
            header
                .tensors
                .insert(name.clone(), TensorEntry::sign(name, [r, c], Dtype::F32));
            tensors.push((
                format!("{name}.signs"),
                OwnedTensor::from_u32(vec![r, c.div_ceil(32)], &words),
            ));
            tensors.push((format!("{name}.scale"), OwnedTensor::scale(scale)));
        } else {
            let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            header.tensors.insert(
                name.clone(),
                TensorEntry::full(name, FullValue::Finetuned, w.dims().to_vec(), Dtype::F32),
            );
            tensors.push((name.clone(), OwnedTensor::from_f32(w.dims().to_vec(), &v)));
        }
    }
    write_delta(out, &header, tensors, true).unwrap();
}

/// Text that exercises every byte range a little; `n` repetitions of a few varied paragraphs.
pub fn calibration_text(n: usize, seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    let words = [
        "def", "return", "self", "value", "import", "class", "None", "for", "in", "range", "(",
        ")", ":", "=", "+",
    ];
    let mut s = String::new();
    for i in 0..n {
        for _ in 0..40 {
            s.push_str(words[rng.gen_range(0..words.len())]);
            s.push(' ');
        }
        s.push_str(&format!("\n# paragraph {i}\n\n"));
    }
    s
}

/// A full pair in a temp dir: base (seed 1), fine-tune (seed 2), delta, data.
pub fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let base_t = random_base(1);
    let ft_t = finetune_of(&base_t, 2);
    let base = dir.path().join("base");
    let finetuned = dir.path().join("finetuned");
    write_model(&base, &base_t, &config());
    write_model(&finetuned, &ft_t, &config());
    let delta = dir.path().join("ft.delta");
    compress(&base, &finetuned, &delta);
    let data = dir.path().join("calib.txt");
    std::fs::write(&data, calibration_text(30, 3)).unwrap();
    Pair {
        dir,
        base,
        finetuned,
        delta,
        data,
    }
}
