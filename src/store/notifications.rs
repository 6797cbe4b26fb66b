//! Notifications and their delivery log.
//!
//! The claim is one atomic `INSERT … ON CONFLICT DO NOTHING`: whoever inserts
//! the row owns the first attempt; a redelivered request finds the row and
//! learns what already happened.

use sqlx::PgPool;
use sqlx::types::Json;

use super::StoreError;
use super::batch::FinishBatcher;
use crate::domain::{DeliveryStatusEvent, ErrorInfo, Notification, Status};

/// What [`NotificationStore::claim`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The row is new and this caller owns `attempt`.
    New { attempt: i32 },
    /// The row existed already (a redelivery).
    Existing {
        status: Status,
        attempts: i32,
        last_event: Option<Box<DeliveryStatusEvent>>,
    },
}

/// How a send attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptResult {
    /// `Sent` or `Failed` (later: `Retrying`).
    pub status: Status,
    pub provider: String,
    pub provider_message_id: Option<String>,
    pub error: Option<ErrorInfo>,
    pub duration_ms: i32,
}

/// Repository of notifications and delivery attempts.
#[derive(Clone)]
pub struct NotificationStore {
    pool: PgPool,
    /// How long a claimed send belongs to its claimer (longer than any send
    /// can take); a redelivery may take the send over only after it.
    send_lease: std::time::Duration,
    /// Coalesces attempt-finishing writes.
    finisher: FinishBatcher,
}

impl NotificationStore {
    /// Creates the store; must be called inside a tokio runtime (it spawns
    /// the batched writers).
    pub fn new(pool: PgPool, send_lease: std::time::Duration) -> Self {
        let finisher = FinishBatcher::start(pool.clone());
        NotificationStore {
            pool,
            send_lease,
            finisher,
        }
    }

    /// Inserts `n` with `status` unless a row with its id exists.
    ///
    /// With `Status::Sending` an attempt row (attempt 1, `provider`) is written
    /// in the same statement, so a crash after the provider call is visible
    /// as an unfinished attempt. With a final status (`failed` before any send,
    /// e.g. a template error) `event` is stored as the row's last event.
    pub async fn claim(
        &self,
        n: &Notification,
        status: Status,
        provider: &str,
        event: Option<&DeliveryStatusEvent>,
    ) -> Result<Claim, StoreError> {
        let payload = serde_json::to_value(n).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let error = event.and_then(|e| e.error.as_ref());
        let attempts: i32 = if status == Status::Sending { 1 } else { 0 };
        let inserted: Option<String> = sqlx::query_scalar(
            r#"
            WITH ins AS (
                INSERT INTO notifications (
                    id, request_id, tenant_id, app_id, channel, priority, category,
                    correlation_id, status, attempts, provider, payload, last_event,
                    error_code, error_message, scheduled_at, expires_at, failed_at, send_lease_until)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                        CASE WHEN $9 = 'failed' THEN now() END,
                        CASE WHEN $9 = 'sending' THEN now() + make_interval(secs => $18) END)
                ON CONFLICT (id) DO NOTHING
                RETURNING id
            ), attempt AS (
                INSERT INTO delivery_attempts (notification_id, attempt, provider, status)
                SELECT id, 1, $11, 'sending' FROM ins WHERE $9 = 'sending'
            )
            SELECT id FROM ins
            "#,
        )
        .bind(&n.id)
        .bind(&n.request_id)
        .bind(&n.tenant_id)
        .bind(&n.app_id)
        .bind(n.channel.as_str())
        .bind(n.priority.as_str())
        .bind(&n.category)
        .bind(&n.correlation_id)
        .bind(status.as_str())
        .bind(attempts)
        .bind(provider)
        .bind(Json(&payload))
        .bind(event.map(Json))
        .bind(error.map(|e| e.code.as_str()))
        .bind(error.map(|e| e.message.as_str()))
        .bind(n.scheduled_at)
        .bind(n.expires_at)
        .bind(self.send_lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        if inserted.is_some() {
            return Ok(Claim::New { attempt: attempts });
        }
        self.existing(&n.id).await
    }

    async fn existing(&self, id: &str) -> Result<Claim, StoreError> {
        let row: (String, i32, Option<Json<DeliveryStatusEvent>>) =
            sqlx::query_as("SELECT status, attempts, last_event FROM notifications WHERE id = $1")
                .bind(id)
                .fetch_one(&self.pool)
                .await?;
        let status = Status::parse(&row.0)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown status {:?}", row.0)))?;
        Ok(Claim::Existing {
            status,
            attempts: row.1,
            last_event: row.2.map(|j| Box::new(j.0)),
        })
    }

