//! Per-provider rate limits that hold across all instances.
//!
//! A provider allows `rate_limit_per_second` and/or `rate_limit_per_minute`
//! sends in total. Every instance gets `share` of it, where share = the
//! request partitions it owns / all request partitions (recomputed on every
//! rebalance), so the instances together never exceed the limit without any
//! shared store. The limiter is governor's GCRA with a burst of one: sends
//! are spaced evenly, never bunched.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};

use super::ProviderSpec;

type Direct = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    DefaultClock,
    governor::middleware::NoOpMiddleware<<DefaultClock as Clock>::Instant>,
>;

/// This instance's share of every provider's quota, in `[0, 1]`.
#[derive(Debug, Clone)]
pub struct Share(Arc<AtomicU64>);

impl Default for Share {
    fn default() -> Self {
        Share(Arc::new(AtomicU64::new(1.0f64.to_bits())))
    }
}

impl Share {
    /// Sets the share from owned and total partition counts. With no
    /// partitions known yet the share is 1 (a lone instance).
    ///
    /// Owning no partition keeps the previous share: that is mostly the
    /// moment between revoke and assign of a rebalance. (An instance that
    /// stays without partitions, with more instances than partitions, keeps
    /// its last share for the due rows it fires.)
    pub fn set_partitions(&self, owned: usize, total: usize) {
        if owned == 0 && total > 0 {
            return;
        }
        let share = if total == 0 {
            1.0
        } else {
            (owned as f64 / total as f64).clamp(0.0, 1.0)
        };
        self.0.store(share.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// The spacing between two sends of a provider on this instance, or `None`
/// when it is unlimited. An instance with no share (no partitions) still
/// sends its due rows at 1/1000 of the limit rather than not at all.
pub fn spacing(spec: &ProviderSpec, share: f64) -> Option<Duration> {
    let per_second = spec.rate_limit_per_second.map(|n| f64::from(n.max(1)));
    let per_minute = spec
        .rate_limit_per_minute
        .map(|n| f64::from(n.max(1)) / 60.0);
    let rate = match (per_second, per_minute) {
        (None, None) => return None,
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (Some(a), Some(b)) => a.min(b),
    };
    let rate = rate * share.clamp(0.001, 1.0);
    Some(Duration::from_secs_f64(1.0 / rate))
}

/// Why [`Limiters::acquire`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WouldWait(pub Duration);

struct Entry {
    spacing: Duration,
    limiter: Direct,
    /// Sends waiting for a token (to estimate how long a new one would wait).
    waiting: AtomicUsize,
    /// The latest slot handed to a deferred send: each deferral takes the
    /// next one, so deferred sends come back spread at the provider's rate
    /// instead of all at once.
    horizon: Mutex<Option<Instant>>,
}

impl Entry {
    /// Reserves the next free slot no sooner than `earliest` from now.
    fn reserve(&self, earliest: Duration) -> Duration {
        let now = Instant::now();
        let mut h = match self.horizon.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        let slot = match *h {
            Some(last) if last + self.spacing > now + earliest => last + self.spacing,
            _ => now + earliest,
        };
        *h = Some(slot);
        slot.saturating_duration_since(now)
    }
}

/// The rate limiters of all providers, keyed by provider name (so a
/// registry reload keeps them).
#[derive(Default)]
pub struct Limiters {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    share: Share,
}

impl Limiters {
    pub fn new(share: Share) -> Limiters {
        Limiters {
            entries: Mutex::default(),
            share,
        }
    }

    pub fn share(&self) -> &Share {
        &self.share
    }

    fn entry(&self, spec: &ProviderSpec) -> Option<Arc<Entry>> {
        let spacing = spacing(spec, self.share.get())?;
        let mut map = match self.entries.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(e) = map.get(&spec.name)
            && e.spacing == spacing
        {
            return Some(e.clone());
        }
        let quota = Quota::with_period(spacing)?;
        let e = Arc::new(Entry {
            spacing,
            limiter: RateLimiter::direct(quota),
            waiting: AtomicUsize::new(0),
            horizon: Mutex::new(None),
        });
        map.insert(spec.name.clone(), e.clone());
        Some(e)
    }

    /// Takes a send token for `spec`, waiting up to `max_wait`. Returns how
    /// long it waited, or [`WouldWait`] with the delay of a reserved future
    /// slot when the wait would be longer than `max_wait` (the caller then
    /// defers the notification to that slot instead of holding its lane).
    pub async fn acquire(
        &self,
        spec: &ProviderSpec,
        max_wait: Duration,
    ) -> Result<Duration, WouldWait> {
        let Some(entry) = self.entry(spec) else {
            return Ok(Duration::ZERO);
        };
        let started = Instant::now();
        let clock = DefaultClock::default();
        entry.waiting.fetch_add(1, Ordering::SeqCst);
        let _guard = Waiting(&entry.waiting);
        let mut slept = false;
        loop {
            match entry.limiter.check() {
                Ok(()) if slept => return Ok(started.elapsed()),
                Ok(()) => return Ok(Duration::ZERO),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(clock.now());
                    let waited = started.elapsed();
                    if waited + wait > max_wait {
                        // Everyone queued ahead needs a slot first.
                        let queued = entry.waiting.load(Ordering::SeqCst) as u32;
                        let earliest = wait.max(entry.spacing.saturating_mul(queued));
                        return Err(WouldWait(entry.reserve(earliest)));
                    }
                    tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
                    slept = true;
                }
            }
        }
    }
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{ProviderType, RetryStrategy};

    fn spec(per_second: Option<u32>, per_minute: Option<u32>) -> ProviderSpec {
        ProviderSpec {
            name: "p".into(),
            provider_type: ProviderType::Webhook,
            channel: crate::domain::Channel::Webhook,
            config: serde_json::json!({}),
            credentials: secrecy::SecretString::from("{}"),
            priority: 1,
            is_default: false,
            active: true,
            retry_strategy: RetryStrategy::Exponential,
            max_retries: 3,
            rate_limit_per_second: per_second,
            rate_limit_per_minute: per_minute,
            tenant_id: None,
        }
    }

    #[test]
    fn spacing_takes_the_stricter_limit_and_the_share() {
        assert_eq!(spacing(&spec(None, None), 1.0), None);
        assert_eq!(
            spacing(&spec(Some(20), None), 1.0),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            spacing(&spec(Some(20), None), 0.5),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            spacing(&spec(Some(100), Some(60)), 1.0),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn share_from_partitions() {
        let s = Share::default();
        assert_eq!(s.get(), 1.0);
        s.set_partitions(2, 8);
        assert_eq!(s.get(), 0.25);
        s.set_partitions(0, 8);
        assert_eq!(s.get(), 0.25, "a rebalance gap keeps the share");
        s.set_partitions(0, 0);
        assert_eq!(s.get(), 1.0);
    }

    #[tokio::test]
    async fn acquire_spaces_sends_and_gives_up_past_max_wait() {
        let l = Limiters::new(Share::default());
        let s = spec(Some(50), None); // one per 20 ms
        let max = Duration::from_millis(500);
        assert_eq!(l.acquire(&s, max).await, Ok(Duration::ZERO));
        let waited = l.acquire(&s, max).await.unwrap();
        assert!(waited >= Duration::from_millis(10), "{waited:?}");
        // A zero budget cannot wait for the next slot.
        let e = l.acquire(&s, Duration::ZERO).await.unwrap_err();
        assert!(
            e.0 > Duration::ZERO && e.0 <= Duration::from_millis(20),
            "{e:?}"
        );
        // Unlimited providers never wait.
        assert_eq!(
            l.acquire(&spec(None, None), Duration::ZERO).await,
            Ok(Duration::ZERO)
        );
    }
}
