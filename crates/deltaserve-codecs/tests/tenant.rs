//! `load_tenant`: a delta applied on the fly gives the logits of the merged checkpoint.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::*;
use deltaserve_codecs::numeric::FloatDtype;
use deltaserve_codecs::{load_tenant, CodecError, MergeOptions};
use deltaserve_format::{fingerprint_safetensors, DeltaFile};
use deltaserve_model::{Checkpoint, LinearDelta, Model, TenantWeights};
use safetensors::Dtype;

/// Tenant (base + packed delta) against the merged checkpoint, both in f32: the two compute
/// `x·(W_base + s·S)ᵀ` in different orders, so they agree to f32 rounding, not bit for bit.
const TENANT_VS_MERGED_REL_TOL: f32 = 1e-5;

fn tenant_for(base_dir: &Path, delta: &Path) -> (Checkpoint, Model, TenantWeights) {
    let (ckpt, model) = load_f32(base_dir);
    let fp = fingerprint_safetensors(&ckpt.weight_files()).unwrap();
    let delta = DeltaFile::open(delta).unwrap();
    let tenant = load_tenant(&delta, &ckpt, &fp, DType::F32, &Device::Cpu).unwrap();
    (ckpt, model, tenant)
}

/// Compresses, merges (in f32), and compares logits of the tenant path and the merged model.
fn check_tenant_matches_merged(base_dir: &Path, ft_dir: &Path, work: &Path, tokens: &[u32]) {
    let delta = work.join("t.delta");
    compress_dirs(base_dir, ft_dir, &delta);
    let merged = work.join("merged");
    let opts = MergeOptions {
        dtype: Some(FloatDtype::F32),
        ..merge_opts(&merged)
    };
    merge_to(base_dir, &delta, &opts);
    let (_, base_model, tenant) = tenant_for(base_dir, &delta);
    let (_, merged_model) = load_f32(&merged);
    let via_tenant = logits(&base_model, Some(&tenant), tokens);
    let via_merged = logits(&merged_model, None, tokens);
    assert_close(
        "tenant vs merged logits",
        &via_tenant,
        &via_merged,
        TENANT_VS_MERGED_REL_TOL,
    );
    // And the delta does something: the base alone is far off (where it can read the tokens).
    let base_vocab = base_model.config().vocab_size;
    if tokens.iter().all(|&t| (t as usize) < base_vocab)
        && via_merged.len() == tokens.len() * base_vocab
    {
        let base_only = logits(&base_model, None, tokens);
        let diff = base_only
            .iter()
            .zip(&via_merged)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff > 1e-3, "the delta changed the logits by only {diff}");
    }
}

const TOKENS: [u32; 9] = [1, 5, 9, 2, 33, 60, 4, 17, 66];

#[test]
fn tenant_logits_match_merged_checkpoint_llama_f32() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    check_tenant_matches_merged(&pair.base_dir, &pair.ft_dir, pair.tmp.path(), &TOKENS);
}

#[test]
fn tenant_logits_match_merged_checkpoint_qwen2_with_biases() {
    let pair = Pair::new(Spec::qwen2(Dtype::F32));
    check_tenant_matches_merged(&pair.base_dir, &pair.ft_dir, pair.tmp.path(), &TOKENS);
}

#[test]
fn tenant_logits_match_merged_checkpoint_bf16_storage() {
    let pair = Pair::new(Spec::llama(Dtype::BF16));
    check_tenant_matches_merged(&pair.base_dir, &pair.ft_dir, pair.tmp.path(), &TOKENS);
}

#[test]
fn tenant_logits_match_merged_checkpoint_with_extra_vocab() {
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
    let work = pair.path("work");
    std::fs::create_dir(&work).unwrap();
    // Token 70 exists only in the fine-tune's vocabulary.
    check_tenant_matches_merged(&pair.base_dir, &ft, &work, &[1, 70, 3, 68]);
}

