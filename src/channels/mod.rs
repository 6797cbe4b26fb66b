//! Channel adapters: the seam between Herald and the outside world.
//!
//! Each adapter takes a rendered message for one notification and returns a
//! [`SendReceipt`] or a [`SendError`] that says whether trying again can help.
//! One file per adapter.

pub mod fcm;
pub(crate) mod http;
pub mod inbox;
pub mod sendgrid;
pub mod smtp;
pub(crate) mod spec;
pub mod twilio;
pub mod webhook;

use std::time::Duration;

use async_trait::async_trait;

use crate::domain::{Channel, Notification};
use crate::render::RenderedContent;

/// What a provider said when it accepted a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    /// Provider name recorded on the attempt and the outcome (`smtp`, `webhook`).
    pub provider: String,
    /// The provider's id for the message when it returns one (SMTP queue id,
    /// the `webhook-id` we sent, ...).
    pub provider_message_id: Option<String>,
}

/// Why a send failed, classified for the caller: retry or give up.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SendError {
    /// Retrying the same message cannot succeed (bad address, 4xx other than
    /// 408/429, SMTP 5xx, refused target address).
    #[error("{code}: {message}")]
    Permanent { code: String, message: String },
    /// A transient failure (timeout, connection refused, SMTP 4xx, HTTP 408/5xx).
    #[error("{code}: {message}")]
    Retryable {
        code: String,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The provider asked us to slow down (HTTP 429).
    #[error("rate_limited: {message}")]
    RateLimited {
        message: String,
        retry_after: Option<Duration>,
    },
}

impl SendError {
    /// The bounded error code for outcome events and metrics.
    pub fn code(&self) -> &str {
        match self {
            SendError::Permanent { code, .. } | SendError::Retryable { code, .. } => code,
            SendError::RateLimited { .. } => "rate_limited",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            SendError::Permanent { message, .. }
            | SendError::Retryable { message, .. }
            | SendError::RateLimited { message, .. } => message,
        }
    }

    pub fn is_retryable(&self) -> bool {
        !matches!(self, SendError::Permanent { .. })
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SendError::Permanent { .. } => None,
            SendError::Retryable { retry_after, .. }
            | SendError::RateLimited { retry_after, .. } => *retry_after,
        }
    }
}

/// Parses an HTTP `Retry-After` value: delay-seconds (`"120"`) or an
/// HTTP-date (`"Wed, 21 Oct 2015 07:28:00 GMT"`). A date in the past gives
/// zero. `None` when the value is neither.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    parse_retry_after_at(value, chrono::Utc::now())
}

/// [`parse_retry_after`] against an explicit clock (for tests).
pub fn parse_retry_after_at(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long digit strings saturate instead of failing.
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    // IMF-fixdate is RFC 2822-compatible; also accept the obsolete RFC 850
    // and asctime forms that RFC 9110 says recipients must understand.
    let when = chrono::DateTime::parse_from_rfc2822(value)
        .map(|d| d.with_timezone(&chrono::Utc))
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(value, "%A, %d-%b-%y %H:%M:%S GMT")
                .map(|d| d.and_utc())
        })
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(value, "%a %b %e %H:%M:%S %Y")
                .map(|d| d.and_utc())
        })
        .ok()?;
    Some((when - now).to_std().unwrap_or(Duration::ZERO))
}

/// A channel adapter. Implementations must be cheap to share (`Arc`) and safe
/// to call concurrently.
#[async_trait]
pub trait ChannelAdapter: Send + Sync {
    /// The channel this adapter delivers.
    fn channel(&self) -> Channel;

    /// Provider name recorded on attempts (`smtp`, `webhook`, ...).
    fn provider(&self) -> &str;

    /// Sends one notification. `content` is already rendered. Implementations
    /// use `notification.id` as the provider's idempotency key where the
    /// provider supports one.
    async fn send(
        &self,
        notification: &Notification,
        content: &RenderedContent,
    ) -> Result<SendReceipt, SendError>;

