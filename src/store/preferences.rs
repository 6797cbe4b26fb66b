//! Preferences and suppressed addresses in PostgreSQL: load the levels that
//! apply to one recipient, upsert with last-write-wins, and the recent sends
//! that frequency caps count.

use chrono::{DateTime, NaiveTime, Utc};
use sqlx::PgPool;
use sqlx::types::Json;

use super::StoreError;
use crate::domain::Channel;
use crate::policy::preferences::PreferenceRecord;

/// Repository of recipient preferences.
#[derive(Clone)]
pub struct PreferenceStore {
    pool: PgPool,
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
        PreferenceStore { pool }
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
    /// costs one query per new recipient, not two).
    pub async fn lookup(
        &self,
        tenant_id: &str,
        user_id: &str,
        channel: Channel,
        address: Option<&str>,
    ) -> Result<(Vec<PreferenceRecord>, Option<bool>), StoreError> {
        let (suppressed, levels): (Option<bool>, Json<Vec<PreferenceRecord>>) = sqlx::query_as(
            r#"
            SELECT
                CASE WHEN $4::text IS NULL THEN NULL ELSE EXISTS (
                    SELECT 1 FROM suppressed_addresses
                    WHERE address = $4 AND tenant_id IN ($1, '')) END,
                COALESCE((
                    SELECT jsonb_agg(to_jsonb(p) ORDER BY (p.tenant_id = '') ASC, (p.user_id = '') ASC)
                    FROM preferences p
                    WHERE p.channel = $3
                      AND ((p.tenant_id = $1 AND p.user_id IN ($2, ''))
                           OR (p.tenant_id = '' AND p.user_id = ''))), '[]'::jsonb)
            "#,
        )
        .bind(tenant_id)
        .bind(user_id)
        .bind(channel.as_str())
        .bind(address)
        .fetch_one(&self.pool)
        .await?;
        Ok((levels.0, suppressed))
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
    /// `notifications_sent_by_user_idx`.
    pub async fn recent_sends(
        &self,
        tenant_id: Option<&str>,
        user_id: &str,
        channel: Channel,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<DateTime<Utc>>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT sent_at FROM notifications
             WHERE tenant_id IS NOT DISTINCT FROM $1 AND user_id = $2 AND channel = $3
               AND sent_at IS NOT NULL AND sent_at > $4 - interval '1 day' AND sent_at <= $4
             ORDER BY sent_at DESC LIMIT $5",
        )
        .bind(tenant_id)
        .bind(user_id)
        .bind(channel.as_str())
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }
}
