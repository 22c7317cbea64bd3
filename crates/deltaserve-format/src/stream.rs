//! Writing a delta tensor by tensor, for compressors that stream through checkpoints.
//!
//! [`crate::write_delta`] takes every tensor at once, so the whole delta sits in memory before
//! the first byte is written. [`DeltaStreamWriter`] instead fixes the layout up front (every
//! container tensor's name, dtype and shape are known before compression starts), then takes the
//! tensors' bytes in any order, from any thread, and writes each straight to its place in the
//! file. The header is written last, because one part of it (the base fingerprint) is only known
//! once the base has been read through.
//!
//! Room for the header is reserved when the writer is created: the header JSON at creation, plus
//! [`HEADER_SLACK`] bytes, padded with spaces (safetensors allows trailing whitespace in its
//! JSON). The header given to [`DeltaStreamWriter::finish`] must have the same tensor entries as
//! the one given at creation; its other fields (base fingerprint, calibration, extra) may change
//! as long as the JSON still fits.
//!
//! The file is written to a temporary sibling and renamed at the end, as by
//! [`crate::write_atomic`]: an interrupted compression leaves no file under the final name.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::error::{FormatError, Result};
use crate::header::{check_version, checked_numel, DeltaHeader, METADATA_KEY};
use crate::signs::words_from_le_bytes;
use crate::validate::{check_entries_against_container, check_padding};
use crate::TensorEntry;

/// Bytes reserved beyond the header JSON given at creation, for fields filled in at the end.
pub const HEADER_SLACK: usize = 4096;

/// A container tensor's name, dtype and shape, known before its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Its name in the container (`"model.layers.0.mlp.up_proj.weight.signs"`).
    pub name: String,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// Where one tensor goes in the file, and whether it has been written.
#[derive(Debug)]
struct Slot {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Offset from the start of the data section.
    offset: u64,
    len: usize,
    /// The sign entry whose padding this tensor's words must respect, if it holds signs.
    sign_entry: Option<TensorEntry>,
}

/// A delta being written tensor by tensor. The layout is fixed by [`create`](Self::create);
/// tensors then arrive in any order, from any thread, through [`write_tensor`](Self::write_tensor);
/// [`finish`](Self::finish) writes the header (same entries, other fields may change) into the room
/// reserved at creation ([`HEADER_SLACK`] bytes beyond the first header) and renames the file into place.
///
/// ```
/// use deltaserve_format::*;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("tiny.delta");
/// let mut header = DeltaHeader::new("bitdelta", FingerprintBuilder::new().finish(), FinetuneInfo::default());
/// header.tensors.insert("w".into(), TensorEntry::sign("w", [2, 35], Dtype::BF16));
/// let specs = vec![
///     TensorSpec { name: "w.signs".into(), dtype: Dtype::U32, shape: vec![2, 2] },
///     TensorSpec { name: "w.scale".into(), dtype: Dtype::F32, shape: vec![1] },
/// ];
/// let writer = DeltaStreamWriter::create(&path, &header, specs, false)?;
/// writer.write_tensor("w.scale", &0.25f32.to_le_bytes())?;
/// writer.write_tensor("w.signs", &[0u8; 16])?;
///
/// // The base fingerprint is known only now.
/// let base = FingerprintBuilder::new();
/// base.add_tensor("w", "BF16", &[2, 35], &[0u8; 140]);
/// header.base = base.finish();
/// writer.finish(&header)?;
///
/// let file = DeltaFile::open(&path)?;
/// assert_eq!(file.header().base, header.base);
/// assert_eq!(file.scale(file.entry("w")?)?, 0.25);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct DeltaStreamWriter {
    path: PathBuf,
    tmp_path: PathBuf,
    overwrite: bool,
    file: Mutex<File>,
    /// The tensor entries the layout was made for; `finish` insists on the same.
    entries: std::collections::BTreeMap<String, TensorEntry>,
    /// Tensor infos in file order, for the header JSON.
    infos: Vec<(String, TensorInfo)>,
    slots: HashMap<String, Slot>,
    /// Names written so far.
    written: Mutex<HashSet<String>>,
    /// Bytes of the JSON region (after the 8-byte length prefix).
    json_room: usize,
    /// Whether `finish` renamed the file (otherwise `Drop` removes the temporary file).
    done: bool,
}

