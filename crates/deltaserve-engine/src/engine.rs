//! The engine handle: a cheap clone that talks to the scheduler thread over a channel (TGI's
//! queue-as-actor pattern, `backends/v3/src/queue.rs`). The thread owns the model, every KV cache
//! and the delta cache; the handle only checks what it can check at once (the model exists, the
//! request fits the context and the KV budget, the queue has room) and hands the request over.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use deltaserve_model::TextCodec;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::error::EngineError;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::request::{Event, Output, Request};
use crate::scheduler::{Command, Pending, Scheduler};
use crate::tenants::{open_tenant, Base, Tenant};

/// Limits of one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most tokens one forward step processes (prefill chunks plus one per decoding sequence); also
    /// the most sequences that run at once.
    pub max_batch_tokens: usize,
    /// Bytes of KV cache that running sequences may reserve (prompt plus `max_tokens` each).
    pub kv_memory: usize,
    /// Bytes of tenant deltas kept in memory.
    pub delta_memory: usize,
    /// Requests that may wait for a slot; beyond that, [`EngineError::Overloaded`].
    pub max_queue: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 2048,
            kv_memory: 2 << 30,
            delta_memory: 4 << 30,
            max_queue: 256,
        }
    }
}

/// A model the engine serves, as listed to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The name requests use.
    pub name: String,
    /// For a tenant, the base's name.
    pub parent: Option<String>,
    /// Unix time it was registered.
    pub created: u64,
}

/// State the handle and the scheduler thread share.
pub(crate) struct Shared {
    pub(crate) metrics: Metrics,
    /// Requests submitted and not yet admitted to the running batch (or dropped).
    pub(crate) queued: AtomicUsize,
    /// Requests submitted and not yet ended (waiting or running).
    pub(crate) active: AtomicUsize,
}

