//! Base + delta → a complete Hugging Face checkpoint directory (the reference's
//! `--save_full_model`): sharded safetensors with an index, the fine-tune's `config.json`, and
//! the tokenizer files.
//!
//! Every tensor is reconstructed as the reference's `load_diff` does (see
//! [`crate::bitdelta::reconstruct_sign`]), a few at a time, and written straight into its shard.
//! The whole directory is written under a temporary sibling name and renamed at the end, so an
//! interrupted merge leaves nothing under the final name.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deltaserve_format::{fingerprint_safetensors, DeltaFile, Dtype, FullValue, TensorEntry};
use deltaserve_model::{Checkpoint, RawTensor};
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo};

use crate::bitdelta::reconstruct_sign;
use crate::error::{CodecError, Result};
use crate::files::{BASE_FILES, CHAT_TEMPLATE_FILE, EXTRA_JSON_FILES};
use crate::numeric::FloatDtype;
use crate::progress::Progress;

/// The default `--max-shard-size`, as transformers' `save_pretrained`.
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 2_000_000_000;

/// What [`merge`] should write.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// The checkpoint directory to create.
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub force: bool,
    /// Largest shard in bytes; a tensor larger than this gets a shard of its own.
    pub max_shard_size: u64,
    /// Dtype of every written tensor; `None` keeps each tensor's base dtype (the fine-tune's
    /// stored dtype for tensors the base lacks).
    pub dtype: Option<FloatDtype>,
    /// Show a progress bar on stderr (drawn only when stderr is a terminal).
    pub progress: bool,
}

/// What [`merge`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    /// The checkpoint directory.
    pub out: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Safetensors files written.
    pub shards: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
}

impl std::fmt::Display for MergeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wrote {}: {} tensors, {} in {} shard{}, in {:.2}s",
            self.out.display(),
            self.tensors,
            crate::bitdelta::human_bytes(self.bytes),
            self.shards,
            if self.shards == 1 { "" } else { "s" },
            self.elapsed.as_secs_f64()
        )
    }
}

/// Parses a size as `--max-shard-size` takes it: `2GB`, `500MB`, `1GiB`, `123456` (bytes).
/// Decimal units are powers of 1000, as in transformers; `KiB`/`MiB`/`GiB` powers of 1024.
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = |detail: String| CodecError::BadOption {
        option: "--max-shard-size",
        detail,
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| bad(format!("\"{text}\" is not a size like 2GB, 500MB or 1GiB")))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(bad(format!(
                "unknown unit \"{other}\" in \"{text}\" (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )))
        }
    };
    let bytes = (number * scale as f64).round();
    if bytes < 1.0 || !bytes.is_finite() {
        return Err(bad(format!("\"{text}\" must be at least one byte")));
    }
    Ok(bytes as u64)
}

/// How one output tensor is made.
enum Source<'a> {
    /// BitDelta: base + scale · signs.
    Sign {
        base: RawTensor<'a>,
        entry: &'a TensorEntry,
    },
    /// A coded entry ([`crate::codec`]), decoded to f32 and added to the base (or, for a
    /// `finetuned` value, taken as the weight).
    Coded {
        base: RawTensor<'a>,
        name: &'a str,
        entry: &'a TensorEntry,
    },
    /// The fine-tune's value, stored in the delta.
    Finetuned { bytes: &'a [u8], dtype: Dtype },
    /// Base + a stored difference.
    Difference {
        base: RawTensor<'a>,
        bytes: &'a [u8],
        dtype: Dtype,
    },
}

/// One tensor of the merged checkpoint.
struct Planned<'a> {
    name: &'a str,
    shape: Vec<usize>,
    dtype: Dtype,
    source: Source<'a>,
}

impl Planned<'_> {
    fn nbytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8) as u64
    }
}

