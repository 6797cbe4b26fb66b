//! Quiet hours: a daily local-time window (e.g. 22:00–08:00) in an IANA time
//! zone during which non-urgent notifications wait. Pure functions; time
//! zones and DST transitions come from `chrono-tz`.
//!
//! The window is `[start, end)` in local wall-clock time; `start > end`
//! crosses midnight; `start == end` is an empty window (no quiet hours).

use chrono::{DateTime, Duration, LocalResult, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A daily quiet window in one time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    /// Local time the window opens (inclusive).
    pub start: NaiveTime,
    /// Local time the window closes (exclusive).
    pub end: NaiveTime,
    /// The recipient's zone.
    pub tz: Tz,
}

impl QuietHours {
    /// True when the local wall-clock time of `at` is inside the window.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        let t = at.with_timezone(&self.tz).time();
        self.contains_local(t)
    }

    fn contains_local(&self, t: NaiveTime) -> bool {
        if self.start == self.end {
            false
        } else if self.start < self.end {
            self.start <= t && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }

    /// When the window that `now` is in ends: the first instant at or after
    /// `now` outside the window. `None` when `now` is not quiet.
    ///
    /// DST: an end time that does not exist that day (spring forward) ends
    /// the window at the first local time after it; an end time that exists
    /// twice (fall back) ends it at the first occurrence not before `now`.
    pub fn window_end(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if !self.contains(now) {
            return None;
        }
        let mut at = now;
        // A window whose allowed part falls into a DST gap has no allowed
        // time that day: move on to the next day's end (bounded).
        for _ in 0..4 {
            let local = at.with_timezone(&self.tz);
            let t = local.time();
            let date = if self.start > self.end && t >= self.start {
                local.date_naive().succ_opt()?
            } else {
                local.date_naive()
            };
            let end = self.resolve(date, self.end, at)?;
            if !self.contains(end) {
                return Some(end);
            }
            at = end;
        }
        None
    }

    /// The first instant not before `not_before` whose local date-time is
    /// `date` `time`, or the first local time after it when it falls into a
    /// DST gap.
    fn resolve(
        &self,
        date: NaiveDate,
        time: NaiveTime,
        not_before: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let naive = date.and_time(time);
        match self.tz.from_local_datetime(&naive) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(a, b) => {
                let (a, b) = (a.with_timezone(&Utc), b.with_timezone(&Utc));
                Some(if a >= not_before { a } else { b })
            }
            LocalResult::None => {
                // Gap: step minute by minute to the first local time that exists.
                (1..=24 * 60).find_map(|m| {
                    match self.tz.from_local_datetime(&(naive + Duration::minutes(m))) {
                        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
                        LocalResult::Ambiguous(a, _) => Some(a.with_timezone(&Utc)),
                        LocalResult::None => None,
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(h: u32, m: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, m, 0).unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn ny(start: NaiveTime, end: NaiveTime) -> QuietHours {
        QuietHours {
            start,
            end,
            tz: chrono_tz::America::New_York,
        }
    }

    #[test]
    fn night_window_in_new_york_ends_at_eight_local() {
        let q = ny(t(22, 0), t(8, 0));
        // 2026-01-15 23:30 EST = 04:30Z next day
        let now = utc("2026-01-16T04:30:00Z");
        assert_eq!(q.window_end(now), Some(utc("2026-01-16T13:00:00Z")));
        // 07:59 EST is still quiet, same end
        assert_eq!(
            q.window_end(utc("2026-01-16T12:59:00Z")),
            Some(utc("2026-01-16T13:00:00Z"))
        );
        // 08:00 and noon are not quiet
        assert_eq!(q.window_end(utc("2026-01-16T13:00:00Z")), None);
        assert_eq!(q.window_end(utc("2026-01-16T17:00:00Z")), None);
        // 22:00 opens it
        assert_eq!(
            q.window_end(utc("2026-01-16T03:00:00Z")),
            Some(utc("2026-01-16T13:00:00Z"))
        );
    }

    #[test]
    fn spring_forward_night_ends_at_eight_edt() {
        // DST starts 2026-03-08 02:00 EST → 03:00 EDT.
        let q = ny(t(22, 0), t(8, 0));
        // 2026-03-07 23:30 EST = 2026-03-08 04:30Z; 08:00 EDT = 12:00Z
        assert_eq!(
            q.window_end(utc("2026-03-08T04:30:00Z")),
            Some(utc("2026-03-08T12:00:00Z"))
        );
    }

    #[test]
    fn fall_back_night_ends_at_eight_est() {
        // DST ends 2026-11-01 02:00 EDT → 01:00 EST.
        let q = ny(t(22, 0), t(8, 0));
        // 2026-10-31 23:30 EDT = 2026-11-01 03:30Z; 08:00 EST = 13:00Z
        assert_eq!(
            q.window_end(utc("2026-11-01T03:30:00Z")),
            Some(utc("2026-11-01T13:00:00Z"))
        );
    }

    #[test]
    fn end_inside_the_spring_gap_ends_when_clocks_jump() {
        let q = ny(t(1, 0), t(2, 30));
        // 01:30 EST on 2026-03-08 = 06:30Z; 02:30 does not exist → 03:00 EDT = 07:00Z
        assert_eq!(
            q.window_end(utc("2026-03-08T06:30:00Z")),
            Some(utc("2026-03-08T07:00:00Z"))
        );
    }

    #[test]
    fn ambiguous_end_uses_the_occurrence_not_before_now() {
        let q = ny(t(0, 0), t(1, 30));
        // Second 01:15 (EST) on 2026-11-01 = 06:15Z; first 01:30 (EDT) = 05:30Z is past
        assert_eq!(
            q.window_end(utc("2026-11-01T06:15:00Z")),
            Some(utc("2026-11-01T06:30:00Z"))
        );
        // First 01:15 (EDT) = 05:15Z → first 01:30 = 05:30Z
        assert_eq!(
            q.window_end(utc("2026-11-01T05:15:00Z")),
            Some(utc("2026-11-01T05:30:00Z"))
        );
    }

    #[test]
    fn empty_window_is_never_quiet() {
        let q = ny(t(8, 0), t(8, 0));
        assert_eq!(q.window_end(utc("2026-01-16T13:00:00Z")), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn window_end_is_outside_and_not_before_now(
            secs in 0i64..4_102_444_800, // 1970..2100
            start in 0u32..86_400,
            end in 0u32..86_400,
            tz_index in 0usize..chrono_tz::TZ_VARIANTS.len(),
        ) {
            let now = DateTime::from_timestamp(secs, 0).unwrap();
            let q = QuietHours {
                start: NaiveTime::from_num_seconds_from_midnight_opt(start, 0).unwrap(),
                end: NaiveTime::from_num_seconds_from_midnight_opt(end, 0).unwrap(),
                tz: chrono_tz::TZ_VARIANTS[tz_index],
            };
            match q.window_end(now) {
                None => prop_assert!(!q.contains(now)),
                Some(e) => {
                    prop_assert!(e >= now, "{e} before {now}");
                    prop_assert!(!q.contains(e), "{e} still quiet");
                    prop_assert!(e - now <= Duration::days(3), "{e} too far after {now}");
                }
            }
        }
    }
}
