//! `merge`: base + delta → a Hugging Face checkpoint directory.

mod common;

use common::*;
use deltaserve_codecs::numeric::FloatDtype;
use deltaserve_codecs::{merge, CodecError, MergeOptions};
use deltaserve_format::{unpack_signs, DeltaFile, TensorEntry};
use deltaserve_model::Checkpoint;
use safetensors::Dtype;

#[test]
fn merged_matrix_is_base_plus_scale_times_sign_exactly_in_f32() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let delta_path = compress_pair(&pair);
    let out = pair.path("merged");
    merge_to(&pair.base_dir, &delta_path, &merge_opts(&out));
    let delta = DeltaFile::open(&delta_path).unwrap();
    let merged = Checkpoint::open(&out).unwrap();
    let mut checked = 0;
    for (name, entry) in &delta.header().tensors {
        let got = read_f32(&merged, name);
        let TensorEntry::Sign { .. } = entry else {
            assert_eq!(&got, &pair.finetuned[name].1, "{name}: stored in full");
            continue;
        };
        let scale = delta.scale(entry).unwrap();
        let base = &pair.base[name].1;
        let ft = &pair.finetuned[name].1;
        let want: Vec<f32> = base
            .iter()
            .zip(ft)
            .map(|(&b, &f)| b + if f - b >= 0.0 { scale } else { -scale })
            .collect();
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{name}"
        );
        checked += 1;
    }
    assert_eq!(checked, 14);
    assert_eq!(
        merged
            .raw("model.layers.0.mlp.up_proj.weight")
            .unwrap()
            .dtype,
        Dtype::F32
    );
}

#[test]
fn merged_bf16_matrix_rounds_like_torch_add() {
    let pair = Pair::new(Spec::llama(Dtype::BF16));
    let delta_path = compress_pair(&pair);
    let out = pair.path("merged");
    merge_to(&pair.base_dir, &delta_path, &merge_opts(&out));
    let delta = DeltaFile::open(&delta_path).unwrap();
    let merged = Checkpoint::open(&out).unwrap();
    let name = "model.layers.1.self_attn.o_proj.weight";
    let entry = delta.entry(name).unwrap();
    let TensorEntry::Sign {
        shape: [rows, cols],
        ..
    } = entry
    else {
        panic!()
    };
    let signs = unpack_signs(&delta.sign_words(entry).unwrap(), *rows, *cols);
    let bf = |x: f32| half::bf16::from_f32(x).to_f32();
    let scale = delta.scale(entry).unwrap();
    // load_diff: weight.add_(((unpack(mask) * 2 - 1) * coeff).to(bf16))
    let want: Vec<f32> = pair.base[name]
        .1
        .iter()
        .zip(&signs)
        .map(|(&b, &s)| bf(b + bf(s * scale)))
        .collect();
    assert_eq!(merged.raw(name).unwrap().dtype, Dtype::BF16);
    assert_eq!(read_f32(&merged, name), want);
}

