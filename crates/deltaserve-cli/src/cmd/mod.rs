//! Subcommands.

pub mod common;
pub mod generate;
pub mod random_model;
