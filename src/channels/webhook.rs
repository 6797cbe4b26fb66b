//! Webhook adapter: POSTs one notification as signed JSON to the recipient's
//! URL (Standard Webhooks signing), with SSRF protection.
//!
//! Owns: the request body shape, the `webhook-*` signature headers
//! ([`sign`], [`verify`]), the address classifier that keeps requests away
//! from loopback/private/link-local targets ([`is_forbidden_ip`]), the DNS
//! resolver that enforces it for host names, and the mapping of HTTP results
//! to [`SendError`]s.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretSlice};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ChannelAdapter, SendError, SendReceipt, http};
use crate::config::WebhookSettings;
use crate::domain::{Channel, Notification};
use crate::render::RenderedContent;

/// Provider name of the built-in adapter (`[webhook]` in herald.toml).
const PROVIDER: &str = "webhook";

/// How far a `webhook-timestamp` may be from now for [`verify`] to accept it.
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;

/// Headers Herald sets itself; `meta.headers` may not override them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "user-agent",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

type HmacSha256 = Hmac<Sha256>;

/// Why a [`WebhookAdapter`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WebhookConfigError {
    /// The signing secret starts with `whsec_` but the rest is not base64.
    #[error("webhook.signing_secret: the part after `whsec_` is not valid base64")]
    InvalidSecret,
    /// The signing secret is empty.
    #[error("webhook.signing_secret must not be empty")]
    EmptySecret,
    /// The HTTP client could not be built.
    #[error("webhook http client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The webhook channel adapter. Cheap to share behind an `Arc`; safe to
/// call concurrently (one pooled reqwest client inside).
pub struct WebhookAdapter {
    /// Provider name recorded on attempts: `webhook` for the built-in
    /// adapter, the registered name for one from the provider registry.
    provider: String,
    /// HTTP client: no redirects, no proxy, SSRF-checking resolver unless
    /// private targets are allowed, whole-request timeout.
    client: reqwest::Client,
    /// HMAC key decoded once from the configured secret.
    key: SecretSlice<u8>,
    /// Refuse loopback/private/link-local targets (see [`is_forbidden_ip`]).
    block_private: bool,
    /// Largest response body read; the rest is discarded.
    max_response_bytes: usize,
    /// Turns per receiver host (`webhook.max_connections_per_host`).
    hosts: HostLimits,
}

impl std::fmt::Debug for WebhookAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookAdapter")
            .field("provider", &self.provider)
            .field("block_private", &self.block_private)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

