//! Statement coalescing: concurrent claims, `finish_attempt` calls and
//! preference lookups are each gathered into one multi-row statement
//! (`UNNEST` arrays), so under load the database sees a few statements per
//! poll rather than one round trip per notification.
//!
//! Callers still await their own result; nothing is acknowledged before its
//! row is written. A batch is whatever queued while the previous one ran (no
//! timer), so a lone write is not delayed. [`Coalescer`] is the mechanism;
//! the claim and finish statements are below, the lookup in `preferences`.

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::Postgres;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
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
    /// The outcome event, serialized (PostgreSQL parses it into `jsonb`).
    pub event: String,
    pub done: Reply<()>,
}

/// Where a job's answer goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A queue in front of [`WRITERS`] tasks, each taking whatever queued as one
/// batch and answering every job of it. The tasks end when every handle is
/// dropped.
pub(super) struct Coalescer<J> {
    tx: mpsc::UnboundedSender<J>,
    /// Names the tasks in errors ("claim writer").
    name: &'static str,
}

impl<J> Clone for Coalescer<J> {
    fn clone(&self) -> Self {
        Coalescer {
            tx: self.tx.clone(),
            name: self.name,
        }
    }
}

impl<J: Send + 'static> Coalescer<J> {
    /// Spawns the tasks on the current tokio runtime; `run` handles one batch.
    pub fn start<F, Fut>(name: &'static str, run: F) -> Coalescer<J>
    where
        F: Fn(Vec<J>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..WRITERS {
            let (rx, run) = (rx.clone(), run.clone());
            tokio::spawn(async move {
                while let Some(batch) = next_batch(&rx).await {
                    run(batch).await;
                }
            });
        }
        Coalescer { tx, name }
    }

    /// Queues the job `make(reply)` and waits for its answer.
    pub async fn submit<T>(&self, make: impl FnOnce(Reply<T>) -> J) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| StoreError::Batch(format!("the {} stopped", self.name)))?;
        answer
            .await
            .map_err(|_| StoreError::Batch(format!("the {} dropped a job", self.name)))?
    }
}

/// Answers every job of a batch whose statement failed.
pub(super) fn fail_all<T>(
    replies: impl IntoIterator<Item = Reply<T>>,
    what: &str,
    e: &dyn std::fmt::Display,
) {
    for reply in replies {
        let _ = reply.send(Err(StoreError::Batch(format!(
            "batched {what} failed: {e}"
        ))));
    }
}

/// Answers every job of a batch read: job `i` gets `answers[i]`, or every
/// job the error when the statement failed.
pub(super) fn answer_all<J, A>(
    batch: Vec<J>,
    answers: Result<Vec<A>, StoreError>,
    what: &str,
    reply: impl Fn(J) -> Reply<A>,
) {
    match answers {
        Ok(answers) => {
            for (job, answer) in batch.into_iter().zip(answers) {
                let _ = reply(job).send(Ok(answer));
            }
        }
        Err(e) => fail_all(batch.into_iter().map(reply), what, &e),
    }
}

/// Answers jobs keyed by id from a statement that returned one row per id it
/// changed: a job gets `Some` of its id's value, `None` when the statement
/// did not change its row; every job the error when the statement failed.
pub(super) fn answer_by_id<A>(
    replies: Vec<(String, Reply<Option<A>>)>,
    rows: Result<std::collections::HashMap<String, A>, sqlx::Error>,
    what: &str,
) {
    match rows {
        Ok(mut rows) => {
            for (id, reply) in replies {
                let _ = reply.send(Ok(rows.remove(&id)));
            }
        }
        Err(e) => fail_all(replies.into_iter().map(|(_, r)| r), what, &e),
    }
}