    /// Takes over a notification left `sending` (or `accepted`) by a process
    /// that stopped before finishing it — only once its send lease expired, so
    /// a sender that is still working is never doubled. Starts attempt
    /// `attempts + 1` under a new lease. Returns `None` when the row is not
    /// (or not yet) available.
    pub async fn take_over(&self, id: &str, provider: &str) -> Result<Option<i32>, StoreError> {
        let attempt: Option<i32> = sqlx::query_scalar(
            r#"
            WITH upd AS (
                UPDATE notifications
                SET attempts = attempts + 1, status = 'sending', updated_at = now(),
                    send_lease_until = now() + make_interval(secs => $3)
                WHERE id = $1 AND status IN ('sending', 'accepted')
                  AND (send_lease_until IS NULL OR send_lease_until < now())
                RETURNING id, attempts
            ), attempt AS (
                INSERT INTO delivery_attempts (notification_id, attempt, provider, status)
                SELECT id, attempts, $2, 'sending' FROM upd
            )
            SELECT attempts FROM upd
            "#,
        )
        .bind(id)
        .bind(provider)
        .bind(self.send_lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        Ok(attempt)
    }

    /// Starts the next try of a notification this caller is sending (a
    /// fallback provider after a retryable failure): attempt `attempts + 1`
    /// with `provider`, written `sending` in the delivery log, and the send
    /// lease renewed. `None` when the row is no longer `sending` at
    /// `current` (someone took it over).
    pub async fn next_try(
        &self,
        id: &str,
        current: i32,
        provider: &str,
    ) -> Result<Option<i32>, StoreError> {
        Ok(sqlx::query_scalar(
            r#"
            WITH upd AS (
                UPDATE notifications
                SET attempts = attempts + 1, provider = $3, updated_at = now(),
                    send_lease_until = now() + make_interval(secs => $4)
                WHERE id = $1 AND status = 'sending' AND attempts = $2
                RETURNING id, attempts
            ), attempt AS (
                INSERT INTO delivery_attempts (notification_id, attempt, provider, status)
                SELECT id, attempts, $3, 'sending' FROM upd
            )
            SELECT attempts FROM upd
            "#,
        )
        .bind(id)
        .bind(current)
        .bind(provider)
        .bind(self.send_lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Records how one try ended in the delivery log only (the notification
    /// stays `sending`: another provider or a retry follows).
    pub async fn finish_try(
        &self,
        id: &str,
        attempt: i32,
        result: &AttemptResult,
    ) -> Result<(), StoreError> {
        let e = result.error.as_ref();
        sqlx::query(
            r#"
            UPDATE delivery_attempts
            SET status = $3, provider_message_id = $4, error_code = $5, error_message = $6,
                retryable = $7, finished_at = now(), duration_ms = $8
            WHERE notification_id = $1 AND attempt = $2
            "#,
        )
        .bind(id)
        .bind(attempt)
        .bind(result.status.as_str())
        .bind(result.provider_message_id.as_deref())
        .bind(e.map(|e| e.code.as_str()))
        .bind(e.map(|e| e.message.as_str()))
        .bind(e.map(|e| e.retryable))
        .bind(result.duration_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Finishes `attempt` of `id` and moves the notification to
    /// `result.status`, storing `event` as its last event. Concurrent calls
    /// are written together in one statement (see [`super::batch`]).
    pub async fn finish_attempt(
        &self,
        id: &str,
        attempt: i32,
        result: &AttemptResult,
        event: &DeliveryStatusEvent,
    ) -> Result<(), StoreError> {
        self.finisher.finish(id, attempt, result, event).await
    }

    /// Status and attempt count of a notification (for tests and the CLI).
    pub async fn status(&self, id: &str) -> Result<Option<(Status, i32)>, StoreError> {
        let row: Option<(String, i32)> =
            sqlx::query_as("SELECT status, attempts FROM notifications WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        match row {
            None => Ok(None),
            Some((s, a)) => Status::parse(&s)
                .map(|s| Some((s, a)))
                .ok_or_else(|| StoreError::Corrupt(format!("unknown status {s:?}"))),
        }
    }
}
