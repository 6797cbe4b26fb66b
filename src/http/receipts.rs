//! Delivery receipts: `POST /webhooks/sendgrid` (SendGrid Event Webhook),
//! `POST /webhooks/twilio` (Twilio status callback) and `POST
//! /webhooks/generic` (Herald's own signed format, `schemas/receipt.v1.json`).
//!
//! Owns: verifying each provider's signature ([`verify_sendgrid`],
//! [`verify_twilio`], [`verify_generic`]), the mapping from a provider's
//! event to what it means for Herald ([`Effect`], [`sendgrid_effect`],
//! [`twilio_effect`], [`generic_effect`]), the monotonic status rule
//! ([`transition`]) and applying one receipt: find the notification, change
//! its status, publish the outcome event, add the address to the
//! suppression list.
//!
//! These endpoints take no bearer token: the signature is the
//! authentication. A bad signature or a timestamp outside
//! `receipts.max_skew_secs` is a 401; an endpoint whose key is not
//! configured answers 503. A receipt for an unknown message is acknowledged
//! (200) and counted `unmatched`: providers retry on anything else, and an
//! unknown id will never match.
//!
//! Status rule: a receipt moves a notification only from `sent` to
//! `delivered`, `bounced` or `failed`, or from `delivered` to `bounced` (a
//! bounce can arrive after the receiving server first accepted the message).
//! `bounced` and `failed` are final; the same receipt again changes nothing
//! and publishes nothing. A receipt that would change a notification still
//! being sent (`sending`) is answered 503 so the provider retries it once
//! the send is recorded.

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use secrecy::{ExposeSecret, SecretSlice};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha1::Sha1;
use sqlx::PgPool;

use crate::channels::webhook::{self, WebhookConfigError};
use crate::config::Settings;
use crate::domain::{Channel, DeliveryStatusEvent, ErrorInfo, Status, text};
use crate::http::api::problem::{Problem, RawBody};
use crate::kafka::{OutcomePublisher, PublishError};
use crate::policy::Policy;
use crate::store::receipts::{Locked, Target};
use crate::store::{ReceiptStore, StoreError};
use crate::telemetry::Metrics;

/// The JSON Schema of a generic receipt, embedded from `schemas/`.
pub const RECEIPT_SCHEMA: &str = include_str!("../../schemas/receipt.v1.json");

/// Provider labels (metrics, event ids).
pub const SENDGRID: &str = "sendgrid";
pub const TWILIO: &str = "twilio";
pub const GENERIC: &str = "generic";

/// SendGrid's signature and timestamp headers.
pub const SENDGRID_SIGNATURE_HEADER: &str = "x-twilio-email-event-webhook-signature";
pub const SENDGRID_TIMESTAMP_HEADER: &str = "x-twilio-email-event-webhook-timestamp";
/// Twilio's signature header.
pub const TWILIO_SIGNATURE_HEADER: &str = "x-twilio-signature";

/// Twilio error codes that mean the number can never receive messages: an
/// `undelivered`/`failed` with one of them is a hard bounce.
/// 21211: invalid `To` number; 21614: not a mobile number; 30005: unknown
/// destination handset; 30006: landline or unreachable carrier.
pub const TWILIO_PERMANENT_ERRORS: &[u32] = &[21211, 21614, 30005, 30006];
/// Twilio: the recipient replied STOP (unsubscribed).
pub const TWILIO_UNSUBSCRIBED_ERROR: u32 = 21610;

/// How long a provider is asked to wait before retrying a receipt about a
/// notification that is still being sent.
const PENDING_RETRY_AFTER_SECS: u32 = 10;

/// Longest provider reason copied into an outcome's error message.
const MAX_DETAIL_CHARS: usize = 1000;

type HmacSha1 = Hmac<Sha1>;

/// Why the receipt endpoints could not be set up from the settings.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptConfigError {
    #[error("receipts.sendgrid_verification_key: not a base64 DER (or PEM) P-256 public key")]
    SendgridKey,
    #[error("receipts.signing_secret: {0}")]
    SigningSecret(#[from] WebhookConfigError),
    #[error("receipts.twilio_auth_token must not be empty")]
    TwilioToken,
    #[error("receipts.public_base_url must be an absolute http(s) URL, got {0:?}")]
    BaseUrl(String),
    #[error("{0}")]
    Schema(String),
}

/// Verification material, decoded once at start-up.
struct Keys {
    /// SendGrid's public key; `None`: `/webhooks/sendgrid` answers 503.
    sendgrid: Option<VerifyingKey>,
    /// Twilio auth token (HMAC-SHA1 key).
    twilio_token: Option<SecretSlice<u8>>,
    /// The URL Twilio calls, without the path (no trailing slash).
    public_base_url: Option<String>,
    /// Generic receipts' HMAC-SHA256 key.
    generic: Option<SecretSlice<u8>>,
    /// Largest accepted timestamp skew, in seconds.
    max_skew_secs: i64,
}

/// What the receipt handlers need.
#[derive(Clone)]
pub struct ReceiptState {
    store: ReceiptStore,
    /// The app's outcome publisher: one event per status change.
    publisher: Arc<dyn OutcomePublisher>,
    metrics: Metrics,
    /// Forgets cached suppression status after an address is suppressed, so
    /// this instance's next request to it is suppressed at once (others
    /// notice within `policy.preference_cache_ttl_ms`).
    policy: Option<Arc<Policy>>,
    keys: Arc<Keys>,
    /// Largest accepted body (`api.max_body_bytes`).
    max_body_bytes: usize,
}

impl ReceiptState {
    /// Decodes the configured keys (a malformed one fails start-up).
    pub fn new(
        pool: PgPool,
        publisher: Arc<dyn OutcomePublisher>,
        metrics: Metrics,
        policy: Option<Arc<Policy>>,
        settings: &Settings,
    ) -> Result<Self, ReceiptConfigError> {
        let r = &settings.receipts;
        RECEIPT_VALIDATOR
            .as_ref()
            .map_err(|e| ReceiptConfigError::Schema(e.clone()))?;
        let sendgrid = r
            .sendgrid_verification_key
            .as_deref()
            .map(sendgrid_key)
            .transpose()?;
        let twilio_token = match &r.twilio_auth_token {
            Some(t) if t.expose_secret().is_empty() => return Err(ReceiptConfigError::TwilioToken),
            Some(t) => Some(SecretSlice::from(t.expose_secret().as_bytes().to_vec())),
            None => None,
        };
        let public_base_url = match &r.public_base_url {
            Some(u) => {
                let url =
                    reqwest::Url::parse(u).map_err(|_| ReceiptConfigError::BaseUrl(u.clone()))?;
                if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                    return Err(ReceiptConfigError::BaseUrl(u.clone()));
                }
                Some(u.trim_end_matches('/').to_string())
            }
            None => None,
        };
        let generic = r
            .signing_secret
            .as_ref()
            .map(|s| webhook::signing_key(s.expose_secret()).map(SecretSlice::from))
            .transpose()?;
        Ok(ReceiptState {
            store: ReceiptStore::new(pool),
            publisher,
            metrics,
            policy,
            keys: Arc::new(Keys {
                sendgrid,
                twilio_token,
                public_base_url,
                generic,
                max_skew_secs: i64::try_from(r.max_skew_secs).unwrap_or(i64::MAX),
            }),
            max_body_bytes: settings.api.max_body_bytes,
        })
    }
}