#[test]
fn tenant_holds_packed_signs_and_the_finetunes_small_tensors() {
    let pair = Pair::new(Spec::qwen2(Dtype::BF16));
    let delta = compress_pair(&pair);
    let (_, _, tenant) = tenant_for(&pair.base_dir, &delta);
    assert_eq!(tenant.layers.len(), 2);
    for layer in &tenant.layers {
        assert!(layer
            .linears
            .iter()
            .all(|l| matches!(l, Some(LinearDelta::Sign { .. }))));
        assert_eq!(layer.biases.iter().filter(|b| b.is_some()).count(), 3);
        assert!(layer.input_layernorm.is_some() && layer.post_attention_layernorm.is_some());
    }
    assert!(tenant.embed_tokens.is_some() && tenant.norm.is_some() && tenant.lm_head.is_some());
    let Some(LinearDelta::Sign { bits, scale }) = &tenant.layers[0].linears[4] else {
        panic!()
    };
    assert_eq!((bits.n(), bits.k()), (100, 48));
    let file = DeltaFile::open(&delta).unwrap();
    let entry = file.entry("model.layers.0.mlp.gate_proj.weight").unwrap();
    assert_eq!(
        scale.to_vec1::<f32>().unwrap(),
        [file.scale(entry).unwrap()]
    );
    assert_eq!(
        bits.to_host_words().unwrap(),
        file.sign_words(entry).unwrap()
    );
}

#[test]
fn tenant_on_the_wrong_base_is_refused() {
    let pair = Pair::new(Spec::llama(Dtype::F32));
    let delta = compress_pair(&pair);
    let other = pair.path("other");
    write_model(&other, &pair.spec, &random_weights(&pair.spec, 42), 1);
    let ckpt = Checkpoint::open(&other).unwrap();
    let fp = fingerprint_safetensors(&ckpt.weight_files()).unwrap();
    let file = DeltaFile::open(&delta).unwrap();
    let err = load_tenant(&file, &ckpt, &fp, DType::F32, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CodecError::Format(_)), "{msg}");
    assert!(
        msg.contains(file.header().base.short()) && msg.contains(fp.short()),
        "{msg}"
    );
}

#[test]
fn tenant_with_untied_lm_head_on_a_tied_base_is_refused() {
    let tied = Spec {
        tie: true,
        ..Spec::llama(Dtype::F32)
    };
    let tmp = tempfile::tempdir().unwrap();
    let base = random_weights(&tied, 1);
    write_model(&tmp.path().join("base"), &tied, &base, 1);
    let untied = Spec {
        tie: false,
        ..tied.clone()
    };
    let mut ft = finetune_of(&base, &tied, 2, 0.01);
    ft.insert(
        "lm_head.weight".into(),
        random_weights(&untied, 3)["lm_head.weight"].clone(),
    );
    write_model(&tmp.path().join("ft"), &untied, &ft, 1);
    let delta = tmp.path().join("d.delta");
    compress_dirs(&tmp.path().join("base"), &tmp.path().join("ft"), &delta);
    let ckpt = Checkpoint::open(tmp.path().join("base")).unwrap();
    let fp = fingerprint_safetensors(&ckpt.weight_files()).unwrap();
    let err = load_tenant(
        &DeltaFile::open(&delta).unwrap(),
        &ckpt,
        &fp,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("lm_head") && err.to_string().contains("merge"),
        "{err}"
    );
}

/// A fine-tune of a fixture: every floating-point tensor moved by noise, written in the
/// fixture's own dtype and sharding, with its config and tokenizer files copied.
fn finetune_fixture(base_dir: &Path, out: &Path) {
    let base = Checkpoint::open(base_dir).unwrap();
    std::fs::create_dir_all(out).unwrap();
    for entry in std::fs::read_dir(base_dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".safetensors") && !name.ends_with(".index.json") {
            std::fs::copy(&path, out.join(&name)).unwrap();
        }
    }
    let mut weights = Weights::new();
    let mut dtype = Dtype::F32;
    for name in base.tensor_names() {
        let raw = base.raw(name).unwrap();
        dtype = raw.dtype;
        weights.insert(name.to_owned(), (raw.shape.to_vec(), read_f32(&base, name)));
    }
    let spec = Spec {
        dtype,
        ..Spec::llama(dtype)
    };
    let moved = finetune_of(&weights, &spec, 7, 0.02);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base_dir.join("config.json")).unwrap())
            .unwrap();
    let shards = base.weight_files().len();
    write_model_with_config(out, &config, dtype, &moved, shards);
}

#[test]
fn fixture_models_tenant_matches_merged() {
    for name in ["llama", "llama3_tied_bf16", "mistral_sliding", "qwen2_bias"] {
        let Some(base_dir) = fixture(name) else {
            continue;
        };
        let tmp = tempfile::tempdir().unwrap();
        let ft = tmp.path().join("ft");
        finetune_fixture(&base_dir, &ft);
        eprintln!("fixture {name}");
        check_tenant_matches_merged(
            &base_dir,
            &ft,
            tmp.path(),
            &[4, 100, 200, 300, 17, 5, 450, 9, 12, 13, 14, 15, 16],
        );
    }
}
