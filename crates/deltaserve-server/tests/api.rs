//! Every endpoint over real HTTP on 127.0.0.1, streaming and not, and every error case.

mod common;

use std::time::Duration;

use common::*;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_lists_the_base_and_each_tenant_with_its_parent() {
    let deltas = delta_dir(2);
    let s = server(config(Some(deltas.path()))).await;
    let r = get(s.addr(), "/v1/models").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [BASE, "t0", "t1"]);
    assert_eq!(v["data"][0]["parent"], Value::Null);
    assert_eq!(v["data"][1]["parent"], BASE);
    assert_eq!(v["data"][1]["object"], "model");
    let one = get(s.addr(), "/v1/models/t1").await;
    assert_eq!(one.json()["id"], "t1");
    get(s.addr(), "/v1/models/nope").await.error_message(404);
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completion_whole_and_streamed_agree_and_count_usage() {
    let deltas = delta_dir(1);
    let s = server(config(Some(deltas.path()))).await;
    for model in [BASE, "t0"] {
        let whole = post(
            s.addr(),
            "/v1/completions",
            &completion(model, "def main():", 12),
        )
        .await;
        let v = whole.json();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], model);
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
        let text = completion_text(&whole);
        let usage = &v["usage"];
        let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + completion_tokens
        );
        let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
        if finish == "length" {
            assert_eq!(completion_tokens, 12);
        } else {
            assert_eq!(finish, "stop");
        }

        let mut body = completion(model, "def main():", 12);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let streamed = post(s.addr(), "/v1/completions", &body).await;
        assert!(streamed.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let (stext, sfinish) = streamed_text(&streamed);
        assert_eq!(
            stext, text,
            "{model}: streamed text differs from the whole response"
        );
        assert_eq!(sfinish, finish);
        let data = streamed.sse_data();
        let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
        assert_eq!(
            usage_chunk["usage"]["completion_tokens"].as_u64(),
            Some(completion_tokens)
        );
        assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    }
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_whole_and_streamed_agree() {
    let deltas = delta_dir(1);
    let s = server(config(Some(deltas.path()))).await;
    let body = json!({"model": "t0", "messages": [{"role": "user", "content": "Write hello world"}],
                      "max_tokens": 10, "temperature": 0});
    let whole = post(s.addr(), "/v1/chat/completions", &body).await;
    assert_eq!(whole.status, StatusCode::OK, "{}", whole.text());
    let v = whole.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let streamed = post(s.addr(), "/v1/chat/completions", &sbody).await;
    let data = streamed.sse_data();
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let (stext, finish) = streamed_text(&streamed);
    assert_eq!(stext, text);
    assert_eq!(finish, v["choices"][0]["finish_reason"].as_str().unwrap());

    // Content given as parts is the same conversation.
    let mut parts = body.clone();
    parts["messages"][0]["content"] = json!([{"type": "text", "text": "Write hello world"}]);
    let p = post(s.addr(), "/v1/chat/completions", &parts).await;
    assert_eq!(
        p.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap(),
        text
    );
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenant_with_its_own_chat_template_renders_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:";
    let spec = DeltaSpec {
        chat_template: Some(template.into()),
        ..DeltaSpec::seed(7)
    };
    write_test_delta(&dir.path().join("templated.delta"), &spec);
    write_test_delta(&dir.path().join("plain.delta"), &DeltaSpec::seed(7));
    let s = server(config(Some(dir.path()))).await;
    let prompt_tokens = |model: &str| {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
        let addr = s.addr();
        async move {
            post(addr, "/v1/chat/completions", &body).await.json()["usage"]["prompt_tokens"]
                .as_u64()
                .unwrap()
        }
    };
    let base = prompt_tokens(BASE).await;
    let plain = prompt_tokens("plain").await;
    let templated = prompt_tokens("templated").await;
    assert_eq!(plain, base, "a delta without a template uses the base's");
    assert_ne!(
        templated, base,
        "the fine-tune's template renders a different prompt"
    );
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_string_ends_the_text_before_it() {
    let s = server(config(None)).await;
    let full = completion_text(
        &post(
            s.addr(),
            "/v1/completions",
            &completion(BASE, "def main():", 20),
        )
        .await,
    );
    // Stop at the second half of what greedy decoding produces.
    let cut = full
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= full.len() / 2 && i > 0)
        .expect("some text");
    let stop: String = full[cut..].chars().take(3).collect();
    assert!(!stop.is_empty());
    let expect = &full[..full.find(&stop).unwrap()];
    let mut body = completion(BASE, "def main():", 20);
    body["stop"] = json!([stop]);
    let r = post(s.addr(), "/v1/completions", &body).await;
    assert_eq!(completion_text(&r), expect);
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let (text, finish) = streamed_text(&post(s.addr(), "/v1/completions", &body).await);
    assert_eq!((text.as_str(), finish.as_str()), (expect, "stop"));
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_openai_errors() {
    let s = server(config(None)).await;
    let a = s.addr();
    let m = post(a, "/v1/completions", &completion("no-such-tenant", "x", 2))
        .await
        .error_message(404);
    assert!(m.contains("no-such-tenant"), "{m}");
    let chat404 = json!({"model": "missing", "messages": [{"role": "user", "content": "x"}]});
    post(a, "/v1/chat/completions", &chat404)
        .await
        .error_message(404);

    let r = call(
        a,
        Method::POST,
        "/v1/completions",
        Some("{\"model\": \"llama\", "),
        None,
    )
    .await;
    let m = r.error_message(400);
    assert!(m.contains("JSON"), "{m}");
    let wrong_type = json!({"model": BASE, "prompt": "x", "max_tokens": "many"});
    let r = post(a, "/v1/completions", &wrong_type).await;
    assert!(r.error_message(400).contains("max_tokens"));
    assert_eq!(r.json()["error"]["param"], "max_tokens");

    for (field, value) in [
        ("temperature", json!(3.0)),
        ("temperature", json!(-0.5)),
        ("top_p", json!(0.0)),
        ("top_p", json!(1.5)),
        ("top_k", json!(-3)),
        ("max_tokens", json!(0)),
        ("max_tokens", json!(100000)),
        ("n", json!(2)),
        ("stop", json!(["a", "b", "c", "d", "e"])),
    ] {
        let mut body = completion(BASE, "hello", 4);
        body[field] = value.clone();
        let r = post(a, "/v1/completions", &body).await;
        let msg = r.error_message(400);
        assert_eq!(r.json()["error"]["param"], field, "{field}={value}: {msg}");
        assert!(msg.contains(field), "{field}={value}: {msg}");
    }
    // The fixture's context is 256 tokens.
    let long = "word ".repeat(400);
    let m = post(a, "/v1/completions", &completion(BASE, &long, 4))
        .await
        .error_message(400);
    assert!(m.contains("context length"), "{m}");
    post(a, "/v1/completions", &completion(BASE, "", 4))
        .await
        .error_message(400);
    let multi = json!({"model": BASE, "prompt": ["a", "b"]});
    post(a, "/v1/completions", &multi).await.error_message(400);
    let empty_chat = json!({"model": BASE, "messages": []});
    post(a, "/v1/chat/completions", &empty_chat)
        .await
        .error_message(400);
    get(a, "/v1/nothing-here").await.error_message(404);
    // The server is still serving.
    assert_eq!(
        post(a, "/v1/completions", &completion(BASE, "x", 2))
            .await
            .status,
        StatusCode::OK
    );
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_key_guards_v1_but_not_health_metrics_or_page() {
    let mut cfg = config(None);
    cfg.api_key = Some("sekret".into());
    let s = server(cfg).await;
    let a = s.addr();
    let body = completion(BASE, "x", 2);
    let r = post(a, "/v1/completions", &body).await;
    r.error_message(401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    post_key(a, "/v1/completions", &body, "wrong")
        .await
        .error_message(401);
    call(a, Method::GET, "/v1/models", None, None)
        .await
        .error_message(401);
    assert_eq!(
        post_key(a, "/v1/completions", &body, "sekret").await.status,
        StatusCode::OK
    );
    assert_eq!(get(a, "/health").await.status, StatusCode::OK);
    assert_eq!(get(a, "/metrics").await.status, StatusCode::OK);
    assert_eq!(get(a, "/").await.status, StatusCode::OK);
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_answers_429_with_retry_after() {
    let mut cfg = config(None);
    // One request runs (the KV budget holds one), one waits; the third is refused.
    cfg.engine.max_queue = 1;
    cfg.engine.kv_memory = 250 * 2 * 2 * 2 * 16 * 4;
    let s = server(cfg).await;
    let a = s.addr();
    let long = completion(BASE, "def main():", 200);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let body = long.clone();
        tasks.push(tokio::spawn(async move {
            post(a, "/v1/completions", &body).await
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.headers["retry-after"], "1");
            let m = r.error_message(429);
            assert!(m.contains("overloaded"), "{m}");
        }
        statuses.push(r.status.as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    let text = metrics(a).await;
    assert!(
        metric(
            &text,
            "deltaserve_request_failures_total{err=\"overloaded\"}"
        ) >= 1.0,
        "{text}"
    );
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deltas_from_another_base_are_refused_at_start_up() {
    let dir = delta_dir(1);
    let spec = DeltaSpec {
        wrong_base: true,
        ..DeltaSpec::seed(9)
    };
    write_test_delta(&dir.path().join("foreign.delta"), &spec);
    std::fs::write(dir.path().join("garbage.delta"), b"not a delta").unwrap();
    let s = server(config(Some(dir.path()))).await;
    let v = get(s.addr(), "/v1/models").await.json();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [BASE, "t0"]);
    post(s.addr(), "/v1/completions", &completion("foreign", "x", 2))
        .await
        .error_message(404);
    assert_eq!(
        post(s.addr(), "/v1/completions", &completion("t0", "x", 2))
            .await
            .status,
        StatusCode::OK
    );
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_delta_fails_its_requests_alone_and_becomes_unavailable() {
    let dir = delta_dir(2);
    let s = server(config(Some(dir.path()))).await;
    let a = s.addr();
    // The file breaks after registration: its first load finds it corrupt.
    std::fs::write(dir.path().join("t1.delta"), b"garbage now").unwrap();
    let m = post(a, "/v1/completions", &completion("t1", "x", 2))
        .await
        .error_message(500);
    assert!(m.contains("t1") && m.contains("unavailable"), "{m}");
    let m2 = post(a, "/v1/completions", &completion("t1", "x", 2))
        .await
        .error_message(500);
    assert!(m2.contains("unavailable"), "{m2}");
    let v = get(a, "/v1/models").await.json();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [BASE, "t0"]);
    assert_eq!(
        post(a, "/v1/completions", &completion("t0", "x", 2))
            .await
            .status,
        StatusCode::OK
    );
    let text = metrics(a).await;
    assert_eq!(
        metric(&text, "deltaserve_delta_cache_load_failures_total"),
        1.0,
        "{text}"
    );
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_adds_and_removes_tenants_at_run_time() {
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("late.delta");
    write_test_delta(&path, &DeltaSpec::seed(5));
    let mut cfg = config(None);
    cfg.api_key = Some("k".into());
    let s = server(cfg).await;
    let a = s.addr();
    let add = json!({"name": "late", "path": path.to_str().unwrap()});
    post(a, "/v1/deltas", &add).await.error_message(401);
    let r = post_key(a, "/v1/deltas", &add, "k").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json()["parent"], BASE);
    post_key(a, "/v1/deltas", &add, "k")
        .await
        .error_message(400);
    let bad_name = json!({"name": "../x", "path": path.to_str().unwrap()});
    post_key(a, "/v1/deltas", &bad_name, "k")
        .await
        .error_message(400);
    let missing = json!({"name": "m", "path": "/no/such/file.delta"});
    post_key(a, "/v1/deltas", &missing, "k")
        .await
        .error_message(400);
    assert_eq!(
        post_key(a, "/v1/completions", &completion("late", "x", 3), "k")
            .await
            .status,
        StatusCode::OK
    );

    call(a, Method::DELETE, "/v1/deltas/late", None, None)
        .await
        .error_message(401);
    let r = call(a, Method::DELETE, "/v1/deltas/late", None, Some("k")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["deleted"], true);
    post_key(a, "/v1/completions", &completion("late", "x", 3), "k")
        .await
        .error_message(404);
    call(a, Method::DELETE, "/v1/deltas/late", None, Some("k"))
        .await
        .error_message(404);
    s.shutdown().await.unwrap();

    // Without a key on the server, nobody may load files.
    let s = server(config(None)).await;
    post(s.addr(), "/v1/deltas", &add).await.error_message(403);
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_metrics_and_page() {
    let deltas = delta_dir(1);
    let s = server(config(Some(deltas.path()))).await;
    let a = s.addr();
    assert_eq!(get(a, "/health").await.json()["status"], "ok");
    post(a, "/v1/completions", &completion("t0", "x", 3)).await;
    post(a, "/v1/completions", &completion("t0", "y", 3)).await;
    let text = metrics(a).await;
    for name in [
        "deltaserve_queue_depth",
        "deltaserve_batch_size",
        "deltaserve_tokens_per_second",
        "deltaserve_generated_tokens_total",
        "deltaserve_time_to_first_token_seconds_count",
        "deltaserve_delta_cache_hits_total",
        "deltaserve_delta_cache_misses_total",
        "deltaserve_delta_cache_evictions_total",
    ] {
        assert!(
            text.contains(&format!("\n{name} ")),
            "{name} missing:\n{text}"
        );
    }
    assert_eq!(
        metric(&text, "deltaserve_requests_total{model=\"t0\"}"),
        2.0
    );
    assert_eq!(metric(&text, "deltaserve_delta_cache_misses_total"), 1.0);
    assert_eq!(metric(&text, "deltaserve_delta_cache_hits_total"), 1.0);
    assert_eq!(
        metric(&text, "deltaserve_time_to_first_token_seconds_count"),
        2.0
    );
    assert!(metric(&text, "deltaserve_generated_tokens_total") >= 2.0);
    assert!(
        text.lines()
            .all(|l| l.is_empty() || l.starts_with('#') || l.starts_with("deltaserve_")),
        "{text}"
    );
    let page = get(a, "/").await;
    assert!(page.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("/v1/models"));
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_finishes_in_flight_requests_and_refuses_new_ones() {
    let s = server(config(None)).await;
    let a = s.addr();
    let mut body = completion(BASE, "def main():", 200);
    body["stream"] = json!(true);
    let in_flight = tokio::spawn(async move { post(a, "/v1/completions", &body).await });
    // Wait until it runs.
    let engine = s.engine().clone();
    let t0 = std::time::Instant::now();
    while engine.metrics().generated_tokens == 0 && t0.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    s.shutdown().await.unwrap();
    let r = in_flight.await.unwrap();
    let (text, _) = streamed_text(&r);
    assert!(!text.is_empty());
    assert!(
        tokio::net::TcpStream::connect(a).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_cancels_what_outlasts_the_timeout() {
    let base = slow_base();
    let mut cfg = config(None);
    cfg.base = base.path().to_path_buf();
    cfg.shutdown_timeout = Duration::from_millis(300);
    let s = server(cfg).await;
    let a = s.addr();
    let name = s.engine().base_name().to_string();
    let body = json!({"model": name, "prompt": "x", "max_tokens": 1000, "ignore_eos": true, "stream": true});
    let in_flight = tokio::spawn(async move { post(a, "/v1/completions", &body).await });
    let engine = s.engine().clone();
    while engine.metrics().generated_tokens == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let t0 = std::time::Instant::now();
    s.shutdown().await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t0.elapsed()
    );
    let r = in_flight.await.unwrap();
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "shutting_down", "{err}");
    assert!(engine.metrics().generated_tokens < 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delta_larger_than_the_whole_delta_memory_fails_clearly() {
    let deltas = delta_dir(1);
    let mut cfg = config(Some(deltas.path()));
    cfg.engine.delta_memory = 1000;
    let s = server(cfg).await;
    let m = post(s.addr(), "/v1/completions", &completion("t0", "x", 2))
        .await
        .error_message(500);
    assert!(m.contains("t0") && m.contains("--delta-memory"), "{m}");
    assert_eq!(
        post(s.addr(), "/v1/completions", &completion(BASE, "x", 2))
            .await
            .status,
        StatusCode::OK
    );
    s.shutdown().await.unwrap();
}
