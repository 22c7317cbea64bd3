//! A delta file to the in-memory [`TenantWeights`] the model's forward pass applies.
//!
//! Sign entries stay packed ([`LinearDelta::Sign`], the kernels multiply by the bits directly);
//! tensors stored in full go to their place by name (embeddings, norms, `lm_head`, biases), and a
//! projection weight stored in full becomes a dense difference ([`LinearDelta::Dense`]).
//! Coded entries ([`crate::codec`]) that decode to factors (`lowrank`, `lowrank-mixed`) become
//! [`LinearDelta::LowRank`], applied unexpanded; every other codec (DARE, DeltaDQ, RTN, GPTQ, …)
//! is decoded on load to a dense difference ([`LinearDelta::Dense`]).

use candle_core::{DType, Device, Tensor};
use deltaserve_format::{BaseFingerprint, DeltaFile, FullValue, TensorEntry};
use deltaserve_kernels::SignBits;
use deltaserve_model::{Checkpoint, LinearDelta, Proj, TenantWeights};

use crate::codec::Decoded;
use crate::error::{CodecError, Result};
use crate::numeric::FloatDtype;

/// Where a checkpoint tensor goes in a [`TenantWeights`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// `model.embed_tokens.weight`
    EmbedTokens,
    /// `model.norm.weight`
    Norm,
    /// `lm_head.weight`
    LmHead,
    /// `model.layers.{i}.input_layernorm.weight`
    InputLayernorm(usize),
    /// `model.layers.{i}.post_attention_layernorm.weight`
    PostAttentionLayernorm(usize),
    /// `model.layers.{i}.{proj}.weight`
    ProjWeight(usize, Proj),
    /// `model.layers.{i}.{proj}.bias`
    ProjBias(usize, Proj),
}