/// Writes `batch` as statements in which no id repeats: the first job of
/// each id goes in the first statement, a repeat in a later one, in order.
/// (The same id twice in one `INSERT … ON CONFLICT` or `UPDATE … FROM
/// UNNEST` writes the row once and would answer both jobs as if written.)
pub(super) async fn distinct_rounds<J, Fut>(
    mut batch: Vec<J>,
    id: impl Fn(&J) -> &str,
    mut write: impl FnMut(Vec<J>) -> Fut,
) where
    Fut: Future<Output = ()>,
{
    while !batch.is_empty() {
        let mut seen = std::collections::HashSet::new();
        let (round, later): (Vec<J>, Vec<J>) = batch
            .into_iter()
            .partition(|j| seen.insert(id(j).to_string()));
        batch = later;
        write(round).await;
    }
}

/// A job that changes one row, found by its id, in a batched statement.
pub(super) trait KeyedJob: Send + 'static {
    /// The statement's columns for a batch of such jobs.
    type Rows: Default + Send;
    /// What a job is answered when its row changed.
    type Answer: Send + 'static;
    fn id(&self) -> &str;
    /// Moves the job's values into `rows`; returns its id and reply.
    fn push(self, rows: &mut Self::Rows) -> (String, Reply<Option<Self::Answer>>);
}

