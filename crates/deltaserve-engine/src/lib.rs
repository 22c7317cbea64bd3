//! The engine: turns prompts into tokens with a [`deltaserve_model::Model`], for one sequence
//! ([`generate()`]) or many sequences of many tenants at once ([`Engine`]). It has no HTTP and
//! no JSON, so the CLI, evaluation, the server and tests drive it directly.
//!
//! - [`Engine`]: a handle to the scheduler thread, which owns the model, every KV cache and the
//!   [`DeltaCache`]. [`Engine::submit`] queues a [`Request`] and returns a stream of [`Event`]s;
//!   dropping the stream cancels the request.
//! - Continuous batching (`scheduler.rs`): requests join at step boundaries, each step is one
//!   forward call for every running sequence of every tenant, prefill chunks and decode tokens
//!   together under `max_batch_tokens`.
//! - [`DeltaCache`]: tenants' deltas in memory under a byte budget, loaded on first use off the
//!   step loop, evicted least recently used, never while a running sequence uses them.
//! - [`Sampler`]: one per sequence, so results do not depend on what else is in the batch.

pub mod delta_cache;
mod engine;
mod error;
pub mod generate;
pub mod metrics;
mod request;
pub mod sampler;
mod scheduler;
pub mod tenants;
pub mod text;

pub use delta_cache::DeltaCache;
pub use engine::{Engine, EngineConfig, ModelInfo};
pub use error::EngineError;
pub use generate::{generate, Generation};
pub use metrics::{MetricsSnapshot, TTFT_BUCKETS};
pub use request::{Event, FinishReason, Output, Request, Usage};
pub use sampler::{argmax, Sampler, SamplingParams};
pub use tenants::{Base, Tenant};
