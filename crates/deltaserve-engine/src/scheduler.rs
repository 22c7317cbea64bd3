//! The scheduler thread: continuous batching over every tenant.
//!
//! Each turn of the loop (a *step boundary*) takes new commands, drops requests whose client has
//! gone, admits waiting requests while the KV budget allows and their delta is in memory (starting
//! delta loads on other threads as needed), and then runs **one** forward call for every running
//! sequence of every tenant: decoding sequences feed one token each, prefilling sequences a chunk
//! of their prompt, all under `max_batch_tokens`. Finished sequences leave at once and free their
//! KV reservation and their delta's pin.
//!
//! Fairness: waiting requests are admitted in arrival order. A request whose delta is loading lets
//! later ones pass; one whose delta cannot even start loading (pinned deltas fill the budget) or
//! that does not fit the KV budget stops admission, so the running batch drains for it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltaserve_model::{ForwardOptions, KvCache, LogitsWanted, SeqInput, TenantWeights, TextCodec};
use tokio::sync::mpsc::UnboundedSender;

use crate::delta_cache::{DeltaCache, Lookup, NoRoom, TenantId};
use crate::engine::{EngineConfig, Shared};
use crate::error::EngineError;
use crate::request::{Event, FinishReason, Usage};
use crate::sampler::{Sampler, SamplingParams};
use crate::tenants::{load_tenant, tenant_bytes, Base, Tenant};
use crate::text::TextStream;

/// Messages to the scheduler thread.
pub(crate) enum Command {
    Submit(Box<Pending>),
    RemoveTenant(TenantId),
    Loaded {
        id: TenantId,
        result: Result<(TenantWeights, usize), String>,
    },
    CancelAll,
    Shutdown,
}

/// A request waiting for a slot.
pub(crate) struct Pending {
    pub(crate) tenant: Option<Arc<Tenant>>,
    pub(crate) prompt: Vec<u32>,
    pub(crate) max_tokens: usize,
    pub(crate) params: SamplingParams,
    pub(crate) stop_ids: Vec<u32>,
    pub(crate) stop: Vec<String>,
    pub(crate) codec: Arc<TextCodec>,
    pub(crate) tx: UnboundedSender<Event>,
    pub(crate) submitted: Instant,
    /// KV bytes reserved while it runs.
    pub(crate) kv_need: usize,
}

/// A request in the running batch.
struct Sequence {
    tenant: Option<TenantId>,
    delta: Option<Arc<TenantWeights>>,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    fed: usize,
    generated: Vec<u32>,
    /// Tokens this step feeds.
    next: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    max_tokens: usize,
    stop_ids: Vec<u32>,
    text: TextStream,
    codec: Arc<TextCodec>,
    tx: UnboundedSender<Event>,
    submitted: Instant,
    kv_need: usize,
    /// Set when the sequence has sent its last event.
    done: bool,
}

pub(crate) struct Scheduler {
    base: Arc<Base>,
    cfg: EngineConfig,
    shared: Arc<Shared>,
    rx: Receiver<Command>,
    /// Cloned into delta loader threads, which report back through it.
    tx: Sender<Command>,
    waiting: VecDeque<Pending>,
    running: Vec<Sequence>,
    cache: DeltaCache<TenantWeights>,
    kv_reserved: usize,
    shutting_down: bool,
    /// Start of the tokens-per-second window and tokens generated in it.
    window: (Instant, u64),
}

impl Scheduler {
    pub(crate) fn new(
        base: Arc<Base>,
        cfg: EngineConfig,
        shared: Arc<Shared>,
        rx: Receiver<Command>,
        tx: Sender<Command>,
    ) -> Self {
        Self {
            base,
            cfg,
            shared,
            rx,
            tx,
            waiting: VecDeque::new(),
            running: Vec::new(),
            cache: DeltaCache::new(cfg.delta_memory),
            kv_reserved: 0,
            shutting_down: false,
            window: (Instant::now(), 0),
        }
    }

