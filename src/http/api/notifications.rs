//! `/v1/notifications`: list (filters + keyset pagination), get one with its
//! delivery attempts, submit (produce a request to the request topic) and
//! retry a failed notification.
//!
//! Retry: exactly `herald retry <id>`. The `failed` notification becomes a
//! due row again (`retrying`, due now, attempts kept, a fresh retry budget)
//! and the scheduler sends it through the providers as usual; its next
//! outcome events carry the same notification id. Answers 202 with the id.
//! Only `failed` notifications can be retried (409 otherwise).

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use serde::Serialize;
use sqlx::{Postgres, QueryBuilder, Row};

use super::auth::{Principal, Role};
use super::problem::{Problem, RawBody, field_of};
use super::{ApiState, Params, decode_cursor, encode_cursor};
use crate::domain::{Channel, Status, decode_request};

const LIST_PARAMS: &[&str] = &[
    "status",
    "channel",
    "priority",
    "tenant_id",
    "user_id",
    "created_from",
    "created_to",
    "limit",
    "cursor",
];

/// A notification as the API shows it.
#[derive(Debug, Serialize)]
pub struct NotificationView {
    pub id: String,
    pub request_id: String,
    pub tenant_id: Option<String>,
    pub app_id: Option<String>,
    pub user_id: Option<String>,
    pub channel: String,
    pub priority: String,
    pub category: Option<String>,
    pub correlation_id: Option<String>,
    pub status: String,
    pub attempts: i32,
    pub provider: Option<String>,
    pub provider_message_id: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, request_id, tenant_id, app_id, user_id, \
    channel, priority, category, correlation_id, status, attempts, provider, provider_message_id, \
    error_code, error_message, created_at, updated_at, sent_at, failed_at, scheduled_at, expires_at";

fn view(r: &sqlx::postgres::PgRow) -> Result<NotificationView, sqlx::Error> {
    Ok(NotificationView {
        id: r.try_get("id")?,
        request_id: r.try_get("request_id")?,
        tenant_id: r.try_get("tenant_id")?,
        app_id: r.try_get("app_id")?,
        user_id: r.try_get("user_id")?,
        channel: r.try_get("channel")?,
        priority: r.try_get("priority")?,
        category: r.try_get("category")?,
        correlation_id: r.try_get("correlation_id")?,
        status: r.try_get("status")?,
        attempts: r.try_get("attempts")?,
        provider: r.try_get("provider")?,
        provider_message_id: r.try_get("provider_message_id")?,
        error_code: r.try_get("error_code")?,
        error_message: r.try_get("error_message")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        sent_at: r.try_get("sent_at")?,
        failed_at: r.try_get("failed_at")?,
        scheduled_at: r.try_get("scheduled_at")?,
        expires_at: r.try_get("expires_at")?,
    })
}

/// A page of a list endpoint.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// `GET /v1/notifications`: newest first; filters combine with AND. A user
/// key sees only its own notifications (asking for another user's → 403).
pub async fn list(
    State(state): State<ApiState>,
    p: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Page<NotificationView>>, Problem> {
    let q = Params::new(q, LIST_PARAMS)?;
    let mut tenant = q.str("tenant_id").map(str::to_string);
    let mut user = q.str("user_id").map(str::to_string);
    match p.role {
        Role::Admin => {}
        Role::Service => {
            if let Some(bound) = &p.tenant_id {
                if tenant.as_ref().is_some_and(|t| t != bound) {
                    return Err(Problem::forbidden("this key is bound to another tenant"));
                }
                tenant = Some(bound.clone());
            }
        }
        Role::User => {
            if user.as_ref().is_some_and(|u| Some(u) != p.user_id.as_ref())
                || tenant
                    .as_ref()
                    .is_some_and(|t| Some(t) != p.tenant_id.as_ref())
            {
                return Err(Problem::forbidden(
                    "a user key may only list its own notifications",
                ));
            }
            tenant = p.tenant_id.clone();
            user = p.user_id.clone();
        }
    }
    if let Some(s) = q.str("status")
        && Status::parse(s).is_none()
    {
        return Err(Problem::invalid("status", "not a notification status"));
    }
    if let Some(c) = q.str("channel")
        && Channel::parse(c).is_none()
    {
        return Err(Problem::invalid(
            "channel",
            "must be one of email, sms, push, webhook, in_app",
        ));
    }
    if let Some(pr) = q.str("priority")
        && !["low", "normal", "high", "urgent"].contains(&pr)
    {
        return Err(Problem::invalid(
            "priority",
            "must be one of low, normal, high, urgent",
        ));
    }
    let from = q.time("created_from")?;
    let to = q.time("created_to")?;
    let cursor = q.str("cursor").map(decode_cursor).transpose()?;
    let limit = q.limit(&state.settings)?;

    let mut b: QueryBuilder<Postgres> =
        QueryBuilder::new(format!("SELECT {COLUMNS} FROM notifications WHERE true"));
    if let Some(s) = q.str("status") {
        b.push(" AND status = ").push_bind(s.to_string());
    }
    if let Some(c) = q.str("channel") {
        b.push(" AND channel = ").push_bind(c.to_string());
    }
    if let Some(pr) = q.str("priority") {
        b.push(" AND priority = ").push_bind(pr.to_string());
    }
    match (&tenant, p.role) {
        (Some(t), _) => {
            b.push(" AND tenant_id = ").push_bind(t.clone());
        }
        (None, Role::User) => {
            b.push(" AND tenant_id IS NULL");
        }
        (None, _) => {}
    }
    if let Some(u) = &user {
        b.push(" AND user_id = ").push_bind(u.clone());
    }
    if let Some(f) = from {
        b.push(" AND created_at >= ").push_bind(f);
    }
    if let Some(t) = to {
        b.push(" AND created_at < ").push_bind(t);
    }
    if let Some((t, id)) = cursor {
        b.push(" AND (created_at, id) < (")
            .push_bind(t)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    b.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(limit + 1);
    let rows = b.build().fetch_all(&state.pool).await?;
    let mut items = rows.iter().map(view).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|n| encode_cursor(n.created_at, &n.id))
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}

/// A delivery attempt (one row of the delivery log).
#[derive(Debug, Serialize)]
pub struct AttemptView {
    pub notification_id: String,
    pub attempt: i32,
    pub provider: String,
    pub status: String,
    pub provider_message_id: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub retryable: Option<bool>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i32>,
}

/// The delivery log of one notification, in attempt order.
pub(crate) async fn attempts(
    pool: &sqlx::PgPool,
    id: &str,
) -> Result<Vec<AttemptView>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT notification_id, attempt, provider, status, provider_message_id, error_code,
                error_message, retryable, started_at, finished_at, duration_ms
         FROM delivery_attempts WHERE notification_id = $1 ORDER BY attempt",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(AttemptView {
                notification_id: r.try_get("notification_id")?,
                attempt: r.try_get("attempt")?,
                provider: r.try_get("provider")?,
                status: r.try_get("status")?,
                provider_message_id: r.try_get("provider_message_id")?,
                error_code: r.try_get("error_code")?,
                error_message: r.try_get("error_message")?,
                retryable: r.try_get("retryable")?,
                started_at: r.try_get("started_at")?,
                finished_at: r.try_get("finished_at")?,
                duration_ms: r.try_get("duration_ms")?,
            })
        })
        .collect()
}

