//! The HTTP listener: `/healthz`, `/readyz`, `/metrics`; the admin/query API
//! lives in [`api`] and the provider callbacks (`/webhooks/…`) in
//! [`receipts`]; the app merges them into the same router.

pub mod api;
pub mod receipts;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use sqlx::PgPool;

use crate::telemetry::Metrics;

/// What the handlers need.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub pool: PgPool,
    /// Returns true when the broker answered a metadata request within the timeout.
    pub broker_probe: Arc<dyn Fn(Duration) -> bool + Send + Sync>,
}

/// The router for all endpoints.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Process is up.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Broker metadata and database reachable.
async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let probe = state.broker_probe.clone();
    let broker = tokio::task::spawn_blocking(move || probe(Duration::from_secs(2)))
        .await
        .unwrap_or(false);
    let code = if db && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if db && broker { "ready" } else { "not_ready" },
        "checks": { "database": db, "broker": broker },
    });
    (code, axum::Json(body))
}

/// Prometheus text format.
async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
