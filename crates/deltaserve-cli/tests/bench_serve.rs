//! `deltaserve bench serve` on the CPU with the tiny fixture base: the run completes every
//! request, the JSON is consistent with the request mix, and a delta budget smaller than the
//! tenants makes the run load and evict deltas (the H100 numbers are in BENCHMARKS.md).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn deltaserve(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_deltaserve"))
        .args(args)
        .output()
        .expect("running the deltaserve binary")
}

fn fixture() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/llama")
        .to_string_lossy()
        .into_owned()
}

fn run_json(extra: &[&str]) -> (Value, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    let base = fixture();
    let mut args = vec![
        "bench",
        "serve",
        "--base",
        &base,
        "--prompt-tokens",
        "12",
        "--max-tokens",
        "9",
        "--concurrency",
        "4",
        "--requests",
        "10",
        "--json",
        json.to_str().expect("utf-8 temp path"),
    ];
    args.extend_from_slice(extra);
    let out = deltaserve(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json).expect("the JSON report");
    (serde_json::from_str(&text).expect("valid JSON"), stdout)
}

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

#[test]
fn every_request_completes_and_the_report_adds_up() {
    let (report, stdout) = run_json(&["--tenants", "0,1,3"]);
    assert!(stdout.contains("| base only |"), "{stdout}");
    assert!(stdout.contains("| 3 |"), "{stdout}");
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 3);
    let base_tps = f(&runs[0], &["tokens_per_s"]);
    for (run, tenants) in runs.iter().zip([0.0, 1.0, 3.0]) {
        assert_eq!(f(run, &["tenants"]), tenants);
        assert_eq!(f(run, &["failed"]), 0.0, "{run}");
        // Stop tokens are ignored, so every request generates exactly --max-tokens.
        assert_eq!(f(run, &["generated_tokens"]), 10.0 * 9.0, "{run}");
        let wall = f(run, &["wall_s"]);
        assert!((f(run, &["tokens_per_s"]) - 90.0 / wall).abs() < 1e-9 * 90.0 / wall);
        assert!((f(run, &["requests_per_s"]) - 10.0 / wall).abs() < 1e-9 * 10.0 / wall);
        for key in ["ttft_s", "e2e_s"] {
            let (p50, p90, p99) = (
                f(run, &[key, "p50"]),
                f(run, &[key, "p90"]),
                f(run, &[key, "p99"]),
            );
            assert!(
                0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= wall,
                "{run}"
            );
        }
        assert!(f(run, &["ttft_s", "p99"]) <= f(run, &["e2e_s", "p99"]));
        // At most --concurrency sequences, and at most min(tenants, sequences) tenants, per step.
        let seqs = f(run, &["mean_sequences_per_step"]);
        let per_step = f(run, &["mean_tenants_per_step"]);
        assert!(seqs > 1.0 && seqs <= 4.0, "{run}");
        assert!(per_step <= tenants.min(seqs) + 1e-9, "{run}");
        if tenants > 0.0 {
            assert!(per_step >= 1.0 - 1e-9, "{run}");
            let ratio = f(run, &["of_base_only"]);
            assert!((ratio - f(run, &["tokens_per_s"]) / base_tps).abs() < 1e-9);
            // Every tenant was loaded before the timed run.
            assert_eq!(run["tenants_preloaded"], Value::Bool(true));
            assert_eq!(f(run, &["delta_loads"]), 0.0, "{run}");
        } else {
            assert_eq!(per_step, 0.0);
            assert!(run["of_base_only"].is_null());
        }
    }
    assert_eq!(f(&report, &["mix", "prompt_tokens"]), 12.0);
    // auto: exactly 4 requests of 12 + 9 tokens.
    assert_eq!(
        f(&report, &["engine", "kv_memory"]),
        4.0 * 21.0 * f(&report, &["engine", "kv_bytes_per_token"])
    );
}

#[test]
fn tenants_beyond_the_delta_budget_are_loaded_and_evicted_during_the_run() {
    // Room for two of the fixture's tenants (each ~0.27 MB with embeddings and lm_head), four used.
    let (report, _) = run_json(&["--tenants", "4", "--delta-memory", "600000"]);
    let run = &report["runs"][0];
    let per_tenant = f(&report, &["delta_bytes_per_tenant"]);
    assert!(2.0 * per_tenant <= 600000.0 && 3.0 * per_tenant > 600000.0);
    assert_eq!(run["tenants_preloaded"], Value::Bool(false));
    assert_eq!(f(run, &["failed"]), 0.0, "{run}");
    assert_eq!(f(run, &["generated_tokens"]), 90.0);
    assert!(f(run, &["delta_loads"]) >= 4.0, "{run}");
    assert!(f(run, &["delta_evictions"]) >= 2.0, "{run}");
    assert!(f(run, &["mean_tenants_per_step"]) <= 2.0 + 1e-9, "{run}");
}

#[test]
fn sign_only_deltas_are_smaller() {
    let (full, _) = run_json(&["--tenants", "1"]);
    let (signs, _) = run_json(&["--tenants", "1", "--sign-only"]);
    assert!(f(&signs, &["delta_bytes_per_tenant"]) < 0.5 * f(&full, &["delta_bytes_per_tenant"]));
}

#[test]
fn bad_flags_fail_with_one_line() {
    let base = fixture();
    for (args, needle) in [
        (vec!["--tenants", "1,x"], "--tenants 1,x"),
        (vec!["--kv-memory", "10B"], "--kv-memory 10B"),
        (vec!["--prompt-tokens", "100000"], "context"),
        (vec!["--concurrency", "0"], "--concurrency"),
    ] {
        let mut all = vec!["bench", "serve", "--base", &base];
        all.extend(args);
        let out = deltaserve(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(needle), "{needle}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
