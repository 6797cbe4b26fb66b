//! Due work: notification rows waiting for `next_attempt_at` (statuses
//! `scheduled`, `deferred`, `throttled`, `retrying`). Owns the decided claim
//! of a fresh notification (policy said "not now" or "never"), the
//! scheduler's batch claim with a lease (`FOR UPDATE SKIP LOCKED`), the
//! transitions of a claimed row, the queue depth, and cancellation.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgPool, Row};

use super::StoreError;
use super::batch::{
    Coalescer, KeyedJob, Reply, TryColumns, bind_tries, keyed_writer, with_finished_tries,
};
use super::notifications::AttemptResult;
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
    /// Coalesce the transitions of claimed rows (see [`super::batch`]);
    /// each started on first use (the API builds stores that only cancel).
    starts: Arc<OnceLock<Coalescer<StartJob>>>,
    settles: Arc<OnceLock<Coalescer<SettleJob>>>,
    retries: Arc<OnceLock<Coalescer<RetryJob>>>,
}

impl DueStore {
    pub fn new(pool: PgPool) -> Self {
        DueStore {
            pool,
            starts: Arc::default(),
            settles: Arc::default(),
            retries: Arc::default(),
        }
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
        let rows: Vec<Row> = sqlx::query_as(&claim_sql())
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
    /// redelivered request does not take the send over while it runs.
    /// `None` when `owner` no longer holds it (cancelled, or the lease was
    /// lost). Concurrent calls are written together in one statement.
    pub async fn start_attempt(
        &self,
        id: &str,
        owner: &str,
        provider: &str,
    ) -> Result<Option<i32>, StoreError> {
        let starts = self
            .starts
            .get_or_init(|| keyed_writer("due start", self.pool.clone(), write_starts));
        starts
            .submit(|done| StartJob {
                id: id.to_string(),
                owner: owner.to_string(),
                provider: provider.to_string(),
                done,
            })
            .await
    }

    /// Moves a claimed due row to `status` without sending: waiting again
    /// until `next_attempt_at`, or final. Stores `event` as its last event
    /// and releases the lease (`event: None` keeps the last event: no
    /// status change was published). `retries: Some` sets its retry count
    /// (a round that found every circuit open counts). False when `owner` no
    /// longer holds it. Concurrent calls are written together in one
    /// statement.
    pub async fn settle(
        &self,
        id: &str,
        owner: &str,
        status: Status,
        next_attempt_at: Option<DateTime<Utc>>,
        event: Option<&DeliveryStatusEvent>,
        retries: Option<i32>,
    ) -> Result<bool, StoreError> {
        let error = event.and_then(|e| e.error.as_ref());
        let last_event = event
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let settles = self
            .settles
            .get_or_init(|| keyed_writer("due settle", self.pool.clone(), write_settles));
        let settled = settles
            .submit(|done| SettleJob {
                id: id.to_string(),
                owner: owner.to_string(),
                status: status.as_str(),
                next_attempt_at,
                last_event,
                error_code: error.map(|e| e.code.clone()),
                error_message: error.map(|e| e.message.clone()),
                retries,
                done,
            })
            .await?;
        Ok(settled.is_some())
    }

    /// Ends attempt `attempt` of a notification whose providers all failed
    /// retryably: the attempt's row in the delivery log gets `last_try`
    /// (how the last provider's try ended), and the notification becomes a
    /// due row (`retrying`) at `next_attempt_at` with `last_try`'s provider
    /// and error, its retry count one higher and `event` as its last event.
    /// The notification changes only while it is still `sending` at
    /// `attempt` (the caller holds the send); false otherwise. Concurrent
    /// calls are written together in one statement.
    pub async fn retry_later(
        &self,
        id: &str,
        attempt: i32,
        last_try: AttemptResult,
        next_attempt_at: DateTime<Utc>,
        event: &DeliveryStatusEvent,
    ) -> Result<bool, StoreError> {
        let event = serde_json::to_string(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let retries = self
            .retries
            .get_or_init(|| keyed_writer("retry", self.pool.clone(), write_retries));
        let moved = retries
            .submit(|done| RetryJob {
                id: id.to_string(),
                attempt,
                result: last_try,
                next_attempt_at,
                event,
                done,
            })
            .await?;
        Ok(moved.is_some())
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

/// The scheduler's claim: `$1` owner, `$2` limit, `$3` lease in
/// milliseconds. It reads `notifications_due_idx` in the claim's order and
/// stops after `$2` rows, however many are due.
fn claim_sql() -> String {
    format!(
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
    )
}

/// One [`DueStore::start_attempt`] waiting for the next statement.
struct StartJob {
    id: String,
    owner: String,
    provider: String,
    done: Reply<Option<i32>>,
}

#[derive(Default)]
struct StartRows {
    ids: Vec<String>,
    owners: Vec<String>,
    providers: Vec<String>,
}

impl KeyedJob for StartJob {
    type Rows = StartRows;
    /// The attempt started.
    type Answer = i32;
    fn id(&self) -> &str {
        &self.id
    }
    fn push(self, rows: &mut StartRows) -> (String, Reply<Option<i32>>) {
        rows.ids.push(self.id.clone());
        rows.owners.push(self.owner);
        rows.providers.push(self.provider);
        (self.id, self.done)
    }
}

async fn write_starts(pool: PgPool, rows: StartRows) -> Result<HashMap<String, i32>, sqlx::Error> {
    let rows: Vec<(String, i32)> = sqlx::query_as(&format!(
        r#"
        WITH input AS (
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]) AS t(id, owner, provider)
        ), upd AS (
            UPDATE notifications n
            SET attempts = n.attempts + 1, status = 'sending', provider = i.provider,
                next_attempt_at = NULL, lease_owner = NULL, lease_until = NULL,
                send_lease_until = n.lease_until, updated_at = now()
            FROM input i
            WHERE n.id = i.id AND n.lease_owner = i.owner AND n.status IN {PENDING}
            RETURNING n.id, n.attempts, i.provider
        ), attempt AS (
            INSERT INTO delivery_attempts (notification_id, attempt, provider, status)
            SELECT id, attempts, provider, 'sending' FROM upd
        )
        SELECT id, attempts FROM upd
        "#
    ))
    .bind(rows.ids)
    .bind(rows.owners)
    .bind(rows.providers)
    .fetch_all(&pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// One [`DueStore::settle`] waiting for the next statement.
struct SettleJob {
    id: String,
    owner: String,
    status: &'static str,
    next_attempt_at: Option<DateTime<Utc>>,
    /// The event, serialized; `None` keeps the stored one.
    last_event: Option<String>,
    error_code: Option<String>,
    error_message: Option<String>,
    /// `None` keeps the stored count.
    retries: Option<i32>,
    done: Reply<Option<()>>,
}

#[derive(Default)]
struct SettleRows {
    ids: Vec<String>,
    owners: Vec<String>,
    statuses: Vec<&'static str>,
    next: Vec<Option<DateTime<Utc>>>,
    events: Vec<Option<String>>,
    codes: Vec<Option<String>>,
    messages: Vec<Option<String>>,
    retries: Vec<Option<i32>>,
}

impl KeyedJob for SettleJob {
    type Rows = SettleRows;
    type Answer = ();
    fn id(&self) -> &str {
        &self.id
    }
    fn push(self, rows: &mut SettleRows) -> (String, Reply<Option<()>>) {
        rows.ids.push(self.id.clone());
        rows.owners.push(self.owner);
        rows.statuses.push(self.status);
        rows.next.push(self.next_attempt_at);
        rows.events.push(self.last_event);
        rows.codes.push(self.error_code);
        rows.messages.push(self.error_message);
        rows.retries.push(self.retries);
        (self.id, self.done)
    }
}

async fn write_settles(pool: PgPool, rows: SettleRows) -> Result<HashMap<String, ()>, sqlx::Error> {
    let ids: Vec<String> = sqlx::query_scalar(&format!(
        r#"
        WITH input AS (
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                                 $5::text[], $6::text[], $7::text[], $8::int4[])
                AS t(id, owner, status, next_attempt_at, last_event, error_code, error_message,
                     retries)
        )
        UPDATE notifications n
        SET status = i.status, next_attempt_at = i.next_attempt_at,
            retries = COALESCE(i.retries, n.retries),
            last_event = COALESCE(i.last_event::jsonb, n.last_event),
            error_code = i.error_code, error_message = i.error_message,
            lease_owner = NULL, lease_until = NULL, updated_at = now(),
            failed_at = CASE WHEN i.status = 'failed' THEN now() ELSE n.failed_at END
        FROM input i
        WHERE n.id = i.id AND n.lease_owner = i.owner AND n.status IN {PENDING}
        RETURNING n.id
        "#
    ))
    .bind(rows.ids)
    .bind(rows.owners)
    .bind(rows.statuses)
    .bind(rows.next)
    .bind(rows.events)
    .bind(rows.codes)
    .bind(rows.messages)
    .bind(rows.retries)
    .fetch_all(&pool)
    .await?;
    Ok(ids.into_iter().map(|id| (id, ())).collect())
}

/// One [`DueStore::retry_later`] waiting for the next statement.
struct RetryJob {
    id: String,
    attempt: i32,
    result: AttemptResult,
    next_attempt_at: DateTime<Utc>,
    /// The `retrying` event, serialized.
    event: String,
    done: Reply<Option<()>>,
}

#[derive(Default)]
struct RetryRows {
    ids: Vec<String>,
    attempts: Vec<i32>,
    tries: TryColumns,
    next: Vec<DateTime<Utc>>,
    events: Vec<String>,
}

impl KeyedJob for RetryJob {
    type Rows = RetryRows;
    type Answer = ();
    fn id(&self) -> &str {
        &self.id
    }
    fn push(self, rows: &mut RetryRows) -> (String, Reply<Option<()>>) {
        rows.ids.push(self.id.clone());
        rows.attempts.push(self.attempt);
        rows.tries.push(self.result);
        rows.next.push(self.next_attempt_at);
        rows.events.push(self.event);
        (self.id, self.done)
    }
}

async fn write_retries(pool: PgPool, rows: RetryRows) -> Result<HashMap<String, ()>, sqlx::Error> {
    let query = sqlx::query(concat!(
        with_finished_tries!(
            "$10::timestamptz[], $11::text[]",
            "next_attempt_at, last_event"
        ),
        r#"
        UPDATE notifications n
        SET status = 'retrying', next_attempt_at = i.next_attempt_at, retries = n.retries + 1,
            last_event = i.last_event::jsonb, provider = i.provider,
            error_code = i.error_code, error_message = i.error_message,
            send_lease_until = NULL, lease_owner = NULL, lease_until = NULL, updated_at = now()
        FROM input i
        WHERE n.id = i.id AND n.status = 'sending' AND n.attempts = i.attempt
        RETURNING n.id
        "#,
    ));
    bind_tries(query, rows.ids, rows.attempts, rows.tries)
        .bind(rows.next)
        .bind(rows.events)
        .try_map(|row: sqlx::postgres::PgRow| Ok((row.try_get::<String, _>(0)?, ())))
        .fetch_all(&pool)
        .await
        .map(|ids| ids.into_iter().collect())
}

fn parse_status(s: &str) -> Result<Status, StoreError> {
    Status::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown status {s:?}")))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::ErrorInfo;
    use crate::store::NotificationStore;
    use crate::store::test_notification as notification;

    fn failed_try() -> AttemptResult {
        AttemptResult {
            status: Status::Failed,
            provider: "webhook".into(),
            provider_message_id: None,
            error: Some(ErrorInfo {
                code: "provider_unavailable".into(),
                message: "HTTP 503".into(),
                retryable: true,
            }),
            duration_ms: 7,
        }
    }

    /// With thousands of rows due, the claim reads the due index in its
    /// own order and stops after its batch: no sort of everything due (that
    /// made each claim cost as much as the whole backlog).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_claim_reads_the_due_index_in_order_and_sorts_nothing() {
        let pool = crate::store::test_pool().await;
        sqlx::query(
            "INSERT INTO notifications (id, request_id, channel, priority, status, payload,
                                        next_attempt_at)
             SELECT 'n' || g, 'r' || g, 'webhook',
                    CASE WHEN g % 100 = 0 THEN 'urgent' ELSE 'normal' END,
                    'deferred', '{}'::jsonb, now() - g * interval '1 millisecond'
             FROM generate_series(1, 5000) g",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE notifications")
            .execute(&pool)
            .await
            .unwrap();
        // As Herald's own connections run (see `store::pool`).
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("SET enable_seqscan = off")
            .execute(&mut *conn)
            .await
            .unwrap();
        let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", claim_sql()))
            .bind("a")
            .bind(100_i64)
            .bind(60_000_i64)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index Scan using notifications_due_idx"),
            "{plan}"
        );
        assert!(!plan.contains("Sort"), "{plan}");
    }

