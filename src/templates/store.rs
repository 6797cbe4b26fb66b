//! SQL for templates and their versions.
//!
//! A template is a scope (key, channel, tenant, app, locale); its content is
//! in `template_versions`. Creating a template writes version 1 (active);
//! every update writes version `max + 1` and makes it the active one; the old
//! versions stay and can be activated again. At most one version is active
//! (a partial unique index); deactivating the active version leaves the
//! template without one, so resolution falls through to the next scope.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::{Engine, FieldError, TemplateContent};
use crate::domain::Channel;

/// Failures of the template store. The API maps them to 404, 409, 422, 500.
#[derive(Debug, thiserror::Error)]
pub enum TemplateStoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid: {0}")]
    Invalid(#[from] FieldError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored data is not what this version expects: {0}")]
    Corrupt(String),
}

/// One template (a scope) with its version numbers.
#[derive(Debug, Clone, Serialize)]
pub struct Template {
    pub id: i64,
    pub key: String,
    pub channel: Channel,
    pub name: Option<String>,
    pub tenant_id: Option<String>,
    pub app_id: Option<String>,
    pub locale: Option<String>,
    /// The version rendered now, if any.
    pub active_version: Option<i32>,
    pub latest_version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One stored version.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateVersion {
    pub version: i32,
    #[serde(flatten)]
    pub content: TemplateContent,
    pub is_active: bool,
    pub created_at: DateTime<Utc>,
}

/// A template with all its versions (newest first).
#[derive(Debug, Clone, Serialize)]
pub struct TemplateDetail {
    #[serde(flatten)]
    pub template: Template,
    pub versions: Vec<TemplateVersion>,
}

/// A new template's scope and first content.
#[derive(Debug, Clone)]
pub struct NewTemplate {
    pub key: String,
    pub channel: Channel,
    pub name: Option<String>,
    pub tenant_id: Option<String>,
    pub app_id: Option<String>,
    /// Canonical spelling (see [`super::canonical_locale`]).
    pub locale: Option<String>,
    pub content: TemplateContent,
}

/// An active version with its scope: what the renderer caches.
#[derive(Debug, Clone)]
pub struct ActiveTemplate {
    pub id: i64,
    pub key: String,
    pub channel: Channel,
    pub tenant_id: Option<String>,
    pub app_id: Option<String>,
    pub locale: Option<String>,
    pub version: i32,
    pub content: TemplateContent,
}

/// What [`TemplateStore::sync`] did to one scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncResult {
    Created,
    /// A new version with this number was written and activated.
    Updated(i32),
    /// The active version already has this content.
    Unchanged,
}

/// Filters of [`TemplateStore::list`].
#[derive(Debug, Clone, Default)]
pub struct TemplateFilter {
    pub key: Option<String>,
    pub channel: Option<Channel>,
    pub tenant_id: Option<String>,
    /// Return templates with `id > after` (keyset pagination by id).
    pub after: Option<i64>,
    pub limit: i64,
}

/// Repository of templates.
#[derive(Clone)]
pub struct TemplateStore {
    pool: PgPool,
}

const TEMPLATE_COLUMNS: &str = r#"
    t.id, t.key, t.channel, t.name, t.tenant_id, t.app_id, t.locale, t.created_at, t.updated_at,
    (SELECT version FROM template_versions v WHERE v.template_id = t.id AND v.is_active) AS active_version,
    (SELECT COALESCE(max(version), 0) FROM template_versions v WHERE v.template_id = t.id) AS latest_version
"#;

impl TemplateStore {
    pub fn new(pool: PgPool) -> Self {
        TemplateStore { pool }
    }

    /// Templates ordered by id.
    pub async fn list(&self, f: &TemplateFilter) -> Result<Vec<Template>, TemplateStoreError> {
        let sql = format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates t
             WHERE ($1::text IS NULL OR t.key = $1) AND ($2::text IS NULL OR t.channel = $2)
               AND ($3::text IS NULL OR t.tenant_id = $3) AND ($4::bigint IS NULL OR t.id > $4)
             ORDER BY t.id LIMIT $5"
        );
        let rows = sqlx::query(&sql)
            .bind(&f.key)
            .bind(f.channel.map(|c| c.as_str()))
            .bind(&f.tenant_id)
            .bind(f.after)
            .bind(f.limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(template_from_row).collect()
    }