/// At most `per_host` requests in flight to one `host:port`; the rest wait
/// for a turn, at most `wait` (the request timeout). Without it a backlog
/// opens one connection per in-flight notification to a single receiver
/// (~800 in the benchmark). With an unbounded wait a hanging receiver would
/// hold its notifications in memory for `timeout × queue / per_host`; past
/// `wait` they fail retryable and come back as due retries instead.
struct HostLimits {
    per_host: usize,
    wait: Duration,
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Past this many hosts, entries nobody waits on or holds are dropped.
const HOST_LIMIT_ENTRIES: usize = 4096;

impl HostLimits {
    fn new(per_host: usize, wait: Duration) -> Self {
        HostLimits {
            per_host: per_host.max(1),
            wait,
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a turn to send to `url`'s host; the turn ends when the
    /// permit is dropped.
    async fn turn(&self, url: &Url) -> Result<OwnedSemaphorePermit, SendError> {
        // `scheme://host[:port]`: the url crate drops a default port, so
        // `http://a` and `http://a:80` are one key.
        let key = &url[..url::Position::AfterPort];
        let host = url.host_str().unwrap_or_default();
        let semaphore = {
            let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
            match hosts.get(key) {
                Some(s) => s.clone(),
                None => {
                    if hosts.len() >= HOST_LIMIT_ENTRIES {
                        // Waiters and permit holders keep a clone.
                        hosts.retain(|_, s| Arc::strong_count(s) > 1);
                    }
                    let s = Arc::new(Semaphore::new(self.per_host));
                    hosts.insert(key.to_string(), s.clone());
                    s
                }
            }
        };
        match tokio::time::timeout(self.wait, semaphore.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Err(_) => Err(retryable(
                "http_timeout",
                format!(
                    "not sent: {} requests to {host} were in flight for {} ms",
                    self.per_host,
                    self.wait.as_millis()
                ),
            )),
            // Never closed; this would be a bug, not the receiver's fault.
            Ok(Err(_)) => Err(retryable(
                "provider_unavailable",
                "webhook host limiter closed".to_string(),
            )),
        }
    }
}

impl WebhookAdapter {
    /// Builds the adapter and its HTTP client from settings.
    pub fn new(settings: &WebhookSettings) -> Result<Self, WebhookConfigError> {
        let key = signing_key(settings.signing_secret.expose_secret())?;
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .retry(http::no_retry())
            // A proxy would resolve the target itself, bypassing our resolver.
            .no_proxy()
            .timeout(Duration::from_millis(settings.timeout_ms.max(1)))
            .pool_max_idle_per_host(settings.max_connections_per_host.max(1))
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")));
        if !settings.allow_private_targets {
            builder = builder.dns_resolver(Arc::new(PublicOnlyResolver));
        }
        Ok(WebhookAdapter {
            provider: PROVIDER.to_string(),
            client: builder.build()?,
            key: SecretSlice::from(key),
            block_private: !settings.allow_private_targets,
            max_response_bytes: settings.max_response_bytes,
            hosts: HostLimits::new(
                settings.max_connections_per_host,
                Duration::from_millis(settings.timeout_ms.max(1)),
            ),
        })
    }
}

/// A registered `webhook` provider's `config` JSON; unset fields take the
/// `[webhook]` values from herald.toml. `allow_private_targets` is not
/// here on purpose: whether requests may reach private addresses is the
/// operator's decision (herald.toml), never a registry row's.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookProviderConfig {
    pub timeout_ms: Option<u64>,
    pub max_response_bytes: Option<usize>,
}

/// A registered `webhook` provider's `credentials` JSON; without a
/// `signing_secret` the one from herald.toml signs.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookProviderCredentials {
    signing_secret: Option<secrecy::SecretString>,
}

impl WebhookAdapter {
    /// Builds the adapter of a registered `webhook` provider.
    pub fn from_spec(
        provider: &crate::routing::ProviderSpec,
        ctx: &super::AdapterContext,
    ) -> Result<Self, super::AdapterConfigError> {
        if provider
            .config
            .as_object()
            .is_some_and(|o| o.contains_key("allow_private_targets"))
        {
            return Err(super::spec::invalid(
                provider,
                "config.allow_private_targets: only herald.toml ([webhook]) may allow private targets",
            ));
        }
        let config: WebhookProviderConfig = super::spec::config(provider)?;
        let credentials: WebhookProviderCredentials = super::spec::credentials(provider)?;
        let base = &ctx.settings.webhook;
        if config.timeout_ms == Some(0) {
            return Err(super::spec::invalid(
                provider,
                "config.timeout_ms must be > 0",
            ));
        }
        let settings = WebhookSettings {
            signing_secret: credentials
                .signing_secret
                .unwrap_or_else(|| base.signing_secret.clone()),
            timeout_ms: config.timeout_ms.unwrap_or(base.timeout_ms),
            allow_private_targets: base.allow_private_targets,
            max_response_bytes: config.max_response_bytes.unwrap_or(base.max_response_bytes),
            max_connections_per_host: base.max_connections_per_host,
        };
        let mut adapter = WebhookAdapter::new(&settings).map_err(|e| {
            let message = match e {
                WebhookConfigError::InvalidSecret => {
                    "credentials.signing_secret: the part after `whsec_` is not valid base64"
                        .to_string()
                }
                WebhookConfigError::EmptySecret => {
                    "credentials.signing_secret must not be empty".to_string()
                }
                WebhookConfigError::Client(e) => format!("http client: {e}"),
            };
            super::spec::invalid(provider, message)
        })?;
        adapter.provider = provider.name.clone();
        Ok(adapter)
    }
}

/// The HMAC key for a configured secret: the base64-decoded part after
/// `whsec_` (Standard Webhooks), else the secret's raw bytes.
pub fn signing_key(secret_config: &str) -> Result<Vec<u8>, WebhookConfigError> {
    if secret_config.is_empty() {
        return Err(WebhookConfigError::EmptySecret);
    }
    match secret_config.strip_prefix("whsec_") {
        Some(b64) => {
            let key = BASE64
                .decode(b64)
                .map_err(|_| WebhookConfigError::InvalidSecret)?;
            if key.is_empty() {
                return Err(WebhookConfigError::EmptySecret);
            }
            Ok(key)
        }
        None => Ok(secret_config.as_bytes().to_vec()),
    }
}

/// The `webhook-signature` value: `v1,<base64 HMAC-SHA256(secret,
/// "{id}.{timestamp}.{body}")>`.
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "v1,{}",
        BASE64.encode(mac(secret, id, timestamp, body).finalize().into_bytes())
    )
}

