//! The delta header: the JSON stored under the `"deltaserve"` key of the safetensors
//! `__metadata__`. It says which base the delta belongs to, how each weight of the fine-tune is
//! stored, and carries the fine-tune's config and tokenizer files where they differ from the base's.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::error::{FormatError, Result};
use crate::fingerprint::BaseFingerprint;
use crate::signs::words_per_row;
use crate::{FORMAT_MAJOR, FORMAT_MINOR};

/// The key of the safetensors `__metadata__` map that holds the [`DeltaHeader`] JSON.
pub const METADATA_KEY: &str = "deltaserve";

/// The tensor-entry kinds this version knows, as written in the `kind` field.
pub const KNOWN_KINDS: &str = "sign, full, coded";

/// The `format_version` this crate writes: `"{FORMAT_MAJOR}.{FORMAT_MINOR}"`.
pub fn format_version() -> String {
    format!("{FORMAT_MAJOR}.{FORMAT_MINOR}")
}

/// Splits a `"MAJOR.MINOR"` version string; `None` if it is not two decimal numbers.
pub fn parse_format_version(version: &str) -> Option<(u32, u32)> {
    let (major, minor) = version.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(major) || !digits(minor) {
        return None;
    }
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Parses a safetensors dtype name (`"BF16"`, `"F32"`, `"U32"`, …).
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
}

/// Everything a delta file says about itself; serialised as JSON into the container's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaHeader {
    /// `"MAJOR.MINOR"`; this crate writes [`format_version()`]. Readers reject another major
    /// and accept any minor (a newer minor only adds optional fields).
    pub format_version: String,
    /// The compression method that made the delta, e.g. `"bitdelta"`.
    pub method: String,
    /// The base checkpoint the delta was computed against.
    pub base: BaseFingerprint,
    /// The fine-tune's non-weight files.
    pub finetuned: FinetuneInfo,
    /// How each weight of the fine-tune is stored, keyed by its checkpoint name
    /// (`"model.layers.0.mlp.up_proj.weight"`). A BTreeMap so the JSON is in a stable order.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// How the scales were calibrated (method, data, steps, losses), if they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<serde_json::Value>,
    /// The program that wrote the file, e.g. `"deltaserve 0.1.0"`.
    pub created_by: String,
    /// Free-form fields for tools; readers ignore keys they do not know.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The fine-tune's configuration and tokenizer files.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FinetuneInfo {
    /// The fine-tune's `config.json`; compressors always store it.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// The fine-tune's `tokenizer.json` text, only when it differs from the base's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_json: Option<String>,
    /// The fine-tune's `tokenizer_config.json`, only when it differs from the base's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_config: Option<serde_json::Value>,
    /// The fine-tune's chat template, only when it differs from the base's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
}

/// How one fine-tune weight is stored. Tagged by `"kind"` in JSON.
///
/// New codecs (low-rank, grouped quantisation, …) become new variants; a reader that meets a
/// kind it does not know fails with [`FormatError::UnknownTensorKind`] naming it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum TensorEntry {
    /// BitDelta (arXiv 2402.10193, eq. 1): `W_ft ≈ W_base + scale * sign(W_ft - W_base)`.
    Sign {
        /// `[rows, cols]` = `[out_features, in_features]`, the weight's own shape.
        shape: [usize; 2],
        /// Container tensor with the packed signs: `U32 [rows, words_per_row(cols)]`
        /// (bit layout in [`crate::signs`]), e.g. `"model.layers.0.mlp.up_proj.weight.signs"`.
        signs: String,
        /// Container tensor with the scale: `F32 [1]`.
        scale: String,
        /// The base weight's dtype name (`"BF16"`): what the reconstruction is computed in.
        dtype: String,
    },
    /// A tensor stored in full: `W_ft` itself, or `W_ft - W_base`.
    Full {
        /// Container tensor holding the values.
        tensor: String,
        /// What the values are.
        value: FullValue,
        /// The tensor's shape (equal to the container tensor's).
        shape: Vec<usize>,
        /// The container tensor's dtype name.
        dtype: String,
    },
    /// A weight stored by a named codec (low-rank, grouped quantisation, sparse, …) as several
    /// container tensors, its *parts*. The format checks that each part exists with the declared
    /// dtype and shape; what the parts mean is the codec's, documented per codec in
    /// docs/FORMAT.md ("Codecs") and decoded by `deltaserve-codecs`. Added in format 1.1.
    Coded {
        /// The codec's name, e.g. `"lowrank"`, `"deltadq"`, `"rtn"`, `"gptq"`, `"nf"`.
        codec: String,
        /// `[rows, cols]` = `[out_features, in_features]`, the weight's own shape.
        shape: [usize; 2],
        /// The base weight's dtype name (`"BF16"`): what the reconstruction is computed in.
        dtype: String,
        /// What the decoded matrix is: `W_ft − W_base` (`difference`, delta codecs) or `W_ft`
        /// itself (`finetuned`, codecs that quantise the whole fine-tune, e.g. the GPTQ baseline).
        value: FullValue,
        /// The container tensors, keyed by the role the codec gives them (`"u"`, `"codes"`, …).
        parts: BTreeMap<String, CodedPart>,
        /// The codec's settings (rank, bits, group size, seed, …), as the codec documents them.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        params: BTreeMap<String, serde_json::Value>,
    },
}