/// Loads a notification the caller may see: 404 when missing, 403 when it
/// belongs to someone else.
pub(crate) async fn load_visible(
    state: &ApiState,
    p: &Principal,
    id: &str,
) -> Result<(NotificationView, serde_json::Value), Problem> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS}, payload FROM notifications WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(|| Problem::not_found("no such notification"))?;
    let v = view(&row)?;
    if !p.may_see(v.tenant_id.as_deref(), v.user_id.as_deref()) {
        return Err(Problem::forbidden(
            "this notification belongs to someone else",
        ));
    }
    let payload: sqlx::types::Json<serde_json::Value> = row.try_get("payload")?;
    Ok((v, payload.0))
}

/// A notification with its recipient and delivery attempts.
#[derive(Debug, Serialize)]
pub struct NotificationDetail {
    #[serde(flatten)]
    pub notification: NotificationView,
    pub recipient: serde_json::Value,
    pub delivery_attempts: Vec<AttemptView>,
}

/// `GET /v1/notifications/{id}`.
pub async fn get_one(
    State(state): State<ApiState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<NotificationDetail>, Problem> {
    let (notification, payload) = load_visible(&state, &p, &id).await?;
    let delivery_attempts = attempts(&state.pool, &id).await?;
    Ok(Json(NotificationDetail {
        notification,
        recipient: payload.get("recipient").cloned().unwrap_or_default(),
        delivery_attempts,
    }))
}

/// The 202 answer of submit and retry.
#[derive(Debug, Serialize)]
pub struct Accepted {
    /// The request id (the idempotency key).
    pub id: String,
    /// Ids of the notifications the request expands into.
    pub notification_ids: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
}

/// `POST /v1/notifications`: validates the request exactly as the consumer
/// would (422 naming the field), produces it to the request topic and
/// answers 202 once the broker acknowledged. A missing `id` gets a UUID.
pub async fn submit(
    State(state): State<ApiState>,
    p: Principal,
    RawBody(body): RawBody,
) -> Result<impl IntoResponse, Problem> {
    p.require(&[Role::Admin, Role::Service])?;
    let mut value: serde_json::Value = super::problem::parse_json(&body)?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| Problem::invalid("body", "must be a JSON object"))?;
    if !obj.contains_key("id") {
        obj.insert("id".into(), uuid::Uuid::new_v4().to_string().into());
    }
    let bytes = serde_json::to_vec(&value).map_err(|e| Problem::internal(&e))?;
    let request = decode_request(&bytes, state.settings.pipeline.max_request_bytes)
        .map_err(|e| Problem::invalid(field_of(&e.message), e.message))?;
    if let Some(bound) = &p.tenant_id
        && request.tenant_id.as_ref() != Some(bound)
    {
        return Err(Problem::forbidden(
            "this key is bound to another tenant (set tenant_id)",
        ));
    }
    let key = kafka_key(&value);
    let id = request.id.clone();
    let notification_ids = (0..request.recipients.len())
        .map(|i| request.notification_id(i))
        .collect();
    produce(&state, &key, &bytes).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            id,
            notification_ids,
            retry_of: None,
        }),
    ))
}

