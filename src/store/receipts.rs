//! Delivery receipts: finding the notification a provider's receipt is about
//! and applying the status change it causes, with the suppression it may add,
//! in one transaction.
//!
//! The notification row is locked (`SELECT … FOR UPDATE`) while the caller
//! decides and publishes the outcome event; the change is committed only
//! after the broker acknowledged it. A crash or a failed publish rolls the
//! change back, so the provider's retry finds the row unchanged and publishes
//! again (with the same deterministic event id); a committed change always
//! has its event on the topic.

use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};

use super::StoreError;
use crate::domain::{Channel, DeliveryStatusEvent, ErrorInfo, Notification, Status};
use crate::policy::preferences::recipient_address;

/// How many rows a provider message id may match before the match is
/// considered ambiguous (and, without an address to tell them apart, refused).
const MAX_CANDIDATES: i64 = 10;

/// The notification a receipt is about, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub id: String,
    pub request_id: String,
    pub tenant_id: Option<String>,
    pub channel: Channel,
    pub status: Status,
    /// Send attempts started: the outcome event's `attempt`.
    pub attempts: i32,
    pub provider: Option<String>,
    pub provider_message_id: Option<String>,
    pub correlation_id: Option<String>,
    /// The address the notification was sent to (what the policy checks
    /// against the suppression list), when it has one.
    pub address: Option<String>,
}

type Row = (
    String,
    String,
    Option<String>,
    String,
    String,
    i32,
    Option<String>,
    Option<String>,
    Option<String>,
    Json<serde_json::Value>,
);

const COLUMNS: &str = "id, request_id, tenant_id, channel, status, attempts, provider, \
    provider_message_id, correlation_id, payload";

fn target(r: Row) -> Result<Target, StoreError> {
    let channel = Channel::parse(&r.3)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown channel {:?}", r.3)))?;
    let status = Status::parse(&r.4)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown status {:?}", r.4)))?;
    // The address is what the policy compares with the suppression list; a
    // payload this version cannot read simply has none.
    let address = serde_json::from_value::<Notification>(r.9.0)
        .ok()
        .and_then(|n| recipient_address(&n));
    Ok(Target {
        id: r.0,
        request_id: r.1,
        tenant_id: r.2,
        channel,
        status,
        attempts: r.5,
        provider: r.6,
        provider_message_id: r.7,
        correlation_id: r.8,
        address,
    })
}

/// Repository for receipt processing.
#[derive(Clone)]
pub struct ReceiptStore {
    pool: PgPool,
}

impl ReceiptStore {
    pub fn new(pool: PgPool) -> Self {
        ReceiptStore { pool }
    }

    /// The notifications whose stored provider message id is one of `ids`
    /// (at most `MAX_CANDIDATES`), restricted to `channel` when given.
    /// Served by `notifications_provider_message_id_idx`.
    pub async fn by_provider_message_id(
        &self,
        ids: &[String],
        channel: Option<Channel>,
    ) -> Result<Vec<Target>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM notifications
             WHERE provider_message_id = ANY($1) AND ($2::text IS NULL OR channel = $2)
             ORDER BY created_at DESC LIMIT $3"
        ))
        .bind(ids)
        .bind(channel.map(|c| c.as_str()))
        .bind(MAX_CANDIDATES)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(target).collect()
    }

    /// Begins a transaction holding the lock on notification `id`; `None`
    /// when there is no such notification.
    pub async fn lock(&self, id: &str) -> Result<Option<Locked>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row: Option<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM notifications WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some(Locked {
                tx,
                target: target(r)?,
            })),
        }
    }
}

/// One notification locked for a receipt. Dropping it without
/// [`Locked::commit`] rolls everything back.
pub struct Locked {
    tx: Transaction<'static, Postgres>,
    /// The row as it was when locked.
    pub target: Target,
}

impl Locked {
    /// Moves the notification to `status`, storing `event` as its last
    /// event and `error` (if any) as its error. Only a change from the
    /// locked status is written; returns false when the row had changed.
    pub async fn change_status(
        &mut self,
        status: Status,
        error: Option<&ErrorInfo>,
        event: &DeliveryStatusEvent,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE notifications
             SET status = $2, updated_at = now(), last_event = $3,
                 error_code = COALESCE($4, error_code),
                 error_message = COALESCE($5, error_message),
                 failed_at = CASE WHEN $2 = 'failed' THEN now() ELSE failed_at END
             WHERE id = $1 AND status = $6",
        )
        .bind(&self.target.id)
        .bind(status.as_str())
        .bind(Json(event))
        .bind(error.map(|e| e.code.as_str()))
        .bind(error.map(|e| e.message.as_str()))
        .bind(self.target.status.as_str())
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Adds `address` to the suppression list of `tenant_id` (`""`: every
    /// tenant) unless it is there already (the first reason is kept).
    /// Returns whether it was added.
    pub async fn suppress(
        &mut self,
        tenant_id: &str,
        address: &str,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO suppressed_addresses (tenant_id, address, reason) VALUES ($1, $2, $3)
             ON CONFLICT (tenant_id, address) DO NOTHING",
        )
        .bind(tenant_id)
        .bind(address)
        .bind(reason)
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Makes the changes durable and releases the lock.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}
