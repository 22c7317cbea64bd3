//! `deltaserve bench serve`: multi-tenant serving throughput and latency of the engine, the way
//! the HTTP server drives it, for several tenant counts next to the base model alone.
//!
//! One [`Engine`] holds the base; the same delta file is registered N times under the names
//! `t0 … t{N-1}`, so each is its own tenant with its own load and its own copy in memory (the
//! delta cache counts N copies against `--delta-memory`, as it would for N real fine-tunes).
//! Requests are submitted with [`Engine::submit`], the call the HTTP handlers make after
//! validation, so they go through the same queue, admission, KV budget and continuous-batching
//! scheduler; only the JSON and the socket are left out.
//!
//! The request mix is closed-loop: `--concurrency` clients each send a request, wait for its last
//! token and send the next, until `--requests` have been sent. Request `i` goes to tenant
//! `i mod N` (uniform over the tenants), with a prompt of `--prompt-tokens` random token ids and
//! exactly `--max-tokens` generated tokens (no stop tokens, greedy), so every configuration does
//! the same work. Before each timed run every tenant is loaded once (unless they cannot all fit
//! `--delta-memory`; then the run includes the loads and evictions, and the report counts them).
//!
//! Without `--delta`, a delta with the layout `deltaserve compress --method bitdelta` writes is
//! made from the base: random sign bits and a scale for the seven projections of every layer,
//! and (unless `--sign-only`) the embeddings, norms and `lm_head` stored in full, which BitDelta
//! keeps per fine-tune (arXiv 2402.10193, §3: only the linear layers of the transformer blocks
//! are quantised). Serving speed does not depend on the values, only on the layout.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use deltaserve_engine::{Base, Engine, EngineConfig, Event, MetricsSnapshot, Request};
use deltaserve_engine::{SamplingParams, Tenant};
use deltaserve_format::{
    words_per_row, write_delta, DeltaHeader, FinetuneInfo, FullValue, OwnedTensor, TensorEntry,
};
use deltaserve_model::{Checkpoint, Proj};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::common::parse_dtype;
use super::serve::parse_bytes;

#[derive(ClapArgs)]
pub struct ServeArgs {
    /// The base model directory (Hugging Face layout), e.g. one made by
    /// `deltaserve random-model --shape llama2-7b`.
    #[arg(long)]
    base: PathBuf,
    /// A delta file of this base, registered once per tenant under the names t0, t1, …; without
    /// it a BitDelta-layout delta with random signs is written into --work.
    #[arg(long)]
    delta: Option<PathBuf>,
    /// With the generated delta: store only the projections' signs and scales, so tenants share
    /// the base's embeddings, norms and lm_head (as if the fine-tune had not changed them).
    #[arg(long)]
    sign_only: bool,
    /// Tenant counts to run, comma-separated; 0 is the base model alone (the single-model
    /// baseline every other row is compared with).
    #[arg(long, default_value = "0,1,8,32,128")]
    tenants: String,
    /// Requests in flight at once (closed loop: each client sends its next request when the
    /// previous one ends).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests per tenant count (default: 2 × --concurrency).
    #[arg(long)]
    requests: Option<usize>,
    /// Prompt length in tokens (random token ids).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated per request (exactly: stop tokens are ignored).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: auto (f32 on CPU, bf16 on CUDA), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Most tokens per forward step (prompt chunks plus one per decoding request).
    #[arg(long, default_value_t = 2048)]
    max_batch_tokens: usize,
    /// KV cache budget: a size (8GiB, 500MB) or `auto`, which reserves exactly what
    /// --concurrency requests of --prompt-tokens + --max-tokens need, so all of them run at once.
    #[arg(long, default_value = "auto")]
    kv_memory: String,
    /// Memory for tenant deltas (least recently used ones are evicted).
    #[arg(long, default_value = "16GiB")]
    delta_memory: String,
    /// Where the generated delta is written (default: a temporary directory, removed at the end).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Also write every number as JSON to this file (rewritten after each tenant count, so a run
    /// cut short keeps what it measured).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seed of the prompts and of the generated delta's signs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// One tenant count's measurements.
#[derive(Debug, Clone, PartialEq)]
struct RunStats {
    tenants: usize,
    requests: usize,
    failed: usize,
    generated_tokens: usize,
    wall_s: f64,
    ttft_s: Vec<f64>,
    e2e_s: Vec<f64>,
    steps: u64,
    step_sequences: u64,
    step_tenants: u64,
    forward_s: f64,
    delta_loads: u64,
    delta_evictions: u64,
    warmed: bool,
    /// Lower bound on the ms per step spent on host reads of tenant scales (see
    /// [`probe_scale_read`]); 0 when steps hold one tenant (the model then skips the fused path).
    scale_reads_ms_per_step: f64,
}

/// The `p`-th percentile (0 < p ≤ 100) of `sorted` by the nearest-rank method: the smallest value
/// with at least p% of the values at or below it. `None` for no values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

impl RunStats {
    fn tokens_per_s(&self) -> f64 {
        self.generated_tokens as f64 / self.wall_s
    }

