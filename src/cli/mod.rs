//! Subcommands implemented outside `main.rs`, one file each.

pub mod keys;
pub mod templates;
