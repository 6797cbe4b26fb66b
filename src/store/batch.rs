//! Write coalescing: concurrent claims and `finish_attempt` calls are each
//! gathered into one multi-row statement (`UNNEST` arrays), so under load the
//! database sees a few statements per poll rather than one round trip per
//! notification.
//!
//! Callers still await their own result; nothing is acknowledged before its
//! row is written. A batch is whatever queued while the previous one ran (no
//! timer), so a lone write is not delayed.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::StoreError;
use super::notifications::AttemptResult;
use crate::domain::DeliveryStatusEvent;

/// Largest batch written in one statement.
const MAX_BATCH: usize = 512;
/// Batches written at once (each holds one pooled connection).
const WRITERS: usize = 2;

/// One finished attempt waiting to be written.
pub(super) struct FinishJob {
    pub id: String,
    pub attempt: i32,
    pub result: AttemptResult,
    pub event: serde_json::Value,
    pub done: oneshot::Sender<Result<(), StoreError>>,
}

/// Handle to the writer tasks.
#[derive(Clone)]
pub(super) struct FinishBatcher {
    tx: mpsc::UnboundedSender<FinishJob>,
}

impl FinishBatcher {
    /// Spawns the writer tasks on the current tokio runtime.
    pub fn start(pool: PgPool) -> FinishBatcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..WRITERS {
            tokio::spawn(writer(pool.clone(), rx.clone()));
        }
        FinishBatcher { tx }
    }

    /// Queues a write and waits for it.
    pub async fn finish(
        &self,
        id: &str,
        attempt: i32,
        result: &AttemptResult,
        event: &DeliveryStatusEvent,
    ) -> Result<(), StoreError> {
        let event = serde_json::to_value(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (done, wait) = oneshot::channel();
        let job = FinishJob {
            id: id.to_string(),
            attempt,
            result: result.clone(),
            event,
            done,
        };
        self.tx
            .send(job)
            .map_err(|_| StoreError::Corrupt("the attempt writer stopped".into()))?;
        wait.await
            .map_err(|_| StoreError::Corrupt("the attempt writer dropped a write".into()))?
    }
}

/// Waits for the next job, then takes whatever else is queued (up to
/// [`MAX_BATCH`]); `None` when every sender is gone. The writers share the
/// receiver, so one of them gathers while the others write.
async fn next_batch<J>(rx: &Mutex<mpsc::UnboundedReceiver<J>>) -> Option<Vec<J>> {
    let mut rx = rx.lock().await;
    let mut batch = vec![rx.recv().await?];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(j) => batch.push(j),
            Err(_) => break,
        }
    }
    Some(batch)
}

async fn writer(pool: PgPool, rx: Arc<Mutex<mpsc::UnboundedReceiver<FinishJob>>>) {
    loop {
        let Some(batch) = next_batch(&rx).await else {
            return;
        };
        let result = write(&pool, &batch).await;
        for job in batch {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::Corrupt(format!(
                    "batched attempt write failed: {e}"
                ))),
            };
            let _ = job.done.send(r);
        }
    }
}

