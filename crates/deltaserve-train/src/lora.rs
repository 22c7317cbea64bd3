//! An adapter on every attention and MLP projection of a frozen base, as trainable [`Var`]s:
//! initialisation (fresh, or from a `lowrank` delta such as LQ-LoRA's `L1·L2`), the tenant the
//! forward pass takes, and the adapter written out as a delta file in the `lowrank` coded-entry
//! convention (docs/FORMAT.md), so `generate --delta`, `eval`, `merge` and the server load it like
//! any other delta.
//!
//! Parameters are kept in f32 (f64 for an f64 model) whatever the model's dtype and cast in the
//! forward, as the calibration student does, so small AdamW updates are not lost to bf16 rounding.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use deltaserve_format::{
    fingerprint_safetensors, CodedPart, DeltaFile, DeltaHeader, Dtype, FinetuneInfo, FullValue,
    OwnedTensor, TensorEntry,
};
use deltaserve_model::{Checkpoint, LayerDelta, LinearDelta, Model, Proj, TenantWeights};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::adapters::{proj_shape, AdapterKind, AdapterSpec, IdentityCache};
use crate::error::{Result, TrainError};
use crate::student::candle_dtype;
use crate::student::{param_dtype, tensor_le_bytes};

/// The codec name of the entries an adapter is written as.
pub const LOWRANK_CODEC: &str = "lowrank";

/// One projection's adapter.
#[derive(Debug)]
pub struct ProjAdapter {
    /// Checkpoint name of the adapted weight, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: String,
    /// Decoder layer.
    pub layer: usize,
    /// Which projection.
    pub proj: Proj,
    /// The weight's `(out, in)`.
    pub shape: (usize, usize),
    /// The trainable tensors, in the order of [`AdapterSpec::param_shapes`].
    pub params: Vec<Var>,
}

/// Adapters on every projection of a model.
#[derive(Debug)]
pub struct AdapterSet {
    /// The variant and its settings.
    pub spec: AdapterSpec,
    /// One per projection, layer by layer in [`Proj::ALL`] order.
    pub adapters: Vec<ProjAdapter>,
    layers: usize,
    model_dtype: DType,
    identities: IdentityCache,
}

impl AdapterSet {
    /// Fresh adapters for every projection of `model`: LoRA's `A` (and Q-BaRA's) Kaiming-uniform
    /// with `a = √5` as PEFT does (`U(−1/√fan_in, 1/√fan_in)`), `B` zero; QA-HiRA's `M` zero
    /// (see [`crate::adapters`]). Drawn on the host from `seed`, so runs are reproducible on any
    /// device.
    pub fn new(model: &Model, spec: AdapterSpec, seed: u64) -> Result<Self> {
        let cfg = model.config();
        let device = model.device();
        let pdt = param_dtype(model.dtype());
        let mut rng = StdRng::seed_from_u64(seed);
        let mut adapters = Vec::new();
        for layer in 0..cfg.num_hidden_layers {
            for proj in Proj::ALL {
                let (out, inp) = proj_shape(cfg, proj);
                let name = format!("model.layers.{layer}.{}.weight", proj.module());
                spec.check(&name, out, inp)?;
                let shapes = spec.param_shapes(out, inp);
                let mut params = Vec::with_capacity(shapes.len());
                for (k, &(r, c)) in shapes.iter().enumerate() {
                    let random = k == 0 && spec.kind != AdapterKind::Qahira;
                    let v: Vec<f32> = if random {
                        let bound = 1.0 / (c as f32).sqrt();
                        (0..r * c).map(|_| rng.gen_range(-bound..bound)).collect()
                    } else {
                        vec![0f32; r * c]
                    };
                    let t = Tensor::from_vec(v, (r, c), &Device::Cpu)?
                        .to_dtype(pdt)?
                        .to_device(device)?;
                    params.push(Var::from_tensor(&t)?);
                }
                adapters.push(ProjAdapter {
                    name,
                    layer,
                    proj,
                    shape: (out, inp),
                    params,
                });
            }
        }
        Ok(Self {
            spec,
            adapters,
            layers: cfg.num_hidden_layers,
            model_dtype: model.dtype(),
            identities: IdentityCache::default(),
        })
    }

