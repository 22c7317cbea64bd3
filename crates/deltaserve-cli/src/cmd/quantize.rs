//! `deltaserve quantize`: a model quantized with RTN, GPTQ or block-wise (`blockq`, the base a
//! QA-HiRA adapter folds into), written back as a Hugging Face directory of dequantized weights,
//! so that it can serve as a *quantized base* for deltas (the BitDelta paper's "BitDelta on a
//! quantized base", §4.3) and for adapters (`finetune`, then `merge` into a quantized model).
//!
//! Layout of `--out`: the model's files with every attention/MLP projection replaced by its
//! quantized-then-dequantized value in the model's dtype (`model.safetensors`, sharded like
//! `merge` does), plus `quantization.delta`: the packed codes, scales and zero points as a delta
//! of the model against itself (`rtn`/`gptq`/`blockq` coded entries, `value: finetuned`), which
//! `deltaserve inspect` reads for the exact bits per weight. The weights are what the codes
//! decode to, rounded once to the model's dtype (bf16 for the demo family), which is what the
//! model computes with; the codes are kept so the size is accounted exactly, not estimated.
//! A delta compressed against `--out` records `--out`'s fingerprint, so it only loads with this
//! quantized base.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args as ClapArgs;
use deltaserve_codecs::bitdelta::CompressOptions;
use deltaserve_codecs::calib_stats::{collect_calibration, CalibStatsOptions};
use deltaserve_codecs::codec::{parse_codec, CalibrationSet};
use deltaserve_codecs::coded::compress_coded;
use deltaserve_codecs::merge::{merge, MergeOptions, DEFAULT_MAX_SHARD_SIZE};
use deltaserve_format::DeltaFile;
use deltaserve_model::{Checkpoint, Model, TextCodec};

/// The file in `--out` holding the packed codes.
pub use deltaserve_codecs::qahira::CODES_FILE;

#[derive(ClapArgs)]
pub struct Args {
    /// The model to quantize: a Hugging Face directory or a Hub id in the local cache.
    #[arg(long)]
    model: String,
    /// rtn8 (round-to-nearest, 8 bits, one asymmetric min/max group per output row), gptq4
    /// (GPTQ, 4 bits, groups of 128 columns, damping 0.01, act-order off; needs --data), or a
    /// full spec: rtn:bits=N,group=N,sym=0|1 or gptq:bits=N,group=N,damp=F,act_order=0|1; or
    /// blockq:bits=N,rows=R,cols=C (min/max round-to-nearest in R x C blocks with an F32 scale and
    /// offset each, default 4 bits in 8 x 4 blocks): the base a QA-HiRA adapter trained with
    /// `finetune --adapter qahira --hira-groups C,R` folds into (`merge` then writes a quantized
    /// model).
    #[arg(long, default_value = "gptq4")]
    method: String,
    /// Calibration text for GPTQ: a .txt or .jsonl file (or a directory of them), e.g.
    /// assets/demo/data/calib.txt. The model runs over it to collect each projection's input
    /// statistics.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Calibration tokens to use at most.
    #[arg(long, default_value_t = 32768)]
    calib_tokens: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// The directory to create.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// Dtype of the written (dequantized) weights: as-base (the model's own, bf16 for the demo
    /// family: what the model computes with, the codes' values rounded once), or f32 (the codes'
    /// values exactly, so that a QA-HiRA adapter merged later gives exactly base + adapter).
    #[arg(long, default_value = "as-base")]
    dtype: String,
    /// Do not draw progress bars.
    #[arg(long)]
    quiet: bool,
}

/// `rtn8` / `gptq4` to their specs; anything else must name the rtn, gptq or blockq codec.
fn method_spec(method: &str) -> Result<String> {
    Ok(match method.trim() {
        "rtn8" => "rtn:bits=8".to_owned(),
        "gptq4" => "gptq:bits=4,group=128".to_owned(),
        s if s.starts_with("rtn") || s.starts_with("gptq") || s.starts_with("blockq") => {
            s.to_owned()
        }
        other => bail!("--method {other}: expected rtn8, gptq4, rtn:..., gptq:... or blockq:..."),
    })
}

