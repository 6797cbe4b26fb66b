//! FCM adapter: one push notification becomes one FCM HTTP v1 call per
//! device token of the recipient
//! (`POST /v1/projects/{project}/messages:send`, OAuth bearer token).
//!
//! Owns: the provider's config and the Google service-account key it takes
//! as credentials, minting the access token (an RS256-signed JWT exchanged
//! with the JWT-bearer grant, cached until a minute before it expires,
//! minted by one caller at a time, dropped and re-minted once when FCM
//! answers 401), the message body, FCM's per-token errors
//! (`fcm_unregistered`, `fcm_invalid_argument`, …) and how the per-token
//! results combine into one result: any token accepted is a success.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::http::{self, permanent};
use super::{AdapterConfigError, AdapterContext, ChannelAdapter, SendError, SendReceipt, spec};
use crate::domain::{Channel, Notification};
use crate::render::RenderedContent;
use crate::routing::ProviderSpec;

/// Where the API lives when the config does not say.
pub const DEFAULT_BASE_URL: &str = "https://fcm.googleapis.com";

/// Google's token endpoint when the key file names none.
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

/// The OAuth scope FCM sends need.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// The OAuth 2.0 JWT-bearer grant type (RFC 7523).
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Lifetime asked for in the JWT (Google's maximum).
const ASSERTION_LIFETIME_SECS: i64 = 3600;

/// A cached token is replaced this long before it expires.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Device tokens of one recipient sent to concurrently.
const TOKEN_CONCURRENCY: usize = 8;

/// Data keys FCM reserves (it rejects the message when they are present).
const RESERVED_DATA_KEYS: &[&str] = &["from", "notification", "message_type", "collapse_key"];

/// The provider's `config` JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    /// API root; default [`DEFAULT_BASE_URL`].
    pub base_url: Option<String>,
    /// Firebase project; default the key's `project_id`.
    pub project_id: Option<String>,
    /// Timeout of each call (token and send) in milliseconds; default 10 000.
    pub timeout_ms: Option<u64>,
}

/// The provider's `credentials` JSON: a Google service-account key file as
/// downloaded. Fields Herald does not use are accepted so the file can be
/// stored unchanged.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // fields listed to accept the key file as Google writes it
struct ServiceAccountKey {
    #[serde(rename = "type")]
    kind: Option<String>,
    project_id: Option<String>,
    private_key_id: Option<String>,
    private_key: SecretString,
    client_email: String,
    client_id: Option<String>,
    auth_uri: Option<String>,
    token_uri: Option<String>,
    auth_provider_x509_cert_url: Option<String>,
    client_x509_cert_url: Option<String>,
    universe_domain: Option<String>,
}

/// The FCM push adapter. Cheap to share behind an `Arc`.
pub struct FcmAdapter {
    /// The registered provider's name, recorded on attempts.
    name: String,
    /// Shared-style API client (see [`http::client`]).
    client: reqwest::Client,
    /// `{base}/v1/projects/{project}/messages:send`.
    send_url: String,
    /// Mints and caches the access token.
    tokens: TokenSource,
}

impl std::fmt::Debug for FcmAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmAdapter")
            .field("name", &self.name)
            .field("send_url", &self.send_url)
            .field("client_email", &self.tokens.client_email)
            .field("token_uri", &self.tokens.token_uri)
            .finish_non_exhaustive()
    }
}

/// Access tokens for one service account.
struct TokenSource {
    /// The same client as the sends.
    client: reqwest::Client,
    /// Token endpoint, also the JWT's `aud`.
    token_uri: String,
    /// The JWT's `iss`.
    client_email: String,
    /// The JWT's `kid` header (the key file's `private_key_id`).
    key_id: Option<String>,
    /// RSA private key, parsed once.
    key: EncodingKey,
    /// The current token. The lock is held while minting, so concurrent
    /// sends wait for one token request instead of each making their own.
    cache: tokio::sync::Mutex<Option<CachedToken>>,
}

/// An access token and when to stop using it.
struct CachedToken {
    /// Shared so a failed send can tell whether the cache still holds the
    /// token it used.
    value: Arc<SecretString>,
    /// `expires_in` minus [`REFRESH_MARGIN`] after the token was requested.
    use_until: Instant,
}

/// The JWT claims of the token request.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

/// A token endpoint's answer.
#[derive(Deserialize)]
struct TokenReply {
    access_token: String,
    expires_in: Option<u64>,
}

/// An OAuth error: `{"error": "invalid_grant", "error_description": "…"}`.
#[derive(Deserialize)]
struct OAuthError {
    error: String,
    error_description: Option<String>,
}

