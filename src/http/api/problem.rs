//! RFC 9457 problem documents (`application/problem+json`): every API error,
//! and the request-body helpers that turn bad input into one (413, 422
//! naming the field).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::templates::{FieldError, TemplateStoreError};

/// One invalid field of a 422.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InvalidParam {
    /// Dotted path of the field (`channel`, `data.name`, `recipient.email`).
    pub name: String,
    pub reason: String,
}

/// An API error as a problem document.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// `https://herald.dev/problems/<slug>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Present on 422: the fields that failed.
    #[serde(rename = "invalid-params", skip_serializing_if = "Vec::is_empty")]
    pub invalid_params: Vec<InvalidParam>,
}

impl Problem {
    /// A problem with `status`, a slug for `type` and a title.
    pub fn new(status: StatusCode, slug: &str, title: &str, detail: impl Into<String>) -> Self {
        Problem {
            kind: format!("https://herald.dev/problems/{slug}"),
            title: title.to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            invalid_params: Vec::new(),
        }
    }

    /// 401: no or an unknown bearer token.
    pub fn unauthorized(detail: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail,
        )
    }

    /// 403: the key's role or binding does not allow this.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 409.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", "Conflict", detail)
    }

    /// 422 naming `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        let name = field.into();
        let reason = reason.into();
        let mut p = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "Invalid request",
            format!("{name}: {reason}"),
        );
        p.invalid_params.push(InvalidParam { name, reason });
        p
    }

    /// 501: a feature that depends on another part of Herald not built yet.
    pub fn not_implemented(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            "not-implemented",
            "Not implemented",
            detail,
        )
    }

    /// 503: a dependency (broker) did not answer.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            detail,
        )
    }

    /// 500. The cause is logged, not returned.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "API request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the request failed; see the server log",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<crate::store::StoreError> for Problem {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Database(e) => Problem::from(e),
            other => Problem::internal(&other),
        }
    }
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Self {
        Problem::internal(&e)
    }
}

impl From<FieldError> for Problem {
    fn from(e: FieldError) -> Self {
        Problem::invalid(e.field, e.message)
    }
}

impl From<TemplateStoreError> for Problem {
    fn from(e: TemplateStoreError) -> Self {
        match e {
            TemplateStoreError::NotFound => Problem::not_found("no such template or version"),
            TemplateStoreError::Conflict(m) => Problem::conflict(m),
            TemplateStoreError::Invalid(f) => f.into(),
            other => Problem::internal(&other),
        }
    }
}

/// The raw request body, bounded by the router's body limit; too large → 413
/// problem. Handlers parse it with [`parse_json`] after checking the role, so
/// a caller without the right role gets 403 whatever it sent.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(RawBody(b)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "Request body too large",
                "the request body is larger than api.max_body_bytes",
            )),
            Err(e) => Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "Bad request",
                e.body_text(),
            )),
        }
    }
}

/// Parses a JSON body; a failure is a 422 naming the field serde names
/// (`missing field `key``, `unknown field `x``), else `body`.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        let field = msg
            .split('`')
            .nth(1)
            .filter(|f| msg.contains("field `") && !f.is_empty())
            .unwrap_or("body")
            .to_string();
        Problem::invalid(field, msg)
    })
}

/// The field a decoder message starts with (`/recipient/email: …` →
/// `recipient.email`), else `body`.
pub fn field_of(message: &str) -> String {
    match message.split_once(": ") {
        Some((p, _)) if !p.is_empty() && !p.contains(char::is_whitespace) => {
            let f = p.trim_start_matches('/').replace('/', ".");
            if f.is_empty() { "body".into() } else { f }
        }
        _ => "body".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct B {
            key: String,
        }
        let p = parse_json::<B>(b"{}").unwrap_err();
        assert_eq!(p.status, 422);
        assert_eq!(p.invalid_params[0].name, "key");
        let p = parse_json::<B>(br#"{"key":"a","x":1}"#).unwrap_err();
        assert_eq!(p.invalid_params[0].name, "x");
        let p = parse_json::<B>(b"nope").unwrap_err();
        assert_eq!(p.invalid_params[0].name, "body");
    }

    #[test]
    fn decoder_paths_become_fields() {
        assert_eq!(field_of("/recipient/email: bad"), "recipient.email");
        assert_eq!(field_of("meta.cc[0]: invalid"), "meta.cc[0]");
        assert_eq!(field_of("not valid JSON: x"), "body");
    }
}
