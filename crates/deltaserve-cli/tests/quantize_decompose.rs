//! `deltaserve quantize` and `deltaserve decompose` end to end on the tiny Llama fixture: what
//! they write, that the models they write run, and that their quality orders as the methods
//! promise (RTN-8 ≈ the base; LQ-LoRA's Q + L1·L2 closer to the base than NormalFloat alone at
//! the same bits for Q).

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama")
}

fn run(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_deltaserve"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running the deltaserve binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (success, stdout, stderr) = run(dir, args);
    assert!(success, "deltaserve {args:?}\n{stdout}\n{stderr}");
    stdout
}

/// Perplexity of `model` (optionally with a delta) on the test text, 64-token windows.
fn ppl(dir: &Path, model: &str, delta: Option<&str>) -> f64 {
    let mut args = vec!["eval", "ppl", "--model", model, "--data", "text.txt"];
    args.extend(["--seq-len", "64", "--json"]);
    if let Some(d) = delta {
        args.extend(["--delta", d]);
    }
    let out = ok(dir, &args);
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let p = v["ppl"]
        .as_f64()
        .unwrap_or_else(|| panic!("no perplexity in {out}"));
    assert!(p.is_finite() && p > 1.0, "{out}");
    p
}

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
    ok(
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
    ok(dir, &lq);
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
    ok(dir, &nf);
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
