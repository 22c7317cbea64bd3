//! `--model org/name` resolves through the local Hugging Face cache, and fails clearly when the
//! model is not cached (this machine is offline). One test per process: it sets `HF_HOME`.

use std::path::Path;

#[test]
fn hub_id_resolves_through_local_cache_and_missing_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    // The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}.
    let repo = home.path().join("hub").join("models--acme--tiny");
    let snap = repo.join("snapshots").join("abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture.join(f), snap.join(f)).unwrap();
    }
    std::env::set_var("HF_HOME", home.path());

    let dir = deltaserve_model::resolve_model_dir("acme/tiny").unwrap();
    assert_eq!(dir, snap);
    deltaserve_model::Checkpoint::open(&dir).unwrap();

    let e = deltaserve_model::resolve_model_dir("acme/not-there")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("offline") && e.contains("models--acme--not-there"),
        "{e}"
    );
    let e = deltaserve_model::resolve_model_dir("./no/such/dir")
        .unwrap_err()
        .to_string();
    assert!(e.contains("model directory"), "{e}");
}