    fn requests_per_s(&self) -> f64 {
        (self.requests - self.failed) as f64 / self.wall_s
    }

    fn per_step(&self, total: u64) -> f64 {
        total as f64 / self.steps.max(1) as f64
    }

    fn to_json(&self, baseline: Option<f64>) -> Value {
        let pct = |v: &[f64]| {
            let s = sorted(v);
            json!({"p50": percentile(&s, 50.0), "p90": percentile(&s, 90.0), "p99": percentile(&s, 99.0),
                   "mean": (!s.is_empty()).then(|| s.iter().sum::<f64>() / s.len() as f64)})
        };
        json!({
            "tenants": self.tenants,
            "requests": self.requests,
            "failed": self.failed,
            "generated_tokens": self.generated_tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s(),
            "requests_per_s": self.requests_per_s(),
            "of_base_only": baseline.map(|b| self.tokens_per_s() / b),
            "ttft_s": pct(&self.ttft_s),
            "e2e_s": pct(&self.e2e_s),
            "steps": self.steps,
            "mean_sequences_per_step": self.per_step(self.step_sequences),
            "mean_tenants_per_step": self.per_step(self.step_tenants),
            "ms_per_step": 1e3 * self.wall_s / self.steps.max(1) as f64,
            "forward_ms_per_step": 1e3 * self.forward_s / self.steps.max(1) as f64,
            "delta_loads": self.delta_loads,
            "delta_evictions": self.delta_evictions,
            "tenants_preloaded": self.warmed,
            "scale_reads_ms_per_step_lower_bound": self.scale_reads_ms_per_step,
        })
    }

    fn table_row(&self, baseline: Option<f64>) -> String {
        let s = |v: &[f64], p| {
            percentile(&sorted(v), p).map_or_else(|| "-".to_string(), |x| format!("{x:.3}"))
        };
        format!(
            "| {} | {} | {:.1} | {:.2} | {} | {} / {} / {} | {} / {} / {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            if self.tenants == 0 { "base only".to_string() } else { self.tenants.to_string() },
            self.requests - self.failed,
            self.tokens_per_s(),
            self.requests_per_s(),
            baseline.map_or_else(|| "-".to_string(), |b| format!("{:.0}%", 100.0 * self.tokens_per_s() / b)),
            s(&self.ttft_s, 50.0), s(&self.ttft_s, 90.0), s(&self.ttft_s, 99.0),
            s(&self.e2e_s, 50.0), s(&self.e2e_s, 90.0), s(&self.e2e_s, 99.0),
            self.per_step(self.step_sequences),
            self.per_step(self.step_tenants),
            1e3 * self.wall_s / self.steps.max(1) as f64,
            1e3 * self.forward_s / self.steps.max(1) as f64,
            self.scale_reads_ms_per_step,
            if self.warmed { self.delta_loads.to_string() } else { format!("{} (cold)", self.delta_loads) },
        )
    }
}

const TABLE_HEAD: &str = "| tenants | requests done | gen tokens/s | requests/s | of base-only | TTFT p50 / p90 / p99 s | end-to-end p50 / p90 / p99 s | seqs/step | tenants/step | ms/step | forward ms/step | scale reads ms/step (≥) | delta loads in run |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|";

pub fn run(a: ServeArgs) -> Result<()> {
    let counts = parse_counts(&a.tenants)?;
    if a.concurrency == 0 || a.prompt_tokens == 0 || a.max_tokens == 0 {
        bail!("--concurrency, --prompt-tokens and --max-tokens must each be at least 1");
    }
    let requests = a.requests.unwrap_or(2 * a.concurrency);
    if requests == 0 {
        bail!("--requests must be at least 1");
    }
    let device = deltaserve_model::parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype, &device)?;
    let delta_memory = parse_bytes(&a.delta_memory, "--delta-memory")?;