    /// LoRA adapters that start from a `lowrank` delta (`ΔW = up · down`, e.g. LQ-LoRA's initial
    /// `L1·L2` from `deltaserve decompose`): `A = down`, `B = up / s`, so the starting delta is
    /// exactly the file's. Projections the file does not cover start fresh. The delta must have
    /// been made against `base` (fingerprint) and its ranks must equal `spec.rank`.
    pub fn from_init_delta(
        model: &Model,
        spec: AdapterSpec,
        seed: u64,
        file: &DeltaFile,
        base: &Checkpoint,
    ) -> Result<Self> {
        let bad = |msg: String| TrainError::BadDelta {
            path: file.path().to_path_buf(),
            msg,
        };
        if spec.kind != AdapterKind::Lora {
            return Err(TrainError::Setting(format!(
                "--init works with --adapter lora only (got --adapter {}): a lowrank delta has no \
                 pooled/block structure to start {} from",
                spec.kind, spec.kind
            )));
        }
        let fp = fingerprint_safetensors(&base.weight_files())?;
        file.check_base(&fp, base.dir())?;
        let mut set = Self::new(model, spec, seed)?;
        let pdt = param_dtype(model.dtype());
        let mut used = 0usize;
        for (name, entry) in &file.header().tensors {
            let TensorEntry::Coded { codec, .. } = entry else {
                continue;
            };
            if codec != LOWRANK_CODEC {
                return Err(bad(format!(
                    "entry `{name}` uses codec `{codec}`; --init needs `{LOWRANK_CODEC}` entries"
                )));
            }
            let a = set
                .adapters
                .iter_mut()
                .find(|a| &a.name == name)
                .ok_or_else(|| {
                    bad(format!(
                        "entry `{name}` is not a projection weight of this model"
                    ))
                })?;
            let load = |role: &str| -> Result<Tensor> {
                let (bytes, dt, shape) = file.part(entry, role)?;
                let cdt = candle_dtype(dt)
                    .ok_or_else(|| bad(format!("entry `{name}` part `{role}` has dtype {dt}")))?;
                Ok(Tensor::from_raw_buffer(bytes, cdt, shape, &Device::Cpu)?.to_dtype(pdt)?)
            };
            let (down, up) = (load("down")?, load("up")?);
            let (r, cols) = down.dims2()?;
            let (rows, r2) = up.dims2()?;
            if (rows, cols) != a.shape || r != r2 {
                return Err(bad(format!(
                    "entry `{name}`: down [{r}, {cols}] and up [{rows}, {r2}] do not make the \
                     weight's [{}, {}]",
                    a.shape.0, a.shape.1
                )));
            }
            if r != spec.rank {
                return Err(TrainError::Setting(format!(
                    "--init {}: entry `{name}` has rank {r}; pass --rank {r}",
                    file.path().display()
                )));
            }
            let device = model.device();
            a.params[0].set(&down.to_device(device)?)?;
            a.params[1].set(&(up / spec.scaling())?.to_device(device)?)?;
            used += 1;
        }
        if used == 0 {
            return Err(bad(format!(
                "has no `{LOWRANK_CODEC}` entries to start from"
            )));
        }
        Ok(set)
    }

    /// The `Var`s the optimizer updates, in a fixed order (adapter by adapter).
    pub fn vars(&self) -> Vec<Var> {
        self.adapters
            .iter()
            .flat_map(|a| a.params.iter().cloned())
            .collect()
    }

    /// A stable name for every trainable tensor, in [`AdapterSet::vars`] order:
    /// `{weight}.adapter.{k}`.
    pub fn var_names(&self) -> Vec<String> {
        self.adapters
            .iter()
            .flat_map(|a| (0..a.params.len()).map(move |k| format!("{}.adapter.{k}", a.name)))
            .collect()
    }

    /// Trainable parameters in all.
    pub fn param_count(&self) -> usize {
        self.adapters
            .iter()
            .map(|a| self.spec.param_count(a.shape.0, a.shape.1))
            .sum()
    }

    /// One adapter's `(down, up)` in the parameter dtype (QA-HiRA's constant `up` in the model's
    /// dtype, from a cache); with `track` built from the `Var`s themselves, so autograd reaches
    /// them.
    pub fn down_up(&self, a: &ProjAdapter, track: bool) -> Result<(Tensor, Tensor)> {
        let params: Vec<Tensor> = a
            .params
            .iter()
            .map(|v| {
                if track {
                    v.as_tensor().clone()
                } else {
                    v.as_tensor().detach()
                }
            })
            .collect();
        self.spec
            .down_up_with(&params, a.shape.0, &self.identities, Some(self.model_dtype))
    }

    /// The tenant for a forward pass: every projection gets `LinearDelta::LowRank`.
    pub fn tenant(&self, track: bool) -> Result<TenantWeights> {
        let mut t = TenantWeights {
            layers: vec![LayerDelta::default(); self.layers],
            ..Default::default()
        };
        for a in &self.adapters {
            let (down, up) = self.down_up(a, track)?;
            t.layers[a.layer].linears[a.proj.index()] = Some(LinearDelta::LowRank {
                down: down.to_dtype(self.model_dtype)?,
                up: up.to_dtype(self.model_dtype)?,
            });
        }
        Ok(t)
    }

