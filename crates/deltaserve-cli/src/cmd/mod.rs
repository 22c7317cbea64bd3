//! Subcommands.

pub mod common;
pub mod generate;