    /// Each batched statement answers every row of one statement by id,
    /// including rows it must not change. (The concurrent test below goes
    /// through the coalescers, which may split calls into statements of
    /// one; this one writes several rows in one statement.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_statement_of_many_rows_answers_each_row_by_id() {
        let pool = crate::store::test_pool().await;
        let store = NotificationStore::new(pool.clone(), Duration::from_secs(60));
        let due = DueStore::new(pool.clone());
        let past = Utc::now() - chrono::Duration::seconds(5);
        let later = Utc::now() + chrono::Duration::hours(1);
        let ns: Vec<Notification> = (0..6).map(|i| notification(&format!("m-{i}"))).collect();
        for n in &ns {
            let event = DeliveryStatusEvent::for_notification(n, Status::Deferred, 0);
            store
                .claim_decided(n, Status::Deferred, Some(past), &event)
                .await
                .unwrap();
        }
        let claimed = due
            .claim_batch("a", 100, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 6);
        let ids = |r: std::ops::Range<usize>| -> Vec<String> {
            ns[r].iter().map(|n| n.id.clone()).collect()
        };
        let owners = |o: &[&str]| -> Vec<String> { o.iter().map(|s| s.to_string()).collect() };

        // Starts: m-0 and m-1 held by "a"; m-2 asked for by "b".
        let rows = StartRows {
            ids: ids(0..3),
            owners: owners(&["a", "a", "b"]),
            providers: vec!["webhook".into(); 3],
        };
        let started = write_starts(pool.clone(), rows).await.unwrap();
        let want = HashMap::from([("m-0".to_string(), 1), ("m-1".to_string(), 1)]);
        assert_eq!(started, want);