    let t = Instant::now();
    let base = Base::open(&a.base, dtype, &device)
        .with_context(|| format!("--base {}", a.base.display()))?;
    eprintln!(
        "loaded base {} on {} ({dtype:?}) in {:.1}s",
        base.name,
        a.device,
        t.elapsed().as_secs_f64()
    );
    let mc = base.model.config();
    let kv_per_token =
        2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * dtype.size_in_bytes();
    let per_request = a.prompt_tokens + a.max_tokens;
    if per_request > base.context_len() {
        bail!(
            "--prompt-tokens {} + --max-tokens {} exceed the model's context of {} tokens; shorten them",
            a.prompt_tokens,
            a.max_tokens,
            base.context_len()
        );
    }
    let kv_memory = if a.kv_memory == "auto" {
        a.concurrency * per_request * kv_per_token
    } else {
        parse_bytes(&a.kv_memory, "--kv-memory")?
    };
    if kv_memory < per_request * kv_per_token {
        bail!(
            "--kv-memory {}: one request of {per_request} tokens needs {} bytes of KV cache; raise it or use auto",
            a.kv_memory,
            per_request * kv_per_token
        );
    }
    let vocab = mc.vocab_size;

    let tmp;
    let work = match &a.work {
        Some(w) => w.clone(),
        None => {
            tmp = tempfile::tempdir().context("creating a temporary directory")?;
            tmp.path().to_owned()
        }
    };
    let most = counts.iter().copied().max().unwrap_or(0);
    let delta = match (&a.delta, most) {
        (Some(d), _) => d.clone(),
        (None, 0) => PathBuf::new(),
        (None, _) => {
            std::fs::create_dir_all(&work)
                .with_context(|| format!("creating --work {}", work.display()))?;
            let path = work.join(if a.sign_only {
                "synthetic-sign-only.delta"
            } else {
                "synthetic.delta"
            });
            let t = Instant::now();
            write_synthetic_delta(&base, &path, !a.sign_only, a.seed)?;
            eprintln!(
                "wrote {} in {:.1}s",
                path.display(),
                t.elapsed().as_secs_f64()
            );
            path
        }
    };