fn mac(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Verifies a received webhook the way a receiver would: `webhook-id`,
/// `webhook-timestamp` (within [`SIGNATURE_TOLERANCE_SECS`] of now) and one
/// matching `v1,` entry in `webhook-signature` (space-separated list),
/// compared in constant time. `secret_config` is the configured secret
/// (`whsec_…` or raw).
pub fn verify(secret_config: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    verify_at(secret_config, headers, body, chrono::Utc::now().timestamp())
}

/// [`verify`] against an explicit clock (unix seconds).
pub fn verify_at(secret_config: &str, headers: &HeaderMap, body: &[u8], now: i64) -> bool {
    let Ok(key) = signing_key(secret_config) else {
        return false;
    };
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(ts), Some(sigs)) = (
        get("webhook-id"),
        get("webhook-timestamp"),
        get("webhook-signature"),
    ) else {
        return false;
    };
    let Ok(ts) = ts.trim().parse::<i64>() else {
        return false;
    };
    if (now - ts).abs() > SIGNATURE_TOLERANCE_SECS {
        return false;
    }
    let expected = mac(&key, id, ts, body);
    sigs.split_whitespace().any(|entry| {
        let Some(b64) = entry.strip_prefix("v1,") else {
            return false;
        };
        let Ok(sig) = BASE64.decode(b64) else {
            return false;
        };
        expected.clone().verify_slice(&sig).is_ok()
    })
}

/// The JSON body POSTed to the target. `None` fields are omitted.
#[derive(Debug, Serialize)]
struct Payload<'a> {
    notification_id: &'a str,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant_id: Option<&'a str>,
    channel: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    html: Option<&'a str>,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    data: &'a serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    /// When this delivery attempt was made (RFC 3339, UTC, milliseconds).
    occurred_at: String,
}

/// The JSON body POSTed for `notification` (what [`sign`] signs), stamped
/// `now`.
pub fn payload(
    notification: &Notification,
    content: &RenderedContent,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<u8>, SendError> {
    let p = Payload {
        notification_id: &notification.id,
        request_id: &notification.request_id,
        tenant_id: notification.tenant_id.as_deref(),
        channel: Channel::Webhook.as_str(),
        subject: content.subject.as_deref(),
        text: content.text.as_deref(),
        html: content.html.as_deref(),
        data: &content.data,
        correlation_id: notification.correlation_id.as_deref(),
        occurred_at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    serde_json::to_vec(&p).map_err(|e| http::permanent("invalid_payload", e.to_string()))
}

/// Extra request headers from `meta.headers`: valid HTTP names, no CR/LF or
/// other control characters, none of the headers Herald sets itself.
fn extra_headers(
    headers: &std::collections::BTreeMap<String, String>,
) -> Result<HeaderMap, SendError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let invalid = |m: String| http::permanent("invalid_header", m);
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(invalid(format!(
                "header {name} contains CR, LF or another control character"
            )));
        }
        let header_name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(format!("invalid header name {name:?}")))?;
        if RESERVED_HEADERS.contains(&header_name.as_str()) {
            return Err(invalid(format!("header {name} is set by Herald")));
        }
        let header_value = HeaderValue::from_str(value)
            .map_err(|_| invalid(format!("invalid value for header {name}")))?;
        map.append(header_name, header_value);
    }
    Ok(map)
}

#[async_trait]
impl ChannelAdapter for WebhookAdapter {
    fn channel(&self) -> Channel {
        Channel::Webhook
    }

    fn provider(&self) -> &str {
        &self.provider
    }

