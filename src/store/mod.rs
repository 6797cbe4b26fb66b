//! PostgreSQL repositories. Stores are concrete types over a [`PgPool`]; SQL
//! lives here and nowhere else.

mod batch;
pub mod due;
pub mod inbox;
pub mod notifications;
pub mod preferences;
pub mod receipts;

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::DatabaseSettings;

pub use due::{DueRow, DueStore, RetryOutcome};
pub use inbox::InboxStore;
pub use notifications::{AttemptResult, Claim, NotificationStore};
pub use preferences::PreferenceStore;
pub use receipts::ReceiptStore;

/// A database failure. Every variant is transient from the pipeline's point of
/// view: the message is retried, never dropped.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored data is not what this version expects: {0}")]
    Corrupt(String),
}

/// A pooled connection idle this long is pinged before it is handed out.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Opens a pool (lazily connecting) for `settings`.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = settings
        .url
        .expose_secret()
        .parse::<PgConnectOptions>()?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        // sqlx pings every connection it hands out by default: one extra
        // round trip per batch, ~5% of Herald's CPU under load. Only a
        // connection that sat idle may have been dropped by the server
        // (restart, idle timeout); one in steady use fails its query instead,
        // which the pipeline retries like any database error.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IDLE_AFTER {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

/// Runs the migrations in `migrations/` (embedded at build time).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("./migrations").run(pool).await
}