impl DeltaStreamWriter {
    /// Checks `header` against `tensors` (every container tensor an entry names must be among
    /// them with the right dtype and shape; no name twice), lays the tensors out, and creates
    /// the temporary file beside `path`. Fails with [`FormatError::OutputExists`] if `path`
    /// exists and `overwrite` is false, before creating anything.
    pub fn create(
        path: &Path,
        header: &DeltaHeader,
        tensors: Vec<TensorSpec>,
        overwrite: bool,
    ) -> Result<DeltaStreamWriter> {
        check_version(&header.format_version, path)?;
        header.check_entries(path)?;
        if !overwrite && path.symlink_metadata().is_ok() {
            return Err(FormatError::OutputExists {
                path: path.to_owned(),
            });
        }

        let mut by_name: HashMap<&str, &TensorSpec> = HashMap::with_capacity(tensors.len());
        for spec in &tensors {
            if checked_numel(&spec.shape)
                .and_then(|n| n.checked_mul(spec.dtype.bitsize()))
                .is_none_or(|bits| bits % 8 != 0)
            {
                return Err(FormatError::TensorSize {
                    tensor: spec.name.clone(),
                    dtype: spec.dtype.to_string(),
                    shape: spec.shape.clone(),
                    found: 0,
                    expected: 0,
                });
            }
            if by_name.insert(&spec.name, spec).is_some() {
                return Err(FormatError::DuplicateTensor {
                    path: path.to_owned(),
                    tensor: spec.name.clone(),
                });
            }
        }
        check_entries_against_container(path, header, |name| {
            by_name.get(name).map(|t| (t.dtype, t.shape.as_slice()))
        })?;
        drop(by_name);

        // Same order as `write_delta` and the safetensors crate: larger alignment first, then by
        // name, so every tensor's data starts at a multiple of its element size.
        let mut tensors = tensors;
        tensors.sort_by(|l, r| r.dtype.cmp(&l.dtype).then(l.name.cmp(&r.name)));
        let sign_entries: HashMap<&str, &TensorEntry> = header
            .tensors
            .values()
            .filter_map(|e| match e {
                TensorEntry::Sign { signs, .. } => Some((signs.as_str(), e)),
                _ => None,
            })
            .collect();
        let mut offset = 0usize;
        let mut infos = Vec::with_capacity(tensors.len());
        let mut slots = HashMap::with_capacity(tensors.len());
        for spec in tensors {
            // Checked above: numel * bitsize fits and is whole bytes.
            let len = checked_numel(&spec.shape).unwrap_or(0) * spec.dtype.bitsize() / 8;
            let end = offset
                .checked_add(len)
                .ok_or_else(|| FormatError::TensorSize {
                    tensor: spec.name.clone(),
                    dtype: spec.dtype.to_string(),
                    shape: spec.shape.clone(),
                    found: 0,
                    expected: len,
                })?;
            infos.push((
                spec.name.clone(),
                TensorInfo {
                    dtype: spec.dtype,
                    shape: spec.shape.clone(),
                    data_offsets: (offset, end),
                },
            ));
            slots.insert(
                spec.name.clone(),
                Slot {
                    dtype: spec.dtype,
                    shape: spec.shape,
                    offset: offset as u64,
                    len,
                    sign_entry: sign_entries.get(spec.name.as_str()).map(|e| (*e).clone()),
                },
            );
            offset = end;
        }
        let data_len = offset;

        let json = metadata_json(path, header, &infos)?;
        let json_room = (json.len() + HEADER_SLACK).next_multiple_of(8);

        let tmp_path = crate::write::temp_sibling(path)?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp_path)
            .map_err(|source| FormatError::Io {
                path: tmp_path.clone(),
                action: "create",
                source,
            })?;
        let writer = DeltaStreamWriter {
            path: path.to_owned(),
            tmp_path,
            overwrite,
            file: Mutex::new(file),
            entries: header.tensors.clone(),
            infos,
            slots,
            written: Mutex::new(HashSet::new()),
            json_room,
            done: false,
        };
        let total = 8 + json_room as u64 + data_len as u64;
        writer
            .lock_file()
            .set_len(total)
            .map_err(|source| writer.io("size", source))?;
        Ok(writer)
    }

    /// Writes one container tensor's little-endian bytes to its place; callable from many
    /// threads, in any order. Sign tensors are checked for clean padding bits.
    pub fn write_tensor(&self, name: &str, data: &[u8]) -> Result<()> {
        let slot = self
            .slots
            .get(name)
            .ok_or_else(|| FormatError::NoSuchTensor {
                path: self.path.clone(),
                tensor: name.to_owned(),
            })?;
        if data.len() != slot.len {
            return Err(FormatError::TensorSize {
                tensor: name.to_owned(),
                dtype: slot.dtype.to_string(),
                shape: slot.shape.clone(),
                found: data.len(),
                expected: slot.len,
            });
        }
        if let Some(entry) = &slot.sign_entry {
            check_padding(&self.path, entry, &words_from_le_bytes(data))?;
        }
        {
            let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
            if !written.insert(name.to_owned()) {
                return Err(FormatError::DuplicateTensor {
                    path: self.path.clone(),
                    tensor: name.to_owned(),
                });
            }
        }
        let at = 8 + self.json_room as u64 + slot.offset;
        let mut file = self.lock_file();
        file.seek(SeekFrom::Start(at))
            .and_then(|_| file.write_all(data))
            .map_err(|source| self.io("write", source))
    }

    /// Writes the header (which must have the tensor entries given to [`create`](Self::create)),
    /// checks every tensor was written, syncs, and renames the file onto its final name.
    pub fn finish(mut self, header: &DeltaHeader) -> Result<()> {
        check_version(&header.format_version, &self.path)?;
        header.check_entries(&self.path)?;
        if header.tensors != self.entries {
            return Err(FormatError::BadHeader {
                path: self.path.clone(),
                field: "tensors".to_owned(),
                detail: "the entries differ from those the file was laid out for".to_owned(),
            });
        }
        {
            let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((name, _)) = self.infos.iter().find(|(n, _)| !written.contains(n)) {
                return Err(FormatError::MissingTensor {
                    path: self.path.clone(),
                    entry: "(stream writer)".to_owned(),
                    tensor: name.clone(),
                });
            }
        }
        let mut json = metadata_json(&self.path, header, &self.infos)?;
        if json.len() > self.json_room {
            return Err(FormatError::BadHeader {
                path: self.path.clone(),
                field: ".".to_owned(),
                detail: format!(
                    "the final header is {} bytes, more than the {} reserved for it",
                    json.len(),
                    self.json_room
                ),
            });
        }
        json.resize(self.json_room, b' ');
        {
            let mut file = self.lock_file();
            file.seek(SeekFrom::Start(0))
                .and_then(|_| file.write_all(&(json.len() as u64).to_le_bytes()))
                .and_then(|_| file.write_all(&json))
                .map_err(|source| self.io("write", source))?;
            file.sync_all().map_err(|source| self.io("sync", source))?;
        }
        // Checked again to narrow the window in which another process could have created `path`.
        if !self.overwrite && self.path.symlink_metadata().is_ok() {
            return Err(FormatError::OutputExists {
                path: self.path.clone(),
            });
        }
        std::fs::rename(&self.tmp_path, &self.path).map_err(|source| FormatError::Io {
            path: self.path.clone(),
            action: "rename a temporary file onto",
            source,
        })?;
        self.done = true;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    fn lock_file(&self) -> std::sync::MutexGuard<'_, File> {
        // A panic while holding the lock leaves the file handle usable.
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn io(&self, action: &'static str, source: io::Error) -> FormatError {
        FormatError::Io {
            path: self.tmp_path.clone(),
            action,
            source,
        }
    }
}

