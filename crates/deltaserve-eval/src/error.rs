//! The eval crate's error type. Messages name the file, line, model or tensor involved.

use std::path::PathBuf;

/// Everything that can go wrong while evaluating.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// A data file could not be read or a line of it is malformed.
    #[error("{path}: {msg}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// What is wrong, with the line number where there is one.
        msg: String,
    },
    /// Settings or inputs that cannot be evaluated (empty data, stride of 0, vocabularies that
    /// differ, ...).
    #[error("{0}")]
    Input(String),
    /// Writing a report file or drawing a plot failed.
    #[error("writing {path}: {msg}")]
    Report {
        /// The file being written.
        path: PathBuf,
        /// The cause.
        msg: String,
    },
    /// Loading or running a model failed.
    #[error(transparent)]
    Model(Box<deltaserve_model::ModelError>),
    /// Reading a delta file failed.
    #[error(transparent)]
    Format(Box<deltaserve_format::FormatError>),
    /// An error from the tensor library.
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
}

// The wrapped errors are boxed so `Result<_, EvalError>` stays small (clippy::result_large_err).
impl From<deltaserve_model::ModelError> for EvalError {
    fn from(e: deltaserve_model::ModelError) -> Self {
        EvalError::Model(Box::new(e))
    }
}

impl From<deltaserve_format::FormatError> for EvalError {
    fn from(e: deltaserve_format::FormatError) -> Self {
        EvalError::Format(Box::new(e))
    }
}

impl From<candle_core::Error> for EvalError {
    fn from(e: candle_core::Error) -> Self {
        EvalError::Candle(Box::new(e))
    }
}

/// Result with [`EvalError`].
pub type Result<T> = std::result::Result<T, EvalError>;