impl TokenSource {
    /// A valid access token, from the cache or freshly minted.
    async fn get(&self) -> Result<Arc<SecretString>, SendError> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref()
            && Instant::now() < c.use_until
        {
            return Ok(c.value.clone());
        }
        let fresh = self.mint().await?;
        let value = fresh.value.clone();
        *cache = Some(fresh);
        Ok(value)
    }

    /// Forgets `used` if it is still the cached token (a concurrent send may
    /// have replaced it already).
    async fn invalidate(&self, used: &Arc<SecretString>) {
        let mut cache = self.cache.lock().await;
        if cache.as_ref().is_some_and(|c| Arc::ptr_eq(&c.value, used)) {
            *cache = None;
        }
    }

    /// The signed JWT assertion for a token request issued at `iat`.
    fn assertion(&self, iat: i64) -> Result<String, SendError> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.key_id.clone();
        let claims = Claims {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME_SECS,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| permanent("provider_auth", format!("signing the token request: {e}")))
    }

    /// Exchanges a fresh assertion for an access token.
    async fn mint(&self) -> Result<CachedToken, SendError> {
        let requested = Instant::now();
        let assertion = self.assertion(chrono::Utc::now().timestamp())?;
        let reply = http::execute(
            self.client
                .post(&self.token_uri)
                .form(&[("grant_type", GRANT_TYPE), ("assertion", &assertion)]),
        )
        .await?;
        if !reply.status.is_success() {
            let detail = reply
                .json::<OAuthError>()
                .map(|e| match e.error_description {
                    Some(d) => format!("token request refused: {}: {d}", e.error),
                    None => format!("token request refused: {}", e.error),
                });
            let message = reply.describe(detail.as_deref());
            if reply.status.is_client_error()
                && reply.status != reqwest::StatusCode::TOO_MANY_REQUESTS
                && reply.status != reqwest::StatusCode::REQUEST_TIMEOUT
            {
                // A wrong key, account or clock: every send fails the same way.
                return Err(permanent("provider_auth", message));
            }
            http::classify_status(reply.status, &reply.headers, &message)?;
        }
        let token: TokenReply = reply.json().ok_or_else(|| SendError::Retryable {
            code: "provider_error".into(),
            message: "token endpoint answered without an access_token".into(),
            retry_after: None,
        })?;
        let lifetime = Duration::from_secs(token.expires_in.unwrap_or(3600));
        Ok(CachedToken {
            value: Arc::new(SecretString::from(token.access_token)),
            use_until: requested + lifetime.saturating_sub(REFRESH_MARGIN),
        })
    }
}

/// True for a Firebase project id (lowercase letters, digits, `-`), which
/// is safe in a URL path.
fn is_project_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl FcmAdapter {
    /// Builds the adapter of a registered `fcm` provider. The key is parsed
    /// here; no token is requested until the first send or check.
    pub fn from_spec(
        provider: &ProviderSpec,
        _ctx: &AdapterContext,
    ) -> Result<Self, AdapterConfigError> {
        let config: FcmConfig = spec::config(provider)?;
        let key: ServiceAccountKey = spec::credentials(provider)?;
        let bad = |m: String| spec::invalid(provider, m);
        if key.kind.as_deref().is_some_and(|k| k != "service_account") {
            return Err(bad("credentials.type must be `service_account`".into()));
        }
        let project_id = match (&config.project_id, &key.project_id) {
            (Some(p), _) => ("config.project_id", p.as_str()),
            (None, Some(p)) => ("credentials.project_id", p.as_str()),
            (None, None) => {
                return Err(bad(
                    "config.project_id: missing (and the key has no project_id)".into(),
                ));
            }
        };
        if !is_project_id(project_id.1) {
            return Err(bad(format!(
                "{}: must be lowercase letters, digits and `-`",
                project_id.0
            )));
        }
        if key.client_email.trim().is_empty() {
            return Err(bad("credentials.client_email must not be empty".into()));
        }
        // The parse error says what is wrong with the key, never its bytes;
        // print a fixed text anyway.
        let encoding_key = EncodingKey::from_rsa_pem(key.private_key.expose_secret().as_bytes())
            .map_err(|_| {
                bad("credentials.private_key: not an RSA private key in PEM form".into())
            })?;
        let token_uri = key
            .token_uri
            .as_deref()
            .map(str::trim)
            .unwrap_or(DEFAULT_TOKEN_URI)
            .to_string();
        http::base_url("credentials.token_uri", &token_uri).map_err(bad)?;
        let base_url = http::base_url(
            "config.base_url",
            config.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL),
        )
        .map_err(bad)?;
        let timeout = spec::timeout(provider, config.timeout_ms)?;
        let client = http::client(timeout).map_err(|e| bad(format!("http client: {e}")))?;
        Ok(FcmAdapter {
            name: provider.name.clone(),
            send_url: format!("{base_url}/v1/projects/{}/messages:send", project_id.1),
            tokens: TokenSource {
                client: client.clone(),
                token_uri,
                client_email: key.client_email.trim().to_string(),
                key_id: key.private_key_id,
                key: encoding_key,
                cache: tokio::sync::Mutex::new(None),
            },
            client,
        })
    }

    /// Sends to one device token; a 401 drops the cached access token and
    /// tries once more with a fresh one.
    async fn send_to(&self, message: &Message<'_>) -> Result<String, SendError> {
        let mut refreshed = false;
        loop {
            let access = self.tokens.get().await?;
            let reply = http::execute(
                self.client
                    .post(&self.send_url)
                    .bearer_auth(access.expose_secret())
                    .json(&Envelope { message }),
            )
            .await?;
            // THIRD_PARTY_AUTH_ERROR (also a 401) is about the app's APNs or
            // web-push credentials, not our access token.
            let token_refused = reply.status == reqwest::StatusCode::UNAUTHORIZED
                && error_code(&reply).is_none_or(|(c, _)| c != "THIRD_PARTY_AUTH_ERROR");
            if token_refused && !refreshed {
                tracing::debug!(provider = %self.name, "FCM refused the access token; minting a new one");
                self.tokens.invalidate(&access).await;
                refreshed = true;
                continue;
            }
            check_reply(&reply)?;
            #[derive(Deserialize)]
            struct Sent {
                name: String,
            }
            return reply
                .json::<Sent>()
                .map(|s| s.name)
                .ok_or_else(|| SendError::Retryable {
                    code: "provider_error".into(),
                    message: "FCM accepted the message but returned no name".into(),
                    retry_after: None,
                });
        }
    }
}

