//! Preferences and suppressed addresses in PostgreSQL: load the levels that
//! apply to one recipient, upsert with last-write-wins, and the recent sends
//! that frequency caps count.

use std::sync::{Arc, OnceLock};

use super::StoreError;
use super::batch::{Coalescer, Reply, answer_all};
use crate::domain::Channel;
use crate::policy::preferences::PreferenceRecord;
use chrono::{DateTime, NaiveTime, Utc};
use sqlx::PgPool;
use sqlx::types::Json;

/// Repository of recipient preferences.
#[derive(Clone)]
pub struct PreferenceStore {
    pool: PgPool,
    /// Coalesces concurrent [`PreferenceStore::lookup`]s; started on first
    /// use (the API builds stores that never look up).
    lookups: Arc<OnceLock<Coalescer<LookupJob>>>,
    /// Coalesces concurrent [`PreferenceStore::recent_sends`], likewise.
    sends: Arc<OnceLock<Coalescer<SendsJob>>>,
}

/// What [`PreferenceStore::lookup`] answers: the levels, most specific
/// first, and whether the address is suppressed (`None`: not asked).
type LookupAnswer = (Vec<PreferenceRecord>, Option<bool>);

/// One lookup waiting for the next statement.
struct LookupJob {
    tenant_id: String,
    user_id: String,
    channel: Channel,
    address: Option<String>,
    done: Reply<LookupAnswer>,
}

/// One recent-sends read waiting for the next statement.
struct SendsJob {
    tenant_id: Option<String>,
    user_id: String,
    channel: Channel,
    now: DateTime<Utc>,
    limit: u32,
    done: Reply<Vec<DateTime<Utc>>>,
}

type Row = (
    String,
    String,
    String,
    Option<bool>,
    Option<bool>,
    Option<String>,
    Option<Vec<String>>,
    Option<NaiveTime>,
    Option<NaiveTime>,
    Option<String>,
    Option<i32>,
    Option<i32>,
    Option<Vec<String>>,
    DateTime<Utc>,
);

const COLUMNS: &str = "tenant_id, user_id, channel, enabled, opt_in, address, device_tokens, \
    quiet_hours_start, quiet_hours_end, quiet_hours_timezone, max_per_hour, max_per_day, \
    muted_categories, updated_at";

fn record(r: Row) -> Result<PreferenceRecord, StoreError> {
    let channel = Channel::parse(&r.2)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown channel {:?}", r.2)))?;
    Ok(PreferenceRecord {
        tenant_id: r.0,
        user_id: r.1,
        channel,
        enabled: r.3,
        opt_in: r.4,
        address: r.5,
        device_tokens: r.6,
        quiet_hours_start: r.7,
        quiet_hours_end: r.8,
        quiet_hours_timezone: r.9,
        max_per_hour: r.10,
        max_per_day: r.11,
        muted_categories: r.12,
        updated_at: r.13,
    })
}

impl PreferenceStore {
    pub fn new(pool: PgPool) -> Self {
        PreferenceStore {
            pool,
            lookups: Arc::new(OnceLock::new()),
            sends: Arc::new(OnceLock::new()),
        }
    }

