//! The student: a delta file's contents as trainable [`Var`]s, turned into the
//! [`TenantWeights`] the model's packed-delta forward takes, and written back as a delta.
//!
//! Every compressed matrix keeps its packed signs and gets one scale `Var` (BitDelta's `coeff`),
//! initialised from the file. Tensors the delta stores in full (embeddings, norms, `lm_head`)
//! become `Var`s too, trained only when asked (`--train-uncompressed`: the reference's AdamW gets
//! every `parameters()` of the compressed model, so it tunes them as well). Biases are never
//! trained: the reference's `BinaryDiff` drops them, and we keep the fine-tune's values instead.
//!
//! Parameters are kept in f32 (f64 for an f64 model) whatever the model's dtype, and cast to it
//! in the forward; so small AdamW updates are not lost to bf16 rounding, while the output file
//! stores each tensor in its original dtype.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use deltaserve_format::{DeltaFile, Dtype, FullValue, TensorEntry, TensorSpec};
use deltaserve_kernels::SignBits;
use deltaserve_model::{Checkpoint, LayerDelta, LinearDelta, Model, Proj, TenantWeights};
use half::{bf16, f16};

use crate::error::{Result, TrainError};

/// Where a tensor stored in full goes in [`TenantWeights`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullSlot {
    /// `model.embed_tokens.weight`
    EmbedTokens,
    /// `model.norm.weight`
    Norm,
    /// `lm_head.weight`
    LmHead,
    /// `model.layers.{l}.input_layernorm.weight`
    InputLayernorm(usize),
    /// `model.layers.{l}.post_attention_layernorm.weight`
    PostAttentionLayernorm(usize),
    /// `model.layers.{l}.{proj}.bias`
    Bias(usize, Proj),
    /// `model.layers.{l}.{proj}.weight` stored in full (applied as a dense difference).
    Linear(usize, Proj),
}

impl FullSlot {
    /// Parses a checkpoint tensor name.
    pub fn of(name: &str) -> Option<FullSlot> {
        match name {
            "model.embed_tokens.weight" => return Some(Self::EmbedTokens),
            "model.norm.weight" => return Some(Self::Norm),
            "lm_head.weight" => return Some(Self::LmHead),
            _ => {}
        }
        if let Some((l, p, bias)) = Proj::parse_tensor_name(name) {
            return Some(if bias {
                Self::Bias(l, p)
            } else {
                Self::Linear(l, p)
            });
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (l, rest) = rest.split_once('.')?;
        let l = l.parse().ok()?;
        match rest {
            "input_layernorm.weight" => Some(Self::InputLayernorm(l)),
            "post_attention_layernorm.weight" => Some(Self::PostAttentionLayernorm(l)),
            _ => None,
        }
    }

    /// Whether `--train-uncompressed` trains this tensor: embeddings, norms and `lm_head`.
    /// Biases stay the fine-tune's; a projection stored in full stays as stored.
    pub fn trainable(self) -> bool {
        !matches!(self, Self::Bias(..) | Self::Linear(..))
    }

    fn layer(self) -> Option<usize> {
        match self {
            Self::InputLayernorm(l)
            | Self::PostAttentionLayernorm(l)
            | Self::Bias(l, _)
            | Self::Linear(l, _) => Some(l),
            _ => None,
        }
    }
}

/// One compressed matrix: its packed signs and trainable scale.
#[derive(Debug)]
pub struct ScaleParam {
    /// Checkpoint name of the weight, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: String,
    /// Decoder layer.
    pub layer: usize,
    /// Which projection.
    pub proj: Proj,
    /// The packed signs, on the model's device.
    pub bits: SignBits,
    /// The scale, shape (1,).
    pub var: Var,
    /// The scale read from the file.
    pub initial: f32,
}

/// One tensor stored in full.
#[derive(Debug)]
pub struct FullParam {
    /// Checkpoint name.
    pub name: String,
    /// Where it goes.
    pub slot: FullSlot,
    /// The fine-tune's value (base + difference for `difference` entries), in the parameter dtype.
    pub var: Var,
    /// Whether it is trained.
    pub trained: bool,
    /// The container dtype it is written back in.
    pub stored: Dtype,
    /// `difference` entries are written back as value − base.
    pub value: FullValue,
}

/// A delta as trainable parameters.
#[derive(Debug)]
pub struct TrainableDelta {
    /// One per compressed matrix, in header (name) order.
    pub scales: Vec<ScaleParam>,
    /// One per tensor stored in full, in header order (projections stored in full excepted).
    pub full: Vec<FullParam>,
    /// Projections stored in full, as fixed dense differences `W_ft − W_base` in the model's dtype.
    dense: Vec<(usize, Proj, Tensor)>,
    layers: usize,
    model_dtype: DType,
}

/// The dtype parameters are kept in for a model in `dtype`.
pub fn param_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The candle dtype of a stored safetensors dtype, for the float types a trained tensor can have.
pub(crate) fn candle_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

/// A tensor's values as little-endian bytes of `dtype`.
pub fn tensor_le_bytes(t: &Tensor, dtype: Dtype) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match dtype {
        Dtype::F32 => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        Dtype::F64 => flat
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        Dtype::BF16 => flat
            .to_dtype(DType::BF16)?
            .to_vec1::<bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        Dtype::F16 => flat
            .to_dtype(DType::F16)?
            .to_vec1::<f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => {
            return Err(candle_core::Error::Msg(format!(
                "cannot store a trained tensor as {other}"
            ))
            .into())
        }
    })
}

