//! The policy decision: one pure function over (notification, preferences,
//! counters, now, settings). Checks run in a fixed order — expiry,
//! suppression, schedule, quiet hours, frequency caps — and the first that
//! applies decides, with a reason code from a bounded set.

use chrono::{DateTime, Duration, Utc};

use super::caps::{self, CapCheck, Counters};
use super::preferences::Preferences;
use crate::config::PolicySettings;
use crate::domain::{Notification, Priority, Status};

/// Bounded reason codes carried as `reason` on outcome events (and as a
/// metrics label).
pub mod reason {
    pub const EXPIRED: &str = "expired";
    pub const CHANNEL_DISABLED: &str = "channel_disabled";
    pub const NOT_OPTED_IN: &str = "not_opted_in";
    pub const CATEGORY_MUTED: &str = "category_muted";
    pub const SUPPRESSED_ADDRESS: &str = "suppressed_address";
    pub const SCHEDULED: &str = "scheduled";
    pub const QUIET_HOURS: &str = "quiet_hours";
    pub const FREQUENCY_CAP: &str = "frequency_cap";
    pub const NO_ADDRESS: &str = "no_address";
    pub const SEND: &str = "send";
}

/// What to do with a notification now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Render and send it now.
    SendNow,
    /// Keep it as a due row until `until`. `status` is `Scheduled`,
    /// `Deferred` or `Throttled`.
    Defer {
        status: Status,
        until: DateTime<Utc>,
        reason: &'static str,
    },
    /// Never send it. `status` is `Suppressed` or `Expired`.
    Drop {
        status: Status,
        reason: &'static str,
    },
}

impl Decision {
    /// `(outcome, reason)` labels for the decisions counter.
    pub fn labels(&self) -> (&'static str, &'static str) {
        match self {
            Decision::SendNow => ("send", reason::SEND),
            Decision::Defer { status, reason, .. } | Decision::Drop { status, reason } => {
                (status.as_str(), reason)
            }
        }
    }
}

fn in_list(list: &[String], category: Option<&str>) -> bool {
    category.is_some_and(|c| list.iter().any(|x| x == c))
}

/// `n` has expired at `now`: it is never sent.
fn expired(n: &Notification, now: DateTime<Utc>) -> Option<Decision> {
    n.expires_at
        .is_some_and(|e| e <= now)
        .then_some(Decision::Drop {
            status: Status::Expired,
            reason: reason::EXPIRED,
        })
}

/// `n` is scheduled after `now`: it waits until then.
fn scheduled(n: &Notification, now: DateTime<Utc>) -> Option<Decision> {
    n.scheduled_at
        .filter(|at| *at > now)
        .map(|until| Decision::Defer {
            status: Status::Scheduled,
            until,
            reason: reason::SCHEDULED,
        })
}

/// What happens to `n` at `now` without recipient policy
/// (`policy.enabled = false`): the request's own `expires_at` and
/// `scheduled_at` still hold, as they are part of the request, not of the
/// recipient's preferences.
pub fn decide_unmanaged(n: &Notification, now: DateTime<Utc>) -> Decision {
    expired(n, now)
        .or_else(|| scheduled(n, now))
        .unwrap_or(Decision::SendNow)
}

