//! Scale distillation for deltas: the second stage of BitDelta (arXiv 2402.10193, §3.2).
//!
//! Sign compression keeps one bit per weight of `W_ft − W_base` and one scale per matrix. This
//! crate trains those scales (and optionally the tensors a delta keeps in full) so that the base
//! model plus the compressed delta reproduces the fine-tune's logits on a little calibration text,
//! which recovers most of what the signs lose. It sits after the codecs in deltaserve's flow
//! (a delta comes in, a calibrated delta goes out) and is what `deltaserve calibrate` runs.
//! It also holds adapter fine-tuning on a frozen (possibly quantized) base, what
//! `deltaserve finetune` runs: LoRA, Q-BaRA and QA-HiRA adapters ([`adapters`], [`lora`]) trained
//! on the causal-LM loss with AdamW, gradient accumulation and resumable checkpoints
//! ([`finetune`]), written out as a `lowrank` delta. Full fine-tuning does not live here.
//!
//! - [`data`]: calibration text (plain, JSONL `text`/`messages`, directories) to token windows.
//! - [`student`]: a delta file as trainable `Var`s, and back to a delta file.
//! - [`distill`]: the training loop ([`ScaleDistiller`]) and the validation metrics.
//! - [`origin`]: the checks that a delta belongs to the base and fine-tune it is trained against.
//! - [`job`]: the whole `calibrate` command as a function ([`calibrate`]).
//!
//! Training runs the model's differentiable path (`ForwardOptions { differentiable: true }`):
//! candle's fused rms_norm/softmax/rope have no backward pass and would drop the gradient
//! silently. `tests/gradients.rs` checks that every trainable `Var` receives a gradient and that
//! the scales' gradients match finite differences in f64.
//!
//! ```no_run
//! use deltaserve_train::{calibrate, CalibrateJob, Quiet};
//!
//! let job = CalibrateJob::new(
//!     "base".into(), "finetuned".into(), "ft.delta".into(), vec!["calib.txt".into()], "ft.calibrated.delta".into(),
//! );
//! let outcome = calibrate(&job, &mut Quiet)?;
//! println!("{}", deltaserve_train::format_table(&outcome.table));
//! # Ok::<(), deltaserve_train::TrainError>(())
//! ```

pub mod adapters;
pub mod data;
pub mod distill;
mod error;
pub mod finetune;
pub mod fisher;
pub mod job;
pub mod lora;
pub mod loss;
pub mod origin;
pub mod student;

pub use adapters::{AdapterKind, AdapterSpec};
pub use data::{CalibrationData, DataOptions};
pub use distill::{
    cosine_lr, evaluate, Candidate, DistillConfig, EvalRow, ScaleDistiller, StepReport,
};
pub use error::{Result, TrainError};
pub use finetune::{finetune, FinetuneConfig, FinetuneJob, FinetuneOutcome, Finetuner};
pub use job::{calibrate, format_table, CalibrateJob, CalibrationOutcome, Progress, Quiet};
pub use lora::AdapterSet;
pub use loss::DistillLoss;
pub use student::TrainableDelta;
