//! Reading deltas: memory-map, parse, validate everything before the first accessor runs.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};

use crate::error::{FormatError, Result};
use crate::fingerprint::BaseFingerprint;
use crate::header::{DeltaHeader, DeltaSummary, METADATA_KEY};
use crate::signs::words_from_le_bytes;
use crate::validate::{check_entries_against_container, check_padding};
use crate::TensorEntry;

/// Bytes before the safetensors JSON: its length as a little-endian u64.
const LEN_PREFIX: usize = 8;

/// Memory-maps a whole file read-only.
pub(crate) fn map_file(path: &Path) -> Result<Mmap> {
    let io = |action| {
        move |source| FormatError::Io {
            path: path.to_owned(),
            action,
            source,
        }
    };
    let file = File::open(path).map_err(io("open"))?;
    // SAFETY: the map is read-only. Another process truncating or rewriting the file while it
    // is mapped is undefined behaviour, as for every mmap-based safetensors reader (candle,
    // safetensors' own examples); deltaserve itself only ever replaces files by rename
    // (`write_atomic`), which leaves existing maps intact.
    unsafe { Mmap::map(&file) }.map_err(io("memory-map"))
}

/// An open delta file: memory-mapped, with its header parsed and checked against its tensors.
///
/// [`DeltaFile::open`] rejects a file whose header and tensors disagree, so the accessors only
/// fail when asked for something the file does not have.
#[derive(Debug)]
pub struct DeltaFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the tensor data in the file (after the length prefix and the JSON).
    data_start: usize,
    metadata: Metadata,
    header: DeltaHeader,
}

impl DeltaFile {
    /// Opens, parses and validates a delta: the container (truncation, offsets), the format
    /// version, the header schema, and every entry's tensors (present, dtype, shape).
    pub fn open(path: impl AsRef<Path>) -> Result<DeltaFile> {
        let path = path.as_ref().to_owned();
        let mmap = map_file(&path)?;
        let (json_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| FormatError::NotSafetensors {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        let json = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| FormatError::NotADelta { path: path.clone() })?;
        let header = DeltaHeader::from_json(json, &path)?;
        let file = DeltaFile {
            data_start: LEN_PREFIX + json_len,
            path,
            mmap,
            metadata,
            header,
        };
        check_entries_against_container(&file.path, &file.header, |name| {
            file.metadata
                .info(name)
                .map(|info| (info.dtype, info.shape.as_slice()))
        })?;
        Ok(file)
    }

    /// The parsed header.
    pub fn header(&self) -> &DeltaHeader {
        &self.header
    }

    /// The path the delta was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes.
    pub fn file_size(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// The header entry for weight `name`.
    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.header
            .tensors
            .get(name)
            .ok_or_else(|| FormatError::NoSuchEntry {
                path: self.path.clone(),
                name: name.to_owned(),
            })
    }

    /// The names of all tensors in the container (in file order).
    pub fn container_tensor_names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    /// A container tensor's raw little-endian bytes, dtype and shape, borrowed from the map.
    pub fn tensor_bytes(&self, name: &str) -> Result<(&[u8], Dtype, &[usize])> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| FormatError::NoSuchTensor {
                path: self.path.clone(),
                tensor: name.to_owned(),
            })?;
        let (start, end) = info.data_offsets;
        // `read_metadata` has checked that the offsets tile the data exactly, so this is in bounds;
        // `get` keeps a broken invariant an error rather than a panic.
        let bytes = self
            .data_start
            .checked_add(start)
            .zip(self.data_start.checked_add(end))
            .and_then(|(s, e)| self.mmap.get(s..e))
            .ok_or_else(|| FormatError::NotSafetensors {
                path: self.path.clone(),
                detail: format!("tensor \"{name}\" lies outside the file"),
            })?;
        Ok((bytes, info.dtype, info.shape.as_slice()))
    }

    /// A sign entry's packed words as little-endian bytes, borrowed from the map (for copying
    /// straight to a device). Layout in [`crate::signs`].
    pub fn sign_bytes(&self, entry: &TensorEntry) -> Result<&[u8]> {
        let TensorEntry::Sign { signs, .. } = entry else {
            return Err(self.wrong_kind("sign_bytes", "sign", entry));
        };
        Ok(self.tensor_bytes(signs)?.0)
    }

    /// A sign entry's packed words, `[rows, words_per_row(cols)]` row-major. Fails if a padding
    /// bit is set (the writer was broken), so every word this returns is well-formed.
    pub fn sign_words(&self, entry: &TensorEntry) -> Result<Vec<u32>> {
        let words = words_from_le_bytes(self.sign_bytes(entry)?);
        check_padding(&self.path, entry, &words)?;
        Ok(words)
    }

    /// A sign entry's scale.
    pub fn scale(&self, entry: &TensorEntry) -> Result<f32> {
        let TensorEntry::Sign { scale, .. } = entry else {
            return Err(self.wrong_kind("scale", "sign", entry));
        };
        let (bytes, _, _) = self.tensor_bytes(scale)?;
        // `open` checked the scale is F32 [1], i.e. exactly 4 bytes.
        let word: [u8; 4] = bytes.try_into().map_err(|_| FormatError::WrongShape {
            path: self.path.clone(),
            tensor: scale.clone(),
            found: vec![bytes.len() / 4],
            expected: vec![1],
            why: " (a scale is one f32)".to_owned(),
        })?;
        Ok(f32::from_le_bytes(word))
    }

    /// A coded entry's part `role`: its raw little-endian bytes, dtype and shape, borrowed from
    /// the map. `open` has checked the part against the header, so dtype and shape are as declared.
    pub fn part(&self, entry: &TensorEntry, role: &str) -> Result<(&[u8], Dtype, &[usize])> {
        let TensorEntry::Coded { parts, codec, .. } = entry else {
            return Err(self.wrong_kind("part", "coded", entry));
        };
        let part = parts.get(role).ok_or_else(|| FormatError::MissingPart {
            path: self.path.clone(),
            codec: codec.clone(),
            role: role.to_owned(),
        })?;
        self.tensor_bytes(&part.tensor)
    }

    /// Checks that `base` (the fingerprint of the model at `base_path`) is the base this delta
    /// was compressed from.
    pub fn check_base(&self, base: &BaseFingerprint, base_path: &Path) -> Result<()> {
        let recorded = &self.header.base;
        if recorded.algorithm != base.algorithm {
            return Err(FormatError::FingerprintAlgorithm {
                delta: self.path.clone(),
                expected: recorded.algorithm.clone(),
                found: base.algorithm.clone(),
            });
        }
        if recorded.hex != base.hex || recorded.tensors != base.tensors {
            return Err(FormatError::BaseMismatch {
                delta: self.path.clone(),
                base: base_path.to_owned(),
                expected: recorded.short().to_owned(),
                found: base.short().to_owned(),
            });
        }
        Ok(())
    }

    /// Bytes per tensor and bits per parameter, from the sizes actually stored.
    pub fn summary(&self) -> DeltaSummary {
        DeltaSummary::from_entries(&self.header.tensors, |expected| {
            self.metadata.info(expected.name).map_or(0, |info| {
                info.data_offsets.1.saturating_sub(info.data_offsets.0) as u64
            })
        })
    }

    fn wrong_kind(
        &self,
        accessor: &'static str,
        expected: &'static str,
        entry: &TensorEntry,
    ) -> FormatError {
        FormatError::WrongEntryKind {
            path: self.path.clone(),
            accessor,
            expected,
            found: entry.kind(),
        }
    }
}