/// Decides what happens to `n` at `now`. See the module docs for the order.
pub fn decide(
    n: &Notification,
    prefs: &Preferences,
    counters: &Counters,
    now: DateTime<Utc>,
    settings: &PolicySettings,
) -> Decision {
    let category = n.category.as_deref();
    let drop = |status, reason| Decision::Drop { status, reason };
    if let Some(d) = expired(n, now) {
        return d;
    }
    if !prefs.enabled {
        return drop(Status::Suppressed, reason::CHANNEL_DISABLED);
    }
    let needs_opt_in = in_list(&settings.opt_in_required_categories, category);
    if prefs.opt_in == Some(false) || (prefs.opt_in.is_none() && needs_opt_in) {
        return drop(Status::Suppressed, reason::NOT_OPTED_IN);
    }
    if in_list(&prefs.muted_categories, category) {
        return drop(Status::Suppressed, reason::CATEGORY_MUTED);
    }
    if prefs.address_suppressed {
        return drop(Status::Suppressed, reason::SUPPRESSED_ADDRESS);
    }
    if let Some(d) = scheduled(n, now) {
        return d;
    }
    let bypass_quiet = n.priority == Priority::Urgent
        || in_list(&settings.quiet_hours_bypass_categories, category);
    if !bypass_quiet && let Some(window) = &prefs.quiet_hours {
        let q = window.in_zone(n.recipient.timezone.as_deref());
        if q.contains(now) {
            return Decision::Defer {
                status: Status::Deferred,
                until: q.window_end(now).unwrap_or(now + Duration::hours(1)),
                reason: reason::QUIET_HOURS,
            };
        }
    }
    match caps::check(counters, now, prefs.max_per_hour, prefs.max_per_day) {
        CapCheck::Allowed => Decision::SendNow,
        CapCheck::Reached(free) => {
            if in_list(&settings.frequency_cap_drop_categories, category) {
                drop(Status::Suppressed, reason::FREQUENCY_CAP)
            } else {
                Decision::Defer {
                    status: Status::Throttled,
                    // A limit of 0 never frees: look again in a day.
                    until: free.unwrap_or(now + Duration::days(1)),
                    reason: reason::FREQUENCY_CAP,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Channel, Content, InlineContent, Meta, Recipient};
    use crate::policy::preferences::QuietWindow;
    use chrono::NaiveTime;

    fn settings() -> PolicySettings {
        crate::config::Settings::load_with_env(None, Vec::new())
            .expect("defaults")
            .policy
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn notification() -> Notification {
        Notification {
            id: "n1".into(),
            request_id: "n1".into(),
            tenant_id: Some("acme".into()),
            app_id: None,
            channel: Channel::Email,
            recipient: Recipient {
                user_id: Some("u1".into()),
                ..Default::default()
            },
            content: Content::Inline(InlineContent {
                text: Some("hi".into()),
                ..Default::default()
            }),
            priority: Priority::Normal,
            category: None,
            scheduled_at: None,
            expires_at: None,
            meta: Meta::default(),
            correlation_id: None,
        }
    }

    fn night_in_new_york() -> Preferences {
        Preferences {
            quiet_hours: Some(QuietWindow {
                start: NaiveTime::from_hms_opt(22, 0, 0).unwrap(),
                end: NaiveTime::from_hms_opt(8, 0, 0).unwrap(),
                timezone: Some("America/New_York".into()),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn without_policy_only_the_request_s_own_schedule_and_expiry_hold() {
        let now = utc("2026-01-15T12:00:00Z");
        let mut n = notification();
        assert_eq!(decide_unmanaged(&n, now), Decision::SendNow);
        n.scheduled_at = Some(now);
        assert_eq!(decide_unmanaged(&n, now), Decision::SendNow, "due now");
        let later = now + Duration::minutes(5);
        n.scheduled_at = Some(later);
        assert_eq!(
            decide_unmanaged(&n, now),
            Decision::Defer {
                status: Status::Scheduled,
                until: later,
                reason: reason::SCHEDULED
            }
        );
        // Expiry comes first, even before the scheduled time.
        n.expires_at = Some(now);
        assert_eq!(decide_unmanaged(&n, now).labels(), ("expired", "expired"));
        n.expires_at = Some(now + Duration::minutes(10));
        assert_eq!(
            decide_unmanaged(&n, now).labels(),
            ("scheduled", "scheduled")
        );
        assert_eq!(decide_unmanaged(&n, later), Decision::SendNow);
        // Urgent changes nothing here: a schedule is not quiet hours.
        n.priority = Priority::Urgent;
        assert_eq!(
            decide_unmanaged(&n, now).labels(),
            ("scheduled", "scheduled")
        );
    }

    #[test]
    fn suppression_reasons() {
        let s = settings();
        let now = Utc::now();
        let c = Counters::default();
        let mut n = notification();
        let p = Preferences {
            enabled: false,
            ..Default::default()
        };
        assert_eq!(
            decide(&n, &p, &c, now, &s).labels(),
            ("suppressed", "channel_disabled")
        );
        let p = Preferences {
            opt_in: Some(false),
            ..Default::default()
        };
        assert_eq!(
            decide(&n, &p, &c, now, &s).labels(),
            ("suppressed", "not_opted_in")
        );
        n.category = Some("marketing".into());
        let p = Preferences {
            muted_categories: vec!["marketing".into()],
            opt_in: Some(true),
            ..Default::default()
        };
        assert_eq!(
            decide(&n, &p, &c, now, &s).labels(),
            ("suppressed", "category_muted")
        );
        // marketing needs an explicit opt-in by default
        assert_eq!(
            decide(&n, &Preferences::default(), &c, now, &s).labels(),
            ("suppressed", "not_opted_in")
        );
        n.category = None;
        let p = Preferences {
            address_suppressed: true,
            ..Default::default()
        };
        assert_eq!(
            decide(&n, &p, &c, now, &s).labels(),
            ("suppressed", "suppressed_address")
        );
        n.expires_at = Some(now);
        assert_eq!(
            decide(&n, &Preferences::default(), &c, now, &s).labels(),
            ("expired", "expired")
        );
    }

    #[test]
    fn quiet_hours_defer_until_eight_local_and_urgent_bypasses() {
        let s = settings();
        let mut n = notification();
        // 23:30 EST
        let now = utc("2026-01-16T04:30:00Z");
        assert_eq!(
            decide(&n, &night_in_new_york(), &Counters::default(), now, &s),
            Decision::Defer {
                status: Status::Deferred,
                until: utc("2026-01-16T13:00:00Z"),
                reason: reason::QUIET_HOURS
            }
        );
        n.priority = Priority::Urgent;
        assert_eq!(
            decide(&n, &night_in_new_york(), &Counters::default(), now, &s),
            Decision::SendNow
        );
        n.priority = Priority::Normal;
        n.category = Some("security".into());
        assert_eq!(
            decide(&n, &night_in_new_york(), &Counters::default(), now, &s),
            Decision::SendNow,
            "security bypasses quiet hours by default"
        );
        // the recipient's zone is used when the preference names none
        let mut p = night_in_new_york();
        if let Some(q) = &mut p.quiet_hours {
            q.timezone = None;
        }
        n.category = None;
        n.recipient.timezone = Some("America/New_York".into());
        assert!(matches!(
            decide(&n, &p, &Counters::default(), now, &s),
            Decision::Defer { .. }
        ));
    }

    #[test]
    fn schedule_then_caps() {
        let s = settings();
        let now = utc("2026-01-16T17:00:00Z");
        let mut n = notification();
        n.scheduled_at = Some(now + Duration::seconds(2));
        assert_eq!(
            decide(&n, &Preferences::default(), &Counters::default(), now, &s),
            Decision::Defer {
                status: Status::Scheduled,
                until: now + Duration::seconds(2),
                reason: reason::SCHEDULED
            }
        );
        n.scheduled_at = None;
        let p = Preferences {
            max_per_hour: Some(3),
            opt_in: Some(true),
            ..Default::default()
        };
        let sent = |m: i64| now - Duration::minutes(m);
        let c = Counters {
            recent_sends: vec![sent(1), sent(2), sent(30)],
        };
        assert_eq!(
            decide(&n, &p, &c, now, &s),
            Decision::Defer {
                status: Status::Throttled,
                until: sent(30) + Duration::hours(1),
                reason: reason::FREQUENCY_CAP
            }
        );
        n.category = Some("marketing".into());
        assert_eq!(
            decide(&n, &p, &c, now, &s).labels(),
            ("suppressed", "frequency_cap")
        );
    }
}
