//! The deltaserve delta file: read, write, validate, and fingerprint the base it belongs to.
//!
//! A *delta* stores a fine-tuned model as its difference from a base model. With BitDelta
//! (arXiv 2402.10193) each weight matrix's difference `W_ft - W_base` is kept as one sign bit
//! per parameter plus one `f32` scale, and the other tensors (embeddings, norms, `lm_head`,
//! biases) are kept in full. The file is a plain safetensors container whose
//! `__metadata__["deltaserve"]` holds a JSON [`DeltaHeader`]; `docs/FORMAT.md` specifies it
//! for other languages.
//!
//! This crate sits between checkpoints and codecs in deltaserve's flow
//! (checkpoint → **delta** → codec → kernels → model → engine → server). It knows bytes,
//! shapes and dtype names, and **no tensor library**: reconstructing weights is the codecs'
//! and kernels' job, and tools that only inspect, verify or convert deltas can depend on
//! this crate alone.
//!
//! - [`write_delta`] / [`write_atomic`]: write a delta (or any file) atomically.
//! - [`DeltaStreamWriter`]: write a delta tensor by tensor, header last (for streaming compressors).
//! - [`DeltaFile::open`]: map and validate a delta; read signs, scales and full tensors.
//! - [`pack_signs`] / [`unpack_signs`]: the sign-bit layout ([`signs`]).
//! - [`FingerprintBuilder`] / [`fingerprint_safetensors`]: the base fingerprint ([`fingerprint`]).
//!
//! ```
//! use deltaserve_format::*;
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("tiny.delta");
//!
//! // A 2x35 weight whose delta has these signs, with scale 0.01.
//! let delta: Vec<f32> = (0..70).map(|i| if i % 3 == 0 { 0.5 } else { -0.5 }).collect();
//! let base = FingerprintBuilder::new();
//! base.add_tensor("w", "BF16", &[2, 35], &[0u8; 140]);
//!
//! let mut header = DeltaHeader::new("bitdelta", base.finish(), FinetuneInfo::default());
//! header.tensors.insert("w".into(), TensorEntry::sign("w", [2, 35], Dtype::BF16));
//! let tensors = vec![
//!     ("w.signs".to_string(), OwnedTensor::from_u32(vec![2, 2], &pack_signs(&delta, 2, 35))),
//!     ("w.scale".to_string(), OwnedTensor::scale(0.01)),
//! ];
//! write_delta(&path, &header, tensors, false)?;
//!
//! let file = DeltaFile::open(&path)?;
//! let entry = file.entry("w")?;
//! assert_eq!(file.scale(entry)?, 0.01);
//! let signs = unpack_signs(&file.sign_words(entry)?, 2, 35);
//! assert_eq!(signs[0], 1.0);
//! assert_eq!(signs[1], -1.0);
//! // 2 rows x 2 words x 4 bytes of signs + a 4-byte scale.
//! assert_eq!(file.summary().compressed_bytes, 20);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

mod error;
pub mod fingerprint;
mod header;
mod read;
pub mod signs;
mod stream;
mod validate;
mod write;

pub use error::{FormatError, Result};
pub use fingerprint::{
    fingerprint_safetensors, BaseFingerprint, FingerprintBuilder, TensorHash, TensorHasher,
    FINGERPRINT_ALGORITHM,
};
pub use header::{
    format_version, parse_dtype, parse_format_version, CodedPart, DeltaHeader, DeltaSummary,
    ExpectedTensor, FinetuneInfo, FullValue, TensorEntry, TensorSummary, KNOWN_KINDS, METADATA_KEY,
};
pub use read::DeltaFile;
pub use safetensors::Dtype;
pub use signs::{
    pack_signs, pack_signs_f64, pack_signs_generic, unpack_signs, unpack_signs_into, words_per_row,
};
pub use stream::{DeltaStreamWriter, TensorSpec, HEADER_SLACK};
pub use write::{write_atomic, write_delta, OwnedTensor};

/// The format's major version: readers reject files with another major.
pub const FORMAT_MAJOR: u32 = 1;
/// The format's minor version: readers accept files with a newer minor (it only adds
/// optional fields).
pub const FORMAT_MINOR: u32 = 1;
