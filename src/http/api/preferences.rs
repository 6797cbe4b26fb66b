//! `/v1/users/{user_id}/preferences?tenant_id=…`: read and write a user's
//! preferences through the policy module's [`PreferenceStore`].
//!
//! GET returns one record per channel. PUT takes `{"items": [...]}` where each
//! item has the shape of a preference-update event
//! (`schemas/preference-update.v1.json`) without `tenant_id`/`user_id` (taken
//! from the path and query) and with `updated_at` optional (default: now).
//! Writes are last-write-wins by `updated_at`, exactly like the preferences
//! topic. Other instances' preference caches see a write within their TTL
//! (`policy` settings, default 5 s).

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;

use super::auth::Principal;
use super::problem::{Problem, RawBody, parse_json};
use super::{ApiState, Params};
use crate::policy::preferences::decode_update;
use crate::store::preferences::PreferenceStore;

/// `GET /v1/users/{user_id}/preferences`.
pub async fn get_prefs(
    State(state): State<ApiState>,
    p: Principal,
    Path(user_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, Problem> {
    let q = Params::new(q, &["tenant_id"])?;
    let tenant = q.str("tenant_id");
    p.require_own(tenant, &user_id, "preferences")?;
    let store = PreferenceStore::new(state.pool.clone());
    let items = store.for_user(tenant.unwrap_or_default(), &user_id).await?;
    Ok(Json(serde_json::json!({
        "tenant_id": tenant,
        "user_id": user_id,
        "items": items,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    items: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// `PUT /v1/users/{user_id}/preferences`: writes one record per item.
pub async fn put_prefs(
    State(state): State<ApiState>,
    p: Principal,
    Path(user_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    RawBody(body): RawBody,
) -> Result<Json<serde_json::Value>, Problem> {
    let q = Params::new(q, &["tenant_id"])?;
    let tenant = q.str("tenant_id").map(str::to_string);
    p.require_own(tenant.as_deref(), &user_id, "preferences")?;
    let b: PutBody = parse_json(&body)?;
    let mut records = Vec::with_capacity(b.items.len());
    for (i, mut item) in b.items.into_iter().enumerate() {
        for k in ["tenant_id", "user_id"] {
            if item.contains_key(k) {
                return Err(Problem::invalid(
                    format!("items[{i}].{k}"),
                    format!("{k} comes from the path and query, not the body"),
                ));
            }
        }
        item.insert("user_id".into(), user_id.clone().into());
        if let Some(t) = &tenant {
            item.insert("tenant_id".into(), t.clone().into());
        }
        item.entry("updated_at")
            .or_insert_with(|| chrono::Utc::now().to_rfc3339().into());
        let bytes = serde_json::to_vec(&item).map_err(|e| Problem::internal(&e))?;
        let record =
            decode_update(&bytes).map_err(|m| Problem::invalid(format!("items[{i}]"), m))?;
        records.push(record);
    }
    let store = PreferenceStore::new(state.pool.clone());
    for r in &records {
        store.upsert(r).await?;
    }
    get_prefs(
        State(state),
        p,
        Path(user_id),
        Query(
            tenant
                .map(|t| HashMap::from([("tenant_id".to_string(), t)]))
                .unwrap_or_default(),
        ),
    )
    .await
}
