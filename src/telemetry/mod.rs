//! Observability: tracing setup and Prometheus metrics.
//!
//! Metric names follow `herald_<name>_<unit>[_total]`; label values come from
//! bounded sets (channel, status, error code, topic) — never ids or addresses.

pub mod metrics;
pub mod routing;

pub use metrics::Metrics;

/// Installs the global tracing subscriber: JSON lines when `HERALD_LOG_FORMAT=json`,
/// human-readable otherwise; filter from `RUST_LOG` (default `info`).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    let json = std::env::var("HERALD_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // try_init: tests may install a subscriber more than once.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
