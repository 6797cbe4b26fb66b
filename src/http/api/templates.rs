//! `/v1/templates`: list, get (with versions), create (version 1), update
//! (a new version, activated), activate/deactivate a version, and preview
//! (render with sample data, nothing sent). Admin only.
//!
//! Every write reloads this instance's template cache before answering;
//! other instances pick it up within `template_store.refresh_ms`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};

use super::auth::{Principal, Role};
use super::problem::{Problem, RawBody, parse_json};
use super::{ApiState, Params};
use crate::domain::{Content, Notification, Priority, Recipient, TemplateRef};
use crate::render::{RenderError, Renderer};
use crate::templates::cache::Resolved;
use crate::templates::store::{NewTemplate, TemplateDetail, TemplateFilter};
use crate::templates::{
    Engine, TemplateContent, VariablesSchema, canonical_locale, parse_channel, validate_scope,
};

/// Body of `POST /v1/templates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    key: String,
    channel: String,
    name: Option<String>,
    tenant_id: Option<String>,
    app_id: Option<String>,
    locale: Option<String>,
    #[serde(default)]
    engine: Engine,
    subject_template: Option<String>,
    body_template: Option<String>,
    html_template: Option<String>,
    content_type: Option<String>,
    variables_schema: Option<serde_json::Value>,
}

/// Body of `PUT /v1/templates/{id}`: the new version's content.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    name: Option<String>,
    #[serde(default)]
    engine: Engine,
    subject_template: Option<String>,
    body_template: Option<String>,
    html_template: Option<String>,
    content_type: Option<String>,
    variables_schema: Option<serde_json::Value>,
}

fn parse_id(s: &str) -> Result<i64, Problem> {
    s.parse()
        .map_err(|_| Problem::not_found("no such template (ids are integers)"))
}

async fn reload(state: &ApiState) {
    if let Err(e) = state.templates.refresh().await {
        tracing::warn!(error = %e, "reloading templates after a write failed; the periodic reload will retry");
    }
}

/// `GET /v1/templates?key=&channel=&tenant_id=&limit=&cursor=`.
pub async fn list(
    State(state): State<ApiState>,
    p: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, Problem> {
    p.require(&[Role::Admin])?;
    let q = Params::new(q, &["key", "channel", "tenant_id", "limit", "cursor"])?;
    let channel = q
        .str("channel")
        .map(|c| parse_channel(c, "channel"))
        .transpose()?;
    let after = q
        .str("cursor")
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| Problem::invalid("cursor", "not a cursor returned by this API"))
        })
        .transpose()?;
    let limit = q.limit(&state.settings)?;
    let mut items = state
        .template_store
        .list(&TemplateFilter {
            key: q.str("key").map(str::to_string),
            channel,
            tenant_id: q.str("tenant_id").map(str::to_string),
            after,
            limit: limit + 1,
        })
        .await?;
    let next = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|t| t.id.to_string())
    } else {
        None
    };
    Ok(Json(
        serde_json::json!({ "items": items, "next_cursor": next }),
    ))
}

