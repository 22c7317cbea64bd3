//! Writing deltas, atomically.
//!
//! A delta is written to a temporary file beside the output, synced, and renamed onto the
//! output name, so a reader (or a server watching the directory) sees the old file or the whole
//! new one, never half of one; a crash leaves at most a `.{name}.tmp-{pid}` file behind.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::error::{FormatError, Result};
use crate::header::{check_version, checked_numel, DeltaHeader, METADATA_KEY};
use crate::signs::{words_from_le_bytes, words_to_le_bytes};
use crate::validate::{check_entries_against_container, check_padding};
use crate::TensorEntry;

/// A tensor to be written: safetensors dtype, shape and raw little-endian bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedTensor {
    /// The element type.
    pub dtype: Dtype,
    /// The shape.
    pub shape: Vec<usize>,
    /// Row-major little-endian bytes; [`write_delta`] checks the length against dtype and shape.
    pub data: Vec<u8>,
}

impl OwnedTensor {
    /// A tensor from raw bytes.
    pub fn new(dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> OwnedTensor {
        OwnedTensor { dtype, shape, data }
    }

    /// A `U32` tensor, e.g. packed signs of shape `[rows, words_per_row(cols)]`.
    pub fn from_u32(shape: Vec<usize>, words: &[u32]) -> OwnedTensor {
        OwnedTensor::new(Dtype::U32, shape, words_to_le_bytes(words))
    }

    /// An `F32` tensor.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> OwnedTensor {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        OwnedTensor::new(Dtype::F32, shape, data)
    }

    /// A sign entry's scale: `F32 [1]`.
    pub fn scale(scale: f32) -> OwnedTensor {
        OwnedTensor::from_f32(vec![1], &[scale])
    }

    /// The byte length that dtype and shape require, `None` on overflow or a sub-byte remainder.
    fn expected_len(&self) -> Option<usize> {
        let bits = checked_numel(&self.shape)?.checked_mul(self.dtype.bitsize())?;
        (bits % 8 == 0).then_some(bits / 8)
    }
}

impl TensorEntry {
    /// A sign entry for weight `name` with the conventional container names
    /// `"{name}.signs"` and `"{name}.scale"`.
    pub fn sign(name: &str, shape: [usize; 2], dtype: Dtype) -> TensorEntry {
        TensorEntry::Sign {
            shape,
            signs: format!("{name}.signs"),
            scale: format!("{name}.scale"),
            dtype: dtype.to_string(),
        }
    }

    /// A full entry for weight `name`, stored under its own name in the container.
    pub fn full(
        name: &str,
        value: crate::FullValue,
        shape: Vec<usize>,
        dtype: Dtype,
    ) -> TensorEntry {
        TensorEntry::Full {
            tensor: name.to_owned(),
            value,
            shape,
            dtype: dtype.to_string(),
        }
    }
}

