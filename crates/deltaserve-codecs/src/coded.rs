//! The compress pipeline for the codecs of [`crate::codec::CODECS`]: a base and a fine-tune in,
//! a `.delta` file of `coded` entries out.
//!
//! The same tensors as BitDelta are compressed ([`crate::bitdelta::is_compressed`]: every
//! attention and MLP projection), the rest is stored as the fine-tune's values, exactly as
//! BitDelta does, so methods differ only in how the projections are coded. Each projection is
//! decoded to f32 (both checkpoints stay memory-mapped), `D = W_ft − W_base` is formed in f32,
//! and the codec encodes it; matrices are encoded in parallel, one per thread, largest first.
//! Unlike [`crate::bitdelta::compress`], which streams, the coded parts are collected and the file
//! is written at the end with [`deltaserve_format::write_delta`] (atomic): part sizes are known
//! only after encoding (an energy-threshold rank), and coded parts are small next to the
//! checkpoint. The base fingerprint is hashed from the same memory maps.

use std::time::Instant;

use deltaserve_format::{
    write_delta, DeltaFile, DeltaHeader, FingerprintBuilder, FullValue, OwnedTensor, TensorEntry,
};
use deltaserve_model::{Checkpoint, RawTensor};
use rayon::prelude::*;

use crate::bitdelta::{check_pair, plan, weight_bytes, CompressOptions, CompressReport, Work};
use crate::codec::{CalibrationSet, Codec, Encoded, MatrixInput};
use crate::error::{CodecError, Result};
use crate::files::finetune_files;
use crate::numeric::FloatDtype;
use crate::progress::Progress;

/// Compresses `finetuned` against `base` with `codec` and writes the delta to `opts.out`.
///
/// `calibration` holds input statistics by weight name for codecs that use them; a codec that
/// [needs](Codec::needs_calibration) them fails before anything is read if they are missing.
/// The header's `method` is the codec's full spec (`lowrank:rank=16,dtype=f16`).
pub fn compress_coded(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    codec: &dyn Codec,
    calibration: Option<&CalibrationSet>,
    opts: &CompressOptions,
) -> Result<CompressReport> {
    let start = Instant::now();
    if codec.needs_calibration() && calibration.is_none() {
        return Err(CodecError::BadOption {
            option: "--method",
            detail: format!(
                "{} needs calibration statistics of the layer inputs; give calibration data",
                codec.spec()
            ),
        });
    }
    if !opts.force && opts.out.symlink_metadata().is_ok() {
        return Err(CodecError::OutputExists {
            path: opts.out.clone(),
        });
    }
    check_pair(base, finetuned)?;
    let work = plan(base, finetuned)?;
    let (info, extra_files) = finetune_files(base, finetuned)?;

    let total: u64 = work.iter().map(Work::finetuned_bytes).sum();
    let progress = Progress::new(opts.progress, total, "compressing");
    let fingerprint = FingerprintBuilder::new();
    let mut order: Vec<&Work<'_>> = work.iter().collect();
    order.sort_by_key(|w| std::cmp::Reverse(w.bytes()));
    let results: Vec<Option<(String, Encoded)>> = order
        .par_iter()
        .map(|w| -> Result<Option<(String, Encoded)>> {
            let hash = |name: &str, raw: &RawTensor<'_>| {
                fingerprint.add_tensor(name, &raw.dtype.to_string(), raw.shape, raw.data)
            };
            let out = match w {
                Work::Sign {
                    name,
                    base: b,
                    finetuned: f,
                } => {
                    hash(name, b);
                    let encoded =
                        encode_tensor(codec, name, b, f, calibration.and_then(|c| c.get(*name)))?;
                    Some((name.to_string(), encoded))
                }
                Work::Full { name, base: b, .. } => {
                    if let Some(b) = b {
                        hash(name, b);
                    }
                    None
                }
                Work::BaseOnly { name, base: b } => {
                    hash(name, b);
                    None
                }
            };
            progress.inc(w.finetuned_bytes());
            Ok(out)
        })
        .collect::<Result<_>>()?;
    progress.finish();

    let mut header = DeltaHeader::new(codec.spec(), fingerprint.finish(), info);
    header.extra.insert(
        "codec".to_owned(),
        serde_json::json!({
            "spec": codec.spec(),
            "compressed": "2-D *.weight of modules named *proj* under *mlp* or *self_attn*",
            "difference": "finetuned - base in f32",
            "other_tensors": "stored as the fine-tune's values",
        }),
    );
    header.extra.extend(extra_files);
    let mut tensors = Vec::new();
    for w in &work {
        if let Work::Full {
            name, finetuned, ..
        } = w
        {
            header.tensors.insert(
                name.to_string(),
                TensorEntry::full(
                    name,
                    FullValue::Finetuned,
                    finetuned.shape.to_vec(),
                    finetuned.dtype,
                ),
            );
            tensors.push((
                name.to_string(),
                OwnedTensor::new(
                    finetuned.dtype,
                    finetuned.shape.to_vec(),
                    finetuned.data.to_vec(),
                ),
            ));
        }
    }
    let mut compressed = 0;
    for (name, encoded) in results.into_iter().flatten() {
        header.tensors.insert(name, encoded.entry);
        tensors.extend(encoded.tensors);
        compressed += 1;
    }
    write_delta(&opts.out, &header, tensors, opts.force)?;

    let summary = header.summary();
    let bytes_in = weight_bytes(&finetuned.weight_files())
        .map_err(CodecError::io("read the size of", finetuned.dir()))?;
    let bytes_out = std::fs::metadata(&opts.out)
        .map_err(CodecError::io("read the size of", &opts.out))?
        .len();
    Ok(CompressReport {
        out: opts.out.clone(),
        base: header.base.clone(),
        tensors_compressed: compressed,
        tensors_full: work
            .iter()
            .filter(|w| matches!(w, Work::Full { .. }))
            .count(),
        compressed_params: summary.compressed_params,
        total_params: work
            .iter()
            .map(|w| match w {
                Work::Sign { finetuned, .. } | Work::Full { finetuned, .. } => {
                    finetuned.shape.iter().product::<usize>() as u64
                }
                Work::BaseOnly { .. } => 0,
            })
            .sum(),
        bytes_in,
        bytes_out,
        bits_per_param: summary.bits_per_param(),
        elapsed: start.elapsed(),
    })
}

/// Encodes one planned projection with `codec` (both tensors decoded to f32).
pub fn encode_tensor(
    codec: &dyn Codec,
    name: &str,
    base: &RawTensor<'_>,
    finetuned: &RawTensor<'_>,
    calibration: Option<&crate::codec::Calibration>,
) -> Result<Encoded> {
    let decode = |raw: &RawTensor<'_>| {
        FloatDtype::from_safetensors(raw.dtype)
            .expect("planned as float. This is a bug.")
            .decode(raw.data)
    };
    let (b, f) = (decode(base), decode(finetuned));
    let input = MatrixInput {
        name,
        rows: base.shape[0],
        cols: base.shape[1],
        base: &b,
        finetuned: &f,
        base_dtype: base.dtype,
        calibration,
    };
    codec.encode(&input)
}

/// Whether a delta holds coded entries (any entry of kind `coded`).
pub fn has_coded(delta: &DeltaFile) -> bool {
    delta
        .header()
        .tensors
        .values()
        .any(|e| matches!(e, TensorEntry::Coded { .. }))
}
