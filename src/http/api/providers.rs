//! `/v1/providers`: the configured channel adapters, read-only and without
//! secrets. Managing providers (create/update/status/validate) needs the
//! provider registry of the providers issue and is not offered yet.

use axum::Json;
use axum::extract::State;
use secrecy::ExposeSecret;
use serde_json::json;

use super::ApiState;
use super::auth::{Principal, Role};
use super::problem::Problem;

/// `GET /v1/providers` (admin).
pub async fn list(
    State(state): State<ApiState>,
    p: Principal,
) -> Result<Json<serde_json::Value>, Problem> {
    p.require(&[Role::Admin])?;
    let s = &state.settings;
    let smtp = &s.smtp;
    let webhook = &s.webhook;
    Ok(Json(json!({
        "items": [
            {
                "name": "smtp",
                "channel": "email",
                "status": "active",
                "source": "config",
                "settings": {
                    "host": smtp.host,
                    "port": smtp.port,
                    "tls": format!("{:?}", smtp.tls).to_lowercase(),
                    "authenticated": smtp.username.is_some(),
                    "password_set": smtp.password.as_ref().is_some_and(|p| !p.expose_secret().is_empty()),
                    "default_from": smtp.default_from,
                    "pool_size": smtp.pool_size,
                    "timeout_ms": smtp.timeout_ms,
                }
            },
            {
                "name": "webhook",
                "channel": "webhook",
                "status": "active",
                "source": "config",
                "settings": {
                    "timeout_ms": webhook.timeout_ms,
                    "allow_private_targets": webhook.allow_private_targets,
                    "max_response_bytes": webhook.max_response_bytes,
                    "signing_secret_set": true,
                }
            }
        ]
    })))
}
