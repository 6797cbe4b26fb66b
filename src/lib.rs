//! Herald: Kafka-native notification delivery.
//!
//! A notification request published to a Kafka topic is decoded and validated,
//! claimed in PostgreSQL (its id is the idempotency key), rendered, sent through
//! a channel adapter, and its result published as a delivery-status event on the
//! outcome topic. The Kafka offset is stored only after that.
//!
//! # Layout
//! - [`config`]: layered settings (defaults, `herald.toml`, `HERALD_*`), secrets redacted.
//! - [`domain`]: the one place raw bytes become valid values (requests, addresses, statuses, outcome events).
//! - [`render`]: inline content and `templates/` files rendered with minijinja.
//! - [`templates`]: the PostgreSQL template store (versions, resolution chain, cached renderer).
//! - [`channels`]: the `ChannelAdapter` trait and one file per adapter (SMTP, SendGrid, Twilio, FCM, webhook, in-app inbox).
//! - [`routing`]: the provider registry (encrypted credentials, NOTIFY reloads), selection, circuit breakers, rate limits, retry backoff.
//! - [`store`]: PostgreSQL repositories (notifications, delivery attempts).
//! - [`kafka`]: consumer (partition workers, rebalance drain), in-order offset tracker, producer.
//! - [`pipeline`]: one request through policy → claim → render → send → persist → publish.
//! - [`policy`]: preferences, quiet hours, frequency caps, schedule and expiry as one pure decision.
//! - [`scheduler`]: the due-work loop that fires scheduled, deferred and throttled rows.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`; [`http::api`]: the admin/query API (`/v1/…`, bearer keys);
//!   [`http::receipts`]: provider delivery receipts (`/webhooks/sendgrid|twilio|generic`, signature-verified).
//! - [`telemetry`]: tracing setup and Prometheus metrics.
//! - [`app`]: wires it all together; `App::build` then `run_until_stopped`.
//! - [`bench`]: `herald bench`, the end-to-end benchmark against baselines.

pub mod app;
pub mod bench;
pub mod channels;
pub mod config;
pub mod domain;
pub mod http;
pub mod kafka;
pub mod pipeline;
pub mod policy;
pub mod render;
pub mod routing;
pub mod scheduler;
pub mod store;
pub mod telemetry;
pub mod templates;