struct Inner {
    tx: Mutex<mpsc::Sender<Command>>,
    base: Arc<Base>,
    cfg: EngineConfig,
    shared: Arc<Shared>,
    tenants: RwLock<BTreeMap<String, Arc<Tenant>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    kv_bytes_per_token: usize,
    created: u64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Command::Shutdown);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// A running engine. Clone it freely; the scheduler thread stops when the last clone is dropped.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts the scheduler thread for `base`.
    pub fn start(base: Base, cfg: EngineConfig) -> Engine {
        let base = Arc::new(base);
        let shared = Arc::new(Shared {
            metrics: Metrics::default(),
            queued: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
        });
        let mc = base.model.config();
        let kv_bytes_per_token = 2
            * mc.num_hidden_layers
            * mc.num_key_value_heads
            * mc.head_dim
            * base.model.dtype().size_in_bytes();
        let (tx, rx) = mpsc::channel();
        let scheduler = Scheduler::new(base.clone(), cfg, shared.clone(), rx, tx.clone());
        let thread = std::thread::Builder::new()
            .name("deltaserve-engine".into())
            .spawn(move || scheduler.run())
            .expect("spawning the engine thread (out of threads?). This is a bug.");
        Engine {
            inner: Arc::new(Inner {
                tx: Mutex::new(tx),
                base,
                cfg,
                shared,
                tenants: RwLock::new(BTreeMap::new()),
                next_id: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                kv_bytes_per_token,
                created: crate::tenants::unix_now(),
                thread: Mutex::new(Some(thread)),
            }),
        }
    }

    fn send(&self, cmd: Command) {
        // The scheduler thread lives as long as any handle; a failed send means it panicked, and
        // the request's stream then simply ends.
        let _ = self
            .inner
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(cmd);
    }

    /// The base model's name.
    pub fn base_name(&self) -> &str {
        &self.inner.base.name
    }

    /// The base model.
    pub fn base(&self) -> &Base {
        &self.inner.base
    }

    /// The engine's limits.
    pub fn config(&self) -> EngineConfig {
        self.inner.cfg
    }

    /// The context length in tokens.
    pub fn context_len(&self) -> usize {
        self.inner.base.context_len()
    }

    /// KV cache bytes one token of one sequence takes (keys and values of every layer): what
    /// `kv_memory` is divided by. For Llama-2-7B in bf16, 2 · 32 layers · 32 heads · 128 · 2 B
    /// = 512 KiB, so 32 requests of 128 + 128 tokens need 4 GiB.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.inner.kv_bytes_per_token
    }

    /// The largest `max_tokens` a request with a prompt of `prompt_len` tokens may ask for: what
    /// fits both the context and the KV budget (0 if the prompt alone does not fit).
    pub fn max_new_tokens(&self, prompt_len: usize) -> usize {
        let by_kv = self.inner.cfg.kv_memory / self.inner.kv_bytes_per_token.max(1);
        self.context_len().min(by_kv).saturating_sub(prompt_len)
    }

    /// Registers the delta at `path` as tenant `name`. Reads only its header: the weights load on
    /// first use. Fails for a delta made from another base, an unreadable file or a taken name.
    pub fn add_tenant(&self, name: &str, path: &Path) -> Result<Arc<Tenant>, EngineError> {
        let fail = |reason: &str| EngineError::Registration {
            name: name.to_string(),
            path: path.to_owned(),
            reason: reason.to_string(),
        };
        if name.is_empty() || name == self.base_name() {
            return Err(fail("the name is empty or the base's own"));
        }
        if self.read_tenants().contains_key(name) {
            return Err(fail("a tenant of that name exists; remove it first"));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let tenant = Arc::new(open_tenant(id, name, path, &self.inner.base)?);
        let mut tenants = self
            .inner
            .tenants
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if tenants.contains_key(name) {
            return Err(fail("a tenant of that name exists; remove it first"));
        }
        tenants.insert(name.to_string(), tenant.clone());
        Ok(tenant)
    }

    /// Removes tenant `name`: new requests for it fail; running ones finish first.
    pub fn remove_tenant(&self, name: &str) -> Result<(), EngineError> {
        let removed = self
            .inner
            .tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        match removed {
            Some(t) => {
                self.send(Command::RemoveTenant(t.id));
                Ok(())
            }
            None => Err(EngineError::UnknownModel {
                name: name.to_string(),
            }),
        }
    }

    fn read_tenants(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Tenant>>> {
        self.inner.tenants.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The tenant called `name`, if registered.
    pub fn tenant(&self, name: &str) -> Option<Arc<Tenant>> {
        self.read_tenants().get(name).cloned()
    }

    /// The base and every available tenant.
    pub fn models(&self) -> Vec<ModelInfo> {
        let base = ModelInfo {
            name: self.base_name().to_string(),
            parent: None,
            created: self.inner.created,
        };
        let tenants = self.read_tenants();
        let tenants = tenants
            .values()
            .filter(|t| t.unavailable().is_none())
            .map(|t| ModelInfo {
                name: t.name.clone(),
                parent: Some(self.base_name().to_string()),
                created: t.created,
            });
        std::iter::once(base).chain(tenants).collect()
    }

    /// The tokenizer and chat template of model `name` (the base or a tenant).
    pub fn codec(&self, name: &str) -> Result<Arc<TextCodec>, EngineError> {
        if name == self.base_name() {
            return Ok(self.inner.base.codec.clone());
        }
        match self.tenant(name) {
            Some(t) => match t.unavailable() {
                Some(reason) => Err(EngineError::DeltaUnavailable {
                    name: name.into(),
                    reason: reason.into(),
                }),
                None => Ok(t.codec.clone()),
            },
            None => Err(EngineError::UnknownModel {
                name: name.to_string(),
            }),
        }
    }

    /// Queues a request and returns its event stream. Dropping the receiver cancels it.
    pub fn submit(&self, req: Request) -> Result<UnboundedReceiver<Event>, EngineError> {
        let inner = &*self.inner;
        let metrics = &inner.shared.metrics;
        let refuse = |e: EngineError| {
            metrics.failure(e.kind());
            e
        };
        if inner.closed.load(Ordering::Acquire) {
            return Err(refuse(EngineError::ShuttingDown));
        }
        let tenant = if req.model == self.base_name() {
            None
        } else {
            let t = self
                .tenant(&req.model)
                .ok_or_else(|| EngineError::UnknownModel {
                    name: req.model.clone(),
                });
            let t = t.map_err(refuse)?;
            if let Some(reason) = t.unavailable() {
                return Err(refuse(EngineError::DeltaUnavailable {
                    name: req.model.clone(),
                    reason: reason.into(),
                }));
            }
            Some(t)
        };
        let codec = tenant
            .as_ref()
            .map_or_else(|| inner.base.codec.clone(), |t| t.codec.clone());
        check_request(
            &req,
            self.context_len(),
            inner.kv_bytes_per_token,
            inner.cfg.kv_memory,
        )
        .map_err(refuse)?;
        let max_queue = inner.cfg.max_queue;
        if let Err(queued) =
            inner
                .shared
                .queued
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                    (q < max_queue).then_some(q + 1)
                })
        {
            return Err(refuse(EngineError::Overloaded { queued, max_queue }));
        }
        metrics.request(&req.model);
        inner.shared.active.fetch_add(1, Ordering::AcqRel);
        let (tx, rx) = unbounded_channel();
        let kv_need = (req.prompt.len() + req.max_tokens) * inner.kv_bytes_per_token;
        let stop_ids = req.stop_ids.unwrap_or_else(|| codec.stop_ids().to_vec());
        self.send(Command::Submit(Box::new(Pending {
            tenant,
            prompt: req.prompt,
            max_tokens: req.max_tokens,
            params: req.params,
            stop_ids,
            stop: req.stop,
            codec,
            tx,
            submitted: Instant::now(),
            kv_need,
        })));
        Ok(rx)
    }

    /// Submits a request and waits for all of it.
    pub async fn complete(&self, req: Request) -> Result<Output, EngineError> {
        let mut rx = self.submit(req)?;
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token { id, text: t } => {
                    tokens.push(id);
                    text.push_str(&t);
                }
                Event::Done {
                    finish_reason,
                    usage,
                    tail,
                } => {
                    text.push_str(&tail);
                    return Ok(Output {
                        text,
                        tokens,
                        finish_reason,
                        usage,
                    });
                }
                Event::Error(e) => return Err(e),
            }
        }
        Err(EngineError::ShuttingDown)
    }

    /// Refuses new requests from now on (in-flight ones go on).
    pub fn stop_accepting(&self) {
        self.inner.closed.store(true, Ordering::Release);
    }

    /// Whether new requests are taken (false once [`Engine::stop_accepting`] ran).
    pub fn is_accepting(&self) -> bool {
        !self.inner.closed.load(Ordering::Acquire)
    }

    /// Ends every waiting and running request with [`EngineError::ShuttingDown`].
    pub fn cancel_all(&self) {
        self.send(Command::CancelAll);
    }

    /// Requests submitted but not finished: waiting plus running.
    pub fn in_flight(&self) -> usize {
        self.inner.shared.active.load(Ordering::Acquire)
    }

    /// The counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.shared.metrics.snapshot()
    }
}

/// Checks a request against the context and the KV budget before it is queued.
fn check_request(
    req: &Request,
    context: usize,
    kv_per_token: usize,
    kv_memory: usize,
) -> Result<(), EngineError> {
    if req.prompt.is_empty() {
        return Err(EngineError::Invalid("the prompt is empty".into()));
    }
    if req.max_tokens == 0 {
        return Err(EngineError::Invalid(
            "`max_tokens` must be at least 1".into(),
        ));
    }
    let total = req.prompt.len() + req.max_tokens;
    if total > context {
        return Err(EngineError::Invalid(format!(
            "this model's maximum context length is {context} tokens, but {total} were requested \
             ({} in the prompt, {} for the completion); shorten the prompt or lower `max_tokens`",
            req.prompt.len(),
            req.max_tokens
        )));
    }
    let need = total * kv_per_token;
    if need > kv_memory {
        return Err(EngineError::Invalid(format!(
            "{total} tokens need {need} bytes of KV cache, more than the server's --kv-memory of \
             {kv_memory} bytes; shorten the prompt or lower `max_tokens`"
        )));
    }
    Ok(())
}
