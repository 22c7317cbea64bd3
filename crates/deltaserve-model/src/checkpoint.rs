//! A Hugging Face model directory on disk: `config.json` plus `model.safetensors` or shards
//! listed in `model.safetensors.index.json`, memory-mapped.
//!
//! Tensors are read lazily and by name, so tools that stream a checkpoint (compression, merging,
//! fingerprinting) never hold more than the tensor they work on.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::Metadata;
use safetensors::Dtype;

use crate::config::{ModelConfig, RawConfig};
use crate::error::{ModelError, Result};

/// One memory-mapped safetensors file with its parsed header.
struct ShardFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    metadata: Metadata,
}

/// A tensor's bytes as stored, with its dtype and shape.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    /// Stored dtype.
    pub dtype: Dtype,
    /// Stored shape.
    pub shape: &'a [usize],
    /// Little-endian bytes.
    pub data: &'a [u8],
}

/// An opened Hugging Face checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    raw_config: RawConfig,
    config_json: serde_json::Value,
    config: ModelConfig,
    shards: Vec<ShardFile>,
    /// tensor name -> index into `shards`.
    index: HashMap<String, usize>,
}

fn open_shard(path: &Path) -> Result<ShardFile> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile {
                path: path.to_path_buf(),
                what: "model weights",
                hint: "the checkpoint is incomplete; download or copy the file again",
            }
        } else {
            ModelError::BadFile {
                path: path.to_path_buf(),
                msg: e.to_string(),
            }
        }
    })?;
    // SAFETY: the file is opened read-only; like every mmap-based loader (candle, safetensors) we
    // assume no other process truncates it while we run.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::BadFile {
        path: path.to_path_buf(),
        msg: format!("cannot memory-map: {e}"),
    })?;
    let (header_len, metadata) =
        safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::BadFile {
            path: path.to_path_buf(),
            msg: format!("truncated or corrupt safetensors file ({e}); re-download or re-save it"),
        })?;
    Ok(ShardFile {
        path: path.to_path_buf(),
        mmap,
        data_start: 8 + header_len,
        metadata,
    })
}

/// Resolves `--model`: a directory, or a Hub id looked up in the local Hugging Face cache.
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.is_dir() {
        return Ok(p);
    }
    let looks_like_hub_id =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/');
    if looks_like_hub_id {
        let cache = hf_hub::Cache::from_env();
        if let Some(cfg) = cache.model(spec.to_string()).get("config.json") {
            if let Some(dir) = cfg.parent() {
                return Ok(dir.to_path_buf());
            }
        }
        return Err(ModelError::MissingFile {
            path: cache
                .path()
                .join(format!("models--{}", spec.replace('/', "--"))),
            what: "Hugging Face cache entry",
            hint: "this machine is offline and the model is not in the local Hugging Face cache; \
                   download it elsewhere (huggingface-cli download) or pass a local directory",
        });
    }
    Err(ModelError::MissingFile {
        path: p,
        what: "model directory",
        hint: "pass a Hugging Face model directory (with config.json and *.safetensors) or a Hub id org/name",
    })
}

impl Checkpoint {
    /// Opens a model directory: parses `config.json`, maps every weight file and indexes tensors.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(ModelError::MissingFile {
                path: dir,
                what: "model directory",
                hint: "pass a Hugging Face model directory (with config.json and *.safetensors)",
            });
        }
        let config_path = dir.join("config.json");
        let raw_config = RawConfig::from_file(&config_path)?;
        let config = raw_config.resolve(&config_path)?;
        let config_json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).map_err(|e| {
                ModelError::BadFile {
                    path: config_path.clone(),
                    msg: e.to_string(),
                }
            })?)
            .map_err(|e| ModelError::BadFile {
                path: config_path.clone(),
                msg: e.to_string(),
            })?;

        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index_path.exists() {
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::BadFile {
                path: index_path.clone(),
                msg: e.to_string(),
            })?;
            let idx: Index = serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
                path: index_path.clone(),
                msg: format!("not a valid safetensors index: {e}"),
            })?;
            let mut names: Vec<String> = idx.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::MissingFile {
                path: single,
                what: "model weights",
                hint: "expected model.safetensors or model.safetensors.index.json with its shards",
            });
        };
        let shards = files
            .iter()
            .map(|f| open_shard(f))
            .collect::<Result<Vec<_>>>()?;
        let mut index = HashMap::new();
        for (i, s) in shards.iter().enumerate() {
            for name in s.metadata.tensors().keys() {
                index.insert(name.clone(), i);
            }
        }
        Ok(Self {
            dir,
            raw_config,
            config_json,
            config,
            shards,
            index,
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// `config.json` as parsed from disk.
    pub fn raw_config(&self) -> &RawConfig {
        &self.raw_config
    }

    /// `config.json` as a JSON value (stored verbatim in deltas and merged checkpoints).
    pub fn config_json(&self) -> &serde_json::Value {
        &self.config_json
    }

    /// The weight files, in index order.
    pub fn weight_files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// All tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(|s| s.as_str()).collect();
        v.sort_unstable();
        v
    }

    /// Whether the checkpoint holds this tensor.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The stored bytes of a tensor.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let shard = self
            .index
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })?;
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })?;
        let (start, end) = info.data_offsets;
        let data = shard
            .mmap
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| ModelError::BadFile {
                path: shard.path.clone(),
                msg: format!("tensor `{name}` lies past the end of the file"),
            })?;
        Ok(RawTensor {
            dtype: info.dtype,
            shape: &info.shape,
            data,
        })
    }

    /// Loads a floating-point tensor, checks its shape, converts it to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let raw = self.raw(name)?;
        if raw.shape != shape {
            return Err(ModelError::BadTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
                msg: format!(
                    "shape {:?} in the file, {:?} expected from config.json",
                    raw.shape, shape
                ),
            });
        }
        self.to_tensor(name, raw, dtype, device)
    }

    /// Loads a floating-point tensor whatever its shape, converted to `dtype` on `device`.
    pub fn load_any(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let raw = self.raw(name)?;
        self.to_tensor(name, raw, dtype, device)
    }

    fn to_tensor(
        &self,
        name: &str,
        raw: RawTensor<'_>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let stored = match raw.dtype {
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            Dtype::F32 => DType::F32,
            other => {
                return Err(ModelError::BadTensor {
                    name: name.to_string(),
                    dir: self.dir.clone(),
                    msg: format!("dtype {other:?} in the file; weights must be BF16, F16 or F32"),
                })
            }
        };
        let t = Tensor::from_raw_buffer(raw.data, stored, raw.shape, &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}
