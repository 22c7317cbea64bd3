//! `deltaserve compress`: a fine-tune and its base in, a `.delta` file out.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use deltaserve_codecs::bitdelta::{compress_with, CompressOptions, METHODS};
use deltaserve_model::Checkpoint;

#[derive(ClapArgs)]
pub struct Args {
    /// The base model the fine-tune was trained from: a Hugging Face directory or a Hub id in the
    /// local cache.
    #[arg(long)]
    base: String,
    /// The fine-tuned model: a Hugging Face directory or a Hub id in the local cache.
    #[arg(long)]
    finetuned: String,
    /// Compression method. bitdelta: one sign bit per weight of every attention and MLP
    /// projection plus one scale per matrix; other tensors stored as the fine-tune's values.
    #[arg(long, default_value = "bitdelta")]
    method: String,
    /// The delta file to write (conventionally NAME.delta).
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// Do not draw a progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    // An unknown method fails before any checkpoint is opened.
    anyhow::ensure!(
        METHODS.contains(&a.method.as_str()),
        "unknown compression method \"{}\" (known: {})",
        a.method,
        METHODS.join(", ")
    );
    let open = |spec: &str, what: &str| -> Result<Checkpoint> {
        let dir = deltaserve_model::resolve_model_dir(spec)
            .with_context(|| format!("--{what} {spec}"))?;
        Checkpoint::open(&dir)
            .with_context(|| format!("opening the {what} model {}", dir.display()))
    };
    let base = open(&a.base, "base")?;
    let finetuned = open(&a.finetuned, "finetuned")?;
    let opts = CompressOptions {
        out: a.out.clone(),
        force: a.force,
        progress: !a.quiet,
    };
    let report = compress_with(&a.method, &base, &finetuned, &opts).with_context(|| {
        format!(
            "compressing {} against {}",
            finetuned.dir().display(),
            base.dir().display()
        )
    })?;
    eprintln!("{report}");
    Ok(())
}