async fn write(pool: &PgPool, batch: &[FinishJob]) -> Result<(), sqlx::Error> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut attempts = Vec::with_capacity(batch.len());
    let mut statuses = Vec::with_capacity(batch.len());
    let mut message_ids = Vec::with_capacity(batch.len());
    let mut codes = Vec::with_capacity(batch.len());
    let mut messages = Vec::with_capacity(batch.len());
    let mut retryable = Vec::with_capacity(batch.len());
    let mut durations = Vec::with_capacity(batch.len());
    let mut providers = Vec::with_capacity(batch.len());
    let mut events = Vec::with_capacity(batch.len());
    for j in batch {
        let e = j.result.error.as_ref();
        ids.push(j.id.clone());
        attempts.push(j.attempt);
        statuses.push(j.result.status.as_str().to_string());
        message_ids.push(j.result.provider_message_id.clone());
        codes.push(e.map(|e| e.code.clone()));
        messages.push(e.map(|e| e.message.clone()));
        retryable.push(e.map(|e| e.retryable));
        durations.push(j.result.duration_ms);
        providers.push(j.result.provider.clone());
        events.push(j.event.clone());
    }
    sqlx::query(
        r#"
        WITH input AS (
            SELECT * FROM UNNEST($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[],
                                 $6::text[], $7::bool[], $8::int4[], $9::text[], $10::jsonb[])
                AS t(id, attempt, status, provider_message_id, error_code, error_message,
                     retryable, duration_ms, provider, last_event)
        ), attempt AS (
            UPDATE delivery_attempts d
            SET status = i.status, provider_message_id = i.provider_message_id,
                error_code = i.error_code, error_message = i.error_message,
                retryable = i.retryable, finished_at = now(), duration_ms = i.duration_ms
            FROM input i
            WHERE d.notification_id = i.id AND d.attempt = i.attempt
        )
        UPDATE notifications n
        SET status = i.status, provider = i.provider, provider_message_id = i.provider_message_id,
            error_code = i.error_code, error_message = i.error_message, last_event = i.last_event,
            updated_at = now(), send_lease_until = NULL,
            sent_at = CASE WHEN i.status = 'sent' THEN now() ELSE n.sent_at END,
            failed_at = CASE WHEN i.status = 'failed' THEN now() ELSE n.failed_at END
        FROM input i
        WHERE n.id = i.id
        "#,
    )
    .bind(ids)
    .bind(attempts)
    .bind(statuses)
    .bind(message_ids)
    .bind(codes)
    .bind(messages)
    .bind(retryable)
    .bind(durations)
    .bind(providers)
    .bind(events)
    .execute(pool)
    .await?;
    Ok(())
}

/// One claim waiting to be written: the new row's values.
pub(super) struct ClaimJob {
    pub id: String,
    pub request_id: String,
    pub tenant_id: Option<String>,
    pub app_id: Option<String>,
    pub channel: String,
    pub priority: String,
    pub category: Option<String>,
    pub correlation_id: Option<String>,
    pub status: String,
    pub attempts: i32,
    pub provider: String,
    pub payload: serde_json::Value,
    pub last_event: Option<serde_json::Value>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// `true` when this claim inserted the row (it owns it), `false` when a
    /// row with the id existed.
    pub done: oneshot::Sender<Result<bool, StoreError>>,
}

/// Handle to the claim writer tasks.
#[derive(Clone)]
pub(super) struct ClaimBatcher {
    tx: mpsc::UnboundedSender<ClaimJob>,
}

impl ClaimBatcher {
    /// Spawns the writer tasks on the current tokio runtime; a `sending`
    /// claim holds its send lease for `send_lease`.
    pub fn start(pool: PgPool, send_lease: std::time::Duration) -> ClaimBatcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..WRITERS {
            tokio::spawn(claim_writer(pool.clone(), rx.clone(), send_lease));
        }
        ClaimBatcher { tx }
    }

    /// Queues a claim and waits for it: `true` when the row was inserted.
    pub async fn claim(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<bool, StoreError>>) -> ClaimJob,
    ) -> Result<bool, StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(job(done))
            .map_err(|_| StoreError::Corrupt("the claim writer stopped".into()))?;
        wait.await
            .map_err(|_| StoreError::Corrupt("the claim writer dropped a claim".into()))?
    }
}

async fn claim_writer(
    pool: PgPool,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<ClaimJob>>>,
    send_lease: std::time::Duration,
) {
    loop {
        let Some(mut batch) = next_batch(&rx).await else {
            return;
        };
        // The same id twice in one statement would report both as inserted:
        // later copies go in a statement of their own, after the first.
        while !batch.is_empty() {
            let mut seen = std::collections::HashSet::new();
            let (round, later): (Vec<ClaimJob>, Vec<ClaimJob>) =
                batch.into_iter().partition(|j| seen.insert(j.id.clone()));
            batch = later;
            match write_claims(&pool, &round, send_lease).await {
                Ok(inserted) => {
                    for job in round {
                        let new = inserted.contains(&job.id);
                        let _ = job.done.send(Ok(new));
                    }
                }
                Err(e) => {
                    for job in round {
                        let _ = job.done.send(Err(StoreError::Corrupt(format!(
                            "batched claim failed: {e}"
                        ))));
                    }
                }
            }
        }
    }
}

