//! The base model and the tenants served on it: registering a delta file as a tenant (checking it
//! was made from this base, picking its tokenizer and chat template) and loading its weights.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{DType, Device, Tensor};
use deltaserve_format::{fingerprint_safetensors, BaseFingerprint, DeltaFile, TensorEntry};
use deltaserve_model::{Checkpoint, LinearDelta, Model, TenantWeights, TextCodec};

use crate::delta_cache::TenantId;
use crate::error::EngineError;

/// The one base model a server holds, with what its tenants are checked against.
pub struct Base {
    /// The name it is served under (its directory's name).
    pub name: String,
    /// The opened checkpoint (tenant loading reads base tensors from it).
    pub checkpoint: Arc<Checkpoint>,
    /// The loaded weights.
    pub model: Model,
    /// Tokenizer, chat template and stop tokens.
    pub codec: Arc<TextCodec>,
    /// Fingerprint of the checkpoint's weights; a delta must carry the same.
    pub fingerprint: BaseFingerprint,
}

impl Base {
    /// Opens `dir`, loads the model in `dtype` on `device`, reads its tokenizer and fingerprints
    /// its weights.
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<Base> {
        use anyhow::Context;
        let checkpoint = Checkpoint::open(dir)?;
        let model = Model::load(&checkpoint, dtype, device)
            .with_context(|| format!("loading {}", dir.display()))?;
        let codec = TextCodec::from_dir(dir, &model.config().eos_token_ids)?;
        let fingerprint = fingerprint_safetensors(&checkpoint.weight_files())
            .with_context(|| format!("fingerprinting the weights of {}", dir.display()))?;
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "base".to_string());
        Ok(Base {
            name,
            checkpoint: Arc::new(checkpoint),
            model,
            codec: Arc::new(codec),
            fingerprint,
        })
    }

    /// The context length in tokens.
    pub fn context_len(&self) -> usize {
        self.model.config().max_position_embeddings
    }
}

/// A served fine-tune: a delta file registered under a name.
pub struct Tenant {
    /// Unique per registration.
    pub id: TenantId,
    /// The name clients address it by.
    pub name: String,
    /// Its delta file.
    pub path: PathBuf,
    /// Its tokenizer and chat template: the fine-tune's own when the delta carries them, else the base's.
    pub codec: Arc<TextCodec>,
    /// Estimated bytes in memory once loaded (what the delta cache reserves).
    pub estimated_bytes: usize,
    /// Unix time of registration.
    pub created: u64,
    unavailable: OnceLock<String>,
}

impl Tenant {
    /// Why the tenant cannot serve, once a load has failed.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.get().map(String::as_str)
    }

    pub(crate) fn mark_unavailable(&self, reason: String) {
        let _ = self.unavailable.set(reason);
    }
}

/// Unix time now, in seconds.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Opens a delta file as tenant `name` of `base`: reads and checks its header (not its weights,
/// which load on first use), refuses a delta made from another base, and builds its text codec.
pub fn open_tenant(
    id: TenantId,
    name: &str,
    path: &Path,
    base: &Base,
) -> Result<Tenant, EngineError> {
    let fail = |reason: String| EngineError::Registration {
        name: name.to_string(),
        path: path.to_owned(),
        reason,
    };
    let file = DeltaFile::open(path).map_err(|e| fail(e.to_string()))?;
    file.check_base(&base.fingerprint, base.checkpoint.dir())
        .map_err(|e| fail(e.to_string()))?;
    let codec = tenant_codec(&file, base).map_err(|e| fail(format!("its tokenizer: {e}")))?;
    let estimated_bytes = estimate_bytes(&file, base.model.dtype());
    Ok(Tenant {
        id,
        name: name.to_string(),
        path: path.to_owned(),
        codec,
        estimated_bytes,
        created: unix_now(),
        unavailable: OnceLock::new(),
    })
}

/// The fine-tune's text codec: the base's files overlaid with the tokenizer, tokenizer config and
/// chat template the delta header carries (it carries them only where they differ).
fn tenant_codec(file: &DeltaFile, base: &Base) -> anyhow::Result<Arc<TextCodec>> {
    let ft = &file.header().finetuned;
    if ft.tokenizer_json.is_none() && ft.tokenizer_config.is_none() && ft.chat_template.is_none() {
        return Ok(base.codec.clone());
    }
    let dir = tempfile::tempdir()?;
    let base_dir = base.checkpoint.dir();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        if base_dir.join(f).exists() {
            std::fs::copy(base_dir.join(f), dir.path().join(f))?;
        }
    }
    if let Some(t) = &ft.tokenizer_json {
        std::fs::write(dir.path().join("tokenizer.json"), t)?;
    }
    let mut config: serde_json::Value = match &ft.tokenizer_config {
        Some(c) => c.clone(),
        None => std::fs::read_to_string(dir.path().join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| serde_json::json!({})),
    };
    if let (Some(t), Some(obj)) = (&ft.chat_template, config.as_object_mut()) {
        obj.insert("chat_template".into(), t.clone().into());
    }
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string())?;
    let eos = ft
        .config
        .as_ref()
        .map(|c| deltaserve_model::config::token_ids(&c.get("eos_token_id").cloned()))
        .filter(|ids| !ids.is_empty())
        .unwrap_or_else(|| base.model.config().eos_token_ids.clone());
    Ok(Arc::new(TextCodec::from_dir(dir.path(), &eos)?))
}

/// Bytes the tenant will take in memory: packed signs as stored, everything else in the model's dtype.
fn estimate_bytes(file: &DeltaFile, dtype: DType) -> usize {
    file.header()
        .tensors
        .values()
        .map(|e| match e {
            TensorEntry::Sign {
                shape: [rows, cols],
                ..
            } => rows * deltaserve_format::words_per_row(*cols) * 4 + dtype.size_in_bytes(),
            other => other.shape().iter().product::<usize>() * dtype.size_in_bytes(),
        })
        .sum()
}

/// Bytes a loaded tenant holds.
pub fn tenant_bytes(t: &TenantWeights) -> usize {
    let size = |x: &Tensor| x.elem_count() * x.dtype().size_in_bytes();
    let mut n = 0;
    for l in &t.layers {
        for d in l.linears.iter().flatten() {
            n += match d {
                LinearDelta::Sign { bits, scale } => size(bits.words()) + size(scale),
                LinearDelta::Dense { diff } => size(diff),
                LinearDelta::LowRank { down, up } => size(down) + size(up),
            };
        }
        n += l.biases.iter().flatten().map(size).sum::<usize>();
        n += l
            .input_layernorm
            .iter()
            .chain(&l.post_attention_layernorm)
            .map(size)
            .sum::<usize>();
    }
    n + t
        .embed_tokens
        .iter()
        .chain(&t.norm)
        .chain(&t.lm_head)
        .map(size)
        .sum::<usize>()
}

/// Reads a tenant's weights from its delta file (with the codecs crate's loader). Runs off the
/// engine's step loop.
///
/// The file is opened again: it may have changed or broken since registration, and such a
/// failure is reported for this tenant alone.
pub fn load_tenant(tenant: &Tenant, base: &Base) -> Result<TenantWeights, String> {
    let file = DeltaFile::open(&tenant.path).map_err(|e| e.to_string())?;
    deltaserve_codecs::load_tenant(
        &file,
        &base.checkpoint,
        &base.fingerprint,
        base.model.dtype(),
        base.model.device(),
    )
    .map_err(|e| e.to_string())
}