impl TrainableDelta {
    /// Reads every entry of `file` onto `model`'s device. `base` is the checkpoint `model` was
    /// loaded from (for `difference` entries); `train_uncompressed` makes embeddings, norms and
    /// `lm_head` trainable.
    pub fn from_delta(
        file: &DeltaFile,
        base: &Checkpoint,
        model: &Model,
        train_uncompressed: bool,
    ) -> Result<Self> {
        let device = model.device();
        let pdt = param_dtype(model.dtype());
        let layers = model.config().num_hidden_layers;
        let bad = |msg: String| TrainError::BadDelta {
            path: file.path().to_path_buf(),
            msg,
        };
        let mut scales = Vec::new();
        let mut full = Vec::new();
        let mut dense = Vec::new();
        for (name, entry) in &file.header().tensors {
            match entry {
                TensorEntry::Sign { shape: [n, k], .. } => {
                    let (layer, proj) = match Proj::parse_tensor_name(name) {
                        Some((l, p, false)) if l < layers => (l, p),
                        _ => {
                            return Err(bad(format!(
                                "sign entry `{name}` is not a projection weight of this {layers}-layer model"
                            )))
                        }
                    };
                    let bits = SignBits::from_words(file.sign_words(entry)?, *n, *k, device)?;
                    let initial = file.scale(entry)?;
                    let var = Var::from_tensor(&Tensor::new(&[initial], device)?.to_dtype(pdt)?)?;
                    scales.push(ScaleParam {
                        name: name.clone(),
                        layer,
                        proj,
                        bits,
                        var,
                        initial,
                    });
                }
                TensorEntry::Full { tensor, value, .. } => {
                    let slot = FullSlot::of(name)
                        .filter(|s| s.layer().is_none_or(|l| l < layers))
                        .ok_or_else(|| {
                            bad(format!(
                                "full entry `{name}` is not a tensor of this {layers}-layer model"
                            ))
                        })?;
                    let (bytes, stored, shape) = file.tensor_bytes(tensor)?;
                    let dt = candle_dtype(stored).ok_or_else(|| {
                        bad(format!(
                            "full entry `{name}` has dtype {stored}; expected a float type"
                        ))
                    })?;
                    let mut t =
                        Tensor::from_raw_buffer(bytes, dt, shape, &Device::Cpu)?.to_dtype(pdt)?;
                    if *value == FullValue::Difference {
                        t = (t + base.load_any(name, pdt, &Device::Cpu)?)?;
                    }
                    let t = t.to_device(device)?;
                    if let FullSlot::Linear(l, p) = slot {
                        let w = &model.layers[l].linears[p.index()].weight;
                        dense.push((l, p, (t.to_dtype(model.dtype())? - w)?));
                        continue;
                    }
                    let var = Var::from_tensor(&t)?;
                    let trained = train_uncompressed && slot.trainable();
                    full.push(FullParam {
                        name: name.clone(),
                        slot,
                        var,
                        trained,
                        stored,
                        value: *value,
                    });
                }
                other => {
                    return Err(bad(format!(
                        "entry `{name}` of kind `{}` cannot be calibrated",
                        other.kind()
                    )))
                }
            }
        }
        if scales.is_empty() {
            return Err(bad(
                "has no compressed (sign) matrices, so there are no scales to calibrate".into(),
            ));
        }
        Ok(Self {
            scales,
            full,
            dense,
            layers,
            model_dtype: model.dtype(),
        })
    }

