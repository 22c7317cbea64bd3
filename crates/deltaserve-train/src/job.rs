//! A whole calibration, as `deltaserve calibrate` runs it: check the inputs, load the models and
//! data, evaluate, train, evaluate again, write the calibrated delta.
//!
//! Everything that can be checked is checked before the first forward pass, and the output is
//! written only after training succeeded, atomically, to a path other than the input's: a failed
//! run leaves the input delta as it was and no output file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use deltaserve_format::DeltaFile;
use deltaserve_model::{Checkpoint, Model, TextCodec};
use serde_json::json;

use crate::data::{CalibrationData, DataOptions, WindowDump};
use crate::distill::{evaluate, Candidate, DistillConfig, EvalRow, ScaleDistiller, StepReport};
use crate::error::{Result, TrainError};
use crate::origin::{check_base, check_finetune};
use crate::student::TrainableDelta;

/// What to calibrate, on what, and how.
#[derive(Debug, Clone)]
pub struct CalibrateJob {
    /// Base model directory.
    pub base: PathBuf,
    /// Fine-tune model directory (the teacher).
    pub finetuned: PathBuf,
    /// The delta to calibrate (never modified).
    pub delta: PathBuf,
    /// Calibration data: files or directories.
    pub data: Vec<PathBuf>,
    /// Where the calibrated delta goes.
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub overwrite: bool,
    /// Training settings.
    pub distill: DistillConfig,
    /// Tokens per window.
    pub seq_len: usize,
    /// Fraction of the data held out.
    pub val_fraction: f64,
    /// At most this many held-out windows are evaluated.
    pub max_val_windows: usize,
    /// Seed of the window sampler.
    pub seed: u64,
    /// Where the models run.
    pub device: Device,
    /// Model dtype.
    pub dtype: DType,
    /// Write the training and validation windows here as JSON (for `scripts/reference/`).
    pub dump_windows: Option<PathBuf>,
}

impl CalibrateJob {
    /// A job with the reference's defaults (see [`DistillConfig::default`]), on the CPU in f32.
    pub fn new(
        base: PathBuf,
        finetuned: PathBuf,
        delta: PathBuf,
        data: Vec<PathBuf>,
        out: PathBuf,
    ) -> Self {
        Self {
            base,
            finetuned,
            delta,
            data,
            out,
            overwrite: false,
            distill: DistillConfig::default(),
            seq_len: 128,
            val_fraction: 0.1,
            max_val_windows: 64,
            seed: 0,
            device: Device::Cpu,
            dtype: DType::F32,
            dump_windows: None,
        }
    }
}

/// Hooks for showing progress; every method defaults to doing nothing.
pub trait Progress {
    /// A phase begins ("checking the base fingerprint", ...).
    fn phase(&mut self, _what: &str) {}
    /// Training begins.
    fn start_training(&mut self, _steps: usize) {}
    /// A step finished.
    fn step(&mut self, _report: &StepReport) {}
    /// Training ended.
    fn end_training(&mut self) {}
}

/// Progress that shows nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// What a finished calibration reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CalibrationOutcome {
    /// Base, fine-tune, delta before and after calibration, on the held-out windows.
    pub table: Vec<EvalRow>,
    /// Each step's training loss.
    pub losses: Vec<f64>,
    /// Mean seconds per training step (teacher + student forward, backward, update).
    pub seconds_per_step: f64,
    /// What was written into the output's header `calibration` field.
    pub calibration: serde_json::Value,
    /// The output file.
    pub out: PathBuf,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// Runs a calibration end to end.