/// Writes base + delta as a Hugging Face checkpoint directory at `opts.out`.
///
/// Checks first that `opts.out` does not exist (unless `opts.force`) and that `base` is the base
/// the delta was made against (its fingerprint); nothing is written if either check fails.
pub fn merge(base: &Checkpoint, delta: &DeltaFile, opts: &MergeOptions) -> Result<MergeReport> {
    let start = Instant::now();
    if !opts.force && opts.out.symlink_metadata().is_ok() {
        return Err(CodecError::OutputExists {
            path: opts.out.clone(),
        });
    }
    if opts.max_shard_size == 0 {
        return Err(CodecError::BadOption {
            option: "--max-shard-size",
            detail: "must be at least one byte".into(),
        });
    }
    let fingerprint = fingerprint_safetensors(&base.weight_files())?;
    delta.check_base(&fingerprint, base.dir())?;

    let planned = plan(base, delta, opts.dtype)?;
    let shards = shard(&planned, opts.max_shard_size);

    let tmp = TempDir::create(&opts.out)?;
    let total: u64 = planned.iter().map(Planned::nbytes).sum();
    let progress = Progress::new(opts.progress, total, "merging");
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file_name = if n == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        write_shard(&tmp.path.join(&file_name), shard, delta, &progress)?;
        for p in shard {
            weight_map.insert(p.name.to_owned(), file_name.clone());
        }
    }
    progress.finish();
    if n > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        write_json(&tmp.path.join("model.safetensors.index.json"), &index)?;
    }
    write_side_files(base, delta, &tmp.path, opts.dtype)?;
    tmp.persist(&opts.out, opts.force)?;
    Ok(MergeReport {
        out: opts.out.clone(),
        tensors: planned.len(),
        shards: n,
        bytes: total,
        elapsed: start.elapsed(),
    })
}

/// Decides each output tensor's source and dtype, checking it against the base.
fn plan<'a>(
    base: &'a Checkpoint,
    delta: &'a DeltaFile,
    dtype: Option<FloatDtype>,
) -> Result<Vec<Planned<'a>>> {
    let base_float = |name: &str, shape: &[usize]| -> Result<RawTensor<'a>> {
        if !base.contains(name) {
            return Err(CodecError::MissingTensor {
                tensor: name.to_owned(),
                has: "delta",
                lacks: "base",
                dir: base.dir().to_owned(),
            });
        }
        let raw = base.raw(name)?;
        if raw.shape != shape {
            return Err(CodecError::DeltaShape {
                delta: delta.path().to_owned(),
                tensor: name.to_owned(),
                delta_shape: shape.to_vec(),
                base_shape: raw.shape.to_vec(),
                base_dir: base.dir().to_owned(),
            });
        }
        if FloatDtype::from_safetensors(raw.dtype).is_none() {
            return Err(CodecError::UnsupportedDtype {
                tensor: name.to_owned(),
                dir: base.dir().to_owned(),
                dtype: raw.dtype.to_string(),
            });
        }
        Ok(raw)
    };
    let mut out = Vec::with_capacity(delta.header().tensors.len());
    for (name, entry) in &delta.header().tensors {
        let shape = entry.shape();
        let planned = match entry {
            TensorEntry::Sign { .. } => {
                let b = base_float(name, &shape)?;
                Planned {
                    name,
                    dtype: dtype.map_or(b.dtype, FloatDtype::safetensors),
                    shape,
                    source: Source::Sign { base: b, entry },
                }
            }
            TensorEntry::Coded { .. } => {
                let b = base_float(name, &shape)?;
                Planned {
                    name,
                    dtype: dtype.map_or(b.dtype, FloatDtype::safetensors),
                    shape,
                    source: Source::Coded {
                        base: b,
                        name,
                        entry,
                    },
                }
            }
            TensorEntry::Full { tensor, value, .. } => {
                let (bytes, stored, _) = delta.tensor_bytes(tensor)?;
                let float = FloatDtype::from_safetensors(stored);
                match value {
                    FullValue::Finetuned => {
                        // As the reference: cast to the base model's dtype for that tensor.
                        let base_dtype = base
                            .contains(name)
                            .then(|| base.raw(name).map(|r| r.dtype))
                            .transpose()?
                            .filter(|d| FloatDtype::from_safetensors(*d).is_some());
                        let target = match (float, dtype) {
                            (Some(_), Some(d)) => d.safetensors(),
                            (Some(_), None) => base_dtype.unwrap_or(stored),
                            (None, _) => stored,
                        };
                        Planned {
                            name,
                            dtype: target,
                            shape,
                            source: Source::Finetuned {
                                bytes,
                                dtype: stored,
                            },
                        }
                    }
                    FullValue::Difference => {
                        let b = base_float(name, &shape)?;
                        if float.is_none() {
                            return Err(CodecError::UnsupportedDtype {
                                tensor: name.clone(),
                                dir: delta.path().to_owned(),
                                dtype: stored.to_string(),
                            });
                        }
                        Planned {
                            name,
                            dtype: dtype.map_or(b.dtype, FloatDtype::safetensors),
                            shape,
                            source: Source::Difference {
                                base: b,
                                bytes,
                                dtype: stored,
                            },
                        }
                    }
                }
            }
            other => {
                return Err(CodecError::UnsupportedMethod {
                    delta: delta.path().to_owned(),
                    method: format!(
                        "{} (entry kind \"{}\")",
                        delta.header().method,
                        other.kind()
                    ),
                    supported: "entries of kind sign, full and coded",
                })
            }
        };
        out.push(planned);
    }
    // Adapter deltas (`deltaserve finetune`, FORMAT.md "Adapter deltas") store only the
    // projections they change: every other base tensor is the fine-tune's unchanged. A tied
    // fine-tune has no `lm_head` of its own, so the base's is not carried over.
    let ties = delta
        .header()
        .finetuned
        .config
        .as_ref()
        .and_then(|c| c.get("tie_word_embeddings"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    for name in base.tensor_names() {
        if delta.header().tensors.contains_key(name) || (ties && name == "lm_head.weight") {
            continue;
        }
        let raw = base.raw(name)?;
        out.push(Planned {
            name,
            shape: raw.shape.to_vec(),
            dtype: match (FloatDtype::from_safetensors(raw.dtype), dtype) {
                (Some(_), Some(d)) => d.safetensors(),
                _ => raw.dtype,
            },
            source: Source::Finetuned {
                bytes: raw.data,
                dtype: raw.dtype,
            },
        });
    }
    // Checkpoint order, as save_pretrained writes it: embeddings, layers by number, the rest.
    out.sort_by_cached_key(|p| natural_key(p.name));
    Ok(out)
}

/// A sort key that orders `layers.10` after `layers.9`.
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|part| match part.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, part.to_owned()),
        })
        .collect()
}

