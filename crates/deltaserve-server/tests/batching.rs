//! Continuous batching over HTTP: answers do not depend on what they are batched with, a bounded
//! load over more tenants than the delta cache holds, one load per cold delta, and cancellation.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use deltaserve_engine::tenants::{load_tenant, open_tenant};
use deltaserve_engine::{generate, Base, SamplingParams};
use futures_util::future::join_all;
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use serde_json::json;

const PROMPTS: [&str; 4] = [
    "def main():",
    "import os\n",
    "class Foo:",
    "# Compute the sum",
];

/// The single-sequence loop's greedy text for `model` (the base or a tenant file), as reference.
fn reference_text(
    base: &Base,
    tenant: Option<&std::path::Path>,
    prompt: &str,
    max_tokens: usize,
) -> String {
    let weights = tenant.map(|p| {
        let t = open_tenant(1_000, "ref", p, base).expect("tenant");
        load_tenant(&t, base).expect("tenant weights")
    });
    let ids = base.codec.encode(prompt, true).unwrap();
    let stop = base.codec.stop_ids().to_vec();
    let g = generate(
        &base.model,
        weights.as_ref(),
        &ids,
        max_tokens,
        SamplingParams::default(),
        &stop,
        |_| {},
    )
    .expect("generate");
    let toks: Vec<u32> = g.tokens.into_iter().filter(|t| !stop.contains(t)).collect();
    base.codec.decode(&toks).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_batch_of_16_equals_each_request_alone() {
    let deltas = delta_dir(4);
    let s = server(config(Some(deltas.path()))).await;
    let a = s.addr();
    let models = [BASE, "t0", "t1", "t2", "t3"];
    let reqs: Vec<(String, &str, usize)> = (0..16)
        .map(|i| {
            (
                models[i % models.len()].to_string(),
                PROMPTS[i % PROMPTS.len()],
                6 + (i % 5) * 3,
            )
        })
        .collect();

    // Alone, one after another, and checked against the single-sequence loop.
    let base = Base::open(
        &base_dir(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut alone = Vec::new();
    for (model, prompt, n) in &reqs {
        let text =
            completion_text(&post(a, "/v1/completions", &completion(model, prompt, *n)).await);
        let file = (model != BASE).then(|| deltas.path().join(format!("{model}.delta")));
        assert_eq!(
            text,
            reference_text(&base, file.as_deref(), prompt, *n),
            "{model} {prompt:?}"
        );
        alone.push(text);
    }
    // Tenants really differ from the base (the test would prove nothing otherwise).
    let distinct: std::collections::HashSet<&String> = alone.iter().collect();
    assert!(distinct.len() >= 8, "too few distinct answers: {alone:?}");

    // All at once, half of them streamed.
    let steps_before = s.engine().metrics().steps;
    let futs = reqs.iter().enumerate().map(|(i, (model, prompt, n))| {
        let mut body = completion(model, prompt, *n);
        let stream = i % 2 == 1;
        body["stream"] = json!(stream);
        async move {
            let r = post(a, "/v1/completions", &body).await;
            if stream {
                streamed_text(&r).0
            } else {
                completion_text(&r)
            }
        }
    });
    let together = join_all(futs).await;
    for (i, (t, a1)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(t, a1, "request {i} ({:?}) differs when batched", reqs[i]);
    }
    let m = s.engine().metrics();
    let steps = m.steps - steps_before;
    let total: usize = reqs.iter().map(|r| r.2).sum();
    assert!(
        (steps as usize) < total,
        "no batching happened: {steps} steps for {total} tokens"
    );
    eprintln!(
        "16 mixed requests: {total} tokens in {steps} steps; mean batch {:.1}",
        m.step_sequences as f64 / m.steps as f64
    );
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_of_200_requests_over_8_tenants_with_room_for_3_deltas() {
    let deltas = delta_dir(8);
    let mut cfg = config(Some(deltas.path()));
    cfg.engine.delta_memory = 3 * tenant_bytes() + tenant_bytes() / 2;
    let s = server(cfg).await;
    let a = s.addr();
    let max_tokens = 4;

    // Expected answers, each computed alone.
    let mut expected = HashMap::new();
    for t in 0..8 {
        for p in PROMPTS {
            let model = format!("t{t}");
            let text = completion_text(
                &post(a, "/v1/completions", &completion(&model, p, max_tokens)).await,
            );
            expected.insert((model, p), text);
        }
    }
    let expected = Arc::new(expected);
    let evictions_before = metric(&metrics(a).await, "deltaserve_delta_cache_evictions_total");

    let t0 = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients = (0..32).map(|c| {
        let (next, expected) = (next.clone(), expected.clone());
        tokio::spawn(async move {
            let mut done = 0;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= 200 || t0.elapsed() > Duration::from_secs(120) {
                    return done;
                }
                // A spread of tenants: neighbours in time mostly want different deltas.
                let model = format!("t{}", (i * 5 + c) % 8);
                let prompt = PROMPTS[i % PROMPTS.len()];
                let mut body = completion(&model, prompt, max_tokens);
                body["stream"] = json!(i % 3 == 0);
                let r = post(a, "/v1/completions", &body).await;
                let text = if i % 3 == 0 {
                    streamed_text(&r).0
                } else {
                    completion_text(&r)
                };
                assert_eq!(
                    &text,
                    &expected[&(model.clone(), prompt)],
                    "request {i} to {model}"
                );
                done += 1;
            }
        })
    });
    let done: usize = join_all(clients)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .sum();
    let elapsed = t0.elapsed();
    assert_eq!(done, 200, "not all requests finished within the time bound");
    let text = metrics(a).await;
    let evictions = metric(&text, "deltaserve_delta_cache_evictions_total") - evictions_before;
    assert!(evictions > 0.0, "the delta cache never evicted:\n{text}");
    assert!(metric(&text, "deltaserve_delta_cache_resident") <= 3.0);
    eprintln!(
        "load: 200 requests, 32 clients, 8 tenants, cache of 3: {:.2}s ({:.0} req/s), {} evictions, {} loads, {} misses, {} hits",
        elapsed.as_secs_f64(),
        200.0 / elapsed.as_secs_f64(),
        evictions,
        metric(&text, "deltaserve_delta_cache_loads_total"),
        metric(&text, "deltaserve_delta_cache_misses_total"),
        metric(&text, "deltaserve_delta_cache_hits_total"),
    );
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_requests_for_one_cold_delta_load_it_once() {
    let deltas = delta_dir(1);
    let s = server(config(Some(deltas.path()))).await;
    let a = s.addr();
    let futs = (0..4).map(|i| async move {
        completion_text(&post(a, "/v1/completions", &completion("t0", PROMPTS[i], 3)).await)
    });
    join_all(futs).await;
    let text = metrics(a).await;
    assert_eq!(
        metric(&text, "deltaserve_delta_cache_loads_total"),
        1.0,
        "{text}"
    );
    s.shutdown().await.unwrap();
}

/// Waits until the engine has cancelled one request and nothing runs; checks it stopped early.
async fn wait_cancelled(engine: &deltaserve_engine::Engine, max_tokens: u64) {
    let t0 = Instant::now();
    loop {
        let m = engine.metrics();
        if m.failures.get("cancelled").copied().unwrap_or(0) == 1 && m.running == 0 {
            assert!(
                m.generated_tokens < max_tokens,
                "it ran to the end: {} tokens",
                m.generated_tokens
            );
            eprintln!(
                "cancelled after {} of {max_tokens} tokens",
                m.generated_tokens
            );
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the dropped request still runs: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn long_request(model: &str, stream: bool) -> String {
    json!({"model": model, "prompt": "def main():", "max_tokens": 1000, "temperature": 0,
           "ignore_eos": true, "stream": stream})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_client_frees_its_slot() {
    let base = slow_base();
    let mut cfg = config(None);
    cfg.base = base.path().to_path_buf();
    // KV room for one long request at a time.
    cfg.engine.kv_memory = 1010 * 2 * 8 * 2 * 32 * 4;
    let s = server(cfg).await;
    let a = s.addr();
    let name = s.engine().base_name().to_string();
    let engine = s.engine().clone();

    let resp = send(
        a,
        Method::POST,
        "/v1/completions",
        Some(&long_request(&name, true)),
        None,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.into_body();
    // Read the first chunk, then hang up.
    let first = tokio::time::timeout(Duration::from_secs(30), stream.frame())
        .await
        .unwrap();
    assert!(first.is_some());
    drop(stream);
    wait_cancelled(&engine, 1000).await;

    // The slot is free: the next request, which needs the whole KV budget, runs at once.
    let t0 = Instant::now();
    let body: serde_json::Value = serde_json::from_str(&long_request(&name, false)).unwrap();
    let mut short = body.clone();
    short["max_tokens"] = json!(20);
    let r = post(a, "/v1/completions", &short).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(t0.elapsed() < Duration::from_secs(10));
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_client_of_a_whole_response_is_cancelled_too() {
    let base = slow_base();
    let mut cfg = config(None);
    cfg.base = base.path().to_path_buf();
    let s = server(cfg).await;
    let a = s.addr();
    let name = s.engine().base_name().to_string();
    let engine = s.engine().clone();
    let body = long_request(&name, false);
    let pending =
        tokio::spawn(
            async move { send(a, Method::POST, "/v1/completions", Some(&body), None).await },
        );
    let t0 = Instant::now();
    while engine.metrics().generated_tokens < 5 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Hang up: aborting the client task drops its connection.
    pending.abort();
    wait_cancelled(&engine, 1000).await;
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_finetune_serves_like_the_single_sequence_loop() {
    use deltaserve_codecs::bitdelta::{compress, CompressOptions};
    use deltaserve_model::random::{RandomCheckpoint, RandomShape};
    use deltaserve_model::Checkpoint;

    // A fine-tune of the fixture (every weight moved), compressed with BitDelta by the codecs crate.
    let work = tempfile::tempdir().unwrap();
    let base_ckpt = Checkpoint::open(base_dir()).unwrap();
    let cfg = base_ckpt.config();
    let shape = RandomShape {
        hidden: cfg.hidden_size,
        intermediate: cfg.intermediate_size,
        layers: cfg.num_hidden_layers,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads,
        vocab: cfg.vocab_size,
        max_positions: cfg.max_position_embeddings,
    };
    let ft_dir = work.path().join("ft");
    let bd = base_dir();
    RandomCheckpoint {
        shape,
        bf16: false,
        seed: 42,
        finetune_of: Some((&base_ckpt, 0.05)),
        max_shard_bytes: usize::MAX,
        tokenizer_from: Some(&bd),
    }
    .write(&ft_dir)
    .unwrap();
    let deltas = work.path().join("deltas");
    std::fs::create_dir_all(&deltas).unwrap();
    let ft = Checkpoint::open(&ft_dir).unwrap();
    let opts = CompressOptions {
        out: deltas.join("ft.delta"),
        force: false,
        progress: false,
    };
    compress(&base_ckpt, &ft, &opts).unwrap();

    let s = server(config(Some(&deltas))).await;
    let a = s.addr();
    let base = Base::open(
        &base_dir(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut alone = Vec::new();
    for p in PROMPTS {
        let served = completion_text(&post(a, "/v1/completions", &completion("ft", p, 10)).await);
        assert_eq!(
            served,
            reference_text(&base, Some(&deltas.join("ft.delta")), p, 10),
            "{p:?}"
        );
        let base_text =
            completion_text(&post(a, "/v1/completions", &completion(BASE, p, 10)).await);
        assert_ne!(
            served, base_text,
            "the fine-tune answers like the base for {p:?}"
        );
        alone.push((served, base_text));
    }
    // The fine-tune and the base in one batch.
    let futs = PROMPTS.iter().flat_map(|p| {
        [("ft", *p), (BASE, *p)].map(|(m, p)| async move {
            completion_text(&post(a, "/v1/completions", &completion(m, p, 10)).await)
        })
    });
    let together = join_all(futs).await;
    for (i, (ft_text, base_text)) in alone.iter().enumerate() {
        assert_eq!(&together[2 * i], ft_text);
        assert_eq!(&together[2 * i + 1], base_text);
    }
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prompts_prefilled_in_chunks_answer_as_in_one_piece() {
    let deltas = delta_dir(2);
    let mut cfg = config(Some(deltas.path()));
    // Three tokens per step: every prompt below is prefilled over several steps, next to decodes.
    cfg.engine.max_batch_tokens = 3;
    let s = server(cfg).await;
    let a = s.addr();
    let base = Base::open(
        &base_dir(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let prompt = "def compute_total(items, tax_rate):\n    total = 0\n";
    assert!(base.codec.encode(prompt, true).unwrap().len() > 6);
    let futs = [BASE, "t0", "t1"].map(|m| async move {
        (
            m,
            completion_text(&post(a, "/v1/completions", &completion(m, prompt, 8)).await),
        )
    });
    for (model, text) in join_all(futs).await {
        let file = (model != BASE).then(|| deltas.path().join(format!("{model}.delta")));
        assert_eq!(
            text,
            reference_text(&base, file.as_deref(), prompt, 8),
            "{model}"
        );
    }
    s.shutdown().await.unwrap();
}