/// The receipt routes, merged into the HTTP listener's router by the app.
pub fn router(state: ReceiptState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/webhooks/sendgrid", post(sendgrid))
        .route("/webhooks/twilio", post(twilio))
        .route("/webhooks/generic", post(generic))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

// ---------------------------------------------------------------------------
// Signatures

/// Decodes SendGrid's verification key: base64 DER SubjectPublicKeyInfo as
/// the SendGrid console shows it (PEM armour is accepted too).
pub fn sendgrid_key(text: &str) -> Result<VerifyingKey, ReceiptConfigError> {
    // PEM armour (`-----BEGIN PUBLIC KEY-----` lines) and line breaks are
    // dropped: what remains is the base64 DER.
    let b64: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("-----"))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    let der = BASE64
        .decode(b64)
        .map_err(|_| ReceiptConfigError::SendgridKey)?;
    VerifyingKey::from_public_key_der(&der).map_err(|_| ReceiptConfigError::SendgridKey)
}

/// SendGrid's Event Webhook signature: `signature_b64` (the
/// `X-Twilio-Email-Event-Webhook-Signature` header) is a base64 DER ECDSA
/// P-256/SHA-256 signature of `timestamp` (the
/// `X-Twilio-Email-Event-Webhook-Timestamp` header) followed by the raw body.
pub fn verify_sendgrid(
    key: &VerifyingKey,
    timestamp: &str,
    body: &[u8],
    signature_b64: &str,
) -> bool {
    let Ok(der) = BASE64.decode(signature_b64.trim()) else {
        return false;
    };
    let Ok(signature) = Signature::from_der(&der) else {
        return false;
    };
    let mut signed = Vec::with_capacity(timestamp.len() + body.len());
    signed.extend_from_slice(timestamp.as_bytes());
    signed.extend_from_slice(body);
    key.verify(&signed, &signature).is_ok()
}

fn twilio_mac(token: &[u8], url: &str, params: &[(String, String)]) -> HmacSha1 {
    let mut mac = match HmacSha1::new_from_slice(token) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

/// Twilio's request signature: base64 HMAC-SHA1, keyed with the auth token,
/// of the full URL Twilio called followed by every POST parameter's name and
/// value, sorted by name.
pub fn twilio_signature(token: &[u8], url: &str, params: &[(String, String)]) -> String {
    BASE64.encode(twilio_mac(token, url, params).finalize().into_bytes())
}

/// Checks an `X-Twilio-Signature` header (in constant time).
pub fn verify_twilio(token: &[u8], url: &str, params: &[(String, String)], header: &str) -> bool {
    let Ok(sig) = BASE64.decode(header.trim()) else {
        return false;
    };
    twilio_mac(token, url, params).verify_slice(&sig).is_ok()
}

/// Why a generic receipt's signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenericSignatureError {
    /// A `webhook-*` header is missing or unreadable.
    MissingHeaders,
    /// `webhook-timestamp` is further than the allowed skew from now.
    Stale,
    /// No `v1,` entry matches.
    Mismatch,
}

/// Verifies a generic receipt the Standard Webhooks way: `webhook-id`,
/// `webhook-timestamp` within `max_skew_secs` of `now`, and one `v1,<base64
/// HMAC-SHA256("id.timestamp.body")>` entry of `webhook-signature` (a
/// space-separated list) that matches. Signs with the webhook channel's
/// [`webhook::sign`], so both directions agree by construction. Returns the
/// `webhook-id` (the receipt's id).
pub fn verify_generic(
    key: &[u8],
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
    max_skew_secs: i64,
) -> Result<String, GenericSignatureError> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(ts), Some(signatures)) = (
        get("webhook-id"),
        get("webhook-timestamp"),
        get("webhook-signature"),
    ) else {
        return Err(GenericSignatureError::MissingHeaders);
    };
    let ts: i64 = ts
        .trim()
        .parse()
        .map_err(|_| GenericSignatureError::MissingHeaders)?;
    if now.abs_diff(ts) > max_skew_secs.unsigned_abs() {
        return Err(GenericSignatureError::Stale);
    }
    let expected = webhook::sign(key, id, ts, body);
    if signatures
        .split_whitespace()
        .any(|entry| constant_time_eq(entry.as_bytes(), expected.as_bytes()))
    {
        Ok(id.to_string())
    } else {
        Err(GenericSignatureError::Mismatch)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn skew_ok(ts: i64, now: i64, max_skew_secs: i64) -> bool {
    now.abs_diff(ts) <= max_skew_secs.unsigned_abs()
}

// ---------------------------------------------------------------------------
// The mapping table

/// Why an address goes on the suppression list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suppression {
    /// The address does not exist: suppressed for every tenant.
    HardBounce,
    /// The recipient marked a message as spam: suppressed for the
    /// notification's tenant.
    SpamComplaint,
    /// The recipient unsubscribed at the provider: suppressed for the
    /// notification's tenant.
    Unsubscribed,
}

impl Suppression {
    /// The `suppressed_addresses.reason` value.
    pub fn reason(&self) -> &'static str {
        match self {
            Suppression::HardBounce => "hard_bounce",
            Suppression::SpamComplaint => "spam_complaint",
            Suppression::Unsubscribed => "unsubscribed",
        }
    }

    /// The `suppressed_addresses.tenant_id` for a notification of `tenant`.
    pub fn tenant<'a>(&self, tenant: Option<&'a str>) -> &'a str {
        match self {
            Suppression::HardBounce => "",
            _ => tenant.unwrap_or(""),
        }
    }
}

