//! The engine's one error type. The server maps each variant to an HTTP status in one place.

use std::path::PathBuf;

/// Why the engine refused or failed a request, or could not register a tenant.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineError {
    /// No base or tenant is served under this name.
    #[error("the model `{name}` does not exist; GET /v1/models lists the served models")]
    UnknownModel {
        /// The name asked for.
        name: String,
    },
    /// The wait queue is full: the client should retry later.
    #[error("the server is overloaded: {queued} requests are already waiting (--max-queue {max_queue}); retry later")]
    Overloaded {
        /// Requests waiting when this one came.
        queued: usize,
        /// The queue's capacity.
        max_queue: usize,
    },
    /// The request can never be scheduled as given (too long for the context or the KV budget).
    #[error("{0}")]
    Invalid(String),
    /// The tenant's delta could not be loaded; the tenant stays unavailable until re-added.
    #[error("the delta of `{name}` is unavailable: {reason}")]
    DeltaUnavailable {
        /// Tenant name.
        name: String,
        /// What went wrong loading it.
        reason: String,
    },
    /// A tenant could not be registered (unreadable file, made from another base, name taken).
    #[error("cannot add tenant `{name}` from {path}: {reason}")]
    Registration {
        /// Tenant name.
        name: String,
        /// The delta file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The forward pass failed for this request (alone: the others in its batch went on).
    #[error("generation failed: {0}")]
    Generation(String),
    /// The engine is shutting down and takes no more work, or cancelled this request at shutdown.
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl EngineError {
    /// A stable machine-readable name, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::UnknownModel { .. } => "unknown_model",
            EngineError::Overloaded { .. } => "overloaded",
            EngineError::Invalid(_) => "invalid",
            EngineError::DeltaUnavailable { .. } => "delta_unavailable",
            EngineError::Registration { .. } => "registration",
            EngineError::Generation(_) => "generation",
            EngineError::ShuttingDown => "shutting_down",
        }
    }
}