pub fn calibrate(job: &CalibrateJob, progress: &mut dyn Progress) -> Result<CalibrationOutcome> {
    if same_file(&job.out, &job.delta) {
        return Err(TrainError::Setting(format!(
            "--out {} is the input delta; calibration never modifies its input, choose another path",
            job.out.display()
        )));
    }
    if !job.overwrite && job.out.symlink_metadata().is_ok() {
        return Err(deltaserve_format::FormatError::OutputExists {
            path: job.out.clone(),
        }
        .into());
    }

    progress.phase("opening the delta and checkpoints");
    let file = DeltaFile::open(&job.delta)?;
    let base_ckpt = Checkpoint::open(&job.base)?;
    let ft_ckpt = Checkpoint::open(&job.finetuned)?;
    progress.phase("checking the delta's base fingerprint");
    check_base(&file, &base_ckpt)?;
    check_finetune(&file, &base_ckpt, &ft_ckpt)?;

    progress.phase("reading calibration data");
    let codec = TextCodec::from_dir(base_ckpt.dir(), &base_ckpt.config().eos_token_ids)?;
    let separator = base_ckpt
        .config()
        .eos_token_ids
        .first()
        .copied()
        .or_else(|| codec.stop_ids().first().copied());
    let opts = DataOptions {
        seq_len: job.seq_len,
        val_fraction: job.val_fraction,
    };
    let data = CalibrationData::load(&job.data, &codec, separator, opts)?;
    let max_pos = base_ckpt.config().max_position_embeddings;
    if job.seq_len > max_pos {
        return Err(TrainError::Setting(format!(
            "--seq-len {} exceeds the model's context of {max_pos} tokens (max_position_embeddings)",
            job.seq_len
        )));
    }
    let batches = data.training_batches(job.distill.steps, job.distill.batch_size, job.seed);
    let val = data.validation_windows(job.max_val_windows);
    if let Some(path) = &job.dump_windows {
        let dump = WindowDump {
            seq_len: job.seq_len,
            seed: job.seed,
            train: batches.clone(),
            val: val.clone(),
        };
        let text = serde_json::to_string(&dump).map_err(|e| TrainError::Setting(e.to_string()))?;
        deltaserve_format::write_atomic(path, true, |w| {
            std::io::Write::write_all(w, text.as_bytes())
        })?;
    }

    progress.phase("loading the base and fine-tune");
    let base = Model::load(&base_ckpt, job.dtype, &job.device)?;
    let teacher = Model::load(&ft_ckpt, job.dtype, &job.device)?;
    let student =
        TrainableDelta::from_delta(&file, &base_ckpt, &base, job.distill.train_uncompressed)?;

    progress.phase("evaluating before calibration");
    let eval_batch = job.distill.batch_size;
    let before = student.tenant(false)?;
    let mut table = evaluate(
        &teacher,
        &[
            Candidate {
                name: "base".into(),
                model: &base,
                tenant: None,
            },
            Candidate {
                name: "fine-tune".into(),
                model: &teacher,
                tenant: None,
            },
            Candidate {
                name: "delta, uncalibrated".into(),
                model: &base,
                tenant: Some(&before),
            },
        ],
        &val,
        eval_batch,
    )?;
    drop(before);

    let mut distiller = ScaleDistiller::new(&base, &teacher, student, job.distill.clone())?;
    progress.start_training(batches.len());
    let t0 = Instant::now();
    let trained = distiller.train(&batches, |r| progress.step(r));
    progress.end_training();
    let losses = trained?;
    let seconds_per_step = t0.elapsed().as_secs_f64() / batches.len().max(1) as f64;
    let student = distiller.into_student();
    student.round_to_stored()?;

    progress.phase("evaluating after calibration");
    let after = student.tenant(false)?;
    table.extend(evaluate(
        &teacher,
        &[Candidate {
            name: "delta, calibrated".into(),
            model: &base,
            tenant: Some(&after),
        }],
        &val,
        eval_batch,
    )?);

    let scales = student.scale_values()?;
    let changes: Vec<f64> = scales
        .iter()
        .filter(|(_, a, _)| *a != 0.0)
        .map(|(_, a, b)| f64::from(((b - a) / a).abs()))
        .collect();
    let mean_change = changes.iter().sum::<f64>() / changes.len().max(1) as f64;
    let cfg = &job.distill;
    let calibration = json!({
        "method": "scale_distillation",
        "reference": "FasterDecoding/BitDelta bitdelta/train.py",
        "loss": cfg.loss,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "seq_len": job.seq_len,
        "lr": cfg.lr,
        "schedule": "cosine",
        "optimizer": {"name": "adamw", "betas": [cfg.beta1, cfg.beta2], "eps": cfg.eps, "weight_decay": cfg.weight_decay},
        "seed": job.seed,
        "train_uncompressed": cfg.train_uncompressed,
        "trained": {
            "scales": student.scales.len(),
            "full_tensors": student.full.iter().filter(|f| f.trained).map(|f| f.name.clone()).collect::<Vec<_>>(),
        },
        "data": {
            "sources": data.sources.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "documents": data.documents,
            "train_tokens": data.train.len(),
            "val_tokens": data.val.len(),
            "val_fraction": job.val_fraction,
            "val_windows": val.len(),
        },
        "device": format!("{:?}", job.device.location()),
        "dtype": dtype_name(job.dtype),
        "losses": losses,
        "seconds_per_step": seconds_per_step,
        "mean_relative_scale_change": mean_change,
        "validation": table,
        "previous": file.header().calibration,
    });
    progress.phase("writing the calibrated delta");
    student.write(
        &file,
        &base_ckpt,
        &job.out,
        calibration.clone(),
        job.overwrite,
    )?;
    Ok(CalibrationOutcome {
        table,
        losses,
        seconds_per_step,
        calibration,
        out: job.out.clone(),
    })
}

/// The validation table as aligned text.
pub fn format_table(rows: &[EvalRow]) -> String {
    let mut s = format!(
        "{:<22} {:>12} {:>16}\n",
        "model", "val ppl", "KL(ft || model)"
    );
    for r in rows {
        s.push_str(&format!("{:<22} {:>12.4} {:>16.6}\n", r.model, r.ppl, r.kl));
    }
    s
}
