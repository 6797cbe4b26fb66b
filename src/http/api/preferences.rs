//! `/v1/users/{user_id}/preferences?tenant_id=…`: read and replace a user's
//! preference rows.
//!
//! The preferences table belongs to the policy issue, built in parallel. This
//! file does not know its columns: when a `preferences` table exists, GET
//! returns its rows for (tenant, user) as JSON objects, and PUT replaces them
//! (`{"items": [ {column: value, …}, … ]}`, `tenant_id`/`user_id` forced
//! from the path) with `jsonb_populate_recordset`. When the table does not
//! exist (policy not merged), both answer 501 with a problem document.
//! Policy's in-memory preference cache learns of a PUT only by its own TTL.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;

use super::auth::{Principal, Role};
use super::problem::{Problem, RawBody, parse_json};
use super::{ApiState, Params};

async fn table_exists(state: &ApiState) -> Result<(), Problem> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('preferences') IS NOT NULL")
        .fetch_one(&state.pool)
        .await?;
    if exists {
        Ok(())
    } else {
        Err(Problem::not_implemented(
            "preferences are not stored by this version of Herald yet (the policy module adds them)",
        ))
    }
}

fn check_access(p: &Principal, tenant: Option<&str>, user: &str) -> Result<(), Problem> {
    match p.role {
        Role::Admin => Ok(()),
        Role::User if p.may_see(tenant, Some(user)) => Ok(()),
        Role::User => Err(Problem::forbidden(
            "a user key may only access its own preferences",
        )),
        Role::Service => Err(Problem::forbidden(
            "a service key may not access preferences",
        )),
    }
}

/// Maps SQL errors of the generic statements: constraint violations are the
/// client's (422), an unexpected table shape is 501.
fn map_sql(e: sqlx::Error) -> Problem {
    if let sqlx::Error::Database(db) = &e {
        let code = db.code().unwrap_or_default();
        if code.starts_with("23") || code.starts_with("22") {
            return Problem::invalid("items", db.message().to_string());
        }
        if code.starts_with("42") {
            return Problem::not_implemented(
                "the preferences table does not have the expected tenant_id/user_id columns",
            );
        }
    }
    Problem::internal(&e)
}

/// `GET /v1/users/{user_id}/preferences`.
pub async fn get_prefs(
    State(state): State<ApiState>,
    p: Principal,
    Path(user_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, Problem> {
    let q = Params::new(q, &["tenant_id"])?;
    let tenant = q.str("tenant_id");
    check_access(&p, tenant, &user_id)?;
    table_exists(&state).await?;
    let rows: Vec<sqlx::types::Json<serde_json::Value>> = sqlx::query_scalar(
        "SELECT to_jsonb(p) FROM preferences p
         WHERE p.user_id = $1 AND p.tenant_id IS NOT DISTINCT FROM $2",
    )
    .bind(&user_id)
    .bind(tenant)
    .fetch_all(&state.pool)
    .await
    .map_err(map_sql)?;
    Ok(Json(serde_json::json!({
        "tenant_id": tenant,
        "user_id": user_id,
        "items": rows.into_iter().map(|j| j.0).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    items: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// `PUT /v1/users/{user_id}/preferences`: replaces the user's rows.
pub async fn put_prefs(
    State(state): State<ApiState>,
    p: Principal,
    Path(user_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    RawBody(body): RawBody,
) -> Result<Json<serde_json::Value>, Problem> {
    let q = Params::new(q, &["tenant_id"])?;
    let tenant = q.str("tenant_id").map(str::to_string);
    check_access(&p, tenant.as_deref(), &user_id)?;
    table_exists(&state).await?;
    let mut b: PutBody = parse_json(&body)?;
    for row in &mut b.items {
        row.insert("user_id".into(), user_id.clone().into());
        row.insert("tenant_id".into(), tenant.clone().into());
    }
    let mut tx = state.pool.begin().await?;
    sqlx::query("DELETE FROM preferences WHERE user_id = $1 AND tenant_id IS NOT DISTINCT FROM $2")
        .bind(&user_id)
        .bind(&tenant)
        .execute(&mut *tx)
        .await
        .map_err(map_sql)?;
    sqlx::query(
        "INSERT INTO preferences SELECT * FROM jsonb_populate_recordset(NULL::preferences, $1)",
    )
    .bind(sqlx::types::Json(&b.items))
    .execute(&mut *tx)
    .await
    .map_err(map_sql)?;
    tx.commit().await?;
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
