//! The provider registry table (`providers`): create, update, status,
//! delete, list without credentials, and the specs with credentials
//! decrypted for [`load`](super::load).
//!
//! Input is validated here, once, before it is written: the name, the
//! type's channel, positive rate limits, `config` and `credentials` JSON
//! objects. Credentials are encrypted with the [`Cipher`] before they reach
//! the database and are never read back by [`ProviderStore::list`] or
//! [`ProviderStore::get`].

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use super::crypto::{Cipher, CryptoError};
use super::load::LoadError;
use super::{ProviderSpec, ProviderType, RetryStrategy};
use crate::domain::Channel;

/// Whether a provider may be selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderStatus {
    Active,
    Inactive,
}

impl ProviderStatus {
    /// The database spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            ProviderStatus::Active => "active",
            ProviderStatus::Inactive => "inactive",
        }
    }

    /// Parses the database spelling.
    pub fn parse(s: &str) -> Option<ProviderStatus> {
        match s {
            "active" => Some(ProviderStatus::Active),
            "inactive" => Some(ProviderStatus::Inactive),
            _ => None,
        }
    }
}

/// A provider as listed: everything but the credentials.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderRow {
    pub id: i64,
    pub name: String,
    #[serde(serialize_with = "ser_type")]
    pub provider_type: ProviderType,
    pub channel: Channel,
    pub config: serde_json::Value,
    /// Whether credentials are stored (they are never returned).
    pub has_credentials: bool,
    /// Which key encrypted them (first 8 hex digits of its SHA-256).
    pub credentials_key_id: Option<String>,
    pub priority: i32,
    pub is_default: bool,
    pub status: ProviderStatus,
    pub retry_strategy: RetryStrategy,
    pub max_retries: u32,
    pub rate_limit_per_second: Option<u32>,
    pub rate_limit_per_minute: Option<u32>,
    pub tenant_id: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Moves on every change; reloads keep a provider whose value is unchanged.
    pub updated_at: DateTime<Utc>,
}

impl ProviderRow {
    /// The registry's view of this row, with `credentials` (decrypted, or
    /// `{}` when there are none or they cannot be read).
    pub fn into_spec(self, credentials: SecretString) -> ProviderSpec {
        ProviderSpec {
            name: self.name,
            provider_type: self.provider_type,
            channel: self.channel,
            config: self.config,
            credentials,
            priority: self.priority,
            is_default: self.is_default,
            active: self.status == ProviderStatus::Active,
            retry_strategy: self.retry_strategy,
            max_retries: self.max_retries,
            rate_limit_per_second: self.rate_limit_per_second,
            rate_limit_per_minute: self.rate_limit_per_minute,
            tenant_id: self.tenant_id,
        }
    }
}

fn ser_type<S: serde::Serializer>(t: &ProviderType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.as_str())
}

/// A provider to create. [`NewProvider::new`] fills in the defaults of the
/// table.
#[derive(Clone)]
pub struct NewProvider {
    pub name: String,
    pub provider_type: ProviderType,
    /// `None`: the type's channel. Otherwise it must be the type's channel.
    pub channel: Option<Channel>,
    /// A JSON object of non-secret settings.
    pub config: serde_json::Value,
    /// The text of a JSON object of secrets; `None`: no credentials.
    pub credentials: Option<SecretString>,
    pub priority: i32,
    pub is_default: bool,
    pub status: ProviderStatus,
    pub retry_strategy: RetryStrategy,
    pub max_retries: u32,
    pub rate_limit_per_second: Option<u32>,
    pub rate_limit_per_minute: Option<u32>,
    pub tenant_id: Option<String>,
}

impl std::fmt::Debug for NewProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewProvider")
            .field("name", &self.name)
            .field("provider_type", &self.provider_type)
            .field("has_credentials", &self.credentials.is_some())
            .finish_non_exhaustive()
    }
}

impl NewProvider {
    /// A provider of `provider_type` with the table's defaults: the type's
    /// channel, empty config, no credentials, priority 100, active,
    /// exponential retries, 5 retries, no rate limit, global.
    pub fn new(name: impl Into<String>, provider_type: ProviderType) -> NewProvider {
        NewProvider {
            name: name.into(),
            provider_type,
            channel: None,
            config: serde_json::json!({}),
            credentials: None,
            priority: 100,
            is_default: false,
            status: ProviderStatus::Active,
            retry_strategy: RetryStrategy::Exponential,
            max_retries: 5,
            rate_limit_per_second: None,
            rate_limit_per_minute: None,
            tenant_id: None,
        }
    }
}

