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
    /// Circuit breakers shown in `/readyz` detail.
    pub router: Option<Arc<crate::routing::Router>>,
    /// Provider registry load state shown in `/readyz` detail.
    pub provider_status: Option<crate::routing::load::LoadStatus>,
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

/// Broker metadata and database reachable. The body also details the
/// providers: registry load errors and circuit breakers (informational: an
/// open circuit does not make the instance unready, its notifications wait
/// as due rows).
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
    let circuits: serde_json::Map<String, serde_json::Value> = state
        .router
        .as_ref()
        .map(|r| {
            r.breaker_states()
                .into_iter()
                .map(|(p, s)| (p, serde_json::Value::from(s.as_str())))
                .collect()
        })
        .unwrap_or_default();
    let registry = state.provider_status.as_ref().map(|s| {
        let st = s.get();
        serde_json::json!({
            "loaded_at": st.loaded_at,
            "providers": st.providers,
            "load_errors": st.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            "database_error": st.database_error,
        })
    });
    let body = serde_json::json!({
        "status": if db && broker { "ready" } else { "not_ready" },
        "checks": { "database": db, "broker": broker },
        "providers": { "circuits": circuits, "registry": registry },
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
