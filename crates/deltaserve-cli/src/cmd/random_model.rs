//! `deltaserve random-model`: random checkpoints of real shapes, for benchmarks and tests.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use deltaserve_model::random::{RandomCheckpoint, RandomShape};
use deltaserve_model::Checkpoint;

#[derive(ClapArgs)]
pub struct Args {
    /// Shape preset: tiny, llama-100m, llama2-7b.
    #[arg(long, default_value = "tiny")]
    shape: String,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    /// Store weights in f32 instead of bf16.
    #[arg(long)]
    f32: bool,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Make a fine-tune of this base: W = W_base + noise · RMS(W_base) · N(0,1).
    #[arg(long)]
    finetune_of: Option<PathBuf>,
    /// Relative size of the fine-tune's change (with --finetune-of).
    #[arg(long, default_value_t = 0.01)]
    noise: f32,
    /// Largest shard, in MB.
    #[arg(long, default_value_t = 2000)]
    max_shard_mb: usize,
    /// Copy tokenizer.json / tokenizer_config.json / generation_config.json from this directory.
    #[arg(long)]
    tokenizer_from: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let shape = RandomShape::preset(&a.shape).with_context(|| {
        format!(
            "--shape {}: expected tiny, llama-100m or llama2-7b",
            a.shape
        )
    })?;
    let base = a.finetune_of.as_ref().map(Checkpoint::open).transpose()?;
    RandomCheckpoint {
        shape,
        bf16: !a.f32,
        seed: a.seed,
        finetune_of: base.as_ref().map(|b| (b, a.noise)),
        max_shard_bytes: a.max_shard_mb * 1_000_000,
        tokenizer_from: a.tokenizer_from.as_deref(),
    }
    .write(&a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