/// A change to a provider: `None` leaves a field as it is. For nullable
/// fields `Some(None)` clears the value (no credentials, no rate limit,
/// global).
#[derive(Clone, Default)]
pub struct ProviderPatch {
    pub provider_type: Option<ProviderType>,
    pub channel: Option<Channel>,
    pub config: Option<serde_json::Value>,
    pub credentials: Option<Option<SecretString>>,
    pub priority: Option<i32>,
    pub is_default: Option<bool>,
    pub status: Option<ProviderStatus>,
    pub retry_strategy: Option<RetryStrategy>,
    pub max_retries: Option<u32>,
    pub rate_limit_per_second: Option<Option<u32>>,
    pub rate_limit_per_minute: Option<Option<u32>>,
    pub tenant_id: Option<Option<String>>,
}

impl std::fmt::Debug for ProviderPatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderPatch")
            .field("provider_type", &self.provider_type)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|c| c.as_ref().map(|_| "[redacted]")),
            )
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl ProviderPatch {
    /// Whether the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.provider_type.is_none()
            && self.channel.is_none()
            && self.config.is_none()
            && self.credentials.is_none()
            && self.priority.is_none()
            && self.is_default.is_none()
            && self.status.is_none()
            && self.retry_strategy.is_none()
            && self.max_retries.is_none()
            && self.rate_limit_per_second.is_none()
            && self.rate_limit_per_minute.is_none()
            && self.tenant_id.is_none()
    }
}

/// One provider read for loading: its spec with credentials decrypted and
/// when it last changed.
#[derive(Debug, Clone)]
pub struct StoredSpec {
    pub spec: ProviderSpec,
    pub updated_at: DateTime<Utc>,
}

/// One row read for loading.
#[derive(Debug, Clone)]
pub enum Loaded {
    /// Usable: credentials decrypted.
    Spec(StoredSpec),
    /// Not usable; `row` holds what could be read (no credentials), `None`
    /// when the row itself is not valid.
    Failed {
        error: LoadError,
        row: Option<Box<ProviderRow>>,
    },
}

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderStoreError {
    /// Input that cannot be stored; `field` names it.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("a provider named {0:?} already exists")]
    Duplicate(String),
    #[error("no provider named {0:?}")]
    NotFound(String),
    /// Credentials given without a key, or a bad key.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A stored row this version cannot read (written around the checks).
    #[error("provider {name}: stored value is not valid: {message}")]
    Corrupt { name: String, message: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

fn invalid(field: &'static str, message: impl Into<String>) -> ProviderStoreError {
    ProviderStoreError::Invalid {
        field,
        message: message.into(),
    }
}

/// Checks a provider name: 1–64 of `a-z 0-9 _ . -`.
pub fn validate_name(name: &str) -> Result<(), ProviderStoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "name",
            "must be 1 to 64 characters of a-z, 0-9, `_`, `.`, `-`",
        ))
    }
}

/// A provider with every field decided, checked before a write.
struct Valid {
    provider_type: ProviderType,
    channel: Channel,
    config: serde_json::Value,
    priority: i32,
    is_default: bool,
    status: ProviderStatus,
    retry_strategy: RetryStrategy,
    max_retries: i32,
    rate_limit_per_second: Option<i32>,
    rate_limit_per_minute: Option<i32>,
    tenant_id: Option<String>,
}

/// Every field of a provider as given (a new one, or a stored one with a
/// patch applied), before [`validate`] decides it.
struct Draft {
    provider_type: ProviderType,
    /// `None`: the type's channel.
    channel: Option<Channel>,
    config: serde_json::Value,
    priority: i32,
    is_default: bool,
    status: ProviderStatus,
    retry_strategy: RetryStrategy,
    max_retries: u32,
    rate_limit_per_second: Option<u32>,
    rate_limit_per_minute: Option<u32>,
    tenant_id: Option<String>,
}

impl NewProvider {
    /// The name, the credentials, and the rest as a [`Draft`].
    fn into_draft(self) -> (String, Option<SecretString>, Draft) {
        let draft = Draft {
            provider_type: self.provider_type,
            channel: self.channel,
            config: self.config,
            priority: self.priority,
            is_default: self.is_default,
            status: self.status,
            retry_strategy: self.retry_strategy,
            max_retries: self.max_retries,
            rate_limit_per_second: self.rate_limit_per_second,
            rate_limit_per_minute: self.rate_limit_per_minute,
            tenant_id: self.tenant_id,
        };
        (self.name, self.credentials, draft)
    }
}

