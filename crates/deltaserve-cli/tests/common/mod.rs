//! Helpers shared by the CLI's end-to-end tests: they run the built `deltaserve` binary in a
//! scratch directory, with its arguments written as one line whose paths are relative to that
//! directory, so a test reads like the commands a user types.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The tiny Llama fixture (config, weights, tokenizer and chat template).
pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama")
}

/// Runs `deltaserve` in `dir` with `args`.
pub fn deltaserve(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deltaserve"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running the deltaserve binary")
}

/// Runs `deltaserve` in `dir` with `args`; returns (success, stdout, stderr).
pub fn run(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = deltaserve(dir, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `deltaserve` with `args`, which must succeed; returns (stdout, stderr).
pub fn ok_args(dir: &Path, args: &[&str]) -> (String, String) {
    let out = deltaserve(dir, args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "deltaserve {args:?}\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

/// `ok_args` with the arguments as one whitespace-separated line.
pub fn ok(dir: &Path, line: &str) -> (String, String) {
    ok_args(dir, &line.split_whitespace().collect::<Vec<_>>())
}

/// Runs a command line that must fail with exit status 1 and a one-line `error: ` message, never
/// a panic; returns its stderr.
pub fn fails(dir: &Path, line: &str) -> String {
    let args: Vec<&str> = line.split_whitespace().collect();
    let out = deltaserve(dir, &args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "deltaserve {args:?}\n{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Parses a command's stdout as JSON, naming the output when it is not.
pub fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Perplexity of `model` (optionally with a delta) on `text.txt` in `dir`, 64-token windows.
pub fn ppl(dir: &Path, model: &str, delta: Option<&str>) -> f64 {
    let mut args = vec!["eval", "ppl", "--model", model, "--data", "text.txt"];
    args.extend(["--seq-len", "64", "--json"]);
    if let Some(d) = delta {
        args.extend(["--delta", d]);
    }
    let (out, _) = ok_args(dir, &args);
    let p = json(&out)["ppl"]
        .as_f64()
        .unwrap_or_else(|| panic!("no perplexity in {out}"));
    assert!(p.is_finite() && p > 1.0, "{out}");
    p
}