/// What one receipt event means for Herald.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effect {
    /// Bounded receipt status (the metrics label).
    pub label: &'static str,
    /// The status the notification moves to, if any.
    pub status: Option<Status>,
    /// Whether the address goes on the suppression list, and why.
    pub suppress: Option<Suppression>,
    /// `error.code` of the outcome event (bounced, failed).
    pub error_code: Option<&'static str>,
}

impl Effect {
    const fn only(label: &'static str) -> Effect {
        Effect {
            label,
            status: None,
            suppress: None,
            error_code: None,
        }
    }

    const DELIVERED: Effect = Effect {
        label: "delivered",
        status: Some(Status::Delivered),
        suppress: None,
        error_code: None,
    };

    const HARD_BOUNCE: Effect = Effect {
        label: "bounced",
        status: Some(Status::Bounced),
        suppress: Some(Suppression::HardBounce),
        error_code: Some("hard_bounce"),
    };

    const fn failed(code: &'static str, suppress: Option<Suppression>) -> Effect {
        Effect {
            label: "failed",
            status: Some(Status::Failed),
            suppress,
            error_code: Some(code),
        }
    }

    /// True when the event changes nothing (acknowledged and counted only).
    pub fn is_noop(&self) -> bool {
        self.status.is_none() && self.suppress.is_none()
    }
}

/// SendGrid Event Webhook `event` (with the bounce `type` and the drop
/// `reason`) → effect.
///
/// | event | effect |
/// |---|---|
/// | `delivered` | `delivered` |
/// | `bounce`, type `bounce` (or none) | `bounced`, suppress `hard_bounce` |
/// | `bounce`, type `blocked`; `blocked`; `deferred` | none (soft; counted) |
/// | `dropped` | `failed` (`provider_dropped`); a drop because the address bounced, complained or unsubscribed before also suppresses it |
/// | `spamreport` | suppress `spam_complaint` |
/// | `unsubscribe` | suppress `unsubscribed` (`group_unsubscribe` is one category: not suppressed) |
/// | `processed`, `open`, `click`, others | none (counted) |
pub fn sendgrid_effect(event: &str, kind: Option<&str>, reason: Option<&str>) -> Effect {
    match event {
        "delivered" => Effect::DELIVERED,
        "bounce" if kind == Some("blocked") => Effect::only("soft_bounce"),
        "bounce" => Effect::HARD_BOUNCE,
        "blocked" => Effect::only("soft_bounce"),
        "deferred" => Effect::only("deferred"),
        "dropped" => {
            let reason = reason.unwrap_or_default().to_ascii_lowercase();
            let suppress = if reason.contains("bounced address") {
                Some(Suppression::HardBounce)
            } else if reason.contains("spam reporting address") {
                Some(Suppression::SpamComplaint)
            } else if reason.contains("unsubscribed address") {
                Some(Suppression::Unsubscribed)
            } else {
                None
            };
            Effect {
                label: "dropped",
                ..Effect::failed("provider_dropped", suppress)
            }
        }
        "spamreport" => Effect {
            suppress: Some(Suppression::SpamComplaint),
            ..Effect::only("spam_complaint")
        },
        "unsubscribe" => Effect {
            suppress: Some(Suppression::Unsubscribed),
            ..Effect::only("unsubscribed")
        },
        "processed" => Effect::only("accepted"),
        "open" => Effect::only("open"),
        "click" => Effect::only("click"),
        _ => Effect::only("other"),
    }
}

/// Twilio `MessageStatus` (with `ErrorCode`) → effect.
///
/// | status | effect |
/// |---|---|
/// | `delivered`, `read` | `delivered` |
/// | `undelivered`/`failed` with [`TWILIO_PERMANENT_ERRORS`] | `bounced`, suppress `hard_bounce` |
/// | `undelivered`/`failed` with 21610 (STOP) | `failed`, suppress `unsubscribed` |
/// | `undelivered`/`failed` otherwise | `failed` (`provider_undelivered` / `provider_failed`): Twilio makes no further attempt |
/// | `queued`, `accepted`, `scheduled`, `sending`, `sent` | none (counted) |
pub fn twilio_effect(status: &str, error_code: Option<u32>) -> Effect {
    match status {
        "delivered" | "read" => Effect::DELIVERED,
        "undelivered" | "failed" => match error_code {
            Some(c) if TWILIO_PERMANENT_ERRORS.contains(&c) => Effect::HARD_BOUNCE,
            Some(TWILIO_UNSUBSCRIBED_ERROR) => {
                Effect::failed("recipient_unsubscribed", Some(Suppression::Unsubscribed))
            }
            _ if status == "undelivered" => Effect::failed("provider_undelivered", None),
            _ => Effect::failed("provider_failed", None),
        },
        "queued" | "accepted" | "scheduled" | "sending" | "sent" => Effect::only("accepted"),
        _ => Effect::only("other"),
    }
}

/// A generic receipt's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GenericStatus {
    Delivered,
    Bounced,
    Failed,
}

/// A generic receipt's `bounce_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BounceType {
    Hard,
    Soft,
}

/// Generic receipt → effect: `delivered`; `bounced` (hard, the default) →
/// `bounced` + suppress `hard_bounce`; `bounced` soft → none (counted);
/// `failed` → `failed` (`provider_failed`).
pub fn generic_effect(status: GenericStatus, bounce_type: Option<BounceType>) -> Effect {
    match (status, bounce_type) {
        (GenericStatus::Delivered, _) => Effect::DELIVERED,
        (GenericStatus::Bounced, Some(BounceType::Soft)) => Effect::only("soft_bounce"),
        (GenericStatus::Bounced, _) => Effect::HARD_BOUNCE,
        (GenericStatus::Failed, _) => Effect::failed("provider_failed", None),
    }
}

/// What a receipt's target status does to a notification's current status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// A real status change.
    Apply,
    /// Already in that status (a repeated receipt): nothing to do.
    Duplicate,
    /// The send is not recorded yet: ask the provider to retry later.
    Pending,
    /// Not allowed (a final status, or not sent by a provider): nothing to do.
    Ignore,
}

/// The monotonic status rule for receipts (see the module docs).
pub fn transition(current: Status, target: Status) -> Transition {
    use Status::*;
    if current == target {
        return Transition::Duplicate;
    }
    match (current, target) {
        (Accepted | Sending, _) => Transition::Pending,
        (Sent, Delivered | Bounced | Failed) => Transition::Apply,
        (Delivered, Bounced) => Transition::Apply,
        _ => Transition::Ignore,
    }
}