    /// The records that apply to (tenant, user, channel), most specific
    /// first: the user's, the tenant default, the global default (each only
    /// if stored). One round trip.
    pub async fn levels(
        &self,
        tenant_id: &str,
        user_id: &str,
        channel: Channel,
    ) -> Result<Vec<PreferenceRecord>, StoreError> {
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM preferences
             WHERE channel = $3
               AND ((tenant_id = $1 AND user_id IN ($2, '')) OR (tenant_id = '' AND user_id = ''))
             ORDER BY (tenant_id = '') ASC, (user_id = '') ASC"
        ))
        .bind(tenant_id)
        .bind(user_id)
        .bind(channel.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(record).collect()
    }

    /// [`PreferenceStore::levels`] and, when `address` is given,
    /// [`PreferenceStore::is_suppressed`] in one round trip (a cold cache
    /// costs one query per new recipient, not two). Lookups made while a
    /// statement runs are answered together by the next one, so under load
    /// the database sees one statement per batch, not one per recipient.
    pub async fn lookup(
        &self,
        tenant_id: &str,
        user_id: &str,
        channel: Channel,
        address: Option<&str>,
    ) -> Result<LookupAnswer, StoreError> {
        let lookups = self.lookups.get_or_init(|| lookup_task(self.pool.clone()));
        lookups
            .submit(|done| LookupJob {
                tenant_id: tenant_id.to_string(),
                user_id: user_id.to_string(),
                channel,
                address: address.map(str::to_string),
                done,
            })
            .await
    }

    /// Every stored record of (tenant, user), one per channel.
    pub async fn for_user(
        &self,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<Vec<PreferenceRecord>, StoreError> {
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM preferences WHERE tenant_id = $1 AND user_id = $2 ORDER BY channel"
        ))
        .bind(tenant_id)
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(record).collect()
    }

    /// The stored record of exactly (tenant, user, channel).
    pub async fn get(
        &self,
        tenant_id: &str,
        user_id: &str,
        channel: Channel,
    ) -> Result<Option<PreferenceRecord>, StoreError> {
        let row: Option<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM preferences WHERE tenant_id = $1 AND user_id = $2 AND channel = $3"
        ))
        .bind(tenant_id)
        .bind(user_id)
        .bind(channel.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(record).transpose()
    }

    /// Replaces the record of its key unless the stored one is newer
    /// (last write wins by `updated_at`). Returns whether it was written.
    pub async fn upsert(&self, r: &PreferenceRecord) -> Result<bool, StoreError> {
        let written = sqlx::query(
            r#"
            INSERT INTO preferences (tenant_id, user_id, channel, enabled, opt_in, address,
                device_tokens, quiet_hours_start, quiet_hours_end, quiet_hours_timezone,
                max_per_hour, max_per_day, muted_categories, updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
            ON CONFLICT (tenant_id, user_id, channel) DO UPDATE SET
                enabled = EXCLUDED.enabled, opt_in = EXCLUDED.opt_in, address = EXCLUDED.address,
                device_tokens = EXCLUDED.device_tokens,
                quiet_hours_start = EXCLUDED.quiet_hours_start,
                quiet_hours_end = EXCLUDED.quiet_hours_end,
                quiet_hours_timezone = EXCLUDED.quiet_hours_timezone,
                max_per_hour = EXCLUDED.max_per_hour, max_per_day = EXCLUDED.max_per_day,
                muted_categories = EXCLUDED.muted_categories, updated_at = EXCLUDED.updated_at
            WHERE preferences.updated_at < EXCLUDED.updated_at
            "#,
        )
        .bind(&r.tenant_id)
        .bind(&r.user_id)
        .bind(r.channel.as_str())
        .bind(r.enabled)
        .bind(r.opt_in)
        .bind(&r.address)
        .bind(&r.device_tokens)
        .bind(r.quiet_hours_start)
        .bind(r.quiet_hours_end)
        .bind(&r.quiet_hours_timezone)
        .bind(r.max_per_hour)
        .bind(r.max_per_day)
        .bind(&r.muted_categories)
        .bind(r.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(written.rows_affected() > 0)
    }

    /// True when `address` is suppressed for `tenant_id` or for every tenant.
    pub async fn is_suppressed(&self, tenant_id: &str, address: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM suppressed_addresses
                            WHERE address = $2 AND tenant_id IN ($1, ''))",
        )
        .bind(tenant_id)
        .bind(address)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Adds `address` to the suppression list (`tenant_id = ""`: all tenants).
    pub async fn suppress(
        &self,
        tenant_id: &str,
        address: &str,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO suppressed_addresses (tenant_id, address, reason) VALUES ($1, $2, $3)
             ON CONFLICT (tenant_id, address) DO UPDATE SET reason = EXCLUDED.reason",
        )
        .bind(tenant_id)
        .bind(address)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// `sent_at` of the newest `limit` sends of (tenant, user, channel) in
    /// the 24 hours before `now`, newest first. Served by
    /// `notifications_sent_by_user_idx`. Reads made while a statement runs
    /// are answered together by the next one, like lookups: with a cap on
    /// every recipient this is one read per notification.
    pub async fn recent_sends(
        &self,
        tenant_id: Option<&str>,
        user_id: &str,
        channel: Channel,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<DateTime<Utc>>, StoreError> {
        let sends = self.sends.get_or_init(|| sends_task(self.pool.clone()));
        sends
            .submit(|done| SendsJob {
                tenant_id: tenant_id.map(str::to_string),
                user_id: user_id.to_string(),
                channel,
                now,
                limit,
                done,
            })
            .await
    }
}

/// Answers queued recent-sends reads, one statement per batch.
fn sends_task(pool: PgPool) -> Coalescer<SendsJob> {
    Coalescer::start("recent sends task", move |batch: Vec<SendsJob>| {
        let pool = pool.clone();
        async move {
            let answers = sends_batch(&pool, &batch).await;
            answer_all(batch, answers, "recent sends read", |j| j.done);
        }
    })
}

/// One statement for the whole batch: each read's newest sends, newest
/// first; answers in the batch's order.
async fn sends_batch(
    pool: &PgPool,
    batch: &[SendsJob],
) -> Result<Vec<Vec<DateTime<Utc>>>, StoreError> {
    let tenants: Vec<Option<&str>> = batch.iter().map(|j| j.tenant_id.as_deref()).collect();
    let users: Vec<&str> = batch.iter().map(|j| j.user_id.as_str()).collect();
    let channels: Vec<&str> = batch.iter().map(|j| j.channel.as_str()).collect();
    let nows: Vec<DateTime<Utc>> = batch.iter().map(|j| j.now).collect();
    let limits: Vec<i64> = batch.iter().map(|j| i64::from(j.limit)).collect();
    let rows: Vec<(i64, DateTime<Utc>)> = sqlx::query_as(
        r#"
        SELECT i.ord, s.sent_at
        FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::int8[])
            WITH ORDINALITY AS i(tenant_id, user_id, channel, at, lim, ord)
        CROSS JOIN LATERAL (
            SELECT n.sent_at FROM notifications n
            WHERE n.tenant_id IS NOT DISTINCT FROM i.tenant_id AND n.user_id = i.user_id
              AND n.channel = i.channel AND n.sent_at IS NOT NULL
              AND n.sent_at > i.at - interval '1 day' AND n.sent_at <= i.at
            ORDER BY n.sent_at DESC LIMIT i.lim) s
        ORDER BY i.ord, s.sent_at DESC
        "#,
    )
    .bind(tenants)
    .bind(users)
    .bind(channels)
    .bind(nows)
    .bind(limits)
    .fetch_all(pool)
    .await?;
    let mut answers: Vec<Vec<DateTime<Utc>>> = vec![Vec::new(); batch.len()];
    for (ord, sent_at) in rows {
        slot(&mut answers, ord, "recent sends")?.push(sent_at);
    }
    Ok(answers)
}

