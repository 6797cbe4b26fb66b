//! Raw bytes → [`NotificationRequest`]: the one place a request payload is
//! checked and parsed. Owns the request decoder, the two embedded wire
//! contracts (`schemas/notification-request.v1.json`,
//! `schemas/delivery-status.v1.json`) compiled once, and the bounded set of
//! rejection codes ([`DecodeErrorCode`]).
//!
//! [`decode_request`] runs these steps in order and never panics:
//! 1. size: more than `max_bytes` → `too_large`;
//! 2. UTF-8 and JSON (serde_json's recursion limit of 128 turns deep nesting
//!    into an error, not a stack overflow) → `invalid_json`;
//! 3. CloudEvents structured mode: a top-level object with `specversion` is an
//!    event envelope; its `data` object is the request. When `data` has no
//!    `id`, the event's `id` becomes the request id (a CloudEvents id is
//!    unique per source, and a re-sent event keeps it, so it works as the
//!    idempotency key). Other envelope attributes are ignored; `data_base64`
//!    is refused → `schema_violation`;
//! 4. `id`, `tenant_id` and `correlation_id` are read (when they are valid
//!    identifiers) so that every later [`DecodeError`] can carry them for the
//!    `rejected` outcome;
//! 5. JSON Schema validation → `schema_violation` (messages name the JSON
//!    pointer of the first few errors and never echo input values);
//! 6. parsing into domain types: addresses → `invalid_address`, a recipient
//!    without the channel's address → `missing_address`, headers, subject,
//!    U+0000, timestamps → `invalid_field`.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::outcome::{DeliveryStatusEvent, ErrorInfo, Status};
use super::recipient::{EmailAddress, PhoneNumber, Recipient, WebhookUrl};
use super::request::{
    Channel, Content, InlineContent, Meta, NotificationRequest, Priority, TemplateRef,
};

/// The request contract, embedded so the binary needs no files at run time.
pub const REQUEST_SCHEMA: &str = include_str!("../../schemas/notification-request.v1.json");

/// The outcome-event contract, embedded like [`REQUEST_SCHEMA`].
pub const DELIVERY_STATUS_SCHEMA: &str = include_str!("../../schemas/delivery-status.v1.json");

/// How many schema errors a rejection message lists.
const MAX_SCHEMA_ERRORS: usize = 3;

/// Upper bound of a [`DecodeError`] message, in characters (it travels in a
/// Kafka header and an outcome event).
const MAX_MESSAGE_CHARS: usize = 1000;

/// Longest identifier (`id`, `tenant_id`, `correlation_id`) carried by a
/// [`DecodeError`]; same bound as the schema.
const MAX_IDENTIFIER_CHARS: usize = 200;

/// Bounded set of reasons a request is rejected (`herald-error-code` header,
/// `error.code` of the `rejected` outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeErrorCode {
    /// The payload is larger than the configured maximum.
    TooLarge,
    /// Not UTF-8, not JSON, or nested deeper than 128 levels.
    InvalidJson,
    /// Valid JSON that does not match `notification-request.v1.json` (or a
    /// malformed CloudEvents envelope).
    SchemaViolation,
    /// An email address, phone number or url that does not parse.
    InvalidAddress,
    /// A recipient lacks the address its channel needs.
    MissingAddress,
    /// A field the schema admits but Herald refuses (header names/values,
    /// CR/LF in the subject, U+0000, `expires_at` before `scheduled_at`).
    InvalidField,
}

impl DecodeErrorCode {
    /// The wire spelling: snake_case, from a fixed set (a metrics label).
    pub fn as_str(&self) -> &'static str {
        match self {
            DecodeErrorCode::TooLarge => "too_large",
            DecodeErrorCode::InvalidJson => "invalid_json",
            DecodeErrorCode::SchemaViolation => "schema_violation",
            DecodeErrorCode::InvalidAddress => "invalid_address",
            DecodeErrorCode::MissingAddress => "missing_address",
            DecodeErrorCode::InvalidField => "invalid_field",
        }
    }
}

/// Why a request could not be decoded. Carries the request id when one
/// could be read, so a `rejected` outcome can name it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct DecodeError {
    /// The bounded reason.
    pub code: DecodeErrorCode,
    /// Human-readable detail, at most 1000 characters, without control
    /// characters and without input values (addresses are never echoed).
    pub message: String,
    /// The request's `id`, when it could be read and is a valid identifier.
    pub request_id: Option<String>,
    /// The request's `tenant_id`, under the same condition.
    pub tenant_id: Option<String>,
    /// The request's `correlation_id`, under the same condition.
    pub correlation_id: Option<String>,
}

impl DecodeError {
    fn new(code: DecodeErrorCode, message: impl AsRef<str>) -> Self {
        DecodeError {
            code,
            message: bounded_message(message.as_ref()),
            request_id: None,
            tenant_id: None,
            correlation_id: None,
        }
    }

    fn with_ids(mut self, ids: &Ids) -> Self {
        self.request_id = ids.id.clone();
        self.tenant_id = ids.tenant_id.clone();
        self.correlation_id = ids.correlation_id.clone();
        self
    }

    /// The `rejected` outcome event for this error: `notification_id` and
    /// `request_id` are the request id when known, `error.code` is
    /// [`DecodeErrorCode::as_str`], not retryable, attempt 0.
    pub fn to_rejected_event(&self) -> DeliveryStatusEvent {
        let mut e = DeliveryStatusEvent::new(Status::Rejected);
        e.notification_id = self.request_id.clone();
        e.request_id = self.request_id.clone();
        e.tenant_id = self.tenant_id.clone();
        e.correlation_id = self.correlation_id.clone();
        e.reason = Some(self.code.as_str().to_string());
        e.error = Some(ErrorInfo {
            code: self.code.as_str().to_string(),
            message: self.message.clone(),
            retryable: false,
        });
        e
    }
}

/// Replaces control characters and cuts to [`MAX_MESSAGE_CHARS`].
fn bounded_message(m: &str) -> String {
    let mut out = String::with_capacity(m.len().min(MAX_MESSAGE_CHARS));
    for (i, c) in m.chars().enumerate() {
        if i == MAX_MESSAGE_CHARS {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { '?' } else { c });
    }
    out
}