/// The outcome event id of a receipt: the same receipt (a provider's retry)
/// always gives the same id, so consumers deduplicate even an event
/// published twice around a crash.
pub fn event_id(provider: &str, receipt_id: &str, notification_id: &str, status: Status) -> String {
    let namespace = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, b"https://herald.dev/receipts");
    let name = format!("{provider}\n{receipt_id}\n{notification_id}\n{status}");
    uuid::Uuid::new_v5(&namespace, name.as_bytes()).to_string()
}

// ---------------------------------------------------------------------------
// Applying one receipt

/// One receipt event, provider-neutral.
#[derive(Debug, Clone)]
struct Receipt {
    provider: &'static str,
    /// The provider's id of this event (SendGrid `sg_event_id`, Twilio
    /// `MessageSid:MessageStatus`, generic `webhook-id`).
    receipt_id: String,
    /// Herald's notification id, when the provider echoes it back.
    notification_id: Option<String>,
    /// The provider message ids this receipt may be stored under.
    message_ids: Vec<String>,
    /// Only notifications of this channel can match (SendGrid: email).
    channel: Option<Channel>,
    effect: Effect,
    /// The provider's explanation (bounce reason), for the error message.
    detail: Option<String>,
    occurred_at: Option<DateTime<Utc>>,
    /// The address the provider names, to tell apart notifications sharing
    /// one provider message id.
    address: Option<String>,
}

/// What became of one receipt event (the metrics `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Matched,
    Suppressed,
    Duplicate,
    Ignored,
    Unmatched,
    Pending,
}

impl Outcome {
    fn as_str(&self) -> &'static str {
        match self {
            Outcome::Matched => "matched",
            Outcome::Suppressed => "suppressed",
            Outcome::Duplicate => "duplicate",
            Outcome::Ignored => "ignored",
            Outcome::Unmatched => "unmatched",
            Outcome::Pending => "pending",
        }
    }
}

/// A transient failure applying a receipt: the provider is asked to retry.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// Counts of a request's events by outcome (the 200 response body).
#[derive(Debug, Default, Serialize)]
struct Tally {
    received: usize,
    matched: usize,
    suppressed: usize,
    duplicate: usize,
    ignored: usize,
    unmatched: usize,
    pending: usize,
}

impl Tally {
    fn add(&mut self, o: Outcome) {
        self.received += 1;
        match o {
            Outcome::Matched => self.matched += 1,
            Outcome::Suppressed => self.suppressed += 1,
            Outcome::Duplicate => self.duplicate += 1,
            Outcome::Ignored => self.ignored += 1,
            Outcome::Unmatched => self.unmatched += 1,
            Outcome::Pending => self.pending += 1,
        }
    }
}

impl ReceiptState {
    /// Applies each receipt in order; stops at the first transient failure
    /// (the provider retries the whole request; what was applied is then a
    /// duplicate).
    async fn apply_all(&self, receipts: Vec<Receipt>) -> Response {
        let mut tally = Tally::default();
        for r in receipts {
            let label = r.effect.label;
            let provider = r.provider;
            match self.apply(r).await {
                Ok(o) => {
                    self.count(provider, label, o.as_str());
                    tally.add(o);
                }
                Err(e) => {
                    tracing::warn!(provider, error = %e, "applying a delivery receipt failed; the provider will retry");
                    return Problem::unavailable("the receipt could not be stored; retry")
                        .into_response();
                }
            }
        }
        if tally.pending > 0 {
            let mut resp = Problem::unavailable(
                "a notification this receipt is about is still being sent; retry",
            )
            .into_response();
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(PENDING_RETRY_AFTER_SECS),
            );
            return resp;
        }
        (StatusCode::OK, axum::Json(tally)).into_response()
    }

    fn count(&self, provider: &str, status: &str, outcome: &str) {
        self.metrics
            .receipts
            .with_label_values(&[provider, status, outcome])
            .inc();
    }

    /// Finds the notification `r` is about and locks it.
    async fn find(&self, r: &Receipt) -> Result<Option<Locked>, StoreError> {
        let id = match &r.notification_id {
            Some(id) => id.clone(),
            None => {
                let mut found = self
                    .store
                    .by_provider_message_id(&r.message_ids, r.channel)
                    .await?;
                if found.len() > 1 {
                    // One provider message to several recipients: the
                    // address the receipt names decides.
                    found.retain(|t| match (&t.address, &r.address) {
                        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                        _ => false,
                    });
                }
                match found.as_slice() {
                    [one] => one.id.clone(),
                    _ => return Ok(None),
                }
            }
        };
        let Some(locked) = self.store.lock(&id).await? else {
            return Ok(None);
        };
        let t = &locked.target;
        let channel_ok = r.channel.is_none_or(|c| c == t.channel);
        // Both sides name the provider message: they must agree.
        let ids_ok = match &t.provider_message_id {
            Some(stored) if !r.message_ids.is_empty() => r.message_ids.iter().any(|m| m == stored),
            _ => true,
        };
        Ok((channel_ok && ids_ok).then_some(locked))
    }

    async fn apply(&self, r: Receipt) -> Result<Outcome, ApplyError> {
        if r.effect.is_noop() {
            return Ok(Outcome::Ignored);
        }
        let Some(mut locked) = self.find(&r).await? else {
            return Ok(Outcome::Unmatched);
        };
        let target = locked.target.clone();
        let mut outcome = Outcome::Ignored;
        let mut published: Option<DeliveryStatusEvent> = None;
        if let Some(to) = r.effect.status {
            match transition(target.status, to) {
                Transition::Pending => return Ok(Outcome::Pending),
                Transition::Duplicate => outcome = Outcome::Duplicate,
                Transition::Ignore => outcome = Outcome::Ignored,
                Transition::Apply => {
                    let error = r.effect.error_code.map(|code| ErrorInfo {
                        code: code.to_string(),
                        message: r.detail.clone().unwrap_or_else(|| code.replace('_', " ")),
                        retryable: false,
                    });
                    let event = outcome_event(&r, &target, to, error.clone());
                    // Published before the commit: a committed change always
                    // has its event; a failed commit is retried by the
                    // provider and re-publishes the same event id.
                    self.publisher.publish_outcome(&event).await?;
                    locked.change_status(to, error.as_ref(), &event).await?;
                    published = Some(event);
                    outcome = Outcome::Matched;
                }
            }
        }
        let mut suppressed: Option<String> = None;
        if let (Some(s), Some(address)) = (r.effect.suppress, target.address.as_deref()) {
            let tenant = s.tenant(target.tenant_id.as_deref());
            if locked.suppress(tenant, address, s.reason()).await? {
                suppressed = Some(address.to_string());
                if outcome == Outcome::Ignored {
                    outcome = Outcome::Suppressed;
                }
            }
        }
        locked.commit().await?;
        if let Some(e) = &published {
            self.metrics
                .outcomes
                .with_label_values(&[target.channel.as_str(), e.status.as_str()])
                .inc();
            tracing::info!(
                notification_id = %target.id,
                provider = r.provider,
                status = %e.status,
                "delivery receipt applied"
            );
        }
        if let Some(address) = suppressed {
            if let Some(p) = &self.policy {
                p.forget_address(&address);
            }
            tracing::info!(
                notification_id = %target.id,
                provider = r.provider,
                reason = r.effect.suppress.map(|s| s.reason()).unwrap_or_default(),
                "address suppressed by a delivery receipt"
            );
        }
        Ok(outcome)
    }
}