/// The answer of the job a batched read's row belongs to: `ord` is the
/// 1-based `WITH ORDINALITY` of its input row.
fn slot<'a, T>(answers: &'a mut [T], ord: i64, what: &str) -> Result<&'a mut T, StoreError> {
    usize::try_from(ord - 1)
        .ok()
        .and_then(|i| answers.get_mut(i))
        .ok_or_else(|| StoreError::Corrupt(format!("{what} row {ord} out of range")))
}

/// Answers queued lookups, one statement per batch.
fn lookup_task(pool: PgPool) -> Coalescer<LookupJob> {
    Coalescer::start("preference lookup task", move |batch: Vec<LookupJob>| {
        let pool = pool.clone();
        async move {
            let answers = lookup_batch(&pool, &batch).await;
            answer_all(batch, answers, "preference lookup", |j| j.done);
        }
    })
}

/// One statement for the whole batch; answers in the batch's order.
async fn lookup_batch(pool: &PgPool, batch: &[LookupJob]) -> Result<Vec<LookupAnswer>, StoreError> {
    let tenants: Vec<&str> = batch.iter().map(|j| j.tenant_id.as_str()).collect();
    let users: Vec<&str> = batch.iter().map(|j| j.user_id.as_str()).collect();
    let channels: Vec<&str> = batch.iter().map(|j| j.channel.as_str()).collect();
    let addresses: Vec<Option<&str>> = batch.iter().map(|j| j.address.as_deref()).collect();
    let rows: Vec<(i64, Option<bool>, Json<Vec<PreferenceRecord>>)> = sqlx::query_as(
        r#"
        SELECT i.ord,
            CASE WHEN i.address IS NULL THEN NULL ELSE EXISTS (
                SELECT 1 FROM suppressed_addresses s
                WHERE s.address = i.address AND s.tenant_id IN (i.tenant_id, '')) END,
            COALESCE((
                SELECT jsonb_agg(to_jsonb(p) ORDER BY (p.tenant_id = '') ASC, (p.user_id = '') ASC)
                FROM preferences p
                WHERE p.channel = i.channel
                  AND ((p.tenant_id = i.tenant_id AND p.user_id IN (i.user_id, ''))
                       OR (p.tenant_id = '' AND p.user_id = ''))), '[]'::jsonb)
        FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[])
            WITH ORDINALITY AS i(tenant_id, user_id, channel, address, ord)
        "#,
    )
    .bind(tenants)
    .bind(users)
    .bind(channels)
    .bind(addresses)
    .fetch_all(pool)
    .await?;
    let mut answers: Vec<Option<LookupAnswer>> = vec![None; batch.len()];
    for (ord, suppressed, levels) in rows {
        *slot(&mut answers, ord, "lookup")? = Some((levels.0, suppressed));
    }
    answers
        .into_iter()
        .map(|a| a.ok_or_else(|| StoreError::Corrupt("a preference lookup got no answer".into())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, DurationRound};

    /// A notification row of `user` (tenant `tenant`) on `channel`, sent at `at`.
    async fn sent(
        pool: &PgPool,
        id: &str,
        tenant: Option<&str>,
        user: &str,
        channel: &str,
        at: DateTime<Utc>,
    ) {
        sqlx::query(
            "INSERT INTO notifications (id, request_id, tenant_id, channel, priority, status, payload, sent_at)
             VALUES ($1, $1, $2, $3, 'normal', 'sent', jsonb_build_object('recipient', jsonb_build_object('user_id', $4::text)), $5)",
        )
        .bind(id)
        .bind(tenant)
        .bind(channel)
        .bind(user)
        .bind(at)
        .execute(pool)
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_recent_sends_reads_each_get_their_own_window() {
        let pool = crate::store::test_pool().await;
        let now = Utc::now()
            .duration_trunc(Duration::microseconds(1))
            .unwrap();
        let ago = |m: i64| now - Duration::minutes(m);
        for (i, m) in [60, 120, 180, 25 * 60, -1].into_iter().enumerate() {
            sent(&pool, &format!("a-{i}"), Some("t1"), "a", "webhook", ago(m)).await;
        }
        // Another tenant's, another channel's, and a tenant-less user's sends.
        sent(&pool, "a-t2", Some("t2"), "a", "webhook", ago(30)).await;
        sent(&pool, "a-email", Some("t1"), "a", "email", ago(5)).await;
        sent(&pool, "b-0", None, "b", "webhook", ago(10)).await;
        sent(&pool, "b-1", None, "b", "webhook", ago(20)).await;

        let store = PreferenceStore::new(pool);
        let reads = [
            (Some("t1"), "a", now, 2, vec![ago(60), ago(120)]),
            (Some("t1"), "a", now, 10, vec![ago(60), ago(120), ago(180)]),
            // A read as of 90 minutes ago: its own day, back to 25.5 h ago.
            (
                Some("t1"),
                "a",
                ago(90),
                10,
                vec![ago(120), ago(180), ago(25 * 60)],
            ),
            (None, "b", now, 10, vec![ago(10), ago(20)]),
            (Some("t1"), "nobody", now, 5, vec![]),
        ];
        // All reads in one statement, as a batch of them is answered…
        let jobs: Vec<SendsJob> = reads
            .iter()
            .map(|(t, u, at, limit, _)| SendsJob {
                tenant_id: t.map(str::to_string),
                user_id: u.to_string(),
                channel: Channel::Webhook,
                now: *at,
                limit: *limit,
                done: tokio::sync::oneshot::channel().0,
            })
            .collect();
        let batched = sends_batch(&store.pool, &jobs).await.unwrap();
        // … and concurrently through the store, however they are batched.
        let answers =
            futures::future::join_all(reads.iter().map(|(t, u, at, limit, _)| {
                store.recent_sends(*t, u, Channel::Webhook, *at, *limit)
            }))
            .await;
        for (((t, u, at, limit, expected), answer), in_one) in
            reads.iter().zip(answers).zip(batched)
        {
            let what = format!("tenant {t:?} user {u} at {at} limit {limit}");
            assert_eq!(&answer.unwrap(), expected, "{what}");
            assert_eq!(&in_one, expected, "{what}, one statement");
        }
    }
}
