//! Compression methods: turn a base and a fine-tune into a delta, and a delta back into weights.
//!
//! - [`bitdelta`]: BitDelta (arXiv 2402.10193), one sign bit per weight of every attention and
//!   MLP projection plus one scale per matrix; [`bitdelta::compress`] streams both checkpoints
//!   from their memory maps and writes a `.delta` file.
//! - [`tenant`]: a delta file to the [`deltaserve_model::TenantWeights`] the forward pass
//!   applies on top of a shared base ([`load_tenant`]).
//! - [`mod@merge`]: base + delta to a complete Hugging Face checkpoint directory ([`merge()`]).
//! - [`inspect`]: what a delta holds, for people and tools ([`inspect::describe`]).
//!
//! This crate is where a codec's numerics live. It is not where the file format is defined
//! (`deltaserve-format`, which knows no tensor library), nor where deltas are multiplied fast
//! (`deltaserve-kernels`), nor where models run (`deltaserve-model`).
//!
//! ```no_run
//! use deltaserve_codecs::bitdelta::{compress, CompressOptions};
//! use deltaserve_model::Checkpoint;
//!
//! let base = Checkpoint::open("models/base")?;
//! let finetuned = Checkpoint::open("models/finetuned")?;
//! let opts = CompressOptions { out: "finetuned.delta".into(), force: false, progress: true };
//! let report = compress(&base, &finetuned, &opts)?;
//! println!("{report}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod apiq;
pub mod bitdelta;
pub mod budget;
pub mod budget_choice;
pub mod calib_stats;
pub mod codec;
pub mod coded;
pub mod dare;
pub mod deltadq;
pub mod eora;
mod error;
pub mod files;
pub mod gptq;
pub mod inspect;
pub mod lowrank;
pub mod lqlora;
pub mod merge;
pub mod nf;
pub mod numeric;
mod progress;
pub mod qahira;
pub mod rtn;
pub mod tenant;

pub use error::{CodecError, Result};
pub use merge::{merge, MergeOptions, MergeReport};
pub use tenant::load_tenant;
