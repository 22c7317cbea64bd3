//! `deltaserve compress`, `merge` and `inspect` end to end on a tiny random pair: what they print,
//! and one clear error (exit status 1) for each bad input.

mod common;

use common::{fails, json, ok};

#[test]
fn compress_inspect_merge_and_their_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, "random-model --out base --seed 1");
    ok(d, "random-model --out ft --finetune-of base --seed 2");

    let (_, summary) = ok(d, "compress --base base --finetuned ft --out ft.delta");
    for needle in [
        "wrote ft.delta",
        "14 compressed",
        "bits/param",
        "against the fine-tune in bf16",
    ] {
        assert!(summary.contains(needle), "{needle}: {summary}");
    }

    let err = fails(d, "compress --base base --finetuned ft --out ft.delta");
    assert!(
        err.contains("ft.delta already exists; use --force"),
        "{err}"
    );
    ok(
        d,
        "compress --base base --finetuned ft --out ft.delta --force",
    );
    let err = fails(
        d,
        "compress --base base --finetuned ft --out x.delta --method zip",
    );
    assert!(
        err.contains("unknown compression method \"zip\" (known: bitdelta, lowrank, lowrank-mixed, dare, deltadq"),
        "{err}"
    );
    let err = fails(d, "compress --base nowhere --finetuned ft --out x.delta");
    assert!(err.contains("nowhere"), "{err}");

    let (table, _) = ok(d, "inspect ft.delta");
    for needle in [
        "method bitdelta",
        "blake3-v1",
        "model.layers.1.mlp.down_proj.weight",
        "sign",
        "full (finetuned)",
    ] {
        assert!(table.contains(needle), "{needle}: {table}");
    }
    let (out, _) = ok(d, "inspect ft.delta --json");
    let json = json(&out);
    assert_eq!(json["method"], "bitdelta");
    assert!(json["bits_per_param"].as_f64().unwrap() > 1.0);
    std::fs::write(
        d.join("cut.delta"),
        &std::fs::read(d.join("ft.delta")).unwrap()[..1000],
    )
    .unwrap();
    let err = fails(d, "inspect cut.delta");
    assert!(err.contains("truncated"), "{err}");

    let (_, merged) = ok(
        d,
        "merge --base base --delta ft.delta --out merged --max-shard-size 100kB",
    );
    assert!(
        merged.contains("wrote merged") && merged.contains("shards"),
        "{merged}"
    );
    assert!(d.join("merged/model.safetensors.index.json").is_file());
    assert!(d.join("merged/config.json").is_file());
    let err = fails(d, "merge --base base --delta ft.delta --out merged");
    assert!(err.contains("already exists; use --force"), "{err}");
    let err = fails(d, "merge --base ft --delta ft.delta --out m2");
    assert!(
        err.contains("was made for base") && err.contains("use the base it was compressed from"),
        "{err}"
    );
    assert!(!d.join("m2").exists());
    let err = fails(d, "merge --base base --delta ft.delta --out m3 --dtype f8");
    assert!(err.contains("--dtype f8"), "{err}");
    let err = fails(
        d,
        "merge --base base --delta ft.delta --out m3 --max-shard-size big",
    );
    assert!(err.contains("--max-shard-size"), "{err}");
}
