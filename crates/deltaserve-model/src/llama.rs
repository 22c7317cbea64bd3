//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2), following transformers'
//! `modeling_llama.py` / `modeling_mistral.py` / `modeling_qwen2.py` in eager mode.
//!
//! One forward call takes several sequences at once. Their new tokens are packed into one
//! (tokens, hidden) matrix so every linear layer runs as one product for the whole batch;
//! attention runs per sequence against that sequence's own cache. Each sequence may belong to a
//! different tenant: base products are shared, and each tenant's delta is applied to its rows.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor, D};

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::rope::RotaryTables;
use crate::tenant::{LinearDelta, Proj, TenantWeights};
use deltaserve_kernels::SignDelta;

/// A dense base linear layer: y = x·Wᵀ + b.
#[derive(Debug, Clone)]
pub struct Linear {
    /// (out, in)
    pub weight: Tensor,
    /// (out,)
    pub bias: Option<Tensor>,
}

/// One decoder block's base weights.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Indexed by [`Proj::index`].
    pub linears: [Linear; 7],
    /// (hidden,)
    pub input_layernorm: Tensor,
    /// (hidden,)
    pub post_attention_layernorm: Tensor,
    /// Sliding window of this layer, if any.
    pub window: Option<usize>,
}

/// Which positions' logits a sequence wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// Only the last new position (generation).
    Last,
    /// Every new position (perplexity, distillation).
    All,
}

/// One sequence's part of a forward call.
pub struct SeqInput<'a> {
    /// New token ids to process.
    pub tokens: &'a [u32],
    /// The sequence's cache; `None` processes `tokens` from position 0 and keeps nothing.
    pub cache: Option<&'a mut KvCache>,
    /// The tenant whose delta applies, or `None` for the base model.
    pub tenant: Option<&'a TenantWeights>,
    /// Which logits to return.
    pub logits: LogitsWanted,
}

/// Options of a forward call.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    /// Use only ops with a backward pass (candle's fused rope/softmax have none).
    pub differentiable: bool,
}

/// The whole model's base weights.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: ModelConfig,
    dtype: DType,
    device: Device,
    /// (vocab, hidden)
    pub embed_tokens: Tensor,
    /// Decoder blocks.
    pub layers: Vec<Layer>,
    /// (hidden,)
    pub norm: Tensor,
    /// (vocab, hidden); `None` when tied to the embeddings.
    pub lm_head: Option<Tensor>,
    rope: RotaryTables,
    train_masks: MaskCache,
}

/// Attention masks of the differentiable path, made once per shape: training runs the same
/// `(T, S)` causal mask through every layer (twice with gradient checkpointing), and a mask made
/// on the host is a host-to-device copy from pageable memory, which waits for the device.
/// A few entries only (training batches have few distinct lengths); cleared when full.
#[derive(Debug, Clone, Default)]
struct MaskCache(std::sync::Arc<std::sync::Mutex<Vec<(MaskKey, Tensor)>>>);

/// (query rows, key columns, first query position, first key position, window, dtype).
type MaskKey = (usize, usize, usize, usize, Option<usize>, DType);

impl MaskCache {
    const ENTRIES: usize = 16;

    fn get_or_make(&self, key: MaskKey, make: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = v.iter().find(|(k, _)| *k == key) {
            return Ok(t.clone());
        }
        let t = make()?;
        if v.len() >= Self::ENTRIES {
            v.clear();
        }
        v.push((key, t.clone()));
        Ok(t)
    }
}

/// The projection-input observer of [`Model::forward_observed`], if any.
type Observer<'a, 'f> = Option<&'a RefCell<&'f mut dyn FnMut(usize, Proj, &Tensor)>>;

/// A contiguous run of rows belonging to one sequence.
#[derive(Clone, Copy)]
struct Segment<'a> {
    start: usize,
    len: usize,
    tenant: Option<&'a TenantWeights>,
}

