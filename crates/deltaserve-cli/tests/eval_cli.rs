//! `deltaserve eval ppl` and `deltaserve eval compare` end to end: random tiny base and fine-tune
//! (with the fixture tokenizer and chat template), a BitDelta delta, JSON output and the report.

mod common;

use common::{fixture, json, ok};
use tempfile::TempDir;

/// A scratch directory holding `base`, `ft`, `ft.delta`, `code.txt` and `tasks.jsonl`.
fn setup() -> TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tok = fixture();
    let tok = tok.to_str().unwrap();
    ok(
        d,
        &format!("random-model --shape tiny --seed 1 --out base --tokenizer-from {tok}"),
    );
    ok(
        d,
        &format!(
            "random-model --shape tiny --seed 2 --out ft --finetune-of base --noise 0.05 \
             --tokenizer-from {tok}"
        ),
    );
    ok(
        d,
        "compress --base base --finetuned ft --out ft.delta --quiet",
    );
    std::fs::write(
        d.join("code.txt"),
        "def scale(x, factor=2):\n    \"\"\"Multiply x.\"\"\"\n    return x * factor\n".repeat(12),
    )
    .unwrap();
    let rec = |u: &str, a: &str| {
        serde_json::json!({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]})
            .to_string()
    };
    std::fs::write(
        d.join("tasks.jsonl"),
        [
            rec("Write add.", "def add(a, b):\n    return a + b"),
            rec("Write neg.", "def neg(x):\n    return -x"),
        ]
        .join("\n"),
    )
    .unwrap();
    tmp
}

#[test]
fn eval_compare_json_and_report() {
    let tmp = setup();
    let d = tmp.path();
    let report = d.join("report");
    let (out, _) = ok(
        d,
        "eval compare --base base --finetuned ft --delta ft.delta --data code.txt tasks.jsonl \
         --seq-len 64 --json --report report",
    );
    let v = json(&out);
    let names: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "finetuned", "ft"]);
    assert_eq!(v["models"][2]["method"], "bitdelta");
    let bits = v["models"][2]["bits_per_param"].as_f64().unwrap();
    assert!((1.0..1.1).contains(&bits), "bits/param {bits}");
    assert_eq!(v["models"][0]["bits_per_param"].as_f64(), Some(16.0));
    let datasets = v["datasets"].as_array().unwrap();
    assert_eq!(datasets.len(), 2);
    assert_eq!(datasets[0]["scored"], "all_tokens");
    assert_eq!(datasets[1]["scored"], "assistant_tokens");
    for ds in datasets {
        let m = |name: &str| {
            ds["metrics"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["model"] == name)
                .unwrap()
                .clone()
        };
        assert_eq!(m("finetuned")["kl"].as_f64(), Some(0.0));
        assert_eq!(m("finetuned")["top1_agreement"].as_f64(), Some(1.0));
        let (kb, kd) = (
            m("base")["kl"].as_f64().unwrap(),
            m("ft")["kl"].as_f64().unwrap(),
        );
        assert!(
            kd < kb,
            "{}: delta KL {kd} not below base KL {kb}",
            ds["name"]
        );
    }
    let tensors = v["weights"][0]["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 2 * 7);
    for t in tensors {
        let e = t["rel_err"].as_f64().unwrap();
        assert!(e > 0.3 && e < 0.9, "{}: rel err {e}", t["name"]);
    }
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("ft.delta"), "the report names its inputs");
    for png in ["metrics.png", "layer_error.png"] {
        let bytes = std::fs::read(report.join(png)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }

    // The human table.
    let (table, _) = ok(
        d,
        "eval compare --base base --finetuned ft --delta ft.delta --data code.txt --seq-len 64",
    );
    for needle in [
        "model",
        "KL(ft‖model)",
        "base",
        "finetuned",
        "ft",
        "bitdelta",
        "code.txt",
        "relative error",
    ] {
        assert!(table.contains(needle), "table lacks {needle}:\n{table}");
    }
}

#[test]
fn eval_ppl_with_a_delta_and_a_clamped_window() {
    let tmp = setup();
    let d = tmp.path();
    let (out, _) = ok(
        d,
        "eval ppl --model base --delta ft.delta --data code.txt --seq-len 100000 --stride 64 \
         --json",
    );
    let v = json(&out);
    assert_eq!(v["seq_len"], 512, "clamped to the tiny model's context");
    assert!(v["notes"][0].as_str().unwrap().contains("exceeds"));
    let with_delta = v["ppl"].as_f64().unwrap();
    let (out, _) = ok(
        d,
        "eval ppl --model base --data code.txt --seq-len 64 --stride 32 --json",
    );
    let base = json(&out);
    assert!(with_delta.is_finite() && base["ppl"].as_f64().unwrap().is_finite());
    assert_ne!(
        with_delta,
        base["ppl"].as_f64().unwrap(),
        "the delta changes the model"
    );
    let (line, _) = ok(
        d,
        "eval ppl --model ft --data code.txt --seq-len 64 --stride 32",
    );
    assert!(line.starts_with("perplexity "), "{line}");
}
