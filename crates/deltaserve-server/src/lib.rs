//! The OpenAI-compatible HTTP server and web page, thin over [`deltaserve_engine::Engine`].
//!
//! One process holds one base model and answers for many fine-tunes (tenants), each a `.delta`
//! file addressed by name in the `model` field. This crate is the only one that knows HTTP and
//! JSON: requests are parsed and validated (`validation.rs`) into the engine's
//! [`deltaserve_engine::Request`], then queued; the engine batches them.
//!
//! - [`app`]: the router, for tests that call it without a socket (`tower::ServiceExt::oneshot`).
//! - [`start`]: load the base, register the deltas, bind (port 0 picks a free port) and serve in
//!   the background; [`ServerHandle::shutdown`] stops it gracefully.
//! - [`serve`]: [`start`], then wait for SIGINT/SIGTERM (the `deltaserve serve` command).
//!
//! Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with
//! `stream`), `POST /v1/deltas`, `DELETE /v1/deltas/{name}`, `GET /health`, `GET /metrics`, and
//! the page at `/`.

pub mod error;
pub mod metrics;
pub mod openai;
mod routes;
pub mod validation;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use axum::routing::{delete, get, post};
use axum::Router;
use candle_core::{DType, Device};
use deltaserve_engine::{Base, Engine, EngineConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use error::ApiError;

/// What every handler reads.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// Bearer key required on `/v1/*`, and needed at all for the admin endpoints.
    pub api_key: Option<String>,
}

/// The router. `/`, `/health` and `/metrics` are open; `/v1/*` needs the key when there is one.
pub fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(routes::list_models))
        .route("/v1/models/{id}", get(routes::get_model))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/deltas", post(routes::add_delta))
        .route("/v1/deltas/{name}", delete(routes::remove_delta))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::require_key,
        ));
    Router::new()
        .route("/", get(routes::index))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .merge(v1)
        .fallback(routes::not_found)
        .with_state(state)
}

/// Everything `deltaserve serve` takes.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The base model directory (Hugging Face layout).
    pub base: PathBuf,
    /// A directory whose `*.delta` files are served as tenants named after the file stem.
    pub deltas: Option<PathBuf>,
    /// Address to bind.
    pub host: String,
    /// Port to bind; 0 picks a free one ([`ServerHandle::addr`] tells which).
    pub port: u16,
    /// Where the model runs.
    pub device: Device,
    /// Compute dtype.
    pub dtype: DType,
    /// Batching, memory and queue limits.
    pub engine: EngineConfig,
    /// Bearer key for `/v1/*` (and the admin endpoints).
    pub api_key: Option<String>,
    /// On shutdown, how long in-flight requests may take before they are cancelled.
    pub shutdown_timeout: Duration,
}

impl ServeConfig {
    /// Defaults for `base` on the CPU in f32, on 127.0.0.1:8000.
    pub fn new(base: impl Into<PathBuf>) -> Self {
        ServeConfig {
            base: base.into(),
            deltas: None,
            host: "127.0.0.1".into(),
            port: 8000,
            device: Device::Cpu,
            dtype: DType::F32,
            engine: EngineConfig::default(),
            api_key: None,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Checks a tenant name: letters, digits, `.`, `_`, `-` (it appears in URLs and metric labels).
pub fn check_tenant_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!("tenant name `{name}`: use 1-128 letters, digits, `.`, `_` or `-`, not starting with `.`"))
    }
}

/// Registers every `*.delta` in `dir` as a tenant named after its file stem. A delta that cannot
/// be served (another base, unreadable, bad name) is refused with one log line; the rest serve.
/// Returns the names registered.
pub fn register_dir(engine: &Engine, dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading --deltas {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "delta") && p.is_file())
        .collect();
    paths.sort();
    let mut names = Vec::new();
    for path in paths {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let result = check_tenant_name(&name)
            .map_err(|m| m.to_string())
            .and_then(|()| engine.add_tenant(&name, &path).map_err(|e| e.to_string()));
        match result {
            Ok(_) => names.push(name),
            Err(e) => tracing::error!("refusing {}: {e}", path.display()),
        }
    }
    Ok(names)
}

/// A server running in the background.
pub struct ServerHandle {
    addr: SocketAddr,
    engine: Engine,
    trigger: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl ServerHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The engine behind it.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Stops accepting connections and requests, lets in-flight requests finish (cancelling
    /// them after the configured timeout), and waits until the server has stopped.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(t) = self.trigger.take() {
            let _ = t.send(());
        }
        self.wait().await
    }

    /// Waits until the server stops (after [`ServerHandle::shutdown`] or a signal in [`serve`]).
    async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.task)
            .await
            .context("the server task failed")?
            .context("serving")
    }
}

/// Loads the base, registers the deltas, binds and serves in the background.
pub async fn start(cfg: ServeConfig) -> anyhow::Result<ServerHandle> {
    let ServeConfig {
        base,
        deltas,
        host,
        port,
        device,
        dtype,
        engine: engine_cfg,
        api_key,
        shutdown_timeout,
    } = cfg;
    let engine = tokio::task::spawn_blocking(move || -> anyhow::Result<Engine> {
        let base = Base::open(&base, dtype, &device)?;
        let engine = Engine::start(base, engine_cfg);
        if let Some(dir) = deltas {
            let names = register_dir(&engine, &dir)?;
            tracing::info!(
                "serving {} and {} tenants: {}",
                engine.base_name(),
                names.len(),
                names.join(", ")
            );
        }
        Ok(engine)
    })
    .await
    .context("the start-up task failed")??;
    let listener = tokio::net::TcpListener::bind((host.as_str(), port))
        .await
        .with_context(|| format!("binding {host}:{port}"))?;
    let addr = listener.local_addr()?;
    let (trigger, triggered) = oneshot::channel::<()>();
    let state = AppState {
        engine: engine.clone(),
        api_key,
    };
    let router = app(state);
    let shutdown_engine = engine.clone();
    let signal = async move {
        let _ = triggered.await;
        shutdown_engine.stop_accepting();
        // In-flight requests get `shutdown_timeout` to finish; then they are cancelled, which
        // ends their responses and lets the graceful shutdown complete.
        let engine = shutdown_engine.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + shutdown_timeout;
            while engine.in_flight() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            engine.cancel_all();
        });
    };
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(signal)
            .await
    });
    Ok(ServerHandle {
        addr,
        engine,
        trigger: Some(trigger),
        task,
    })
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Serves until SIGINT or SIGTERM, then shuts down gracefully. `on_ready` is called once the
/// server accepts connections (to print its address, or for a demo to send requests).
pub async fn serve(cfg: ServeConfig, on_ready: impl FnOnce(&ServerHandle)) -> anyhow::Result<()> {
    let timeout = cfg.shutdown_timeout;
    let handle = start(cfg).await?;
    on_ready(&handle);
    shutdown_signal().await;
    tracing::warn!(
        "shutting down: finishing in-flight requests (at most {}s)",
        timeout.as_secs()
    );
    handle.shutdown().await
}