    /// A template and its versions.
    pub async fn get(&self, id: i64) -> Result<TemplateDetail, TemplateStoreError> {
        let sql = format!("SELECT {TEMPLATE_COLUMNS} FROM templates t WHERE t.id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(TemplateStoreError::NotFound)?;
        let template = template_from_row(&row)?;
        let rows = sqlx::query(
            "SELECT version, engine, subject_template, body_template, html_template, content_type,
                    variables_schema, is_active, created_at
             FROM template_versions WHERE template_id = $1 ORDER BY version DESC",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let versions = rows
            .iter()
            .map(|r| {
                Ok(TemplateVersion {
                    version: r.try_get("version")?,
                    content: content_from_row(r)?,
                    is_active: r.try_get("is_active")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<Vec<_>, TemplateStoreError>>()?;
        Ok(TemplateDetail { template, versions })
    }

    /// One version's content.
    pub async fn version(
        &self,
        id: i64,
        version: i32,
    ) -> Result<TemplateContent, TemplateStoreError> {
        let row = sqlx::query(
            "SELECT engine, subject_template, body_template, html_template, content_type, variables_schema
             FROM template_versions WHERE template_id = $1 AND version = $2",
        )
        .bind(id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(TemplateStoreError::NotFound)?;
        content_from_row(&row)
    }

    /// Creates a template with version 1, active. 409 when the scope exists.
    pub async fn create(&self, t: &NewTemplate) -> Result<i64, TemplateStoreError> {
        t.content.validate()?;
        let mut tx = self.pool.begin().await?;
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO templates (key, channel, name, tenant_id, app_id, locale)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(&t.key)
        .bind(t.channel.as_str())
        .bind(&t.name)
        .bind(&t.tenant_id)
        .bind(&t.app_id)
        .bind(&t.locale)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(id) = id else {
            return Err(TemplateStoreError::Conflict(
                "a template with this key, channel, tenant_id, app_id and locale exists; update it"
                    .into(),
            ));
        };
        insert_version(&mut tx, id, 1, &t.content).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Writes a new version (max + 1) of template `id` and activates it.
    /// `name`, when given, renames the template.
    pub async fn update(
        &self,
        id: i64,
        name: Option<&str>,
        content: &TemplateContent,
    ) -> Result<i32, TemplateStoreError> {
        content.validate()?;
        let mut tx = self.pool.begin().await?;
        // Serializes concurrent updates of one template.
        let found: Option<i64> = sqlx::query_scalar(
            "UPDATE templates SET updated_at = now(), name = COALESCE($2, name)
             WHERE id = $1 RETURNING id",
        )
        .bind(id)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        if found.is_none() {
            return Err(TemplateStoreError::NotFound);
        }
        let next: i32 = sqlx::query_scalar(
            "SELECT COALESCE(max(version), 0) + 1 FROM template_versions WHERE template_id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        insert_version(&mut tx, id, next, content).await?;
        tx.commit().await?;
        Ok(next)
    }

    /// Activates `version` (deactivating the active one) or deactivates it.
    pub async fn set_active(
        &self,
        id: i64,
        version: i32,
        active: bool,
    ) -> Result<(), TemplateStoreError> {
        let mut tx = self.pool.begin().await?;
        let exists: Option<i32> = sqlx::query_scalar(
            "SELECT version FROM template_versions WHERE template_id = $1 AND version = $2 FOR UPDATE",
        )
        .bind(id)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await?;
        if exists.is_none() {
            return Err(TemplateStoreError::NotFound);
        }
        if active {
            sqlx::query(
                "UPDATE template_versions SET is_active = false WHERE template_id = $1 AND is_active AND version <> $2",
            )
            .bind(id)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE template_versions SET is_active = $3 WHERE template_id = $1 AND version = $2",
        )
        .bind(id)
        .bind(version)
        .bind(active)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE templates SET updated_at = now() WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Creates the scope, or writes a new version when the active content
    /// differs (used by `herald templates sync`).
    pub async fn sync(&self, t: &NewTemplate) -> Result<SyncResult, TemplateStoreError> {
        let existing: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM templates WHERE key = $1 AND channel = $2
               AND tenant_id IS NOT DISTINCT FROM $3 AND app_id IS NOT DISTINCT FROM $4
               AND locale IS NOT DISTINCT FROM $5",
        )
        .bind(&t.key)
        .bind(t.channel.as_str())
        .bind(&t.tenant_id)
        .bind(&t.app_id)
        .bind(&t.locale)
        .fetch_optional(&self.pool)
        .await?;
        let Some(id) = existing else {
            self.create(t).await?;
            return Ok(SyncResult::Created);
        };
        let detail = self.get(id).await?;
        if detail
            .versions
            .iter()
            .any(|v| v.is_active && v.content == t.content)
        {
            return Ok(SyncResult::Unchanged);
        }
        let v = self.update(id, t.name.as_deref(), &t.content).await?;
        Ok(SyncResult::Updated(v))
    }

    /// Every active version with its scope (what the renderer caches).
    pub async fn load_active(&self) -> Result<Vec<ActiveTemplate>, TemplateStoreError> {
        let rows = sqlx::query(
            "SELECT t.id, t.key, t.channel, t.tenant_id, t.app_id, t.locale, v.version, v.engine,
                    v.subject_template, v.body_template, v.html_template, v.content_type,
                    v.variables_schema
             FROM templates t JOIN template_versions v ON v.template_id = t.id AND v.is_active",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ActiveTemplate {
                    id: r.try_get("id")?,
                    key: r.try_get("key")?,
                    channel: channel_of(r)?,
                    tenant_id: r.try_get("tenant_id")?,
                    app_id: r.try_get("app_id")?,
                    locale: r.try_get("locale")?,
                    version: r.try_get("version")?,
                    content: content_from_row(r)?,
                })
            })
            .collect()
    }
}

async fn insert_version(
    tx: &mut Transaction<'_, Postgres>,
    id: i64,
    version: i32,
    c: &TemplateContent,
) -> Result<(), TemplateStoreError> {
    sqlx::query(
        "UPDATE template_versions SET is_active = false WHERE template_id = $1 AND is_active",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO template_versions (template_id, version, engine, subject_template, body_template,
             html_template, content_type, variables_schema, is_active)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, true)",
    )
    .bind(id)
    .bind(version)
    .bind(c.engine.as_str())
    .bind(&c.subject_template)
    .bind(&c.body_template)
    .bind(&c.html_template)
    .bind(&c.content_type)
    .bind(c.variables_schema.as_ref().map(Json))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn channel_of(r: &sqlx::postgres::PgRow) -> Result<Channel, TemplateStoreError> {
    let s: String = r.try_get("channel")?;
    Channel::parse(&s).ok_or_else(|| TemplateStoreError::Corrupt(format!("channel {s:?}")))
}

fn template_from_row(r: &sqlx::postgres::PgRow) -> Result<Template, TemplateStoreError> {
    Ok(Template {
        id: r.try_get("id")?,
        key: r.try_get("key")?,
        channel: channel_of(r)?,
        name: r.try_get("name")?,
        tenant_id: r.try_get("tenant_id")?,
        app_id: r.try_get("app_id")?,
        locale: r.try_get("locale")?,
        active_version: r.try_get("active_version")?,
        latest_version: r.try_get("latest_version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn content_from_row(r: &sqlx::postgres::PgRow) -> Result<TemplateContent, TemplateStoreError> {
    let engine: String = r.try_get("engine")?;
    let schema: Option<Json<serde_json::Value>> = r.try_get("variables_schema")?;
    Ok(TemplateContent {
        engine: Engine::parse(&engine)
            .ok_or_else(|| TemplateStoreError::Corrupt(format!("engine {engine:?}")))?,
        subject_template: r.try_get("subject_template")?,
        body_template: r.try_get("body_template")?,
        html_template: r.try_get("html_template")?,
        content_type: r.try_get("content_type")?,
        variables_schema: schema.map(|j| j.0),
    })
}
