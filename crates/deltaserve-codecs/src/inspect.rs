//! What a delta file holds, for `deltaserve inspect`: a table for people, JSON for tools.

use serde::Serialize;

use deltaserve_format::{BaseFingerprint, DeltaFile, FullValue, TensorEntry};

use crate::bitdelta::human_bytes;
use crate::error::Result;

/// A delta's header and storage, flattened for display.
#[derive(Debug, Clone, Serialize)]
pub struct DeltaDescription {
    /// The file.
    pub path: String,
    /// Its size in bytes.
    pub file_size: u64,
    /// `format_version` from the header.
    pub format_version: String,
    /// The method that made it.
    pub method: String,
    /// The program that wrote it.
    pub created_by: String,
    /// The base it belongs to.
    pub base: BaseFingerprint,
    /// The fine-tune's `model_type` / first architecture, from its stored config.
    pub finetuned_architecture: Option<String>,
    /// Which of the fine-tune's files the delta carries (`config.json`, `tokenizer.json`, …).
    pub finetuned_files: Vec<String>,
    /// Parameters stored compressed.
    pub compressed_params: u64,
    /// Bytes they take (signs with padding, scales).
    pub compressed_bytes: u64,
    /// Parameters stored in full.
    pub full_params: u64,
    /// Bytes they take.
    pub full_bytes: u64,
    /// Bits per compressed parameter.
    pub bits_per_param: f64,
    /// Bits per parameter over the whole file (all tensors and the header).
    pub file_bits_per_param: f64,
    /// How the scales were calibrated, if recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<serde_json::Value>,
    /// One row per weight.
    pub tensors: Vec<TensorDescription>,
}

/// One weight of the fine-tune as the delta stores it.
#[derive(Debug, Clone, Serialize)]
pub struct TensorDescription {
    /// Checkpoint name.
    pub name: String,
    /// `sign` or `full`.
    pub kind: String,
    /// For `full`: `finetuned` or `difference`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The weight's shape.
    pub shape: Vec<usize>,
    /// The dtype it is reconstructed in (sign) or stored in (full).
    pub dtype: String,
    /// For `sign`: the scale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<f32>,
    /// Parameters.
    pub params: u64,
    /// Bytes its container tensors take.
    pub bytes: u64,
}

/// Describes an open delta.
pub fn describe(delta: &DeltaFile) -> Result<DeltaDescription> {
    let header = delta.header();
    let summary = delta.summary();
    let mut tensors = Vec::with_capacity(summary.tensors.len());
    for t in &summary.tensors {
        let entry = delta.entry(&t.name)?;
        let (value, scale) = match entry {
            TensorEntry::Sign { .. } => (None, Some(delta.scale(entry)?)),
            TensorEntry::Full { value, .. } => (
                Some(
                    match value {
                        FullValue::Finetuned => "finetuned",
                        FullValue::Difference => "difference",
                    }
                    .to_owned(),
                ),
                None,
            ),
            // Coded entries show their codec and settings: `lowrank rank=16`.
            TensorEntry::Coded { codec, params, .. } => {
                let settings: Vec<String> = params
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.to_string().replace(['[', ']', '"'], "")))
                    .collect();
                (
                    Some(format!("{codec} {}", settings.join(" ")).trim().to_owned()),
                    None,
                )
            }
            _ => (None, None),
        };
        tensors.push(TensorDescription {
            name: t.name.clone(),
            kind: t.kind.to_owned(),
            value,
            shape: t.shape.clone(),
            dtype: entry.dtype().to_owned(),
            scale,
            params: t.params,
            bytes: t.bytes,
        });
    }
    let info = &header.finetuned;
    let mut files = Vec::new();
    if info.config.is_some() {
        files.push("config.json".to_owned());
    }
    if info.tokenizer_json.is_some() {
        files.push("tokenizer.json".to_owned());
    }
    if info.tokenizer_config.is_some() {
        files.push("tokenizer_config.json".to_owned());
    }
    if info.chat_template.is_some() {
        files.push(crate::files::CHAT_TEMPLATE_FILE.to_owned());
    }
    for (file, key) in crate::files::EXTRA_JSON_FILES {
        if header.extra.contains_key(*key) {
            files.push((*file).to_owned());
        }
    }
    let arch = info.config.as_ref().and_then(|c| {
        c.get("architectures")
            .and_then(|a| a.get(0))
            .or_else(|| c.get("model_type"))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    });
    let all_params = summary.compressed_params + summary.full_params;
    Ok(DeltaDescription {
        path: delta.path().display().to_string(),
        file_size: delta.file_size(),
        format_version: header.format_version.clone(),
        method: header.method.clone(),
        created_by: header.created_by.clone(),
        base: header.base.clone(),
        finetuned_architecture: arch,
        finetuned_files: files,
        compressed_params: summary.compressed_params,
        compressed_bytes: summary.compressed_bytes,
        full_params: summary.full_params,
        full_bytes: summary.full_bytes,
        bits_per_param: summary.bits_per_param(),
        file_bits_per_param: if all_params == 0 {
            0.0
        } else {
            (delta.file_size() * 8) as f64 / all_params as f64
        },
        calibration: header.calibration.clone(),
        tensors,
    })
}

impl std::fmt::Display for DeltaDescription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "delta:          {}", self.path)?;
        writeln!(
            f,
            "format:         {} (method {}, written by {})",
            self.format_version, self.method, self.created_by
        )?;
        writeln!(
            f,
            "base:           {} {} ({} tensors)",
            self.base.algorithm, self.base.hex, self.base.tensors
        )?;
        if let Some(arch) = &self.finetuned_architecture {
            writeln!(f, "fine-tune:      {arch}")?;
        }
        writeln!(f, "fine-tune files: {}", self.finetuned_files.join(", "))?;
        writeln!(
            f,
            "size:           {} ({} bytes)",
            human_bytes(self.file_size),
            self.file_size
        )?;
        writeln!(
            f,
            "compressed:     {} params in {} = {:.4} bits/param",
            self.compressed_params,
            human_bytes(self.compressed_bytes),
            self.bits_per_param
        )?;
        writeln!(
            f,
            "stored in full: {} params in {}",
            self.full_params,
            human_bytes(self.full_bytes)
        )?;
        writeln!(
            f,
            "whole file:     {:.4} bits/param",
            self.file_bits_per_param
        )?;
        if let Some(c) = &self.calibration {
            writeln!(f, "calibration:    {c}")?;
        }
        writeln!(f)?;
        let name_w = self
            .tensors
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(
            f,
            "{:name_w$}  {:<16}  {:<14}  {:<5}  {:>12}  {:>10}",
            "name", "kind", "shape", "dtype", "scale", "bytes"
        )?;
        for t in &self.tensors {
            let kind = match &t.value {
                Some(v) => format!("{} ({v})", t.kind),
                None => t.kind.clone(),
            };
            let shape = format!("{:?}", t.shape);
            let scale = t
                .scale
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.6e}"));
            writeln!(
                f,
                "{:name_w$}  {kind:<16}  {shape:<14}  {:<5}  {scale:>12}  {:>10}",
                t.name, t.dtype, t.bytes
            )?;
        }
        Ok(())
    }
}
