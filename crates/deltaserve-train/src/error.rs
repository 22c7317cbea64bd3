//! The one error type of this crate. Messages name the file, step or tensor at fault and say
//! what to change.

use std::path::PathBuf;

use deltaserve_format::FormatError;
use deltaserve_model::ModelError;

/// A `Result` whose error is [`TrainError`].
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// Everything that can go wrong preparing data for, running or saving a calibration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    // === Data ===
    /// Nothing to train on: no paths, or only empty files.
    #[error("no calibration data: {what}; pass --data with text files, JSONL files (`text` or `messages`) or a directory of them")]
    NoData {
        /// What was looked at and found empty.
        what: String,
    },
    /// A data file could not be read or parsed.
    #[error("{}: {msg}", path.display())]
    BadData {
        /// The file (with `:line` for JSONL).
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Fewer tokens than one training window plus the held-out part.
    #[error(
        "calibration data too short: {found} tokens in {sources}, need at least {needed} \
         (one --seq-len {seq_len} window for training after holding out --val-fraction {val_fraction} \
         for validation); add text or lower --seq-len"
    )]
    TooShort {
        /// Tokens found.
        found: usize,
        /// Tokens needed.
        needed: usize,
        /// The data sources, for the message.
        sources: String,
        /// The window length.
        seq_len: usize,
        /// The held-out fraction.
        val_fraction: f64,
    },

    // === Which models the delta belongs to ===
    /// The delta was compressed from another fine-tune than the one given.
    #[error("delta {} was not made from the fine-tune {}: {detail}", delta.display(), finetuned.display())]
    WrongFinetune {
        /// The delta file.
        delta: PathBuf,
        /// The fine-tune directory given.
        finetuned: PathBuf,
        /// What differs.
        detail: String,
    },
    /// The delta holds something calibration cannot handle.
    #[error("delta {}: {msg}", path.display())]
    BadDelta {
        /// The delta file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },

    // === Settings and training ===
    /// A setting is out of range.
    #[error("{0}")]
    Setting(String),
    /// The loss (or, after the last step, a trained tensor) stopped being a finite number.
    #[error(
        "{what} is {value} at step {step} of {steps}; calibration stopped and nothing was written \
         (lower --lr, or check the models for inf/NaN weights)"
    )]
    NonFinite {
        /// "the loss" or "trained tensor NAME".
        what: String,
        /// The offending value.
        value: f64,
        /// 1-based step.
        step: usize,
        /// Steps planned.
        steps: usize,
    },

    // === From below ===
    /// From the model crate (loading, tokenizer, forward).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// From the delta format (reading, base fingerprint, writing).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// From the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    /// [`TrainError::NonFinite`] for the first trained tensor found holding a non-finite value
    /// (`found`, as the trainers' `first_non_finite` report it) after `step` of `steps`.
    pub(crate) fn check_finite(
        found: Option<(String, f64)>,
        step: usize,
        steps: usize,
    ) -> Result<()> {
        match found {
            Some((name, value)) => Err(TrainError::NonFinite {
                what: format!("trained tensor `{name}`"),
                value,
                step,
                steps,
            }),
            None => Ok(()),
        }
    }
}