fn validate(d: Draft) -> Result<Valid, ProviderStoreError> {
    let Draft {
        provider_type,
        channel,
        config,
        priority,
        is_default,
        status,
        retry_strategy,
        max_retries,
        rate_limit_per_second,
        rate_limit_per_minute,
        tenant_id,
    } = d;
    let want = provider_type.channel();
    let channel = channel.unwrap_or(want);
    if channel != want {
        return Err(invalid(
            "channel",
            format!(
                "a {} provider delivers {want}, not {channel}",
                provider_type.as_str()
            ),
        ));
    }
    if !config.is_object() {
        return Err(invalid("config", "must be a JSON object"));
    }
    let max_retries = i32::try_from(max_retries)
        .map_err(|_| invalid("max_retries", "must be at most 2147483647"))?;
    let rate = |field: &'static str, v: Option<u32>| -> Result<Option<i32>, ProviderStoreError> {
        match v {
            None => Ok(None),
            Some(0) => Err(invalid(
                field,
                "must be positive (leave it out for no limit)",
            )),
            Some(n) => i32::try_from(n)
                .map(Some)
                .map_err(|_| invalid(field, "must be at most 2147483647")),
        }
    };
    let rate_limit_per_second = rate("rate_limit_per_second", rate_limit_per_second)?;
    let rate_limit_per_minute = rate("rate_limit_per_minute", rate_limit_per_minute)?;
    if let Some(t) = &tenant_id
        && (t.is_empty() || t.len() > 256)
    {
        return Err(invalid(
            "tenant_id",
            "must be 1 to 256 characters (leave it out for a global provider)",
        ));
    }
    Ok(Valid {
        provider_type,
        channel,
        config,
        priority,
        is_default,
        status,
        retry_strategy,
        max_retries,
        rate_limit_per_second,
        rate_limit_per_minute,
        tenant_id,
    })
}

/// Checks that credential text is a JSON object, without echoing it.
pub fn validate_credentials(text: &SecretString) -> Result<(), ProviderStoreError> {
    match serde_json::from_str::<serde_json::Value>(text.expose_secret()) {
        Ok(v) if v.is_object() => Ok(()),
        Ok(_) => Err(invalid("credentials", "must be a JSON object")),
        Err(e) => Err(invalid(
            "credentials",
            format!(
                "must be a JSON object; it is not JSON (line {}, column {})",
                e.line(),
                e.column()
            ),
        )),
    }
}

/// Columns of [`ProviderRow`].
const ROW_COLUMNS: &str = "id, name, provider_type, channel, config, \
     credentials IS NOT NULL AS has_credentials, credentials_key_id, priority, is_default, \
     status, retry_strategy, max_retries, rate_limit_per_second, rate_limit_per_minute, \
     tenant_id, created_at, updated_at";

/// Repository of the `providers` table.
#[derive(Clone)]
pub struct ProviderStore {
    pool: PgPool,
}

impl ProviderStore {
    pub fn new(pool: PgPool) -> Self {
        ProviderStore { pool }
    }