fn outcome_event(
    r: &Receipt,
    t: &Target,
    status: Status,
    error: Option<ErrorInfo>,
) -> DeliveryStatusEvent {
    let mut e = DeliveryStatusEvent::new(status);
    e.event_id = event_id(r.provider, &r.receipt_id, &t.id, status);
    e.notification_id = Some(t.id.clone());
    e.request_id = Some(t.request_id.clone());
    e.tenant_id = t.tenant_id.clone();
    e.channel = Some(t.channel);
    e.provider = t.provider.clone();
    e.provider_message_id = t
        .provider_message_id
        .clone()
        .or_else(|| r.message_ids.first().cloned());
    e.attempt = u32::try_from(t.attempts).unwrap_or(0);
    e.error = error;
    e.correlation_id = t.correlation_id.clone();
    if let Some(at) = r.occurred_at {
        e.occurred_at = at;
    }
    e
}

/// A provider's detail for an error message: printable, at most
/// [`MAX_DETAIL_CHARS`], absent when nothing is left.
fn clean_detail(s: &str) -> Option<String> {
    let s = text::printable(s, MAX_DETAIL_CHARS);
    (!s.is_empty()).then_some(s)
}

/// A non-empty identifier-like string (the event schema's rule: 1..=200
/// characters, no control characters); anything else is treated as absent.
fn identifier(s: Option<&str>) -> Option<String> {
    s.and_then(|s| text::identifier(s, 220))
}

// ---------------------------------------------------------------------------
// Handlers

fn refused(state: &ReceiptState, provider: &str, outcome: &str, problem: Problem) -> Response {
    state.count(provider, "none", outcome);
    let mut resp = problem.into_response();
    // The problem type sets a Bearer challenge on 401; these endpoints take
    // signatures, not tokens.
    resp.headers_mut().remove(header::WWW_AUTHENTICATE);
    resp
}

fn invalid_signature(state: &ReceiptState, provider: &str, detail: &str) -> Response {
    tracing::info!(provider, detail, "delivery receipt refused");
    refused(
        state,
        provider,
        "invalid_signature",
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "invalid-signature",
            "Invalid signature",
            detail,
        ),
    )
}

fn malformed(state: &ReceiptState, provider: &str, detail: impl Into<String>) -> Response {
    refused(
        state,
        provider,
        "malformed",
        Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed-receipt",
            "Malformed receipt",
            detail,
        ),
    )
}

fn unconfigured(state: &ReceiptState, provider: &str, setting: &str) -> Response {
    refused(
        state,
        provider,
        "unconfigured",
        Problem::unavailable(format!("receipts.{setting} is not configured")),
    )
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `POST /webhooks/sendgrid`: a JSON array of Event Webhook events.
async fn sendgrid(
    State(state): State<ReceiptState>,
    headers: HeaderMap,
    body: Result<RawBody, Problem>,
) -> Response {
    let Some(key) = state.keys.sendgrid.as_ref() else {
        return unconfigured(&state, SENDGRID, "sendgrid_verification_key");
    };
    let body = match body {
        Ok(RawBody(b)) => b,
        Err(p) => return refused(&state, SENDGRID, "malformed", p),
    };
    let (Some(signature), Some(timestamp)) = (
        header_str(&headers, SENDGRID_SIGNATURE_HEADER),
        header_str(&headers, SENDGRID_TIMESTAMP_HEADER),
    ) else {
        return invalid_signature(&state, SENDGRID, "missing signature or timestamp header");
    };
    let Ok(ts) = timestamp.trim().parse::<i64>() else {
        return invalid_signature(&state, SENDGRID, "unreadable timestamp");
    };
    if !skew_ok(ts, Utc::now().timestamp(), state.keys.max_skew_secs) {
        return invalid_signature(&state, SENDGRID, "timestamp outside the allowed skew");
    }
    if !verify_sendgrid(key, timestamp, &body, signature) {
        return invalid_signature(&state, SENDGRID, "signature does not match");
    }
    let events: Vec<Value> = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return malformed(
                &state,
                SENDGRID,
                format!("expected a JSON array of events: {e}"),
            );
        }
    };
    let receipts = events.iter().map(sendgrid_receipt).collect();
    state.apply_all(receipts).await
}

/// One SendGrid event as a [`Receipt`]. Fields are read leniently: an event
/// without the fields Herald needs matches nothing and is only counted.
fn sendgrid_receipt(v: &Value) -> Receipt {
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    let event = s("event").unwrap_or_default();
    let effect = sendgrid_effect(event, s("type"), s("reason"));
    let sg_message_id = identifier(s("sg_message_id"));
    let mut message_ids = Vec::new();
    if let Some(full) = &sg_message_id {
        // `<X-Message-Id>.filter…`: the part before the first dot is what
        // the mail send API returned.
        if let Some((prefix, _)) = full.split_once('.')
            && !prefix.is_empty()
        {
            message_ids.push(prefix.to_string());
        }
        message_ids.push(full.clone());
    }
    let timestamp = v.get("timestamp").and_then(Value::as_i64);
    let receipt_id = identifier(s("sg_event_id")).unwrap_or_else(|| {
        format!(
            "{}:{event}:{}",
            sg_message_id.as_deref().unwrap_or_default(),
            timestamp.unwrap_or_default()
        )
    });
    let detail = [s("status"), s("reason")]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    Receipt {
        provider: SENDGRID,
        receipt_id,
        notification_id: identifier(s("notification_id")),
        message_ids,
        channel: Some(Channel::Email),
        effect,
        detail: clean_detail(&detail),
        occurred_at: timestamp.and_then(|t| DateTime::from_timestamp(t, 0)),
        address: s("email").map(str::to_string),
    }
}

