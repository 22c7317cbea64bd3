//! The main job on a smaller setting: `deltaserve demo --no-serve` on the shipped family, and the
//! invariants its table must show (issue 7).

use std::process::Command;

#[test]
fn demo_pipeline_table_invariants() {
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("compare.json");
    let status = Command::new(env!("CARGO_BIN_EXE_deltaserve"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args([
            "demo",
            "--no-serve",
            "--steps",
            "8",
            "--eval-tokens",
            "3072",
            "--out",
        ])
        .arg(out.path())
        .arg("--json")
        .arg(&json)
        .status()
        .unwrap();
    assert!(status.success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let metric = |set: &str, model: &str, key: &str| -> f64 {
        let set = report["datasets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == set)
            .unwrap();
        let m = set["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model"] == model)
            .unwrap();
        m[key].as_f64().unwrap()
    };
    let task = "docstring2code_heldout.jsonl";
    // The fine-tune beats the base on its own task's held-out data.
    assert!(metric(task, "finetuned", "ppl") < metric(task, "base", "ppl"));
    // Calibration brings the delta closer to the fine-tune.
    for set in [task, "heldout_code.txt"] {
        assert!(
            metric(set, "bitdelta-calibrated", "kl") < metric(set, "bitdelta", "kl"),
            "{set}"
        );
        assert_eq!(metric(set, "finetuned", "kl"), 0.0);
    }
    // The 1-bit delta sits between base and fine-tune on the task.
    let (b, f, d) = (
        metric(task, "base", "ppl"),
        metric(task, "finetuned", "ppl"),
        metric(task, "bitdelta-calibrated", "ppl"),
    );
    assert!(
        (b - d) / (b - f) > 0.5,
        "calibrated delta closes only {:.0}% of the gap",
        100.0 * (b - d) / (b - f)
    );
    assert!(out.path().join("report").join("report.md").exists());
}
