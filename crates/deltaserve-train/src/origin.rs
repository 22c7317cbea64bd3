//! Checks that a delta belongs to the base and fine-tune it is calibrated against.
//!
//! Calibrating a delta against the wrong pair would silently train it towards another model, so
//! both are checked before anything is loaded: the base by its fingerprint (recorded in the
//! header at compression), the fine-tune by its `config.json` (stored in the header) and by the
//! signs themselves, which calibration never changes: a few rows of one compressed matrix must
//! equal `sign(W_ft − W_base)` recomputed from the two checkpoints (two fine-tunes of one base
//! usually share their `config.json`).

use deltaserve_format::{fingerprint_safetensors, DeltaFile, Dtype, TensorEntry};
use deltaserve_model::Checkpoint;
use half::{bf16, f16};

use crate::error::{Result, TrainError};

/// Rows of one compressed matrix whose signs are recomputed.
const SIGN_CHECK_ROWS: usize = 8;
/// Fraction of recomputed signs allowed to differ. An unrelated model differs in about half;
/// the slack only covers a compressor that rounds the difference differently near zero.
const SIGN_CHECK_TOLERANCE: f64 = 0.01;

/// Fails unless `file` was compressed from the base checkpoint `base` (fingerprint match).
pub fn check_base(file: &DeltaFile, base: &Checkpoint) -> Result<()> {
    let found = fingerprint_safetensors(&base.weight_files())?;
    file.check_base(&found, base.dir())?;
    Ok(())
}

fn decode_rows(raw: deltaserve_model::RawTensor<'_>, values: usize) -> Option<Vec<f32>> {
    let size = match raw.dtype {
        Dtype::F32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        _ => return None,
    };
    let bytes = raw.data.get(..values * size)?;
    Some(match raw.dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    })
}

/// Fails unless `file` was compressed from the fine-tune `finetuned` (against `base`).
pub fn check_finetune(file: &DeltaFile, base: &Checkpoint, finetuned: &Checkpoint) -> Result<()> {
    let wrong = |detail: String| TrainError::WrongFinetune {
        delta: file.path().to_path_buf(),
        finetuned: finetuned.dir().to_path_buf(),
        detail,
    };
    match &file.header().finetuned.config {
        Some(stored) if stored != finetuned.config_json() => {
            let differing: Vec<String> =
                match (stored.as_object(), finetuned.config_json().as_object()) {
                    (Some(a), Some(b)) => {
                        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
                        keys.sort();
                        keys.dedup();
                        keys.into_iter()
                            .filter(|k| a.get(*k) != b.get(*k))
                            .map(|k| format!("`{k}`"))
                            .take(5)
                            .collect()
                    }
                    _ => vec![],
                };
            return Err(wrong(format!(
                "its config.json differs from the one stored in the delta (fields {})",
                differing.join(", ")
            )));
        }
        Some(_) => {}
        None => tracing::warn!(
            "delta {} stores no fine-tune config.json; not compared",
            file.path().display()
        ),
    }

    let Some((name, entry)) = file
        .header()
        .tensors
        .iter()
        .find(|(_, e)| matches!(e, TensorEntry::Sign { .. }))
    else {
        return Ok(());
    };
    let TensorEntry::Sign { shape: [n, k], .. } = entry else {
        return Ok(());
    };
    let rows = SIGN_CHECK_ROWS.min(*n);
    let (Ok(b), Ok(f)) = (base.raw(name), finetuned.raw(name)) else {
        return Err(wrong(format!(
            "tensor `{name}` is missing from the base or the fine-tune"
        )));
    };
    if b.shape != [*n, *k] || f.shape != [*n, *k] {
        return Err(wrong(format!(
            "tensor `{name}` is {:?} in the base and {:?} in the fine-tune, the delta says [{n}, {k}]",
            b.shape, f.shape
        )));
    }
    let (Some(bv), Some(fv)) = (decode_rows(b, rows * k), decode_rows(f, rows * k)) else {
        return Ok(());
    };
    let words = file.sign_words(entry)?;
    let wpr = k.div_ceil(32);
    let mut differ = 0usize;
    for r in 0..rows {
        for c in 0..*k {
            // FORMAT.md: bit 1 means D >= 0.
            let bit = (words[r * wpr + c / 32] >> (c % 32)) & 1 == 1;
            if bit != (fv[r * k + c] - bv[r * k + c] >= 0.0) {
                differ += 1;
            }
        }
    }
    let total = rows * k;
    if differ as f64 > SIGN_CHECK_TOLERANCE * total as f64 {
        return Err(wrong(format!(
            "the signs of `{name}` (first {rows} rows) disagree with sign(W_ft - W_base) at {differ} of {total} entries"
        )));
    }
    Ok(())
}