        // Settles: m-3 and m-4 held by "a" (m-3 with a retry count), m-5
        // asked for by "b".
        let rows = SettleRows {
            ids: ids(3..6),
            owners: owners(&["a", "a", "b"]),
            statuses: vec!["deferred"; 3],
            next: vec![Some(later); 3],
            events: vec![None; 3],
            codes: vec![None; 3],
            messages: vec![None; 3],
            retries: vec![Some(4), None, Some(9)],
        };
        let settled = write_settles(pool.clone(), rows).await.unwrap();
        let mut settled: Vec<String> = settled.into_keys().collect();
        settled.sort();
        assert_eq!(settled, ["m-3", "m-4"]);

        // Retries: m-0 at its current attempt (1), m-1 at a stale one (2).
        let mut tries = TryColumns::default();
        tries.push(failed_try());
        tries.push(failed_try());
        let events = ns[..2]
            .iter()
            .map(|n| {
                let e = DeliveryStatusEvent::for_notification(n, Status::Retrying, 1);
                serde_json::to_string(&e).unwrap()
            })
            .collect();
        let rows = RetryRows {
            ids: ids(0..2),
            attempts: vec![1, 2],
            tries,
            next: vec![later; 2],
            events,
        };
        let moved = write_retries(pool.clone(), rows).await.unwrap();
        assert_eq!(moved.into_keys().collect::<Vec<_>>(), ["m-0"]);