impl Drop for DeltaStreamWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// The safetensors header JSON for `infos` with `header` in its metadata.
fn metadata_json(
    path: &Path,
    header: &DeltaHeader,
    infos: &[(String, TensorInfo)],
) -> Result<Vec<u8>> {
    let metadata = HashMap::from([(METADATA_KEY.to_owned(), header.to_json())]);
    let metadata =
        Metadata::new(Some(metadata), infos.to_vec()).map_err(|e| FormatError::NotSafetensors {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    serde_json::to_vec(&metadata).map_err(|e| FormatError::BadHeader {
        path: path.to_owned(),
        field: ".".to_owned(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{pack_signs, unpack_signs, DeltaFile, FinetuneInfo, FingerprintBuilder, FullValue};

    fn setup() -> (DeltaHeader, Vec<TensorSpec>) {
        let mut header = DeltaHeader::new(
            "bitdelta",
            FingerprintBuilder::new().finish(),
            FinetuneInfo::default(),
        );
        header
            .tensors
            .insert("w".into(), TensorEntry::sign("w", [3, 40], Dtype::BF16));
        header.tensors.insert(
            "n".into(),
            TensorEntry::full("n", FullValue::Finetuned, vec![5], Dtype::BF16),
        );
        let specs = vec![
            TensorSpec {
                name: "w.signs".into(),
                dtype: Dtype::U32,
                shape: vec![3, 2],
            },
            TensorSpec {
                name: "w.scale".into(),
                dtype: Dtype::F32,
                shape: vec![1],
            },
            TensorSpec {
                name: "n".into(),
                dtype: Dtype::BF16,
                shape: vec![5],
            },
        ];
        (header, specs)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn streamed_delta_reads_back_in_any_write_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.delta");
        let (mut header, specs) = setup();
        let values: Vec<f32> = (0..120).map(|i| (i % 7) as f32 - 3.0).collect();
        let words = pack_signs(&values, 3, 40);
        let writer = DeltaStreamWriter::create(&path, &header, specs, false).unwrap();
        writer.write_tensor("n", &[7u8; 10]).unwrap();
        writer
            .write_tensor("w.signs", &crate::signs::words_to_le_bytes(&words))
            .unwrap();
        writer
            .write_tensor("w.scale", &1.5f32.to_le_bytes())
            .unwrap();
        let fp = FingerprintBuilder::new();
        fp.add_tensor("w", "BF16", &[3, 40], &[1u8; 240]);
        header.base = fp.finish();
        writer.finish(&header).unwrap();

        let file = DeltaFile::open(&path).unwrap();
        assert_eq!(file.header(), &header);
        let w = file.entry("w").unwrap();
        assert_eq!(file.scale(w).unwrap(), 1.5);
        assert_eq!(
            unpack_signs(&file.sign_words(w).unwrap(), 3, 40),
            unpack_signs(&words, 3, 40)
        );
        assert_eq!(file.tensor_bytes("n").unwrap().0, &[7u8; 10]);
        assert_eq!(names(dir.path()), ["s.delta"]);
    }

    #[test]
    fn unfinished_or_incomplete_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.delta");
        let (header, specs) = setup();
        let writer = DeltaStreamWriter::create(&path, &header, specs.clone(), false).unwrap();
        writer.write_tensor("n", &[7u8; 10]).unwrap();
        drop(writer);
        assert!(names(dir.path()).is_empty());

        let writer = DeltaStreamWriter::create(&path, &header, specs, false).unwrap();
        writer.write_tensor("n", &[7u8; 10]).unwrap();
        let err = writer.finish(&header).unwrap_err();
        assert!(err.to_string().contains("w.s"), "{err}");
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn bad_writes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.delta");
        let (header, specs) = setup();
        let writer = DeltaStreamWriter::create(&path, &header, specs, false).unwrap();
        assert!(matches!(
            writer.write_tensor("n", &[0u8; 9]),
            Err(FormatError::TensorSize { .. })
        ));
        assert!(matches!(
            writer.write_tensor("nope", &[0u8; 9]),
            Err(FormatError::NoSuchTensor { .. })
        ));
        let mut words = vec![0u32; 6];
        words[1] = 1 << 20; // column 52 of a 40-column row: padding
        assert!(matches!(
            writer.write_tensor("w.signs", &crate::signs::words_to_le_bytes(&words)),
            Err(FormatError::PaddingBitsSet { .. })
        ));
        writer.write_tensor("n", &[0u8; 10]).unwrap();
        assert!(matches!(
            writer.write_tensor("n", &[0u8; 10]),
            Err(FormatError::DuplicateTensor { .. })
        ));
    }

    #[test]
    fn existing_output_is_refused_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.delta");
        std::fs::write(&path, b"old").unwrap();
        let (header, specs) = setup();
        let err = DeltaStreamWriter::create(&path, &header, specs, false).unwrap_err();
        assert!(matches!(err, FormatError::OutputExists { .. }), "{err}");
        assert_eq!(names(dir.path()), ["s.delta"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }

    #[test]
    fn missing_spec_for_an_entry_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (header, mut specs) = setup();
        specs.retain(|s| s.name != "w.scale");
        let err = DeltaStreamWriter::create(&dir.path().join("s.delta"), &header, specs, false)
            .unwrap_err();
        assert!(matches!(err, FormatError::MissingTensor { .. }), "{err}");
    }
}
