//! Real clients against a real server: OpenAI's official Python client, and the web page in
//! headless Chromium. Each needs tools outside Rust; where they are missing the test says so on
//! stderr and passes without running (CI installs them: see `.ci/run`). Set
//! `DELTASERVE_REQUIRE_CLIENTS=1` to make a missing tool a failure instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Reports a missing tool: a visible skip, or a failure under `DELTASERVE_REQUIRE_CLIENTS=1`.
fn skip(test: &str, why: &str) {
    let msg = format!("SKIPPED {test}: {why}");
    if std::env::var("DELTASERVE_REQUIRE_CLIENTS").is_ok_and(|v| v == "1") {
        panic!("{msg}");
    }
    eprintln!("{msg}");
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// Runs a child process with a time limit; returns (success, stdout + stderr).
async fn run_bounded(mut cmd: Command, limit: Duration) -> (bool, String) {
    let child = tokio::process::Command::from(std::mem::replace(&mut cmd, Command::new("true")))
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(limit, child).await {
        Ok(Ok(out)) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Ok(Err(e)) => (false, format!("could not run: {e}")),
        Err(_) => (false, format!("timed out after {limit:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_python_client() {
    if !succeeds(Command::new("python3").args(["-c", "import openai"])) {
        return skip(
            "openai_python_client",
            "python3 with the `openai` package is not installed (pip install openai)",
        );
    }
    let deltas = delta_dir(1);
    let mut cfg = config(Some(deltas.path()));
    cfg.api_key = Some("test-key".into());
    let s = server(cfg).await;
    let url = format!("http://{}/v1", s.addr());
    let mut cmd = Command::new("python3");
    cmd.arg(manifest_dir().join("tests/openai_client.py"))
        .args([&url, "test-key", BASE, "t0"]);
    let (ok, out) = run_bounded(cmd, Duration::from_secs(120)).await;
    eprintln!("{out}");
    assert!(ok, "the openai client failed:\n{out}");
    assert!(out.contains("checks passed"), "{out}");
    s.shutdown().await.unwrap();
}

/// Where `require("playwright-core")` can find it: `target/web-test` (what `.ci/run` installs)
/// and npm's global root.
fn node_path() -> String {
    let mut dirs = vec![manifest_dir()
        .join("../../target/web-test/node_modules")
        .display()
        .to_string()];
    if let Ok(out) = Command::new("npm").args(["root", "-g"]).output() {
        dirs.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    if let Ok(p) = std::env::var("NODE_PATH") {
        dirs.push(p);
    }
    dirs.join(":")
}

fn chromium() -> Option<String> {
    let candidates = [
        std::env::var("CHROMIUM").unwrap_or_default(),
        "/usr/bin/chromium".into(),
        "/usr/bin/chromium-browser".into(),
    ];
    candidates
        .into_iter()
        .find(|c| !c.is_empty() && Path::new(c).exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn web_page_in_headless_chromium() {
    let Some(chrome) = chromium() else {
        return skip(
            "web_page_in_headless_chromium",
            "Debian's chromium is not installed (apt-get install chromium)",
        );
    };
    let np = node_path();
    if !succeeds(
        Command::new("node")
            .args(["-e", "require('playwright-core')"])
            .env("NODE_PATH", &np),
    ) {
        return skip(
            "web_page_in_headless_chromium",
            "node with playwright-core is not installed (npm install --prefix target/web-test playwright-core)",
        );
    }
    let deltas = delta_dir(3);
    let s = server(config(Some(deltas.path()))).await;
    let a = s.addr();
    // What each model answers alone; the page must stream exactly this into each column.
    let mut expected = serde_json::Map::new();
    for model in [BASE, "t0", "t2"] {
        let text = completion_text(
            &post(a, "/v1/completions", &completion(model, "def main():", 12)).await,
        );
        expected.insert(model.to_string(), text.into());
    }
    let shot = manifest_dir().join("../../target/web-test/page.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let mut cmd = Command::new("node");
    cmd.arg(manifest_dir().join("tests/web_page.cjs"))
        .arg(format!("http://{a}/"))
        .arg(&shot)
        .arg(serde_json::Value::Object(expected).to_string())
        .env("NODE_PATH", np)
        .env("CHROMIUM", chrome);
    let (ok, out) = run_bounded(cmd, Duration::from_secs(120)).await;
    eprintln!("{out}");
    assert!(ok, "the page test failed:\n{out}");
    assert!(shot.exists());
    eprintln!("screenshot: {}", shot.display());
    s.shutdown().await.unwrap();
}