/// `POST /webhooks/twilio`: a status callback (form-encoded).
async fn twilio(
    State(state): State<ReceiptState>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<RawBody, Problem>,
) -> Response {
    let (Some(token), Some(base)) = (
        state.keys.twilio_token.as_ref(),
        state.keys.public_base_url.as_deref(),
    ) else {
        return unconfigured(
            &state,
            TWILIO,
            "twilio_auth_token and receipts.public_base_url",
        );
    };
    let body = match body {
        Ok(RawBody(b)) => b,
        Err(p) => return refused(&state, TWILIO, "malformed", p),
    };
    let Some(signature) = header_str(&headers, TWILIO_SIGNATURE_HEADER) else {
        return invalid_signature(&state, TWILIO, "missing X-Twilio-Signature");
    };
    let params: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let url = format!("{base}{path}");
    if !verify_twilio(token.expose_secret(), &url, &params, signature) {
        return invalid_signature(&state, TWILIO, "signature does not match");
    }
    let get = |k: &str| {
        params
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.as_str())
    };
    let (Some(sid), Some(status)) = (
        identifier(get("MessageSid").or_else(|| get("SmsSid"))),
        get("MessageStatus").or_else(|| get("SmsStatus")),
    ) else {
        return malformed(&state, TWILIO, "MessageSid and MessageStatus are required");
    };
    let error_code = get("ErrorCode").and_then(|c| c.trim().parse::<u32>().ok());
    let receipt = Receipt {
        provider: TWILIO,
        receipt_id: format!("{sid}:{status}"),
        notification_id: None,
        message_ids: vec![sid],
        channel: Some(Channel::Sms),
        effect: twilio_effect(status, error_code),
        detail: error_code.and_then(|c| clean_detail(&format!("Twilio error {c}"))),
        occurred_at: None,
        address: get("To").map(str::to_string),
    };
    state.apply_all(vec![receipt]).await
}

/// The body of a generic receipt (`schemas/receipt.v1.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericReceipt {
    pub notification_id: Option<String>,
    pub provider_message_id: Option<String>,
    pub status: GenericStatus,
    pub bounce_type: Option<BounceType>,
    pub reason: Option<String>,
    pub occurred_at: Option<DateTime<Utc>>,
}

static RECEIPT_VALIDATOR: LazyLock<Result<jsonschema::Validator, String>> = LazyLock::new(|| {
    let schema: Value = serde_json::from_str(RECEIPT_SCHEMA)
        .map_err(|e| format!("schema receipt.v1.json is not JSON: {e}"))?;
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .map_err(|e| format!("schema receipt.v1.json does not compile: {e}"))
});