/// `{"message": …}`, the body of `messages:send`.
#[derive(Serialize)]
struct Envelope<'a> {
    message: &'a Message<'a>,
}

/// One FCM message (HTTP v1 `Message` resource).
#[derive(Debug, Serialize)]
struct Message<'a> {
    token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification: Option<PushNotification<'a>>,
    data: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct PushNotification<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
}

/// The `data` map: `notification_id` plus the rendered data's top-level
/// scalars as strings (FCM takes string values only). Keys FCM reserves
/// are left out.
fn data(
    notification: &Notification,
    content: &RenderedContent,
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    let mut out = serde_json::Map::new();
    if let Value::Object(map) = &content.data {
        for (k, v) in map {
            let lower = k.to_ascii_lowercase();
            if RESERVED_DATA_KEYS.contains(&lower.as_str())
                || lower.starts_with("google")
                || lower.starts_with("gcm")
            {
                continue;
            }
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Null | Value::Array(_) | Value::Object(_) => continue,
            };
            out.insert(k.clone(), Value::String(text));
        }
    }
    out.insert(
        "notification_id".into(),
        Value::String(notification.id.clone()),
    );
    out
}

/// FCM's error body (google.rpc.Status with `FcmError` details).
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorStatus,
}

#[derive(Deserialize)]
struct ErrorStatus {
    message: Option<String>,
    status: Option<String>,
    #[serde(default)]
    details: Vec<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "errorCode")]
    error_code: Option<String>,
}

/// FCM's error code for a failed reply: the `FcmError` detail's
/// `errorCode`, else the RPC status (`NOT_FOUND`, …).
fn error_code(reply: &http::Reply) -> Option<(String, Option<String>)> {
    let error = reply.json::<ErrorBody>()?.error;
    let code = error
        .details
        .iter()
        .find_map(|d| d.error_code.clone())
        .or(error.status)?;
    Some((code, error.message))
}

/// Maps FCM's answer for one token: an unregistered token, an invalid
/// argument, a sender mismatch or an APNs/web-push credential problem are
/// permanent (`fcm_*`); the rest follows the shared mapping.
fn check_reply(reply: &http::Reply) -> Result<(), SendError> {
    if reply.status.is_success() {
        return Ok(());
    }
    let error = error_code(reply);
    let fcm_code = error.as_ref().map(|(c, _)| c.as_str());
    let detail = error.as_ref().map(|(c, m)| match m {
        Some(m) => format!("{c}: {m}"),
        None => c.clone(),
    });
    let message = reply.describe(detail.as_deref());
    let code = match (reply.status.as_u16(), fcm_code) {
        (_, Some("UNREGISTERED")) | (404, _) => Some("fcm_unregistered"),
        (_, Some("SENDER_ID_MISMATCH")) => Some("fcm_sender_id_mismatch"),
        (_, Some("THIRD_PARTY_AUTH_ERROR")) => Some("fcm_third_party_auth"),
        (400, _) | (_, Some("INVALID_ARGUMENT")) => Some("fcm_invalid_argument"),
        _ => None,
    };
    match code {
        Some(code) => Err(permanent(code, message)),
        None => http::classify_status(reply.status, &reply.headers, &message),
    }
}

