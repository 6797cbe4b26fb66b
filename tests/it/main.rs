//! Integration tests through the real path: request on the topic → Herald →
//! real SMTP / HTTP sink → outcome event on the outcome topic.
//!
//! Needs a running broker and PostgreSQL: `scripts/test.sh` starts them
//! (see `scripts/services.sh`) and sets HERALD_TEST_BROKERS and
//! HERALD_TEST_DATABASE_URL.

mod api;
mod bench;
mod channels;
mod helpers;
#[path = "../common/net.rs"]
mod net;
mod policy;
mod providers;
mod receipts;
mod resilience;
mod spine;
