//! Checks shared by the reader and the writer: the header's entries against the container's
//! tensors, so a file that [`crate::write_delta`] accepts is one that [`crate::DeltaFile`] opens.

use std::path::Path;

use safetensors::Dtype;

use crate::error::{FormatError, Result};
use crate::header::DeltaHeader;
use crate::signs::first_row_with_padding_set;
use crate::TensorEntry;

/// Checks that every container tensor named by an entry exists with the dtype and shape the
/// entry requires. `lookup` gives a container tensor's dtype and shape.
pub(crate) fn check_entries_against_container<'a>(
    path: &Path,
    header: &DeltaHeader,
    lookup: impl Fn(&str) -> Option<(Dtype, &'a [usize])>,
) -> Result<()> {
    for (entry_name, entry) in &header.tensors {
        for expected in entry.expected_tensors() {
            let (dtype, shape) =
                lookup(expected.name).ok_or_else(|| FormatError::MissingTensor {
                    path: path.to_owned(),
                    entry: entry_name.clone(),
                    tensor: expected.name.to_owned(),
                })?;
            // Header validation has already rejected unknown dtype names.
            if let Some(want) = expected.dtype {
                if dtype != want {
                    return Err(FormatError::WrongDtype {
                        path: path.to_owned(),
                        tensor: expected.name.to_owned(),
                        found: dtype.to_string(),
                        expected: want.to_string(),
                    });
                }
            }
            if shape != expected.shape.as_slice() {
                return Err(FormatError::WrongShape {
                    path: path.to_owned(),
                    tensor: expected.name.to_owned(),
                    found: shape.to_vec(),
                    expected: expected.shape.clone(),
                    why: expected.why.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Checks that the padding bits of a sign entry's words are zero.
pub(crate) fn check_padding(path: &Path, entry: &TensorEntry, words: &[u32]) -> Result<()> {
    if let TensorEntry::Sign {
        shape: [rows, cols],
        signs,
        ..
    } = entry
    {
        if let Some(row) = first_row_with_padding_set(words, *rows, *cols) {
            return Err(FormatError::PaddingBitsSet {
                path: path.to_owned(),
                tensor: signs.clone(),
                row,
                cols: *cols,
            });
        }
    }
    Ok(())
}