#[test]
fn merge_writes_a_loadable_checkpoint_with_config_and_tokenizer_files() {
    let pair = Pair::new(Spec::llama(Dtype::BF16));
    std::fs::write(pair.base_dir.join("tokenizer.json"), r#"{"base": true}"#).unwrap();
    std::fs::write(pair.ft_dir.join("tokenizer.json"), r#"{"base": true}"#).unwrap();
    std::fs::write(
        pair.base_dir.join("generation_config.json"),
        r#"{"do_sample": false}"#,
    )
    .unwrap();
    std::fs::write(
        pair.ft_dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|end|>"}"#,
    )
    .unwrap();
    let delta = compress_pair(&pair);
    let out = pair.path("merged");
    let report = merge_to(&pair.base_dir, &delta, &merge_opts(&out));
    assert_eq!(report.shards, 1);
    assert_eq!(report.tensors, pair.finetuned.len());
    assert_eq!(
        dir_entries(&out),
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config, pair.spec.config());
    // The fine-tune's tokenizer_config (from the delta), the base's tokenizer.json (the same).
    assert!(std::fs::read_to_string(out.join("tokenizer_config.json"))
        .unwrap()
        .contains("<|end|>"));
    assert_eq!(
        std::fs::read_to_string(out.join("tokenizer.json")).unwrap(),
        r#"{"base": true}"#
    );
    let merged = Checkpoint::open(&out).unwrap();
    assert_eq!(merged.tensor_names().len(), pair.finetuned.len());
    // safetensors' own reader agrees, and every tensor is aligned to its element size.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    for (_, view) in st.tensors() {
        let offset = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
        assert_eq!((offset - 8 - n) % 2, 0);
    }
}

#[test]
fn merge_shards_with_an_index() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let delta = compress_pair(&pair);
    let out = pair.path("merged");
    let opts = MergeOptions {
        max_shard_size: 40_000,
        ..merge_opts(&out)
    };
    let report = merge_to(&pair.base_dir, &delta, &opts);
    assert!(report.shards > 2, "{report}");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let total: usize = pair
        .finetuned
        .values()
        .map(|(s, _)| 4 * s.iter().product::<usize>())
        .sum();
    assert_eq!(index["metadata"]["total_size"], total);
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), pair.finetuned.len());
    let last = format!(
        "model-{:05}-of-{:05}.safetensors",
        report.shards, report.shards
    );
    assert!(out.join(&last).is_file());
    assert!(!out.join("model.safetensors").exists());
    for i in 1..=report.shards {
        let f = out.join(format!("model-{i:05}-of-{:05}.safetensors", report.shards));
        let size = std::fs::metadata(&f).unwrap().len();
        // Shards hold at most 40 kB of tensors unless one tensor is bigger (embed: 67x48x4 = 12.9 kB).
        assert!(size < 41_000, "{}: {size}", f.display());
    }
    let merged = Checkpoint::open(&out).unwrap();
    assert_eq!(
        read_f32(&merged, "model.norm.weight"),
        pair.finetuned["model.norm.weight"].1
    );
}

#[test]
fn merge_to_f32_from_bf16_base_adds_without_rounding() {
    let pair = Pair::new(Spec::llama(Dtype::BF16));
    let delta_path = compress_pair(&pair);
    let out = pair.path("merged32");
    let opts = MergeOptions {
        dtype: Some(FloatDtype::F32),
        ..merge_opts(&out)
    };
    merge_to(&pair.base_dir, &delta_path, &opts);
    let merged = Checkpoint::open(&out).unwrap();
    let delta = DeltaFile::open(&delta_path).unwrap();
    let name = "model.layers.0.mlp.gate_proj.weight";
    let entry = delta.entry(name).unwrap();
    let signs = unpack_signs(&delta.sign_words(entry).unwrap(), 100, 48);
    let scale = delta.scale(entry).unwrap();
    let want: Vec<f32> = pair.base[name]
        .1
        .iter()
        .zip(&signs)
        .map(|(b, s)| b + s * scale)
        .collect();
    assert_eq!(merged.raw(name).unwrap().dtype, Dtype::F32);
    assert_eq!(read_f32(&merged, name), want);
    assert_eq!(merged.raw("model.norm.weight").unwrap().dtype, Dtype::F32);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float32");
}

#[test]
fn issue_3_qwen2_biases_survive_merge() {
    let pair = Pair::new(Spec::qwen2(Dtype::BF16));
    let delta = compress_pair(&pair);
    let out = pair.path("merged");
    merge_to(&pair.base_dir, &delta, &merge_opts(&out));
    let merged = Checkpoint::open(&out).unwrap();
    let mut biases = 0;
    for name in merged.tensor_names() {
        if name.ends_with(".bias") {
            assert_eq!(read_f32(&merged, name), pair.finetuned[name].1, "{name}");
            assert_ne!(
                pair.finetuned[name].1, pair.base[name].1,
                "{name}: the test needs changed biases"
            );
            biases += 1;
        }
    }
    assert_eq!(biases, 3 * pair.spec.layers);
}