/// A coalescer of [`KeyedJob`]s named `what`: `write` runs each batch as
/// statements in which no id repeats ([`distinct_rounds`]) and returns the
/// rows it changed; every job is answered from them ([`answer_by_id`]).
pub(super) fn keyed_writer<J, F, Fut>(what: &'static str, pool: PgPool, write: F) -> Coalescer<J>
where
    J: KeyedJob,
    F: Fn(PgPool, J::Rows) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<std::collections::HashMap<String, J::Answer>, sqlx::Error>> + Send,
{
    Coalescer::start(what, move |batch: Vec<J>| {
        let (pool, write) = (pool.clone(), write.clone());
        async move {
            distinct_rounds(batch, J::id, |round| async {
                let mut rows = J::Rows::default();
                let replies: Vec<_> = round.into_iter().map(|j| j.push(&mut rows)).collect();
                answer_by_id(replies, write(pool.clone(), rows).await, what);
            })
            .await
        }
    })
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

/// The attempt writer: finishes go out as one statement per batch.
pub(super) fn finish_writer(pool: PgPool) -> Coalescer<FinishJob> {
    Coalescer::start("attempt writer", move |batch| {
        let pool = pool.clone();
        async move {
            let (rows, replies) = finish_rows(batch);
            match write(&pool, rows).await {
                Ok(()) => {
                    for reply in replies {
                        let _ = reply.send(Ok(()));
                    }
                }
                Err(e) => fail_all(replies, "attempt write", &e),
            }
        }
    })
}

/// Queues the finish of `attempt` of `id` and waits for it.
pub(super) async fn finish(
    writer: &Coalescer<FinishJob>,
    id: &str,
    attempt: i32,
    result: &AttemptResult,
    event: &DeliveryStatusEvent,
) -> Result<(), StoreError> {
    let event = serde_json::to_string(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    writer
        .submit(|done| FinishJob {
            id: id.to_string(),
            attempt,
            result: result.clone(),
            event,
            done,
        })
        .await
}

/// The columns of one finish statement, moved out of the jobs (no copies).
#[derive(Default)]
struct FinishRows {
    ids: Vec<String>,
    attempts: Vec<i32>,
    tries: TryColumns,
    events: Vec<String>,
}

/// The CTE that finishes each try of `input` in the delivery log. `input`
/// has the columns `id`, `attempt`, `status`, `provider_message_id`,
/// `error_code`, `error_message`, `retryable` and `duration_ms` (see
/// [`bind_tries`]). Shared by the finish, the retry (`due`) and the
/// fallback (`notifications`), so a try's row is written one way.
macro_rules! finish_tries_cte {
    () => {
        "finished AS (
            UPDATE delivery_attempts d
            SET status = i.status, provider_message_id = i.provider_message_id,
                error_code = i.error_code, error_message = i.error_message,
                retryable = i.retryable, finished_at = now(), duration_ms = i.duration_ms
            FROM input i
            WHERE d.notification_id = i.id AND d.attempt = i.attempt
        )"
    };
}
pub(super) use finish_tries_cte;

/// `WITH input AS (…), finished AS (…)` for a batched statement that
/// finishes tries; the caller's statement follows and reads `input`.
/// `input` unnests `$1` to `$9` (ids, attempts and the [`TryColumns`], bound
/// by [`bind_tries`]) as `id`, `attempt`, the try's columns and `provider`,
/// then the caller's arrays from `$10` (`$types`) as its columns
/// (`$columns`); `finished` is [`finish_tries_cte`].
macro_rules! with_finished_tries {
    ($types:literal, $columns:literal) => {
        concat!(
            "WITH input AS (
                SELECT * FROM UNNEST($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[],
                                     $6::text[], $7::bool[], $8::int4[], $9::text[], ",
            $types,
            ") AS t(id, attempt, status, provider_message_id, error_code, error_message,
                     retryable, duration_ms, provider, ",
            $columns,
            ")
            ), ",
            $crate::store::batch::finish_tries_cte!(),
            "\n"
        )
    };
}
pub(super) use with_finished_tries;

/// Binds `ids`, `attempts` and `tries` as `$1` to `$9` (see [`with_finished_tries`]).
pub(super) fn bind_tries(
    query: Query<'_, Postgres, PgArguments>,
    ids: Vec<String>,
    attempts: Vec<i32>,
    tries: TryColumns,
) -> Query<'_, Postgres, PgArguments> {
    query
        .bind(ids)
        .bind(attempts)
        .bind(tries.statuses)
        .bind(tries.message_ids)
        .bind(tries.codes)
        .bind(tries.messages)
        .bind(tries.retryable)
        .bind(tries.durations)
        .bind(tries.providers)
}

/// How tries ended, as columns of a batched statement (the finish, and the
/// retry in `due`).
#[derive(Default)]
pub(super) struct TryColumns {
    pub statuses: Vec<&'static str>,
    pub message_ids: Vec<Option<String>>,
    pub codes: Vec<Option<String>>,
    pub messages: Vec<Option<String>>,
    pub retryable: Vec<Option<bool>>,
    pub durations: Vec<i32>,
    pub providers: Vec<String>,
}

impl TryColumns {
    /// Moves one try's result into the columns.
    pub fn push(&mut self, r: AttemptResult) {
        self.statuses.push(r.status.as_str());
        self.message_ids.push(r.provider_message_id);
        self.retryable.push(r.error.as_ref().map(|e| e.retryable));
        let (code, message) = r.error.map(|e| (e.code, e.message)).unzip();
        self.codes.push(code);
        self.messages.push(message);
        self.durations.push(r.duration_ms);
        self.providers.push(r.provider);
    }
}

fn finish_rows(batch: Vec<FinishJob>) -> (FinishRows, Vec<Reply<()>>) {
    let mut rows = FinishRows::default();
    let mut senders = Vec::with_capacity(batch.len());
    for j in batch {
        rows.ids.push(j.id);
        rows.attempts.push(j.attempt);
        rows.tries.push(j.result);
        rows.events.push(j.event);
        senders.push(j.done);
    }
    (rows, senders)
}

async fn write(pool: &PgPool, rows: FinishRows) -> Result<(), sqlx::Error> {
    let query = sqlx::query(concat!(
        with_finished_tries!("$10::text[]", "last_event"),
        r#"
        UPDATE notifications n
        SET status = i.status, provider = i.provider, provider_message_id = i.provider_message_id,
            error_code = i.error_code, error_message = i.error_message, last_event = i.last_event::jsonb,
            updated_at = now(), send_lease_until = NULL,
            sent_at = CASE WHEN i.status = 'sent' THEN now() ELSE n.sent_at END,
            failed_at = CASE WHEN i.status = 'failed' THEN now() ELSE n.failed_at END
        FROM input i
        WHERE n.id = i.id
        "#,
    ));
    bind_tries(query, rows.ids, rows.attempts, rows.tries)
        .bind(rows.events)
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
    /// `None` for a row the policy decided (nothing sent yet).
    pub provider: Option<String>,
    /// The notification and the outcome event, serialized (PostgreSQL
    /// parses them into `jsonb`).
    pub payload: String,
    pub last_event: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// When a waiting row (scheduled, deferred, throttled) is due.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Retry rounds so far (0 but for a notification no provider could take).
    pub retries: i32,
    /// `true` when this claim inserted the row (it owns it), `false` when a
    /// row with the id existed.
    pub done: Reply<bool>,
}

/// The claim writer: claims go out as one statement per batch; a `sending`
/// claim holds its send lease for `send_lease`.
pub(super) fn claim_writer(pool: PgPool, send_lease: std::time::Duration) -> Coalescer<ClaimJob> {
    Coalescer::start("claim writer", move |batch: Vec<ClaimJob>| {
        let pool = pool.clone();
        async move {
            distinct_rounds(
                batch,
                |j| &j.id,
                |round| async {
                    let (rows, replies) = claim_rows(round);
                    match write_claims(&pool, rows, send_lease).await {
                        Ok(inserted) => {
                            for (id, reply) in replies {
                                let _ = reply.send(Ok(inserted.contains(&id)));
                            }
                        }
                        Err(e) => fail_all(replies.into_iter().map(|(_, r)| r), "claim", &e),
                    }
                },
            )
            .await
        }
    })
}

/// The columns of one claim statement, moved out of the jobs.
#[derive(Default)]
struct ClaimRows {
    ids: Vec<String>,
    request_ids: Vec<String>,
    tenants: Vec<Option<String>>,
    apps: Vec<Option<String>>,
    channels: Vec<String>,
    priorities: Vec<String>,
    categories: Vec<Option<String>>,
    correlations: Vec<Option<String>>,
    statuses: Vec<String>,
    attempts: Vec<i32>,
    providers: Vec<Option<String>>,
    payloads: Vec<String>,
    events: Vec<Option<String>>,
    codes: Vec<Option<String>>,
    messages: Vec<Option<String>>,
    scheduled: Vec<Option<DateTime<Utc>>>,
    expires: Vec<Option<DateTime<Utc>>>,
    next: Vec<Option<DateTime<Utc>>>,
    retries: Vec<i32>,
}

fn claim_rows(round: Vec<ClaimJob>) -> (ClaimRows, Vec<(String, Reply<bool>)>) {
    let mut rows = ClaimRows::default();
    let mut senders = Vec::with_capacity(round.len());
    for j in round {
        rows.ids.push(j.id.clone());
        rows.request_ids.push(j.request_id);
        rows.tenants.push(j.tenant_id);
        rows.apps.push(j.app_id);
        rows.channels.push(j.channel);
        rows.priorities.push(j.priority);
        rows.categories.push(j.category);
        rows.correlations.push(j.correlation_id);
        rows.statuses.push(j.status);
        rows.attempts.push(j.attempts);
        rows.providers.push(j.provider);
        rows.payloads.push(j.payload);
        rows.events.push(j.last_event);
        rows.codes.push(j.error_code);
        rows.messages.push(j.error_message);
        rows.scheduled.push(j.scheduled_at);
        rows.expires.push(j.expires_at);
        rows.next.push(j.next_attempt_at);
        rows.retries.push(j.retries);
        senders.push((j.id, j.done));
    }
    (rows, senders)
}

async fn write_claims(
    pool: &PgPool,
    rows: ClaimRows,
    send_lease: std::time::Duration,
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let inserted: Vec<String> = sqlx::query_scalar(
        r#"
        WITH input AS (
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                 $6::text[], $7::text[], $8::text[], $9::text[], $10::int4[],
                                 $11::text[], $12::text[], $13::text[], $14::text[], $15::text[],
                                 $16::timestamptz[], $17::timestamptz[], $18::timestamptz[],
                                 $20::int4[])
                AS t(id, request_id, tenant_id, app_id, channel, priority, category,
                     correlation_id, status, attempts, provider, payload, last_event,
                     error_code, error_message, scheduled_at, expires_at, next_attempt_at,
                     retries)
        ), ins AS (
            INSERT INTO notifications (
                id, request_id, tenant_id, app_id, channel, priority, category,
                correlation_id, status, attempts, provider, payload, last_event,
                error_code, error_message, scheduled_at, expires_at, next_attempt_at,
                retries, failed_at, send_lease_until)
            SELECT id, request_id, tenant_id, app_id, channel, priority, category,
                   correlation_id, status, attempts, provider, payload::jsonb, last_event::jsonb,
                   error_code, error_message, scheduled_at, expires_at, next_attempt_at,
                   retries,
                   CASE WHEN status = 'failed' THEN now() END,
                   CASE WHEN status = 'sending' THEN now() + make_interval(secs => $19) END
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
    .bind(rows.ids)
    .bind(rows.request_ids)
    .bind(rows.tenants)
    .bind(rows.apps)
    .bind(rows.channels)
    .bind(rows.priorities)
    .bind(rows.categories)
    .bind(rows.correlations)
    .bind(rows.statuses)
    .bind(rows.attempts)
    .bind(rows.providers)
    .bind(rows.payloads)
    .bind(rows.events)
    .bind(rows.codes)
    .bind(rows.messages)
    .bind(rows.scheduled)
    .bind(rows.expires)
    .bind(rows.next)
    .bind(send_lease.as_secs_f64())
    .bind(rows.retries)
    .fetch_all(pool)
    .await?;
    Ok(inserted.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same id twice in one statement would be written once and
    /// answered twice: repeats go in later statements, in order.
    #[tokio::test]
    async fn repeated_ids_are_written_in_later_rounds_in_order() {
        let mut rounds: Vec<Vec<(&str, u8)>> = Vec::new();
        let batch = vec![("a", 1), ("b", 2), ("a", 3), ("c", 4), ("a", 5)];
        distinct_rounds(
            batch,
            |j: &(&str, u8)| j.0,
            |round| {
                rounds.push(round);
                async {}
            },
        )
        .await;
        assert_eq!(
            rounds,
            vec![
                vec![("a", 1), ("b", 2), ("c", 4)],
                vec![("a", 3)],
                vec![("a", 5)]
            ]
        );
    }

    /// A job is answered with its own id's row, and `None` when the
    /// statement did not change its row.
    #[tokio::test]
    async fn jobs_are_answered_by_their_own_id() {
        let (a, ra) = oneshot::channel();
        let (b, rb) = oneshot::channel();
        let (c, rc) = oneshot::channel();
        let replies = vec![
            ("a".to_string(), a),
            ("b".to_string(), b),
            ("c".to_string(), c),
        ];
        let rows = std::collections::HashMap::from([("c".to_string(), 3), ("a".to_string(), 1)]);
        answer_by_id(replies, Ok(rows), "test");
        assert_eq!(ra.await.unwrap().unwrap(), Some(1));
        assert_eq!(rb.await.unwrap().unwrap(), None);
        assert_eq!(rc.await.unwrap().unwrap(), Some(3));
    }

    #[tokio::test]
    async fn a_failed_batch_is_a_database_error_for_every_job() {
        let (a, ra) = oneshot::channel::<Result<(), StoreError>>();
        let (b, rb) = oneshot::channel::<Result<(), StoreError>>();
        fail_all([a, b], "attempt write", &"No space left on device");
        for r in [ra, rb] {
            let e = r.await.expect("answered").expect_err("failed");
            assert!(matches!(e, StoreError::Batch(_)), "{e:?}");
            assert_eq!(
                e.to_string(),
                "database: batched attempt write failed: No space left on device"
            );
        }
    }
}
