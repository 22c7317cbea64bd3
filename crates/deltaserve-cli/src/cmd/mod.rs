//! Subcommands.

pub mod bench;
pub mod bench_serve;
pub mod calibrate;
pub mod common;
pub mod compress;
pub mod decompose;
pub mod demo;
pub mod eval;
pub mod finetune;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod quantize;
pub mod random_model;
pub mod serve;
pub mod sweep;
