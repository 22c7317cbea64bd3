//! `deltaserve eval ppl` and `deltaserve eval compare` end to end: random tiny base and fine-tune
//! (with the fixture tokenizer and chat template), a BitDelta delta, JSON output and the report.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture_tokenizer() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama")
}

fn run(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_deltaserve"))
        .args(args)
        .output()
        .expect("runs the binary");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "deltaserve {args:?} failed:\n{stderr}\n{stdout}"
    );
    (stdout, stderr)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A scratch directory removed when dropped (the CLI crate has no tempfile dependency).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Setup {
    _dir: Scratch,
    base: PathBuf,
    ft: PathBuf,
    delta: PathBuf,
    text: PathBuf,
    chat: PathBuf,
    root: PathBuf,
}

fn setup(name: &str) -> Setup {
    let root =
        std::env::temp_dir().join(format!("deltaserve-eval-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let dir = Scratch(root.clone());
    let (base, ft, delta) = (root.join("base"), root.join("ft"), root.join("ft.delta"));
    let tok = fixture_tokenizer();
    run(&[
        "random-model",
        "--shape",
        "tiny",
        "--seed",
        "1",
        "--out",
        p(&base),
        "--tokenizer-from",
        p(&tok),
    ]);
    run(&[
        "random-model",
        "--shape",
        "tiny",
        "--seed",
        "2",
        "--out",
        p(&ft),
        "--finetune-of",
        p(&base),
        "--noise",
        "0.05",
        "--tokenizer-from",
        p(&tok),
    ]);
    run(&[
        "compress",
        "--base",
        p(&base),
        "--finetuned",
        p(&ft),
        "--out",
        p(&delta),
        "--quiet",
    ]);
    let text = root.join("code.txt");
    std::fs::write(
        &text,
        "def scale(x, factor=2):\n    \"\"\"Multiply x.\"\"\"\n    return x * factor\n".repeat(12),
    )
    .unwrap();
    let chat = root.join("tasks.jsonl");
    let rec = |u: &str, a: &str| {
        serde_json::json!({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]})
            .to_string()
    };
    std::fs::write(
        &chat,
        [
            rec("Write add.", "def add(a, b):\n    return a + b"),
            rec("Write neg.", "def neg(x):\n    return -x"),
        ]
        .join("\n"),
    )
    .unwrap();
    Setup {
        _dir: dir,
        base,
        ft,
        delta,
        text,
        chat,
        root,
    }
}

#[test]
fn eval_compare_json_and_report() {
    let s = setup("compare");
    let report = s.root.join("report");
    let (out, _) = run(&[
        "eval",
        "compare",
        "--base",
        p(&s.base),
        "--finetuned",
        p(&s.ft),
        "--delta",
        p(&s.delta),
        "--data",
        p(&s.text),
        p(&s.chat),
        "--seq-len",
        "64",
        "--json",
        "--report",
        p(&report),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
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
    assert!(md.contains(p(&s.delta)), "the report names its inputs");
    for png in ["metrics.png", "layer_error.png"] {
        let bytes = std::fs::read(report.join(png)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }

    // The human table.
    let (table, _) = run(&[
        "eval",
        "compare",
        "--base",
        p(&s.base),
        "--finetuned",
        p(&s.ft),
        "--delta",
        p(&s.delta),
        "--data",
        p(&s.text),
        "--seq-len",
        "64",
    ]);
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
    let s = setup("ppl");
    let (out, _) = run(&[
        "eval",
        "ppl",
        "--model",
        p(&s.base),
        "--delta",
        p(&s.delta),
        "--data",
        p(&s.text),
        "--seq-len",
        "100000",
        "--stride",
        "64",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["seq_len"], 512, "clamped to the tiny model's context");
    assert!(v["notes"][0].as_str().unwrap().contains("exceeds"));
    let with_delta = v["ppl"].as_f64().unwrap();
    let (out, _) = run(&[
        "eval",
        "ppl",
        "--model",
        p(&s.base),
        "--data",
        p(&s.text),
        "--seq-len",
        "64",
        "--stride",
        "32",
        "--json",
    ]);
    let base: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(with_delta.is_finite() && base["ppl"].as_f64().unwrap().is_finite());
    assert_ne!(
        with_delta,
        base["ppl"].as_f64().unwrap(),
        "the delta changes the model"
    );
    let (line, _) = run(&[
        "eval",
        "ppl",
        "--model",
        p(&s.ft),
        "--data",
        p(&s.text),
        "--seq-len",
        "64",
        "--stride",
        "32",
    ]);
    assert!(line.starts_with("perplexity "), "{line}");
}
