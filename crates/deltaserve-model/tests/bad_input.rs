//! Every broken input gets a one-line error that names the file, tensor or field.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::model_dir;
use deltaserve_model::{Checkpoint, ForwardOptions, LogitsWanted, Model, SeqInput};

/// Copies the `llama` fixture into a temp dir so a test can break it.
fn broken_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(model_dir("llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    let r = Checkpoint::open(dir).and_then(|c| Model::load(&c, DType::F32, &Device::Cpu));
    let e = r.expect_err("loading should fail").to_string();
    assert!(!e.contains('\n'), "error is not one line: {e}");
    e
}

#[test]
fn missing_config_is_named() {
    let d = broken_copy();
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("not found"), "{e}");
}

#[test]
fn missing_weights_are_named() {
    let d = broken_copy();
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_safetensors_is_reported() {
    let d = broken_copy();
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
}

#[test]
fn garbage_safetensors_is_reported() {
    let d = broken_copy();
    std::fs::write(
        d.path().join("model.safetensors"),
        b"not a safetensors file at all",
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(e.contains("truncated or corrupt"), "{e}");
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn wrong_shape_names_the_tensor() {
    let d = broken_copy();
    edit_config(d.path(), |v| v["intermediate_size"] = 161.into());
    let e = load_err(d.path());
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("161"),
        "{e}"
    );
}

#[test]
fn unsupported_architecture_is_named() {
    let d = broken_copy();
    edit_config(d.path(), |v| {
        v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"])
    });
    let e = load_err(d.path());
    assert!(
        e.contains("GPTNeoXForCausalLM") && e.contains("not supported"),
        "{e}"
    );
}

#[test]
fn wrong_dtype_names_the_tensor() {
    // Rewrite the checkpoint with one weight stored as I64.
    let d = broken_copy();
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        if name == "model.norm.weight" {
            let n = view.shape().iter().product::<usize>();
            owned.push((
                name,
                safetensors::Dtype::I64,
                view.shape().to_vec(),
                vec![0u8; n * 8],
            ));
        } else {
            owned.push((
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            ));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, dt, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(&p, out).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.norm.weight") && e.contains("I64"), "{e}");
}

#[test]
fn prompt_longer_than_context_is_an_error() {
    let ckpt = Checkpoint::open(model_dir("llama")).unwrap();
    let model = Model::load(&ckpt, DType::F32, &Device::Cpu).unwrap();
    let n = model.config().max_position_embeddings + 1;
    let ids = vec![1u32; n];
    let e = model
        .forward(
            &mut [SeqInput {
                tokens: &ids,
                cache: None,
                tenant: None,
                logits: LogitsWanted::Last,
            }],
            ForwardOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("context") && e.contains("max_position_embeddings"),
        "{e}"
    );
}
