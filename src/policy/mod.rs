//! Recipient policy: what may be sent, when. Owns the pure decision
//! ([`decide::decide`]) and its parts — preferences and recipient resolution,
//! quiet hours, frequency caps — plus [`Policy`], which feeds the decision
//! from cached preferences and cheap counters, and the [`Clock`] seam.
//!
//! Hot-path cost: a cached recipient costs two hash-map look-ups; the
//! database is asked only on a cache miss (one query for the preference
//! levels and the suppression list together, cached for
//! `preference_cache_ttl_ms`) and, only for recipients with a frequency cap,
//! one indexed query for their recent sends.

pub mod caps;
pub mod decide;
pub mod preferences;
pub mod quiet_hours;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

pub use caps::Counters;
pub use decide::{Decision, decide, reason};
pub use preferences::{PreferenceRecord, Preferences};

use crate::config::PolicySettings;
use crate::domain::{Channel, Notification};
use crate::store::{PreferenceStore, StoreError};

/// The source of "now" for policy decisions (tests inject a fixed one).
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that always says the same instant.
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub DateTime<Utc>);

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        self.0
    }
}

/// What [`Policy::evaluate`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Evaluation {
    /// The request names only a user and the preferences hold no address.
    NoAddress,
    /// The recipient is known; this is the decision.
    Decided(Decision),
}

/// A small TTL cache; cleared whole when it reaches its capacity.
struct TtlCache<K, V> {
    entries: Mutex<HashMap<K, (Instant, V)>>,
    ttl: Duration,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq, V: Clone> TtlCache<K, V> {
    fn new(ttl: Duration, capacity: usize) -> Self {
        TtlCache {
            entries: Mutex::new(HashMap::new()),
            ttl,
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (Instant, V)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, k: &K) -> Option<V> {
        self.lock()
            .get(k)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, k: K, v: V) {
        let mut m = self.lock();
        if m.len() >= self.capacity {
            m.clear();
        }
        m.insert(k, (Instant::now(), v));
    }

    fn retain(&self, keep: impl Fn(&K) -> bool) {
        self.lock().retain(|k, _| keep(k));
    }
}

type PrefKey = (String, String, Channel);

/// Preferences (cached), counters and the decision, for the pipeline and
/// the scheduler.
pub struct Policy {
    store: PreferenceStore,
    settings: PolicySettings,
    clock: Arc<dyn Clock>,
    /// Resolved preferences by (tenant, user, channel).
    preferences: TtlCache<PrefKey, Preferences>,
    /// Suppression-list membership by (tenant, address).
    suppressed: TtlCache<(String, String), bool>,
}

impl Policy {
    pub fn new(store: PreferenceStore, settings: PolicySettings, clock: Arc<dyn Clock>) -> Self {
        let ttl = Duration::from_millis(settings.preference_cache_ttl_ms);
        let capacity = settings.preference_cache_capacity;
        Policy {
            store,
            settings,
            clock,
            preferences: TtlCache::new(ttl, capacity),
            suppressed: TtlCache::new(ttl, capacity),
        }
    }

    /// The clock decisions use.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// The preference repository.
    pub fn store(&self) -> &PreferenceStore {
        &self.store
    }

    /// Forgets cached preferences of (tenant, user, channel); a tenant or
    /// global default (`user_id == ""`) forgets everything.
    pub fn invalidate(&self, tenant_id: &str, user_id: &str, channel: Channel) {
        if user_id.is_empty() {
            self.preferences.retain(|_| false);
        } else {
            self.preferences
                .retain(|k| !(k.0 == tenant_id && k.1 == user_id && k.2 == channel));
        }
    }

    /// Forgets the cached suppression status of `address` for every tenant
    /// (a delivery receipt has just suppressed it).
    pub fn forget_address(&self, address: &str) {
        self.suppressed.retain(|k| k.1 != address);
    }

    fn key(n: &Notification) -> PrefKey {
        (
            n.tenant_id.clone().unwrap_or_default(),
            n.recipient.user_id.clone().unwrap_or_default(),
            n.channel,
        )
    }

    /// Effective preferences of `n`'s recipient (cached).
    pub async fn preferences(&self, n: &Notification) -> Result<Preferences, StoreError> {
        let key = Self::key(n);
        if let Some(p) = self.preferences.get(&key) {
            return Ok(p);
        }
        let levels = self.store.levels(&key.0, &key.1, key.2).await?;
        let refs: Vec<&PreferenceRecord> = levels.iter().collect();
        let p = Preferences::resolve(&refs);
        self.preferences.put(key, p.clone());
        Ok(p)
    }

    /// Preferences plus, when the request carries its address, its
    /// suppression status: from the caches, else in one query.
    async fn load(&self, n: &Notification) -> Result<(Preferences, Option<bool>), StoreError> {
        let key = Self::key(n);
        let address = preferences::recipient_address(n);
        let suppressed_key = address.clone().map(|a| (key.0.clone(), a));
        let cached_suppressed = suppressed_key.as_ref().and_then(|k| self.suppressed.get(k));
        if let Some(p) = self.preferences.get(&key) {
            return Ok((p, cached_suppressed));
        }
        let ask = if cached_suppressed.is_some() {
            None
        } else {
            address.as_deref()
        };
        let (levels, suppressed) = self.store.lookup(&key.0, &key.1, key.2, ask).await?;
        let refs: Vec<&PreferenceRecord> = levels.iter().collect();
        let p = Preferences::resolve(&refs);
        self.preferences.put(key, p.clone());
        if let (Some(k), Some(s)) = (suppressed_key, suppressed) {
            self.suppressed.put(k, s);
        }
        Ok((p, cached_suppressed.or(suppressed)))
    }

    async fn is_suppressed(&self, tenant_id: &str, address: &str) -> Result<bool, StoreError> {
        let key = (tenant_id.to_string(), address.to_string());
        if let Some(s) = self.suppressed.get(&key) {
            return Ok(s);
        }
        let s = self.store.is_suppressed(tenant_id, address).await?;
        self.suppressed.put(key, s);
        Ok(s)
    }

    /// Resolves `n`'s address from the preferences when it has none, then
    /// decides. `n` is updated in place (the resolved address is what gets
    /// stored and sent).
    pub async fn evaluate(&self, n: &mut Notification) -> Result<Evaluation, StoreError> {
        let now = self.clock.now();
        let (mut prefs, suppressed) = self.load(n).await?;
        if !preferences::resolve_recipient(n, &prefs) {
            return Ok(Evaluation::NoAddress);
        }
        prefs.address_suppressed = match (suppressed, preferences::recipient_address(n)) {
            (Some(s), _) => s,
            // The address came from the preferences.
            (None, Some(address)) => {
                let tenant = n.tenant_id.as_deref().unwrap_or_default();
                self.is_suppressed(tenant, &address).await?
            }
            (None, None) => false,
        };
        let mut counters = Counters::default();
        if let (Some(limit), Some(user)) = (
            caps::needed(prefs.max_per_hour, prefs.max_per_day),
            n.recipient.user_id.as_deref(),
        ) && limit > 0
        {
            counters.recent_sends = self
                .store
                .recent_sends(n.tenant_id.as_deref(), user, n.channel, now, limit)
                .await?;
        }
        Ok(Evaluation::Decided(decide(
            n,
            &prefs,
            &counters,
            now,
            &self.settings,
        )))
    }
}
