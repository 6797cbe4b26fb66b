//! Write coalescing: concurrent `finish_attempt` calls are gathered into one
//! multi-row statement (`UNNEST` arrays), so under load the database sees a
//! few statements per poll rather than one round trip per notification.
//!
//! Callers still await their own result; nothing is acknowledged before its
//! row is written. A batch is whatever queued while the previous one ran (no
//! timer), so a lone write is not delayed.

use std::sync::Arc;

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

async fn writer(pool: PgPool, rx: Arc<Mutex<mpsc::UnboundedReceiver<FinishJob>>>) {
    loop {
        let mut batch = Vec::new();
        {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(j) => batch.push(j),
                None => return,
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
        }
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
