//! `/v1/delivery-logs?notification_id=…`: the delivery attempts of one
//! notification (the caller must be allowed to see the notification).

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use serde::Serialize;

use super::auth::Principal;
use super::notifications::{AttemptView, attempts, load_visible};
use super::problem::Problem;
use super::{ApiState, Params};

/// The delivery log of a notification.
#[derive(Debug, Serialize)]
pub struct DeliveryLog {
    pub notification_id: String,
    pub items: Vec<AttemptView>,
}

/// `GET /v1/delivery-logs?notification_id=…`.
pub async fn list(
    State(state): State<ApiState>,
    p: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<DeliveryLog>, Problem> {
    let q = Params::new(q, &["notification_id"])?;
    let id = q
        .str("notification_id")
        .ok_or_else(|| Problem::invalid("notification_id", "is required"))?
        .to_string();
    load_visible(&state, &p, &id).await?;
    let items = attempts(&state.pool, &id).await?;
    Ok(Json(DeliveryLog {
        notification_id: id,
        items,
    }))
}