/// Compiled validators; an `Err` only if an embedded schema is broken, which
/// [`check_schemas`] reports at start-up and the tests rule out.
static REQUEST_VALIDATOR: LazyLock<Result<jsonschema::Validator, String>> =
    LazyLock::new(|| compile(REQUEST_SCHEMA, "notification-request.v1.json"));
static STATUS_VALIDATOR: LazyLock<Result<jsonschema::Validator, String>> =
    LazyLock::new(|| compile(DELIVERY_STATUS_SCHEMA, "delivery-status.v1.json"));

fn compile(text: &str, name: &str) -> Result<jsonschema::Validator, String> {
    let schema: Value =
        serde_json::from_str(text).map_err(|e| format!("schema {name} is not JSON: {e}"))?;
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .map_err(|e| format!("schema {name} does not compile: {e}"))
}

/// Compiles both embedded schemas now. Call it once at start-up so a broken
/// schema fails the process instead of rejecting every request.
pub fn check_schemas() -> Result<(), String> {
    REQUEST_VALIDATOR.as_ref().map_err(Clone::clone)?;
    STATUS_VALIDATOR.as_ref().map_err(Clone::clone)?;
    Ok(())
}

/// The first few schema errors as `pointer: message`, input values masked;
/// `None` when `instance` is valid.
fn schema_errors(validator: &jsonschema::Validator, instance: &Value) -> Option<String> {
    // The common case, valid, without collecting errors.
    if validator.is_valid(instance) {
        return None;
    }
    let mut parts = Vec::new();
    let mut more = false;
    for (i, e) in validator.iter_errors(instance).enumerate() {
        if i == MAX_SCHEMA_ERRORS {
            more = true;
            break;
        }
        let path = e.instance_path().to_string();
        let path = if path.is_empty() {
            "/".to_string()
        } else {
            path
        };
        parts.push(format!("{path}: {}", e.masked()));
    }
    if parts.is_empty() {
        return None;
    }
    let mut m = parts.join("; ");
    if more {
        m.push_str("; …");
    }
    Some(m)
}

/// Validates an outcome event against `delivery-status.v1.json`. The error
/// lists the first few violations with their JSON pointers.
pub fn validate_delivery_status(v: &Value) -> Result<(), String> {
    let validator = STATUS_VALIDATOR.as_ref().map_err(Clone::clone)?;
    match schema_errors(validator, v) {
        None => Ok(()),
        Some(m) => Err(bounded_message(&m)),
    }
}

/// Identifiers read before validation so a rejection can name the request.
#[derive(Debug, Default)]
struct Ids {
    id: Option<String>,
    tenant_id: Option<String>,
    correlation_id: Option<String>,
}

impl Ids {
    fn read(obj: &Map<String, Value>) -> Ids {
        let get = |k: &str| {
            obj.get(k)
                .and_then(Value::as_str)
                .filter(|s| is_identifier(s))
                .map(str::to_string)
        };
        Ids {
            id: get("id"),
            tenant_id: get("tenant_id"),
            correlation_id: get("correlation_id"),
        }
    }
}

/// Same rule as the schema's `identifier`: 1..=200 characters, no control
/// characters.
fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars().count() <= MAX_IDENTIFIER_CHARS
        && !s.chars().any(|c| c.is_ascii_control())
}

/// A cancel request (`"kind": "cancel"`): cancels the waiting notifications
/// of request `cancels` and/or of every request with `correlation_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct CancelRequest {
    /// The cancel request's own id.
    pub id: String,
    pub tenant_id: Option<String>,
    pub cancels: Option<String>,
    pub correlation_id: Option<String>,
}

/// What one request-topic message asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// Deliver a notification (the default kind).
    Notify(Box<NotificationRequest>),
    /// Cancel waiting notifications.
    Cancel(CancelRequest),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireCancel {
    id: String,
    #[allow(dead_code)]
    kind: String,
    tenant_id: Option<String>,
    cancels: Option<String>,
    correlation_id: Option<String>,
}

/// Decodes a request that must be a notification (not a cancel). See
/// [`decode_message`].
pub fn decode_request(bytes: &[u8], max_bytes: usize) -> Result<NotificationRequest, DecodeError> {
    match decode_message(bytes, max_bytes)? {
        Decoded::Notify(r) => Ok(*r),
        Decoded::Cancel(c) => {
            let mut e = DecodeError::new(
                DecodeErrorCode::SchemaViolation,
                "/kind: a cancel request where a notification was expected",
            );
            e.request_id = Some(c.id);
            Err(e)
        }
    }
}

/// Decodes one Kafka message payload of at most `max_bytes` bytes
/// (`pipeline.max_request_bytes`). See the module docs for the steps.
pub fn decode_message(bytes: &[u8], max_bytes: usize) -> Result<Decoded, DecodeError> {
    use DecodeErrorCode as C;

    if bytes.len() > max_bytes {
        return Err(DecodeError::new(
            C::TooLarge,
            format!("payload is {} bytes, the limit is {max_bytes}", bytes.len()),
        ));
    }

    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| DecodeError::new(C::InvalidJson, format!("not valid JSON: {e}")))?;
    let Value::Object(top) = value else {
        return Err(DecodeError::new(
            C::SchemaViolation,
            "/: the request must be a JSON object",
        ));
    };

    let obj = unwrap_cloudevent(top)?;
    let ids = Ids::read(&obj);
    if obj.get("kind").and_then(Value::as_str) == Some("cancel") {
        return decode_cancel(obj, &ids).map(Decoded::Cancel);
    }
    // The schema says this too, but its `oneOf` message is vague.
    for (a, b) in [("recipient", "recipients"), ("template", "content")] {
        if obj.contains_key(a) == obj.contains_key(b) {
            return Err(DecodeError::new(
                C::SchemaViolation,
                format!("/: exactly one of `{a}` and `{b}` is required"),
            )
            .with_ids(&ids));
        }
    }
    let value = Value::Object(obj);

    let validator = REQUEST_VALIDATOR
        .as_ref()
        .map_err(|e| DecodeError::new(C::SchemaViolation, e).with_ids(&ids))?;
    if let Some(m) = schema_errors(validator, &value) {
        return Err(DecodeError::new(C::SchemaViolation, m).with_ids(&ids));
    }

    if let Some(path) = find_nul(&value) {
        return Err(DecodeError::new(
            C::InvalidField,
            format!("{path}: contains the character U+0000"),
        )
        .with_ids(&ids));
    }

    let wire: WireRequest = serde_json::from_value(value).map_err(|e| {
        DecodeError::new(
            C::SchemaViolation,
            format!("does not match the request structure: {e}"),
        )
        .with_ids(&ids)
    })?;
    wire.into_domain()
        .map(|r| Decoded::Notify(Box::new(r)))
        .map_err(|e| e.with_ids(&ids))
}

