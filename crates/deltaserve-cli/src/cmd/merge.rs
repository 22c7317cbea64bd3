//! `deltaserve merge`: base + delta back to a complete Hugging Face checkpoint directory.
//!
//! One case writes a *quantized* model instead (QA-HiRA, arXiv 2407.17029 §3.3): a QA-HiRA
//! adapter trained on a `blockq` quantized base (`deltaserve quantize --method blockq:...`) is
//! constant on each quantization block, so it folds into the blocks' offsets
//! ([`deltaserve_codecs::qahira::fold_adapter`]); `--out` then gets the same layout as
//! `quantize --out`: the dequantized weights plus a `quantization.delta` whose codes are the
//! base's, byte for byte, with new offsets. No adapter is left at inference.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use deltaserve_codecs::merge::{merge, parse_size, MergeOptions};
use deltaserve_codecs::numeric::FloatDtype;
use deltaserve_codecs::qahira::{adapter_block, codes_block, fold_adapter, open_codes, CODES_FILE};
use deltaserve_format::{fingerprint_safetensors, write_delta, DeltaFile};
use deltaserve_model::Checkpoint;

#[derive(ClapArgs)]
pub struct Args {
    /// The base model the delta was made against: a Hugging Face directory or a Hub id in the
    /// local cache. Its fingerprint must match the one recorded in the delta.
    #[arg(long)]
    base: String,
    /// The delta file (made by `deltaserve compress` or `deltaserve finetune`).
    #[arg(long)]
    delta: PathBuf,
    /// The checkpoint directory to create (written under a temporary name, renamed at the end).
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// Largest safetensors shard: 2GB, 500MB, 1GiB or a byte count. More than one shard adds
    /// model.safetensors.index.json.
    #[arg(long, default_value = "2GB")]
    max_shard_size: String,
    /// Dtype of the written weights: as-base (each tensor in its base dtype, as the BitDelta
    /// reference merges), f32, bf16 or f16. For a quantized merge these are the new codes'
    /// dequantized values rounded once to this dtype (f32 keeps them exact).
    #[arg(long, default_value = "as-base")]
    dtype: String,
    /// Whether to write a quantized model: auto (when --delta is a QA-HiRA adapter and --base a
    /// `quantize --method blockq:...` base with the adapter's blocks, fold the adapter into the
    /// base's codes and write dequantized weights + quantization.delta with the base's codes;
    /// a block mismatch is an error; any other pair merges densely), yes (require the fold),
    /// no (always a dense merge: base weights + adapter, no quantization.delta).
    #[arg(long, default_value = "auto")]
    quantized: String,
    /// Do not draw a progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dtype = match a.dtype.as_str() {
        "as-base" => None,
        other => Some(
            FloatDtype::parse(other)
                .with_context(|| format!("--dtype {other}: expected as-base, f32, bf16 or f16"))?,
        ),
    };
    let max_shard_size = parse_size(&a.max_shard_size)?;
    let dir = deltaserve_model::resolve_model_dir(&a.base)
        .with_context(|| format!("--base {}", a.base))?;
    let base = Checkpoint::open(&dir)
        .with_context(|| format!("opening the base model {}", dir.display()))?;
    let delta = DeltaFile::open(&a.delta)
        .with_context(|| format!("opening delta {}", a.delta.display()))?;
    let opts = MergeOptions {
        out: a.out.clone(),
        force: a.force,
        max_shard_size,
        dtype,
        progress: !a.quiet,
    };
    let codes = match a.quantized.as_str() {
        "no" => None,
        "auto" | "yes" => open_codes(&dir)?,
        other => bail!("--quantized {other}: expected auto, yes or no"),
    };
    let fold = match (a.quantized.as_str(), &codes) {
        ("yes", None) => bail!(
            "--quantized yes: {} has no {CODES_FILE}; make the base with `deltaserve quantize \
             --method blockq:bits=4,rows=R,cols=C` and fine-tune on it with --adapter qahira",
            dir.display()
        ),
        ("yes", Some(c)) => Some(c),
        (_, Some(c)) if adapter_block(&delta).is_some() && codes_block(c).is_some() => Some(c),
        _ => None,
    };
    if let Some(codes) = fold {
        return merge_quantized(&base, codes, &delta, &opts);
    }
    let report = merge(&base, &delta, &opts).with_context(|| {
        format!(
            "merging {} onto {}",
            a.delta.display(),
            base.dir().display()
        )
    })?;
    eprintln!("{report}");
    Ok(())
}

/// The QA-HiRA fold: new codes (offsets + adapter), their dequantized weights through the
/// ordinary merge, and the codes file, all in a scratch directory renamed onto `--out` at the end.
fn merge_quantized(
    base: &Checkpoint,
    codes: &DeltaFile,
    adapter: &DeltaFile,
    opts: &MergeOptions,
) -> Result<()> {
    let out = &opts.out;
    if !opts.force && out.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; use --force to replace it",
            out.display()
        );
    }
    let fp = fingerprint_safetensors(&base.weight_files())?;
    adapter.check_base(&fp, base.dir())?;
    let folded = fold_adapter(codes, adapter, fp).with_context(|| {
        format!(
            "folding {} into the codes of {}",
            adapter.path().display(),
            base.dir().display()
        )
    })?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let scratch = tempfile::Builder::new()
        .prefix(".deltaserve-merge-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a scratch directory in {}", parent.display()))?;
    let codes_path = scratch.path().join(CODES_FILE);
    write_delta(&codes_path, &folded.header, folded.tensors, true)?;
    let new_codes = DeltaFile::open(&codes_path)?;
    let staged = scratch.path().join("model");
    let report = merge(
        base,
        &new_codes,
        &MergeOptions {
            out: staged.clone(),
            force: false,
            ..opts.clone()
        },
    )
    .with_context(|| format!("writing the dequantized weights for {}", out.display()))?;
    std::fs::rename(&codes_path, staged.join(CODES_FILE))
        .with_context(|| format!("moving the codes into {}", staged.display()))?;
    if opts.force && out.symlink_metadata().is_ok() {
        std::fs::remove_dir_all(out)
            .with_context(|| format!("removing the old {} (--force)", out.display()))?;
    }
    std::fs::rename(&staged, out)
        .with_context(|| format!("renaming {} onto {}", staged.display(), out.display()))?;
    eprintln!(
        "wrote {} in {:.2}s: {} projections' QA-HiRA adapter folded into the quantization offsets \
         of {} (codes unchanged; no adapter left); codes and exact bits per weight: deltaserve \
         inspect {}",
        out.display(),
        report.elapsed.as_secs_f64(),
        folded.folded,
        base.dir().display(),
        out.join(CODES_FILE).display()
    );
    Ok(())
}