/// One container tensor of a [`TensorEntry::Coded`] entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodedPart {
    /// The container tensor's name, conventionally `"{weight}.{role}"`.
    pub tensor: String,
    /// Its dtype name (`"U8"`, `"F16"`, …).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// What a [`TensorEntry::Full`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullValue {
    /// The fine-tune's own value; the base's is not used. BitDelta stores embeddings, norms,
    /// `lm_head` and biases this way.
    Finetuned,
    /// `W_ft - W_base`, added to the base's value on load (for codecs that store dense deltas).
    Difference,
}

impl TensorEntry {
    /// The `kind` string of this entry (`"sign"`, `"full"`).
    pub fn kind(&self) -> &'static str {
        match self {
            TensorEntry::Sign { .. } => "sign",
            TensorEntry::Full { .. } => "full",
            TensorEntry::Coded { .. } => "coded",
        }
    }

    /// The codec that reads this entry: `"bitdelta"` for sign entries, `"full"` for full
    /// ones, the named codec for coded ones.
    pub fn codec(&self) -> &str {
        match self {
            TensorEntry::Sign { .. } => "bitdelta",
            TensorEntry::Full { .. } => "full",
            TensorEntry::Coded { codec, .. } => codec,
        }
    }

    /// The shape of the weight this entry reconstructs.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            TensorEntry::Sign { shape, .. } | TensorEntry::Coded { shape, .. } => shape.to_vec(),
            TensorEntry::Full { shape, .. } => shape.clone(),
        }
    }

    /// The dtype name of the weight this entry reconstructs.
    pub fn dtype(&self) -> &str {
        match self {
            TensorEntry::Sign { dtype, .. }
            | TensorEntry::Full { dtype, .. }
            | TensorEntry::Coded { dtype, .. } => dtype,
        }
    }

    /// The container tensors this entry reads, with the dtype and shape each must have.
    pub fn expected_tensors(&self) -> Vec<ExpectedTensor<'_>> {
        match self {
            TensorEntry::Sign {
                shape: [rows, cols],
                signs,
                scale,
                ..
            } => vec![
                ExpectedTensor {
                    name: signs,
                    dtype: Some(Dtype::U32),
                    shape: vec![*rows, words_per_row(*cols)],
                    why: format!(" for a [{rows}, {cols}] matrix"),
                },
                ExpectedTensor {
                    name: scale,
                    dtype: Some(Dtype::F32),
                    shape: vec![1],
                    why: " (a scale is one f32)".to_owned(),
                },
            ],
            TensorEntry::Full {
                tensor,
                shape,
                dtype,
                ..
            } => vec![ExpectedTensor {
                name: tensor,
                dtype: parse_dtype(dtype),
                shape: shape.clone(),
                why: String::new(),
            }],
            TensorEntry::Coded { codec, parts, .. } => parts
                .iter()
                .map(|(role, part)| ExpectedTensor {
                    name: &part.tensor,
                    dtype: parse_dtype(&part.dtype),
                    shape: part.shape.clone(),
                    why: format!(" (part \"{role}\" of a {codec} entry)"),
                })
                .collect(),
        }
    }
}

/// A container tensor an entry needs, and what it must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor<'a> {
    /// Its name in the container.
    pub name: &'a str,
    /// Its dtype (`None` when the header's dtype name is unknown; header validation rejects that).
    pub dtype: Option<Dtype>,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Why that shape, for error messages (" for a [4, 70] matrix"), or empty.
    pub why: String,
}

