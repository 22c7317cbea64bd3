//! Multi-tenant serving throughput: one random base, N random BitDelta tenants, a fixed request
//! mix driven over HTTP on 127.0.0.1; prints tokens/s and latency percentiles per tenant count.
//!
//! ```sh
//! cargo run --release -p deltaserve-server --example serve_load -- \
//!     [--layers 12 --hidden 768 --tenants 0,1,8,32 --requests 64 --concurrency 32 --max-tokens 32]
//! ```
//! `--tenants 0` is the base model alone (the single-model baseline). Requests go round robin over
//! the tenants with `ignore_eos`, so every request generates exactly `--max-tokens` tokens.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use deltaserve_model::random::{RandomCheckpoint, RandomShape};
use futures_util::future::join_all;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::json;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn num(name: &str, default: usize) -> usize {
    arg(name, &default.to_string())
        .parse()
        .unwrap_or_else(|_| panic!("{name} takes a number"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let hidden = num("--hidden", 768);
    let layers = num("--layers", 12);
    let requests = num("--requests", 64);
    let concurrency = num("--concurrency", 32);
    let max_tokens = num("--max-tokens", 32);
    let tenant_counts: Vec<usize> = arg("--tenants", "0,1,8,32")
        .split(',')
        .map(|t| t.trim().parse().expect("--tenants 0,1,8"))
        .collect();

    let work = tempfile::tempdir().expect("tempdir");
    let base = work.path().join("base");
    let shape = RandomShape {
        hidden,
        intermediate: hidden * 8 / 3 / 16 * 16,
        layers,
        heads: hidden / 64,
        kv_heads: hidden / 64,
        vocab: 512,
        max_positions: 1024,
    };
    let fixture = base_dir();
    let t = Instant::now();
    RandomCheckpoint {
        shape,
        bf16: false,
        seed: 1,
        finetune_of: None,
        max_shard_bytes: usize::MAX,
        tokenizer_from: Some(&fixture),
    }
    .write(&base)
    .expect("writing the random base");
    let most = tenant_counts.iter().copied().max().unwrap_or(0);
    let all = work.path().join("all");
    std::fs::create_dir_all(&all).unwrap();
    for i in 0..most {
        write_delta_for(
            &base,
            &all.join(format!("t{i}.delta")),
            &DeltaSpec::seed(i as u64 + 1),
        );
    }
    eprintln!(
        "random base {shape:?} and {most} deltas written in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    println!("| tenants | requests | tokens | wall s | tokens/s | p50 latency s | p90 latency s | p50 TTFT s | mean batch |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &k in &tenant_counts {
        let dir = work.path().join(format!("deltas{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..k {
            std::fs::hard_link(
                all.join(format!("t{i}.delta")),
                dir.join(format!("t{i}.delta")),
            )
            .or_else(|_| {
                std::fs::copy(
                    all.join(format!("t{i}.delta")),
                    dir.join(format!("t{i}.delta")),
                )
                .map(|_| ())
            })
            .unwrap();
        }
        let mut cfg = config(Some(&dir));
        cfg.base = base.clone();
        let s = server(cfg).await;
        let a = s.addr();
        let name = s.engine().base_name().to_string();
        let models: Vec<String> = if k == 0 {
            vec![name]
        } else {
            (0..k).map(|i| format!("t{i}")).collect()
        };
        // Warm every tenant once so delta loading is not timed.
        join_all(models.iter().map(|m| async move {
            post(
                a,
                "/v1/completions",
                &json!({"model": m, "prompt": "x", "max_tokens": 1}),
            )
            .await
        }))
        .await;
        let before = s.engine().metrics();
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let t0 = Instant::now();
        let clients = (0..concurrency).map(|_| {
            let (next, models) = (next.clone(), models.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= requests {
                        return out;
                    }
                    let body = json!({"model": models[i % models.len()], "prompt": "def main():",
                                      "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true});
                    let start = Instant::now();
                    let resp = send(a, Method::POST, "/v1/completions", Some(&body.to_string()), None).await;
                    let mut body = resp.into_body();
                    let mut ttft = None;
                    while let Some(frame) = tokio::time::timeout(Duration::from_secs(600), body.frame()).await.expect("stalled") {
                        if ttft.is_none() && frame.is_ok_and(|f| f.data_ref().is_some_and(|d| !d.is_empty())) {
                            ttft = Some(start.elapsed().as_secs_f64());
                        }
                    }
                    out.push((start.elapsed().as_secs_f64(), ttft.unwrap_or(0.0)));
                }
            })
        });
        let mut lat = Vec::new();
        let mut ttft = Vec::new();
        for c in join_all(clients).await {
            for (l, t) in c.unwrap() {
                lat.push(l);
                ttft.push(t);
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let after = s.engine().metrics();
        lat.sort_by(f64::total_cmp);
        ttft.sort_by(f64::total_cmp);
        let tokens = after.generated_tokens - before.generated_tokens;
        let steps = (after.steps - before.steps).max(1);
        println!(
            "| {} | {requests} | {tokens} | {wall:.2} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} |",
            if k == 0 {
                "base only".to_string()
            } else {
                k.to_string()
            },
            tokens as f64 / wall,
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&ttft, 0.5),
            (after.step_sequences - before.step_sequences) as f64 / steps as f64,
        );
        s.shutdown().await.unwrap();
    }
}
