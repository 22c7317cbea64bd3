//! The one error type of this crate.
//!
//! Messages name the checkpoint, tensor or file at fault and, where there is one, the fix.

use std::path::PathBuf;

use deltaserve_format::FormatError;
use deltaserve_model::ModelError;

/// A `Result` whose error is [`CodecError`].
pub type Result<T, E = CodecError> = std::result::Result<T, E>;

/// Everything that can go wrong compressing, loading or merging a delta.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    // === Base against fine-tune ===
    /// A `config.json` field that must agree between base and fine-tune does not.
    #[error(
        "base {} and fine-tune {} are not the same model: `{field}` is {base} in the base but {finetuned} \
         in the fine-tune; a delta needs the base the fine-tune was trained from",
        base_dir.display(),
        finetuned_dir.display()
    )]
    Incompatible {
        /// The base checkpoint.
        base_dir: PathBuf,
        /// The fine-tune checkpoint.
        finetuned_dir: PathBuf,
        /// The config field that differs.
        field: &'static str,
        /// Its value in the base (as JSON).
        base: String,
        /// Its value in the fine-tune (as JSON).
        finetuned: String,
    },
    /// A tensor the method compresses has different shapes in base and fine-tune.
    #[error(
        "tensor {tensor}: shape {base_shape:?} in the base {} but {finetuned_shape:?} in the fine-tune {}",
        base_dir.display(),
        finetuned_dir.display()
    )]
    ShapeMismatch {
        /// The tensor.
        tensor: String,
        /// Its shape in the base.
        base_shape: Vec<usize>,
        /// Its shape in the fine-tune.
        finetuned_shape: Vec<usize>,
        /// The base checkpoint.
        base_dir: PathBuf,
        /// The fine-tune checkpoint.
        finetuned_dir: PathBuf,
    },
    /// A tensor one checkpoint has is missing from the other.
    #[error("tensor {tensor} is in the {has} but missing from the {lacks} {}", dir.display())]
    MissingTensor {
        /// The tensor.
        tensor: String,
        /// Which checkpoint has it ("base", "fine-tune").
        has: &'static str,
        /// Which checkpoint lacks it.
        lacks: &'static str,
        /// The checkpoint that lacks it.
        dir: PathBuf,
    },
    /// A tensor to be compressed or reconstructed is not a floating-point weight.
    #[error("tensor {tensor} in {}: dtype {dtype}; weights must be BF16, F16 or F32", dir.display())]
    UnsupportedDtype {
        /// The tensor.
        tensor: String,
        /// Where it was read from.
        dir: PathBuf,
        /// Its dtype.
        dtype: String,
    },

    // === Methods and options ===
    /// The compression method is not one this crate implements.
    #[error("unknown compression method \"{method}\" (known: {known})")]
    UnknownMethod {
        /// The method asked for.
        method: String,
        /// The methods this crate knows, comma-separated.
        known: String,
    },
    /// The delta was made by a method this operation cannot use.
    #[error("delta {}: method \"{method}\" is not supported here (supported: {supported})", delta.display())]
    UnsupportedMethod {
        /// The delta file.
        delta: PathBuf,
        /// Its method.
        method: String,
        /// What is supported.
        supported: &'static str,
    },
    /// An option has a value that cannot be used.
    #[error("{option}: {detail}")]
    BadOption {
        /// The option, as the user typed it (`--max-shard-size`).
        option: &'static str,
        /// What is wrong with its value.
        detail: String,
    },

    // === Delta against model ===
    /// A delta entry names a tensor the model has no place for.
    #[error(
        "delta {}: tensor entry \"{tensor}\" is not a tensor of a Llama-family model ({why})",
        delta.display()
    )]
    UnknownTensor {
        /// The delta file.
        delta: PathBuf,
        /// The entry's name.
        tensor: String,
        /// Why it cannot be placed.
        why: String,
    },
    /// A delta entry's shape does not fit the base model.
    #[error(
        "delta {}: tensor {tensor} has shape {delta_shape:?} but the base {} has {base_shape:?}",
        delta.display(),
        base_dir.display()
    )]
    DeltaShape {
        /// The delta file.
        delta: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its shape in the delta.
        delta_shape: Vec<usize>,
        /// The shape the base has.
        base_shape: Vec<usize>,
        /// The base checkpoint.
        base_dir: PathBuf,
    },

    /// A coded entry cannot be decoded (unknown codec, parts or params that do not fit).
    #[error("delta {}: tensor {tensor}: {detail}", delta.display())]
    BadCoded {
        /// The delta file.
        delta: PathBuf,
        /// The weight.
        tensor: String,
        /// What is wrong, and the fix where there is one.
        detail: String,
    },

    // === Files ===
    /// An operating-system call on `path` failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done ("create directory", "write", "rename").
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The output exists and the caller did not ask to replace it.
    #[error("{} already exists; use --force to replace it", path.display())]
    OutputExists {
        /// The output.
        path: PathBuf,
    },
    /// A JSON file next to the weights could not be parsed.
    #[error("{}: not valid JSON: {detail}", path.display())]
    BadJson {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },

    // === From the crates below ===
    /// The delta file layer.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The checkpoint and model layer.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl CodecError {
    /// An [`CodecError::Io`] for `path`.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> CodecError {
        let path = path.into();
        move |source| CodecError::Io {
            path,
            action,
            source,
        }
    }
}
