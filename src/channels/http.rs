//! What the HTTP API adapters (SendGrid, Twilio, FCM) share: how their
//! client is built, how a base URL from the registry is checked, how a call
//! is made and its body read, and how an HTTP status becomes a
//! [`SendError`].
//!
//! The mapping (Vector's, adapted): 2xx is success; 401/403 are permanent
//! `provider_auth` (the credentials are wrong, every message will fail the
//! same way); 429 is `RateLimited`; 408 and 5xx are retryable
//! `provider_unavailable`; other 4xx are permanent `provider_rejected`; 3xx
//! are permanent `provider_redirect` because API clients never follow
//! redirects. `Retry-After` (seconds or HTTP date) is honoured; on a 429
//! without it, `X-RateLimit-Reset` (unix seconds). Adapters refine
//! the code where the provider says more (a Twilio error code, an FCM
//! `UNREGISTERED` token) before falling back to [`classify_status`].

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};

use super::{SendError, parse_retry_after};

/// Largest response body read from a provider API; the rest is discarded.
pub(crate) const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Timeout of one provider call when the config sets none.
pub(crate) const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Builds the client of one HTTP adapter: rustls, no redirects (an API
/// that redirects is misconfigured, and a redirect could carry the
/// `Authorization` header elsewhere), a whole-request timeout and a
/// connect timeout no longer than it.
pub(crate) fn client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    let timeout = timeout.max(Duration::from_millis(1));
    reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .retry(no_retry())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// No retries inside reqwest: Herald retries a send itself, with its backoff
/// and its record of each try. (reqwest's default policy would also copy
/// every request before sending it, in case of a retry.)
pub(crate) fn no_retry() -> reqwest::retry::Builder {
    reqwest::retry::never().max_retries_per_request(0)
}

/// Checks a configured base URL: absolute `http`/`https`, a host, no user
/// info, query or fragment. The returned text has no trailing `/`, so
/// `format!("{base}/v3/mail/send")` is the endpoint. Errors start with
/// `field` (`config.base_url`).
pub(crate) fn base_url(field: &str, value: &str) -> Result<String, String> {
    let url =
        Url::parse(value.trim()).map_err(|e| format!("{field}: not an absolute URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{field}: scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{field}: URL has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{field}: URL must not contain credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{field}: URL must not have a query or fragment"));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// A provider's answer: status, headers and the start of the body.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// At most [`MAX_RESPONSE_BYTES`].
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON, when it is JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_slice(&self.body).ok()
    }

    /// A header value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `Ok` for 2xx, else the generic mapping with `detail` (the provider's
    /// own error message, if the adapter found one) in the message.
    pub fn check(&self, detail: Option<&str>) -> Result<(), SendError> {
        classify_status(self.status, &self.headers, &self.describe(detail))
    }

    /// `HTTP 400 Bad Request: <detail or the start of the body>`.
    pub fn describe(&self, detail: Option<&str>) -> String {
        match detail {
            Some(d) => describe(self.status, d),
            None => describe(self.status, &String::from_utf8_lossy(&self.body)),
        }
    }
}

/// `HTTP 503 Service Unavailable: <start of text>`, printable characters
/// only (a reply body may hold anything).
pub(crate) fn describe(status: StatusCode, text: &str) -> String {
    let mut message = format!("HTTP {}", status.as_u16());
    if let Some(reason) = status.canonical_reason() {
        message.push(' ');
        message.push_str(reason);
    }
    let snippet = crate::domain::text::printable(text, 300);
    if !snippet.is_empty() {
        message.push_str(": ");
        message.push_str(&snippet);
    }
    message
}

/// Reads at most `limit` bytes of a response body. A body cut short (or
/// failing mid-way) only costs detail in the message: the status decides.
pub(crate) async fn read_limited(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(limit - body.len());
                body.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// The innermost cause of an error chain (e.g. "Connection refused").
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Sends `request` and reads the reply; transport failures become
/// retryable [`SendError`]s (see [`transport_error`]).
pub(crate) async fn execute(request: reqwest::RequestBuilder) -> Result<Reply, SendError> {
    let mut response = request.send().await.map_err(|e| transport_error(&e))?;
    let status = response.status();
    let headers = std::mem::take(response.headers_mut());
    let body = read_limited(response, MAX_RESPONSE_BYTES).await;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// The delay a provider asked for in `Retry-After` (seconds or HTTP date).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after)
}

/// How long a rate-limited (429) client should wait: `Retry-After`, else
/// `X-RateLimit-Reset` as unix seconds (values below 10^9 are taken as
/// seconds from now, which some APIs send instead). Only for 429: SendGrid
/// sends its rate-limit headers on every reply, and a 503 must not wait
/// for the end of a rate window.
pub(crate) fn rate_limit_wait(headers: &HeaderMap) -> Option<Duration> {
    if let Some(d) = retry_after(headers) {
        return Some(d);
    }
    let reset: u64 = headers
        .get("x-ratelimit-reset")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if reset < 1_000_000_000 {
        return Some(Duration::from_secs(reset));
    }
    let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
    Some(Duration::from_secs(reset.saturating_sub(now)))
}

/// The generic status mapping (see the module docs). `message` describes
/// the reply.
pub(crate) fn classify_status(
    status: StatusCode,
    headers: &HeaderMap,
    message: &str,
) -> Result<(), SendError> {
    if status.is_success() {
        return Ok(());
    }
    let message = message.to_string();
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(SendError::RateLimited {
            message,
            retry_after: rate_limit_wait(headers),
        });
    }
    if status == StatusCode::REQUEST_TIMEOUT || status.is_server_error() {
        return Err(SendError::Retryable {
            code: "provider_unavailable".into(),
            message,
            retry_after: retry_after(headers),
        });
    }
    let code = if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        "provider_auth"
    } else if status.is_redirection() {
        "provider_redirect"
    } else {
        "provider_rejected"
    };
    Err(permanent(code, message))
}

