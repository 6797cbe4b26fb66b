//! A circuit breaker per provider: after `threshold` consecutive failures the
//! provider is skipped for `cooldown`; then one trial send is let through
//! (half-open). Its success closes the circuit, its failure opens it again.
//!
//! Pure state machine over an explicit clock (`Instant` passed in).

use std::time::{Duration, Instant};

/// The state shown in metrics and `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// Gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(&self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

/// One provider's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    open_until: Option<Instant>,
    /// A trial send is in flight (half-open): others keep skipping.
    trial: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            failures: 0,
            open_until: None,
            trial: false,
        }
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// May a send go to this provider now? In half-open state only one trial
    /// is let through until it reports back.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen if self.trial => false,
            BreakerState::HalfOpen => {
                self.trial = true;
                true
            }
        }
    }

    /// When an open circuit lets a trial through (`None` when closed).
    pub fn open_until(&self) -> Option<Instant> {
        self.open_until
    }

    /// A granted trial was not used: let the next caller have it.
    pub fn release_trial(&mut self) {
        self.trial = false;
    }

    /// A send succeeded: close.
    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.trial = false;
    }

    /// A send failed in a way that says something about the provider
    /// (timeout, 5xx, 429, connection refused — not a bad address).
    /// Returns true when this failure opened the circuit.
    pub fn failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        if self.trial || self.failures >= self.threshold {
            let opened = self.state(now) != BreakerState::Open;
            self.trial = false;
            self.open_until = Some(now + self.cooldown);
            return opened;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_half_opens_with_one_trial() {
        let t0 = Instant::now();
        let cd = Duration::from_secs(30);
        let mut b = Breaker::new(3, cd);
        assert!(b.allow(t0));
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        assert_eq!(b.state(t0), BreakerState::Closed);
        assert!(b.failure(t0));
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(!b.allow(t0 + Duration::from_secs(29)));
        let later = t0 + cd;
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert!(b.allow(later), "one trial");
        assert!(!b.allow(later), "only one trial at a time");
        // The trial fails: open again for a full cooldown.
        b.failure(later);
        assert_eq!(b.state(later + Duration::from_secs(1)), BreakerState::Open);
        let again = later + cd;
        assert!(b.allow(again));
        b.success();
        assert_eq!(b.state(again), BreakerState::Closed);
        assert!(b.allow(again) && b.allow(again));
    }

    #[test]
    fn success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, Duration::from_secs(1));
        b.failure(t0);
        b.success();
        b.failure(t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
    }
}