    /// The tenant of decoder layer `layer` alone (the other layers carry no delta): what a
    /// gradient-checkpointed pass builds per layer, so only that layer's factors are cast to the
    /// model dtype and, with `track`, only they are in the layer's graph.
    pub fn layer_tenant(&self, layer: usize, track: bool) -> Result<TenantWeights> {
        let mut t = TenantWeights {
            layers: vec![LayerDelta::default(); self.layers],
            ..Default::default()
        };
        for a in self.adapters.iter().filter(|a| a.layer == layer) {
            let (down, up) = self.down_up(a, track)?;
            t.layers[layer].linears[a.proj.index()] = Some(LinearDelta::LowRank {
                down: down.to_dtype(self.model_dtype)?,
                up: up.to_dtype(self.model_dtype)?,
            });
        }
        Ok(t)
    }

    /// The first trainable value that is not finite, as (tensor name, value).
    pub fn first_non_finite(&self) -> Result<Option<(String, f64)>> {
        for (name, v) in self.var_names().into_iter().zip(self.vars()) {
            let flat = v.as_tensor().to_dtype(DType::F64)?.flatten_all()?;
            if let Some(x) = flat.to_vec1::<f64>()?.into_iter().find(|x| !x.is_finite()) {
                return Ok(Some((name, x)));
            }
        }
        Ok(None)
    }

    /// Writes the adapter as a delta against `base`: one `lowrank` coded entry per projection
    /// (`down`/`up` in F32, `ΔW = up · down` with the scaling folded into `up`), the base's
    /// fingerprint, and `finetune` (how it was trained) in the header's `extra`. Atomic; `out`
    /// is replaced only with `overwrite`.
    pub fn write_delta(
        &self,
        base: &Checkpoint,
        out: &Path,
        finetune: serde_json::Value,
        overwrite: bool,
    ) -> Result<()> {
        let fp = fingerprint_safetensors(&base.weight_files())?;
        let info = FinetuneInfo {
            config: Some(base.config_json().clone()),
            ..FinetuneInfo::default()
        };
        let mut header = DeltaHeader::new(format!("finetune-{}", self.spec.kind), fp, info);
        header.created_by = format!("deltaserve {}", env!("CARGO_PKG_VERSION"));
        header.extra.insert("finetune".into(), finetune);
        let mut tensors = Vec::with_capacity(2 * self.adapters.len());
        for a in &self.adapters {
            let (down, up) = self.down_up(a, false)?;
            let (down, up) = (down.to_device(&Device::Cpu)?, up.to_device(&Device::Cpu)?);
            let rank = down.dim(0)?;
            let (out_f, in_f) = a.shape;
            let base_dtype = base.raw(&a.name)?.dtype;
            let mut parts = BTreeMap::new();
            for (role, t, shape) in [
                ("down", &down, vec![rank, in_f]),
                ("up", &up, vec![out_f, rank]),
            ] {
                let tensor = format!("{}.{role}", a.name);
                parts.insert(
                    role.to_string(),
                    CodedPart {
                        tensor: tensor.clone(),
                        dtype: Dtype::F32.to_string(),
                        shape: shape.clone(),
                    },
                );
                tensors.push((
                    tensor,
                    OwnedTensor::new(Dtype::F32, shape, tensor_le_bytes(t, Dtype::F32)?),
                ));
            }
            let mut params = BTreeMap::new();
            params.insert("rank".into(), json!(rank));
            params.insert("adapter".into(), json!(self.spec.kind));
            params.insert("alpha".into(), json!(self.spec.alpha));
            params.insert("nominal_rank".into(), json!(self.spec.rank));
            match self.spec.kind {
                AdapterKind::Lora => {}
                AdapterKind::Qbara => {
                    params.insert("pool".into(), json!(self.spec.qbara_factor));
                }
                AdapterKind::Qahira => {
                    params.insert(
                        "block".into(),
                        json!([self.spec.hira_out_group, self.spec.hira_in_group]),
                    );
                }
            }
            header.tensors.insert(
                a.name.clone(),
                TensorEntry::Coded {
                    codec: LOWRANK_CODEC.into(),
                    shape: [out_f, in_f],
                    dtype: base_dtype.to_string(),
                    value: FullValue::Difference,
                    parts,
                    params,
                },
            );
        }
        deltaserve_format::write_delta(out, &header, tensors, overwrite)?;
        Ok(())
    }
}