    /// The pool (the refresh task listens for changes on it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Validates and inserts `p`, encrypting its credentials with `cipher`.
    pub async fn create(
        &self,
        p: NewProvider,
        cipher: &Cipher,
    ) -> Result<ProviderRow, ProviderStoreError> {
        validate_name(&p.name)?;
        let (name, credentials, draft) = p.into_draft();
        let v = validate(draft)?;
        let sealed = match &credentials {
            Some(c) => {
                validate_credentials(c)?;
                Some(cipher.seal_text(&name, c)?)
            }
            None => None,
        };
        let row = sqlx::query(&format!(
            "INSERT INTO providers (name, provider_type, channel, config, credentials,
                credentials_key_id, priority, is_default, status, retry_strategy, max_retries,
                rate_limit_per_second, rate_limit_per_minute, tenant_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
             RETURNING {ROW_COLUMNS}"
        ))
        .bind(&name)
        .bind(v.provider_type.as_str())
        .bind(v.channel.as_str())
        .bind(&v.config)
        .bind(sealed.as_ref().map(|s| s.bytes.as_slice()))
        .bind(sealed.as_ref().map(|s| s.key_id.as_str()))
        .bind(v.priority)
        .bind(v.is_default)
        .bind(v.status.as_str())
        .bind(v.retry_strategy.as_str())
        .bind(v.max_retries)
        .bind(v.rate_limit_per_second)
        .bind(v.rate_limit_per_minute)
        .bind(&v.tenant_id)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| unique_violation(e, &name))?;
        read_row(&row)
    }

    /// Applies `patch` to the provider called `name` (validating the
    /// result as a whole) and returns it; an empty patch writes nothing. New credentials are encrypted with
    /// `cipher`; unchanged ones stay as stored.
    pub async fn update(
        &self,
        name: &str,
        patch: ProviderPatch,
        cipher: &Cipher,
    ) -> Result<ProviderRow, ProviderStoreError> {
        if patch.is_empty() {
            // Nothing to write: no new version, no reload anywhere.
            return self.get(name).await;
        }
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM providers WHERE name = $1 FOR UPDATE"
        ))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ProviderStoreError::NotFound(name.to_string()))?;
        let cur = read_row(&row)?;
        let provider_type = patch.provider_type.unwrap_or(cur.provider_type);
        // A new type without a channel takes the type's channel.
        let channel = match (patch.channel, patch.provider_type) {
            (Some(c), _) => Some(c),
            (None, Some(_)) => None,
            (None, None) => Some(cur.channel),
        };
        let v = validate(Draft {
            provider_type,
            channel,
            config: patch.config.unwrap_or(cur.config),
            priority: patch.priority.unwrap_or(cur.priority),
            is_default: patch.is_default.unwrap_or(cur.is_default),
            status: patch.status.unwrap_or(cur.status),
            retry_strategy: patch.retry_strategy.unwrap_or(cur.retry_strategy),
            max_retries: patch.max_retries.unwrap_or(cur.max_retries),
            rate_limit_per_second: patch
                .rate_limit_per_second
                .unwrap_or(cur.rate_limit_per_second),
            rate_limit_per_minute: patch
                .rate_limit_per_minute
                .unwrap_or(cur.rate_limit_per_minute),
            tenant_id: patch.tenant_id.unwrap_or(cur.tenant_id),
        })?;
        // (change credentials?, new sealed value)
        let (set_credentials, sealed) = match &patch.credentials {
            None => (false, None),
            Some(None) => (true, None),
            Some(Some(c)) => {
                validate_credentials(c)?;
                (true, Some(cipher.seal_text(name, c)?))
            }
        };
        let row = sqlx::query(&format!(
            "UPDATE providers SET provider_type = $2, channel = $3, config = $4,
                credentials = CASE WHEN $5 THEN $6 ELSE credentials END,
                credentials_key_id = CASE WHEN $5 THEN $7 ELSE credentials_key_id END,
                priority = $8, is_default = $9, status = $10, retry_strategy = $11,
                max_retries = $12, rate_limit_per_second = $13, rate_limit_per_minute = $14,
                tenant_id = $15
             WHERE name = $1
             RETURNING {ROW_COLUMNS}"
        ))
        .bind(name)
        .bind(v.provider_type.as_str())
        .bind(v.channel.as_str())
        .bind(&v.config)
        .bind(set_credentials)
        .bind(sealed.as_ref().map(|s| s.bytes.as_slice()))
        .bind(sealed.as_ref().map(|s| s.key_id.as_str()))
        .bind(v.priority)
        .bind(v.is_default)
        .bind(v.status.as_str())
        .bind(v.retry_strategy.as_str())
        .bind(v.max_retries)
        .bind(v.rate_limit_per_second)
        .bind(v.rate_limit_per_minute)
        .bind(&v.tenant_id)
        .fetch_one(&mut *tx)
        .await?;
        let out = read_row(&row)?;
        tx.commit().await?;
        Ok(out)
    }

    /// Sets the status of the provider called `name`.
    pub async fn set_status(
        &self,
        name: &str,
        status: ProviderStatus,
    ) -> Result<ProviderRow, ProviderStoreError> {
        let row = sqlx::query(&format!(
            "UPDATE providers SET status = $2 WHERE name = $1 RETURNING {ROW_COLUMNS}"
        ))
        .bind(name)
        .bind(status.as_str())
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| ProviderStoreError::NotFound(name.to_string()))?;
        read_row(&row)
    }

    /// Deletes the provider called `name`.
    pub async fn delete(&self, name: &str) -> Result<(), ProviderStoreError> {
        let done = sqlx::query("DELETE FROM providers WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(ProviderStoreError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// The provider called `name`, without credentials.
    pub async fn get(&self, name: &str) -> Result<ProviderRow, ProviderStoreError> {
        let row = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM providers WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| ProviderStoreError::NotFound(name.to_string()))?;
        read_row(&row)
    }

    /// Every provider, without credentials, by channel, tenant (global
    /// first), priority and name.
    pub async fn list(&self) -> Result<Vec<ProviderRow>, ProviderStoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM providers
             ORDER BY channel, tenant_id NULLS FIRST, priority, name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(read_row).collect()
    }

    /// Every provider with credentials decrypted. A row that cannot be read
    /// or decrypted is left out and reported in the second list (naming the
    /// provider, never the secret); a database failure is an error.
    pub async fn load_specs(
        &self,
        cipher: &Cipher,
    ) -> Result<(Vec<StoredSpec>, Vec<LoadError>), ProviderStoreError> {
        let mut specs = Vec::new();
        let mut errors = Vec::new();
        for item in self.load_all(cipher).await? {
            match item {
                Loaded::Spec(s) => specs.push(s),
                Loaded::Failed { error, .. } => errors.push(error),
            }
        }
        Ok((specs, errors))
    }

    /// Every provider, by name: its spec, or why it cannot be used together
    /// with what could be read of it.
    pub async fn load_all(&self, cipher: &Cipher) -> Result<Vec<Loaded>, ProviderStoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS}, credentials FROM providers ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            match read_spec(row, cipher) {
                Ok(s) => out.push(Loaded::Spec(s)),
                Err(e) => {
                    let name: String = row.try_get("name").unwrap_or_default();
                    tracing::warn!(provider = %name, error = %e, "provider not loaded");
                    let readable = read_row(row).ok();
                    out.push(Loaded::Failed {
                        error: LoadError {
                            provider: name,
                            message: e.to_string(),
                            updated_at: readable.as_ref().map(|r| r.updated_at),
                        },
                        row: readable.map(Box::new),
                    });
                }
            }
        }
        Ok(out)
    }

    /// The provider called `name` with credentials decrypted.
    pub async fn load_spec(
        &self,
        name: &str,
        cipher: &Cipher,
    ) -> Result<StoredSpec, ProviderStoreError> {
        let row = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS}, credentials FROM providers WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| ProviderStoreError::NotFound(name.to_string()))?;
        read_spec(&row, cipher)
    }
}

