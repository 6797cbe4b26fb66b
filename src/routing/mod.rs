//! Providers and routing: which adapter sends a notification.
//!
//! A *provider* is one configured way to deliver a channel (an SMTP relay, a
//! SendGrid account, a Twilio number, ...). Providers live in PostgreSQL (the
//! registry, credentials encrypted at rest); each becomes a
//! [`ChannelAdapter`](crate::channels::ChannelAdapter) built by
//! [`crate::channels::build_provider`]. For a notification the pipeline asks
//! the [`Registry`] for the candidates of its channel and tenant — tenant
//! providers first, then global ones, active only, by priority — and tries
//! them in order.
//!
//! When the table holds no provider for a channel, the adapters configured in
//! `herald.toml` (`[smtp]`, `[webhook]`) serve as built-in providers, so a
//! fresh install works without registering anything.

pub mod breaker;
pub mod limiter;
pub mod retry;
pub mod router;

pub use router::Router;
pub mod crypto;
pub mod load;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::channels::ChannelAdapter;
use crate::domain::Channel;

/// The kind of adapter a provider uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderType {
    Smtp,
    Sendgrid,
    Twilio,
    Fcm,
    Webhook,
    Inbox,
}

impl ProviderType {
    pub fn as_str(&self) -> &'static str {
        match self {
            ProviderType::Smtp => "smtp",
            ProviderType::Sendgrid => "sendgrid",
            ProviderType::Twilio => "twilio",
            ProviderType::Fcm => "fcm",
            ProviderType::Webhook => "webhook",
            ProviderType::Inbox => "inbox",
        }
    }

    pub fn parse(s: &str) -> Option<ProviderType> {
        Some(match s {
            "smtp" => ProviderType::Smtp,
            "sendgrid" => ProviderType::Sendgrid,
            "twilio" => ProviderType::Twilio,
            "fcm" => ProviderType::Fcm,
            "webhook" => ProviderType::Webhook,
            "inbox" => ProviderType::Inbox,
            _ => return None,
        })
    }

    /// The channel this type of provider delivers.
    pub fn channel(&self) -> Channel {
        match self {
            ProviderType::Smtp | ProviderType::Sendgrid => Channel::Email,
            ProviderType::Twilio => Channel::Sms,
            ProviderType::Fcm => Channel::Push,
            ProviderType::Webhook => Channel::Webhook,
            ProviderType::Inbox => Channel::InApp,
        }
    }
}

/// How a provider's failed sends are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryStrategy {
    Exponential,
    Linear,
    None,
}

impl RetryStrategy {
    pub fn as_str(&self) -> &'static str {
        match self {
            RetryStrategy::Exponential => "exponential",
            RetryStrategy::Linear => "linear",
            RetryStrategy::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<RetryStrategy> {
        Some(match s {
            "exponential" => RetryStrategy::Exponential,
            "linear" => RetryStrategy::Linear,
            "none" => RetryStrategy::None,
            _ => return None,
        })
    }
}

/// One provider as the registry holds it, credentials decrypted. Never log
/// or serialize `credentials`.
#[derive(Clone)]
pub struct ProviderSpec {
    /// Unique name, recorded on attempts and outcomes (`sendgrid-main`).
    pub name: String,
    pub provider_type: ProviderType,
    pub channel: Channel,
    /// Non-secret settings, validated per type by the adapter's constructor
    /// (base URL, from address, host and port, ...).
    pub config: serde_json::Value,
    /// Secret settings (API keys, passwords, service-account keys): the text
    /// of a JSON object (`{}` when none). Decrypted only in memory.
    pub credentials: secrecy::SecretString,
    /// Lower is tried first.
    pub priority: i32,
    pub is_default: bool,
    /// `false`: `inactive`, never selected.
    pub active: bool,
    pub retry_strategy: RetryStrategy,
    /// Retries after the first attempt before the notification is `failed`.
    pub max_retries: u32,
    /// Sends per second across all instances; `None`: unlimited.
    pub rate_limit_per_second: Option<u32>,
    /// Sends per minute across all instances; `None`: unlimited.
    pub rate_limit_per_minute: Option<u32>,
    /// `None`: global; otherwise only for this tenant's notifications, and
    /// preferred over global providers.
    pub tenant_id: Option<String>,
}

impl std::fmt::Debug for ProviderSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderSpec")
            .field("name", &self.name)
            .field("provider_type", &self.provider_type)
            .field("channel", &self.channel)
            .field("config", &self.config)
            .field("credentials", &"[redacted]")
            .field("priority", &self.priority)
            .field("active", &self.active)
            .field("tenant_id", &self.tenant_id)
            .finish_non_exhaustive()
    }
}