/// Maps a transport error: nothing reached a verdict, so it is worth
/// retrying (`provider_timeout`, `provider_connect`, `provider_error`).
pub(crate) fn transport_error(e: &reqwest::Error) -> SendError {
    let code = if e.is_timeout() {
        "provider_timeout"
    } else if e.is_connect() {
        "provider_connect"
    } else {
        "provider_error"
    };
    let mut message = e.to_string();
    let root = root_cause(e);
    if !message.contains(&root) {
        message = format!("{message}: {root}");
    }
    SendError::Retryable {
        code: code.into(),
        message,
        retry_after: None,
    }
}

/// A permanent failure with `code`.
pub(crate) fn permanent(code: &str, message: impl Into<String>) -> SendError {
    SendError::Permanent {
        code: code.to_string(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn classify(status: u16, headers: &[(&'static str, &str)]) -> Result<(), SendError> {
        let mut h = HeaderMap::new();
        for (n, v) in headers {
            h.insert(*n, HeaderValue::from_str(v).unwrap());
        }
        classify_status(StatusCode::from_u16(status).unwrap(), &h, "m")
    }

    #[test]
    fn statuses() {
        assert!(classify(200, &[]).is_ok());
        assert!(classify(202, &[]).is_ok());
        for (s, code) in [
            (400, "provider_rejected"),
            (413, "provider_rejected"),
            (401, "provider_auth"),
            (403, "provider_auth"),
            (302, "provider_redirect"),
        ] {
            let e = classify(s, &[]).unwrap_err();
            assert_eq!((e.code(), e.is_retryable()), (code, false), "{s}");
        }
        for s in [408, 500, 502, 503] {
            let e = classify(s, &[("retry-after", "3")]).unwrap_err();
            assert_eq!(e.code(), "provider_unavailable");
            assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        }
        let e = classify(429, &[("retry-after", "2")]).unwrap_err();
        assert!(matches!(e, SendError::RateLimited { .. }));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
    }

    #[test]
    fn rate_limit_reset_header() {
        let in_30s = (chrono::Utc::now().timestamp() + 30).to_string();
        let e = classify(429, &[("x-ratelimit-reset", &in_30s)]).unwrap_err();
        let d = e.retry_after().unwrap();
        assert!(
            (Duration::from_secs(28)..=Duration::from_secs(30)).contains(&d),
            "{d:?}"
        );
        // Retry-After wins.
        let e = classify(429, &[("x-ratelimit-reset", &in_30s), ("retry-after", "1")]).unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
        let e = classify(429, &[("x-ratelimit-reset", "1")]).unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
        assert_eq!(classify(429, &[]).unwrap_err().retry_after(), None);
        // Not for a 503: only Retry-After counts there.
        let e = classify(503, &[("x-ratelimit-reset", &in_30s)]).unwrap_err();
        assert_eq!(e.retry_after(), None);
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url("config.base_url", "https://api.sendgrid.com/").unwrap(),
            "https://api.sendgrid.com"
        );
        assert_eq!(
            base_url("config.base_url", "http://127.0.0.1:8080/prefix/").unwrap(),
            "http://127.0.0.1:8080/prefix"
        );
        for bad in [
            "api.sendgrid.com",
            "ftp://x",
            "https://u:p@x",
            "https://x/?a=1",
            "https://x/#f",
        ] {
            let e = base_url("config.base_url", bad).unwrap_err();
            assert!(e.starts_with("config.base_url:"), "{e}");
            assert!(!e.contains("u:p"), "{e}");
        }
    }

    #[test]
    fn describe_prefers_detail_and_strips_control_characters() {
        let r = Reply {
            status: StatusCode::BAD_REQUEST,
            headers: HeaderMap::new(),
            body: b"raw\r\nbody".to_vec(),
        };
        assert_eq!(r.describe(None), "HTTP 400 Bad Request: raw  body");
        assert_eq!(r.describe(Some("bad To")), "HTTP 400 Bad Request: bad To");
    }
}
