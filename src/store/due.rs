//! Due work: notification rows waiting for `next_attempt_at` (statuses
//! `scheduled`, `deferred`, `throttled`, `retrying`). Owns the decided claim
//! of a fresh notification (policy said "not now" or "never"), the
//! scheduler's batch claim with a lease (`FOR UPDATE SKIP LOCKED`), the
//! transitions of a claimed row, the queue depth, and cancellation.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::types::Json;

use super::StoreError;
use crate::domain::{DeliveryStatusEvent, Notification, Status};

/// The statuses of rows that wait for `next_attempt_at`, as SQL.
const PENDING: &str = "('scheduled', 'deferred', 'throttled', 'retrying')";

/// A due row claimed by one scheduler.
#[derive(Debug, Clone)]
pub struct DueRow {
    /// The notification as stored (recipient already resolved).
    pub notification: Notification,
    /// Its status while it waited.
    pub status: Status,
    /// Send attempts started so far.
    pub attempts: i32,
    /// When it was due.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Retry rounds so far (each ended with every provider failing).
    pub retries: i32,
}

/// Repository of due work.
#[derive(Clone)]
pub struct DueStore {
    pool: PgPool,
}

impl DueStore {
    pub fn new(pool: PgPool) -> Self {
        DueStore { pool }
    }