/// Reads calibration text under `data`, tokenizes it with `ckpt`'s tokenizer (documents joined
/// by EOS) and collects `Σ xᵀx` per projection by running `ckpt` in f32 on the CPU.
pub fn calibration(
    ckpt: &Checkpoint,
    data: &Path,
    seq_len: usize,
    max_tokens: usize,
    progress: bool,
) -> Result<CalibrationSet> {
    let model = Model::load(ckpt, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading {} for calibration", ckpt.dir().display()))?;
    let eos = model.config().eos_token_ids.clone();
    let codec = TextCodec::from_dir(ckpt.dir(), &eos)
        .with_context(|| format!("loading the tokenizer of {}", ckpt.dir().display()))?;
    let mut tokens = Vec::new();
    'files: for (path, jsonl) in deltaserve_train::data::list_files(&[data.to_owned()])
        .with_context(|| format!("--data {}", data.display()))?
    {
        for doc in deltaserve_train::data::read_documents(&path, jsonl)? {
            if !tokens.is_empty() {
                tokens.extend(eos.first());
            }
            tokens.extend(deltaserve_train::data::tokenize(&doc, &codec)?);
            if tokens.len() >= max_tokens {
                break 'files;
            }
        }
    }
    let opts = CalibStatsOptions {
        seq_len,
        max_tokens,
        progress,
    };
    collect_calibration(&model, &tokens, &opts)
        .with_context(|| format!("--data {}", data.display()))
}

pub fn run(a: Args) -> Result<()> {
    let spec = method_spec(&a.method)?;
    let dtype = match a.dtype.as_str() {
        "as-base" => None,
        other => Some(
            deltaserve_codecs::numeric::FloatDtype::parse(other)
                .with_context(|| format!("--dtype {other}: expected as-base, f32, bf16 or f16"))?,
        ),
    };
    let codec = parse_codec(&spec).with_context(|| format!("--method {}", a.method))?;
    if codec.needs_calibration() && a.data.is_none() {
        bail!(
            "--method {}: GPTQ needs calibration text; add --data PATH (e.g. assets/demo/data/calib.txt)",
            a.method
        );
    }
    let (dir, ckpt) = super::common::open_for_output(&a.model, &a.out, a.force)?;
    let calib = match &a.data {
        Some(d) => Some(calibration(&ckpt, d, a.seq_len, a.calib_tokens, !a.quiet)?),
        None => None,
    };
    // The codes: the model against itself, every projection as an rtn/gptq entry.
    let parent = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let scratch = tempfile::Builder::new()
        .prefix(".deltaserve-quantize-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a scratch directory in {}", parent.display()))?;
    let codes_path = scratch.path().join(CODES_FILE);
    let report = compress_coded(
        &ckpt,
        &ckpt,
        codec.as_ref(),
        calib.as_ref(),
        &CompressOptions {
            out: codes_path.clone(),
            force: true,
            progress: !a.quiet,
        },
    )
    .with_context(|| format!("quantizing {} with {}", dir.display(), codec.spec()))?;
    let delta = DeltaFile::open(&codes_path)?;
    let merged = merge(
        &ckpt,
        &delta,
        &MergeOptions {
            out: a.out.clone(),
            force: a.force,
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
            dtype,
            progress: !a.quiet,
        },
    )
    .with_context(|| format!("writing the dequantized model to {}", a.out.display()))?;
    std::fs::rename(&codes_path, a.out.join(CODES_FILE))
        .with_context(|| format!("moving the codes into {}", a.out.display()))?;
    eprintln!("{report}");
    eprintln!("{merged}");
    eprintln!(
        "quantized base: {} ({}); codes and exact bits per weight: deltaserve inspect {}",
        a.out.display(),
        codec.spec(),
        a.out.join(CODES_FILE).display()
    );
    Ok(())
}
