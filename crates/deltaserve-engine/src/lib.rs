//! The engine: turns prompts into tokens with a [`deltaserve_model::Model`], for one sequence
//! ([`generate()`]) or many sequences of many tenants at once (the scheduler). It has no HTTP and
//! no JSON, so the CLI, evaluation and tests drive it directly.

pub mod generate;
pub mod sampler;

pub use generate::{generate, Generation};
pub use sampler::{argmax, Sampler, SamplingParams};