fn unique_violation(e: sqlx::Error, name: &str) -> ProviderStoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            ProviderStoreError::Duplicate(name.to_string())
        }
        _ => ProviderStoreError::Database(e),
    }
}

fn read_row(row: &PgRow) -> Result<ProviderRow, ProviderStoreError> {
    let name: String = row.try_get("name")?;
    let corrupt = |message: String| ProviderStoreError::Corrupt {
        name: name.clone(),
        message,
    };
    let ty: String = row.try_get("provider_type")?;
    let channel: String = row.try_get("channel")?;
    let status: String = row.try_get("status")?;
    let retry: String = row.try_get("retry_strategy")?;
    let nonneg =
        |field: &str, v: i32| u32::try_from(v).map_err(|_| corrupt(format!("{field} is negative")));
    let opt = |field: &str, v: Option<i32>| v.map(|v| nonneg(field, v)).transpose();
    Ok(ProviderRow {
        id: row.try_get("id")?,
        provider_type: ProviderType::parse(&ty)
            .ok_or_else(|| corrupt(format!("unknown provider type {ty:?}")))?,
        channel: Channel::parse(&channel)
            .ok_or_else(|| corrupt(format!("unknown channel {channel:?}")))?,
        config: row.try_get("config")?,
        has_credentials: row.try_get("has_credentials")?,
        credentials_key_id: row.try_get("credentials_key_id")?,
        priority: row.try_get("priority")?,
        is_default: row.try_get("is_default")?,
        status: ProviderStatus::parse(&status)
            .ok_or_else(|| corrupt(format!("unknown status {status:?}")))?,
        retry_strategy: RetryStrategy::parse(&retry)
            .ok_or_else(|| corrupt(format!("unknown retry strategy {retry:?}")))?,
        max_retries: nonneg("max_retries", row.try_get("max_retries")?)?,
        rate_limit_per_second: opt(
            "rate_limit_per_second",
            row.try_get("rate_limit_per_second")?,
        )?,
        rate_limit_per_minute: opt(
            "rate_limit_per_minute",
            row.try_get("rate_limit_per_minute")?,
        )?,
        tenant_id: row.try_get("tenant_id")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        name,
    })
}

