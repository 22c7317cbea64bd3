//! Merged checkpoints and tenants against transformers, with the fixtures that
//! `scripts/reference/check_merged.py` writes to tests/fixtures/merged/ (a delta of each fixture
//! model, and transformers' logits on the checkpoint `deltaserve merge` makes from it).

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use common::*;
use deltaserve_codecs::load_tenant;
use deltaserve_format::{fingerprint_safetensors, DeltaFile};
use deltaserve_model::Checkpoint;

/// The fixture version these tests understand.
const FIXTURE_VERSION: &str = "1";

/// f32 tolerance relative to the largest |logit|, as the model crate's reference tests use:
/// summation order differs from PyTorch's.
const F32_REL_TOL: f32 = 1e-4;

fn merged_fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/merged")
}

#[test]
fn merged_fixture_logits_match_transformers() {
    let mut checked = 0;
    for name in ["llama", "llama3_tied_bf16", "mistral_sliding", "qwen2_bias"] {
        let dir = merged_fixtures_dir();
        let (delta_path, reference) = (
            dir.join(format!("{name}.delta")),
            dir.join(format!("{name}.safetensors")),
        );
        if !delta_path.is_file() || !reference.is_file() {
            eprintln!(
                "SKIPPED: {} missing; the lead generates it on the GPU machine with scripts/reference/check_merged.py",
                reference.display()
            );
            continue;
        }
        let Some(base_dir) = fixture(name) else {
            continue;
        };
        let bytes = std::fs::read(&reference).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap_or_default();
        let version = meta
            .get("fixture_version")
            .map(String::as_str)
            .unwrap_or("?");
        assert_eq!(
            version,
            FIXTURE_VERSION,
            "{}: fixture version {version}; HINT: re-run scripts/reference/check_merged.py",
            reference.display()
        );
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        let ids: Vec<Vec<i64>> = tensors["input_ids"]
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec2()
            .unwrap();
        let want = &tensors["logits_merged"];

        let tmp = tempfile::tempdir().unwrap();
        let merged = tmp.path().join("merged");
        merge_to(&base_dir, &delta_path, &merge_opts(&merged));
        let (_, merged_model) = load_f32(&merged);
        let (base_ckpt, base_model) = load_f32(&base_dir);
        let fp = fingerprint_safetensors(&base_ckpt.weight_files()).unwrap();
        let delta = DeltaFile::open(&delta_path).unwrap();
        let tenant = load_tenant(&delta, &base_ckpt, &fp, DType::F32, &Device::Cpu).unwrap();
        for (row, ids) in ids.iter().enumerate() {
            let tokens: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
            let want: Vec<f32> = want
                .get(row)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = logits(&merged_model, None, &tokens);
            assert_close(
                &format!("{name} row {row}: merged checkpoint"),
                &got,
                &want,
                F32_REL_TOL,
            );
            // The tenant path computes base + delta in f32 while the merged checkpoint of a bf16
            // base is rounded to bf16, so it is compared only where the base is f32.
            if Checkpoint::open(&base_dir)
                .unwrap()
                .raw("model.norm.weight")
                .unwrap()
                .dtype
                == safetensors::Dtype::F32
            {
                let got = logits(&base_model, Some(&tenant), &tokens);
                assert_close(
                    &format!("{name} row {row}: tenant"),
                    &got,
                    &want,
                    F32_REL_TOL,
                );
            }
        }
        checked += 1;
    }
    eprintln!("checked {checked} merged fixtures");
}