    pub(crate) fn run(mut self) {
        while !self.shutting_down {
            if self.running.is_empty() {
                // Idle: sleep until a command comes, waking now and then to notice waiting
                // requests whose client has gone.
                let wait = if self.waiting.is_empty() {
                    Duration::from_secs(3600)
                } else {
                    Duration::from_millis(50)
                };
                match self.rx.recv_timeout(wait) {
                    Ok(cmd) => self.handle(cmd),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.handle(cmd);
            }
            if self.shutting_down {
                break;
            }
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.publish();
        }
        self.fail_all(EngineError::ShuttingDown);
        self.publish();
    }

    fn metrics(&self) -> &crate::metrics::Metrics {
        &self.shared.metrics
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(p) => {
                if let Some(t) = &p.tenant {
                    let counter = if self.cache.is_resident(t.id) {
                        &self.metrics().delta_hits
                    } else {
                        &self.metrics().delta_misses
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                self.waiting.push_back(*p);
            }
            Command::RemoveTenant(id) => self.cache.remove(id),
            Command::Loaded { id, result } => self.loaded(id, result),
            Command::CancelAll => self.fail_all(EngineError::ShuttingDown),
            Command::Shutdown => self.shutting_down = true,
        }
    }

    fn loaded(&mut self, id: TenantId, result: Result<(TenantWeights, usize), String>) {
        match result {
            Ok(ok) => {
                let evicted = self.cache.finish(id, Ok(ok));
                self.metrics()
                    .delta_evictions
                    .fetch_add(evicted.len() as u64, Ordering::Relaxed);
            }
            Err(reason) => {
                self.metrics()
                    .delta_load_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.cache.finish(id, Err(reason.clone()));
                self.fail_tenant(id, &reason);
            }
        }
    }

    /// Marks a tenant unavailable and fails every waiting request for it.
    fn fail_tenant(&mut self, id: TenantId, reason: &str) {
        let mut name = None;
        for p in &self.waiting {
            if let Some(t) = p.tenant.as_ref().filter(|t| t.id == id) {
                t.mark_unavailable(reason.to_string());
                name = Some(t.name.clone());
            }
        }
        if let Some(name) = &name {
            tracing::error!(tenant = %name, "delta failed to load; the tenant is unavailable: {reason}");
        }
        let (failed, keep): (Vec<_>, Vec<_>) = self
            .waiting
            .drain(..)
            .partition(|p| p.tenant.as_ref().is_some_and(|t| t.id == id));
        self.waiting = keep.into();
        for p in failed {
            let name = p
                .tenant
                .as_ref()
                .map_or_else(String::new, |t| t.name.clone());
            self.reject(
                p,
                EngineError::DeltaUnavailable {
                    name,
                    reason: reason.to_string(),
                },
            );
        }
    }

    /// Ends a waiting request with an error.
    fn reject(&self, p: Pending, e: EngineError) {
        self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        self.shared.active.fetch_sub(1, Ordering::AcqRel);
        self.metrics().failure(e.kind());
        let _ = p.tx.send(Event::Error(e));
    }

    fn fail_all(&mut self, e: EngineError) {
        for p in std::mem::take(&mut self.waiting) {
            self.reject(p, e.clone());
        }
        for i in 0..self.running.len() {
            self.finish(i, Err(e.clone()));
        }
        self.running.clear();
    }

    /// Moves waiting requests into the running batch, in arrival order, while they fit.
    fn admit(&mut self) {
        // Clients that left while waiting.
        let before = self.waiting.len();
        self.waiting.retain(|p| !p.tx.is_closed());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.shared.queued.fetch_sub(gone, Ordering::AcqRel);
            self.shared.active.fetch_sub(gone, Ordering::AcqRel);
            for _ in 0..gone {
                self.metrics().failure("cancelled");
            }
        }
        let max_running = self.cfg.max_batch_tokens.max(1);
        let mut i = 0;
        while i < self.waiting.len() {
            let p = &self.waiting[i];
            if let Some(t) = p.tenant.clone() {
                match self.cache.lookup(t.id) {
                    Lookup::Ready(_) => {}
                    Lookup::Loading => {
                        i += 1;
                        continue;
                    }
                    Lookup::Failed(reason) => {
                        let p = self
                            .waiting
                            .remove(i)
                            .expect("index checked above. This is a bug.");
                        self.reject(
                            p,
                            EngineError::DeltaUnavailable {
                                name: t.name.clone(),
                                reason,
                            },
                        );
                        continue;
                    }
                    Lookup::Absent => match self.cache.reserve(t.id, t.estimated_bytes) {
                        Ok(evicted) => {
                            self.metrics()
                                .delta_evictions
                                .fetch_add(evicted.len() as u64, Ordering::Relaxed);
                            self.start_load(t);
                            i += 1;
                            continue;
                        }
                        Err(NoRoom::Busy) => break,
                        Err(NoRoom::TooLarge { bytes, budget }) => {
                            let reason = format!(
                                "it needs about {bytes} bytes in memory, more than the whole --delta-memory of {budget} bytes"
                            );
                            self.cache.mark_failed(t.id, reason.clone());
                            self.fail_tenant(t.id, &reason);
                            continue;
                        }
                    },
                }
            }
            let p = &self.waiting[i];
            if self.running.len() >= max_running
                || self.kv_reserved + p.kv_need > self.cfg.kv_memory
            {
                break;
            }
            let p = self
                .waiting
                .remove(i)
                .expect("index checked above. This is a bug.");
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            let tenant = p.tenant.as_ref().map(|t| t.id);
            let delta = match tenant {
                Some(id) => Some(
                    self.cache
                        .pin(id)
                        .expect("delta looked up as ready. This is a bug."),
                ),
                None => None,
            };
            self.kv_reserved += p.kv_need;
            self.metrics()
                .prompt_tokens
                .fetch_add(p.prompt.len() as u64, Ordering::Relaxed);
            self.running.push(Sequence {
                tenant,
                delta,
                prompt: p.prompt,
                fed: 0,
                generated: Vec::new(),
                next: Vec::new(),
                cache: self.base.model.new_cache(),
                sampler: Sampler::new(p.params),
                max_tokens: p.max_tokens,
                stop_ids: p.stop_ids,
                text: TextStream::new(p.stop),
                codec: p.codec,
                tx: p.tx,
                submitted: p.submitted,
                kv_need: p.kv_need,
                done: false,
            });
        }
    }

    /// Loads a delta on its own thread, so the step loop keeps serving other tenants.
    fn start_load(&self, tenant: Arc<Tenant>) {
        self.metrics().delta_loads.fetch_add(1, Ordering::Relaxed);
        let tx = self.tx.clone();
        let base = self.base.clone();
        let id = tenant.id;
        let spawned = std::thread::Builder::new()
            .name(format!("delta-load-{}", tenant.name))
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    load_tenant(&tenant, &base)
                }))
                .unwrap_or_else(|_| Err("the loader panicked".to_string()))
                .map(|w| {
                    let bytes = tenant_bytes(&w);
                    (w, bytes)
                });
                let _ = tx.send(Command::Loaded { id, result });
            });
        if let Err(e) = spawned {
            let _ = self.tx.send(Command::Loaded {
                id,
                result: Err(format!("cannot start a loader thread: {e}")),
            });
        }
    }

    /// One forward call for the whole running batch, then sampling and events.
    fn step(&mut self) {
        // Clients that left: their sequences stop costing compute now.
        for i in 0..self.running.len() {
            if self.running[i].tx.is_closed() {
                self.metrics().failure("cancelled");
                self.finish(i, Ok(None));
            }
        }
        self.running.retain(|s| !s.done);
        if self.running.is_empty() {
            return;
        }

        // Decoding sequences first (one token each), then prompt chunks in arrival order.
        let mut budget = self.cfg.max_batch_tokens.max(1);
        for s in self.running.iter_mut() {
            s.next.clear();
            if s.fed == s.prompt.len() && budget > 0 {
                s.next.push(
                    *s.generated
                        .last()
                        .expect("a prefilled sequence has sampled a token. This is a bug."),
                );
                budget -= 1;
            }
        }
        for s in self.running.iter_mut().filter(|s| s.fed < s.prompt.len()) {
            let n = (s.prompt.len() - s.fed).min(budget);
            s.next.extend_from_slice(&s.prompt[s.fed..s.fed + n]);
            budget -= n;
        }
        let batch: Vec<usize> = (0..self.running.len())
            .filter(|&i| !self.running[i].next.is_empty())
            .collect();
        let tokens: usize = batch.iter().map(|&i| self.running[i].next.len()).sum();
        let m = self.metrics();
        m.batch_sequences
            .store(batch.len() as u64, Ordering::Relaxed);
        m.batch_tokens.store(tokens as u64, Ordering::Relaxed);
        m.steps.fetch_add(1, Ordering::Relaxed);
        m.step_sequences
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        m.step_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        let mut tenants: Vec<TenantId> = batch
            .iter()
            .filter_map(|&i| self.running[i].tenant)
            .collect();
        tenants.sort_unstable();
        tenants.dedup();
        m.step_tenants
            .fetch_add(tenants.len() as u64, Ordering::Relaxed);

        let snapshots: Vec<KvCache> = batch
            .iter()
            .map(|&i| self.running[i].cache.clone())
            .collect();
        let t0 = Instant::now();
        let result = self.forward(&batch);
        let results: Vec<Result<Vec<f32>, String>> = match result {
            Ok(rows) => rows.into_iter().map(Ok).collect(),
            Err(e) => {
                // Find the culprit: run each sequence alone from its state before the step, so a
                // request that cannot run fails alone and the rest go on.
                tracing::warn!("a batched forward failed ({e}); retrying its sequences one by one");
                batch
                    .iter()
                    .zip(snapshots)
                    .map(|(&i, snap)| {
                        self.running[i].cache = snap;
                        self.forward(&[i])
                            .map(|mut r| r.remove(0))
                            .map_err(|e| e.to_string())
                    })
                    .collect()
            }
        };
        self.metrics()
            .forward_micros
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);

        for (&i, result) in batch.iter().zip(results) {
            match result {
                Ok(row) => self.advance(i, &row),
                Err(e) => self.finish(i, Err(EngineError::Generation(e))),
            }
        }
        self.running.retain(|s| !s.done);
    }

    /// Runs the model on the `next` tokens of the given sequences; last-position logits of each.
    fn forward(&mut self, which: &[usize]) -> deltaserve_model::Result<Vec<Vec<f32>>> {
        let mut inputs = Vec::with_capacity(which.len());
        let mut k = 0;
        for (i, s) in self.running.iter_mut().enumerate() {
            if which.get(k) != Some(&i) {
                continue;
            }
            k += 1;
            inputs.push(SeqInput {
                tokens: &s.next,
                cache: Some(&mut s.cache),
                tenant: s.delta.as_deref(),
                logits: LogitsWanted::Last,
            });
        }
        let logits = self
            .base
            .model
            .forward(&mut inputs, ForwardOptions::default())?;
        // One device-to-host copy for the whole step rather than one per sequence: each copy
        // waits for the device, and a decode step of 32 sequences would wait 32 times. Rows are
        // concatenated flat because tenants may extend the vocabulary (rows of different lengths).
        let flat = logits
            .iter()
            .map(|l| l.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lens: Vec<usize> = flat.iter().map(|l| l.elem_count()).collect();
        let all = candle_core::Tensor::cat(&flat, 0)?.to_vec1::<f32>()?;
        let mut rows = Vec::with_capacity(lens.len());
        let mut at = 0;
        for n in lens {
            rows.push(all[at..at + n].to_vec());
            at += n;
        }
        Ok(rows)
    }

    /// Takes a step's logits for sequence `i`: a prompt chunk advances, a full prompt or a decoded
    /// token samples the next token and streams it.
    fn advance(&mut self, i: usize, logits: &[f32]) {
        let s = &mut self.running[i];
        if s.fed < s.prompt.len() {
            s.fed += s.next.len();
            if s.fed < s.prompt.len() {
                return;
            }
        }
        let token = s.sampler.sample(logits);
        s.generated.push(token);
        let m = &self.shared.metrics;
        m.generated_tokens.fetch_add(1, Ordering::Relaxed);
        self.window.1 += 1;
        if s.generated.len() == 1 {
            m.ttft.observe(s.submitted.elapsed());
        }
        if s.stop_ids.contains(&token) {
            return self.finish(i, Ok(Some(FinishReason::Stop)));
        }
        let codec = s.codec.clone();
        let pushed = match s.text.push(token, |ids| codec.decode(ids)) {
            Ok(p) => p,
            Err(e) => return self.finish(i, Err(EngineError::Generation(e.to_string()))),
        };
        let _ = s.tx.send(Event::Token {
            id: token,
            text: pushed.delta,
        });
        let reason = if pushed.stopped {
            Some(FinishReason::Stop)
        } else if s.generated.len() >= s.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        if reason.is_some() {
            self.finish(i, Ok(reason));
        }
    }

    /// Ends running sequence `i`: `Ok(Some(reason))` sends `Done`, `Err` sends the error,
    /// `Ok(None)` (client gone) sends nothing. Frees its KV reservation and its delta pin.
    fn finish(&mut self, i: usize, outcome: Result<Option<FinishReason>, EngineError>) {
        let s = &mut self.running[i];
        if s.done {
            return;
        }
        s.done = true;
        self.shared.active.fetch_sub(1, Ordering::AcqRel);
        match outcome {
            Ok(Some(reason)) => {
                let usage = Usage {
                    prompt_tokens: s.prompt.len(),
                    completion_tokens: s.generated.len(),
                };
                let _ = s.tx.send(Event::Done {
                    finish_reason: reason,
                    usage,
                    tail: s.text.flush(),
                });
                self.shared.metrics.finished(reason.as_str());
            }
            Ok(None) => {}
            Err(e) => {
                self.shared.metrics.failure(e.kind());
                let _ = s.tx.send(Event::Error(e));
            }
        }
        s.delta = None;
        s.cache = KvCache::new(0);
        self.kv_reserved -= s.kv_need;
        if let Some(id) = s.tenant {
            self.cache.unpin(id);
        }
    }

    /// Updates the gauges.
    fn publish(&mut self) {
        let m = &self.shared.metrics;
        m.queue_depth
            .store(self.waiting.len() as u64, Ordering::Relaxed);
        m.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        m.kv_reserved_bytes
            .store(self.kv_reserved as u64, Ordering::Relaxed);
        m.kv_used_bytes.store(
            self.running.iter().map(|s| s.cache.bytes() as u64).sum(),
            Ordering::Relaxed,
        );
        m.delta_bytes
            .store(self.cache.used() as u64, Ordering::Relaxed);
        m.delta_resident
            .store(self.cache.resident() as u64, Ordering::Relaxed);
        let elapsed = self.window.0.elapsed();
        if self.running.is_empty() {
            m.tokens_per_second_milli.store(0, Ordering::Relaxed);
            self.window = (Instant::now(), 0);
        } else if elapsed >= Duration::from_secs(1) {
            let tps = self.window.1 as f64 / elapsed.as_secs_f64();
            m.tokens_per_second_milli
                .store((tps * 1e3) as u64, Ordering::Relaxed);
            self.window = (Instant::now(), 0);
        }
    }
}