/// Splits tensors into shards of at most `max` bytes (a larger tensor gets one to itself).
fn shard<'p, 'a>(planned: &'p [Planned<'a>], max: u64) -> Vec<Vec<&'p Planned<'a>>> {
    let mut shards: Vec<Vec<&Planned<'a>>> = vec![Vec::new()];
    let mut size = 0u64;
    for p in planned {
        let n = p.nbytes();
        let current = shards
            .last_mut()
            .expect("starts with one shard. This is a bug.");
        if !current.is_empty() && size + n > max {
            shards.push(vec![p]);
            size = n;
        } else {
            current.push(p);
            size += n;
        }
    }
    shards
}

/// Computes one tensor's bytes in its output dtype.
fn materialise<'a>(p: &Planned<'a>, delta: &DeltaFile) -> Result<Cow<'a, [u8]>> {
    let out = FloatDtype::from_safetensors(p.dtype);
    match (&p.source, out) {
        (Source::Sign { base, entry }, Some(out)) => {
            let words = delta.sign_words(entry)?;
            let scale = delta.scale(entry)?;
            Ok(Cow::Owned(reconstruct_sign(base, &words, scale, out)))
        }
        (Source::Coded { base, name, entry }, Some(out)) => {
            let decoded = crate::codec::decode_dense(delta, name, entry)?;
            let w: Vec<f32> = match entry {
                TensorEntry::Coded {
                    value: FullValue::Finetuned,
                    ..
                } => decoded.into_iter().map(|x| out.round(x)).collect(),
                // As a stored difference: `weight.add_(diff.to(weight.dtype))`.
                _ => FloatDtype::from_safetensors(base.dtype)
                    .expect("planned: base is float. This is a bug.")
                    .decode(base.data)
                    .into_iter()
                    .zip(decoded)
                    .map(|(b, d)| out.round(out.round(b) + out.round(d)))
                    .collect(),
            };
            let mut encoded = Vec::with_capacity(w.len() * out.size());
            out.encode_into(&w, &mut encoded);
            Ok(Cow::Owned(encoded))
        }
        (Source::Finetuned { bytes, dtype }, _) if *dtype == p.dtype => Ok(Cow::Borrowed(bytes)),
        (Source::Finetuned { bytes, dtype }, Some(out)) => {
            let from = FloatDtype::from_safetensors(*dtype)
                .expect("planned: non-float tensors keep their dtype. This is a bug.");
            let mut encoded = Vec::with_capacity(bytes.len());
            out.encode_into(&from.decode(bytes), &mut encoded);
            Ok(Cow::Owned(encoded))
        }
        (Source::Difference { base, bytes, dtype }, Some(out)) => {
            // As PyTorch's `weight.add_(diff.to(weight.dtype))`, one rounding per step.
            let bd = FloatDtype::from_safetensors(base.dtype)
                .expect("planned: base is float. This is a bug.");
            let dd = FloatDtype::from_safetensors(*dtype)
                .expect("planned: difference is float. This is a bug.");
            let w: Vec<f32> = bd
                .decode(base.data)
                .into_iter()
                .zip(dd.decode(bytes))
                .map(|(b, d)| out.round(out.round(b) + out.round(d)))
                .collect();
            let mut encoded = Vec::with_capacity(w.len() * out.size());
            out.encode_into(&w, &mut encoded);
            Ok(Cow::Owned(encoded))
        }
        _ => unreachable!("planned: reconstructed tensors have a float dtype. This is a bug."),
    }
}

