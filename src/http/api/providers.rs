//! `/v1/providers`: the provider registry (admin only). List, create, get,
//! update (`PATCH`, any field), delete, and validate (build the adapter and
//! run its connection/auth check).
//!
//! Credentials are write-only: accepted on `POST` and `PATCH` (a JSON
//! object; `null` on `PATCH` removes them), stored encrypted, never
//! returned — rows say `has_credentials`. A write changes the table, whose
//! trigger notifies every instance (this one included) to reload its
//! registry at once.
//!
//! The adapters configured in `herald.toml` (`[smtp]`, `[webhook]`) are
//! listed too, as `builtin: true`; they serve a channel only while no
//! provider is registered for it, and are changed in the settings, not here.
//! A registered provider may reuse a built-in's name (`smtp`); the
//! registered row is then what `/v1/providers/{name}` means.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use super::ApiState;
use super::auth::{Principal, Role};
use super::problem::{Problem, RawBody, parse_json};
use crate::channels::{AdapterContext, build_adapters, build_provider};
use crate::domain::Channel;
use crate::routing::crypto::{Cipher, CryptoError};
use crate::routing::load::LoadStatus;
use crate::routing::store::{
    NewProvider, ProviderPatch, ProviderRow, ProviderStatus, ProviderStore, ProviderStoreError,
};
use crate::routing::{ProviderType, RetryStrategy};

/// What the provider endpoints need, part of [`ApiState`].
#[derive(Clone)]
pub struct ProviderApi {
    pub store: ProviderStore,
    /// Encrypts credentials written through the API.
    pub cipher: Arc<Cipher>,
    /// This instance's registry load state: per-provider load errors.
    pub status: LoadStatus,
    /// What `validate` builds adapters with.
    pub ctx: AdapterContext,
}

impl From<ProviderStoreError> for Problem {
    fn from(e: ProviderStoreError) -> Self {
        match e {
            ProviderStoreError::Invalid { field, message } => Problem::invalid(field, message),
            ProviderStoreError::Duplicate(_) => Problem::conflict(e.to_string()),
            ProviderStoreError::NotFound(_) => Problem::not_found(e.to_string()),
            ProviderStoreError::Crypto(CryptoError::MissingKey) => {
                Problem::invalid("credentials", CryptoError::MissingKey.to_string())
            }
            other => Problem::internal(&other),
        }
    }
}

/// Body of `POST /v1/providers`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    #[serde(alias = "type")]
    provider_type: String,
    channel: Option<String>,
    config: Option<Value>,
    /// Kept as a JSON value so no parse error can echo it.
    credentials: Option<Value>,
    priority: Option<i64>,
    is_default: Option<bool>,
    status: Option<String>,
    retry_strategy: Option<String>,
    max_retries: Option<i64>,
    rate_limit_per_second: Option<i64>,
    rate_limit_per_minute: Option<i64>,
    tenant_id: Option<String>,
}

/// Body of `PATCH /v1/providers/{name}`: fields left out stay; `null`
/// clears `credentials`, the rate limits and `tenant_id`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    #[serde(alias = "type")]
    provider_type: Option<String>,
    channel: Option<String>,
    config: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    credentials: Option<Option<Value>>,
    priority: Option<i64>,
    is_default: Option<bool>,
    status: Option<String>,
    retry_strategy: Option<String>,
    max_retries: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    rate_limit_per_second: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    rate_limit_per_minute: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    tenant_id: Option<Option<String>>,
}

/// A field that is present (possibly `null`): `Some(value)`; absent fields
/// take the `default` (`None`).
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn provider_type(s: &str) -> Result<ProviderType, Problem> {
    ProviderType::parse(s).ok_or_else(|| {
        Problem::invalid(
            "provider_type",
            "must be smtp, sendgrid, twilio, fcm, webhook or inbox",
        )
    })
}

fn channel(s: &str) -> Result<Channel, Problem> {
    Channel::parse(s)
        .ok_or_else(|| Problem::invalid("channel", "must be email, sms, push, webhook or in_app"))
}

fn status(s: &str) -> Result<ProviderStatus, Problem> {
    ProviderStatus::parse(s).ok_or_else(|| Problem::invalid("status", "must be active or inactive"))
}

fn retry_strategy(s: &str) -> Result<RetryStrategy, Problem> {
    RetryStrategy::parse(s)
        .ok_or_else(|| Problem::invalid("retry_strategy", "must be exponential, linear or none"))
}