    async fn send(
        &self,
        notification: &Notification,
        content: &RenderedContent,
    ) -> Result<SendReceipt, SendError> {
        let url = notification
            .recipient
            .url
            .as_ref()
            .ok_or_else(|| http::permanent("no_address", "recipient has no webhook url"))?;
        let url = url.url().clone();
        if self.block_private {
            check_literal_host(&url)?;
        }
        let mut headers = extra_headers(&notification.meta.headers)?;
        let now = chrono::Utc::now();
        let body = payload(notification, content, now)?;
        let timestamp = now.timestamp();
        let signature = sign(self.key.expose_secret(), &notification.id, timestamp, &body);
        let id_value = HeaderValue::from_str(&notification.id).map_err(|_| {
            http::permanent(
                "invalid_header",
                "notification id is not a valid header value",
            )
        })?;
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert("webhook-id", id_value);
        headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
        let signature = HeaderValue::from_str(&signature)
            .map_err(|_| http::permanent("invalid_header", "bad signature header"))?;
        headers.insert("webhook-signature", signature);

        let _turn = self.hosts.turn(&url).await?;
        let mut request = self
            .client
            .post(url)
            .body(body)
            .build()
            .map_err(|e| classify_request_error(&e))?;
        // The request has no headers yet: take ours whole instead of having
        // `RequestBuilder::headers` insert them one by one again.
        *request.headers_mut() = headers;
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| classify_request_error(&e))?;
        let status = response.status();
        let retry_after = http::retry_after(response.headers());
        let body = http::read_limited(response, self.max_response_bytes).await;
        classify_status(status, retry_after, &body)?;
        Ok(SendReceipt {
            provider: self.provider.clone(),
            provider_message_id: Some(notification.id.clone()),
        })
    }
}

