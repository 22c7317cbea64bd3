//! `bitdelta::compress`: what it stores, and the inputs it refuses.

mod common;

use common::*;
use deltaserve_codecs::bitdelta::{compress, compress_with, is_compressed, CompressOptions};
use deltaserve_codecs::{inspect, CodecError};
use deltaserve_format::{unpack_signs, DeltaFile, FullValue, TensorEntry};
use deltaserve_model::Checkpoint;
use safetensors::Dtype;

fn opts(out: &std::path::Path) -> CompressOptions {
    CompressOptions {
        out: out.to_owned(),
        force: false,
        progress: false,
    }
}

fn try_compress(base: &std::path::Path, ft: &std::path::Path, out: &std::path::Path) -> CodecError {
    let base = Checkpoint::open(base).unwrap();
    let ft = Checkpoint::open(ft).unwrap();
    compress(&base, &ft, &opts(out)).unwrap_err()
}

#[test]
fn projections_become_signs_and_everything_else_is_stored_as_the_finetune() {
    let pair = Pair::new(Spec::qwen2(Dtype::F32));
    let path = compress_pair(&pair);
    let delta = DeltaFile::open(&path).unwrap();
    let header = delta.header();
    assert_eq!(header.method, "bitdelta");
    assert_eq!(header.tensors.len(), pair.finetuned.len());
    for (name, (shape, values)) in &pair.finetuned {
        let entry = &header.tensors[name];
        if is_compressed(name, shape) {
            assert!(
                matches!(entry, TensorEntry::Sign { dtype, .. } if dtype == "F32"),
                "{name}: {entry:?}"
            );
        } else {
            let TensorEntry::Full { tensor, value, .. } = entry else {
                panic!("{name}: {entry:?}")
            };
            assert_eq!(*value, FullValue::Finetuned, "{name}");
            let (bytes, _, _) = delta.tensor_bytes(tensor).unwrap();
            let stored: Vec<f32> = bytes
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(&stored, values, "{name}");
        }
    }
    // 7 projections per layer are compressed; embed, norm, lm_head, 2 norms and 3 biases per layer are not.
    let signs = header
        .tensors
        .values()
        .filter(|e| e.kind() == "sign")
        .count();
    assert_eq!(signs, 7 * pair.spec.layers);
    assert_eq!(
        header.finetuned.config.as_ref().unwrap()["model_type"],
        "qwen2"
    );
    // The tokenizer files are the same as the base's, so they are not stored.
    assert!(header.finetuned.tokenizer_config.is_none());
    assert!(header.finetuned.tokenizer_json.is_none());
    assert!(header.created_by.starts_with("deltaserve "));
    assert!(header.extra.contains_key("bitdelta"));
}

#[test]
fn scale_is_mean_abs_difference_in_f64_and_bit_one_means_nonnegative() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let delta = DeltaFile::open(compress_pair(&pair)).unwrap();
    let mut zeros = 0;
    for (name, entry) in &delta.header().tensors {
        let TensorEntry::Sign {
            shape: [rows, cols],
            ..
        } = entry
        else {
            continue;
        };
        let base = &pair.base[name].1;
        let ft = &pair.finetuned[name].1;
        let d: Vec<f32> = ft.iter().zip(base).map(|(f, b)| f - b).collect();
        let mean = d.iter().map(|&x| f64::from(x).abs()).sum::<f64>() / d.len() as f64;
        let scale = delta.scale(entry).unwrap();
        assert!(
            (f64::from(scale) - mean).abs() <= mean * f64::from(f32::EPSILON),
            "{name}: scale {scale} vs f64 mean {mean}"
        );
        let signs = unpack_signs(&delta.sign_words(entry).unwrap(), *rows, *cols);
        for (i, (&x, &s)) in d.iter().zip(&signs).enumerate() {
            zeros += usize::from(x == 0.0);
            assert_eq!(s, if x >= 0.0 { 1.0 } else { -1.0 }, "{name}[{i}]: D = {x}");
        }
    }
    assert!(zeros > 0, "the test pair must have zero differences");
}

