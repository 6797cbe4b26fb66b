//! The fault suite: loads of requests through Herald running as a separate
//! process (`herald serve`) while something breaks, then checks from the
//! sinks, the outcome and DLQ topics, the database and the consumer group:
//! - every request has exactly one distinct final outcome (outcome events may
//!   be re-published with the same event id);
//! - every sendable notification reached its sink at least once, and more
//!   than once only when the database shows a resumed attempt;
//! - no partition is stuck: the group's committed offsets reach the end of
//!   every request partition.
//!
//! The fast variants run with `cargo test --test faults`; the long ones with
//! `scripts/faults.sh` (`HERALD_FAULTS_FULL=1`, plus the ignored tests).
//! What each scenario checks: `docs/faults.md`.

#[path = "../it/helpers.rs"]
mod helpers;
#[path = "../common/net.rs"]
mod net;

mod broker;
mod database;
mod group;
mod hostile;
mod kills;
mod sinks;
mod support;
