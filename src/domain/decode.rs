//! Raw bytes → [`NotificationRequest`]: size check, JSON parse, CloudEvents
//! unwrap, JSON Schema validation, then parsing into domain types.
//!
//! PLACEHOLDER: being written.

use super::request::NotificationRequest;

/// Bounded set of reasons a request is rejected (`herald-error-code` header,
/// `error.code` of the `rejected` outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeErrorCode {
    TooLarge,
    InvalidJson,
    SchemaViolation,
    InvalidAddress,
    InvalidField,
}

impl DecodeErrorCode {
    pub fn as_str(&self) -> &'static str {
        match self {
            DecodeErrorCode::TooLarge => "too_large",
            DecodeErrorCode::InvalidJson => "invalid_json",
            DecodeErrorCode::SchemaViolation => "schema_violation",
            DecodeErrorCode::InvalidAddress => "invalid_address",
            DecodeErrorCode::InvalidField => "invalid_field",
        }
    }
}

/// Why a request could not be decoded. Carries the request id when one
/// could be read, so a `rejected` outcome can name it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct DecodeError {
    pub code: DecodeErrorCode,
    pub message: String,
    pub request_id: Option<String>,
    pub tenant_id: Option<String>,
    pub correlation_id: Option<String>,
}

/// Decodes one Kafka message payload.
pub fn decode_request(
    _bytes: &[u8],
    _max_bytes: usize,
) -> Result<NotificationRequest, DecodeError> {
    todo!()
}
