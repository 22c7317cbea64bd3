//! `deltaserve quantize` and `deltaserve decompose` end to end on the tiny Llama fixture: what
//! they write, that the models they write run, and that their quality orders as the methods
//! promise (RTN-8 ≈ the base; LQ-LoRA's Q + L1·L2 closer to the base than NormalFloat alone at
//! the same bits for Q).

mod common;

use std::path::Path;

use common::{fixture, ok_args, ppl, run};

#[test]
fn quantize_and_decompose_write_models_that_run_and_rank_as_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo/data/heldout_code.txt"),
    )
    .unwrap();
    std::fs::write(dir.join("text.txt"), &text[..6000]).unwrap();
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let base = ppl(dir, fx, None);

    // RTN-8 of the whole model: a Hugging Face directory plus the packed codes.
    ok_args(
        dir,
        &["quantize", "--model", fx, "--method", "rtn8", "--out", "q"],
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "quantization.delta",
    ] {
        assert!(dir.join("q").join(f).is_file(), "q/{f} missing");
    }
    let rtn = ppl(dir, "q", None);
    assert!((rtn / base).ln().abs() < 0.005, "rtn8 {rtn} vs base {base}");
    // An existing output is not replaced without --force.
    let (success, _, stderr) = run(
        dir,
        &["quantize", "--model", fx, "--method", "rtn8", "--out", "q"],
    );
    assert!(
        !success && stderr.contains("exists; pass --force"),
        "{stderr}"
    );

    // LQ-LoRA at 4.25 bits for Q, rank 4, against NormalFloat alone (rank 0) at the same budget.
    let lq = [
        "decompose",
        "--model",
        fx,
        "--rank",
        "4",
        "--budget-bits",
        "4.25",
        "--out",
        "d",
    ];
    ok_args(dir, &lq);
    let nf = [
        "decompose",
        "--model",
        fx,
        "--rank",
        "0",
        "--budget-bits",
        "4.25",
        "--out",
        "d0",
    ];
    ok_args(dir, &nf);
    for f in [
        "model.safetensors",
        "nf_codes.safetensors",
        "decompose.json",
        "lqlora_init.delta",
    ] {
        assert!(dir.join("d").join(f).is_file(), "d/{f} missing");
    }
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("d/decompose.json")).unwrap())
            .unwrap();
    let text = record.to_string();
    assert!(text.contains("bits"), "decompose.json: {text}");
    let q_plus_l = ppl(dir, "d", Some("d/lqlora_init.delta"));
    let nf_only = ppl(dir, "d0", None);
    let gap = |p: f64| (p / base).ln().abs();
    assert!(
        gap(q_plus_l) < gap(nf_only),
        "Q + L1L2 {q_plus_l} should be closer to the base {base} than NF alone {nf_only}"
    );
}
