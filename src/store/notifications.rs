//! Notifications and their delivery log.
//!
//! The claim is one atomic `INSERT … ON CONFLICT DO NOTHING`: whoever inserts
//! the row owns the first attempt; a redelivered request finds the row and
//! learns what already happened. Concurrent claims are written together in
//! one multi-row statement (see [`super::batch`]).

use sqlx::PgPool;
use sqlx::types::Json;

use super::StoreError;
use super::batch::{self, ClaimJob, Coalescer, FinishJob};
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

/// What a claim stores in a new row besides the notification.
struct NewRow<'a> {
    status: Status,
    attempts: i32,
    /// `None` for a row the policy decided (nothing sent yet).
    provider: Option<&'a str>,
    next_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
    retries: i32,
}

/// Repository of notifications and delivery attempts.
#[derive(Clone)]
pub struct NotificationStore {
    pool: PgPool,
    /// How long a claimed send belongs to its claimer (longer than any send
    /// can take); a redelivery may take the send over only after it.
    send_lease: std::time::Duration,
    /// Coalesces attempt-finishing writes.
    finisher: Coalescer<FinishJob>,
    /// Coalesces claims.
    claims: Coalescer<ClaimJob>,
}

impl NotificationStore {
    /// Creates the store; must be called inside a tokio runtime (it spawns
    /// the batched writers).
    pub fn new(pool: PgPool, send_lease: std::time::Duration) -> Self {
        let finisher = batch::finish_writer(pool.clone());
        let claims = batch::claim_writer(pool.clone(), send_lease);
        NotificationStore {
            pool,
            send_lease,
            finisher,
            claims,
        }
    }