fn int(field: &'static str, v: i64) -> Result<i32, Problem> {
    i32::try_from(v).map_err(|_| Problem::invalid(field, "out of range"))
}

fn count(field: &'static str, v: i64) -> Result<u32, Problem> {
    u32::try_from(v).map_err(|_| Problem::invalid(field, "must be 0 or more"))
}

/// Credentials as the text of a JSON object; anything else is a 422 that
/// does not echo the value.
fn credentials(v: Value) -> Result<SecretString, Problem> {
    if !v.is_object() {
        return Err(Problem::invalid("credentials", "must be a JSON object"));
    }
    Ok(SecretString::from(v.to_string()))
}

/// A registry row as the API shows it.
fn row_json(row: &ProviderRow, state: &ApiState) -> Value {
    let mut v = serde_json::to_value(row).unwrap_or_else(|_| json!({}));
    let load_error = state
        .providers
        .status
        .get()
        .errors
        .into_iter()
        .find(|e| e.provider == row.name)
        .map(|e| e.message);
    if let Some(o) = v.as_object_mut() {
        o.insert("builtin".into(), json!(false));
        o.insert("load_error".into(), json!(load_error));
    }
    v
}

/// The `herald.toml` adapters, without secrets.
fn builtins(state: &ApiState) -> Vec<Value> {
    let s = &state.settings;
    let smtp = &s.smtp;
    let webhook = &s.webhook;
    vec![
        json!({
            "name": "smtp",
            "provider_type": "smtp",
            "channel": "email",
            "status": "active",
            "builtin": true,
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
        }),
        json!({
            "name": "webhook",
            "provider_type": "webhook",
            "channel": "webhook",
            "status": "active",
            "builtin": true,
            "settings": {
                "timeout_ms": webhook.timeout_ms,
                "allow_private_targets": webhook.allow_private_targets,
                "max_response_bytes": webhook.max_response_bytes,
                "signing_secret_set": true,
            }
        }),
    ]
}

fn builtin(state: &ApiState, name: &str) -> Option<Value> {
    builtins(state).into_iter().find(|b| b["name"] == name)
}

/// `GET /v1/providers` (admin): registered providers, then the built-ins,
/// and the load errors of this instance's registry.
pub async fn list(State(state): State<ApiState>, p: Principal) -> Result<Json<Value>, Problem> {
    p.require(&[Role::Admin])?;
    let rows = state.providers.store.list().await?;
    let mut items: Vec<Value> = rows.iter().map(|r| row_json(r, &state)).collect();
    items.extend(builtins(&state));
    let load = state.providers.status.get();
    Ok(Json(json!({
        "items": items,
        "load_errors": load.errors,
        "loaded_at": load.loaded_at,
    })))
}