    let cfg = EngineConfig {
        max_batch_tokens: a.max_batch_tokens.max(1),
        kv_memory,
        delta_memory,
        max_queue: (requests + most).max(256),
    };
    let layers = mc.num_hidden_layers;
    let scale_read_s = probe_scale_read(&device, 2000)?;
    eprintln!(
        "host read of a tenant scale: {:.1} µs ({} per distinct tenant per mixed step)",
        scale_read_s * 1e6,
        7 * layers
    );
    let engine = Engine::start(base, cfg);
    let mut tenants: Vec<Arc<Tenant>> = Vec::with_capacity(most);
    for i in 0..most {
        tenants.push(
            engine
                .add_tenant(&format!("t{i}"), &delta)
                .with_context(|| format!("--delta {}", delta.display()))?,
        );
    }
    let tenant_bytes = tenants.first().map_or(0, |t| t.estimated_bytes);
    let fit = delta_memory.checked_div(tenant_bytes).unwrap_or(usize::MAX);
    eprintln!(
        "KV budget {:.2} GiB ({} KiB per token, {} requests of {per_request} tokens); delta budget {:.2} GiB, {:.3} GB per tenant, {} fit",
        kv_memory as f64 / (1u64 << 30) as f64,
        kv_per_token / 1024,
        kv_memory / (per_request * kv_per_token),
        delta_memory as f64 / (1u64 << 30) as f64,
        tenant_bytes as f64 / 1e9,
        if fit == usize::MAX { "all".to_string() } else { fit.to_string() },
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let mix = Mix {
        prompt_tokens: a.prompt_tokens,
        max_tokens: a.max_tokens,
        vocab,
        seed: a.seed,
    };
    // Kernel selection, cuBLAS handles and allocator pools settle on the first steps; a short
    // round at full concurrency keeps them out of the first timed row.
    runtime.block_on(async {
        let warm = Mix {
            max_tokens: 4.min(a.max_tokens),
            ..mix
        };
        drive(
            &engine,
            &[engine.base_name().to_string()],
            a.concurrency,
            a.concurrency,
            &warm,
            false,
        )
        .await
    });

    let mut runs: Vec<RunStats> = Vec::new();
    let mut baseline = None;
    println!("{TABLE_HEAD}");
    for &n in &counts {
        let models: Vec<String> = if n == 0 {
            vec![engine.base_name().to_string()]
        } else {
            (0..n).map(|i| format!("t{i}")).collect()
        };
        let warmed = n == 0 || n.saturating_mul(tenant_bytes) <= delta_memory;
        if n > 0 && warmed {
            let t = Instant::now();
            let one = Mix {
                max_tokens: 1,
                prompt_tokens: 1,
                ..mix
            };
            runtime.block_on(drive(
                &engine,
                &models,
                models.len(),
                models.len(),
                &one,
                false,
            ));
            eprintln!("{n} tenants loaded in {:.1}s", t.elapsed().as_secs_f64());
        }
        let before = engine.metrics();
        let t0 = Instant::now();
        let outcome =
            runtime.block_on(drive(&engine, &models, requests, a.concurrency, &mix, true));
        let wall_s = t0.elapsed().as_secs_f64();
        let after = engine.metrics();
        let mut run = stats(n, requests, wall_s, outcome, &before, &after, warmed);
        let tenants_per_step = run.per_step(run.step_tenants);
        if tenants_per_step > 1.0 {
            run.scale_reads_ms_per_step =
                1e3 * scale_read_s * (7 * layers) as f64 * tenants_per_step;
        }
        if n == 0 {
            baseline = Some(run.tokens_per_s());
        }
        println!("{}", run.table_row(baseline.filter(|_| n > 0)));
        runs.push(run);
        if let Some(path) = &a.json {
            let report = json!({
                "base": a.base.display().to_string(),
                "device": a.device,
                "dtype": format!("{dtype:?}"),
                "delta": if most > 0 { Some(delta.display().to_string()) } else { None },
                "delta_bytes_per_tenant": tenant_bytes,
                "mix": {"prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens,
                        "concurrency": a.concurrency, "requests": requests,
                        "routing": "request i -> tenant i mod N", "sampling": "greedy, stop tokens ignored"},
                "scale_read_us": scale_read_s * 1e6,
                "scale_read_us": scale_read_s * 1e6,
                "engine": {"max_batch_tokens": cfg.max_batch_tokens, "kv_memory": kv_memory,
                           "kv_bytes_per_token": kv_per_token, "delta_memory": delta_memory},
                "runs": runs.iter().map(|r| r.to_json(baseline.filter(|_| r.tenants > 0))).collect::<Vec<_>>(),
            });
            let text = serde_json::to_string_pretty(&report)?;
            deltaserve_format::write_atomic(path, true, |out| out.write_all(text.as_bytes()))
                .with_context(|| format!("writing --json {}", path.display()))?;
        }
    }
    Ok(())
}

fn parse_counts(spec: &str) -> Result<Vec<usize>> {
    let counts: Vec<usize> = spec
        .split(',')
        .map(|t| t.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--tenants {spec}: expected tenant counts such as 0,1,8,32"))?;
    if counts.is_empty() {
        bail!("--tenants is empty: give tenant counts such as 0,1,8,32");
    }
    Ok(counts)
}

/// What each request of a run looks like.
#[derive(Debug, Clone, Copy)]
struct Mix {
    prompt_tokens: usize,
    max_tokens: usize,
    vocab: usize,
    seed: u64,
}

impl Mix {
    /// Request `i`: its own random prompt (ids away from the special tokens at the start of the
    /// vocabulary), `max_tokens` tokens, greedy, no stop tokens.
    fn request(&self, i: usize, model: &str) -> Request {
        let mut rng = SplitMix(self.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let lo = 3.min(self.vocab - 1);
        let prompt = (0..self.prompt_tokens)
            .map(|_| (lo + (rng.next() % (self.vocab - lo) as u64) as usize) as u32)
            .collect();
        Request {
            model: model.to_string(),
            prompt,
            max_tokens: self.max_tokens,
            params: SamplingParams::default(),
            stop_ids: Some(Vec::new()),
            stop: Vec::new(),
        }
    }
}

/// Per request: seconds to the first token and to the end, or `None` if it failed.
type Outcome = Vec<Option<(f64, f64, usize)>>;

/// Sends `requests` requests, request `i` to `models[i % len]`, from `concurrency` closed-loop
/// clients; returns each request's timings.
async fn drive(
    engine: &Engine,
    models: &[String],
    requests: usize,
    concurrency: usize,
    mix: &Mix,
    progress: bool,
) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let bar = if progress {
        let b = ProgressBar::new(requests as u64);
        b.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} requests, {elapsed}")
                .expect("a valid template. This is a bug.")
                .progress_chars("=> "),
        );
        b.set_message(format!("{} model(s)", models.len()));
        b
    } else {
        ProgressBar::hidden()
    };
    let models: Arc<Vec<String>> = Arc::new(models.to_vec());
    let clients = (0..concurrency.min(requests)).map(|_| {
        let (next, models, engine, mix, bar) = (
            next.clone(),
            models.clone(),
            engine.clone(),
            *mix,
            bar.clone(),
        );
        tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return out;
                }
                let req = mix.request(i, &models[i % models.len()]);
                let start = Instant::now();
                let result = match engine.submit(req) {
                    Ok(mut rx) => {
                        let mut first = None;
                        let mut tokens = 0;
                        let mut done = None;
                        while let Some(ev) = rx.recv().await {
                            match ev {
                                Event::Token { .. } => {
                                    tokens += 1;
                                    first.get_or_insert_with(|| start.elapsed().as_secs_f64());
                                }
                                Event::Done { .. } => {
                                    done = Some(start.elapsed().as_secs_f64());
                                    break;
                                }
                                Event::Error(e) => {
                                    tracing::warn!("request {i} failed: {e}");
                                    break;
                                }
                            }
                        }
                        done.map(|d| (first.unwrap_or(d), d, tokens))
                    }
                    Err(e) => {
                        tracing::warn!("request {i} refused: {e}");
                        None
                    }
                };
                bar.inc(1);
                out.push(result);
            }
        })
    });
    let mut all = Vec::with_capacity(requests);
    for c in futures_join(clients.collect()).await {
        all.extend(c);
    }
    bar.finish_and_clear();
    all
}