/// Maps an HTTP status to the caller's decision (`Ok` for 2xx).
fn classify_status(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<(), SendError> {
    if status.is_success() {
        return Ok(());
    }
    let message = http::describe(status, &String::from_utf8_lossy(body));
    if status.is_redirection() {
        return Err(http::permanent(
            "http_redirect",
            format!("{message} (redirects are not followed)"),
        ));
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(SendError::RateLimited {
            message,
            retry_after,
        });
    }
    if status == StatusCode::REQUEST_TIMEOUT || status.is_server_error() {
        return Err(SendError::Retryable {
            code: "http_status".into(),
            message,
            retry_after,
        });
    }
    Err(http::permanent("http_status", message))
}

/// Maps a transport error: a refused address is permanent, everything else
/// (timeouts, connection failures) is worth retrying.
fn classify_request_error(e: &reqwest::Error) -> SendError {
    if let Some(blocked) = find_source::<AddressNotAllowed>(e) {
        return http::permanent("address_not_allowed", blocked.to_string());
    }
    if e.is_timeout() {
        return retryable("http_timeout", format!("request timed out: {e}"));
    }
    if e.is_connect() {
        return retryable("http_connect", format!("{e}: {}", http::root_cause(e)));
    }
    retryable("http_error", format!("{e}: {}", http::root_cause(e)))
}

fn find_source<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

fn retryable(code: &str, message: String) -> SendError {
    SendError::Retryable {
        code: code.to_string(),
        message,
        retry_after: None,
    }
}

/// A target resolved to (or was given as) an address Herald will not call.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to {ip}, which is not a public address")]
pub struct AddressNotAllowed {
    host: String,
    ip: IpAddr,
}

/// Refuses IP-literal hosts on forbidden addresses (the resolver is not
/// consulted for those).
fn check_literal_host(url: &Url) -> Result<(), SendError> {
    // The url parser normalises IPv4 spellings (`2130706433`, `0x7f.1`) to
    // dotted form and writes IPv6 in brackets.
    let host = url.host_str().unwrap_or_default();
    let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    else {
        return Ok(());
    };
    if is_forbidden_ip(ip) {
        let e = AddressNotAllowed {
            host: host.to_string(),
            ip,
        };
        return Err(http::permanent("address_not_allowed", e.to_string()));
    }
    Ok(())
}

/// Resolves host names with the system resolver and refuses the name when
/// any of its addresses is forbidden. Because reqwest connects only to the
/// addresses returned here, a DNS answer that changes between a check and
/// the connection (rebinding) cannot slip through.
#[derive(Debug, Clone, Copy)]
struct PublicOnlyResolver;

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addrs.iter().find(|a| is_forbidden_ip(a.ip())) {
                return Err(Box::new(AddressNotAllowed { host, ip: bad.ip() })
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// True for addresses a webhook must never reach: loopback, private,
/// link-local (incl. cloud metadata 169.254.169.254), CGNAT, unspecified,
/// multicast, broadcast, reserved and benchmarking ranges, IPv6 ULA,
/// link-local and site-local, and IPv6 forms that embed such an IPv4
/// address (mapped, compatible, NAT64, 6to4).
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || a == 0 // 0.0.0.0/8 "this network"
        || ip.is_loopback() // 127/8
        || ip.is_private() // 10/8, 172.16/12, 192.168/16
        || ip.is_link_local() // 169.254/16
        || (a == 100 && (b & 0xC0) == 64) // 100.64/10 CGNAT
        || (a == 192 && b == 0 && c == 0) // 192.0.0/24 IETF protocol assignments
        || (a == 198 && (b & 0xFE) == 18) // 198.18/15 benchmarking
        || ip.is_multicast() // 224/4
        || a >= 240 // 240/4 reserved, incl. 255.255.255.255 broadcast
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return true;
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_forbidden_v4(v4);
    }
    // IPv4-compatible ::a.b.c.d (deprecated) and NAT64 64:ff9b::/96.
    let embedded_low = |ip: Ipv6Addr| {
        let o = ip.octets();
        Ipv4Addr::new(o[12], o[13], o[14], o[15])
    };
    if seg[..6] == [0, 0, 0, 0, 0, 0] || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_forbidden_v4(embedded_low(ip));
    }
    // 6to4 2002:AABB:CCDD::/48 embeds AA.BB.CC.DD.
    if seg[0] == 0x2002 {
        let [a, b] = seg[1].to_be_bytes();
        let [c, d] = seg[2].to_be_bytes();
        return is_forbidden_v4(Ipv4Addr::new(a, b, c, d));
    }
    (seg[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local
        || (seg[0] & 0xffc0) == 0xfe80 // fe80::/10 link-local
        || (seg[0] & 0xffc0) == 0xfec0 // fec0::/10 site-local (deprecated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(s: &str) -> bool {
        is_forbidden_ip(s.parse().unwrap())
    }

    #[tokio::test]
    async fn a_turn_is_per_host_and_waiting_for_one_gives_up_after_the_wait() {
        let limits = HostLimits::new(1, Duration::from_millis(1000));
        let a = Url::parse("http://a.example:8080/x").unwrap();
        let a_other_path = Url::parse("http://a.example:8080/y").unwrap();
        let a_other_port = Url::parse("http://a.example:8081/x").unwrap();
        let held = limits.turn(&a).await.unwrap();
        // Other hosts (ports count) are not held up.
        let other = limits.turn(&a_other_port).await.unwrap();
        drop(other);
        // The same host waits, then gives up retryable without sending.
        let start = std::time::Instant::now();
        let e = limits.turn(&a_other_path).await.unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(1000));
        assert_eq!(e.code(), "http_timeout");
        assert!(e.is_retryable());
        assert!(e.to_string().contains("not sent"), "{e}");
        // A waiter gets the turn as soon as it is given back.
        let waiter = tokio::spawn(async move { limits.turn(&a).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
        waiter.await.unwrap().unwrap();
        // A default port written out is the same host.
        let same = HostLimits::new(1, Duration::from_millis(100));
        let _held = same
            .turn(&Url::parse("http://b.example/x").unwrap())
            .await
            .unwrap();
        let port_80 = Url::parse("http://b.example:80/y").unwrap();
        assert!(same.turn(&port_80).await.is_err());
    }

    #[test]
    fn forbidden_ipv4() {
        for s in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.0.1",
            "192.168.255.255",
            "169.254.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(forbidden(s), "{s} should be forbidden");
        }
    }

    #[test]
    fn allowed_ipv4() {
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "172.15.255.255",
            "172.32.0.1",
            "192.167.1.1",
            "192.169.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.255.255",
            "198.17.255.255",
            "198.20.0.1",
            "223.255.255.255",
            "11.0.0.1",
            "126.255.255.255",
            "128.0.0.1",
        ] {
            assert!(!forbidden(s), "{s} should be allowed");
        }
    }

    #[test]
    fn forbidden_ipv6() {
        for s in [
            "::",
            "::1",
            "fc00::1",
            "fd12:3456:789a::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:192.168.1.1",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::169.254.169.254",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(forbidden(s), "{s} should be forbidden");
        }
    }

    #[test]
    fn allowed_ipv6() {
        for s in [
            "2001:4860:4860::8888",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:0808:0808::1",
            "fbff::1",
            "fe00::1",
        ] {
            assert!(!forbidden(s), "{s} should be allowed");
        }
    }

    #[test]
    fn literal_hosts_checked_including_odd_ipv4_spellings() {
        for u in [
            "http://127.0.0.1/",
            "http://[::1]:8080/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::ffff:169.254.169.254]/",
            "http://169.254.169.254/latest/meta-data",
        ] {
            let err = check_literal_host(&Url::parse(u).unwrap()).unwrap_err();
            assert_eq!(err.code(), "address_not_allowed", "{u}");
        }
        assert!(check_literal_host(&Url::parse("http://8.8.8.8/").unwrap()).is_ok());
        assert!(check_literal_host(&Url::parse("http://example.com/").unwrap()).is_ok());
    }

    #[test]
    fn sign_matches_standard_webhooks_example() {
        // Example from the Standard Webhooks specification.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn verify_checks_signature_and_timestamp() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let key = signing_key(secret).unwrap();
        let body = b"{}";
        let now = 1_700_000_000;
        let mut h = HeaderMap::new();
        h.insert("webhook-id", HeaderValue::from_static("n-1"));
        h.insert("webhook-timestamp", HeaderValue::from(now));
        let sig = sign(&key, "n-1", now, body);
        h.insert(
            "webhook-signature",
            HeaderValue::from_str(&format!("v1,AAAA {sig}")).unwrap(),
        );
        assert!(verify_at(secret, &h, body, now));
        assert!(verify_at(secret, &h, body, now + 299));
        assert!(!verify_at(secret, &h, body, now + 301));
        assert!(!verify_at(secret, &h, b"{ }", now));
        assert!(!verify_at("whsec_AAAA", &h, body, now));
        assert!(!verify_at("raw-secret", &h, body, now));
        h.remove("webhook-id");
        assert!(!verify_at(secret, &h, body, now));
    }

    #[test]
    fn raw_secret_is_used_as_bytes() {
        assert_eq!(signing_key("change-me").unwrap(), b"change-me");
        assert!(matches!(
            signing_key("whsec_!!!"),
            Err(WebhookConfigError::InvalidSecret)
        ));
        assert!(signing_key("").is_err());
    }

    #[test]
    fn status_classification() {
        let c = |s: u16| classify_status(StatusCode::from_u16(s).unwrap(), None, b"");
        assert!(c(200).is_ok());
        assert!(c(204).is_ok());
        assert_eq!(c(302).unwrap_err().code(), "http_redirect");
        assert!(!c(302).unwrap_err().is_retryable());
        assert_eq!(c(404).unwrap_err().code(), "http_status");
        assert!(!c(400).unwrap_err().is_retryable());
        assert!(c(408).unwrap_err().is_retryable());
        assert!(c(500).unwrap_err().is_retryable());
        assert!(c(503).unwrap_err().message().starts_with("HTTP 503"));
        let e = classify_status(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(7)),
            b"slow down\r\n",
        )
        .unwrap_err();
        assert_eq!(e.code(), "rate_limited");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(e.message(), "HTTP 429 Too Many Requests: slow down");
    }

    #[test]
    fn extra_headers_refuse_injection() {
        let one =
            |n: &str, v: &str| extra_headers(&[(n.to_string(), v.to_string())].into()).map(|_| ());
        assert!(one("x-tenant", "acme").is_ok());
        for (n, v) in [
            ("x-a", "a\r\nx-b: c"),
            ("x-a", "a\nb"),
            ("bad name", "v"),
            ("webhook-signature", "v1,forged"),
            ("Content-Type", "text/plain"),
        ] {
            assert_eq!(one(n, v).unwrap_err().code(), "invalid_header", "{n}");
        }
    }
}
