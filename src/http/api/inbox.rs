//! `/v1/users/{user_id}/inbox…?tenant_id=…`: the in-app inbox a frontend
//! shows — messages newest first (keyset pages), the unread count, marking
//! read. Messages are written by the `inbox` provider when an `in_app`
//! notification is sent (see [`crate::channels::inbox`]).
//!
//! Roles: admin; user (own inbox only).

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;

use super::auth::Principal;
use super::problem::{Problem, RawBody, parse_json};
use super::{ApiState, Params};
use crate::store::inbox::{InboxCursor, InboxMessage, InboxStore, MAX_PAGE};

fn message_json(m: &InboxMessage) -> serde_json::Value {
    serde_json::json!({
        "id": m.id,
        "tenant_id": m.tenant_id,
        "user_id": m.user_id,
        "notification_id": m.notification_id,
        "title": m.title,
        "body": m.body,
        "data": m.data,
        "category": m.category,
        "created_at": m.created_at,
        "read_at": m.read_at,
    })
}

/// `GET /v1/users/{user_id}/inbox`: `?unread_only=true`, `limit`, `cursor`.
pub async fn list(
    State(state): State<ApiState>,
    p: Principal,
    Path(user_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, Problem> {
    let q = Params::new(q, &["tenant_id", "unread_only", "limit", "cursor"])?;
    let tenant = q.str("tenant_id");
    p.require_own(tenant, &user_id, "inbox")?;
    let unread_only = match q.str("unread_only") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(Problem::invalid("unread_only", "must be true or false")),
    };
    let limit = u32::try_from(q.limit(&state.settings)?)
        .unwrap_or(MAX_PAGE)
        .min(MAX_PAGE);
    let cursor = match q.str("cursor") {
        None => None,
        Some(c) => Some(
            InboxCursor::parse(c)
                .ok_or_else(|| Problem::invalid("cursor", "not a cursor returned by this API"))?,
        ),
    };
    let store = InboxStore::new(state.pool.clone());
    let page = store
        .list(tenant, &user_id, unread_only, limit, cursor.as_ref())
        .await?;
    let unread = store.unread_count(tenant, &user_id).await?;
    Ok(Json(serde_json::json!({
        "items": page.messages.iter().map(message_json).collect::<Vec<_>>(),
        "next_cursor": page.next.map(|c| c.encode()),
        "unread_count": unread,
    })))
}

/// `GET /v1/users/{user_id}/inbox/unread-count`.
pub async fn unread_count(
    State(state): State<ApiState>,
    p: Principal,
    Path(user_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, Problem> {
    let q = Params::new(q, &["tenant_id"])?;
    let tenant = q.str("tenant_id");
    p.require_own(tenant, &user_id, "inbox")?;
    let n = InboxStore::new(state.pool.clone())
        .unread_count(tenant, &user_id)
        .await?;
    Ok(Json(serde_json::json!({ "unread_count": n })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadBody {
    #[serde(default)]
    ids: Vec<i64>,
    #[serde(default)]
    all: bool,
}

/// `POST /v1/users/{user_id}/inbox/read`: `{"ids": [..]}` or `{"all": true}`.
pub async fn mark_read(
    State(state): State<ApiState>,
    p: Principal,
    Path(user_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    RawBody(body): RawBody,
) -> Result<Json<serde_json::Value>, Problem> {
    let q = Params::new(q, &["tenant_id"])?;
    let tenant = q.str("tenant_id");
    p.require_own(tenant, &user_id, "inbox")?;
    let b: ReadBody = parse_json(&body)?;
    let store = InboxStore::new(state.pool.clone());
    let changed = match (b.all, b.ids.is_empty()) {
        (true, true) => store.mark_all_read(tenant, &user_id).await,
        (false, false) if b.ids.len() <= MAX_PAGE as usize => {
            store.mark_read(tenant, &user_id, &b.ids).await
        }
        (false, false) => {
            return Err(Problem::invalid(
                "ids",
                format!("at most {MAX_PAGE} ids at once"),
            ));
        }
        _ => {
            return Err(Problem::invalid(
                "ids",
                "give either `ids` (non-empty) or `\"all\": true`",
            ));
        }
    }?;
    let unread = store.unread_count(tenant, &user_id).await?;
    Ok(Json(
        serde_json::json!({ "marked_read": changed, "unread_count": unread }),
    ))
}