impl DeltaHeader {
    /// A header for the current format version with no tensors yet, `created_by` naming this crate.
    pub fn new(method: impl Into<String>, base: BaseFingerprint, finetuned: FinetuneInfo) -> Self {
        DeltaHeader {
            format_version: format_version(),
            method: method.into(),
            base,
            finetuned,
            tensors: BTreeMap::new(),
            calibration: None,
            created_by: concat!("deltaserve ", env!("CARGO_PKG_VERSION")).to_owned(),
            extra: BTreeMap::new(),
        }
    }

    /// The header as compact JSON, as stored in the container.
    pub fn to_json(&self) -> String {
        // Serialising plain structs with string keys cannot fail.
        serde_json::to_string(self).expect("DeltaHeader serialises to JSON. This is a bug.")
    }

    /// Parses and checks header JSON; `path` names the file in errors.
    ///
    /// The version is checked before the schema, so a delta from a newer major version fails
    /// with "upgrade deltaserve" and not with a schema error. Unknown fields are ignored
    /// (newer minor versions may add some); unknown tensor kinds and dtype names are errors.
    pub fn from_json(json: &str, path: &Path) -> Result<DeltaHeader> {
        let bad = |field: &str, detail: String| FormatError::BadHeader {
            path: path.to_owned(),
            field: field.to_owned(),
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| bad(".", format!("not JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| bad(".", "not a JSON object".to_owned()))?;
        let version = object
            .get("format_version")
            .ok_or_else(|| bad("format_version", "missing".to_owned()))?
            .as_str()
            .ok_or_else(|| bad("format_version", "not a string".to_owned()))?;
        check_version(version, path)?;

        if let Some(tensors) = object.get("tensors").and_then(|t| t.as_object()) {
            for (name, entry) in tensors {
                if let Some(kind) = entry.get("kind").and_then(|k| k.as_str()) {
                    if !matches!(kind, "sign" | "full" | "coded") {
                        return Err(FormatError::UnknownTensorKind {
                            path: path.to_owned(),
                            tensor: name.clone(),
                            kind: kind.to_owned(),
                            known: KNOWN_KINDS,
                        });
                    }
                }
            }
        }

        let header: DeltaHeader = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            bad(&field, e.into_inner().to_string())
        })?;
        header.check_entries(path)?;
        Ok(header)
    }

    /// Checks what can be checked without the container: dtype names and sizes that fit in memory.
    pub(crate) fn check_entries(&self, path: &Path) -> Result<()> {
        for (name, entry) in &self.tensors {
            if parse_dtype(entry.dtype()).is_none() {
                return Err(FormatError::UnknownDtype {
                    path: path.to_owned(),
                    tensor: name.clone(),
                    dtype: entry.dtype().to_owned(),
                });
            }
            if let TensorEntry::Coded { parts, .. } = entry {
                for part in parts.values() {
                    if parse_dtype(&part.dtype).is_none() {
                        return Err(FormatError::UnknownDtype {
                            path: path.to_owned(),
                            tensor: part.tensor.clone(),
                            dtype: part.dtype.clone(),
                        });
                    }
                }
            }
            if checked_numel(&entry.shape()).is_none() {
                return Err(FormatError::BadHeader {
                    path: path.to_owned(),
                    field: format!("tensors.{name}.shape"),
                    detail: format!("{:?} has too many elements", entry.shape()),
                });
            }
        }
        Ok(())
    }

    /// Bytes per tensor and bits per parameter, computed from the header alone.
    pub fn summary(&self) -> DeltaSummary {
        DeltaSummary::from_entries(&self.tensors, |expected| {
            let numel = checked_numel(&expected.shape).unwrap_or(0) as u64;
            let bits = expected.dtype.map_or(0, |d| d.bitsize()) as u64;
            numel * bits / 8
        })
    }
}

/// Checks a version string against [`FORMAT_MAJOR`]; `Ok` for any minor of the same major.
pub(crate) fn check_version(version: &str, path: &Path) -> Result<()> {
    let (major, _minor) = parse_format_version(version).ok_or_else(|| FormatError::BadVersion {
        path: path.to_owned(),
        found: version.to_owned(),
    })?;
    match major.cmp(&FORMAT_MAJOR) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err(FormatError::NewerMajorVersion {
            path: path.to_owned(),
            found: major,
            supported: FORMAT_MAJOR,
        }),
        std::cmp::Ordering::Less => Err(FormatError::OlderMajorVersion {
            path: path.to_owned(),
            found: major,
            supported: FORMAT_MAJOR,
        }),
    }
}