#[test]
fn bf16_difference_is_rounded_to_bf16_before_the_mean_as_in_the_reference() {
    let pair = Pair::new(Spec::llama(Dtype::BF16));
    let delta = DeltaFile::open(compress_pair(&pair)).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    let entry = delta.entry(name).unwrap();
    assert_eq!(entry.dtype(), "BF16");
    let bf = |x: f32| half::bf16::from_f32(x).to_f32();
    let (base, ft) = (&pair.base[name].1, &pair.finetuned[name].1);
    let mean = ft
        .iter()
        .zip(base)
        .map(|(f, b)| f64::from(bf(f - b)).abs())
        .sum::<f64>()
        / base.len() as f64;
    assert_eq!(delta.scale(entry).unwrap(), mean as f32);
}

#[test]
fn report_counts_tensors_bytes_and_bits() {
    let pair = Pair::new(Spec::llama(Dtype::BF16));
    let report = compress_dirs(&pair.base_dir, &pair.ft_dir, &pair.path("r.delta"));
    assert_eq!(report.tensors_compressed, 7 * pair.spec.layers);
    assert_eq!(
        report.tensors_full,
        pair.finetuned.len() - 7 * pair.spec.layers
    );
    let total: usize = pair
        .finetuned
        .values()
        .map(|(s, _)| s.iter().product::<usize>())
        .sum();
    assert_eq!(report.total_params, total as u64);
    assert_eq!(
        report.bytes_out,
        std::fs::metadata(pair.path("r.delta")).unwrap().len()
    );
    assert_eq!(
        report.bytes_in,
        std::fs::metadata(pair.ft_dir.join("model.safetensors"))
            .unwrap()
            .len()
    );
    // 48 or 100 columns pad to 64 or 128 bits, plus 32 bits of scale per matrix: 1.3 to 1.4.
    assert!(
        report.bits_per_param > 1.0 && report.bits_per_param < 1.5,
        "{}",
        report.bits_per_param
    );
    assert!((report.ratio_vs_bf16() - 2.0 * total as f64 / report.bytes_out as f64).abs() < 1e-9);
    let text = report.to_string();
    assert!(
        text.contains("14 compressed") && text.contains("bits/param"),
        "{text}"
    );
}

#[test]
fn base_fingerprint_is_that_of_all_base_files() {
    let pair = Pair::new(Spec::llama(Dtype::BF16));
    let delta = DeltaFile::open(compress_pair(&pair)).unwrap();
    let base = Checkpoint::open(&pair.base_dir).unwrap();
    let fp = deltaserve_format::fingerprint_safetensors(&base.weight_files()).unwrap();
    assert_eq!(delta.header().base, fp);
    assert_eq!(fp.tensors, pair.base.len());
}

#[test]
fn sharded_checkpoints_compress_like_single_files() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let sharded_base = pair.path("base_sharded");
    let sharded_ft = pair.path("ft_sharded");
    write_model(&sharded_base, &pair.spec, &pair.base, 3);
    write_model(&sharded_ft, &pair.spec, &pair.finetuned, 2);
    let a = DeltaFile::open(compress_pair(&pair)).unwrap();
    compress_dirs(&sharded_base, &sharded_ft, &pair.path("sharded.delta"));
    let b = DeltaFile::open(pair.path("sharded.delta")).unwrap();
    assert_eq!(a.header().base, b.header().base);
    assert_eq!(a.header().tensors, b.header().tensors);
    for name in a.container_tensor_names() {
        assert_eq!(
            a.tensor_bytes(&name).unwrap().0,
            b.tensor_bytes(&name).unwrap().0,
            "{name}"
        );
    }
}

