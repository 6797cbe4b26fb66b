//! The router: which providers a notification is tried with, whether each
//! may be used now (circuit breaker, rate limit), and when a notification
//! whose providers all failed is tried again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::breaker::{Breaker, BreakerState};
use super::limiter::{Limiters, Share, WouldWait};
use super::retry::Backoff;
use super::{Provider, ProviderSpec, ProviderType, Registry, RetryStrategy};
use crate::channels::ChannelAdapter;
use crate::config::RoutingSettings;
use crate::domain::Notification;

/// Providers, breakers and limiters shared by the pipeline and the scheduler.
pub struct Router {
    registry: Arc<Registry>,
    limiters: Limiters,
    breakers: Mutex<HashMap<String, Breaker>>,
    settings: RoutingSettings,
}

impl Router {
    pub fn new(registry: Arc<Registry>, settings: RoutingSettings, share: Share) -> Router {
        Router {
            registry,
            limiters: Limiters::new(share),
            breakers: Mutex::default(),
            settings,
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// This instance's share of provider quotas (set on rebalance).
    pub fn share(&self) -> &Share {
        self.limiters.share()
    }

    pub fn settings(&self) -> &RoutingSettings {
        &self.settings
    }

    /// Providers to try for `n`, in order (see [`Registry::candidates`]).
    pub fn candidates(&self, n: &Notification) -> Vec<Arc<Provider>> {
        self.registry.candidates(n.channel, n.tenant_id.as_deref())
    }

    fn breakers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Breaker>> {
        match self.breakers.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn new_breaker(&self) -> Breaker {
        Breaker::new(
            self.settings.breaker_failure_threshold,
            Duration::from_millis(self.settings.breaker_cooldown_ms),
        )
    }

    /// Whether a send may go to `provider` now (its circuit is closed, or
    /// half-open and this is the one trial).
    pub fn allow(&self, provider: &str) -> bool {
        let now = Instant::now();
        let mut b = self.breakers();
        match b.get_mut(provider) {
            Some(br) => br.allow(now),
            None => true,
        }
    }

    /// Whether `provider`'s circuit is open (its cool-down not over yet).
    pub fn is_open(&self, provider: &str) -> bool {
        let now = Instant::now();
        self.breakers()
            .get(provider)
            .is_some_and(|b| b.state(now) == BreakerState::Open)
    }

    /// Gives back a half-open trial that was granted but not used (the
    /// notification turned out to need no send).
    pub fn release_trial(&self, provider: &str) {
        if let Some(b) = self.breakers().get_mut(provider) {
            b.release_trial();
        }
    }

    /// How long until the first of `providers` lets a trial through, when
    /// all of them are open.
    pub fn reopens_in(&self, providers: &[Arc<Provider>]) -> Option<Duration> {
        let now = Instant::now();
        let b = self.breakers();
        providers
            .iter()
            .map(|p| {
                b.get(&p.spec.name)
                    .and_then(|br| br.open_until())
                    .map(|u| u.saturating_duration_since(now))
            })
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().min())
    }

    /// Records a send that reached the provider and succeeded (or was
    /// refused for reasons of the message). True when this closed an open
    /// or half-open circuit.
    pub fn success(&self, provider: &str) -> bool {
        match self.breakers().get_mut(provider) {
            Some(b) => {
                let was = b.open_until().is_some();
                b.success();
                was
            }
            None => false,
        }
    }

    /// Records a failure that counts against the provider. Returns true when
    /// it opened the circuit.
    pub fn failure(&self, provider: &str) -> bool {
        let mut map = self.breakers();
        let fresh = self.new_breaker();
        map.entry(provider.to_string())
            .or_insert(fresh)
            .failure(Instant::now())
    }

    /// Every provider's circuit state (those never failed are closed and
    /// not listed).
    pub fn breaker_states(&self) -> Vec<(String, BreakerState)> {
        let now = Instant::now();
        let mut v: Vec<_> = self
            .breakers()
            .iter()
            .map(|(k, b)| (k.clone(), b.state(now)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Takes a rate-limit token for `spec` (see [`Limiters::acquire`]).
    pub async fn acquire(&self, spec: &ProviderSpec) -> Result<Duration, WouldWait> {
        self.limiters
            .acquire(
                spec,
                Duration::from_millis(self.settings.max_rate_limit_wait_ms),
            )
            .await
    }

    /// The delay before retry number `retry` following the rules of
    /// `primary` (the first candidate), or `None` when no retry is left.
    pub fn retry_delay(
        &self,
        primary: &ProviderSpec,
        retry: u32,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        let backoff = Backoff {
            base: Duration::from_millis(self.settings.retry_base_ms),
            cap: Duration::from_millis(self.settings.retry_cap_ms),
        };
        backoff.delay(
            primary.retry_strategy,
            retry,
            primary.max_retries,
            retry_after,
            rand::random::<f64>(),
        )
    }
}

/// The spec of a `herald.toml` adapter: named after it, no limits.
pub fn builtin_provider(adapter: Arc<dyn ChannelAdapter>, max_retries: u32) -> Provider {
    let channel = adapter.channel();
    let provider_type = match channel {
        crate::domain::Channel::Email => ProviderType::Smtp,
        crate::domain::Channel::Sms => ProviderType::Twilio,
        crate::domain::Channel::Push => ProviderType::Fcm,
        crate::domain::Channel::Webhook => ProviderType::Webhook,
        crate::domain::Channel::InApp => ProviderType::Inbox,
    };
    Provider {
        spec: ProviderSpec {
            name: adapter.provider().to_string(),
            provider_type,
            channel,
            config: serde_json::json!({"builtin": true}),
            credentials: secrecy::SecretString::from("{}"),
            priority: 0,
            is_default: true,
            active: true,
            retry_strategy: RetryStrategy::Exponential,
            max_retries,
            rate_limit_per_second: None,
            rate_limit_per_minute: None,
            tenant_id: None,
        },
        adapter,
    }
}
