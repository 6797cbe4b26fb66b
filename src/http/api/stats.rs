//! `/v1/stats`: monitoring numbers over a window of `created_at` (default:
//! the last 24 hours): counts by channel and status, delivery rate (sent or
//! delivered / all), failure rate (failed or bounced / all), retry rate
//! (more than one attempt / all) and the average time from accepting to
//! sending (`sent_at - created_at`).

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::{Query, State};
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use super::auth::{Principal, Role};
use super::problem::Problem;
use super::{ApiState, Params};

/// The answer of `GET /v1/stats`.
#[derive(Debug, Serialize)]
pub struct Stats {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub tenant_id: Option<String>,
    pub total: i64,
    /// channel → status → count.
    pub by_channel: BTreeMap<String, BTreeMap<String, i64>>,
    pub delivery_rate: Option<f64>,
    pub failure_rate: Option<f64>,
    pub retry_rate: Option<f64>,
    pub avg_time_to_send_ms: Option<f64>,
}

/// `GET /v1/stats?from=…&to=…&tenant_id=…` (admin).
pub async fn stats(
    State(state): State<ApiState>,
    p: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Stats>, Problem> {
    p.require(&[Role::Admin])?;
    let q = Params::new(q, &["from", "to", "tenant_id"])?;
    let to = q.time("to")?.unwrap_or_else(Utc::now);
    let from = q.time("from")?.unwrap_or(to - Duration::hours(24));
    if from >= to {
        return Err(Problem::invalid("from", "must be before `to`"));
    }
    let tenant = q.str("tenant_id").map(str::to_string);
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT channel, status, count(*) FROM notifications
         WHERE created_at >= $1 AND created_at < $2 AND ($3::text IS NULL OR tenant_id = $3)
         GROUP BY 1, 2",
    )
    .bind(from)
    .bind(to)
    .bind(&tenant)
    .fetch_all(&state.pool)
    .await?;
    let (total, ok, failed, retried, avg_ms): (i64, i64, i64, i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*),
                count(*) FILTER (WHERE status IN ('sent', 'delivered')),
                count(*) FILTER (WHERE status IN ('failed', 'bounced')),
                count(*) FILTER (WHERE attempts > 1),
                (avg(EXTRACT(EPOCH FROM (sent_at - created_at))) FILTER (WHERE sent_at IS NOT NULL) * 1000)::float8
         FROM notifications
         WHERE created_at >= $1 AND created_at < $2 AND ($3::text IS NULL OR tenant_id = $3)",
    )
    .bind(from)
    .bind(to)
    .bind(&tenant)
    .fetch_one(&state.pool)
    .await?;
    let mut by_channel: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (c, s, n) in rows {
        by_channel.entry(c).or_default().insert(s, n);
    }
    let rate = |x: i64| (total > 0).then(|| x as f64 / total as f64);
    Ok(Json(Stats {
        from,
        to,
        tenant_id: tenant,
        total,
        by_channel,
        delivery_rate: rate(ok),
        failure_rate: rate(failed),
        retry_rate: rate(retried),
        avg_time_to_send_ms: avg_ms,
    }))
}
