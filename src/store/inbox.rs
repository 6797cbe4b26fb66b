//! The in-app inbox: messages delivered to a user inside the product.
//!
//! The in-app adapter ([`crate::channels::inbox`]) writes here; the admin
//! API reads here (list, unread count, mark read). Inserting is idempotent
//! by notification id, so a retried or redelivered notification shows up
//! once. Listing is newest first with a keyset cursor on
//! `(created_at, id)`, so pages stay stable while new messages arrive.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreError;

/// Largest page [`InboxStore::list`] returns.
pub const MAX_PAGE: u32 = 500;

/// A message to put in a user's inbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewInboxMessage {
    /// `None`: no tenant.
    pub tenant_id: Option<String>,
    pub user_id: String,
    /// The notification delivered; unique in the inbox.
    pub notification_id: String,
    /// Rendered subject.
    pub title: Option<String>,
    /// Rendered text body.
    pub body: Option<String>,
    /// The notification's data, for the client to act on.
    pub data: serde_json::Value,
    pub category: Option<String>,
}

/// A message in a user's inbox.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct InboxMessage {
    pub id: i64,
    pub tenant_id: Option<String>,
    pub user_id: String,
    pub notification_id: String,
    pub title: Option<String>,
    pub body: Option<String>,
    pub data: serde_json::Value,
    pub category: Option<String>,
    pub created_at: DateTime<Utc>,
    /// `None` while unread.
    pub read_at: Option<DateTime<Utc>>,
}

/// Where a page of [`InboxStore::list`] ends: the next page holds messages
/// strictly older than this one. [`InboxCursor::encode`] gives the opaque
/// text an API hands to clients; [`InboxCursor::parse`] reads it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxCursor {
    pub created_at: DateTime<Utc>,
    pub id: i64,
}

impl InboxCursor {
    /// `<created_at in unix microseconds>_<id>`.
    pub fn encode(&self) -> String {
        format!("{}_{}", self.created_at.timestamp_micros(), self.id)
    }

    /// Reads [`InboxCursor::encode`]'s text; `None` when it is not one.
    pub fn parse(s: &str) -> Option<InboxCursor> {
        let (micros, id) = s.split_once('_')?;
        Some(InboxCursor {
            created_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            id: id.parse().ok()?,
        })
    }
}

/// One page of a user's inbox, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxPage {
    pub messages: Vec<InboxMessage>,
    /// Cursor for the next page; `None` on the last page.
    pub next: Option<InboxCursor>,
}

/// What [`InboxStore::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    /// The message's id (the existing one when it was there already).
    pub id: i64,
    /// `false`: the notification was in the inbox already.
    pub created: bool,
}

/// Repository of inbox messages.
#[derive(Debug, Clone)]
pub struct InboxStore {
    pool: PgPool,
}

const COLUMNS: &str = "id, NULLIF(tenant_id, '') AS tenant_id, user_id, notification_id, \
                       title, body, data, category, created_at, read_at";

impl InboxStore {
    pub fn new(pool: PgPool) -> Self {
        InboxStore { pool }
    }

    /// Puts a message in the inbox unless its notification is there already.
    pub async fn insert(&self, m: &NewInboxMessage) -> Result<Inserted, StoreError> {
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO inbox_messages \
                 (tenant_id, user_id, notification_id, title, body, data, category) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (notification_id) DO NOTHING \
             RETURNING id",
        )
        .bind(m.tenant_id.as_deref().unwrap_or(""))
        .bind(&m.user_id)
        .bind(&m.notification_id)
        .bind(&m.title)
        .bind(&m.body)
        .bind(&m.data)
        .bind(&m.category)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(id) = id {
            return Ok(Inserted { id, created: true });
        }
        // ON CONFLICT waited for the other writer, so its row is visible to
        // this new statement.
        let id: i64 =
            sqlx::query_scalar("SELECT id FROM inbox_messages WHERE notification_id = $1")
                .bind(&m.notification_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(Inserted { id, created: false })
    }

    /// A page of `user`'s messages, newest first: at most `limit` (1 to
    /// [`MAX_PAGE`]), older than `before` when given, unread only when asked.
    pub async fn list(
        &self,
        tenant: Option<&str>,
        user: &str,
        unread_only: bool,
        limit: u32,
        before: Option<&InboxCursor>,
    ) -> Result<InboxPage, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let mut sql =
            format!("SELECT {COLUMNS} FROM inbox_messages WHERE tenant_id = $1 AND user_id = $2");
        if unread_only {
            sql.push_str(" AND read_at IS NULL");
        }
        if before.is_some() {
            sql.push_str(" AND (created_at, id) < ($4, $5)");
        }
        sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT $3");
        let mut query = sqlx::query_as::<_, InboxMessage>(&sql)
            .bind(tenant.unwrap_or(""))
            .bind(user)
            .bind(i64::from(limit) + 1);
        if let Some(c) = before {
            query = query.bind(c.created_at).bind(c.id);
        }
        let mut messages = query.fetch_all(&self.pool).await?;
        let next = if messages.len() > limit as usize {
            messages.truncate(limit as usize);
            messages.last().map(|m| InboxCursor {
                created_at: m.created_at,
                id: m.id,
            })
        } else {
            None
        };
        Ok(InboxPage { messages, next })
    }

    /// How many of `user`'s messages are unread.
    pub async fn unread_count(&self, tenant: Option<&str>, user: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM inbox_messages \
             WHERE tenant_id = $1 AND user_id = $2 AND read_at IS NULL",
        )
        .bind(tenant.unwrap_or(""))
        .bind(user)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Marks `ids` read; ids that are not `user`'s or already read are
    /// ignored. Returns how many changed.
    pub async fn mark_read(
        &self,
        tenant: Option<&str>,
        user: &str,
        ids: &[i64],
    ) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(
            "UPDATE inbox_messages SET read_at = now() \
             WHERE tenant_id = $1 AND user_id = $2 AND id = ANY($3) AND read_at IS NULL",
        )
        .bind(tenant.unwrap_or(""))
        .bind(user)
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Marks all of `user`'s messages read. Returns how many changed.
    pub async fn mark_all_read(&self, tenant: Option<&str>, user: &str) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE inbox_messages SET read_at = now() \
             WHERE tenant_id = $1 AND user_id = $2 AND read_at IS NULL",
        )
        .bind(tenant.unwrap_or(""))
        .bind(user)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips() {
        let c = InboxCursor {
            created_at: DateTime::from_timestamp_micros(1_764_300_000_123_456).unwrap(),
            id: 42,
        };
        assert_eq!(InboxCursor::parse(&c.encode()), Some(c));
        for bad in ["", "1", "x_1", "1_x", "1_2_3"] {
            assert_eq!(InboxCursor::parse(bad), None, "{bad}");
        }
    }
}