async fn write_claims(
    pool: &PgPool,
    batch: &[ClaimJob],
    send_lease: std::time::Duration,
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let col = |f: &dyn Fn(&ClaimJob) -> Option<String>| -> Vec<Option<String>> {
        batch.iter().map(f).collect()
    };
    let ids: Vec<String> = batch.iter().map(|j| j.id.clone()).collect();
    let request_ids: Vec<String> = batch.iter().map(|j| j.request_id.clone()).collect();
    let tenants = col(&|j| j.tenant_id.clone());
    let apps = col(&|j| j.app_id.clone());
    let channels: Vec<String> = batch.iter().map(|j| j.channel.clone()).collect();
    let priorities: Vec<String> = batch.iter().map(|j| j.priority.clone()).collect();
    let categories = col(&|j| j.category.clone());
    let correlations = col(&|j| j.correlation_id.clone());
    let statuses: Vec<String> = batch.iter().map(|j| j.status.clone()).collect();
    let attempts: Vec<i32> = batch.iter().map(|j| j.attempts).collect();
    let providers: Vec<String> = batch.iter().map(|j| j.provider.clone()).collect();
    let payloads: Vec<serde_json::Value> = batch.iter().map(|j| j.payload.clone()).collect();
    let events: Vec<Option<serde_json::Value>> =
        batch.iter().map(|j| j.last_event.clone()).collect();
    let codes = col(&|j| j.error_code.clone());
    let messages = col(&|j| j.error_message.clone());
    let scheduled: Vec<Option<DateTime<Utc>>> = batch.iter().map(|j| j.scheduled_at).collect();
    let expires: Vec<Option<DateTime<Utc>>> = batch.iter().map(|j| j.expires_at).collect();
    let inserted: Vec<String> = sqlx::query_scalar(
        r#"
        WITH input AS (
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                 $6::text[], $7::text[], $8::text[], $9::text[], $10::int4[],
                                 $11::text[], $12::jsonb[], $13::jsonb[], $14::text[], $15::text[],
                                 $16::timestamptz[], $17::timestamptz[])
                AS t(id, request_id, tenant_id, app_id, channel, priority, category,
                     correlation_id, status, attempts, provider, payload, last_event,
                     error_code, error_message, scheduled_at, expires_at)
        ), ins AS (
            INSERT INTO notifications (
                id, request_id, tenant_id, app_id, channel, priority, category,
                correlation_id, status, attempts, provider, payload, last_event,
                error_code, error_message, scheduled_at, expires_at, failed_at, send_lease_until)
            SELECT id, request_id, tenant_id, app_id, channel, priority, category,
                   correlation_id, status, attempts, provider, payload, last_event,
                   error_code, error_message, scheduled_at, expires_at,
                   CASE WHEN status = 'failed' THEN now() END,
                   CASE WHEN status = 'sending' THEN now() + make_interval(secs => $18) END
            FROM input
            ON CONFLICT (id) DO NOTHING
            RETURNING id, status, provider
        ), attempt AS (
            INSERT INTO delivery_attempts (notification_id, attempt, provider, status)
            SELECT id, 1, provider, 'sending' FROM ins WHERE status = 'sending'
        )
        SELECT id FROM ins
        "#,
    )
    .bind(ids)
    .bind(request_ids)
    .bind(tenants)
    .bind(apps)
    .bind(channels)
    .bind(priorities)
    .bind(categories)
    .bind(correlations)
    .bind(statuses)
    .bind(attempts)
    .bind(providers)
    .bind(payloads)
    .bind(events)
    .bind(codes)
    .bind(messages)
    .bind(scheduled)
    .bind(expires)
    .bind(send_lease.as_secs_f64())
    .fetch_all(pool)
    .await?;
    Ok(inserted.into_iter().collect())
}