impl Slot {
    /// The slot of a Llama-family checkpoint tensor name, `None` for names the model has no
    /// place for.
    pub fn of(name: &str) -> Option<Slot> {
        match name {
            "model.embed_tokens.weight" => return Some(Slot::EmbedTokens),
            "model.norm.weight" => return Some(Slot::Norm),
            "lm_head.weight" => return Some(Slot::LmHead),
            _ => {}
        }
        if let Some((layer, proj, bias)) = Proj::parse_tensor_name(name) {
            return Some(if bias {
                Slot::ProjBias(layer, proj)
            } else {
                Slot::ProjWeight(layer, proj)
            });
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (idx, rest) = rest.split_once('.')?;
        let layer: usize = idx.parse().ok()?;
        match rest {
            "input_layernorm.weight" => Some(Slot::InputLayernorm(layer)),
            "post_attention_layernorm.weight" => Some(Slot::PostAttentionLayernorm(layer)),
            _ => None,
        }
    }

    fn layer(self) -> Option<usize> {
        match self {
            Slot::InputLayernorm(l)
            | Slot::PostAttentionLayernorm(l)
            | Slot::ProjWeight(l, _)
            | Slot::ProjBias(l, _) => Some(l),
            _ => None,
        }
    }
}

/// Builds a tenant from `delta` for the model loaded from `base`, in `dtype` on `device`.
///
/// `base_fingerprint` is `base`'s fingerprint (`deltaserve_format::fingerprint_safetensors` over
/// `base.weight_files()`; servers compute it once per base). It is compared with the delta's
/// first: a delta made against another base is refused. Every entry must fit the base model:
/// a known tensor name, the base's shape (the embeddings and `lm_head` may have more rows, for
/// fine-tunes that add tokens).
pub fn load_tenant(
    delta: &DeltaFile,
    base: &Checkpoint,
    base_fingerprint: &BaseFingerprint,
    dtype: DType,
    device: &Device,
) -> Result<TenantWeights> {
    delta.check_base(base_fingerprint, base.dir())?;
    let cfg = base.config();
    let mut tenant = TenantWeights::empty(cfg.num_hidden_layers);
    for (name, entry) in &delta.header().tensors {
        let unknown = |why: String| CodecError::UnknownTensor {
            delta: delta.path().to_owned(),
            tensor: name.clone(),
            why,
        };
        let slot = Slot::of(name).ok_or_else(|| {
            unknown("expected embed_tokens, norm, lm_head, a layer norm or a projection".into())
        })?;
        if let Some(l) = slot.layer() {
            if l >= cfg.num_hidden_layers {
                return Err(unknown(format!(
                    "layer {l}, but the base has {} layers",
                    cfg.num_hidden_layers
                )));
            }
        }
        check_shape(delta, base, name, &entry.shape(), slot)?;

        match (entry, slot) {
            (TensorEntry::Sign { shape, .. }, Slot::ProjWeight(l, proj)) => {
                let [rows, cols] = *shape;
                let words = delta.sign_words(entry)?;
                // In the layout the serving kernels read fastest on this device (interleaved on
                // an AVX-512 CPU): this loader feeds serving and evaluation, not training.
                let bits = SignBits::for_serving(words, rows, cols, device)?;
                let scale = Tensor::new(&[delta.scale(entry)?], device)?;
                tenant.layers[l].linears[proj.index()] = Some(LinearDelta::Sign { bits, scale });
            }
            (TensorEntry::Sign { .. }, _) => {
                return Err(unknown(
                    "a sign entry must be a projection weight (q/k/v/o/gate/up/down_proj)".into(),
                ))
            }
            (
                TensorEntry::Coded {
                    value,
                    shape: [rows, cols],
                    ..
                },
                Slot::ProjWeight(l, proj),
            ) => {
                let (rows, cols) = (*rows, *cols);
                let linear = match (crate::codec::decode(delta, name, entry)?, value) {
                    // Factors stay factors: the forward applies `x·downᵀ·upᵀ` unexpanded.
                    (Decoded::LowRank { rank, down, up }, FullValue::Difference) => {
                        let on = |v: Vec<f32>, shape: (usize, usize)| -> Result<Tensor> {
                            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
                                .to_dtype(dtype)?
                                .to_device(device)?)
                        };
                        LinearDelta::LowRank {
                            down: on(down, (rank, cols))?,
                            up: on(up, (rows, rank))?,
                        }
                    }
                    // Every other codec decodes on load to a dense difference.
                    (decoded, value) => {
                        let m = Tensor::from_vec(
                            decoded.into_dense(rows, cols),
                            (rows, cols),
                            &Device::Cpu,
                        )?;
                        let diff = match value {
                            FullValue::Difference => m,
                            FullValue::Finetuned => (m - base_tensor(base, name)?)?,
                        };
                        LinearDelta::Dense {
                            diff: diff.to_dtype(dtype)?.to_device(device)?,
                        }
                    }
                };
                tenant.layers[l].linears[proj.index()] = Some(linear);
            }
            (TensorEntry::Coded { .. }, _) => {
                return Err(unknown(
                    "a coded entry must be a projection weight (q/k/v/o/gate/up/down_proj)".into(),
                ))
            }
            (TensorEntry::Full { value, .. }, slot) => {
                let stored = full_tensor(delta, name, entry)?;
                let tensor = match (value, slot) {
                    // A projection's difference is what the forward pass adds: keep it as one.
                    (FullValue::Difference, Slot::ProjWeight(..)) => stored,
                    (FullValue::Finetuned, Slot::ProjWeight(..)) => {
                        (stored - base_tensor(base, name)?)?
                    }
                    (FullValue::Difference, _) => (base_tensor(base, name)? + stored)?,
                    (FullValue::Finetuned, _) => stored,
                };
                let tensor = tensor.to_dtype(dtype)?.to_device(device)?;
                place(&mut tenant, slot, tensor, cfg.tie_word_embeddings)
                    .map_err(|why| unknown(why.to_owned()))?;
            }
            (other, _) => {
                return Err(unknown(format!(
                    "entry kind \"{}\" cannot be loaded yet",
                    other.kind()
                )))
            }
        }
    }
    Ok(tenant)
}