/// Combines per-token results: any success wins; otherwise a rate limit,
/// then a retryable failure (with the longest `retry_after`), then the
/// first permanent failure.
fn combine(results: Vec<Result<String, SendError>>) -> Result<Vec<String>, SendError> {
    let mut names = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(n) => names.push(n),
            Err(e) => errors.push(e),
        }
    }
    if !names.is_empty() {
        return Ok(names);
    }
    let longest = |pick: fn(&SendError) -> bool, errors: &[SendError]| {
        errors
            .iter()
            .filter(|e| pick(e))
            .max_by_key(|e| e.retry_after())
            .cloned()
    };
    if let Some(e) = longest(|e| matches!(e, SendError::RateLimited { .. }), &errors) {
        return Err(e);
    }
    if let Some(e) = longest(|e| matches!(e, SendError::Retryable { .. }), &errors) {
        return Err(e);
    }
    Err(errors
        .into_iter()
        .next()
        .unwrap_or_else(|| permanent("no_address", "recipient has no device tokens")))
}

/// The last characters of a device token, enough to find it in a log
/// without writing the whole address down.
fn token_hint(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    let tail: String = chars[chars.len().saturating_sub(6)..].iter().collect();
    format!("…{tail}")
}

#[async_trait]
impl ChannelAdapter for FcmAdapter {
    fn channel(&self) -> Channel {
        Channel::Push
    }

    fn provider(&self) -> &str {
        &self.name
    }

    async fn send(
        &self,
        notification: &Notification,
        content: &RenderedContent,
    ) -> Result<SendReceipt, SendError> {
        let tokens = &notification.recipient.device_tokens;
        if tokens.is_empty() {
            return Err(permanent("no_address", "recipient has no device tokens"));
        }
        let push =
            (content.subject.is_some() || content.text.is_some()).then_some(PushNotification {
                title: content.subject.as_deref(),
                body: content.text.as_deref(),
            });
        let data = data(notification, content);
        let messages: Vec<Message<'_>> = tokens
            .iter()
            .map(|token| Message {
                token,
                notification: push,
                data: data.clone(),
            })
            .collect();
        let mut results: Vec<Result<String, SendError>> = Vec::with_capacity(messages.len());
        for chunk in messages.chunks(TOKEN_CONCURRENCY) {
            results.extend(futures::future::join_all(chunk.iter().map(|m| self.send_to(m))).await);
        }
        let failed: Vec<(String, String)> = tokens
            .iter()
            .zip(&results)
            .filter_map(|(t, r)| {
                r.as_ref()
                    .err()
                    .map(|e| (token_hint(t), e.code().to_string()))
            })
            .collect();
        let names = combine(results)?;
        if !failed.is_empty() {
            tracing::warn!(
                provider = %self.name,
                notification_id = %notification.id,
                sent = names.len(),
                failed = ?failed,
                "some device tokens were not accepted"
            );
        }
        Ok(SendReceipt {
            provider: self.name.clone(),
            provider_message_id: Some(names.join(",")),
        })
    }

    /// Mints an access token: the key, account and token endpoint work.
    async fn check(&self) -> Result<(), SendError> {
        self.tokens.get().await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retryable(secs: u64) -> SendError {
        SendError::Retryable {
            code: "provider_unavailable".into(),
            message: String::new(),
            retry_after: Some(Duration::from_secs(secs)),
        }
    }

    #[test]
    fn any_success_wins() {
        let r = combine(vec![
            Err(permanent("fcm_unregistered", "")),
            Ok("projects/p/messages/1".into()),
        ]);
        assert_eq!(r.unwrap(), vec!["projects/p/messages/1".to_string()]);
    }

    #[test]
    fn retryable_beats_permanent_and_keeps_the_longest_delay() {
        let e = combine(vec![
            Err(permanent("fcm_unregistered", "")),
            Err(retryable(1)),
            Err(retryable(5)),
        ])
        .unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(5)));
        let e = combine(vec![
            Err(retryable(9)),
            Err(SendError::RateLimited {
                message: String::new(),
                retry_after: Some(Duration::from_secs(2)),
            }),
        ])
        .unwrap_err();
        assert_eq!(e.code(), "rate_limited");
        let e = combine(vec![
            Err(permanent("fcm_unregistered", "")),
            Err(permanent("fcm_invalid_argument", "")),
        ])
        .unwrap_err();
        assert_eq!(e.code(), "fcm_unregistered");
    }

    #[test]
    fn token_hint_shows_only_the_tail() {
        assert_eq!(token_hint("abcdefghijkl"), "…ghijkl");
        assert_eq!(token_hint("ab"), "…ab");
    }
}