/// A row with `credentials` selected as a spec, credentials decrypted.
fn read_spec(row: &PgRow, cipher: &Cipher) -> Result<StoredSpec, ProviderStoreError> {
    let r = read_row(row)?;
    if r.channel != r.provider_type.channel() {
        return Err(ProviderStoreError::Corrupt {
            name: r.name,
            message: format!(
                "channel {} does not match type {}",
                r.channel,
                r.provider_type.as_str()
            ),
        });
    }
    let sealed: Option<Vec<u8>> = row.try_get("credentials")?;
    let credentials = match sealed {
        None => SecretString::from("{}"),
        Some(bytes) => cipher.open_text(&r.name, &bytes).map_err(|e| {
            // Say which key the value needs when it is not ours.
            match (&e, &r.credentials_key_id, cipher.key_id()) {
                (CryptoError::Decrypt, Some(stored), Some(ours)) if stored != ours => {
                    ProviderStoreError::Corrupt {
                        name: r.name.clone(),
                        message: format!(
                            "credentials were encrypted with key {stored}, the configured key is {ours}"
                        ),
                    }
                }
                _ => ProviderStoreError::Crypto(e),
            }
        })?,
    };
    Ok(StoredSpec {
        updated_at: r.updated_at,
        spec: r.into_spec(credentials),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "sendgrid-main", "smtp_eu.1", &"x".repeat(64)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Upper", "has space", "ümlaut", "a/b", &"x".repeat(65)] {
            assert!(
                matches!(
                    validate_name(bad),
                    Err(ProviderStoreError::Invalid { field: "name", .. })
                ),
                "{bad}"
            );
        }
    }

    fn check(p: NewProvider) -> Result<Valid, ProviderStoreError> {
        validate(p.into_draft().2)
    }

    fn field(r: Result<Valid, ProviderStoreError>) -> &'static str {
        match r {
            Err(ProviderStoreError::Invalid { field, .. }) => field,
            Err(e) => panic!("{e}"),
            Ok(_) => "ok",
        }
    }

    #[test]
    fn fields() {
        let base = NewProvider::new("p", ProviderType::Twilio);
        assert_eq!(check(base.clone()).unwrap().channel, Channel::Sms);
        let mut p = base.clone();
        p.channel = Some(Channel::Email);
        assert_eq!(field(check(p)), "channel");
        let mut p = base.clone();
        p.channel = Some(Channel::Sms);
        assert_eq!(field(check(p)), "ok");
        let mut p = base.clone();
        p.config = serde_json::json!([1]);
        assert_eq!(field(check(p)), "config");
        let mut p = base.clone();
        p.rate_limit_per_second = Some(0);
        assert_eq!(field(check(p)), "rate_limit_per_second");
        let mut p = base.clone();
        p.rate_limit_per_minute = Some(u32::MAX);
        assert_eq!(field(check(p)), "rate_limit_per_minute");
        let mut p = base.clone();
        p.max_retries = u32::MAX;
        assert_eq!(field(check(p)), "max_retries");
        let mut p = base;
        p.tenant_id = Some(String::new());
        assert_eq!(field(check(p)), "tenant_id");
    }

    #[test]
    fn credentials_must_be_an_object_and_errors_do_not_echo_them() {
        assert!(validate_credentials(&SecretString::from(r#"{"k":"v"}"#)).is_ok());
        for bad in [
            r#""hunter2""#,
            "[\"hunter2\"]",
            "hunter2",
            "{\"k\": hunter2}",
        ] {
            let e = validate_credentials(&SecretString::from(bad)).unwrap_err();
            assert!(!e.to_string().contains("hunter2"), "{e}");
            assert!(matches!(
                e,
                ProviderStoreError::Invalid {
                    field: "credentials",
                    ..
                }
            ));
        }
    }

    #[test]
    fn debug_hides_credentials() {
        let mut p = NewProvider::new("p", ProviderType::Sendgrid);
        p.credentials = Some(SecretString::from("{\"api_key\":\"hunter2\"}"));
        assert!(!format!("{p:?}").contains("hunter2"));
        let patch = ProviderPatch {
            credentials: p.credentials.clone().map(Some),
            ..Default::default()
        };
        assert!(!format!("{patch:?}").contains("hunter2"));
        assert!(!patch.is_empty());
        assert!(ProviderPatch::default().is_empty());
    }
}
