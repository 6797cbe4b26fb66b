//! The admin/query API (`/v1/…`, JSON, bearer API keys) and `/openapi.json`.
//!
//! One file per resource: [`notifications`], [`delivery_logs`],
//! [`templates`], [`preferences`], [`inbox`], [`stats`], [`providers`]; [`auth`] holds
//! the keys and roles, [`problem`] the error documents. [`routes`] is the one
//! table of (method, path, handler): the router is built from it and a test
//! checks every entry is documented in `openapi.json` (checked in at the
//! repository root).

pub mod auth;
pub mod delivery_logs;
pub mod inbox;
pub mod notifications;
pub mod preferences;
pub mod problem;
pub mod providers;
pub mod stats;
pub mod templates;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, header};
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, delete, get, patch, post, put};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use rdkafka::producer::FutureProducer;
use sqlx::PgPool;

use crate::config::Settings;
use crate::templates::{StoreRenderer, TemplateStore};

pub use problem::Problem;

/// The OpenAPI document, embedded from the repository root.
pub const OPENAPI_JSON: &str = include_str!("../../../openapi.json");

/// What the API handlers need.
#[derive(Clone)]
pub struct ApiState {
    pub pool: PgPool,
    /// The app's producer: `POST /v1/notifications` and retries produce with it.
    pub producer: FutureProducer,
    /// Where submitted requests go (the first of `kafka.request_topics`).
    pub request_topic: String,
    /// Template writes reload it; preview renders with it.
    pub templates: Arc<StoreRenderer>,
    pub template_store: TemplateStore,
    /// Read-only settings (limits, adapters for `/v1/providers`).
    pub settings: Arc<Settings>,
    /// The provider registry: store, cipher, load state.
    pub providers: providers::ProviderApi,
}

/// Every API route: method, path (axum syntax) and handler.
pub fn routes() -> Vec<(Method, &'static str, MethodRouter<ApiState>)> {
    vec![
        (Method::GET, "/openapi.json", get(openapi)),
        (Method::GET, "/v1/notifications", get(notifications::list)),
        (
            Method::POST,
            "/v1/notifications",
            post(notifications::submit),
        ),
        (
            Method::GET,
            "/v1/notifications/{id}",
            get(notifications::get_one),
        ),
        (
            Method::POST,
            "/v1/notifications/{id}/retry",
            post(notifications::retry),
        ),
        (Method::GET, "/v1/delivery-logs", get(delivery_logs::list)),
        (Method::GET, "/v1/templates", get(templates::list)),
        (Method::POST, "/v1/templates", post(templates::create)),
        (
            Method::POST,
            "/v1/templates/preview",
            post(templates::preview),
        ),
        (Method::GET, "/v1/templates/{id}", get(templates::get_one)),
        (Method::PUT, "/v1/templates/{id}", put(templates::update)),
        (
            Method::POST,
            "/v1/templates/{id}/versions/{version}/activate",
            post(templates::activate),
        ),
        (
            Method::POST,
            "/v1/templates/{id}/versions/{version}/deactivate",
            post(templates::deactivate),
        ),
        (
            Method::GET,
            "/v1/users/{user_id}/preferences",
            get(preferences::get_prefs),
        ),
        (
            Method::PUT,
            "/v1/users/{user_id}/preferences",
            put(preferences::put_prefs),
        ),
        (Method::GET, "/v1/users/{user_id}/inbox", get(inbox::list)),
        (
            Method::GET,
            "/v1/users/{user_id}/inbox/unread-count",
            get(inbox::unread_count),
        ),
        (
            Method::POST,
            "/v1/users/{user_id}/inbox/read",
            post(inbox::mark_read),
        ),
        (Method::GET, "/v1/stats", get(stats::stats)),
        (Method::GET, "/v1/providers", get(providers::list)),
        (Method::POST, "/v1/providers", post(providers::create)),
        (Method::GET, "/v1/providers/{name}", get(providers::get_one)),
        (
            Method::PATCH,
            "/v1/providers/{name}",
            patch(providers::update),
        ),
        (
            Method::DELETE,
            "/v1/providers/{name}",
            delete(providers::remove),
        ),
        (
            Method::POST,
            "/v1/providers/{name}/validate",
            post(providers::validate),
        ),
    ]
}

/// (method, path) of every route, for documentation checks.
pub fn route_table() -> Vec<(Method, &'static str)> {
    routes().into_iter().map(|(m, p, _)| (m, p)).collect()
}

