//! Command-line subcommands that are more than glue, one file each (the
//! `herald` binary only declares and dispatches them).

pub mod prefs;
