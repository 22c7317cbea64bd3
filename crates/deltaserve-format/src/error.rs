//! The one error type of this crate.
//!
//! Every message names the file, the tensor or the header field at fault, and where there is
//! one, the fix. Variants carry structured fields so that callers (the CLI, the server) can
//! react to a kind of failure without parsing the text.

use std::path::PathBuf;

/// A `Result` whose error is [`FormatError`].
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// Everything that can go wrong reading, writing or fingerprinting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    // === Files ===
    /// An operating-system call on `path` failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// The file or directory the call was about.
        path: PathBuf,
        /// What was being done, as a verb phrase ("open", "write", "rename onto").
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The output exists and the caller did not ask to overwrite it.
    #[error("{} already exists; use --force to overwrite it", path.display())]
    OutputExists {
        /// The output that already exists.
        path: PathBuf,
    },

    // === Container (safetensors) ===
    /// The safetensors layer rejected the file: cut short, not safetensors, or inconsistent offsets.
    #[error("delta {} is truncated or not a safetensors file: {detail}", path.display())]
    NotSafetensors {
        /// The delta file.
        path: PathBuf,
        /// What the safetensors parser said.
        detail: String,
    },
    /// A base checkpoint shard could not be parsed as safetensors.
    #[error("checkpoint file {} is truncated or not a safetensors file: {detail}", path.display())]
    BadCheckpoint {
        /// The checkpoint shard.
        path: PathBuf,
        /// What the safetensors parser said.
        detail: String,
    },
    /// Two shards of one checkpoint hold a tensor of the same name.
    #[error(
        "checkpoint tensor \"{name}\" appears in both {} and {}; a checkpoint must name each tensor once",
        first.display(),
        second.display()
    )]
    DuplicateCheckpointTensor {
        /// The repeated tensor name.
        name: String,
        /// The first shard holding it.
        first: PathBuf,
        /// The second shard holding it.
        second: PathBuf,
    },
    /// The safetensors file has no `"deltaserve"` metadata key.
    #[error(
        "{} is a safetensors file without a \"deltaserve\" metadata key: it is not a deltaserve delta \
         (a model checkpoint, perhaps?)",
        path.display()
    )]
    NotADelta {
        /// The file.
        path: PathBuf,
    },

    // === Header ===
    /// `format_version` is not of the form `MAJOR.MINOR`.
    #[error("delta {}: format_version \"{found}\" is not of the form MAJOR.MINOR (e.g. \"1.0\")", path.display())]
    BadVersion {
        /// The delta file.
        path: PathBuf,
        /// The version string found.
        found: String,
    },
    /// The delta was written by a newer, incompatible deltaserve.
    #[error(
        "delta {}: format major version {found} is newer than this deltaserve supports ({supported}); upgrade deltaserve",
        path.display()
    )]
    NewerMajorVersion {
        /// The delta file.
        path: PathBuf,
        /// The major version in the file.
        found: u32,
        /// The major version this crate reads ([`crate::FORMAT_MAJOR`]).
        supported: u32,
    },
    /// The delta was written in an older format that this deltaserve no longer reads.
    #[error(
        "delta {}: format major version {found} is older than this deltaserve supports ({supported}); \
         re-create the delta with `deltaserve compress`",
        path.display()
    )]
    OlderMajorVersion {
        /// The delta file.
        path: PathBuf,
        /// The major version in the file.
        found: u32,
        /// The major version this crate reads ([`crate::FORMAT_MAJOR`]).
        supported: u32,
    },
    /// The header JSON does not match the schema.
    #[error("delta {}: header field `{field}`: {detail}", path.display())]
    BadHeader {
        /// The delta file.
        path: PathBuf,
        /// Dotted path of the offending field (`.` for the whole header).
        field: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A tensor entry has a `kind` this crate does not know (a codec added by a newer deltaserve).
    #[error(
        "delta {}: tensor entry \"{tensor}\" has kind \"{kind}\", which this deltaserve does not know \
         (it knows: {known}); upgrade deltaserve",
        path.display()
    )]
    UnknownTensorKind {
        /// The delta file.
        path: PathBuf,
        /// The header key of the entry.
        tensor: String,
        /// The unknown kind.
        kind: String,
        /// The kinds this crate knows, comma-separated.
        known: &'static str,
    },
    /// A coded entry lacks a part its codec needs (the writer was broken or the file was edited).
    #[error(
        "delta {}: a {codec} entry has no part \"{role}\"; recompress the delta with `deltaserve compress`",
        path.display()
    )]
    MissingPart {
        /// The delta file.
        path: PathBuf,
        /// The entry's codec.
        codec: String,
        /// The role asked for.
        role: String,
    },
    /// A dtype name in the header is not a safetensors dtype.
    #[error(
        "delta {}: tensor entry \"{tensor}\" has dtype \"{dtype}\", which is not a safetensors dtype name (e.g. \"BF16\")",
        path.display()
    )]
    UnknownDtype {
        /// The delta file.
        path: PathBuf,
        /// The header key of the entry.
        tensor: String,
        /// The dtype name found.
        dtype: String,
    },

    // === Header against container ===
    /// An entry names a container tensor that the file does not hold.
    #[error(
        "delta {}: entry \"{entry}\" names tensor \"{tensor}\", which is not in the file",
        path.display()
    )]
    MissingTensor {
        /// The delta file.
        path: PathBuf,
        /// The header key of the entry.
        entry: String,
        /// The container tensor that is missing.
        tensor: String,
    },
    /// A container tensor has another dtype than its entry requires.
    #[error("delta {}: tensor \"{tensor}\" has dtype {found}, expected {expected}", path.display())]
    WrongDtype {
        /// The delta file.
        path: PathBuf,
        /// The container tensor.
        tensor: String,
        /// Its dtype.
        found: String,
        /// The dtype its entry requires.
        expected: String,
    },
    /// A container tensor has another shape than its entry requires.
    #[error("delta {}: tensor \"{tensor}\" has shape {found:?}, expected {expected:?}{why}", path.display())]
    WrongShape {
        /// The delta file.
        path: PathBuf,
        /// The container tensor.
        tensor: String,
        /// Its shape.
        found: Vec<usize>,
        /// The shape its entry requires.
        expected: Vec<usize>,
        /// Why that shape, starting with a space (" for a [4, 70] matrix"), or empty.
        why: String,
    },
    /// A sign tensor has padding bits set, which writers must leave at zero.
    #[error(
        "delta {}: tensor \"{tensor}\" has padding bits set in row {row} (columns past {cols}); \
         the writer that made it is broken",
        path.display()
    )]
    PaddingBitsSet {
        /// The delta file.
        path: PathBuf,
        /// The sign tensor.
        tensor: String,
        /// The first row with a non-zero padding bit.
        row: usize,
        /// The matrix's column count.
        cols: usize,
    },
    /// Tensor bytes do not match the tensor's dtype and shape (writing).
    #[error(
        "tensor \"{tensor}\": {found} bytes do not fit dtype {dtype} and shape {shape:?}, which need {expected} bytes"
    )]
    TensorSize {
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The bytes given.
        found: usize,
        /// The bytes dtype and shape need.
        expected: usize,
    },
    /// The same container tensor name was given twice (writing).
    #[error("delta {}: tensor \"{tensor}\" was given twice", path.display())]
    DuplicateTensor {
        /// The delta file being written.
        path: PathBuf,
        /// The repeated name.
        tensor: String,
    },

    // === Use ===
    /// The header has no entry of this name.
    #[error("delta {}: no tensor entry \"{name}\"", path.display())]
    NoSuchEntry {
        /// The delta file.
        path: PathBuf,
        /// The name asked for.
        name: String,
    },
    /// The container has no tensor of this name.
    #[error("delta {}: no tensor \"{tensor}\" in the file", path.display())]
    NoSuchTensor {
        /// The delta file.
        path: PathBuf,
        /// The name asked for.
        tensor: String,
    },
    /// An accessor for one kind of entry was given another kind.
    #[error("delta {}: {accessor} needs a \"{expected}\" entry, got a \"{found}\" entry", path.display())]
    WrongEntryKind {
        /// The delta file.
        path: PathBuf,
        /// The accessor called.
        accessor: &'static str,
        /// The kind it needs.
        expected: &'static str,
        /// The kind it got.
        found: &'static str,
    },
    /// The delta was made against another base model.
    #[error(
        "delta {} was made for base {expected} but the model at {} has fingerprint {found}: \
         use the base it was compressed from",
        delta.display(),
        base.display()
    )]
    BaseMismatch {
        /// The delta file.
        delta: PathBuf,
        /// The base model offered.
        base: PathBuf,
        /// First 12 hex digits of the fingerprint recorded in the delta.
        expected: String,
        /// First 12 hex digits of the offered base's fingerprint.
        found: String,
    },
    /// The two fingerprints were computed with different algorithms and cannot be compared.
    #[error(
        "delta {} records a base fingerprint of algorithm \"{expected}\" but the base was fingerprinted with \
         \"{found}\"; upgrade deltaserve",
        delta.display()
    )]
    FingerprintAlgorithm {
        /// The delta file.
        delta: PathBuf,
        /// The algorithm recorded in the delta.
        expected: String,
        /// The algorithm of the offered fingerprint.
        found: String,
    },
}