        let rows: Vec<(String, String, i32, Option<String>)> = sqlx::query_as(
            "SELECT id, status, retries, lease_owner FROM notifications ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let rows: Vec<(&str, &str, i32, Option<&str>)> = rows
            .iter()
            .map(|(id, s, r, o)| (id.as_str(), s.as_str(), *r, o.as_deref()))
            .collect();
        assert_eq!(
            rows,
            [
                ("m-0", "retrying", 1, None),
                ("m-1", "sending", 0, None),
                ("m-2", "deferred", 0, Some("a")),
                ("m-3", "deferred", 4, None),
                ("m-4", "deferred", 0, None),
                ("m-5", "deferred", 0, Some("a")),
            ]
        );
    }

    /// Concurrent transitions of claimed rows share statements; each call
    /// must still get its own answer: a start for a row this owner does not
    /// hold gets none, the same row started twice at once is started once,
    /// and a retry for an attempt that is not the current one moves nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_transitions_of_claimed_rows_each_get_their_own_answer() {
        let pool = crate::store::test_pool().await;
        let store = NotificationStore::new(pool.clone(), Duration::from_secs(60));
        let due = DueStore::new(pool.clone());
        let past = Utc::now() - chrono::Duration::seconds(5);
        let ns: Vec<Notification> = (0..30).map(|i| notification(&format!("d-{i}"))).collect();
        for n in &ns {
            let event = DeliveryStatusEvent::for_notification(n, Status::Deferred, 0);
            store
                .claim_decided(n, Status::Deferred, Some(past), &event)
                .await
                .unwrap();
        }
        let claimed = due
            .claim_batch("a", 100, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 30);

