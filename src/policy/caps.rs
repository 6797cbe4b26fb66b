//! Frequency caps: sliding one-hour and one-day windows of `sent`
//! notifications per (tenant, user, channel). Pure: the caller loads the
//! recent send times ([`Counters`]) only when a cap is configured.

use chrono::{DateTime, Duration, Utc};

/// Recent sends of one recipient on one channel.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// `sent_at` of the most recent sends in the last 24 hours, newest
    /// first, at least `max(max_per_hour, max_per_day)` of them when there
    /// are that many.
    pub recent_sends: Vec<DateTime<Utc>>,
}

/// How many sends `Counters` must hold for these limits.
pub fn needed(max_per_hour: Option<u32>, max_per_day: Option<u32>) -> Option<u32> {
    match (max_per_hour, max_per_day) {
        (None, None) => None,
        (h, d) => Some(h.unwrap_or(0).max(d.unwrap_or(0))),
    }
}

/// Outcome of the cap check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapCheck {
    /// Below every limit.
    Allowed,
    /// A limit is reached; a slot frees at this instant (`None`: never, the
    /// limit is 0).
    Reached(Option<DateTime<Utc>>),
}

/// Checks `limit` sends per `window` ending at `now`.
fn window(counters: &Counters, now: DateTime<Utc>, limit: u32, window: Duration) -> CapCheck {
    if limit == 0 {
        return CapCheck::Reached(None);
    }
    let since = now - window;
    let in_window: Vec<&DateTime<Utc>> = counters
        .recent_sends
        .iter()
        .filter(|t| **t > since && **t <= now)
        .collect();
    let limit = limit as usize;
    if in_window.len() < limit {
        return CapCheck::Allowed;
    }
    // Newest first: once the limit-th newest leaves the window, one slot is free.
    CapCheck::Reached(in_window.get(limit - 1).map(|t| **t + window))
}

/// Checks both limits; when both are reached the later free slot counts.
pub fn check(
    counters: &Counters,
    now: DateTime<Utc>,
    max_per_hour: Option<u32>,
    max_per_day: Option<u32>,
) -> CapCheck {
    let checks = [
        max_per_hour.map(|l| window(counters, now, l, Duration::hours(1))),
        max_per_day.map(|l| window(counters, now, l, Duration::days(1))),
    ];
    let mut result = CapCheck::Allowed;
    for c in checks.into_iter().flatten() {
        result = match (result, c) {
            (CapCheck::Allowed, c) => c,
            (r, CapCheck::Allowed) => r,
            (CapCheck::Reached(None), _) | (_, CapCheck::Reached(None)) => CapCheck::Reached(None),
            (CapCheck::Reached(Some(a)), CapCheck::Reached(Some(b))) => {
                CapCheck::Reached(Some(a.max(b)))
            }
        };
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(min: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + min * 60, 0).unwrap()
    }

    #[test]
    fn hour_cap_frees_when_the_oldest_counted_send_leaves_the_window() {
        let c = Counters {
            recent_sends: vec![at(50), at(40), at(30)],
        };
        assert_eq!(check(&c, at(55), Some(4), None), CapCheck::Allowed);
        assert_eq!(
            check(&c, at(55), Some(3), None),
            CapCheck::Reached(Some(at(90)))
        );
        assert_eq!(check(&c, at(95), Some(3), None), CapCheck::Allowed);
        assert_eq!(check(&c, at(55), Some(0), None), CapCheck::Reached(None));
    }

    #[test]
    fn the_later_of_hour_and_day_wins() {
        let c = Counters {
            recent_sends: vec![at(50), at(40), at(-600)],
        };
        assert_eq!(
            check(&c, at(55), Some(2), Some(3)),
            CapCheck::Reached(Some(at(-600 + 24 * 60)))
        );
        assert_eq!(needed(Some(2), Some(3)), Some(3));
        assert_eq!(needed(None, None), None);
    }
}