/// Awaits every task (a client task only ends by returning).
async fn futures_join(tasks: Vec<tokio::task::JoinHandle<Outcome>>) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_default());
    }
    out
}

fn stats(
    tenants: usize,
    requests: usize,
    wall_s: f64,
    outcome: Outcome,
    before: &MetricsSnapshot,
    after: &MetricsSnapshot,
    warmed: bool,
) -> RunStats {
    let ok: Vec<(f64, f64, usize)> = outcome.iter().flatten().copied().collect();
    RunStats {
        tenants,
        requests,
        failed: requests - ok.len(),
        generated_tokens: ok.iter().map(|r| r.2).sum(),
        wall_s,
        ttft_s: ok.iter().map(|r| r.0).collect(),
        e2e_s: ok.iter().map(|r| r.1).collect(),
        steps: after.steps - before.steps,
        step_sequences: after.step_sequences - before.step_sequences,
        step_tenants: after.step_tenants - before.step_tenants,
        forward_s: after.forward_seconds - before.forward_seconds,
        delta_loads: after.delta_loads - before.delta_loads,
        delta_evictions: after.delta_evictions - before.delta_evictions,
        warmed,
        scale_reads_ms_per_step: 0.0,
    }
}

/// Seconds one host read of a tenant's scale takes, timed with the call chain the model's
/// mixed-tenant path runs for every distinct tenant, projection and layer of a step
/// (`deltaserve-model` `fused_sign_deltas`: `scale.to_dtype(F32)…to_scalar()`). On a GPU each is
/// a device-to-host copy that waits for the device, so a step with D distinct tenants waits
/// 7 · layers · D times; this measures the wait with an idle device (a lower bound).
fn probe_scale_read(device: &candle_core::Device, iters: usize) -> Result<f64> {
    use candle_core::{DType, Tensor};
    let scale = Tensor::new(&[0.5f32], device)?;
    let read = || -> Result<f32> {
        Ok(scale
            .to_dtype(DType::F32)?
            .flatten_all()?
            .get(0)?
            .to_scalar::<f32>()?)
    };
    read()?;
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(read()?);
    }
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