async fn produce(state: &ApiState, key: &str, payload: &[u8]) -> Result<(), Problem> {
    state
        .producer
        .send(
            FutureRecord::to(&state.request_topic)
                .key(key)
                .payload(payload),
            Timeout::After(Duration::from_secs(10)),
        )
        .await
        .map_err(|(e, _)| {
            tracing::warn!(error = %e, "producing a submitted request failed");
            Problem::unavailable("the broker did not acknowledge the request; retry")
        })?;
    Ok(())
}

/// The Kafka key convention: `tenant:user` when the request names a user,
/// else the recipient's address, else the request id.
fn kafka_key(request: &serde_json::Value) -> String {
    let tenant = request
        .get("tenant_id")
        .and_then(|v| v.as_str())
        .unwrap_or("-");
    let r = request
        .get("recipient")
        .or_else(|| request.get("recipients").and_then(|r| r.get(0)));
    if let Some(r) = r {
        if let Some(u) = r.get("user_id").and_then(|v| v.as_str()) {
            return format!("{tenant}:{u}");
        }
        for f in ["email", "phone", "url"] {
            if let Some(a) = r.get(f).and_then(|v| v.as_str()) {
                return a.to_string();
            }
        }
    }
    request
        .get("id")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string()
}

/// `POST /v1/notifications/{id}/retry` (admin): see the module docs.
pub async fn retry(
    State(state): State<ApiState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Problem> {
    p.require(&[Role::Admin])?;
    let (v, _) = load_visible(&state, &p, &id).await?;
    if v.status != Status::Failed.as_str() {
        return Err(Problem::conflict(format!(
            "only failed notifications can be retried; this one is {}",
            v.status
        )));
    }
    match crate::store::DueStore::new(state.pool.clone())
        .retry_failed(&id)
        .await?
    {
        crate::store::RetryOutcome::Due { .. } => Ok((
            StatusCode::ACCEPTED,
            Json(Accepted {
                id: id.clone(),
                notification_ids: vec![id.clone()],
                retry_of: Some(id),
            }),
        )),
        // Changed between the read above and the update.
        crate::store::RetryOutcome::NotFailed { status } => Err(Problem::conflict(format!(
            "only failed notifications can be retried; this one is {status}"
        ))),
        crate::store::RetryOutcome::NotFound => {
            Err(Problem::not_found(format!("notification {id} not found")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_key_follows_the_convention() {
        let r = serde_json::json!({"id": "r", "tenant_id": "t", "recipient": {"user_id": "u"}});
        assert_eq!(kafka_key(&r), "t:u");
        let r = serde_json::json!({"id": "r", "recipients": [{"email": "a@b.c"}]});
        assert_eq!(kafka_key(&r), "a@b.c");
        assert_eq!(kafka_key(&serde_json::json!({"id": "r"})), "r");
    }
}