/// Writes a delta file: `tensors` in a safetensors container whose `__metadata__["deltaserve"]`
/// is `header`'s JSON. Checks first that the header's entries match the tensors (what
/// [`crate::DeltaFile::open`] will check) and that sign padding bits are zero, so a bad delta is
/// never written. Written through [`write_atomic`]; an existing `path` is replaced only if
/// `overwrite`.
pub fn write_delta(
    path: &Path,
    header: &DeltaHeader,
    tensors: Vec<(String, OwnedTensor)>,
    overwrite: bool,
) -> Result<()> {
    check_version(&header.format_version, path)?;
    header.check_entries(path)?;

    let mut by_name: HashMap<&str, &OwnedTensor> = HashMap::with_capacity(tensors.len());
    for (name, tensor) in &tensors {
        let expected = tensor.expected_len();
        if expected != Some(tensor.data.len()) {
            return Err(FormatError::TensorSize {
                tensor: name.clone(),
                dtype: tensor.dtype.to_string(),
                shape: tensor.shape.clone(),
                found: tensor.data.len(),
                expected: expected.unwrap_or(0),
            });
        }
        if by_name.insert(name, tensor).is_some() {
            return Err(FormatError::DuplicateTensor {
                path: path.to_owned(),
                tensor: name.clone(),
            });
        }
    }
    check_entries_against_container(path, header, |name| {
        by_name.get(name).map(|t| (t.dtype, t.shape.as_slice()))
    })?;
    for entry in header.tensors.values() {
        if let TensorEntry::Sign { signs, .. } = entry {
            if let Some(t) = by_name.get(signs.as_str()) {
                check_padding(path, entry, &words_from_le_bytes(&t.data))?;
            }
        }
    }
    drop(by_name);

    // Same order as the safetensors crate: larger alignment first, then by name, so every
    // tensor's data starts at a multiple of its element size.
    let mut tensors = tensors;
    tensors.sort_by(|(ln, lt), (rn, rt)| rt.dtype.cmp(&lt.dtype).then(ln.cmp(rn)));
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(tensors.len());
    for (name, tensor) in &tensors {
        let end = offset + tensor.data.len();
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: tensor.dtype,
                shape: tensor.shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    let metadata = HashMap::from([(METADATA_KEY.to_owned(), header.to_json())]);
    let metadata =
        Metadata::new(Some(metadata), infos).map_err(|e| FormatError::NotSafetensors {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    let mut json = serde_json::to_string(&metadata)
        .map_err(|e| FormatError::BadHeader {
            path: path.to_owned(),
            field: ".".to_owned(),
            detail: e.to_string(),
        })?
        .into_bytes();
    // safetensors pads the JSON with spaces to a multiple of 8 bytes, keeping the data aligned.
    json.resize(json.len().next_multiple_of(8), b' ');

    write_atomic(path, overwrite, |out| {
        out.write_all(&(json.len() as u64).to_le_bytes())?;
        out.write_all(&json)?;
        for (_, tensor) in &tensors {
            out.write_all(&tensor.data)?;
        }
        Ok(())
    })
}

/// Writes a file atomically: `write` fills a temporary file `.{name}.tmp-{pid}` in the same
/// directory, which is then flushed, fsynced and renamed onto `path`.
///
/// If `path` exists and `overwrite` is false, nothing is written and the error says to use
/// `--force`. If `write` fails (or panics), the temporary file is removed and an existing
/// `path` is left as it was.
pub fn write_atomic(
    path: &Path,
    overwrite: bool,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<()> {
    let refuse = || FormatError::OutputExists {
        path: path.to_owned(),
    };
    if !overwrite && path.symlink_metadata().is_ok() {
        return Err(refuse());
    }
    let io_err = |action: &'static str, p: &Path| {
        let p = p.to_owned();
        move |source| FormatError::Io {
            path: p,
            action,
            source,
        }
    };
    let tmp_path = temp_sibling(path)?;
    let dir = tmp_path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);

    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp_path)
        .map_err(io_err("create", &tmp_path))?;
    let guard = RemoveOnDrop(Some(tmp_path.clone()));

    let mut out = BufWriter::with_capacity(1 << 20, file);
    write(&mut out).map_err(io_err("write", &tmp_path))?;
    let file = out
        .into_inner()
        .map_err(|e| io_err("write", &tmp_path)(e.into_error()))?;
    file.sync_all().map_err(io_err("sync", &tmp_path))?;
    drop(file);

    // Checked again to narrow the window in which another process could have created `path`.
    if !overwrite && path.symlink_metadata().is_ok() {
        return Err(refuse());
    }
    std::fs::rename(&tmp_path, path).map_err(io_err("rename a temporary file onto", path))?;
    guard.disarm();
    // Persist the rename itself; not every platform or filesystem can sync a directory, and the
    // data is already safe, so a failure here is not an error.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Removes a temporary file when dropped, unless disarmed (after a successful rename).
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `.{name}.tmp-{pid}` beside `path`: where [`write_atomic`] and the stream writer put a file
/// before renaming it onto `path`.
pub(crate) fn temp_sibling(path: &Path) -> Result<PathBuf> {
    let file_name = path.file_name().ok_or_else(|| FormatError::Io {
        path: path.to_owned(),
        action: "write",
        source: io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    Ok(dir.join(tmp_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_atomic_refuses_to_overwrite_without_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.delta");
        std::fs::write(&path, b"old").unwrap();
        let err = write_atomic(&path, false, |w| w.write_all(b"new")).unwrap_err();
        assert!(matches!(err, FormatError::OutputExists { .. }));
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(err.to_string().contains("out.delta"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.path()), ["out.delta"]);

        write_atomic(&path, true, |w| w.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(entries(dir.path()), ["out.delta"]);
    }

    #[test]
    fn write_atomic_leaves_no_temp_file_when_writer_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.delta");
        let err = write_atomic(&path, false, |w| {
            w.write_all(b"partial")?;
            Err(io::Error::other("disk on fire"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
    }

    #[test]
    fn write_atomic_keeps_previous_file_when_writer_fails_with_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.delta");
        std::fs::write(&path, b"previous").unwrap();
        write_atomic(&path, true, |w| {
            w.write_all(b"half of the new one")?;
            Err(io::Error::other("interrupted"))
        })
        .unwrap_err();
        assert_eq!(std::fs::read(&path).unwrap(), b"previous");
        assert_eq!(entries(dir.path()), ["out.delta"]);
    }

    #[test]
    fn write_atomic_removes_temp_file_when_writer_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.delta");
        let result = std::panic::catch_unwind(|| {
            let _ = write_atomic(&path, false, |w| {
                w.write_all(b"x")?;
                panic!("writer bug");
            });
        });
        assert!(result.is_err());
        assert!(entries(dir.path()).is_empty());
    }
}