#[test]
fn differing_tokenizer_and_generation_config_are_stored() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    std::fs::write(
        pair.ft_dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|end|>"}"#,
    )
    .unwrap();
    std::fs::write(pair.ft_dir.join("chat_template.jinja"), "{{ messages }}").unwrap();
    std::fs::write(
        pair.ft_dir.join("generation_config.json"),
        r#"{"temperature": 0.3}"#,
    )
    .unwrap();
    std::fs::write(
        pair.base_dir.join("generation_config.json"),
        r#"{"temperature": 1.0}"#,
    )
    .unwrap();
    // Same JSON, other formatting: not a difference.
    std::fs::write(
        pair.base_dir.join("tokenizer.json"),
        r#"{"a": 1, "b": [2]}"#,
    )
    .unwrap();
    std::fs::write(
        pair.ft_dir.join("tokenizer.json"),
        "{\n  \"b\": [2],\n  \"a\": 1\n}",
    )
    .unwrap();
    let delta = DeltaFile::open(compress_pair(&pair)).unwrap();
    let info = &delta.header().finetuned;
    assert_eq!(
        info.tokenizer_config.as_ref().unwrap()["eos_token"],
        "<|end|>"
    );
    assert_eq!(info.chat_template.as_deref(), Some("{{ messages }}"));
    assert!(info.tokenizer_json.is_none());
    assert_eq!(
        delta.header().extra["generation_config"]["temperature"],
        0.3
    );
}

#[test]
fn different_architecture_is_refused() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let qwen = Spec::qwen2(Dtype::F32);
    let other = pair.path("qwen");
    write_model(&other, &qwen, &random_weights(&qwen, 3), 1);
    let err = try_compress(&pair.base_dir, &other, &pair.path("x.delta"));
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            CodecError::Incompatible {
                field: "architectures",
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("LlamaForCausalLM") && msg.contains("Qwen2ForCausalLM"),
        "{msg}"
    );
    assert!(!pair.path("x.delta").exists());
}

#[test]
fn different_layer_count_is_refused() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let deeper = Spec {
        layers: 3,
        ..pair.spec.clone()
    };
    let other = pair.path("deeper");
    write_model(&other, &deeper, &random_weights(&deeper, 3), 1);
    let err = try_compress(&pair.base_dir, &other, &pair.path("x.delta"));
    assert!(
        matches!(
            err,
            CodecError::Incompatible {
                field: "num_hidden_layers",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("is 2 in the base but 3"), "{err}");
}

#[test]
fn different_projection_shape_is_refused_naming_both_shapes() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let wider = Spec {
        intermediate: 104,
        ..pair.spec.clone()
    };
    let other = pair.path("wider");
    write_model(&other, &wider, &random_weights(&wider, 3), 1);
    let err = try_compress(&pair.base_dir, &other, &pair.path("x.delta"));
    let msg = err.to_string();
    assert!(matches!(err, CodecError::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.0.mlp.down_proj.weight")
            && msg.contains("[48, 100]")
            && msg.contains("[48, 104]"),
        "{msg}"
    );
}

#[test]
fn tensor_missing_from_the_finetune_is_refused() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let mut partial = pair.finetuned.clone();
    partial.remove("model.layers.1.post_attention_layernorm.weight");
    let other = pair.path("partial");
    write_model(&other, &pair.spec, &partial, 1);
    let err = try_compress(&pair.base_dir, &other, &pair.path("x.delta"));
    let msg = err.to_string();
    assert!(matches!(err, CodecError::MissingTensor { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.1.post_attention_layernorm.weight") && msg.contains("fine-tune"),
        "{msg}"
    );
}

#[test]
fn unknown_method_is_refused_listing_known_ones() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let base = Checkpoint::open(&pair.base_dir).unwrap();
    let ft = Checkpoint::open(&pair.ft_dir).unwrap();
    let err = compress_with("lowrank9", &base, &ft, &opts(&pair.path("x.delta"))).unwrap_err();
    // Every registered method is listed, BitDelta first.
    assert!(
        err.to_string().starts_with(
            "unknown compression method \"lowrank9\" (known: bitdelta, lowrank, lowrank-mixed, dare, deltadq"
        ),
        "{err}"
    );
}

#[test]
fn existing_output_is_refused_and_left_untouched() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let out = pair.path("ft.delta");
    std::fs::write(&out, b"precious").unwrap();
    let err = try_compress(&pair.base_dir, &pair.ft_dir, &out);
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");

    let base = Checkpoint::open(&pair.base_dir).unwrap();
    let ft = Checkpoint::open(&pair.ft_dir).unwrap();
    let forced = CompressOptions {
        force: true,
        ..opts(&out)
    };
    compress(&base, &ft, &forced).unwrap();
    DeltaFile::open(&out).unwrap();
    assert!(dir_entries(pair.tmp.path())
        .iter()
        .all(|n| !n.contains(".tmp-")));
}