/// `GET /v1/templates/{id}`: the template and all its versions, newest first.
pub async fn get_one(
    State(state): State<ApiState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<TemplateDetail>, Problem> {
    p.require(&[Role::Admin])?;
    Ok(Json(state.template_store.get(parse_id(&id)?).await?))
}

/// `POST /v1/templates`: creates the template with version 1, active.
pub async fn create(
    State(state): State<ApiState>,
    p: Principal,
    RawBody(body): RawBody,
) -> Result<impl IntoResponse, Problem> {
    p.require(&[Role::Admin])?;
    let b: CreateBody = parse_json(&body)?;
    validate_scope(&b.key, b.locale.as_deref())?;
    let channel = parse_channel(&b.channel, "channel")?;
    let t = NewTemplate {
        key: b.key,
        channel,
        name: b.name,
        tenant_id: b.tenant_id.filter(|s| !s.is_empty()),
        app_id: b.app_id.filter(|s| !s.is_empty()),
        locale: b.locale.as_deref().map(canonical_locale),
        content: TemplateContent {
            engine: b.engine,
            subject_template: b.subject_template,
            body_template: b.body_template,
            html_template: b.html_template,
            content_type: b.content_type,
            variables_schema: b.variables_schema,
        },
    };
    let id = state.template_store.create(&t).await?;
    reload(&state).await;
    Ok((
        StatusCode::CREATED,
        Json(state.template_store.get(id).await?),
    ))
}

/// `PUT /v1/templates/{id}`: writes a new version and activates it.
pub async fn update(
    State(state): State<ApiState>,
    p: Principal,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> Result<Json<TemplateDetail>, Problem> {
    p.require(&[Role::Admin])?;
    let id = parse_id(&id)?;
    let b: UpdateBody = parse_json(&body)?;
    let content = TemplateContent {
        engine: b.engine,
        subject_template: b.subject_template,
        body_template: b.body_template,
        html_template: b.html_template,
        content_type: b.content_type,
        variables_schema: b.variables_schema,
    };
    state
        .template_store
        .update(id, b.name.as_deref(), &content)
        .await?;
    reload(&state).await;
    Ok(Json(state.template_store.get(id).await?))
}

async fn set_active(
    state: ApiState,
    p: Principal,
    id: &str,
    version: &str,
    active: bool,
) -> Result<Json<TemplateDetail>, Problem> {
    p.require(&[Role::Admin])?;
    let id = parse_id(id)?;
    let version: i32 = version
        .parse()
        .map_err(|_| Problem::not_found("no such version (versions are integers)"))?;
    state.template_store.set_active(id, version, active).await?;
    reload(&state).await;
    Ok(Json(state.template_store.get(id).await?))
}

/// `POST /v1/templates/{id}/versions/{version}/activate`.
pub async fn activate(
    State(state): State<ApiState>,
    p: Principal,
    Path((id, version)): Path<(String, String)>,
) -> Result<Json<TemplateDetail>, Problem> {
    set_active(state, p, &id, &version, true).await
}

/// `POST /v1/templates/{id}/versions/{version}/deactivate`: the template
/// then has no active version and resolution falls through to the next scope.
pub async fn deactivate(
    State(state): State<ApiState>,
    p: Principal,
    Path((id, version)): Path<(String, String)>,
) -> Result<Json<TemplateDetail>, Problem> {
    set_active(state, p, &id, &version, false).await
}

/// Body of `POST /v1/templates/preview`. Exactly one of: `template` (content
/// given inline), `template_id` (+ optional `version`, default the active
/// one), or `key` + `channel` (resolved like a real send, falling back to
/// the file templates).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewBody {
    key: Option<String>,
    channel: Option<String>,
    tenant_id: Option<String>,
    app_id: Option<String>,
    locale: Option<String>,
    template_id: Option<i64>,
    version: Option<i32>,
    template: Option<TemplateContent>,
    #[serde(default)]
    data: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    recipient: Option<Recipient>,
}

/// What a preview rendered.
#[derive(Debug, Serialize)]
pub struct PreviewResult {
    subject: Option<String>,
    text: Option<String>,
    html: Option<String>,
    /// `store`, `file` or `inline`.
    source: &'static str,
    /// The stored template and version used (source `store`).
    template: Option<Resolved>,
}

/// A render failure as a 422: the variable when the message names one
/// (`data.<name>`), else `template`.
fn render_problem(e: RenderError) -> Problem {
    let field = e
        .message
        .split('`')
        .nth(1)
        .filter(|_| e.message.contains("variable `"))
        .map(|v| format!("data.{v}"))
        .unwrap_or_else(|| "template".into());
    let mut p = Problem::invalid(field, e.message.clone());
    p.detail = format!("{}: {}", e.code, e.message);
    p
}

/// `POST /v1/templates/preview`: renders without sending. Schema violations
/// and render errors (undefined variable, fuel, output cap) → 422.
pub async fn preview(
    State(state): State<ApiState>,
    p: Principal,
    RawBody(body): RawBody,
) -> Result<Json<PreviewResult>, Problem> {
    p.require(&[Role::Admin])?;
    let b: PreviewBody = parse_json(&body)?;
    let modes = [
        b.template.is_some(),
        b.template_id.is_some(),
        b.key.is_some(),
    ];
    if modes.iter().filter(|m| **m).count() != 1 {
        return Err(Problem::invalid(
            "template",
            "give exactly one of template, template_id, key",
        ));
    }
    let mut channel = b
        .channel
        .as_deref()
        .map(|c| parse_channel(c, "channel"))
        .transpose()?;
    let (content, resolved) = if let Some(c) = b.template {
        c.validate()?;
        (Some(c), None)
    } else if let Some(id) = b.template_id {
        let detail = state.template_store.get(id).await?;
        channel = channel.or(Some(detail.template.channel));
        let v = match b.version {
            Some(v) => detail.versions.iter().find(|x| x.version == v),
            None => detail.versions.iter().find(|x| x.is_active),
        }
        .ok_or_else(|| Problem::not_found("no such (or no active) version"))?;
        let r = Resolved {
            template_id: id,
            version: v.version,
            tenant_id: detail.template.tenant_id.clone(),
            app_id: detail.template.app_id.clone(),
            locale: detail.template.locale.clone(),
        };
        (Some(v.content.clone()), Some(r))
    } else {
        (None, None)
    };
    let channel = channel.ok_or_else(|| Problem::invalid("channel", "is required"))?;
    let key = b.key.clone().unwrap_or_else(|| "preview".into());
    let n = Notification {
        id: "preview".into(),
        request_id: "preview".into(),
        tenant_id: b.tenant_id,
        app_id: b.app_id,
        channel,
        recipient: b.recipient.unwrap_or_default(),
        content: Content::Template(TemplateRef {
            key,
            locale: b.locale,
            data: b.data.clone(),
        }),
        priority: Priority::Normal,
        category: None,
        scheduled_at: None,
        expires_at: None,
        meta: Default::default(),
        correlation_id: None,
    };
    let (out, source, resolved) = match content {
        Some(c) => {
            if let Some(s) = c.variables_schema.as_ref() {
                let schema = VariablesSchema::parse(s)?;
                schema
                    .check(&b.data)
                    .map_err(|v| Problem::invalid(format!("data.{}", v.variable), v.message))?;
            }
            let src = if resolved.is_some() {
                "store"
            } else {
                "inline"
            };
            (
                state.templates.render_content(&c, &b.data, &n),
                src,
                resolved,
            )
        }
        None => {
            let Content::Template(t) = &n.content else {
                return Err(Problem::internal(&"preview content"));
            };
            validate_scope(&t.key, None)?;
            match state.templates.render_stored(t, &n) {
                Some((r, out)) => (out, "store", Some(r)),
                None => (state.templates.files().render(&n), "file", None),
            }
        }
    };
    let out = out.map_err(render_problem)?;
    Ok(Json(PreviewResult {
        subject: out.subject,
        text: out.text,
        html: out.html,
        source,
        template: resolved,
    }))
}