/// The API router (merged into the HTTP listener's router by the app).
pub fn router(state: ApiState) -> Router {
    let limit = state.settings.api.max_body_bytes;
    let mut r: Router<ApiState> = Router::new();
    for (_, path, handler) in routes() {
        r = r.route(path, handler);
    }
    r.layer(DefaultBodyLimit::max(limit)).with_state(state)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON)
}

/// Query parameters of list endpoints: known names only (an unknown one is a
/// 422 naming it).
pub(crate) struct Params(HashMap<String, String>);

impl Params {
    pub(crate) fn new(q: HashMap<String, String>, allowed: &[&str]) -> Result<Self, Problem> {
        if let Some(k) = q.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(Problem::invalid(
                k.clone(),
                format!("unknown query parameter; known: {}", allowed.join(", ")),
            ));
        }
        Ok(Params(q))
    }

    pub(crate) fn str(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    pub(crate) fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, Problem> {
        self.str(name)
            .map(|s| {
                DateTime::parse_from_rfc3339(s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| Problem::invalid(name, "must be an RFC 3339 date-time"))
            })
            .transpose()
    }

    /// `limit`, defaulting to and capped by the settings.
    pub(crate) fn limit(&self, settings: &Settings) -> Result<i64, Problem> {
        match self.str("limit") {
            None => Ok(settings.api.default_page_size),
            Some(s) => match s.parse::<i64>() {
                Ok(n) if n >= 1 && n <= settings.api.max_page_size => Ok(n),
                _ => Err(Problem::invalid(
                    "limit",
                    format!("must be 1 to {}", settings.api.max_page_size),
                )),
            },
        }
    }
}

/// A keyset cursor over (created_at, id), opaque to clients.
pub(crate) fn encode_cursor(created_at: DateTime<Utc>, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}|{id}", created_at.timestamp_micros()))
}

pub(crate) fn decode_cursor(s: &str) -> Result<(DateTime<Utc>, String), Problem> {
    let bad = || Problem::invalid("cursor", "not a cursor returned by this API");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (micros, id) = text.split_once('|').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let t = DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(bad)?;
    Ok((t, id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Path templates of the OpenAPI document, per method.
    fn documented() -> Vec<(String, String)> {
        let doc: serde_json::Value =
            serde_json::from_str(OPENAPI_JSON).expect("openapi.json is JSON");
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (m, _) in item.as_object().expect("path item") {
                if ["get", "post", "put", "patch", "delete"].contains(&m.as_str()) {
                    out.push((m.to_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn openapi_document_is_well_formed() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).expect("JSON");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1"))
        );
        assert!(doc["info"]["title"].is_string());
        assert!(doc["info"]["version"].is_string());
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        // Every operation has an id, responses, and every $ref resolves.
        let mut ids = std::collections::HashSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (m, op) in item.as_object().expect("item") {
                if m == "parameters" {
                    continue;
                }
                let id = op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{m} {path}: operationId"));
                assert!(ids.insert(id.to_string()), "duplicate operationId {id}");
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{m} {path}: responses"
                );
                // Path parameters are declared.
                for seg in path.split('/').filter(|s| s.starts_with('{')) {
                    let name = seg.trim_matches(|c| c == '{' || c == '}');
                    let params = op["parameters"].as_array().cloned().unwrap_or_default();
                    assert!(
                        params
                            .iter()
                            .any(|p| p["name"] == name && p["in"] == "path"),
                        "{m} {path}: path parameter {name} not declared"
                    );
                }
            }
        }
        let text = OPENAPI_JSON;
        for part in text.split("\"$ref\": \"").skip(1) {
            let r = part.split('"').next().unwrap_or_default();
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected $ref {r}"));
            assert!(schemas.contains_key(name), "$ref {r} does not resolve");
        }
    }

    #[test]
    fn every_route_is_documented_and_every_documented_path_routed() {
        let docs = documented();
        let routes: Vec<(String, String)> = route_table()
            .into_iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        for r in &routes {
            assert!(
                docs.contains(r),
                "route {} {} missing from openapi.json",
                r.0,
                r.1
            );
        }
        for d in &docs {
            assert!(
                routes.contains(d),
                "openapi.json documents {} {} which is not routed",
                d.0,
                d.1
            );
        }
    }

    #[test]
    fn cursors_round_trip() {
        let t = DateTime::<Utc>::from_timestamp_micros(1_780_000_000_123_456).unwrap();
        let c = encode_cursor(t, "a|b:1");
        assert_eq!(decode_cursor(&c).unwrap(), (t, "a|b:1".to_string()));
        assert!(decode_cursor("???").is_err());
    }
}