#[test]
fn extra_vocab_finetune_merges_with_the_new_rows() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let bigger = Spec {
        vocab: pair.spec.vocab + 5,
        ..pair.spec.clone()
    };
    let mut weights = pair.finetuned.clone();
    let extra = random_weights(&bigger, 5);
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        weights.insert(name.into(), extra[name].clone());
    }
    let ft = pair.path("bigger");
    write_model(&ft, &bigger, &weights, 1);
    compress_dirs(&pair.base_dir, &ft, &pair.path("big.delta"));
    let out = pair.path("merged");
    merge_to(&pair.base_dir, &pair.path("big.delta"), &merge_opts(&out));
    let merged = Checkpoint::open(&out).unwrap();
    assert_eq!(merged.config().vocab_size, 72);
    let embed = merged.raw("model.embed_tokens.weight").unwrap();
    assert_eq!(embed.shape, [72, 48]);
    assert_eq!(
        read_f32(&merged, "model.embed_tokens.weight"),
        extra["model.embed_tokens.weight"].1
    );
    assert_eq!(
        read_f32(&merged, "lm_head.weight"),
        extra["lm_head.weight"].1
    );
}

fn try_merge(base: &std::path::Path, delta: &std::path::Path, opts: &MergeOptions) -> CodecError {
    let base = Checkpoint::open(base).unwrap();
    let delta = DeltaFile::open(delta).unwrap();
    merge(&base, &delta, opts).unwrap_err()
}

#[test]
fn delta_on_the_wrong_base_is_refused_naming_both_fingerprints() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let delta = compress_pair(&pair);
    let other = pair.path("other_base");
    write_model(&other, &pair.spec, &random_weights(&pair.spec, 99), 1);
    let out = pair.path("merged");
    let err = try_merge(&other, &delta, &merge_opts(&out));
    let msg = err.to_string();
    let recorded = DeltaFile::open(&delta)
        .unwrap()
        .header()
        .base
        .short()
        .to_owned();
    let other_ckpt = Checkpoint::open(&other).unwrap();
    let found = deltaserve_format::fingerprint_safetensors(&other_ckpt.weight_files()).unwrap();
    assert!(
        msg.contains(&recorded) && msg.contains(found.short()),
        "{msg}"
    );
    assert!(!out.exists());
    assert!(dir_entries(pair.tmp.path())
        .iter()
        .all(|n| !n.starts_with('.')));
}

#[test]
fn truncated_delta_is_refused() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let delta = compress_pair(&pair);
    let bytes = std::fs::read(&delta).unwrap();
    let cut = pair.path("cut.delta");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = DeltaFile::open(&cut).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    std::fs::write(&cut, &bytes[..5]).unwrap();
    assert!(DeltaFile::open(&cut)
        .unwrap_err()
        .to_string()
        .contains("truncated"));
}

#[test]
fn existing_output_is_refused_untouched_and_replaced_with_force() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let delta = compress_pair(&pair);
    let out = pair.path("merged");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let err = try_merge(&pair.base_dir, &delta, &merge_opts(&out));
    assert!(matches!(err, CodecError::OutputExists { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(dir_entries(&out), ["keep.txt"]);

    let forced = MergeOptions {
        force: true,
        ..merge_opts(&out)
    };
    merge_to(&pair.base_dir, &delta, &forced);
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors").is_file());
    assert!(
        dir_entries(pair.tmp.path())
            .iter()
            .all(|n| !n.starts_with('.')),
        "{:?}",
        dir_entries(pair.tmp.path())
    );
}

#[test]
fn unwritable_output_directory_is_a_clear_error() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let delta = compress_pair(&pair);
    let file = pair.path("not_a_dir");
    std::fs::write(&file, b"").unwrap();
    let err = try_merge(&pair.base_dir, &delta, &merge_opts(&file.join("merged")));
    let msg = err.to_string();
    assert!(
        msg.starts_with("cannot create directory") && msg.contains("not_a_dir"),
        "{msg}"
    );
}
