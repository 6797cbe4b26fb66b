//! Subcommands implemented outside `main.rs`, one file each.

pub mod keys;
pub mod prefs;
pub mod providers;
pub mod templates;
