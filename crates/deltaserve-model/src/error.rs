//! The model crate's one error type. Messages name the file, tensor or field and say what was expected.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file the checkpoint needs is not there.
    #[error("{path}: file not found ({what}); {hint}")]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
        /// What the file is for.
        what: &'static str,
        /// How to fix it.
        hint: &'static str,
    },
    /// A file exists but could not be read or parsed.
    #[error("{path}: {msg}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// `config.json` lacks a field or has a value we cannot use.
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The offending field.
        field: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// The `architectures` entry names a model we do not implement.
    #[error("{path}: architecture `{name}` is not supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)")]
    UnsupportedArchitecture {
        /// The config file.
        path: PathBuf,
        /// The architecture named there.
        name: String,
    },
    /// A tensor the architecture needs is absent from the weights.
    #[error("tensor `{name}` is missing from the checkpoint {dir}")]
    MissingTensor {
        /// Tensor name.
        name: String,
        /// Checkpoint directory.
        dir: PathBuf,
    },
    /// A tensor has a shape or dtype other than the config implies.
    #[error("tensor `{name}` in {dir}: {msg}")]
    BadTensor {
        /// Tensor name.
        name: String,
        /// Checkpoint directory.
        dir: PathBuf,
        /// Expected against found.
        msg: String,
    },
    /// The tokenizer or chat template failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The input does not fit the model (prompt longer than the context, token id out of range, ...).
    #[error("{0}")]
    Input(String),
    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;