/// Puts a full tensor into its slot.
fn place(
    tenant: &mut TenantWeights,
    slot: Slot,
    tensor: Tensor,
    tied: bool,
) -> std::result::Result<(), &'static str> {
    match slot {
        Slot::EmbedTokens => tenant.embed_tokens = Some(tensor),
        Slot::Norm => tenant.norm = Some(tensor),
        Slot::LmHead if tied => {
            return Err(
                "the fine-tune has its own lm_head but the base ties lm_head to the \
                        embeddings, so the served model could not use it; merge the delta \
                        (`deltaserve merge`) and serve the result instead",
            )
        }
        Slot::LmHead => tenant.lm_head = Some(tensor),
        Slot::InputLayernorm(l) => tenant.layers[l].input_layernorm = Some(tensor),
        Slot::PostAttentionLayernorm(l) => tenant.layers[l].post_attention_layernorm = Some(tensor),
        Slot::ProjWeight(l, p) => {
            tenant.layers[l].linears[p.index()] = Some(LinearDelta::Dense { diff: tensor })
        }
        Slot::ProjBias(l, p) => tenant.layers[l].biases[p.index()] = Some(tensor),
    }
    Ok(())
}

/// The shape the base model has for `slot`, checked against the delta's. Embeddings and
/// `lm_head` may have more rows than the base (added tokens), never fewer.
fn check_shape(
    delta: &DeltaFile,
    base: &Checkpoint,
    name: &str,
    shape: &[usize],
    slot: Slot,
) -> Result<()> {
    let cfg = base.config();
    let q_out = cfg.num_attention_heads * cfg.head_dim;
    let kv_out = cfg.num_key_value_heads * cfg.head_dim;
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let proj_shape = |p: Proj| match p {
        Proj::Q => [q_out, h],
        Proj::K | Proj::V => [kv_out, h],
        Proj::O => [h, q_out],
        Proj::Gate | Proj::Up => [i, h],
        Proj::Down => [h, i],
    };
    let (expected, vocab_rows): (Vec<usize>, bool) = match slot {
        Slot::EmbedTokens | Slot::LmHead => (vec![cfg.vocab_size, h], true),
        Slot::Norm | Slot::InputLayernorm(_) | Slot::PostAttentionLayernorm(_) => (vec![h], false),
        Slot::ProjWeight(_, p) => (proj_shape(p).to_vec(), false),
        Slot::ProjBias(_, p) => (vec![proj_shape(p)[0]], false),
    };
    let fits = if vocab_rows {
        shape.len() == 2 && shape[1] == expected[1] && shape[0] >= expected[0]
    } else {
        shape == expected.as_slice()
    };
    if fits {
        Ok(())
    } else {
        Err(CodecError::DeltaShape {
            delta: delta.path().to_owned(),
            tensor: name.to_owned(),
            delta_shape: shape.to_vec(),
            base_shape: expected,
            base_dir: base.dir().to_owned(),
        })
    }
}

/// A full entry's values as an f32 CPU tensor.
fn full_tensor(delta: &DeltaFile, name: &str, entry: &TensorEntry) -> Result<Tensor> {
    let TensorEntry::Full { tensor, .. } = entry else {
        unreachable!("called for full entries only. This is a bug.")
    };
    let (bytes, dtype, shape) = delta.tensor_bytes(tensor)?;
    let float =
        FloatDtype::from_safetensors(dtype).ok_or_else(|| CodecError::UnsupportedDtype {
            tensor: name.to_owned(),
            dir: delta.path().to_owned(),
            dtype: dtype.to_string(),
        })?;
    Ok(Tensor::from_vec(float.decode(bytes), shape, &Device::Cpu)?)
}

/// A base tensor as an f32 CPU tensor.
fn base_tensor(base: &Checkpoint, name: &str) -> Result<Tensor> {
    Ok(base.load_any(name, DType::F32, &Device::Cpu)?)
}