fn decode_cancel(obj: Map<String, Value>, ids: &Ids) -> Result<CancelRequest, DecodeError> {
    let value = Value::Object(obj);
    let validator = REQUEST_VALIDATOR
        .as_ref()
        .map_err(|e| DecodeError::new(DecodeErrorCode::SchemaViolation, e).with_ids(ids))?;
    if let Some(m) = schema_errors(validator, &value) {
        return Err(DecodeError::new(DecodeErrorCode::SchemaViolation, m).with_ids(ids));
    }
    let w: WireCancel = serde_json::from_value(value).map_err(|e| {
        DecodeError::new(
            DecodeErrorCode::SchemaViolation,
            format!("does not match the cancel structure: {e}"),
        )
        .with_ids(ids)
    })?;
    Ok(CancelRequest {
        id: w.id,
        tenant_id: w.tenant_id,
        cancels: w.cancels,
        correlation_id: w.correlation_id,
    })
}

/// CloudEvents structured mode: returns the request object inside the
/// envelope, or `top` itself when it is no envelope.
fn unwrap_cloudevent(mut top: Map<String, Value>) -> Result<Map<String, Value>, DecodeError> {
    if !top.contains_key("specversion") {
        return Ok(top);
    }
    let event_id = top
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| is_identifier(s))
        .map(str::to_string);
    let fail = |m: &str| {
        let mut e = DecodeError::new(DecodeErrorCode::SchemaViolation, m);
        e.request_id = event_id.clone();
        e
    };
    match top.get("specversion").and_then(Value::as_str) {
        Some(v) if v.starts_with("1.") => {}
        _ => return Err(fail("/specversion: only CloudEvents 1.x is supported")),
    }
    if top.contains_key("data_base64") {
        return Err(fail(
            "/data_base64: binary CloudEvents data is not supported, use `data`",
        ));
    }
    let mut data = match top.remove("data") {
        Some(Value::Object(data)) => data,
        Some(_) => return Err(fail("/data: must be a JSON object (the request)")),
        None => return Err(fail("/data: a CloudEvent request needs `data`")),
    };
    if !data.contains_key("id")
        && let Some(id) = top.remove("id")
    {
        data.insert("id".to_string(), id);
    }
    Ok(data)
}

/// The JSON pointer of the first string or key containing U+0000, which
/// PostgreSQL cannot store in `text` or `jsonb`. Depth is bounded by the
/// JSON parser (128).
fn find_nul(v: &Value) -> Option<String> {
    let mut path = Vec::new();
    nul_path(v, &mut path).then(|| {
        let mut pointer = String::new();
        for segment in path.iter().rev() {
            pointer.push('/');
            pointer.push_str(segment);
        }
        pointer_or_root(&pointer)
    })
}

/// Whether `v` holds a U+0000; if so, `path` receives the JSON-pointer
/// segments leading to it, innermost first (built only on the way out, so
/// the common case allocates nothing).
fn nul_path(v: &Value, path: &mut Vec<String>) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
            let found = nul_path(item, path);
            if found {
                path.push(i.to_string());
            }
            found
        }),
        Value::Object(map) => map.iter().any(|(k, item)| {
            if k.contains('\0') {
                path.push("<key>".to_string());
                return true;
            }
            let found = nul_path(item, path);
            if found {
                path.push(k.replace('~', "~0").replace('/', "~1"));
            }
            found
        }),
        _ => false,
    }
}

fn pointer_or_root(path: &str) -> String {
    if path.is_empty() {
        "/".to_string()
    } else {
        path.to_string()
    }
}