    /// The `Var`s the optimizer updates: every scale, and the trained full tensors.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let mut v: Vec<Var> = self.scales.iter().map(|s| s.var.clone()).collect();
        v.extend(
            self.full
                .iter()
                .filter(|f| f.trained)
                .map(|f| f.var.clone()),
        );
        v
    }

    /// The tenant for a forward pass. With `track`, tensors are the `Var`s themselves (or casts of
    /// them), so the loss's gradient reaches them; without, they are detached copies (evaluation).
    pub fn tenant(&self, track: bool) -> Result<TenantWeights> {
        let pick = |v: &Var| {
            if track {
                v.as_tensor().clone()
            } else {
                v.as_tensor().detach()
            }
        };
        let mut t = TenantWeights {
            layers: vec![LayerDelta::default(); self.layers],
            ..Default::default()
        };
        for s in &self.scales {
            t.layers[s.layer].linears[s.proj.index()] = Some(LinearDelta::Sign {
                bits: s.bits.clone(),
                scale: pick(&s.var),
            });
        }
        for f in &self.full {
            let v = pick(&f.var).to_dtype(self.model_dtype)?;
            match f.slot {
                FullSlot::EmbedTokens => t.embed_tokens = Some(v),
                FullSlot::Norm => t.norm = Some(v),
                FullSlot::LmHead => t.lm_head = Some(v),
                FullSlot::InputLayernorm(l) => t.layers[l].input_layernorm = Some(v),
                FullSlot::PostAttentionLayernorm(l) => {
                    t.layers[l].post_attention_layernorm = Some(v)
                }
                FullSlot::Bias(l, p) => t.layers[l].biases[p.index()] = Some(v),
                FullSlot::Linear(..) => {}
            }
        }
        for (l, p, diff) in &self.dense {
            t.layers[*l].linears[p.index()] = Some(LinearDelta::Dense { diff: diff.clone() });
        }
        Ok(t)
    }

    /// Rounds every trained full tensor to the dtype it will be stored in, so that what is
    /// evaluated after training is exactly what is written.
    pub fn round_to_stored(&self) -> Result<()> {
        for f in self.full.iter().filter(|f| f.trained) {
            let t = f.var.as_tensor();
            match candle_dtype(f.stored) {
                Some(dt) if dt != t.dtype() => f.var.set(&t.to_dtype(dt)?.to_dtype(t.dtype())?)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// The first non-finite value among the trained parameters, as (name, value).
    pub fn first_non_finite(&self) -> Result<Option<(String, f64)>> {
        for s in &self.scales {
            let v = s
                .var
                .as_tensor()
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?[0];
            if !v.is_finite() {
                return Ok(Some((s.name.clone(), v)));
            }
        }
        for f in self.full.iter().filter(|f| f.trained) {
            let sum = f
                .var
                .as_tensor()
                .to_dtype(DType::F64)?
                .abs()?
                .sum_all()?
                .to_scalar::<f64>()?;
            if !sum.is_finite() {
                return Ok(Some((f.name.clone(), sum)));
            }
        }
        Ok(None)
    }

    /// Each scale's (name, value in the file, value now).
    pub fn scale_values(&self) -> Result<Vec<(String, f32, f32)>> {
        self.scales
            .iter()
            .map(|s| {
                let now = s
                    .var
                    .as_tensor()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?[0];
                Ok((s.name.clone(), s.initial, now))
            })
            .collect()
    }

    /// Writes the calibrated delta to `out`: the input's signs and untrained tensors byte for byte,
    /// the new scales, the trained full tensors in their original dtype, and `input`'s header with
    /// `calibration` set. Atomic (temporary file + rename); `out` is replaced only with `overwrite`.
    pub fn write(
        &self,
        input: &DeltaFile,
        base: &Checkpoint,
        out: &Path,
        calibration: serde_json::Value,
        overwrite: bool,
    ) -> Result<()> {
        let mut header = input.header().clone();
        header.calibration = Some(calibration);
        let mut replaced: std::collections::HashMap<String, Vec<u8>> =
            std::collections::HashMap::new();
        for s in &self.scales {
            if let TensorEntry::Sign { scale, .. } = input.entry(&s.name)? {
                let v = s
                    .var
                    .as_tensor()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?[0];
                replaced.insert(scale.clone(), v.to_le_bytes().to_vec());
            }
        }
        for f in self.full.iter().filter(|f| f.trained) {
            if let TensorEntry::Full { tensor, .. } = input.entry(&f.name)? {
                let mut t = f.var.as_tensor().to_device(&Device::Cpu)?;
                if f.value == FullValue::Difference {
                    t = (t.to_dtype(DType::F64)?
                        - base.load_any(&f.name, DType::F64, &Device::Cpu)?)?;
                }
                replaced.insert(tensor.clone(), tensor_le_bytes(&t, f.stored)?);
            }
        }
        let names = input.container_tensor_names();
        let mut specs = Vec::with_capacity(names.len());
        for name in &names {
            let (_, dtype, shape) = input.tensor_bytes(name)?;
            specs.push(TensorSpec {
                name: name.clone(),
                dtype,
                shape: shape.to_vec(),
            });
        }
        let writer = deltaserve_format::DeltaStreamWriter::create(out, &header, specs, overwrite)?;
        for name in &names {
            match replaced.get(name) {
                Some(bytes) => writer.write_tensor(name, bytes)?,
                None => writer.write_tensor(name, input.tensor_bytes(name)?.0)?,
            }
        }
        writer.finish(&header)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_slots_parse_checkpoint_names() {
        assert_eq!(
            FullSlot::of("model.embed_tokens.weight"),
            Some(FullSlot::EmbedTokens)
        );
        assert_eq!(FullSlot::of("lm_head.weight"), Some(FullSlot::LmHead));
        assert_eq!(
            FullSlot::of("model.layers.3.input_layernorm.weight"),
            Some(FullSlot::InputLayernorm(3))
        );
        assert_eq!(
            FullSlot::of("model.layers.0.post_attention_layernorm.weight"),
            Some(FullSlot::PostAttentionLayernorm(0))
        );
        assert_eq!(
            FullSlot::of("model.layers.1.self_attn.q_proj.bias"),
            Some(FullSlot::Bias(1, Proj::Q))
        );
        assert_eq!(
            FullSlot::of("model.layers.1.mlp.down_proj.weight"),
            Some(FullSlot::Linear(1, Proj::Down))
        );
        assert_eq!(
            FullSlot::of("model.layers.1.self_attn.rotary_emb.inv_freq"),
            None
        );
        assert!(!FullSlot::Bias(0, Proj::Q).trainable());
        assert!(FullSlot::Norm.trainable());
    }
}
