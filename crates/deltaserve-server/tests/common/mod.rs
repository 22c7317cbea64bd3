//! Shared pieces of the server's integration tests: tenant deltas made on the fly from the
//! `llama` fixture, a server on 127.0.0.1 port 0, and a small HTTP/1.1 client (hyper) that can
//! read server-sent events one by one and hang up mid-stream.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use deltaserve_format::{
    fingerprint_safetensors, pack_signs, words_per_row, write_delta, DeltaHeader, Dtype,
    FinetuneInfo, OwnedTensor, TensorEntry,
};
use deltaserve_model::{Checkpoint, Proj};
use deltaserve_server::{start, ServeConfig, ServerHandle};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The base every test serves.
pub fn base_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama")
}

/// The base's name as served (its directory's name).
pub const BASE: &str = "llama";

/// A xorshift generator, so deltas are reproducible without extra crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// How a test tenant's delta looks.
pub struct DeltaSpec {
    /// Seed of its random signs.
    pub seed: u64,
    /// BitDelta scale of every projection.
    pub scale: f32,
    /// A chat template of the fine-tune's own.
    pub chat_template: Option<String>,
    /// Record another base's fingerprint (the server must refuse it).
    pub wrong_base: bool,
}

impl DeltaSpec {
    pub fn seed(seed: u64) -> Self {
        DeltaSpec {
            seed,
            scale: 0.05,
            chat_template: None,
            wrong_base: false,
        }
    }
}

/// Writes a BitDelta-style delta of the fixture base: random signs on every projection.
pub fn write_test_delta(path: &Path, spec: &DeltaSpec) {
    write_delta_for(&base_dir(), path, spec)
}

/// Writes a BitDelta-style delta of the base in `base`: random signs on every projection.
pub fn write_delta_for(base: &Path, path: &Path, spec: &DeltaSpec) {
    let ckpt = Checkpoint::open(base).expect("base checkpoint");
    let mut fp = fingerprint_safetensors(&ckpt.weight_files()).expect("fingerprint");
    if spec.wrong_base {
        fp.hex = "0".repeat(fp.hex.len());
    }
    let info = FinetuneInfo {
        chat_template: spec.chat_template.clone(),
        ..Default::default()
    };
    let mut header = DeltaHeader::new("bitdelta", fp, info);
    let mut tensors = Vec::new();
    let mut rng = Rng(spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    for l in 0..ckpt.config().num_hidden_layers {
        for proj in Proj::ALL {
            let name = format!("model.layers.{l}.{}.weight", proj.module());
            let raw = ckpt.raw(&name).expect("base tensor");
            let (rows, cols) = (raw.shape[0], raw.shape[1]);
            let signs: Vec<f32> = (0..rows * cols)
                .map(|_| if rng.next() & 1 == 1 { 1.0 } else { -1.0 })
                .collect();
            header.tensors.insert(
                name.clone(),
                TensorEntry::sign(&name, [rows, cols], Dtype::F32),
            );
            tensors.push((
                format!("{name}.signs"),
                OwnedTensor::from_u32(
                    vec![rows, words_per_row(cols)],
                    &pack_signs(&signs, rows, cols),
                ),
            ));
            tensors.push((format!("{name}.scale"), OwnedTensor::scale(spec.scale)));
        }
    }
    write_delta(path, &header, tensors, true).expect("writing the test delta");
}

/// A directory of `n` tenants `t0 … t{n-1}` (seeds 1…n).
pub fn delta_dir(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..n {
        write_test_delta(
            &dir.path().join(format!("t{i}.delta")),
            &DeltaSpec::seed(i as u64 + 1),
        );
    }
    dir
}

/// Bytes one test tenant takes in memory (what the delta cache counts), from its shapes.
pub fn tenant_bytes() -> usize {
    let ckpt = Checkpoint::open(base_dir()).expect("fixture base");
    let mut n = 0;
    for l in 0..ckpt.config().num_hidden_layers {
        for proj in Proj::ALL {
            let raw = ckpt
                .raw(&format!("model.layers.{l}.{}.weight", proj.module()))
                .expect("base tensor");
            n += raw.shape[0] * words_per_row(raw.shape[1]) * 4 + 4;
        }
    }
    n
}

/// A random base with the fixture's tokenizer, deeper and with a longer context than the fixture,
/// so that a long generation takes long enough (seconds) to be cancelled in the middle.
pub fn slow_base() -> tempfile::TempDir {
    use deltaserve_model::random::{RandomCheckpoint, RandomShape};
    let dir = tempfile::tempdir().expect("tempdir");
    let shape = RandomShape {
        hidden: 128,
        intermediate: 344,
        layers: 8,
        heads: 4,
        kv_heads: 2,
        vocab: 512,
        max_positions: 1024,
    };
    let base = base_dir();
    let ckpt = RandomCheckpoint {
        shape,
        bf16: false,
        seed: 3,
        finetune_of: None,
        max_shard_bytes: usize::MAX,
        tokenizer_from: Some(&base),
    };
    ckpt.write(dir.path()).expect("writing a random base");
    dir
}

/// A config for the fixture base on 127.0.0.1, a free port.
pub fn config(deltas: Option<&Path>) -> ServeConfig {
    let mut cfg = ServeConfig::new(base_dir());
    cfg.deltas = deltas.map(Path::to_path_buf);
    cfg.port = 0;
    cfg.shutdown_timeout = Duration::from_secs(5);
    cfg
}

pub async fn server(cfg: ServeConfig) -> ServerHandle {
    start(cfg).await.expect("starting the server")
}

/// A response read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `data:` payloads of a server-sent-event body.
    pub fn sse_data(&self) -> Vec<String> {
        sse_data(&self.text())
    }

    /// Checks an OpenAI error body and returns its message.
    pub fn error_message(&self, status: u16) -> String {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].is_string() && e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
        e["message"].as_str().unwrap_or_default().to_string()
    }
}

pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .flat_map(|ev| ev.lines())
        .filter_map(|l| l.strip_prefix("data:").map(|d| d.trim_start().to_string()))
        .collect()
}

/// Opens a connection and sends one request; returns the response with its body unread.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> hyper::Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default().to_string())))
        .expect("request");
    sender.send_request(req).await.expect("send")
}

/// Sends a request and reads the whole response (bounded by 60 s).
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> Resp {
    let fut = async {
        let resp = send(addr, method, path, body, key).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Resp {
            status,
            headers,
            body,
        }
    };
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .expect("request timed out")
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    call(addr, Method::GET, path, None, None).await
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    call(addr, Method::POST, path, Some(&body.to_string()), None).await
}

pub async fn post_key(addr: SocketAddr, path: &str, body: &Value, key: &str) -> Resp {
    call(addr, Method::POST, path, Some(&body.to_string()), Some(key)).await
}

/// A greedy completion request.
pub fn completion(model: &str, prompt: &str, max_tokens: usize) -> Value {
    serde_json::json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// The text of a whole completion response.
pub fn completion_text(r: &Resp) -> String {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["choices"][0]["text"]
        .as_str()
        .expect("choices[0].text")
        .to_string()
}

/// Concatenates the text of a streamed completion or chat response; checks it ends with `[DONE]`.
pub fn streamed_text(r: &Resp) -> (String, String) {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let mut text = String::new();
    let mut finish = String::new();
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).expect("chunk JSON");
        assert!(v.get("error").is_none(), "{v}");
        for c in v["choices"].as_array().expect("choices") {
            let piece = c["text"]
                .as_str()
                .or_else(|| c["delta"]["content"].as_str())
                .unwrap_or_default();
            text.push_str(piece);
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (text, finish)
}

/// Reads one metric's value from `/metrics` text (the line `name value`, labels included in `name`).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

pub async fn metrics(addr: SocketAddr) -> String {
    get(addr, "/metrics").await.text()
}