/// `POST /v1/providers` (admin): 201 with the row and `Location`.
pub async fn create(
    State(state): State<ApiState>,
    p: Principal,
    RawBody(body): RawBody,
) -> Result<Response, Problem> {
    p.require(&[Role::Admin])?;
    let b: CreateBody = parse_json(&body)?;
    let mut n = NewProvider::new(b.name, provider_type(&b.provider_type)?);
    n.channel = b.channel.as_deref().map(channel).transpose()?;
    if let Some(c) = b.config {
        n.config = c;
    }
    n.credentials = b.credentials.map(credentials).transpose()?;
    if let Some(v) = b.priority {
        n.priority = int("priority", v)?;
    }
    if let Some(v) = b.is_default {
        n.is_default = v;
    }
    if let Some(v) = &b.status {
        n.status = status(v)?;
    }
    if let Some(v) = &b.retry_strategy {
        n.retry_strategy = retry_strategy(v)?;
    }
    if let Some(v) = b.max_retries {
        n.max_retries = count("max_retries", v)?;
    }
    n.rate_limit_per_second = b
        .rate_limit_per_second
        .map(|v| count("rate_limit_per_second", v))
        .transpose()?;
    n.rate_limit_per_minute = b
        .rate_limit_per_minute
        .map(|v| count("rate_limit_per_minute", v))
        .transpose()?;
    n.tenant_id = b.tenant_id;
    let row = state
        .providers
        .store
        .create(n, &state.providers.cipher)
        .await?;
    let mut resp = (StatusCode::CREATED, Json(row_json(&row, &state))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/providers/{}", row.name)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// `GET /v1/providers/{name}` (admin).
pub async fn get_one(
    State(state): State<ApiState>,
    p: Principal,
    Path(name): Path<String>,
) -> Result<Json<Value>, Problem> {
    p.require(&[Role::Admin])?;
    match state.providers.store.get(&name).await {
        Ok(row) => Ok(Json(row_json(&row, &state))),
        Err(ProviderStoreError::NotFound(_)) if builtin(&state, &name).is_some() => {
            Ok(Json(builtin(&state, &name).unwrap_or_default()))
        }
        Err(e) => Err(e.into()),
    }
}

/// A write to a name with no registered row: 409 when it names a built-in
/// provider (changed in herald.toml, not here), else the store's error.
fn write_error(state: &ApiState, name: &str, e: ProviderStoreError) -> Problem {
    match e {
        ProviderStoreError::NotFound(_) if builtin(state, name).is_some() => Problem::conflict(
            format!("{name} is a built-in provider: change it in herald.toml"),
        ),
        e => e.into(),
    }
}

/// `PATCH /v1/providers/{name}` (admin): the fields given change.
pub async fn update(
    State(state): State<ApiState>,
    p: Principal,
    Path(name): Path<String>,
    RawBody(body): RawBody,
) -> Result<Json<Value>, Problem> {
    p.require(&[Role::Admin])?;
    let b: PatchBody = parse_json(&body)?;
    let rate = |field: &'static str, v: Option<Option<i64>>| {
        v.map(|o| o.map(|n| count(field, n)).transpose())
            .transpose()
    };
    let patch = ProviderPatch {
        provider_type: b.provider_type.as_deref().map(provider_type).transpose()?,
        channel: b.channel.as_deref().map(channel).transpose()?,
        config: b.config,
        credentials: b
            .credentials
            .map(|o| o.map(credentials).transpose())
            .transpose()?,
        priority: b.priority.map(|v| int("priority", v)).transpose()?,
        is_default: b.is_default,
        status: b.status.as_deref().map(status).transpose()?,
        retry_strategy: b
            .retry_strategy
            .as_deref()
            .map(retry_strategy)
            .transpose()?,
        max_retries: b.max_retries.map(|v| count("max_retries", v)).transpose()?,
        rate_limit_per_second: rate("rate_limit_per_second", b.rate_limit_per_second)?,
        rate_limit_per_minute: rate("rate_limit_per_minute", b.rate_limit_per_minute)?,
        tenant_id: b.tenant_id,
    };
    let row = state
        .providers
        .store
        .update(&name, patch, &state.providers.cipher)
        .await
        .map_err(|e| write_error(&state, &name, e))?;
    Ok(Json(row_json(&row, &state)))
}

/// `DELETE /v1/providers/{name}` (admin): 204.
pub async fn remove(
    State(state): State<ApiState>,
    p: Principal,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    p.require(&[Role::Admin])?;
    state
        .providers
        .store
        .delete(&name)
        .await
        .map_err(|e| write_error(&state, &name, e))?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/providers/{name}/validate` (admin): builds the adapter and
/// runs its check. 200 either way; `ok` says which, `error` why not.
pub async fn validate(
    State(state): State<ApiState>,
    p: Principal,
    Path(name): Path<String>,
) -> Result<Json<Value>, Problem> {
    p.require(&[Role::Admin])?;
    let fail = |stage: &str, code: &str, message: String| {
        Json(json!({
            "name": name,
            "ok": false,
            "error": { "stage": stage, "code": code, "message": message },
        }))
    };
    let adapter = match state
        .providers
        .store
        .load_spec(&name, &state.providers.cipher)
        .await
    {
        Ok(s) => match build_provider(&s.spec, &state.providers.ctx) {
            Ok(a) => a,
            Err(e) => return Ok(fail("build", "invalid_config", e.to_string())),
        },
        Err(ProviderStoreError::NotFound(_)) if builtin(&state, &name).is_some() => {
            let adapters = match build_adapters(&state.settings) {
                Ok(a) => a,
                Err(e) => return Ok(fail("build", "invalid_config", e.to_string())),
            };
            match adapters.into_iter().find(|a| a.provider() == name) {
                Some(a) => a,
                None => return Err(Problem::not_found(format!("no provider named {name:?}"))),
            }
        }
        Err(ProviderStoreError::NotFound(n)) => {
            return Err(Problem::not_found(format!("no provider named {n:?}")));
        }
        Err(e @ (ProviderStoreError::Crypto(_) | ProviderStoreError::Corrupt { .. })) => {
            return Ok(fail("load", "credentials", e.to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    match adapter.check().await {
        Ok(()) => Ok(Json(json!({ "name": name, "ok": true }))),
        Err(e) => Ok(fail("check", e.code(), e.message().to_string())),
    }
}