/// The element count of a shape, `None` on overflow.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Storage accounting for a delta, as printed by `deltaserve inspect`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaSummary {
    /// One line per header entry, in name order.
    pub tensors: Vec<TensorSummary>,
    /// Parameters of the compressed (non-`full`) weights.
    pub compressed_params: u64,
    /// Bytes those compressed weights take (signs with padding, plus scales).
    pub compressed_bytes: u64,
    /// Parameters stored in full.
    pub full_params: u64,
    /// Bytes the tensors stored in full take.
    pub full_bytes: u64,
}

/// Storage of one header entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSummary {
    /// The weight's checkpoint name.
    pub name: String,
    /// The entry kind (`"sign"`, `"full"`).
    pub kind: &'static str,
    /// The weight's shape.
    pub shape: Vec<usize>,
    /// The weight's parameter count.
    pub params: u64,
    /// Bytes its container tensors take.
    pub bytes: u64,
}

impl DeltaSummary {
    /// Builds a summary; `bytes_of` gives the stored size of one container tensor.
    pub(crate) fn from_entries(
        entries: &BTreeMap<String, TensorEntry>,
        bytes_of: impl Fn(&ExpectedTensor<'_>) -> u64,
    ) -> DeltaSummary {
        let mut summary = DeltaSummary {
            tensors: Vec::with_capacity(entries.len()),
            compressed_params: 0,
            compressed_bytes: 0,
            full_params: 0,
            full_bytes: 0,
        };
        for (name, entry) in entries {
            let shape = entry.shape();
            let params = checked_numel(&shape).unwrap_or(0) as u64;
            let bytes = entry.expected_tensors().iter().map(&bytes_of).sum();
            if matches!(entry, TensorEntry::Full { .. }) {
                summary.full_params += params;
                summary.full_bytes += bytes;
            } else {
                summary.compressed_params += params;
                summary.compressed_bytes += bytes;
            }
            summary.tensors.push(TensorSummary {
                name: name.clone(),
                kind: entry.kind(),
                shape,
                params,
                bytes,
            });
        }
        summary
    }

    /// Bits per parameter of the compressed weights (sign bits, padding and scales over their
    /// parameter count); `0.0` when nothing is compressed. BitDelta is just over 1.
    pub fn bits_per_param(&self) -> f64 {
        if self.compressed_params == 0 {
            0.0
        } else {
            (self.compressed_bytes * 8) as f64 / self.compressed_params as f64
        }
    }

    /// Bytes of all tensors (compressed and full), without the container header.
    pub fn tensor_bytes(&self) -> u64 {
        self.compressed_bytes + self.full_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> DeltaHeader {
        let base = BaseFingerprint {
            algorithm: "blake3-v1".into(),
            hex: "ab".repeat(32),
            tensors: 3,
        };
        let mut h = DeltaHeader::new("bitdelta", base, FinetuneInfo::default());
        h.tensors.insert(
            "w".into(),
            TensorEntry::Sign {
                shape: [4, 70],
                signs: "w.signs".into(),
                scale: "w.scale".into(),
                dtype: "BF16".into(),
            },
        );
        h.tensors.insert(
            "n".into(),
            TensorEntry::Full {
                tensor: "n".into(),
                value: FullValue::Finetuned,
                shape: vec![70],
                dtype: "BF16".into(),
            },
        );
        h
    }

    #[test]
    fn format_version_matches_constants() {
        assert_eq!(
            parse_format_version(&format_version()),
            Some((FORMAT_MAJOR, FORMAT_MINOR))
        );
        assert_eq!(format_version(), "1.1");
    }

    #[test]
    fn version_strings_parse_strictly() {
        assert_eq!(parse_format_version("1.12"), Some((1, 12)));
        for bad in ["1", "1.", ".0", "1.0.0", "v1.0", "1.-1", " 1.0"] {
            assert_eq!(parse_format_version(bad), None, "{bad}");
        }
    }

    #[test]
    fn json_round_trip_and_tags() {
        let h = header();
        let json = h.to_json();
        assert!(json.contains(r#""kind":"sign""#), "{json}");
        assert!(json.contains(r#""value":"finetuned""#), "{json}");
        assert_eq!(DeltaHeader::from_json(&json, Path::new("x")).unwrap(), h);
    }

    #[test]
    fn newer_minor_with_unknown_fields_is_accepted() {
        let mut v: serde_json::Value = serde_json::from_str(&header().to_json()).unwrap();
        v["format_version"] = "1.7".into();
        v["something_new"] = serde_json::json!({"a": 1});
        v["tensors"]["w"]["new_optional"] = 3.into();
        let h = DeltaHeader::from_json(&v.to_string(), Path::new("x")).unwrap();
        assert_eq!(h.format_version, "1.7");
    }

    #[test]
    fn unknown_kind_is_named() {
        let mut v: serde_json::Value = serde_json::from_str(&header().to_json()).unwrap();
        v["tensors"]["w"]["kind"] = "lowrank".into();
        let err = DeltaHeader::from_json(&v.to_string(), Path::new("/p/x.delta")).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, FormatError::UnknownTensorKind { .. }),
            "{msg}"
        );
        assert!(
            msg.contains("\"lowrank\"") && msg.contains("\"w\""),
            "{msg}"
        );
    }

    #[test]
    fn newer_major_fails_before_schema() {
        let json = r#"{"format_version":"2.0","totally":"different"}"#;
        let err = DeltaHeader::from_json(json, Path::new("/p/x.delta")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "delta /p/x.delta: format major version 2 is newer than this deltaserve supports (1); upgrade deltaserve"
        );
    }

    #[test]
    fn schema_errors_name_the_field() {
        let mut v: serde_json::Value = serde_json::from_str(&header().to_json()).unwrap();
        v["tensors"]["w"]["shape"] = serde_json::json!([4]);
        let err = DeltaHeader::from_json(&v.to_string(), Path::new("/p/x.delta")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("tensors.w"), "{msg}");
    }

    #[test]
    fn unknown_dtype_is_rejected() {
        let mut v: serde_json::Value = serde_json::from_str(&header().to_json()).unwrap();
        v["tensors"]["n"]["dtype"] = "Q7".into();
        let err = DeltaHeader::from_json(&v.to_string(), Path::new("x")).unwrap_err();
        assert!(matches!(err, FormatError::UnknownDtype { .. }), "{err}");
    }

    #[test]
    fn coded_entries_round_trip_and_count_their_parts() {
        let mut h = header();
        let part = |tensor: &str, dtype: &str, shape: Vec<usize>| CodedPart {
            tensor: tensor.into(),
            dtype: dtype.into(),
            shape,
        };
        h.tensors.insert(
            "lr".into(),
            TensorEntry::Coded {
                codec: "lowrank".into(),
                shape: [8, 6],
                dtype: "BF16".into(),
                value: FullValue::Difference,
                parts: BTreeMap::from([
                    ("u".into(), part("lr.u", "F16", vec![8, 2])),
                    ("v".into(), part("lr.v", "F16", vec![2, 6])),
                ]),
                params: BTreeMap::from([("rank".into(), 2.into())]),
            },
        );
        let json = h.to_json();
        assert!(json.contains(r#""kind":"coded""#), "{json}");
        let back = DeltaHeader::from_json(&json, Path::new("x")).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.tensors["lr"].codec(), "lowrank");
        let s = back.summary();
        // w as before (52 bytes, 280 params) plus lr: (16 + 12) f16 values for 48 params.
        assert_eq!(s.compressed_params, 280 + 48);
        assert_eq!(s.compressed_bytes, 52 + 56);
        let names: Vec<_> = back.tensors["lr"]
            .expected_tensors()
            .iter()
            .map(|e| e.name.to_owned())
            .collect();
        assert_eq!(names, ["lr.u", "lr.v"]);

        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["tensors"]["lr"]["parts"]["u"]["dtype"] = "Q3".into();
        let err = DeltaHeader::from_json(&v.to_string(), Path::new("x")).unwrap_err();
        assert!(matches!(err, FormatError::UnknownDtype { .. }), "{err}");
    }

    #[test]
    fn summary_counts_signs_padding_and_scale() {
        let s = header().summary();
        // w: 4 rows * 3 words * 4 bytes + 4-byte scale = 52 bytes for 280 params.
        assert_eq!(s.compressed_params, 280);
        assert_eq!(s.compressed_bytes, 52);
        assert_eq!(s.full_params, 70);
        assert_eq!(s.full_bytes, 140);
        assert!((s.bits_per_param() - 52.0 * 8.0 / 280.0).abs() < 1e-12);
        assert_eq!(s.tensors.len(), 2);
    }
}