#[test]
fn unwritable_output_directory_is_a_clear_error() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let locked = pair.path("locked");
    std::fs::create_dir(&locked).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    // Root ignores permission bits: then use a "directory" that is a regular file.
    let dir = if std::fs::write(locked.join("probe"), b"").is_ok() {
        let file = pair.path("not_a_dir");
        std::fs::write(&file, b"").unwrap();
        file
    } else {
        locked
    };
    let out = dir.join("ft.delta");
    let err = try_compress(&pair.base_dir, &pair.ft_dir, &out);
    let msg = err.to_string();
    assert!(
        msg.starts_with("cannot create ") && msg.contains(&dir.display().to_string()),
        "{msg}"
    );
}

#[test]
fn extra_vocab_finetune_stores_its_larger_embeddings() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let bigger = Spec {
        vocab: pair.spec.vocab + 5,
        ..pair.spec.clone()
    };
    let mut weights = finetune_of(&pair.base, &pair.spec, 4, 0.01);
    let extra = random_weights(&bigger, 5);
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        weights.insert(name.into(), extra[name].clone());
    }
    let ft = pair.path("bigger");
    write_model(&ft, &bigger, &weights, 1);
    compress_dirs(&pair.base_dir, &ft, &pair.path("big.delta"));
    let delta = DeltaFile::open(pair.path("big.delta")).unwrap();
    assert_eq!(
        delta.entry("model.embed_tokens.weight").unwrap().shape(),
        [72, 48]
    );
    assert_eq!(delta.entry("lm_head.weight").unwrap().shape(), [72, 48]);
}

#[test]
fn inspect_lists_every_tensor_with_scales() {
    let pair = Pair::new(Spec::llama(Dtype::BF16));
    let delta = DeltaFile::open(compress_pair(&pair)).unwrap();
    let d = inspect::describe(&delta).unwrap();
    assert_eq!(d.method, "bitdelta");
    // Format 1.1 added the coded kind; BitDelta files are otherwise unchanged.
    assert_eq!(d.format_version, "1.1");
    assert_eq!(d.tensors.len(), pair.finetuned.len());
    let q = d
        .tensors
        .iter()
        .find(|t| t.name == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.kind, "sign");
    assert_eq!(q.shape, [48, 48]);
    assert_eq!(q.dtype, "BF16");
    assert!(q.scale.unwrap() > 0.0);
    let norm = d
        .tensors
        .iter()
        .find(|t| t.name == "model.norm.weight")
        .unwrap();
    assert_eq!(norm.value.as_deref(), Some("finetuned"));
    assert_eq!(d.file_size, delta.file_size());
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["base"]["hex"], delta.header().base.hex);
    assert!(json["tensors"][0].get("kind").is_some());
    let table = d.to_string();
    assert!(
        table.contains("model.layers.0.self_attn.q_proj.weight") && table.contains("bits/param"),
        "{table}"
    );
}