/// Writes one safetensors shard: the header, then the tensors, a few computed at a time.
fn write_shard(
    path: &Path,
    shard: &[&Planned<'_>],
    delta: &DeltaFile,
    progress: &Progress,
) -> Result<()> {
    // safetensors' own order: larger alignment first, then by name, so every tensor's data is
    // aligned to its element size.
    let mut order: Vec<&Planned<'_>> = shard.to_vec();
    order.sort_by(|a, b| b.dtype.cmp(&a.dtype).then(a.name.cmp(b.name)));
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(order.len());
    for p in &order {
        let end = offset + p.nbytes() as usize;
        infos.push((
            p.name.to_owned(),
            TensorInfo {
                dtype: p.dtype,
                shape: p.shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let metadata = Metadata::new(Some(metadata), infos).map_err(|e| CodecError::BadOption {
        option: "(internal)",
        detail: format!("safetensors rejected the shard layout: {e}. This is a bug."),
    })?;
    let mut json = serde_json::to_vec(&metadata).map_err(|e| CodecError::BadJson {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    json.resize(json.len().next_multiple_of(8), b' ');

    let file = File::create(path).map_err(CodecError::io("create", path))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let io = CodecError::io;
    out.write_all(&(json.len() as u64).to_le_bytes())
        .and_then(|_| out.write_all(&json))
        .map_err(io("write", path))?;
    let threads = rayon::current_num_threads().max(1);
    for chunk in order.chunks(threads) {
        let data: Vec<Cow<'_, [u8]>> = chunk
            .par_iter()
            .map(|p| materialise(p, delta))
            .collect::<Result<_>>()?;
        for (p, bytes) in chunk.iter().zip(&data) {
            debug_assert_eq!(bytes.len() as u64, p.nbytes());
            out.write_all(bytes).map_err(io("write", path))?;
            progress.inc(p.nbytes());
        }
    }
    let file = out
        .into_inner()
        .map_err(|e| io("write", path)(e.into_error()))?;
    file.sync_all().map_err(io("sync", path))?;
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| CodecError::BadJson {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    text.push('\n');
    std::fs::write(path, text).map_err(CodecError::io("write", path))
}

/// config.json, tokenizer files, chat template and generation config: from the delta where it
/// has them, else copied from the base.
fn write_side_files(
    base: &Checkpoint,
    delta: &DeltaFile,
    dir: &Path,
    dtype: Option<FloatDtype>,
) -> Result<()> {
    let header = delta.header();
    let info = &header.finetuned;
    let mut config = info
        .config
        .clone()
        .unwrap_or_else(|| base.config_json().clone());
    if let (Some(d), Some(obj)) = (dtype, config.as_object_mut()) {
        for key in ["torch_dtype", "dtype"] {
            if obj.contains_key(key) {
                obj.insert(key.to_owned(), d.torch_name().into());
            }
        }
    }
    write_json(&dir.join("config.json"), &config)?;

    let mut written: Vec<&str> = Vec::new();
    if let Some(text) = &info.tokenizer_json {
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, text).map_err(CodecError::io("write", &path))?;
        written.push("tokenizer.json");
    }
    if let Some(value) = &info.tokenizer_config {
        write_json(&dir.join("tokenizer_config.json"), value)?;
        written.push("tokenizer_config.json");
    }
    if let Some(text) = &info.chat_template {
        let path = dir.join(CHAT_TEMPLATE_FILE);
        std::fs::write(&path, text).map_err(CodecError::io("write", &path))?;
        written.push(CHAT_TEMPLATE_FILE);
    }
    for (file, key) in EXTRA_JSON_FILES {
        if let Some(value) = header.extra.get(*key) {
            write_json(&dir.join(file), value)?;
            written.push(file);
        }
    }
    for file in BASE_FILES {
        let from = base.dir().join(file);
        if written.contains(file) || !from.is_file() {
            continue;
        }
        let to = dir.join(file);
        std::fs::copy(&from, &to).map_err(CodecError::io("copy", &from))?;
    }
    Ok(())
}

/// A directory being written under a temporary name beside its final one; removed on drop
/// unless persisted.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `.{name}.tmp-{pid}` beside `out`.
    fn create(out: &Path) -> Result<TempDir> {
        let name = out.file_name().ok_or_else(|| CodecError::BadOption {
            option: "--out",
            detail: format!("{} has no directory name", out.display()),
        })?;
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let path = parent.join(tmp_name);
        if path.exists() {
            // Left by an earlier run of this process id that was killed: not ours to keep.
            std::fs::remove_dir_all(&path).map_err(CodecError::io("remove", &path))?;
        }
        std::fs::create_dir(&path).map_err(CodecError::io("create directory", &path))?;
        Ok(TempDir { path, keep: false })
    }

    /// Renames the directory onto `out`, replacing an existing `out` only if `force`.
    fn persist(mut self, out: &Path, force: bool) -> Result<()> {
        let exists = out.symlink_metadata().is_ok();
        if exists && !force {
            return Err(CodecError::OutputExists {
                path: out.to_owned(),
            });
        }
        if exists {
            // Move the old output aside first, so that at every moment `out` is either the old
            // checkpoint or the new one.
            let mut old_name = std::ffi::OsString::from(".");
            old_name.push(out.file_name().unwrap_or_default());
            old_name.push(format!(".old-{}", std::process::id()));
            let old = self.path.with_file_name(old_name);
            std::fs::rename(out, &old).map_err(CodecError::io("move aside", out))?;
            std::fs::rename(&self.path, out).map_err(CodecError::io("rename onto", out))?;
            self.keep = true;
            let removed = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            removed.map_err(CodecError::io("remove the replaced", &old))?;
        } else {
            std::fs::rename(&self.path, out).map_err(CodecError::io("rename onto", out))?;
            self.keep = true;
        }
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5kb").unwrap(), 1500);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        let err = parse_size("2 parsecs").unwrap_err().to_string();
        assert!(
            err.contains("--max-shard-size") && err.contains("parsecs"),
            "{err}"
        );
        assert!(parse_size("0").is_err());
        assert!(parse_size("GB").is_err());
    }

    #[test]
    fn natural_order_puts_layer_10_after_9() {
        let mut names = vec![
            "model.layers.10.mlp.up_proj.weight",
            "model.layers.9.mlp.up_proj.weight",
            "model.embed_tokens.weight",
            "lm_head.weight",
        ];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(
            names,
            [
                "lm_head.weight",
                "model.embed_tokens.weight",
                "model.layers.9.mlp.up_proj.weight",
                "model.layers.10.mlp.up_proj.weight",
            ]
        );
    }
}