/// SplitMix64: reproducible prompts and signs without another dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Writes a delta of `base` in the layout `deltaserve compress --method bitdelta` produces:
/// random signs and one scale per projection (BitDelta eq. 1: W_ft ≈ W_base + α · sign(Δ)),
/// and with `full_rest` every other tensor (embeddings, norms, lm_head) stored in full as the
/// fine-tune's own value, copied from the base.
fn write_synthetic_delta(base: &Base, path: &Path, full_rest: bool, seed: u64) -> Result<()> {
    let ckpt: &Checkpoint = &base.checkpoint;
    let mut header = DeltaHeader::new(
        "bitdelta",
        base.fingerprint.clone(),
        FinetuneInfo::default(),
    );
    let mut tensors = Vec::new();
    let mut rng = SplitMix(seed ^ 0xD1B5_4A32_D192_ED03);
    let mut projections = std::collections::HashSet::new();
    for l in 0..ckpt.config().num_hidden_layers {
        for proj in Proj::ALL {
            let name = format!("model.layers.{l}.{}.weight", proj.module());
            let raw = ckpt.raw(&name)?;
            let (rows, cols) = (raw.shape[0], raw.shape[1]);
            let wpr = words_per_row(cols);
            // Bits past `cols` in a row's last word are padding and must be 0 (docs/FORMAT.md).
            let last = if cols % 32 == 0 {
                u32::MAX
            } else {
                (1u32 << (cols % 32)) - 1
            };
            let mut words = Vec::with_capacity(rows * wpr);
            for _ in 0..rows {
                for w in 0..wpr {
                    let bits = rng.next() as u32;
                    words.push(if w + 1 == wpr { bits & last } else { bits });
                }
            }
            header.tensors.insert(
                name.clone(),
                TensorEntry::sign(&name, [rows, cols], raw.dtype),
            );
            tensors.push((
                format!("{name}.signs"),
                OwnedTensor::from_u32(vec![rows, wpr], &words),
            ));
            // About 1% of a random Llama weight's RMS (0.02): a plausible fine-tune's mean |Δ|.
            tensors.push((format!("{name}.scale"), OwnedTensor::scale(2e-4)));
            projections.insert(name);
        }
    }
    if full_rest {
        for name in ckpt.tensor_names() {
            if projections.contains(name) {
                continue;
            }
            let raw = ckpt.raw(name)?;
            header.tensors.insert(
                name.to_string(),
                TensorEntry::full(name, FullValue::Finetuned, raw.shape.to_vec(), raw.dtype),
            );
            tensors.push((
                name.to_string(),
                OwnedTensor::new(raw.dtype, raw.shape.to_vec(), raw.data.to_vec()),
            ));
        }
    }
    write_delta(path, &header, tensors, true)
        .with_context(|| format!("writing the benchmark delta {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nearest rank, written out: the value at position ceil(p/100 · n) (1-based) of the sorted list.
    #[test]
    fn percentiles_follow_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).rev().collect();
        let s = sorted(&v);
        assert_eq!(percentile(&s, 50.0), Some(5.0));
        assert_eq!(percentile(&s, 90.0), Some(9.0));
        assert_eq!(percentile(&s, 99.0), Some(10.0));
        assert_eq!(percentile(&s, 100.0), Some(10.0));
        assert_eq!(percentile(&s[..1], 50.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        // 200 values 0.5, 1.0, …: p99 is the 198th.
        let w: Vec<f64> = (1..=200).map(|i| i as f64 * 0.5).collect();
        assert_eq!(percentile(&w, 99.0), Some(99.0));
    }

    #[test]
    fn tenant_counts_parse() {
        assert_eq!(parse_counts("0, 1,8").unwrap(), vec![0, 1, 8]);
        assert!(parse_counts("1,x").is_err());
    }

    #[test]
    fn prompts_are_reproducible_and_in_range() {
        let mix = Mix {
            prompt_tokens: 50,
            max_tokens: 3,
            vocab: 10,
            seed: 7,
        };
        let a = mix.request(4, "t1");
        assert_eq!(a.prompt, mix.request(4, "t1").prompt);
        assert_ne!(a.prompt, mix.request(5, "t1").prompt);
        assert!(a.prompt.iter().all(|&t| (3..10).contains(&t)));
        assert_eq!(a.stop_ids, Some(vec![]));
    }
}