    /// Inserts `n` with `status` unless a row with its id exists. Concurrent
    /// calls are written together in one statement (see [`super::batch`]).
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
        let attempts: i32 = if status == Status::Sending { 1 } else { 0 };
        let row = NewRow {
            status,
            attempts,
            provider: Some(provider),
            next_attempt_at: None,
            retries: 0,
        };
        self.insert(n, row, event).await
    }

    /// Inserts `n` with a status the policy decided and no send attempt: a
    /// waiting status due at `next_attempt_at` (scheduled, deferred,
    /// throttled), or a final one (`suppressed`, `expired`, `failed`), with
    /// `event` as its last event. Batched like [`Self::claim`]; an existing
    /// row (a redelivery) is reported as [`Claim::Existing`] and left
    /// unchanged.
    pub async fn claim_decided(
        &self,
        n: &Notification,
        status: Status,
        next_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
        event: &DeliveryStatusEvent,
    ) -> Result<Claim, StoreError> {
        let row = NewRow {
            status,
            attempts: 0,
            provider: None,
            next_attempt_at,
            retries: 0,
        };
        self.insert(n, row, Some(event)).await
    }

    /// [`Self::claim_decided`] for a fresh notification no provider could
    /// take (rate limits, open circuits), with its retry count: a round that
    /// found every circuit open counts as one.
    pub async fn claim_waiting(
        &self,
        n: &Notification,
        status: Status,
        next_attempt_at: chrono::DateTime<chrono::Utc>,
        event: &DeliveryStatusEvent,
        retries: i32,
    ) -> Result<Claim, StoreError> {
        let row = NewRow {
            status,
            attempts: 0,
            provider: None,
            next_attempt_at: Some(next_attempt_at),
            retries,
        };
        self.insert(n, row, Some(event)).await
    }

    /// The claim statement's job for `n`; `Claim::New` when it inserted.
    async fn insert(
        &self,
        n: &Notification,
        row: NewRow<'_>,
        event: Option<&DeliveryStatusEvent>,
    ) -> Result<Claim, StoreError> {
        let NewRow {
            status,
            attempts,
            provider,
            next_attempt_at,
            retries,
        } = row;
        let payload = serde_json::to_string(n).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let last_event = event
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let error = event.and_then(|e| e.error.as_ref());
        let inserted = self
            .claims
            .submit(|done| ClaimJob {
                id: n.id.clone(),
                request_id: n.request_id.clone(),
                tenant_id: n.tenant_id.clone(),
                app_id: n.app_id.clone(),
                channel: n.channel.as_str().to_string(),
                priority: n.priority.as_str().to_string(),
                category: n.category.clone(),
                correlation_id: n.correlation_id.clone(),
                status: status.as_str().to_string(),
                attempts,
                provider: provider.map(str::to_string),
                payload,
                last_event,
                error_code: error.map(|e| e.code.clone()),
                error_message: error.map(|e| e.message.clone()),
                scheduled_at: n.scheduled_at,
                expires_at: n.expires_at,
                next_attempt_at,
                retries,
                done,
            })
            .await?;
        if inserted {
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
    /// fallback provider after a retryable failure): attempt `current + 1`
    /// with `provider`, written `sending` in the delivery log, and the send
    /// lease renewed. `failed`, how try `current` ended, is written to its
    /// row in the delivery log by the same statement (one round trip per
    /// fallback). `None` when the row is no longer `sending` at `current`
    /// (someone took it over); the failed try is recorded even then.
    pub async fn next_try(
        &self,
        id: &str,
        current: i32,
        provider: &str,
        failed: Option<&AttemptResult>,
    ) -> Result<Option<i32>, StoreError> {
        let e = failed.and_then(|r| r.error.as_ref());
        Ok(sqlx::query_scalar(concat!(
            "WITH input AS (
                SELECT $1::text AS id, $2::int4 AS attempt, $5::text AS status,
                       $6::text AS provider_message_id, $7::text AS error_code,
                       $8::text AS error_message, $9::bool AS retryable, $10::int4 AS duration_ms
                WHERE $5::text IS NOT NULL
            ), ",
            batch::finish_tries_cte!(),
            r#", upd AS (
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
        ))
        .bind(id)
        .bind(current)
        .bind(provider)
        .bind(self.send_lease.as_secs_f64())
        .bind(failed.map(|r| r.status.as_str()))
        .bind(failed.and_then(|r| r.provider_message_id.as_deref()))
        .bind(e.map(|e| e.code.as_str()))
        .bind(e.map(|e| e.message.as_str()))
        .bind(e.map(|e| e.retryable))
        .bind(failed.map(|r| r.duration_ms))
        .fetch_optional(&self.pool)
        .await?)
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
        batch::finish(&self.finisher, id, attempt, result, event).await
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

#[cfg(test)]
mod tests {

    use super::*;
    use crate::store::test_notification as notification;

    /// A store on a fresh test database, with a 60 s send lease.
    async fn store() -> NotificationStore {
        NotificationStore::new(
            crate::store::test_pool().await,
            std::time::Duration::from_secs(60),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_of_one_id_in_one_batch_have_one_owner() {
        let store = store().await;
        // Many distinct ids plus several copies of one id, all at once: they
        // are written in a few batched statements.
        let mut claims = Vec::new();
        for i in 0..40 {
            claims.push(notification(&format!("n-{i}")));
            if i % 8 == 0 {
                claims.push(notification("dup"));
            }
        }
        let results = futures::future::join_all(
            claims
                .iter()
                .map(|n| store.claim(n, Status::Sending, "webhook", None)),
        )
        .await;
        let mut dup_new = 0;
        for (n, r) in claims.iter().zip(results) {
            match r.unwrap() {
                Claim::New { attempt } => {
                    assert_eq!(attempt, 1);
                    if n.id == "dup" {
                        dup_new += 1;
                    }
                }
                Claim::Existing { status, .. } => {
                    assert_eq!(n.id, "dup", "only the copies find the row");
                    assert_eq!(status, Status::Sending);
                }
            }
        }
        assert_eq!(dup_new, 1, "exactly one copy owns the notification");
        let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM delivery_attempts")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(attempts, 41, "one `sending` attempt per notification");
        assert_eq!(
            store.status("n-3").await.unwrap(),
            Some((Status::Sending, 1))
        );
    }

    /// A fallback is one statement: the failed try's row in the delivery
    /// log is finished and the next try opened; a caller whose attempt is
    /// stale opens nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fallback_finishes_the_failed_try_and_opens_the_next() {
        let store = store().await;
        let n = notification("fb-1");
        let claimed = store
            .claim(&n, Status::Sending, "primary", None)
            .await
            .unwrap();
        assert_eq!(claimed, Claim::New { attempt: 1 });
        let failed = AttemptResult {
            status: Status::Failed,
            provider: "primary".into(),
            provider_message_id: None,
            error: Some(ErrorInfo {
                code: "http_503".into(),
                message: "unavailable".into(),
                retryable: true,
            }),
            duration_ms: 17,
        };
        let next = store
            .next_try(&n.id, 1, "secondary", Some(&failed))
            .await
            .unwrap();
        assert_eq!(next, Some(2));
        // Attempt 1 is no longer current: nothing opens.
        assert_eq!(store.next_try(&n.id, 1, "third", None).await.unwrap(), None);
        type Row = (
            i32,
            String,
            String,
            Option<String>,
            Option<bool>,
            Option<i32>,
            bool,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT attempt, provider, status, error_code, retryable, duration_ms,
                    finished_at IS NOT NULL
             FROM delivery_attempts WHERE notification_id = $1 ORDER BY attempt",
        )
        .bind(&n.id)
        .fetch_all(&store.pool)
        .await
        .unwrap();
        assert_eq!(
            rows,
            vec![
                (
                    1,
                    "primary".into(),
                    "failed".into(),
                    Some("http_503".into()),
                    Some(true),
                    Some(17),
                    true
                ),
                (
                    2,
                    "secondary".into(),
                    "sending".into(),
                    None,
                    None,
                    None,
                    false
                ),
            ]
        );
        let (provider, attempts): (String, i32) =
            sqlx::query_as("SELECT provider, attempts FROM notifications WHERE id = $1")
                .bind(&n.id)
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert_eq!((provider.as_str(), attempts), ("secondary", 2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_claim_stores_its_event_and_no_attempt() {
        let store = store().await;
        let n = notification("f-1");
        let mut event = DeliveryStatusEvent::for_notification(&n, Status::Failed, 0);
        event.error = Some(ErrorInfo {
            code: "template_error".into(),
            message: "boom".into(),
            retryable: false,
        });
        let first = store
            .claim(&n, Status::Failed, "webhook", Some(&event))
            .await
            .unwrap();
        assert_eq!(first, Claim::New { attempt: 0 });
        match store
            .claim(&n, Status::Failed, "webhook", Some(&event))
            .await
            .unwrap()
        {
            Claim::Existing {
                status, last_event, ..
            } => {
                assert_eq!(status, Status::Failed);
                assert_eq!(last_event.unwrap().event_id, event.event_id);
            }
            other => panic!("expected the existing row, got {other:?}"),
        }
        let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM delivery_attempts")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(attempts, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn decided_claims_are_batched_with_sends_and_keep_their_due_time() {
        let store = store().await;
        let due_at = chrono::Utc::now() + chrono::Duration::minutes(30);
        let sends: Vec<Notification> = (0..20).map(|i| notification(&format!("s-{i}"))).collect();
        let held: Vec<Notification> = (0..20).map(|i| notification(&format!("h-{i}"))).collect();
        let events: Vec<DeliveryStatusEvent> = held
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let status = if i.is_multiple_of(2) {
                    Status::Deferred
                } else {
                    Status::Suppressed
                };
                DeliveryStatusEvent::for_notification(n, status, 0)
            })
            .collect();
        // All at once: sends and decided rows share the claim statements.
        let (sent, decided) = futures::future::join(
            futures::future::join_all(
                sends
                    .iter()
                    .map(|n| store.claim(n, Status::Sending, "webhook", None)),
            ),
            futures::future::join_all(held.iter().zip(&events).map(|(n, e)| {
                let at = (e.status == Status::Deferred).then_some(due_at);
                store.claim_decided(n, e.status, at, e)
            })),
        )
        .await;
        assert!(
            sent.into_iter()
                .all(|r| r.unwrap() == Claim::New { attempt: 1 })
        );
        assert!(
            decided
                .into_iter()
                .all(|r| r.unwrap() == Claim::New { attempt: 0 })
        );

        type Row = (
            String,
            String,
            Option<String>,
            Option<chrono::DateTime<chrono::Utc>>,
            i32,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, status, provider, next_attempt_at, attempts FROM notifications
                 WHERE id LIKE 'h-%' ORDER BY id",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 20);
        for (id, status, provider, next, attempts) in rows {
            let i: usize = id[2..].parse().unwrap();
            assert_eq!(provider, None, "{id}: nothing was sent");
            assert_eq!(attempts, 0, "{id}");
            if i.is_multiple_of(2) {
                assert_eq!(status, "deferred", "{id}");
                let next = next.expect("a deferred row is due later");
                assert!((next - due_at).num_milliseconds().abs() < 1, "{id}: {next}");
            } else {
                assert_eq!(status, "suppressed", "{id}");
                assert_eq!(next, None, "{id}");
            }
        }
        // Only the sends have delivery attempts.
        let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM delivery_attempts")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(attempts, 20);
        // A redelivered decided request finds its row and its stored event.
        match store
            .claim_decided(&held[1], Status::Suppressed, None, &events[1])
            .await
            .unwrap()
        {
            Claim::Existing {
                status, last_event, ..
            } => {
                assert_eq!(status, Status::Suppressed);
                assert_eq!(last_event.unwrap().event_id, events[1].event_id);
            }
            other => panic!("expected the existing row, got {other:?}"),
        }
    }
}
