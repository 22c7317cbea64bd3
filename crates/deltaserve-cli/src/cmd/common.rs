//! Pieces several subcommands share: device and dtype flags, model loading.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use deltaserve_model::{Checkpoint, Model};

/// Parses `--dtype`; `auto` is f32 on the CPU and bf16 on CUDA.
pub fn parse_dtype(spec: &str, device: &Device) -> Result<DType> {
    Ok(match spec {
        "auto" if device.is_cpu() => DType::F32,
        "auto" => DType::BF16,
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => anyhow::bail!("--dtype {other}: expected auto, f32, bf16 or f16"),
    })
}

/// A loaded base model with its checkpoint.
pub struct Loaded {
    pub dir: PathBuf,
    pub ckpt: Checkpoint,
    pub model: Model,
}

/// Resolves `--model` (directory or Hub id), opens and loads it.
pub fn load_model(spec: &str, device: &Device, dtype: DType) -> Result<Loaded> {
    let dir = deltaserve_model::resolve_model_dir(spec)?;
    let ckpt = Checkpoint::open(&dir)?;
    let model =
        Model::load(&ckpt, dtype, device).with_context(|| format!("loading {}", dir.display()))?;
    Ok(Loaded { dir, ckpt, model })
}

/// Opens the checkpoint a command rewrites into `--out`: refuses an existing `out` unless
/// `force` (before any slow work), resolves `model` (a directory or a cached Hub id) and opens
/// it. Returns the resolved directory and the checkpoint.
pub fn open_for_output(
    model: &str,
    out: &std::path::Path,
    force: bool,
) -> Result<(PathBuf, Checkpoint)> {
    if out.symlink_metadata().is_ok() && !force {
        anyhow::bail!("--out {} exists; pass --force to replace it", out.display());
    }
    let dir =
        deltaserve_model::resolve_model_dir(model).with_context(|| format!("--model {model}"))?;
    let ckpt =
        Checkpoint::open(&dir).with_context(|| format!("opening the model {}", dir.display()))?;
    Ok((dir, ckpt))
}

/// A training job's progress for people: phases on stderr as `{command}: …`, then a bar over
/// the steps whose message `message` makes from each step's report. Shared by `calibrate`,
/// `finetune` and `demo`.
pub struct TrainingBar {
    command: &'static str,
    message: fn(&deltaserve_train::StepReport) -> String,
    bar: Option<indicatif::ProgressBar>,
}

impl TrainingBar {
    /// A bar for `command`, no steps started yet.
    pub fn new(
        command: &'static str,
        message: fn(&deltaserve_train::StepReport) -> String,
    ) -> Self {
        Self {
            command,
            message,
            bar: None,
        }
    }
}

impl deltaserve_train::Progress for TrainingBar {
    fn phase(&mut self, what: &str) {
        eprintln!("{}: {what}", self.command);
    }

    fn start_training(&mut self, steps: usize) {
        let bar = indicatif::ProgressBar::new(steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "training [{bar:30}] {pos}/{len} steps, {msg} ({elapsed}, eta {eta})",
            )
            .expect("the progress template is valid. This is a bug.")
            .progress_chars("=> "),
        );
        self.bar = Some(bar);
    }

    fn step(&mut self, r: &deltaserve_train::StepReport) {
        if let Some(b) = &self.bar {
            b.set_message((self.message)(r));
            b.inc(1);
        }
    }

    fn end_training(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}
