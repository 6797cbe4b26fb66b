//! When a notification whose providers all failed retryably is tried again.
//!
//! Pure: the caller passes the random jitter source, so tests are exact.

use std::time::Duration;

use super::RetryStrategy;

/// Backoff parameters (from `[routing]`).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay before the first retry.
    pub base: Duration,
    /// Largest delay.
    pub cap: Duration,
}

impl Backoff {
    /// Delay before retry number `retry` (1-based) with `strategy`, or
    /// `None` when `retry` exceeds `max_retries` (or the strategy is `none`).
    ///
    /// - exponential: `base · 2^(retry-1)`, capped, with "equal jitter": a
    ///   uniformly random point in the upper half of that delay (`jitter` in
    ///   `[0, 1)`), so retries of many notifications spread out but never come
    ///   sooner than half the nominal delay;
    /// - linear: `base · retry`, capped, same jitter.
    ///
    /// A provider's `Retry-After` wins when it is longer (never shorter: the
    /// provider knows best when it can take the message).
    pub fn delay(
        &self,
        strategy: RetryStrategy,
        retry: u32,
        max_retries: u32,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Option<Duration> {
        if retry == 0 || retry > max_retries {
            return None;
        }
        let nominal = match strategy {
            RetryStrategy::None => return None,
            RetryStrategy::Exponential => {
                let factor = 2u32.saturating_pow(retry.saturating_sub(1).min(31));
                self.base.saturating_mul(factor)
            }
            RetryStrategy::Linear => self.base.saturating_mul(retry),
        }
        .min(self.cap);
        let jitter = jitter.clamp(0.0, 1.0);
        let half = nominal / 2;
        let jittered = half + half.mul_f64(jitter);
        Some(match retry_after {
            Some(ra) if ra > jittered => ra,
            _ => jittered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Backoff {
        Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        }
    }

    #[test]
    fn exponential_doubles_within_jitter_bounds_and_caps() {
        let b = b();
        for (retry, nominal) in [(1, 1), (2, 2), (3, 4), (4, 8), (7, 60), (30, 60)] {
            let lo = b
                .delay(RetryStrategy::Exponential, retry, 100, None, 0.0)
                .unwrap();
            let hi = b
                .delay(RetryStrategy::Exponential, retry, 100, None, 0.999_999)
                .unwrap();
            let n = Duration::from_secs(nominal);
            assert_eq!(lo, n / 2, "retry {retry}");
            assert!(hi <= n && hi > n.mul_f64(0.99), "retry {retry}: {hi:?}");
        }
    }

    #[test]
    fn linear_and_none() {
        let b = b();
        assert_eq!(
            b.delay(RetryStrategy::Linear, 3, 5, None, 1.0),
            Some(Duration::from_secs(3))
        );
        assert_eq!(b.delay(RetryStrategy::None, 1, 5, None, 0.5), None);
    }

    #[test]
    fn max_retries_is_the_number_of_retries() {
        let b = b();
        assert!(
            b.delay(RetryStrategy::Exponential, 3, 3, None, 0.5)
                .is_some()
        );
        assert_eq!(b.delay(RetryStrategy::Exponential, 4, 3, None, 0.5), None);
        assert_eq!(b.delay(RetryStrategy::Exponential, 1, 0, None, 0.5), None);
    }

    #[test]
    fn retry_after_wins_only_when_longer() {
        let b = b();
        let long = Duration::from_secs(30);
        assert_eq!(
            b.delay(RetryStrategy::Exponential, 1, 5, Some(long), 0.0),
            Some(long)
        );
        let short = Duration::from_millis(10);
        assert_eq!(
            b.delay(RetryStrategy::Exponential, 1, 5, Some(short), 0.0),
            Some(Duration::from_millis(500))
        );
        // Longer than the cap: the provider still wins.
        let huge = Duration::from_secs(600);
        assert_eq!(
            b.delay(RetryStrategy::Exponential, 1, 5, Some(huge), 0.0),
            Some(huge)
        );
    }

    #[test]
    fn growing_delays_for_consecutive_retries() {
        let b = b();
        let mut last = Duration::ZERO;
        for retry in 1..=5 {
            let d = b
                .delay(RetryStrategy::Exponential, retry, 5, None, 0.5)
                .unwrap();
            assert!(d > last);
            last = d;
        }
    }
}