/// A provider ready to send: its spec and adapter.
pub struct Provider {
    pub spec: ProviderSpec,
    pub adapter: Arc<dyn ChannelAdapter>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// The providers currently in effect, swapped whole on every change.
#[derive(Default)]
pub struct Registry {
    snapshot: RwLock<Arc<Snapshot>>,
}

/// One consistent view of the providers.
#[derive(Default)]
pub struct Snapshot {
    providers: Vec<Arc<Provider>>,
    /// Built-in adapters from `herald.toml`, used for a channel with no
    /// registered provider.
    builtin: HashMap<Channel, Arc<Provider>>,
}

impl Snapshot {
    pub fn all(&self) -> &[Arc<Provider>] {
        &self.providers
    }
}

impl Registry {
    /// A registry with only the built-in providers.
    pub fn with_builtin(builtin: Vec<Arc<Provider>>) -> Registry {
        let r = Registry::default();
        r.replace_builtin(builtin);
        r
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.snapshot.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the registered providers (built-ins stay).
    pub fn replace(&self, providers: Vec<Arc<Provider>>) {
        let builtin = self.snapshot().builtin.clone();
        self.store(Snapshot { providers, builtin });
    }

    /// Replaces the built-in providers (registered ones stay).
    pub fn replace_builtin(&self, builtin: Vec<Arc<Provider>>) {
        let providers = self.snapshot().providers.clone();
        let builtin = builtin.into_iter().map(|p| (p.spec.channel, p)).collect();
        self.store(Snapshot { providers, builtin });
    }

    fn store(&self, s: Snapshot) {
        let s = Arc::new(s);
        match self.snapshot.write() {
            Ok(mut g) => *g = s,
            Err(p) => *p.into_inner() = s,
        }
    }

    /// The providers to try for `channel` and `tenant`, in order: active
    /// tenant-specific providers by priority, then active global ones by
    /// priority (ties: `is_default` first, then name). Falls back to the
    /// channel's built-in provider when nothing is registered for the channel
    /// at all (an `inactive` registered provider does not bring it back).
    pub fn candidates(&self, channel: Channel, tenant: Option<&str>) -> Vec<Arc<Provider>> {
        let snap = self.snapshot();
        let mut registered = false;
        let mut out: Vec<Arc<Provider>> = Vec::new();
        for p in &snap.providers {
            if p.spec.channel != channel {
                continue;
            }
            registered = true;
            if !p.spec.active {
                continue;
            }
            match (&p.spec.tenant_id, tenant) {
                (None, _) => out.push(p.clone()),
                (Some(t), Some(want)) if t == want => out.push(p.clone()),
                _ => {}
            }
        }
        // Per message: compare by reference, no allocation.
        out.sort_by(|a, b| {
            let key = |p: &Provider| {
                (
                    p.spec.tenant_id.is_none(),
                    p.spec.priority,
                    !p.spec.is_default,
                )
            };
            key(a)
                .cmp(&key(b))
                .then_with(|| a.spec.name.cmp(&b.spec.name))
        });
        if !registered && let Some(b) = snap.builtin.get(&channel) {
            out.push(b.clone());
        }
        out
    }
}
