//! In-app adapter: "sending" an in_app notification stores it in the
//! user's inbox in PostgreSQL ([`crate::store::inbox`]), where the product
//! reads it through the admin API.
//!
//! Owns: the mapping of a rendered notification to an inbox row and of
//! store failures to [`SendError`]s. The insert is idempotent by
//! notification id, so the provider message id (the inbox row id) is the
//! same however often the notification is sent.

use async_trait::async_trait;
use serde::Deserialize;

use super::http::permanent;
use super::{AdapterConfigError, AdapterContext, ChannelAdapter, SendError, SendReceipt, spec};
use crate::domain::{Channel, Notification};
use crate::render::RenderedContent;
use crate::routing::ProviderSpec;
use crate::store::inbox::{InboxStore, NewInboxMessage};

/// The provider's `config` JSON: nothing to configure yet.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxConfig {}

/// The provider's `credentials` JSON: none.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboxCredentials {}

/// The in-app inbox adapter.
#[derive(Debug, Clone)]
pub struct InboxAdapter {
    /// The registered provider's name, recorded on attempts.
    name: String,
    /// Where messages are stored.
    store: InboxStore,
}

impl InboxAdapter {
    /// An adapter named `name` writing to `store`.
    pub fn new(name: impl Into<String>, store: InboxStore) -> Self {
        InboxAdapter {
            name: name.into(),
            store,
        }
    }

    /// Builds the adapter of a registered `inbox` provider; needs
    /// `ctx.pool`.
    pub fn from_spec(
        provider: &ProviderSpec,
        ctx: &AdapterContext,
    ) -> Result<Self, AdapterConfigError> {
        let _: InboxConfig = spec::config(provider)?;
        let _: InboxCredentials = spec::credentials(provider)?;
        let pool = ctx.pool.clone().ok_or_else(|| {
            spec::invalid(
                provider,
                "the in-app inbox needs the database, and there is none",
            )
        })?;
        Ok(InboxAdapter::new(
            provider.name.clone(),
            InboxStore::new(pool),
        ))
    }
}

#[async_trait]
impl ChannelAdapter for InboxAdapter {
    fn channel(&self) -> Channel {
        Channel::InApp
    }

    fn provider(&self) -> &str {
        &self.name
    }

    async fn send(
        &self,
        notification: &Notification,
        content: &RenderedContent,
    ) -> Result<SendReceipt, SendError> {
        let user_id = notification
            .recipient
            .user_id
            .as_ref()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| permanent("no_address", "recipient has no user_id"))?;
        let message = NewInboxMessage {
            tenant_id: notification.tenant_id.clone(),
            user_id: user_id.clone(),
            notification_id: notification.id.clone(),
            title: content.subject.clone(),
            body: content.text.clone(),
            data: content.data.clone(),
            category: notification.category.clone(),
        };
        let inserted = self
            .store
            .insert(&message)
            .await
            .map_err(|e| SendError::Retryable {
                code: "inbox_store".into(),
                message: e.to_string(),
                retry_after: None,
            })?;
        Ok(SendReceipt {
            provider: self.name.clone(),
            provider_message_id: Some(inserted.id.to_string()),
        })
    }
}