/// How the packed rows map to sequences and tenants.
struct Routing<'a> {
    segs: Vec<Segment<'a>>,
    /// `Some(t)` when every row has the same tenant `t` (or all are base).
    uniform: Option<Option<&'a TenantWeights>>,
    /// The distinct tenants of a mixed batch, in first-seen order (empty when uniform).
    tenants: Vec<&'a TenantWeights>,
    /// For a mixed batch, per row: 0 for a base row, 1 + its index in `tenants` otherwise,
    /// as a U32 tensor on the model's device (what routed norms gather their weights with).
    row_slot: Option<Tensor>,
}

fn same_tenant(a: Option<&TenantWeights>, b: Option<&TenantWeights>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

impl<'a> Routing<'a> {
    fn new(segs: Vec<Segment<'a>>, device: &Device) -> Result<Self> {
        let first = segs.first().and_then(|s| s.tenant);
        let uniform = segs
            .iter()
            .all(|s| same_tenant(s.tenant, first))
            .then_some(first);
        let mut tenants: Vec<&'a TenantWeights> = Vec::new();
        let mut row_slot = None;
        if uniform.is_none() {
            let mut slots = Vec::with_capacity(segs.iter().map(|s| s.len).sum());
            for seg in &segs {
                let slot = match seg.tenant {
                    None => 0,
                    Some(t) => match tenants.iter().position(|&u| std::ptr::eq(u, t)) {
                        Some(i) => i + 1,
                        None => {
                            tenants.push(t);
                            tenants.len()
                        }
                    },
                };
                slots.extend(std::iter::repeat_n(slot as u32, seg.len));
            }
            row_slot = Some(Tensor::new(slots.as_slice(), device)?);
        }
        Ok(Self {
            segs,
            uniform,
            tenants,
            row_slot,
        })
    }

    /// RMSNorm of every row with its tenant's weight (`pick`), or the base's (`base`).
    ///
    /// A mixed batch is normalised in one pass and multiplied by per-row weights gathered from
    /// a `[1 + tenants, hidden]` table: a handful of kernels per norm instead of a handful per
    /// sequence (with 32 sequences on a 7B model the per-sequence form cost ~200 ms per step in
    /// launches). The product is the same elementwise product as [`rms_norm`]'s, so results are
    /// bit-identical to normalising each sequence on its own.
    fn norm(
        &self,
        x: &Tensor,
        base: &Tensor,
        eps: f64,
        pick: impl Fn(&TenantWeights) -> Option<&Tensor>,
    ) -> Result<Tensor> {
        if let Some(t) = self.uniform {
            return rms_norm(x, t.and_then(&pick).unwrap_or(base), eps);
        }
        let Some(slots) = &self.row_slot else {
            return rms_norm(x, base, eps);
        };
        if !self.tenants.iter().any(|&t| pick(t).is_some()) {
            return rms_norm(x, base, eps);
        }
        let mut table = Vec::with_capacity(self.tenants.len() + 1);
        table.push(base.clone());
        for &t in &self.tenants {
            table.push(pick(t).unwrap_or(base).clone());
        }
        let weights = Tensor::stack(&table, 0)?.index_select(slots, 0)?;
        Ok((rms_unscaled(x, eps)? * weights)?)
    }

    /// Applies `f` per tenant run of rows and stitches the results back in row order.
    fn map(
        &self,
        x: &Tensor,
        f: impl Fn(&Tensor, Option<&TenantWeights>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if let Some(t) = self.uniform {
            return f(x, t);
        }
        let parts = self
            .segs
            .iter()
            .map(|s| f(&x.narrow(0, s.start, s.len)?, s.tenant))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn any_tenant(&self, pred: impl Fn(&TenantWeights) -> bool) -> bool {
        self.segs.iter().any(|s| s.tenant.is_some_and(&pred))
    }
}

/// The dtype softmax, normalisation and logits are computed in: f32, as transformers does, or
/// f64 for a model loaded in f64 (gradient checks by finite differences need every op in f64).
fn accum_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// RMSNorm exactly as transformers' `LlamaRMSNorm`: normalise in f32, cast back, then scale.
/// Written with plain ops so it has a backward pass (candle's fused `rms_norm` has none).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(rms_unscaled(x, eps)?.broadcast_mul(weight)?)
}

/// RMSNorm before its weight: `x / sqrt(mean(x²) + eps)` computed in f32, cast back.
fn rms_unscaled(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(accum_dtype(dtype))?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x32.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?)
}

/// The delta product of one tenant for one projection, on rows `x`.
fn delta_product(x: &Tensor, delta: &LinearDelta) -> Result<Tensor> {
    match delta {
        LinearDelta::Sign { bits, scale } => {
            let u = deltaserve_kernels::sign_matmul_t(x, bits)?;
            Ok(u.broadcast_mul(&scale.to_dtype(u.dtype())?)?)
        }
        LinearDelta::Dense { diff } => Ok(crate::grad::matmul_t(x, diff)?),
        LinearDelta::LowRank { down, up } => {
            let h = crate::grad::matmul_t(x, down)?;
            Ok(crate::grad::matmul_t(&h, up)?)
        }
    }
}

/// The sign deltas of this projection for every row: per row the slot of its tenant's delta
/// (`None` for rows without one) and the distinct deltas, each listed once however many rows use
/// it, so the kernels read each delta's bits once per step (BGMV/SGMV style).
/// Returns `None` when some tenant has another kind of delta here.
type SignRouting = (Vec<Option<u32>>, Vec<SignDelta>);

fn sign_routing(
    l: usize,
    k: usize,
    routing: &Routing<'_>,
    rows: usize,
) -> Result<Option<SignRouting>> {
    let mut tenants: Vec<&TenantWeights> = Vec::new();
    let mut deltas: Vec<SignDelta> = Vec::new();
    let mut row_slot: Vec<Option<u32>> = Vec::with_capacity(rows);
    for seg in &routing.segs {
        let slot = match seg
            .tenant
            .and_then(|t| t.layers[l].linears[k].as_ref().map(|d| (t, d)))
        {
            None => None,
            Some((t, LinearDelta::Sign { bits, .. })) => {
                let i = match tenants.iter().position(|&u| std::ptr::eq(u, t)) {
                    Some(i) => i,
                    None => {
                        tenants.push(t);
                        // The host copy: reading the device scalar here would wait for the
                        // device once per tenant, projection and layer of every step.
                        let s = t.sign_scale_host(l, k)?.unwrap_or(0.0);
                        deltas.push(SignDelta::new(bits.clone(), s));
                        tenants.len() - 1
                    }
                };
                Some(i as u32)
            }
            Some((_, _)) => return Ok(None),
        };
        row_slot.extend(std::iter::repeat_n(slot, seg.len));
    }
    Ok(Some((row_slot, deltas)))
}

impl Model {
    /// Loads the base weights of a checkpoint in `dtype` on `device`, checking every shape.
    pub fn load(ckpt: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = ckpt.config().clone();
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let q_out = cfg.num_attention_heads * cfg.head_dim;
        let kv_out = cfg.num_key_value_heads * cfg.head_dim;
        let get = |name: &str, shape: &[usize]| ckpt.load(name, shape, dtype, device);
        let embed_tokens = get("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let lin = |proj: Proj, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                let name = format!("{p}.{}", proj.module());
                Ok(Linear {
                    weight: get(&format!("{name}.weight"), &[out, inp])?,
                    bias: if bias {
                        Some(get(&format!("{name}.bias"), &[out])?)
                    } else {
                        None
                    },
                })
            };
            layers.push(Layer {
                linears: [
                    lin(Proj::Q, q_out, h, cfg.qkv_bias)?,
                    lin(Proj::K, kv_out, h, cfg.qkv_bias)?,
                    lin(Proj::V, kv_out, h, cfg.qkv_bias)?,
                    lin(Proj::O, h, q_out, cfg.o_bias)?,
                    lin(Proj::Gate, i, h, cfg.mlp_bias)?,
                    lin(Proj::Up, i, h, cfg.mlp_bias)?,
                    lin(Proj::Down, h, i, cfg.mlp_bias)?,
                ],
                input_layernorm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_attention_layernorm: get(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                )?,
                window: cfg.sliding_window[l],
            });
        }
        let norm = get("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(get("lm_head.weight", &[v, h])?)
        };
        let rope = RotaryTables::new(&cfg, dtype, device)?;
        Ok(Self {
            cfg,
            dtype,
            device: device.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            train_masks: MaskCache::default(),
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Activation and weight dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers)
    }

    /// Runs new tokens of several sequences through the model and returns, per sequence, logits
    /// in f32 (f64 for a model loaded in f64) of shape (1, vocab) or (tokens, vocab) as each asked.
    pub fn forward(&self, seqs: &mut [SeqInput<'_>], opts: ForwardOptions) -> Result<Vec<Tensor>> {
        self.forward_impl(seqs, opts, None)
    }

    /// Logits of every position of each sequence in `seqs`, all with `tenant`'s deltas and no KV
    /// cache: the whole-window forward that evaluation and training run. One `(len, vocab)`
    /// tensor per sequence, as [`Model::forward`] returns them.
    pub fn window_logits(
        &self,
        seqs: &[&[u32]],
        tenant: Option<&TenantWeights>,
        opts: ForwardOptions,
    ) -> Result<Vec<Tensor>> {
        let mut inputs: Vec<SeqInput<'_>> = seqs
            .iter()
            .map(|tokens| SeqInput {
                tokens,
                cache: None,
                tenant,
                logits: LogitsWanted::All,
            })
            .collect();
        self.forward(&mut inputs, opts)
    }

    /// [`Model::forward`], calling `observer(layer, proj, x)` with every projection's input
    /// `x` (all sequences' new rows packed, `(tokens, in_features)`) before the product. For
    /// calibration statistics such as GPTQ's and EoRA's `Σ xᵀx`; q/k/v (and gate/up) see the
    /// same input, once each.
    pub fn forward_observed(
        &self,
        seqs: &mut [SeqInput<'_>],
        opts: ForwardOptions,
        observer: &mut dyn FnMut(usize, Proj, &Tensor),
    ) -> Result<Vec<Tensor>> {
        let cell = RefCell::new(observer);
        self.forward_impl(seqs, opts, Some(&cell))
    }

    fn forward_impl(
        &self,
        seqs: &mut [SeqInput<'_>],
        opts: ForwardOptions,
        obs: Observer<'_, '_>,
    ) -> Result<Vec<Tensor>> {
        let mut segs = Vec::with_capacity(seqs.len());
        let mut start = 0;
        let mut starts = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            let past = s.cache.as_ref().map_or(0, |c| c.len());
            if s.tokens.is_empty() {
                return Err(ModelError::Input(
                    "a sequence has no tokens to process".into(),
                ));
            }
            if past + s.tokens.len() > self.cfg.max_position_embeddings {
                return Err(ModelError::Input(format!(
                    "{} tokens (prompt plus generated) exceed the model's context of {} tokens \
                     (max_position_embeddings in config.json); shorten the prompt or --max-tokens",
                    past + s.tokens.len(),
                    self.cfg.max_position_embeddings
                )));
            }
            segs.push(Segment {
                start,
                len: s.tokens.len(),
                tenant: s.tenant,
            });
            starts.push(past);
            start += s.tokens.len();
        }
        let routing = Routing::new(segs, &self.device)?;

        // Embeddings, from the tenant's table when it has one (it may hold extra tokens).
        let mut parts = Vec::with_capacity(seqs.len());
        for (s, seg) in seqs.iter().zip(&routing.segs) {
            let table = seg
                .tenant
                .and_then(|t| t.embed_tokens.as_ref())
                .unwrap_or(&self.embed_tokens);
            let vocab = table.dim(0)?;
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(ModelError::Input(format!(
                    "token id {bad} is outside the vocabulary of {vocab}"
                )));
            }
            let ids = Tensor::new(s.tokens, &self.device)?;
            parts.push(table.index_select(&ids, 0)?);
        }
        let mut x = Tensor::cat(&parts, 0)?;

        for l in 0..self.layers.len() {
            x = self.decoder_layer(l, &x, &routing, seqs, &starts, opts, obs)?;
        }
        for s in seqs.iter_mut() {
            if let Some(c) = s.cache.as_deref_mut() {
                c.advance(s.tokens.len());
            }
        }

        let mut out = Vec::with_capacity(seqs.len());
        for (s, seg) in seqs.iter().zip(&routing.segs) {
            let rows = match s.logits {
                LogitsWanted::Last => x.narrow(0, seg.start + seg.len - 1, 1)?,
                LogitsWanted::All => x.narrow(0, seg.start, seg.len)?,
            };
            let t = seg.tenant;
            let norm = t.and_then(|t| t.norm.as_ref()).unwrap_or(&self.norm);
            let h = rms_norm(&rows, norm, self.cfg.rms_norm_eps)?;
            let head = if self.cfg.tie_word_embeddings {
                t.and_then(|t| t.embed_tokens.as_ref())
                    .unwrap_or(&self.embed_tokens)
            } else {
                t.and_then(|t| t.lm_head.as_ref())
                    .or(self.lm_head.as_ref())
                    .unwrap_or(&self.embed_tokens)
            };
            out.push(crate::grad::matmul_t(&h, head)?.to_dtype(accum_dtype(self.dtype))?);
        }
        Ok(out)
    }

    /// Decoder layer `l` on the packed rows `x`: attention and MLP, each with its residual.
    #[allow(clippy::too_many_arguments)]
    fn decoder_layer(
        &self,
        l: usize,
        x: &Tensor,
        routing: &Routing<'_>,
        seqs: &mut [SeqInput<'_>],
        starts: &[usize],
        opts: ForwardOptions,
        obs: Observer<'_, '_>,
    ) -> Result<Tensor> {
        let layer = &self.layers[l];
        let eps = self.cfg.rms_norm_eps;
        let normed = routing.norm(x, &layer.input_layernorm, eps, |t| {
            t.layers[l].input_layernorm.as_ref()
        })?;
        let attn = self.attention(l, layer, &normed, routing, seqs, starts, opts, obs)?;
        let x = (x + attn)?;
        let normed = routing.norm(&x, &layer.post_attention_layernorm, eps, |t| {
            t.layers[l].post_attention_layernorm.as_ref()
        })?;
        let gate = self.linear(l, Proj::Gate, &normed, routing, opts.differentiable, obs)?;
        let up = self.linear(l, Proj::Up, &normed, routing, opts.differentiable, obs)?;
        let act = (candle_nn::ops::silu(&gate)? * up)?;
        let down = self.linear(l, Proj::Down, &act, routing, opts.differentiable, obs)?;
        Ok((x + down)?)
    }

    /// The differentiable forward of `seqs` (each from position 0, no cache) cut at the
    /// decoder-layer boundaries, for gradient checkpointing: see [`LayerwiseForward`].
    pub fn layerwise<'m, 't>(&'m self, seqs: &[&'t [u32]]) -> Result<LayerwiseForward<'m, 't>> {
        if seqs.is_empty() {
            return Err(ModelError::Input("an empty batch".into()));
        }
        for s in seqs {
            if s.is_empty() {
                return Err(ModelError::Input(
                    "a sequence has no tokens to process".into(),
                ));
            }
            if s.len() > self.cfg.max_position_embeddings {
                return Err(ModelError::Input(format!(
                    "{} tokens exceed the model's context of {} tokens (max_position_embeddings \
                     in config.json); use shorter sequences",
                    s.len(),
                    self.cfg.max_position_embeddings
                )));
            }
        }
        Ok(LayerwiseForward {
            model: self,
            seqs: seqs.to_vec(),
        })
    }

    /// One projection for all rows: the shared base product, then each tenant's bias and delta.
    fn linear(
        &self,
        l: usize,
        proj: Proj,
        x: &Tensor,
        routing: &Routing<'_>,
        differentiable: bool,
        obs: Observer<'_, '_>,
    ) -> Result<Tensor> {
        if let Some(o) = obs {
            (o.borrow_mut())(l, proj, x);
        }
        let base = &self.layers[l].linears[proj.index()];
        let k = proj.index();
        let has_delta = routing.any_tenant(|t| t.layers[l].linears[k].is_some());
        let tenant_bias = routing.any_tenant(|t| t.layers[l].biases[k].is_some());
        let fused = has_delta && !differentiable && !tenant_bias;
        // The rows' sign deltas, when every delta here is one: computed once for both paths.
        let signs = if fused || (has_delta && routing.uniform.is_none()) {
            sign_routing(l, k, routing, x.dim(0)?)?
        } else {
            None
        };
        // Serving: when every delta here is a sign delta and nothing needs gradients, the
        // kernels crate computes base product and deltas together (on CUDA, one kernel for a
        // decode row of one tenant; the base product added inside the delta kernel otherwise).
        if fused {
            if let Some((row_slot, deltas)) = &signs {
                let refs: Vec<&SignDelta> = deltas.iter().collect();
                let mut y = deltaserve_kernels::delta_linear(x, &base.weight, row_slot, &refs)?;
                if let Some(b) = &base.bias {
                    y = y.broadcast_add(b)?;
                }
                return Ok(y);
            }
        }
        let mut y = crate::grad::matmul_t(x, &base.weight)?;
        if tenant_bias {
            y = routing.map(&y, |y, t| {
                match t
                    .and_then(|t| t.layers[l].biases[k].as_ref())
                    .or(base.bias.as_ref())
                {
                    Some(b) => Ok(y.broadcast_add(b)?),
                    None => Ok(y.clone()),
                }
            })?;
        } else if let Some(b) = &base.bias {
            y = y.broadcast_add(b)?;
        }
        if has_delta {
            if routing.uniform.is_none() {
                if let Some((row_slot, deltas)) = &signs {
                    let refs: Vec<&SignDelta> = deltas.iter().collect();
                    let d = deltaserve_kernels::tenant_delta_matmul(x, row_slot, &refs)?;
                    return Ok((y + d)?);
                }
            }
            let d = routing.map(x, |x, t| {
                match t.and_then(|t| t.layers[l].linears[k].as_ref()) {
                    Some(delta) => delta_product(x, delta),
                    None => Ok(Tensor::zeros(
                        (x.dim(0)?, base.weight.dim(0)?),
                        x.dtype(),
                        x.device(),
                    )?),
                }
            })?;
            y = (y + d)?;
        }
        Ok(y)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: usize,
        layer: &Layer,
        x: &Tensor,
        routing: &Routing<'_>,
        seqs: &mut [SeqInput<'_>],
        starts: &[usize],
        opts: ForwardOptions,
        obs: Observer<'_, '_>,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let q = self.linear(l, Proj::Q, x, routing, opts.differentiable, obs)?;
        let k = self.linear(l, Proj::K, x, routing, opts.differentiable, obs)?;
        let v = self.linear(l, Proj::V, x, routing, opts.differentiable, obs)?;
        let mut outs = Vec::with_capacity(seqs.len());
        for ((s, seg), &p0) in seqs.iter_mut().zip(&routing.segs).zip(starts) {
            let t = seg.len;
            let heads = |m: &Tensor, n: usize| -> Result<Tensor> {
                Ok(m.narrow(0, seg.start, t)?
                    .reshape((t, n, hd))?
                    .transpose(0, 1)?
                    .contiguous()?)
            };
            let q = self.rope.apply(&heads(&q, nh)?, p0, opts.differentiable)?;
            let k = self.rope.apply(&heads(&k, nkv)?, p0, opts.differentiable)?;
            let v = heads(&v, nkv)?;
            let (k, v) = match s.cache.as_deref_mut() {
                Some(c) => c.append(l, &k, &v)?,
                None => (k, v),
            };
            outs.push(self.attend(&q, &k, &v, p0, layer.window, opts)?);
        }
        let o = Tensor::cat(&outs, 0)?;
        self.linear(l, Proj::O, &o, routing, opts.differentiable, obs)
    }

    /// Scaled dot-product attention of one sequence.
    /// q: (heads, T, hd) at positions p0..p0+T; k, v: (kv_heads, S, hd) at positions 0..S.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        p0: usize,
        window: Option<usize>,
        opts: ForwardOptions,
    ) -> Result<Tensor> {
        let (nh, t, hd) = q.dims3()?;
        let nkv = k.dim(0)?;
        let rep = nh / nkv;
        // Keys older than the window are never attended to: drop them before the product.
        let first = window.map_or(0, |w| (p0 + 1).saturating_sub(w));
        let s_all = k.dim(1)?;
        let (k, v) = if first > 0 {
            (
                k.narrow(1, first, s_all - first)?,
                v.narrow(1, first, s_all - first)?,
            )
        } else {
            (k.clone(), v.clone())
        };
        let s = s_all - first;
        // Grouped-query attention without copying keys: the `rep` query heads that share a
        // key/value head are stacked along the rows (transformers `repeat_kv` order).
        let qg = q.reshape((nkv, rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (qg.matmul(&k.t()?.contiguous()?)? * scale)?.reshape((nh, t, s))?;
        let mut scores = scores.to_dtype(accum_dtype(q.dtype()))?;
        let needs_mask = t > 1 || window.is_some_and(|w| s > w);
        if needs_mask {
            let make = || -> Result<Tensor> {
                let mut m = vec![0f32; t * s];
                for i in 0..t {
                    let qpos = p0 + i;
                    for j in 0..s {
                        let kpos = first + j;
                        let visible = kpos <= qpos && window.is_none_or(|w| qpos - kpos < w);
                        if !visible {
                            m[i * s + j] = f32::NEG_INFINITY;
                        }
                    }
                }
                Ok(Tensor::from_vec(m, (t, s), q.device())?.to_dtype(scores.dtype())?)
            };
            let m = if opts.differentiable {
                let key = (t, s, p0, first, window, scores.dtype());
                self.train_masks.get_or_make(key, make)?
            } else {
                make()?
            };
            scores = scores.broadcast_add(&m)?;
        }
        let probs = if opts.differentiable {
            crate::grad::softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let probs = probs.to_dtype(q.dtype())?.reshape((nkv, rep * t, s))?;
        let o = probs.matmul(&v.contiguous()?)?; // (nkv, rep*t, hd)
        Ok(o.reshape((nh, t, hd))?
            .transpose(0, 1)?
            .reshape((t, nh * hd))?)
    }
}

/// The differentiable forward pass in pieces: embeddings, one decoder layer at a time, and the
/// final norm plus LM head on any subset of rows. Gradient checkpointing (Chen et al. 2016,
/// "Training Deep Nets with Sublinear Memory Cost", §3) runs the layers once without a graph,
/// keeping only each layer's input, and then recomputes one layer at a time with its graph
/// during the backward pass, so the autograd graph never holds more than one layer.
///
/// Every piece computes exactly what [`Model::forward`] computes for the same sequences with
/// `differentiable: true` and one tenant for all of them (the training case); rows are packed
/// sequence after sequence, as there.
pub struct LayerwiseForward<'m, 't> {
    model: &'m Model,
    seqs: Vec<&'t [u32]>,
}

impl LayerwiseForward<'_, '_> {
    fn routing<'a>(&self, tenant: Option<&'a TenantWeights>) -> Result<Routing<'a>> {
        let mut start = 0;
        let segs = self
            .seqs
            .iter()
            .map(|s| {
                let seg = Segment {
                    start,
                    len: s.len(),
                    tenant,
                };
                start += s.len();
                seg
            })
            .collect();
        Routing::new(segs, &self.model.device)
    }

    /// `(first row, rows)` of every sequence in the packed matrices.
    pub fn rows(&self) -> Vec<(usize, usize)> {
        let mut start = 0;
        self.seqs
            .iter()
            .map(|s| {
                start += s.len();
                (start - s.len(), s.len())
            })
            .collect()
    }

    /// The packed token embeddings `(tokens, hidden)`, from `tenant`'s table when it has one.
    pub fn embed(&self, tenant: Option<&TenantWeights>) -> Result<Tensor> {
        let m = self.model;
        let table = tenant
            .and_then(|t| t.embed_tokens.as_ref())
            .unwrap_or(&m.embed_tokens);
        let vocab = table.dim(0)?;
        let ids: Vec<u32> = self.seqs.iter().flat_map(|s| s.iter().copied()).collect();
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(table.index_select(&Tensor::new(ids.as_slice(), &m.device)?, 0)?)
    }

    /// Decoder layer `l` on the packed rows `x` with `tenant`'s deltas, with only
    /// differentiable ops. `tenant` needs entries only for layer `l`.
    pub fn layer(&self, l: usize, x: &Tensor, tenant: Option<&TenantWeights>) -> Result<Tensor> {
        let opts = ForwardOptions {
            differentiable: true,
        };
        self.run_layer(l, x, tenant, opts, None)
    }

    /// Decoder layer `l` as [`Model::forward_observed`] runs it (the serving ops, no graph),
    /// calling `observer(l, proj, x)` with each projection's input. Chained from [`Self::embed`]
    /// it makes the same observations and hidden states as a whole forward, so a caller that
    /// calibrates layer by layer (ApiQ, GPTQ-style sequential passes) keeps each layer's input
    /// instead of running the layers before it again.
    pub fn layer_observed(
        &self,
        l: usize,
        x: &Tensor,
        tenant: Option<&TenantWeights>,
        observer: &mut dyn FnMut(usize, Proj, &Tensor),
    ) -> Result<Tensor> {
        let cell = RefCell::new(observer);
        self.run_layer(l, x, tenant, ForwardOptions::default(), Some(&cell))
    }

    fn run_layer(
        &self,
        l: usize,
        x: &Tensor,
        tenant: Option<&TenantWeights>,
        opts: ForwardOptions,
        obs: Observer<'_, '_>,
    ) -> Result<Tensor> {
        let routing = self.routing(tenant)?;
        let mut inputs: Vec<SeqInput<'_>> = self
            .seqs
            .iter()
            .map(|s| SeqInput {
                tokens: s,
                cache: None,
                tenant,
                logits: LogitsWanted::All,
            })
            .collect();
        let starts = vec![0; self.seqs.len()];
        self.model
            .decoder_layer(l, x, &routing, &mut inputs, &starts, opts, obs)
    }

    /// Logits of some rows `x` of the last layer's output: final norm, LM head, in f32 (f64 for
    /// an f64 model), as [`Model::forward`] returns them. Every op is per row, so any block of
    /// rows gives the same values as the whole.
    pub fn logits(&self, x: &Tensor, tenant: Option<&TenantWeights>) -> Result<Tensor> {
        let m = self.model;
        let norm = tenant.and_then(|t| t.norm.as_ref()).unwrap_or(&m.norm);
        let h = rms_norm(x, norm, m.cfg.rms_norm_eps)?;
        let head = if m.cfg.tie_word_embeddings {
            tenant
                .and_then(|t| t.embed_tokens.as_ref())
                .unwrap_or(&m.embed_tokens)
        } else {
            tenant
                .and_then(|t| t.lm_head.as_ref())
                .or(m.lm_head.as_ref())
                .unwrap_or(&m.embed_tokens)
        };
        Ok(crate::grad::matmul_t(&h, head)?.to_dtype(accum_dtype(m.dtype))?)
    }
}