    /// Claims up to `limit` due rows for `owner` until `now + lease`:
    /// urgent first, then by due time. Rows locked by another claimer are
    /// skipped; rows whose lease ran out (a crashed owner) are taken over.
    pub async fn claim_batch(
        &self,
        owner: &str,
        limit: i64,
        lease: std::time::Duration,
    ) -> Result<Vec<DueRow>, StoreError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        type Row = (String, i32, Option<DateTime<Utc>>, Json<Notification>, i32);
        let rows: Vec<Row> = sqlx::query_as(&format!(
            r#"
            UPDATE notifications
            SET lease_owner = $1, lease_until = now() + $3 * interval '1 millisecond'
            WHERE id IN (
                SELECT id FROM notifications
                WHERE status IN {PENDING} AND next_attempt_at <= now()
                  AND (lease_until IS NULL OR lease_until < now())
                ORDER BY (priority = 'urgent') DESC, next_attempt_at
                LIMIT $2
                FOR UPDATE SKIP LOCKED)
            RETURNING status, attempts, next_attempt_at, payload, retries
            "#
        ))
        .bind(owner)
        .bind(limit)
        .bind(lease_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(status, attempts, next_attempt_at, payload, retries)| {
                Ok(DueRow {
                    notification: payload.0,
                    status: parse_status(&status)?,
                    attempts,
                    next_attempt_at,
                    retries,
                })
            })
            .collect()
    }

    /// Moves a claimed due row to `sending` and starts attempt
    /// `attempts + 1` (written `sending` in the delivery log) in one
    /// statement. The scheduler's lease becomes the send lease, so a
    /// redelivered request does not take the send over while it runs. `None` when `owner` no longer holds it (cancelled, or
    /// the lease was lost).
    pub async fn start_attempt(
        &self,
        id: &str,
        owner: &str,
        provider: &str,
    ) -> Result<Option<i32>, StoreError> {
        Ok(sqlx::query_scalar(&format!(
            r#"
            WITH upd AS (
                UPDATE notifications
                SET attempts = attempts + 1, status = 'sending', provider = $3,
                    next_attempt_at = NULL, lease_owner = NULL, lease_until = NULL,
                    send_lease_until = lease_until, updated_at = now()
                WHERE id = $1 AND lease_owner = $2 AND status IN {PENDING}
                RETURNING id, attempts
            ), attempt AS (
                INSERT INTO delivery_attempts (notification_id, attempt, provider, status)
                SELECT id, attempts, $3, 'sending' FROM upd
            )
            SELECT attempts FROM upd
            "#
        ))
        .bind(id)
        .bind(owner)
        .bind(provider)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Moves a claimed due row to `status` without sending: waiting again
    /// until `next_attempt_at`, or final. Stores `event` as its last event
    /// and releases the lease (`event: None` keeps the last event: no
    /// status change was published). False when `owner` no longer holds it.
    pub async fn settle(
        &self,
        id: &str,
        owner: &str,
        status: Status,
        next_attempt_at: Option<DateTime<Utc>>,
        event: Option<&DeliveryStatusEvent>,
    ) -> Result<bool, StoreError> {
        let error = event.and_then(|e| e.error.as_ref());
        let done = sqlx::query(&format!(
            r#"
            UPDATE notifications
            SET status = $3, next_attempt_at = $4, last_event = COALESCE($5, last_event),
                error_code = $6,
                error_message = $7, lease_owner = NULL, lease_until = NULL, updated_at = now(),
                failed_at = CASE WHEN $3 = 'failed' THEN now() ELSE failed_at END
            WHERE id = $1 AND lease_owner = $2 AND status IN {PENDING}
            "#
        ))
        .bind(id)
        .bind(owner)
        .bind(status.as_str())
        .bind(next_attempt_at)
        .bind(event.map(Json))
        .bind(error.map(|e| e.code.as_str()))
        .bind(error.map(|e| e.message.as_str()))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Ends attempt `attempt` of a notification whose providers all failed
    /// retryably: it becomes a due row (`retrying`) at `next_attempt_at`,
    /// its retry count goes up, `event` becomes its last event. Only while
    /// it is still `sending` (the caller holds the send). False otherwise.
    pub async fn retry_later(
        &self,
        id: &str,
        attempt: i32,
        next_attempt_at: DateTime<Utc>,
        event: &DeliveryStatusEvent,
    ) -> Result<bool, StoreError> {
        let error = event.error.as_ref();
        let done = sqlx::query(
            r#"
            UPDATE notifications
            SET status = 'retrying', next_attempt_at = $3, retries = retries + 1,
                last_event = $4, provider = $5, error_code = $6, error_message = $7,
                send_lease_until = NULL, lease_owner = NULL, lease_until = NULL,
                updated_at = now()
            WHERE id = $1 AND status = 'sending' AND attempts = $2
            "#,
        )
        .bind(id)
        .bind(attempt)
        .bind(next_attempt_at)
        .bind(Json(event))
        .bind(event.provider.as_deref())
        .bind(error.map(|e| e.code.as_str()))
        .bind(error.map(|e| e.message.as_str()))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Sets the retry count of `id` (a round that failed without a
    /// provider call: every circuit open).
    pub async fn set_retries(&self, id: &str, retries: i32) -> Result<(), StoreError> {
        sqlx::query("UPDATE notifications SET retries = $2 WHERE id = $1")
            .bind(id)
            .bind(retries)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Gives a claimed row back (e.g. after an infrastructure error) so it
    /// is due again at once.
    pub async fn release(&self, id: &str, owner: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE notifications SET lease_owner = NULL, lease_until = NULL
             WHERE id = $1 AND lease_owner = $2",
        )
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Rows due now and not leased: the due-queue depth.
    pub async fn depth(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT count(*) FROM notifications
             WHERE status IN {PENDING} AND next_attempt_at <= now()
               AND (lease_until IS NULL OR lease_until < now())"
        ))
        .fetch_one(&self.pool)
        .await?)
    }

    /// Cancels the waiting (`scheduled`, `deferred`, `throttled`) notifications
    /// of request `cancels` and/or with `correlation_id` (within `tenant_id`
    /// when given), marking them with `cancel_id`. Returns the `cancelled`
    /// events of every row this cancel request has cancelled, including on
    /// an earlier delivery of it, so a redelivered cancel re-publishes them
    /// unchanged.
    pub async fn cancel(
        &self,
        cancel_id: &str,
        cancels: Option<&str>,
        correlation_id: Option<&str>,
        tenant_id: Option<&str>,
    ) -> Result<Vec<DeliveryStatusEvent>, StoreError> {
        sqlx::query(
            r#"
            UPDATE notifications
            SET status = 'cancelled', cancelled_by = $1, next_attempt_at = NULL,
                lease_owner = NULL, lease_until = NULL, updated_at = now(),
                last_event = jsonb_strip_nulls(jsonb_build_object(
                    'event_id', gen_random_uuid()::text,
                    'notification_id', id,
                    'request_id', request_id,
                    'tenant_id', tenant_id,
                    'channel', channel,
                    'status', 'cancelled',
                    'attempt', attempts,
                    'reason', 'cancel_request',
                    'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                    'correlation_id', correlation_id))
            WHERE status IN ('scheduled', 'deferred', 'throttled')
              AND ((request_id = $2) OR (correlation_id = $3))
              AND ($4::text IS NULL OR tenant_id = $4)
            "#,
        )
        .bind(cancel_id)
        .bind(cancels)
        .bind(correlation_id)
        .bind(tenant_id)
        .execute(&self.pool)
        .await?;
        let events: Vec<Json<DeliveryStatusEvent>> = sqlx::query_scalar(
            "SELECT last_event FROM notifications
             WHERE cancelled_by = $1 AND status = 'cancelled' AND last_event IS NOT NULL
             ORDER BY id",
        )
        .bind(cancel_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(events.into_iter().map(|j| j.0).collect())
    }

    /// Makes the `failed` notification `id` due again now (status
    /// `retrying`, `next_attempt_at = now()`, attempts kept, a fresh retry
    /// budget) so the scheduler sends it again: `herald retry`. Any other status, or no
    /// such notification, is reported and nothing changes.
    pub async fn retry_failed(&self, id: &str) -> Result<RetryOutcome, StoreError> {
        let attempts: Option<i32> = sqlx::query_scalar(
            "UPDATE notifications
             SET status = 'retrying', next_attempt_at = now(), failed_at = NULL, retries = 0,
                 lease_owner = NULL, lease_until = NULL, updated_at = now()
             WHERE id = $1 AND status = 'failed'
             RETURNING attempts",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(attempts) = attempts {
            return Ok(RetryOutcome::Due { attempts });
        }
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM notifications WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(match status {
            Some(s) => RetryOutcome::NotFailed {
                status: parse_status(&s)?,
            },
            None => RetryOutcome::NotFound,
        })
    }
}

/// What [`DueStore::retry_failed`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The notification is `retrying` and due now; `attempts` so far.
    Due {
        attempts: i32,
    },
    /// Only `failed` notifications are retried; this one is `status`.
    NotFailed {
        status: Status,
    },
    NotFound,
}

fn parse_status(s: &str) -> Result<Status, StoreError> {
    Status::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown status {s:?}")))
}
