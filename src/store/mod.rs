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
    /// A batched statement failed (each job of the batch gets the error as
    /// text), or the batch writer is gone.
    #[error("database: {0}")]
    Batch(String),
    #[error("stored data is not what this version expects: {0}")]
    Corrupt(String),
}

/// A pooled connection idle this long is pinged before it is handed out.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Opens a pool (lazily connecting) for `settings`.
///
/// Herald's connections start with `enable_seqscan=off` unless the URL's
/// `options` set it. Every statement Herald runs finds its rows through an index, but a
/// prepared statement keeps the plan PostgreSQL chose while its tables were
/// small: on a fresh database the batched finish kept hash-joining against a
/// whole-table scan of `notifications` and `delivery_attempts` (45 million
/// rows read for 100,000 notifications; BENCHMARKS.md, sixth pass) until
/// autovacuum's next analyze. A table with no usable index is still scanned.
/// The one statement that read most of a table anyway is `/stats` over a
/// window covering it: it now walks the `created_at` index instead (250,000
/// rows in the window: 77 → 93 ms for the per-channel counts).
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, StoreError> {
    let mut options: PgConnectOptions = settings
        .url
        .expose_secret()
        .parse::<PgConnectOptions>()?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
    if !sets_enable_seqscan(options.get_options()) {
        options = options.options([("enable_seqscan", "off")]);
    }
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

/// Whether libpq-style startup `options` already set `enable_seqscan`.
fn sets_enable_seqscan(options: Option<&str>) -> bool {
    options.is_some_and(|o| o.contains("enable_seqscan"))
}

/// Runs the migrations in `migrations/` (embedded at build time).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("./migrations").run(pool).await
}

/// A fresh migrated database on the test PostgreSQL
/// (`HERALD_TEST_DATABASE_URL`, as the integration tests use).
#[cfg(test)]
pub(crate) async fn test_pool() -> PgPool {
    use sqlx::Connection;
    let admin = std::env::var("HERALD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/postgres".into());
    let name = format!(
        "herald_store_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    let pool = PgPool::connect(&url).await.unwrap();
    migrate(&pool).await.unwrap();
    pool
}

/// A webhook notification with id `id`, for store tests.
#[cfg(test)]
pub(crate) fn test_notification(id: &str) -> crate::domain::Notification {
    let raw = format!(
        r#"{{"id":"{id}","channel":"webhook","recipient":{{"url":"https://example.com/h"}},"content":{{"text":"hi"}}}}"#
    );
    crate::domain::decode_request(raw.as_bytes(), 1 << 20)
        .unwrap()
        .into_notifications()
        .next()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_that_sets_enable_seqscan_keeps_its_choice() {
        assert!(!sets_enable_seqscan(None));
        assert!(!sets_enable_seqscan(Some("-c statement_timeout=5s")));
        assert!(sets_enable_seqscan(Some("-c enable_seqscan=on")));
        assert!(sets_enable_seqscan(Some(
            "-c statement_timeout=5s -c enable_seqscan=on"
        )));
    }

    #[tokio::test]
    async fn connections_turn_sequential_scans_off_unless_the_url_says() {
        let options = |url: &str| {
            let settings = DatabaseSettings {
                url: url.to_string().into(),
                max_connections: 1,
                migrate_on_start: false,
            };
            pool(&settings)
                .expect("pool")
                .connect_options()
                .get_options()
                .map(str::to_string)
        };
        assert_eq!(
            options("postgres://h@127.0.0.1:5432/herald").as_deref(),
            Some("-c enable_seqscan=off")
        );
        assert_eq!(
            options("postgres://h@127.0.0.1:5432/herald?options=-c%20enable_seqscan%3Don")
                .as_deref(),
            Some("-c enable_seqscan=on")
        );
    }
}