// ---------------------------------------------------------------------------
// Wire structs: the request exactly as the schema describes it. They are
// private; the domain types are what the rest of Herald sees.
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest {
    id: String,
    /// Always `notify` here (cancels are decoded apart).
    #[allow(dead_code)]
    kind: Option<String>,
    tenant_id: Option<String>,
    app_id: Option<String>,
    channel: Channel,
    recipient: Option<WireRecipient>,
    recipients: Option<Vec<WireRecipient>>,
    template: Option<WireTemplate>,
    content: Option<WireContent>,
    #[serde(default)]
    priority: Priority,
    category: Option<String>,
    scheduled_at: Option<String>,
    expires_at: Option<String>,
    meta: Option<WireMeta>,
    correlation_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRecipient {
    user_id: Option<String>,
    email: Option<String>,
    phone: Option<String>,
    url: Option<String>,
    #[serde(default)]
    device_tokens: Vec<String>,
    locale: Option<String>,
    timezone: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTemplate {
    key: String,
    locale: Option<String>,
    #[serde(default)]
    data: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireContent {
    subject: Option<String>,
    text: Option<String>,
    html: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMeta {
    from: Option<String>,
    reply_to: Option<String>,
    #[serde(default)]
    cc: Vec<String>,
    #[serde(default)]
    bcc: Vec<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn invalid_field(m: String) -> DecodeError {
    DecodeError::new(DecodeErrorCode::InvalidField, m)
}

fn email(field: &str, s: &str) -> Result<EmailAddress, DecodeError> {
    EmailAddress::parse(s)
        .map_err(|e| DecodeError::new(DecodeErrorCode::InvalidAddress, format!("{field}: {e}")))
}

fn timestamp(field: &str, s: Option<String>) -> Result<Option<DateTime<Utc>>, DecodeError> {
    s.map(|s| {
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| invalid_field(format!("{field}: not an RFC 3339 date-time: {e}")))
    })
    .transpose()
}

impl WireRequest {
    fn into_domain(self) -> Result<NotificationRequest, DecodeError> {
        let channel = self.channel;
        let (wire_recipients, is_batch) = match (self.recipient, self.recipients) {
            (Some(r), None) => (vec![r], false),
            (None, Some(rs)) => (rs, true),
            _ => {
                return Err(DecodeError::new(
                    DecodeErrorCode::SchemaViolation,
                    "/: exactly one of `recipient` and `recipients` is required",
                ));
            }
        };
        let recipients = wire_recipients
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let field = if is_batch {
                    format!("recipients[{i}]")
                } else {
                    "recipient".to_string()
                };
                r.into_domain(channel, &field)
            })
            .collect::<Result<Vec<_>, _>>()?;

        let content = match (self.template, self.content) {
            (Some(t), None) => Content::Template(TemplateRef {
                key: t.key,
                locale: t.locale,
                data: t.data,
            }),
            (None, Some(c)) => {
                if c.subject
                    .as_deref()
                    .is_some_and(|s| s.contains(['\r', '\n']))
                {
                    return Err(invalid_field(
                        "content.subject: must not contain CR or LF".to_string(),
                    ));
                }
                Content::Inline(InlineContent {
                    subject: c.subject,
                    text: c.text,
                    html: c.html,
                })
            }
            _ => {
                return Err(DecodeError::new(
                    DecodeErrorCode::SchemaViolation,
                    "/: exactly one of `template` and `content` is required",
                ));
            }
        };

        let scheduled_at = timestamp("scheduled_at", self.scheduled_at)?;
        let expires_at = timestamp("expires_at", self.expires_at)?;
        if let (Some(s), Some(e)) = (scheduled_at, expires_at)
            && e < s
        {
            return Err(invalid_field(
                "expires_at: earlier than scheduled_at".to_string(),
            ));
        }

        let meta = match self.meta {
            Some(m) => m.into_domain()?,
            None => Meta::default(),
        };

        Ok(NotificationRequest {
            id: self.id,
            tenant_id: self.tenant_id,
            app_id: self.app_id,
            channel,
            recipients,
            content,
            priority: self.priority,
            category: self.category,
            scheduled_at,
            expires_at,
            meta,
            correlation_id: self.correlation_id,
            is_batch,
        })
    }
}

impl WireRecipient {
    fn into_domain(self, channel: Channel, field: &str) -> Result<Recipient, DecodeError> {
        let addr = |name: &str, e: super::recipient::AddressError| {
            DecodeError::new(
                DecodeErrorCode::InvalidAddress,
                format!("{field}.{name}: {e}"),
            )
        };
        let email = self
            .email
            .map(|s| EmailAddress::parse(&s).map_err(|e| addr("email", e)))
            .transpose()?;
        let phone = self
            .phone
            .map(|s| PhoneNumber::parse(&s).map_err(|e| addr("phone", e)))
            .transpose()?;
        let url = self
            .url
            .map(|s| WebhookUrl::parse(&s).map_err(|e| addr("url", e)))
            .transpose()?;

        let missing = match channel {
            Channel::Email => email.is_none().then_some("email"),
            Channel::Sms => phone.is_none().then_some("phone"),
            Channel::Webhook => url.is_none().then_some("url"),
            Channel::Push => self.device_tokens.is_empty().then_some("device_tokens"),
            Channel::InApp => self.user_id.is_none().then_some("user_id"),
        };
        // A recipient named only by user id gets its address from the
        // preferences (the policy step); without a user id it is missing now.
        if let Some(name) = missing.filter(|_| self.user_id.is_none()) {
            return Err(DecodeError::new(
                DecodeErrorCode::MissingAddress,
                format!("{field}.{name}: required for channel {}", channel.as_str()),
            ));
        }

        Ok(Recipient {
            user_id: self.user_id,
            email,
            phone,
            url,
            device_tokens: self.device_tokens,
            locale: self.locale,
            timezone: self.timezone,
        })
    }
}

/// Headers Herald (or the transport) sets itself; a request may not set
/// them. Compared case-insensitively; `content-*` and `webhook-*` are
/// prefixes.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "reply-to",
    "sender",
    "return-path",
    "message-id",
    "date",
    "mime-version",
    "host",
    "connection",
    "transfer-encoding",
];
const RESERVED_HEADER_PREFIXES: &[&str] = &["content-", "webhook-"];

fn check_header(name: &str, value: &str) -> Result<(), DecodeError> {
    // Names are attacker-chosen: quote them only when they are valid.
    if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
        return Err(invalid_field(
            "meta.headers: a header name must be printable ASCII without ':' or space".to_string(),
        ));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_HEADERS.contains(&lower.as_str())
        || RESERVED_HEADER_PREFIXES
            .iter()
            .any(|p| lower.starts_with(p))
    {
        return Err(invalid_field(format!(
            "meta.headers.{name}: set by Herald, may not be overridden"
        )));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(invalid_field(format!(
            "meta.headers.{name}: the value must not contain CR, LF or other control characters"
        )));
    }
    Ok(())
}

impl WireMeta {
    fn into_domain(self) -> Result<Meta, DecodeError> {
        let from = self.from.map(|s| email("meta.from", &s)).transpose()?;
        let reply_to = self
            .reply_to
            .map(|s| email("meta.reply_to", &s))
            .transpose()?;
        let list = |name: &str, v: Vec<String>| {
            v.iter()
                .enumerate()
                .map(|(i, s)| email(&format!("meta.{name}[{i}]"), s))
                .collect::<Result<Vec<_>, _>>()
        };
        let cc = list("cc", self.cc)?;
        let bcc = list("bcc", self.bcc)?;
        for (name, value) in &self.headers {
            check_header(name, value)?;
        }
        Ok(Meta {
            from,
            reply_to,
            cc,
            bcc,
            headers: self.headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const MAX: usize = 1024 * 1024;

    fn decode(v: &Value) -> Result<NotificationRequest, DecodeError> {
        decode_request(&serde_json::to_vec(v).unwrap(), MAX)
    }

    fn code(v: &Value) -> DecodeErrorCode {
        match decode(v) {
            Ok(r) => panic!("accepted: {r:?}"),
            Err(e) => e.code,
        }
    }

    fn email_request() -> Value {
        json!({
            "id": "req-1",
            "tenant_id": "acme",
            "channel": "email",
            "recipient": {"email": "ada@example.com"},
            "content": {"subject": "Hi", "text": "Hello"},
            "correlation_id": "trace-1"
        })
    }

    fn with(mut v: Value, pointer: &str, value: Value) -> Value {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let target = if parent.is_empty() {
            &mut v
        } else {
            v.pointer_mut(parent).unwrap()
        };
        target
            .as_object_mut()
            .unwrap()
            .insert(key.to_string(), value);
        v
    }

    fn without(mut v: Value, key: &str) -> Value {
        v.as_object_mut().unwrap().remove(key);
        v
    }

    // ---- happy paths -----------------------------------------------------

    #[test]
    fn single_inline_email_with_defaults() {
        let r = decode(&email_request()).unwrap();
        assert_eq!(r.id, "req-1");
        assert_eq!(r.tenant_id.as_deref(), Some("acme"));
        assert_eq!(r.channel, Channel::Email);
        assert_eq!(r.priority, Priority::Normal);
        assert!(!r.is_batch);
        assert_eq!(r.recipients.len(), 1);
        assert_eq!(
            r.recipients[0].email.as_ref().map(EmailAddress::as_str),
            Some("ada@example.com")
        );
        assert_eq!(
            r.content,
            Content::Inline(InlineContent {
                subject: Some("Hi".into()),
                text: Some("Hello".into()),
                html: None,
            })
        );
        assert_eq!(r.meta, Meta::default());
        assert_eq!(r.scheduled_at, None);
        let ns: Vec<_> = r.into_notifications().collect();
        assert_eq!(ns.len(), 1);
        assert_eq!(ns[0].id, "req-1");
        assert_eq!(ns[0].request_id, "req-1");
        assert_eq!(ns[0].correlation_id.as_deref(), Some("trace-1"));
    }

    #[test]
    fn template_with_defaults_and_timestamps() {
        let v = json!({
            "id": "t-1",
            "channel": "in_app",
            "recipient": {"user_id": "user-42", "locale": "pt-BR", "timezone": "America/Sao_Paulo"},
            "template": {"key": "welcome"},
            "priority": "urgent",
            "scheduled_at": "2030-01-01T10:00:00+01:00",
            "expires_at": "2030-01-01T09:00:00Z"
        });
        let r = decode(&v).unwrap();
        assert_eq!(
            r.content,
            Content::Template(TemplateRef {
                key: "welcome".into(),
                locale: None,
                data: Map::new(),
            })
        );
        assert_eq!(r.priority, Priority::Urgent);
        let nine = DateTime::parse_from_rfc3339("2030-01-01T09:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        // Equal instants are allowed; the offset is normalised to UTC.
        assert_eq!(r.scheduled_at, Some(nine));
        assert_eq!(r.expires_at, Some(nine));
        assert_eq!(
            r.recipients[0].timezone.as_deref(),
            Some("America/Sao_Paulo")
        );
    }

    #[test]
    fn template_data_is_kept() {
        let v = json!({
            "id": "t-2", "channel": "webhook",
            "recipient": {"url": "https://hooks.example.com/x"},
            "template": {"key": "invoice.paid", "locale": "en", "data": {"n": 1, "deep": {"a": [1, 2]}}}
        });
        let Content::Template(t) = decode(&v).unwrap().content else {
            panic!("not a template")
        };
        assert_eq!(t.locale.as_deref(), Some("en"));
        assert_eq!(
            Value::Object(t.data),
            json!({"n": 1, "deep": {"a": [1, 2]}})
        );
    }

    #[test]
    fn batch_derives_notification_ids() {
        let v = json!({
            "id": "news-1", "channel": "email",
            "recipients": [{"email": "a@example.com"}, {"email": "b@example.com"}, {"email": "c@example.com"}],
            "template": {"key": "newsletter"}
        });
        let r = decode(&v).unwrap();
        assert!(r.is_batch);
        let ns: Vec<_> = r.into_notifications().collect();
        let ids: Vec<&str> = ns.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["news-1:0", "news-1:1", "news-1:2"]);
        assert!(ns.iter().all(|n| n.request_id == "news-1"));
        assert_eq!(
            ns[2].recipient.email.as_ref().map(EmailAddress::as_str),
            Some("c@example.com")
        );
    }

    #[test]
    fn every_notification_of_a_batch_carries_the_whole_request_the_last_included() {
        let v = json!({
            "id": "news-2", "channel": "email", "tenant_id": "acme", "app_id": "shop",
            "category": "news", "correlation_id": "c-9", "priority": "high",
            "recipients": [{"email": "a@example.com"}, {"email": "b@example.com"}, {"email": "c@example.com"}],
            "content": {"subject": "S", "text": "T"},
            "meta": {"from": "shop@example.com", "headers": {"X-Campaign": "fall"}}
        });
        let ns = decode(&v).unwrap().into_notifications();
        assert_eq!(ns.len(), 3);
        let ns: Vec<_> = ns.collect();
        for n in &ns {
            let mut same = ns[0].clone();
            same.id = n.id.clone();
            same.recipient = n.recipient.clone();
            assert_eq!(*n, same);
        }
        let n = &ns[2];
        assert_eq!(n.request_id, "news-2");
        assert_eq!(n.tenant_id.as_deref(), Some("acme"));
        assert_eq!(n.app_id.as_deref(), Some("shop"));
        assert_eq!(n.category.as_deref(), Some("news"));
        assert_eq!(n.correlation_id.as_deref(), Some("c-9"));
        assert_eq!(n.meta.headers["X-Campaign"], "fall");
        assert_eq!(
            n.content,
            Content::Inline(InlineContent {
                subject: Some("S".into()),
                text: Some("T".into()),
                html: None
            })
        );
    }

    #[test]
    fn batch_of_one_still_uses_derived_ids() {
        let v = json!({
            "id": "b", "channel": "sms",
            "recipients": [{"phone": "+14155550123"}],
            "content": {"text": "x"}
        });
        assert_eq!(
            decode(&v).unwrap().into_notifications().next().unwrap().id,
            "b:0"
        );
    }

    #[test]
    fn every_channel_with_its_address() {
        for (channel, recipient) in [
            ("email", json!({"email": "a@example.com"})),
            ("sms", json!({"phone": "+4915112345678"})),
            ("push", json!({"device_tokens": ["tok"]})),
            ("webhook", json!({"url": "http://127.0.0.1:9000/hook"})),
            ("in_app", json!({"user_id": "u1"})),
        ] {
            let v = json!({"id": "x", "channel": channel, "recipient": recipient, "content": {"text": "t"}});
            let r = decode(&v).unwrap_or_else(|e| panic!("{channel}: {e}"));
            assert_eq!(r.channel.as_str(), channel);
        }
    }

    #[test]
    fn meta_is_parsed() {
        let v = with(
            email_request(),
            "/meta",
            json!({
                "from": "shop@example.com",
                "reply_to": "help@example.com",
                "cc": ["c@example.com"],
                "bcc": ["d@example.com", "e@example.com"],
                "headers": {"X-Campaign": "spring", "List-Unsubscribe": "<https://x.example/u>"}
            }),
        );
        let m = decode(&v).unwrap().meta;
        assert_eq!(m.from.unwrap().as_str(), "shop@example.com");
        assert_eq!(m.reply_to.unwrap().as_str(), "help@example.com");
        assert_eq!(m.cc.len(), 1);
        assert_eq!(m.bcc.len(), 2);
        assert_eq!(m.headers["X-Campaign"], "spring");
    }

    #[test]
    fn cloudevent_data_is_the_request() {
        let ce = json!({
            "specversion": "1.0", "type": "dev.herald.notification.requested",
            "source": "/shop", "id": "ce-1", "datacontenttype": "application/json",
            "data": without(email_request(), "id")
        });
        let r = decode(&ce).unwrap();
        assert_eq!(
            r.id, "ce-1",
            "the event id stands in for a missing request id"
        );
        assert_eq!(r.tenant_id.as_deref(), Some("acme"));

        let ce = with(ce, "/data/id", json!("own-id"));
        assert_eq!(decode(&ce).unwrap().id, "own-id", "data's own id wins");
    }

    #[test]
    fn cloudevent_envelope_errors() {
        let ce = json!({"specversion": "1.0", "id": "ce-2", "type": "t", "source": "/s"});
        let e = decode(&ce).unwrap_err();
        assert_eq!(e.code, DecodeErrorCode::SchemaViolation);
        assert_eq!(e.request_id.as_deref(), Some("ce-2"));

        let bad = [
            with(ce.clone(), "/data", json!("not an object")),
            with(ce.clone(), "/data_base64", json!("e30=")),
            with(
                with(ce.clone(), "/specversion", json!("0.3")),
                "/data",
                email_request(),
            ),
        ];
        for v in bad {
            assert_eq!(code(&v), DecodeErrorCode::SchemaViolation, "{v}");
        }
        // An invalid request inside a valid envelope is judged like any other.
        let ce = with(
            ce,
            "/data",
            with(email_request(), "/recipient", json!({"email": "nope"})),
        );
        let e = decode(&ce).unwrap_err();
        assert_eq!(e.code, DecodeErrorCode::InvalidAddress);
        assert_eq!(e.request_id.as_deref(), Some("req-1"));
    }

    // ---- error codes -----------------------------------------------------

    #[test]
    fn too_large() {
        let bytes = serde_json::to_vec(&email_request()).unwrap();
        let e = decode_request(&bytes, bytes.len() - 1).unwrap_err();
        assert_eq!(e.code, DecodeErrorCode::TooLarge);
        assert!(decode_request(&bytes, bytes.len()).is_ok());
    }

    #[test]
    fn ten_megabyte_body_is_too_large() {
        let mut big = br#"{"id":"x","channel":"email","recipient":{"email":"a@example.com"},"content":{"text":""#.to_vec();
        big.resize(10 * 1024 * 1024, b'a');
        big.extend_from_slice(br#""}}"#);
        let e = decode_request(&big, MAX).unwrap_err();
        assert_eq!(e.code, DecodeErrorCode::TooLarge);
        // With a limit that admits it, the schema's 512 KiB text limit applies.
        let e = decode_request(&big, usize::MAX).unwrap_err();
        assert_eq!(e.code, DecodeErrorCode::SchemaViolation, "{e}");
        assert_eq!(e.request_id.as_deref(), Some("x"));
    }

    #[test]
    fn deep_nesting_is_invalid_json_not_a_stack_overflow() {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let depth = 10_000;
            let s = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let e = decode_request(s.as_bytes(), usize::MAX).unwrap_err();
            assert_eq!(e.code, DecodeErrorCode::InvalidJson, "{e}");
        }
        // Deep nesting inside template data, within the parser's limit, is fine.
        let mut data = json!(1);
        for _ in 0..100 {
            data = json!({ "a": data });
        }
        let v = json!({"id": "x", "channel": "in_app", "recipient": {"user_id": "u"},
                       "template": {"key": "k", "data": {"d": data}}});
        assert!(decode(&v).is_ok());
    }

    #[test]
    fn invalid_json() {
        for bytes in [
            &b""[..],
            b"not json",
            b"{\"id\": ",
            b"\xff\xfe{}",
            b"{\"id\": \"\xc3\x28\"}",
            b"{} {}",
        ] {
            let e = decode_request(bytes, MAX).unwrap_err();
            assert_eq!(e.code, DecodeErrorCode::InvalidJson, "{bytes:?}");
            assert_eq!(e.request_id, None);
        }
    }

    #[test]
    fn schema_violation_carries_the_ids() {
        let v = with(email_request(), "/priority", json!("HIGH"));
        let e = decode(&v).unwrap_err();
        assert_eq!(e.code, DecodeErrorCode::SchemaViolation);
        assert!(e.message.contains("/priority"), "{e}");
        assert_eq!(e.request_id.as_deref(), Some("req-1"));
        assert_eq!(e.tenant_id.as_deref(), Some("acme"));
        assert_eq!(e.correlation_id.as_deref(), Some("trace-1"));
    }

    #[test]
    fn invalid_ids_are_not_carried() {
        let v = with(email_request(), "/id", json!("x".repeat(201)));
        let e = decode(&v).unwrap_err();
        assert_eq!(e.code, DecodeErrorCode::SchemaViolation);
        assert_eq!(e.request_id, None);
        assert_eq!(e.tenant_id.as_deref(), Some("acme"));
        let v = with(email_request(), "/id", json!("a\nb"));
        assert_eq!(decode(&v).unwrap_err().request_id, None);
        let v = with(email_request(), "/id", json!(42));
        assert_eq!(decode(&v).unwrap_err().request_id, None);
    }

    #[test]
    fn schema_violations() {
        let base = email_request();
        let cases = [
            json!([]),
            json!("a string"),
            json!(null),
            without(base.clone(), "id"),
            without(base.clone(), "channel"),
            with(base.clone(), "/id", json!("")),
            with(base.clone(), "/channel", json!("Email")),
            with(base.clone(), "/extra", json!(1)),
            with(base.clone(), "/recipient", json!({})),
            with(base.clone(), "/recipient/email", json!(["a@example.com"])),
            with(base.clone(), "/recipient/locale", json!("../../x")),
            with(
                base.clone(),
                "/recipients",
                json!([{"email": "b@example.com"}]),
            ),
            without(base.clone(), "recipient"),
            with(base.clone(), "/template", json!({"key": "k"})),
            without(base.clone(), "content"),
            with(base.clone(), "/content", json!({"body": "x"})),
            with(base.clone(), "/content/subject", json!("s".repeat(999))),
            with(base.clone(), "/scheduled_at", json!("2030-01-01 09:00")),
            with(base.clone(), "/meta", json!({"headers": {"X-A": 1}})),
            with(base.clone(), "/meta", json!({"cc": "a@example.com"})),
            with(base.clone(), "/category", json!("")),
        ];
        for v in cases {
            assert_eq!(code(&v), DecodeErrorCode::SchemaViolation, "{v}");
        }
        let batch = json!({"id": "x", "channel": "email", "content": {"text": "t"},
                           "recipients": vec![json!({"email": "a@example.com"}); 1001]});
        assert_eq!(code(&batch), DecodeErrorCode::SchemaViolation);
    }

    #[test]
    fn schema_messages_are_bounded_and_clean() {
        let v = with(
            email_request(),
            &format!("/{}\u{7}", "k".repeat(5000)),
            json!(1),
        );
        let e = decode(&v).unwrap_err();
        assert_eq!(e.code, DecodeErrorCode::SchemaViolation);
        assert!(e.message.chars().count() <= MAX_MESSAGE_CHARS + 1);
        assert!(!e.message.chars().any(char::is_control));
    }

    #[test]
    fn addresses_are_not_echoed() {
        let v = with(
            email_request(),
            "/recipient/email",
            json!("secret-person-at-example.com"),
        );
        let e = decode(&v).unwrap_err();
        assert_eq!(e.code, DecodeErrorCode::InvalidAddress);
        assert!(!e.message.contains("secret"), "{e}");
        assert!(!e.to_string().contains("secret"));
        // Nor are schema-invalid values.
        let v = with(
            email_request(),
            "/recipient/email",
            json!("secret".repeat(100)),
        );
        let e = decode(&v).unwrap_err();
        assert!(!e.message.contains("secret"), "{e}");
    }

    #[test]
    fn invalid_addresses_name_the_field() {
        let base = email_request();
        let batch = json!({"id": "x", "channel": "email", "content": {"text": "t"},
                           "recipients": [{"email": "a@example.com"}, {"email": "b@example.com"}, {"email": "bad@"}]});
        let cases = [
            (
                with(base.clone(), "/recipient/email", json!("no-at-sign")),
                "recipient.email: invalid email address",
            ),
            (
                with(base.clone(), "/recipient/phone", json!("0049")),
                "recipient.phone: invalid phone number",
            ),
            (
                with(base.clone(), "/recipient/url", json!("ftp://x.example")),
                "recipient.url: invalid url",
            ),
            (
                with(base.clone(), "/meta", json!({"from": "x"})),
                "meta.from: invalid email address",
            ),
            (
                with(base.clone(), "/meta", json!({"reply_to": "x@"})),
                "meta.reply_to: invalid email address",
            ),
            (
                with(
                    base.clone(),
                    "/meta",
                    json!({"cc": ["a@example.com", "b c@x.com"]}),
                ),
                "meta.cc[1]: invalid email address",
            ),
            (
                with(base.clone(), "/meta", json!({"bcc": ["@x.com"]})),
                "meta.bcc[0]: invalid email address",
            ),
            (batch, "recipients[2].email: invalid email address"),
        ];
        for (v, prefix) in cases {
            let e = decode(&v).unwrap_err();
            assert_eq!(e.code, DecodeErrorCode::InvalidAddress, "{v}");
            assert!(e.message.starts_with(prefix), "{e} vs {prefix}");
            assert_eq!(e.request_id.as_deref(), Some(v["id"].as_str().unwrap()));
        }
    }

    #[test]
    fn missing_address_per_channel() {
        for (channel, recipient, field) in [
            (
                "email",
                json!({"locale": "en", "phone": "+14155550123"}),
                "recipient.email",
            ),
            (
                "sms",
                json!({"locale": "en", "email": "a@example.com"}),
                "recipient.phone",
            ),
            ("webhook", json!({"locale": "en"}), "recipient.url"),
            ("push", json!({"locale": "en"}), "recipient.device_tokens"),
            (
                "push",
                json!({"locale": "en", "device_tokens": []}),
                "recipient.device_tokens",
            ),
            (
                "in_app",
                json!({"email": "a@example.com"}),
                "recipient.user_id",
            ),
        ] {
            let v = json!({"id": "x", "channel": channel, "recipient": recipient, "content": {"text": "t"}});
            let e = decode(&v).unwrap_err();
            assert_eq!(e.code, DecodeErrorCode::MissingAddress, "{channel}: {e}");
            assert!(e.message.starts_with(field), "{e}");
        }
        let batch = json!({"id": "x", "channel": "email", "content": {"text": "t"},
                           "recipients": [{"email": "a@example.com"}, {"locale": "en"}]});
        // A user id alone is enough: the address comes from the preferences.
        for channel in ["email", "sms", "webhook", "push"] {
            let v = json!({"id": "x", "channel": channel, "recipient": {"user_id": "u"}, "content": {"text": "t"}});
            assert!(decode(&v).is_ok(), "{channel}");
        }
        let e = decode(&batch).unwrap_err();
        assert_eq!(e.code, DecodeErrorCode::MissingAddress);
        assert!(e.message.starts_with("recipients[1].email"), "{e}");
    }

    #[test]
    fn invalid_fields() {
        let base = email_request();
        let header = |name: &str, value: &str| {
            with(base.clone(), "/meta", json!({"headers": {name: value}}))
        };
        let cases = [
            with(
                base.clone(),
                "/content/subject",
                json!("a\r\nBcc: x@example.com"),
            ),
            with(base.clone(), "/content/subject", json!("a\nb")),
            header("X Space", "v"),
            header("X:Colon", "v"),
            header("X-Ünicode", "v"),
            header("X-A", "a\r\nBcc: x@example.com"),
            header("X-A", "a\rb"),
            header("X-A", "a\u{0}b"),
            header("Subject", "v"),
            header("bcc", "v"),
            header("REPLY-TO", "v"),
            header("Message-Id", "v"),
            header("MIME-Version", "v"),
            header("Content-Type", "v"),
            header("content-transfer-encoding", "v"),
            header("Webhook-Signature", "v"),
            with(base.clone(), "/content/text", json!("nul \u{0} here")),
            with(
                without(base.clone(), "content"),
                "/template",
                json!({"key": "k", "data": {"a": ["ok", "n\u{0}"]}}),
            ),
            with(
                with(base.clone(), "/scheduled_at", json!("2030-01-01T09:00:00Z")),
                "/expires_at",
                json!("2030-01-01T08:59:59Z"),
            ),
        ];
        for v in cases {
            let e = decode(&v).unwrap_err();
            assert_eq!(e.code, DecodeErrorCode::InvalidField, "{v}: {e}");
            assert_eq!(e.request_id.as_deref(), Some("req-1"));
            assert!(!e.message.chars().any(char::is_control), "{e}");
        }
        // A tab inside a header value is fine (folding whitespace).
        assert!(decode(&header("X-A", "a\tb")).is_ok());
    }

    #[test]
    fn nul_path_is_reported() {
        let v = json!({"id": "x", "channel": "in_app", "recipient": {"user_id": "u"},
                       "template": {"key": "k", "data": {"a/b": [0, "\u{0}"]}}});
        let e = decode(&v).unwrap_err();
        assert_eq!(
            e.message,
            "/template/data/a~1b/1: contains the character U+0000"
        );
        let v = json!({"id": "x", "channel": "in_app", "recipient": {"user_id": "u"},
                       "template": {"key": "k", "data": {"a~": {"b\u{0}": 1}}}});
        let e = decode(&v).unwrap_err();
        assert_eq!(
            e.message,
            "/template/data/a~0/<key>: contains the character U+0000"
        );
    }

    #[test]
    fn error_codes_are_snake_case_and_distinct() {
        let all = [
            DecodeErrorCode::TooLarge,
            DecodeErrorCode::InvalidJson,
            DecodeErrorCode::SchemaViolation,
            DecodeErrorCode::InvalidAddress,
            DecodeErrorCode::MissingAddress,
            DecodeErrorCode::InvalidField,
        ];
        let names: std::collections::BTreeSet<&str> = all.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), all.len());
        assert!(
            names
                .iter()
                .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        );
    }

    #[test]
    fn rejected_event() {
        let e = decode(&with(email_request(), "/channel", json!("fax"))).unwrap_err();
        let ev = e.to_rejected_event();
        assert_eq!(ev.status, Status::Rejected);
        assert_eq!(ev.notification_id.as_deref(), Some("req-1"));
        assert_eq!(ev.request_id.as_deref(), Some("req-1"));
        assert_eq!(ev.tenant_id.as_deref(), Some("acme"));
        assert_eq!(ev.correlation_id.as_deref(), Some("trace-1"));
        let err = ev.error.clone().unwrap();
        assert_eq!(err.code, "schema_violation");
        assert!(!err.retryable);
        validate_delivery_status(&serde_json::to_value(&ev).unwrap()).unwrap();

        let ev = decode_request(b"nope", MAX)
            .unwrap_err()
            .to_rejected_event();
        assert_eq!(ev.notification_id, None);
        validate_delivery_status(&serde_json::to_value(&ev).unwrap()).unwrap();
    }

    #[test]
    fn schemas_compile() {
        check_schemas().unwrap();
    }

    // ---- never panics ------------------------------------------------------

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,20}".prop_map(Value::from),
            prop::sample::select(vec![
                "email",
                "sms",
                "push",
                "webhook",
                "in_app",
                "a@example.com",
                "+14155550123",
                "https://x.example/h",
                "2030-01-01T00:00:00Z",
                "\u{0}",
                "\r\n",
            ])
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(6, 64, 8, |inner| {
            let keys = prop::sample::select(vec![
                "id",
                "tenant_id",
                "channel",
                "recipient",
                "recipients",
                "email",
                "phone",
                "url",
                "user_id",
                "device_tokens",
                "template",
                "key",
                "data",
                "content",
                "subject",
                "text",
                "meta",
                "headers",
                "cc",
                "from",
                "priority",
                "scheduled_at",
                "expires_at",
                "specversion",
                "x",
            ]);
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(keys, inner, 0..8).prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                )),
            ]
        })
    }

    proptest! {
        #[test]
        fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_request(&bytes, MAX);
            let _ = decode_request(&bytes, 16);
        }

        #[test]
        fn never_panics_on_json_ish_text(s in r#"[\[\]{}":,0-9a-z_\\@+./ -]{0,300}"#) {
            let _ = decode_request(s.as_bytes(), MAX);
        }

        #[test]
        fn never_panics_on_json_values(v in arb_json()) {
            let _ = decode(&v);
            let _ = decode(&json!({"specversion": "1.0", "id": "e", "data": v.clone()}));
        }

        #[test]
        fn never_panics_on_mutated_requests(
            pointer in prop::sample::select(vec![
                "/id", "/channel", "/recipient", "/recipient/email", "/recipient/phone",
                "/recipient/url", "/recipient/device_tokens", "/content", "/content/subject",
                "/meta", "/priority", "/scheduled_at", "/expires_at", "/template",
            ]),
            value in arb_json(),
        ) {
            let v = with(email_request(), pointer, value);
            if let Err(e) = decode(&v) {
                prop_assert!(e.message.chars().count() <= MAX_MESSAGE_CHARS + 1);
                let ev = serde_json::to_value(e.to_rejected_event()).unwrap();
                prop_assert!(validate_delivery_status(&ev).is_ok());
            }
        }
    }
}