    /// A cheap reachability check for `/readyz` detail; `Ok` by default.
    async fn check(&self) -> Result<(), SendError> {
        Ok(())
    }
}

/// Why the configured adapters could not be created.
#[derive(Debug, thiserror::Error)]
pub enum AdapterConfigError {
    #[error(transparent)]
    Smtp(#[from] smtp::SmtpConfigError),
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookConfigError),
    /// A registered provider's `config` or `credentials` do not fit its type.
    #[error("provider {name}: {message}")]
    Provider { name: String, message: String },
}

/// What adapters built from the provider registry share with the process:
/// settings the registry rows do not carry, and the database for the inbox.
#[derive(Clone)]
pub struct AdapterContext {
    pub settings: crate::config::Settings,
    /// The in-app inbox stores notifications here.
    pub pool: Option<sqlx::PgPool>,
}

/// Builds the adapter of one registered provider. Its `provider()` is the
/// provider's name. `config` and `credentials` are checked against the
/// provider type (unknown fields are refused); errors name the field and
/// never contain a credential value.
pub fn build_provider(
    spec: &crate::routing::ProviderSpec,
    ctx: &AdapterContext,
) -> Result<std::sync::Arc<dyn ChannelAdapter>, AdapterConfigError> {
    use crate::routing::ProviderType;
    use std::sync::Arc;

    if spec.channel != spec.provider_type.channel() {
        return Err(self::spec::invalid(
            spec,
            format!(
                "a {} provider delivers {}, not {}",
                spec.provider_type.as_str(),
                spec.provider_type.channel().as_str(),
                spec.channel.as_str()
            ),
        ));
    }
    Ok(match spec.provider_type {
        ProviderType::Smtp => Arc::new(smtp::SmtpAdapter::from_spec(spec, ctx)?),
        ProviderType::Sendgrid => Arc::new(sendgrid::SendgridAdapter::from_spec(spec, ctx)?),
        ProviderType::Twilio => Arc::new(twilio::TwilioAdapter::from_spec(spec, ctx)?),
        ProviderType::Fcm => Arc::new(fcm::FcmAdapter::from_spec(spec, ctx)?),
        ProviderType::Webhook => Arc::new(webhook::WebhookAdapter::from_spec(spec, ctx)?),
        ProviderType::Inbox => Arc::new(inbox::InboxAdapter::from_spec(spec, ctx)?),
    })
}

/// Creates the adapters configured in `settings`: SMTP for email, webhook.
/// Connections are opened lazily, on the first send.
pub fn build_adapters(
    settings: &crate::config::Settings,
) -> Result<Vec<std::sync::Arc<dyn ChannelAdapter>>, AdapterConfigError> {
    Ok(vec![
        std::sync::Arc::new(smtp::SmtpAdapter::new(&settings.smtp)?),
        std::sync::Arc::new(webhook::WebhookAdapter::new(&settings.webhook)?),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn retry_after_seconds() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        for bad in ["", "-1", "1.5", "soon", "7s"] {
            assert_eq!(parse_retry_after(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_http_dates() {
        let now = chrono::Utc
            .with_ymd_and_hms(2015, 10, 21, 7, 27, 0)
            .unwrap();
        let want = Some(Duration::from_secs(60));
        assert_eq!(
            parse_retry_after_at("Wed, 21 Oct 2015 07:28:00 GMT", now),
            want
        );
        assert_eq!(
            parse_retry_after_at("Wednesday, 21-Oct-15 07:28:00 GMT", now),
            want
        );
        assert_eq!(parse_retry_after_at("Wed Oct 21 07:28:00 2015", now), want);
        assert_eq!(
            parse_retry_after_at("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after_at("Wed, 32 Oct 2015 07:28:00 GMT", now),
            None
        );
    }
}