        // Rows 0..10 start (row 0 twice), 10..20 wait again, 20..30 are
        // started by an owner that does not hold them.
        let later = Utc::now() + chrono::Duration::hours(1);
        let waiting: Vec<DeliveryStatusEvent> = ns[10..20]
            .iter()
            .map(|n| DeliveryStatusEvent::for_notification(n, Status::Deferred, 0))
            .collect();
        let starts = ns[..10]
            .iter()
            .chain(std::iter::once(&ns[0]))
            .map(|n| due.start_attempt(&n.id, "a", "webhook"));
        let foreign = ns[20..]
            .iter()
            .map(|n| due.start_attempt(&n.id, "b", "webhook"));
        let settles = ns[10..20]
            .iter()
            .zip(&waiting)
            .map(|(n, e)| due.settle(&n.id, "a", Status::Deferred, Some(later), Some(e), None));
        let (starts, foreign, settles) = tokio::join!(
            futures::future::join_all(starts),
            futures::future::join_all(foreign),
            futures::future::join_all(settles)
        );
        let starts: Vec<Option<i32>> = starts.into_iter().map(Result::unwrap).collect();
        assert!(starts[1..10].iter().all(|a| *a == Some(1)), "{starts:?}");
        let row_0: Vec<Option<i32>> = vec![starts[0], starts[10]];
        assert!(
            row_0.contains(&Some(1)) && row_0.contains(&None),
            "row 0 started once: {row_0:?}"
        );
        assert!(foreign.into_iter().all(|a| a.unwrap().is_none()));
        assert!(settles.into_iter().all(|s| s.unwrap()));

        // The started rows fail retryably: attempt 1 is current, 2 is not.
        let r = failed_try();
        let retry_event = |n: &Notification| {
            let mut e = DeliveryStatusEvent::for_notification(n, Status::Retrying, 1);
            e.next_attempt_at = Some(later);
            e
        };
        let events: Vec<DeliveryStatusEvent> = ns[..10].iter().map(retry_event).collect();
        let retries = ns[..10].iter().zip(&events).enumerate().map(|(i, (n, e))| {
            let attempt = if i == 9 { 2 } else { 1 };
            due.retry_later(&n.id, attempt, r.clone(), later, e)
        });
        let moved: Vec<bool> = futures::future::join_all(retries)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            moved,
            [true, true, true, true, true, true, true, true, true, false]
        );

        type Row = (String, String, i32, i32, Option<String>, Option<String>);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, status, attempts, retries, error_code, lease_owner FROM notifications
             ORDER BY length(id), id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        for (i, (id, status, attempts, retries, code, owner)) in rows.iter().enumerate() {
            let want: (&str, i32, i32, Option<&str>, Option<&str>) = match i {
                0..9 => ("retrying", 1, 1, Some("provider_unavailable"), None),
                9 => ("sending", 1, 0, None, None),
                10..20 => ("deferred", 0, 0, None, None),
                _ => ("deferred", 0, 0, None, Some("a")),
            };
            assert_eq!(
                (
                    status.as_str(),
                    *attempts,
                    *retries,
                    code.as_deref(),
                    owner.as_deref()
                ),
                want,
                "{id}"
            );
        }
        // Every started attempt is in the delivery log once; the retried
        // ones are finished with the try's result.
        type Attempt = (String, i32, String, Option<String>, Option<i32>, bool);
        let attempts: Vec<Attempt> = sqlx::query_as(
            "SELECT notification_id, attempt, status, error_code, duration_ms,
                    finished_at IS NOT NULL
             FROM delivery_attempts ORDER BY length(notification_id), notification_id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(attempts.len(), 10);
        for (i, a) in attempts.iter().enumerate() {
            assert_eq!(a.0, format!("d-{i}"));
            assert_eq!(a.1, 1);
            if i < 9 {
                let want = ("failed", Some("provider_unavailable"), Some(7), true);
                assert_eq!((a.2.as_str(), a.3.as_deref(), a.4, a.5), want, "{a:?}");
            } else {
                assert_eq!((a.2.as_str(), a.5), ("sending", false), "{a:?}");
            }
        }
    }
}
