//! `deltaserve merge`: base + delta back to a complete Hugging Face checkpoint directory.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use deltaserve_codecs::merge::{merge, parse_size, MergeOptions};
use deltaserve_codecs::numeric::FloatDtype;
use deltaserve_format::DeltaFile;
use deltaserve_model::Checkpoint;

#[derive(ClapArgs)]
pub struct Args {
    /// The base model the delta was made against: a Hugging Face directory or a Hub id in the
    /// local cache. Its fingerprint must match the one recorded in the delta.
    #[arg(long)]
    base: String,
    /// The delta file (made by `deltaserve compress`).
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
    /// reference merges), f32, bf16 or f16.
    #[arg(long, default_value = "as-base")]
    dtype: String,
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
