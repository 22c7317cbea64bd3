//! `deltaserve inspect`: what a delta file holds.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use deltaserve_format::DeltaFile;

#[derive(ClapArgs)]
pub struct Args {
    /// The delta file.
    file: PathBuf,
    /// Print JSON (method, base fingerprint, sizes, and every tensor's kind, shape, dtype and
    /// scale) instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let delta =
        DeltaFile::open(&a.file).with_context(|| format!("opening delta {}", a.file.display()))?;
    let description = deltaserve_codecs::inspect::describe(&delta)?;
    let text = if a.json {
        format!("{}\n", serde_json::to_string_pretty(&description)?)
    } else {
        description.to_string()
    };
    // A closed pipe (`deltaserve inspect x.delta | head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}