/// Validates a generic receipt against `receipt.v1.json`; the error lists
/// the first violations by JSON pointer (input values masked).
pub fn validate_receipt(v: &Value) -> Result<(), String> {
    let validator = RECEIPT_VALIDATOR.as_ref().map_err(Clone::clone)?;
    let errors: Vec<String> = validator
        .iter_errors(v)
        .take(5)
        .map(|e| {
            let path = e.instance_path().to_string();
            let path = if path.is_empty() { "/".into() } else { path };
            format!("{path}: {}", e.masked())
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Parses and validates a generic receipt body.
pub fn parse_generic(body: &[u8]) -> Result<GenericReceipt, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    validate_receipt(&v)?;
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// `POST /webhooks/generic`: one receipt, Standard Webhooks signed.
async fn generic(
    State(state): State<ReceiptState>,
    headers: HeaderMap,
    body: Result<RawBody, Problem>,
) -> Response {
    let Some(key) = state.keys.generic.as_ref() else {
        return unconfigured(&state, GENERIC, "signing_secret");
    };
    let body = match body {
        Ok(RawBody(b)) => b,
        Err(p) => return refused(&state, GENERIC, "malformed", p),
    };
    let receipt_id = match verify_generic(
        key.expose_secret(),
        &headers,
        &body,
        Utc::now().timestamp(),
        state.keys.max_skew_secs,
    ) {
        Ok(id) => id,
        Err(GenericSignatureError::MissingHeaders) => {
            return invalid_signature(&state, GENERIC, "missing or unreadable webhook-* headers");
        }
        Err(GenericSignatureError::Stale) => {
            return invalid_signature(&state, GENERIC, "timestamp outside the allowed skew");
        }
        Err(GenericSignatureError::Mismatch) => {
            return invalid_signature(&state, GENERIC, "signature does not match");
        }
    };
    let g = match parse_generic(&body) {
        Ok(g) => g,
        Err(e) => return malformed(&state, GENERIC, e),
    };
    let receipt = Receipt {
        provider: GENERIC,
        receipt_id,
        notification_id: g.notification_id,
        message_ids: g.provider_message_id.into_iter().collect(),
        channel: None,
        effect: generic_effect(g.status, g.bounce_type),
        detail: g.reason.as_deref().and_then(clean_detail),
        occurred_at: g.occurred_at,
        address: None,
    };
    state.apply_all(vec![receipt]).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;
    use p256::pkcs8::EncodePublicKey;

    fn key_pair() -> (SigningKey, String) {
        let sk = loop {
            if let Ok(k) = SigningKey::from_slice(&rand::random::<[u8; 32]>()) {
                break k;
            }
        };
        let der = VerifyingKey::from(&sk).to_public_key_der().unwrap();
        (sk, BASE64.encode(der.as_bytes()))
    }

    fn sign_sendgrid(sk: &SigningKey, ts: &str, body: &[u8]) -> String {
        let mut m = ts.as_bytes().to_vec();
        m.extend_from_slice(body);
        let sig: Signature = sk.sign(&m);
        BASE64.encode(sig.to_der().as_bytes())
    }

    #[test]
    fn sendgrid_signature_over_timestamp_and_body() {
        let (sk, public) = key_pair();
        let key = sendgrid_key(&public).unwrap();
        let body = br#"[{"event":"delivered","sg_message_id":"abc.filter1"}]"#;
        let sig = sign_sendgrid(&sk, "1700000000", body);
        assert!(verify_sendgrid(&key, "1700000000", body, &sig));
        // Another timestamp, a changed body, garbage, another key: refused.
        assert!(!verify_sendgrid(&key, "1700000001", body, &sig));
        assert!(!verify_sendgrid(
            &key,
            "1700000000",
            br#"[{"event":"bounce"}]"#,
            &sig
        ));
        assert!(!verify_sendgrid(&key, "1700000000", body, "not base64!"));
        assert!(!verify_sendgrid(
            &key,
            "1700000000",
            body,
            &BASE64.encode(b"not der")
        ));
        let (_, other) = key_pair();
        assert!(!verify_sendgrid(
            &sendgrid_key(&other).unwrap(),
            "1700000000",
            body,
            &sig
        ));
    }

    /// The test vector of SendGrid's own helper libraries (key, timestamp,
    /// signature and payload), checked against OpenSSL as well.
    #[test]
    fn sendgrid_known_answer() {
        let key = sendgrid_key(
            "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEDr2LjtURuePQzplybdC+u4CwrqDqBaWjcMMsTbhdbcwHBcepxo7yAQGhHPTnlvFYPAZFceEu/1FwCM/QmGUhA==",
        )
        .unwrap();
        let sig = "MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRamr2nlxFDWYNH2j/0=";
        let payload =
            br#"{"category":"example_payload","event":"test_event","message_id":"message_id"}"#;
        assert!(verify_sendgrid(&key, "1588788367", payload, sig));
        assert!(!verify_sendgrid(&key, "1588788368", payload, sig));
    }

    #[test]
    fn sendgrid_key_formats() {
        let (_, public) = key_pair();
        let (a, b) = public.split_at(64);
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{a}\n{b}\n-----END PUBLIC KEY-----\n");
        assert_eq!(sendgrid_key(&pem).unwrap(), sendgrid_key(&public).unwrap());
        assert!(sendgrid_key("not a key").is_err());
        assert!(sendgrid_key(&BASE64.encode([1u8; 91])).is_err());
    }

    /// Twilio's documented example: auth token `12345`, this URL and these
    /// parameters sign to `0/KCTR6DLpKmkAf8muzZqo1nDgQ=`.
    #[test]
    fn twilio_known_answer() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let params: Vec<(String, String)> = [
            ("Digits", "1234"),
            ("To", "+18005551212"),
            ("From", "+12349013030"),
            ("Caller", "+12349013030"),
            ("CallSid", "CA1234567890ABCDE"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            twilio_signature(b"12345", url, &params),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
        assert!(verify_twilio(
            b"12345",
            url,
            &params,
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        ));
        assert!(!verify_twilio(
            b"12346",
            url,
            &params,
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        ));
        assert!(!verify_twilio(
            b"12345",
            "https://mycompany.com/myapp.php?foo=1&bar=3",
            &params,
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        ));
        let mut changed = params.clone();
        changed[0].1 = "1235".into();
        assert!(!verify_twilio(
            b"12345",
            url,
            &changed,
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        ));
        assert!(!verify_twilio(b"12345", url, &params, "garbage"));
    }

    fn generic_headers(key: &[u8], id: &str, ts: i64, body: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("webhook-id", id.parse().unwrap());
        h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        let sig = webhook::sign(key, id, ts, body);
        h.insert(
            "webhook-signature",
            format!("v1,AAAA {sig}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn generic_signature_standard_webhooks() {
        let key = webhook::signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"provider_message_id":"m-1","status":"delivered"}"#;
        let now = 1_700_000_000;
        let h = generic_headers(&key, "msg_1", now, body);
        assert_eq!(verify_generic(&key, &h, body, now, 300), Ok("msg_1".into()));
        assert_eq!(
            verify_generic(&key, &h, body, now + 300, 300),
            Ok("msg_1".into())
        );
        assert_eq!(
            verify_generic(&key, &h, body, now + 301, 300),
            Err(GenericSignatureError::Stale)
        );
        assert_eq!(
            verify_generic(&key, &h, br#"{"status":"bounced"}"#, now, 300),
            Err(GenericSignatureError::Mismatch)
        );
        assert_eq!(
            verify_generic(b"other", &h, body, now, 300),
            Err(GenericSignatureError::Mismatch)
        );
        let mut missing = h.clone();
        missing.remove("webhook-id");
        assert_eq!(
            verify_generic(&key, &missing, body, now, 300),
            Err(GenericSignatureError::MissingHeaders)
        );
        // The example of the Standard Webhooks specification, through the
        // same code path.
        let spec_body = br#"{"test": 2432232314}"#;
        let mut spec = HeaderMap::new();
        spec.insert(
            "webhook-id",
            "msg_p5jXN8AQM9LWM0D4loKWxJek".parse().unwrap(),
        );
        spec.insert("webhook-timestamp", "1614265330".parse().unwrap());
        spec.insert(
            "webhook-signature",
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
                .parse()
                .unwrap(),
        );
        assert!(verify_generic(&key, &spec, spec_body, 1614265330, 300).is_ok());
    }

    type SendgridCase = (
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
        &'static str,
        Option<Status>,
        Option<Suppression>,
    );

    #[test]
    #[rustfmt::skip]
    fn sendgrid_mapping_table() {
        use Suppression::*;
        let cases: &[SendgridCase] = &[
            // event, type, reason → label, status, suppression
            ("delivered", None, None, "delivered", Some(Status::Delivered), None),
            ("bounce", Some("bounce"), None, "bounced", Some(Status::Bounced), Some(HardBounce)),
            ("bounce", None, None, "bounced", Some(Status::Bounced), Some(HardBounce)),
            ("bounce", Some("blocked"), None, "soft_bounce", None, None),
            ("blocked", None, None, "soft_bounce", None, None),
            ("deferred", None, None, "deferred", None, None),
            ("dropped", None, Some("Invalid SMTPAPI header"), "dropped", Some(Status::Failed), None),
            ("dropped", None, Some("Bounced Address"), "dropped", Some(Status::Failed), Some(HardBounce)),
            ("dropped", None, Some("Spam Reporting Address"), "dropped", Some(Status::Failed), Some(SpamComplaint)),
            ("dropped", None, Some("Unsubscribed Address"), "dropped", Some(Status::Failed), Some(Unsubscribed)),
            ("spamreport", None, None, "spam_complaint", None, Some(SpamComplaint)),
            ("unsubscribe", None, None, "unsubscribed", None, Some(Unsubscribed)),
            ("group_unsubscribe", None, None, "other", None, None),
            ("processed", None, None, "accepted", None, None),
            ("open", None, None, "open", None, None),
            ("click", None, None, "click", None, None),
            ("something_new", None, None, "other", None, None),
        ];
        for (event, kind, reason, label, status, suppress) in cases {
            let e = sendgrid_effect(event, *kind, *reason);
            assert_eq!((e.label, e.status, e.suppress), (*label, *status, *suppress), "{event} {kind:?} {reason:?}");
            // Bounced and failed outcomes carry an error code, nothing else does.
            assert_eq!(e.error_code.is_some(), matches!(status, Some(Status::Bounced | Status::Failed)));
        }
    }

    type TwilioCase = (
        &'static str,
        Option<u32>,
        &'static str,
        Option<Status>,
        Option<Suppression>,
        Option<&'static str>,
    );

    #[test]
    #[rustfmt::skip]
    fn twilio_mapping_table() {
        use Suppression::*;
        let cases: &[TwilioCase] = &[
            // MessageStatus, ErrorCode → label, status, suppression, error code
            ("delivered", None, "delivered", Some(Status::Delivered), None, None),
            ("read", None, "delivered", Some(Status::Delivered), None, None),
            ("undelivered", Some(30006), "bounced", Some(Status::Bounced), Some(HardBounce), Some("hard_bounce")),
            ("undelivered", Some(30005), "bounced", Some(Status::Bounced), Some(HardBounce), Some("hard_bounce")),
            ("failed", Some(21211), "bounced", Some(Status::Bounced), Some(HardBounce), Some("hard_bounce")),
            ("failed", Some(21614), "bounced", Some(Status::Bounced), Some(HardBounce), Some("hard_bounce")),
            ("failed", Some(21610), "failed", Some(Status::Failed), Some(Unsubscribed), Some("recipient_unsubscribed")),
            ("undelivered", Some(30003), "failed", Some(Status::Failed), None, Some("provider_undelivered")),
            ("undelivered", None, "failed", Some(Status::Failed), None, Some("provider_undelivered")),
            ("failed", None, "failed", Some(Status::Failed), None, Some("provider_failed")),
            ("queued", None, "accepted", None, None, None),
            ("sending", None, "accepted", None, None, None),
            ("sent", None, "accepted", None, None, None),
            ("canceled", None, "other", None, None, None),
        ];
        for (status, code, label, to, suppress, error) in cases {
            let e = twilio_effect(status, *code);
            assert_eq!((e.label, e.status, e.suppress, e.error_code), (*label, *to, *suppress, *error), "{status} {code:?}");
        }
    }

    #[test]
    fn generic_mapping_table() {
        use BounceType::*;
        use GenericStatus::*;
        assert_eq!(generic_effect(Delivered, None), Effect::DELIVERED);
        assert_eq!(generic_effect(Bounced, Some(Hard)), Effect::HARD_BOUNCE);
        assert_eq!(generic_effect(Bounced, None), Effect::HARD_BOUNCE);
        assert!(generic_effect(Bounced, Some(Soft)).is_noop());
        let f = generic_effect(Failed, None);
        assert_eq!((f.status, f.suppress), (Some(Status::Failed), None));
    }

    #[test]
    fn transitions_are_monotonic() {
        use Status::*;
        use Transition::*;
        for to in [Delivered, Bounced, Failed] {
            assert_eq!(transition(Sent, to), Apply, "sent → {to}");
            assert_eq!(transition(to, to), Duplicate, "{to} → {to}");
            assert_eq!(transition(Sending, to), Pending);
            assert_eq!(transition(Accepted, to), Pending);
        }
        assert_eq!(transition(Delivered, Bounced), Apply);
        assert_eq!(transition(Delivered, Failed), Ignore);
        // Nothing leaves a final status.
        for from in [Bounced, Failed] {
            for to in [Delivered, Bounced, Failed] {
                assert_ne!(transition(from, to), Apply, "{from} → {to}");
            }
        }
        // Never sent by a provider: nothing to change.
        for from in [
            Suppressed, Rejected, Expired, Cancelled, Scheduled, Deferred, Throttled, Retrying,
        ] {
            assert_eq!(transition(from, Delivered), Ignore, "{from}");
        }
    }

    #[test]
    fn event_ids_are_deterministic() {
        let a = event_id("sendgrid", "ev-1", "n-1", Status::Delivered);
        assert_eq!(a, event_id("sendgrid", "ev-1", "n-1", Status::Delivered));
        assert_ne!(a, event_id("sendgrid", "ev-2", "n-1", Status::Delivered));
        assert_ne!(a, event_id("twilio", "ev-1", "n-1", Status::Delivered));
        assert_ne!(a, event_id("sendgrid", "ev-1", "n-1", Status::Bounced));
    }

    #[test]
    fn sendgrid_events_are_read_leniently() {
        let v: Value = serde_json::json!({
            "event": "bounce", "type": "bounce", "email": "a@example.com",
            "timestamp": 1700000000, "sg_event_id": "ev-9",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
            "reason": "550 5.1.1 unknown user\r\n", "status": "5.1.1",
            "notification_id": "req-1"
        });
        let r = sendgrid_receipt(&v);
        assert_eq!(r.message_ids[0], "14c5d75ce93");
        assert_eq!(r.message_ids.len(), 2);
        assert_eq!(r.receipt_id, "ev-9");
        assert_eq!(r.notification_id.as_deref(), Some("req-1"));
        assert_eq!(r.detail.as_deref(), Some("5.1.1 550 5.1.1 unknown user"));
        assert_eq!(r.occurred_at.map(|t| t.timestamp()), Some(1700000000));
        // No ids at all: matches nothing, still a receipt.
        let r = sendgrid_receipt(&serde_json::json!({"event": "open", "notification_id": 7}));
        assert!(r.message_ids.is_empty() && r.notification_id.is_none());
        assert!(r.effect.is_noop());
    }

    #[test]
    fn generic_receipts_follow_the_schema() {
        let ok = parse_generic(br#"{"notification_id":"n-1","status":"bounced","bounce_type":"soft","reason":"mailbox full","occurred_at":"2026-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!(ok.bounce_type, Some(BounceType::Soft));
        for bad in [
            &br#"{"status":"delivered"}"#[..],
            br#"{"provider_message_id":"m","status":"opened"}"#,
            br#"{"provider_message_id":"m","status":"delivered","bounce_type":"hard"}"#,
            br#"{"provider_message_id":"m","status":"delivered","extra":1}"#,
            br#"{"provider_message_id":"","status":"delivered"}"#,
            br#"{"provider_message_id":"m","status":"delivered","occurred_at":"yesterday"}"#,
            br#"[]"#,
            br#"{"#,
        ] {
            assert!(
                parse_generic(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
