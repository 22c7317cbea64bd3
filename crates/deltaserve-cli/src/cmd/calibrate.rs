//! `deltaserve calibrate`: scale distillation of a delta against its fine-tune (BitDelta §3.2).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use deltaserve_train::{calibrate, format_table, CalibrateJob, DistillConfig, DistillLoss};

use super::common::{parse_dtype, TrainingBar};

/// Defaults are the BitDelta reference's (`bitdelta/train.py`, `scripts/train_example.bash`).
#[derive(ClapArgs)]
pub struct Args {
    /// Base model directory (the one the delta was compressed against) or a cached Hub id.
    #[arg(long)]
    base: String,
    /// Fine-tune model directory (the teacher) or a cached Hub id.
    #[arg(long)]
    finetuned: String,
    /// The delta to calibrate; it is never modified.
    #[arg(long)]
    delta: PathBuf,
    /// Calibration data: text files, JSONL files (`text` or chat `messages` per line), or directories of them.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Where the calibrated delta is written.
    #[arg(long)]
    out: PathBuf,
    /// Optimizer steps (one batch each).
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Windows per batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Peak learning rate of AdamW (cosine-annealed to 0 over --steps).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Loss: mse (between logits, as the reference) or kl (KL(fine-tune || model) over the vocabulary).
    #[arg(long, default_value = "mse")]
    loss: DistillLoss,
    /// Seed of the window sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Model dtype: auto (f32 on CPU, bf16 on CUDA), f32, bf16, f16. Trained parameters stay f32.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Also train the tensors the delta stores in full (embeddings, norms, lm_head), as the
    /// reference's optimizer does; biases always keep the fine-tune's values.
    #[arg(long)]
    train_uncompressed: bool,
    /// Fraction of the data (the tail of the token stream) held out for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Evaluate at most this many held-out windows.
    #[arg(long, default_value_t = 64)]
    max_val_windows: usize,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the training and validation token windows to this JSON file (for scripts/reference/).
    #[arg(long, hide = true)]
    dump_windows: Option<PathBuf>,
}

/// The calibration progress: phases as `calibrate: …`, the loss to six decimals.
pub fn calibrate_bar() -> TrainingBar {
    TrainingBar::new("calibrate", |r| {
        format!("loss {:.6}, lr {:.2e}", r.loss, r.lr)
    })
}

pub fn run(a: Args) -> Result<()> {
    let device = deltaserve_model::parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype, &device)?;
    let base = deltaserve_model::resolve_model_dir(&a.base)?;
    let finetuned = deltaserve_model::resolve_model_dir(&a.finetuned)?;
    let mut job = CalibrateJob::new(base, finetuned, a.delta.clone(), a.data, a.out.clone());
    job.overwrite = a.force;
    job.distill = DistillConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        lr: a.lr,
        loss: a.loss,
        train_uncompressed: a.train_uncompressed,
        ..Default::default()
    };
    job.seq_len = a.seq_len;
    job.val_fraction = a.val_fraction;
    job.max_val_windows = a.max_val_windows;
    job.seed = a.seed;
    job.device = device;
    job.dtype = dtype;
    job.dump_windows = a.dump_windows;
    let outcome = calibrate(&job, &mut calibrate_bar())
        .with_context(|| format!("calibrating {} (input left unchanged)", a.delta.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print!("{}", format_table(&outcome.table));
        println!(
            "{} steps, {:.3} s/step, loss {:.6} -> {:.6}; wrote {}",
            outcome.losses.len(),
            outcome.seconds_per_step,
            outcome.losses.first().copied().unwrap_or(f64::NAN),
            outcome.losses.last().copied().unwrap_or(f64::NAN),
            outcome.out.display()
        );
    }
    Ok(())
}
