//! Bearer API keys: creation (the token is shown once, only its SHA-256 is
//! stored), lookup per request, and the role checks.
//!
//! Roles: `admin` may do everything; `service` may submit notifications and
//! read notifications and delivery logs (of its tenant when the key is bound
//! to one); `user` is bound to a tenant and user id and may only read its own
//! notifications, delivery logs and preferences. No or an unknown/revoked
//! token → 401; a role that may not → 403.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::ApiState;
use super::problem::Problem;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Service,
    User,
}

impl Role {
    /// The database spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Service => "service",
            Role::User => "user",
        }
    }

    /// Parses the database spelling.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "service" => Role::Service,
            "user" => Role::User,
            _ => return None,
        })
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key's public id (`key_…`), for logs.
    pub key_id: String,
    pub role: Role,
    /// Service: optional tenant binding; user: the tenant (may be none).
    pub tenant_id: Option<String>,
    /// User keys only.
    pub user_id: Option<String>,
}

impl Principal {
    /// 403 unless the key has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), Problem> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "a {} key may not do this",
                self.role.as_str()
            )))
        }
    }

    /// Admin, or a user key of exactly (`tenant`, `user`): the rule of
    /// per-user resources (preferences, inbox). `what` names the resource
    /// in the 403.
    pub fn require_own(&self, tenant: Option<&str>, user: &str, what: &str) -> Result<(), Problem> {
        match self.role {
            Role::Admin => Ok(()),
            Role::User if self.may_see(tenant, Some(user)) => Ok(()),
            Role::User => Err(Problem::forbidden(format!(
                "a user key may only access its own {what}"
            ))),
            Role::Service => Err(Problem::forbidden(format!(
                "a service key may not access {what}"
            ))),
        }
    }

    /// Whether this caller may see data of (`tenant`, `user`).
    pub fn may_see(&self, tenant: Option<&str>, user: Option<&str>) -> bool {
        match self.role {
            Role::Admin => true,
            Role::Service => self.tenant_id.is_none() || self.tenant_id.as_deref() == tenant,
            Role::User => self.tenant_id.as_deref() == tenant && self.user_id.as_deref() == user,
        }
    }
}

/// SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// A created key: the token is returned here and never again.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub id: String,
    pub token: String,
}

/// Why a key cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a user key needs a user id")]
    UserWithoutUserId,
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Creates a key with `role`. `user_id` is required for (and only kept by)
/// user keys; `tenant_id` binds user and service keys.
pub async fn create_key(
    pool: &PgPool,
    role: Role,
    tenant_id: Option<&str>,
    user_id: Option<&str>,
    name: Option<&str>,
) -> Result<CreatedKey, KeyError> {
    if role == Role::User && user_id.is_none() {
        return Err(KeyError::UserWithoutUserId);
    }
    let user_id = if role == Role::User { user_id } else { None };
    let tenant_id = if role == Role::Admin { None } else { tenant_id };
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!(
        "hrld_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let id = format!("key_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    sqlx::query(
        "INSERT INTO api_keys (id, token_sha256, role, tenant_id, user_id, name)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&id)
    .bind(hash_token(&token))
    .bind(role.as_str())
    .bind(tenant_id)
    .bind(user_id)
    .bind(name)
    .execute(pool)
    .await?;
    Ok(CreatedKey { id, token })
}

/// Revokes a key by id; false when there is no such active key.
pub async fn revoke_key(pool: &PgPool, id: &str) -> Result<bool, sqlx::Error> {
    let r =
        sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .execute(pool)
            .await?;
    Ok(r.rows_affected() == 1)
}

impl FromRequestParts<ApiState> for Principal {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| Problem::unauthorized("missing bearer token"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or_else(|| {
                Problem::unauthorized("the Authorization header is not `Bearer <token>`")
            })?;
        let row: Option<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT id, role, tenant_id, user_id FROM api_keys
             WHERE token_sha256 = $1 AND revoked_at IS NULL",
        )
        .bind(hash_token(token))
        .fetch_optional(&state.pool)
        .await?;
        let (key_id, role, tenant_id, user_id) =
            row.ok_or_else(|| Problem::unauthorized("unknown or revoked token"))?;
        let role =
            Role::parse(&role).ok_or_else(|| Problem::internal(&"api key with unknown role"))?;
        Ok(Principal {
            key_id,
            role,
            tenant_id,
            user_id,
        })
    }
}
