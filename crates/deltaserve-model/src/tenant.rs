//! What one served fine-tune (a *tenant*) changes in the base model, in memory.
//!
//! A tenant is built from a delta file by the codecs crate. The base weights are shared; a tenant
//! holds, per linear layer, a compressed delta that the forward pass applies without expanding it,
//! plus the small tensors the codec stores in full (norms, biases, and for BitDelta the embeddings
//! and `lm_head`).

use candle_core::Tensor;
use deltaserve_kernels::SignBits;

/// The seven projections of a decoder layer, in a fixed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    /// self_attn.q_proj
    Q,
    /// self_attn.k_proj
    K,
    /// self_attn.v_proj
    V,
    /// self_attn.o_proj
    O,
    /// mlp.gate_proj
    Gate,
    /// mlp.up_proj
    Up,
    /// mlp.down_proj
    Down,
}

impl Proj {
    /// All projections in storage order.
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The Hugging Face module path inside a layer, e.g. `self_attn.q_proj`.
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// Position in [`Proj::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Parses `model.layers.{i}.{module}.weight` (or `.bias`) into (layer, proj, is_bias).
    pub fn parse_tensor_name(name: &str) -> Option<(usize, Proj, bool)> {
        let rest = name.strip_prefix("model.layers.")?;
        let (idx, rest) = rest.split_once('.')?;
        let layer = idx.parse().ok()?;
        let (module, kind) = rest.rsplit_once('.')?;
        let proj = Proj::ALL.into_iter().find(|p| p.module() == module)?;
        match kind {
            "weight" => Some((layer, proj, false)),
            "bias" => Some((layer, proj, true)),
            _ => None,
        }
    }
}

/// A compressed change to one linear layer.
#[derive(Debug, Clone)]
pub enum LinearDelta {
    /// BitDelta: W_ft ≈ W_base + scale · S, S the packed sign matrix.
    Sign {
        /// The packed signs (the kernel's copy also carries the f32 scale for the fused serving path).
        bits: SignBits,
        /// The scale as a tensor of shape (1,): a `Var` while calibrating, so autograd reaches it.
        scale: Tensor,
    },
    /// A dense difference W_ft − W_base (decode-on-load codecs, reference checks).
    Dense {
        /// (out, in), in the model's dtype.
        diff: Tensor,
    },
    /// A low-rank difference W_ft − W_base ≈ up · down, applied as (x · downᵀ) · upᵀ so the
    /// product is never expanded: 2·r·(in + out) flops per row instead of in·out.
    LowRank {
        /// (rank, in), in the model's dtype.
        down: Tensor,
        /// (out, rank), in the model's dtype.
        up: Tensor,
    },
}

impl LinearDelta {
    /// The dense difference this delta adds to the base weight, (out, in) in f32: what a merge
    /// or an error report needs. Sign deltas are unpacked, low-rank ones multiplied out.
    pub fn to_dense_f32(&self) -> candle_core::Result<Tensor> {
        use candle_core::DType;
        match self {
            LinearDelta::Sign { bits, scale } => {
                let words = bits.to_host_words()?;
                let signs = deltaserve_format::unpack_signs(&words, bits.n(), bits.k());
                let s = Tensor::from_vec(signs, (bits.n(), bits.k()), scale.device())?;
                s.broadcast_mul(&scale.to_dtype(DType::F32)?)
            }
            LinearDelta::Dense { diff } => diff.to_dtype(DType::F32),
            LinearDelta::LowRank { down, up } => {
                up.to_dtype(DType::F32)?.matmul(&down.to_dtype(DType::F32)?)
            }
        }
    }
}

/// One decoder layer's changes. `None` means "as the base".
#[derive(Debug, Clone, Default)]
pub struct LayerDelta {
    /// Indexed by [`Proj::index`].
    pub linears: [Option<LinearDelta>; 7],
    /// Fine-tune's own biases, replacing the base's; indexed by [`Proj::index`].
    pub biases: [Option<Tensor>; 7],
    /// Fine-tune's input_layernorm weight.
    pub input_layernorm: Option<Tensor>,
    /// Fine-tune's post_attention_layernorm weight.
    pub post_attention_layernorm: Option<Tensor>,
}

/// Everything one tenant changes. Shapes follow the fine-tune's config (its vocabulary may be larger).
#[derive(Debug, Clone, Default)]
pub struct TenantWeights {
    /// Per decoder layer.
    pub layers: Vec<LayerDelta>,
    /// Fine-tune's embedding matrix (vocab, hidden), if stored.
    pub embed_tokens: Option<Tensor>,
    /// Fine-tune's final norm weight.
    pub norm: Option<Tensor>,
    /// Fine-tune's output projection (vocab, hidden), if stored and untied.
    pub lm_head: Option<Tensor>,
    /// Host copies of the sign deltas' scales, per layer and projection, read from the device
    /// once on first use by the fused multi-tenant path (a device scalar read waits for the
    /// device; on a 7B model that was 224 waits per tenant per step). A tenant whose scale
    /// tensors are changed in place after its first mixed-batch forward must be rebuilt;
    /// calibration builds a fresh `TenantWeights` per step, so it never meets a stale copy.
    pub sign_scales_host: std::sync::OnceLock<Vec<[Option<f32>; 7]>>,
}

impl TenantWeights {
    /// The scale of layer `l`'s projection `k` if it is a sign delta, from the host copy
    /// ([`TenantWeights::sign_scales_host`]), reading all scales from the device on first use.
    pub fn sign_scale_host(&self, l: usize, k: usize) -> candle_core::Result<Option<f32>> {
        if self.sign_scales_host.get().is_none() {
            let mut all = Vec::with_capacity(self.layers.len());
            for layer in &self.layers {
                let mut row = [None; 7];
                for (slot, d) in row.iter_mut().zip(&layer.linears) {
                    if let Some(LinearDelta::Sign { scale, .. }) = d {
                        let v = scale.to_dtype(candle_core::DType::F32)?.flatten_all()?;
                        *slot = Some(v.get(0)?.to_scalar::<f32>()?);
                    }
                }
                all.push(row);
            }
            // Another thread may have filled it meanwhile with the same values.
            let _ = self.sign_scales_host.set(all);
        }
        Ok(self
            .sign_scales_host
            .get()
            .and_then(|all| all.get(l))
            .and_then(|row| row[k]))
    }

    /// A tenant that changes nothing, sized for `layers` decoder layers.
    pub fn empty(layers: usize) -> Self {
        Self {
            layers: vec![LayerDelta::default(); layers],
            ..Default::default()
        }
    }
}
