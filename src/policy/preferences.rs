//! Recipient preferences: the stored record of one (tenant, user, channel)
//! and the effective [`Preferences`] resolved field by field from the
//! user's record, the tenant default, the global default and built-ins.
//! Also recipient resolution: a request that names only a user gets its
//! address from the preferences.

use chrono::{DateTime, NaiveTime, Utc};
use serde::{Deserialize, Serialize};

use super::quiet_hours::QuietHours;
use crate::domain::{Channel, EmailAddress, Notification, PhoneNumber, WebhookUrl};

/// One stored preference row; `None` fields inherit from the next level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferenceRecord {
    /// `""`: global default.
    pub tenant_id: String,
    /// `""`: the tenant's default.
    pub user_id: String,
    pub channel: Channel,
    pub enabled: Option<bool>,
    pub opt_in: Option<bool>,
    /// Email address, E.164 phone or webhook URL (by channel).
    pub address: Option<String>,
    pub device_tokens: Option<Vec<String>>,
    pub quiet_hours_start: Option<NaiveTime>,
    pub quiet_hours_end: Option<NaiveTime>,
    /// IANA zone name.
    pub quiet_hours_timezone: Option<String>,
    pub max_per_hour: Option<i32>,
    pub max_per_day: Option<i32>,
    /// Categories this recipient does not want on this channel.
    pub muted_categories: Option<Vec<String>>,
    /// Last write wins by this timestamp.
    pub updated_at: DateTime<Utc>,
}

impl PreferenceRecord {
    /// A record that sets nothing (everything inherits).
    pub fn empty(
        tenant_id: &str,
        user_id: &str,
        channel: Channel,
        updated_at: DateTime<Utc>,
    ) -> Self {
        PreferenceRecord {
            tenant_id: tenant_id.to_string(),
            user_id: user_id.to_string(),
            channel,
            enabled: None,
            opt_in: None,
            address: None,
            device_tokens: None,
            quiet_hours_start: None,
            quiet_hours_end: None,
            quiet_hours_timezone: None,
            max_per_hour: None,
            max_per_day: None,
            muted_categories: None,
            updated_at,
        }
    }
}

/// The effective preferences for one notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Preferences {
    /// False: the channel is off (`suppressed`, `channel_disabled`).
    pub enabled: bool,
    /// `Some(false)`: opted out (`not_opted_in`); `None`: never asked, which
    /// counts as "no" for categories that require an opt-in.
    pub opt_in: Option<bool>,
    /// Address used when the request gives only a user id.
    pub address: Option<String>,
    pub device_tokens: Vec<String>,
    /// The quiet window; its zone falls back to the recipient's, then UTC.
    pub quiet_hours: Option<QuietWindow>,
    pub max_per_hour: Option<u32>,
    pub max_per_day: Option<u32>,
    pub muted_categories: Vec<String>,
    /// The recipient's address is on the suppression list.
    pub address_suppressed: bool,
}

/// A quiet window as configured: the zone may still be unknown.
#[derive(Debug, Clone, PartialEq)]
pub struct QuietWindow {
    pub start: NaiveTime,
    pub end: NaiveTime,
    /// IANA name from the preferences, if any.
    pub timezone: Option<String>,
}

impl QuietWindow {
    /// The window in the preference's zone, else `fallback_tz` (the
    /// recipient's), else UTC. An unknown zone name counts as UTC.
    pub fn in_zone(&self, fallback_tz: Option<&str>) -> QuietHours {
        let tz = self
            .timezone
            .as_deref()
            .or(fallback_tz)
            .and_then(|name| name.parse::<chrono_tz::Tz>().ok())
            .unwrap_or(chrono_tz::UTC);
        QuietHours {
            start: self.start,
            end: self.end,
            tz,
        }
    }
}

impl Default for Preferences {
    /// Built-in defaults: enabled, no opt-in recorded, no quiet hours, no caps.
    fn default() -> Self {
        Preferences {
            enabled: true,
            opt_in: None,
            address: None,
            device_tokens: Vec::new(),
            quiet_hours: None,
            max_per_hour: None,
            max_per_day: None,
            muted_categories: Vec::new(),
            address_suppressed: false,
        }
    }
}

impl Preferences {
    /// Resolves field by field over `levels`, most specific first (user,
    /// tenant default, global default); what none sets keeps the built-in.
    /// Quiet hours are taken whole from the first level that sets both ends.
    pub fn resolve(levels: &[&PreferenceRecord]) -> Preferences {
        fn first<T: Clone>(
            levels: &[&PreferenceRecord],
            f: impl Fn(&PreferenceRecord) -> Option<T>,
        ) -> Option<T> {
            levels.iter().find_map(|r| f(r))
        }
        let quiet_hours =
            levels
                .iter()
                .find_map(|r| match (r.quiet_hours_start, r.quiet_hours_end) {
                    (Some(start), Some(end)) => Some(QuietWindow {
                        start,
                        end,
                        timezone: r.quiet_hours_timezone.clone(),
                    }),
                    _ => None,
                });
        let non_negative = |v: i32| u32::try_from(v).ok();
        Preferences {
            enabled: first(levels, |r| r.enabled).unwrap_or(true),
            opt_in: first(levels, |r| r.opt_in),
            address: first(levels, |r| r.address.clone()),
            device_tokens: first(levels, |r| r.device_tokens.clone()).unwrap_or_default(),
            quiet_hours,
            max_per_hour: first(levels, |r| r.max_per_hour).and_then(non_negative),
            max_per_day: first(levels, |r| r.max_per_day).and_then(non_negative),
            muted_categories: first(levels, |r| r.muted_categories.clone()).unwrap_or_default(),
            address_suppressed: false,
        }
    }
}

/// The address `n` is sent to on its channel, if it has one.
pub fn recipient_address(n: &Notification) -> Option<String> {
    let r = &n.recipient;
    match n.channel {
        Channel::Email => r.email.as_ref().map(|e| e.as_str().to_string()),
        Channel::Sms => r.phone.as_ref().map(|p| p.as_str().to_string()),
        Channel::Webhook => r.url.as_ref().map(|u| u.as_str().to_string()),
        Channel::Push => r.device_tokens.first().cloned(),
        Channel::InApp => r.user_id.clone(),
    }
}

/// Fills in the channel's address from `prefs` when the request gave only a
/// user id. Returns false when there is still no (valid) address: the
/// notification fails with `no_address`.
pub fn resolve_recipient(n: &mut Notification, prefs: &Preferences) -> bool {
    if recipient_address(n).is_some() {
        return true;
    }
    let r = &mut n.recipient;
    match n.channel {
        Channel::Email => {
            r.email = prefs
                .address
                .as_deref()
                .and_then(|a| EmailAddress::parse(a).ok())
        }
        Channel::Sms => {
            r.phone = prefs
                .address
                .as_deref()
                .and_then(|a| PhoneNumber::parse(a).ok())
        }
        Channel::Webhook => {
            r.url = prefs
                .address
                .as_deref()
                .and_then(|a| WebhookUrl::parse(a).ok())
        }
        Channel::Push => r.device_tokens = prefs.device_tokens.clone(),
        Channel::InApp => {}
    }
    recipient_address(n).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(tenant: &str, user: &str) -> PreferenceRecord {
        PreferenceRecord::empty(tenant, user, Channel::Email, Utc::now())
    }

    #[test]
    fn resolves_field_by_field_most_specific_first() {
        let mut user = rec("acme", "u1");
        user.address = Some("u1@example.com".into());
        user.max_per_hour = Some(3);
        let mut tenant = rec("acme", "");
        tenant.enabled = Some(false);
        tenant.max_per_hour = Some(10);
        tenant.quiet_hours_start = NaiveTime::from_hms_opt(22, 0, 0);
        tenant.quiet_hours_end = NaiveTime::from_hms_opt(8, 0, 0);
        let mut global = rec("", "");
        global.muted_categories = Some(vec!["marketing".into()]);
        global.enabled = Some(true);
        let p = Preferences::resolve(&[&user, &tenant, &global]);
        assert!(!p.enabled);
        assert_eq!(p.max_per_hour, Some(3));
        assert_eq!(p.address.as_deref(), Some("u1@example.com"));
        assert_eq!(p.muted_categories, vec!["marketing".to_string()]);
        assert!(p.quiet_hours.is_some());
        assert_eq!(Preferences::resolve(&[]), Preferences::default());
    }
}

/// A preference-update event (`schemas/preference-update.v1.json`) as sent
/// by other systems. It carries the whole record of its key: fields left
/// out inherit from the tenant/global defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireUpdate {
    tenant_id: Option<String>,
    user_id: Option<String>,
    channel: Channel,
    updated_at: DateTime<Utc>,
    enabled: Option<bool>,
    opt_in: Option<bool>,
    address: Option<String>,
    device_tokens: Option<Vec<String>>,
    quiet_hours: Option<WireQuietHours>,
    frequency_limit: Option<WireFrequencyLimit>,
    muted_categories: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireQuietHours {
    start: String,
    end: String,
    timezone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireFrequencyLimit {
    max_per_hour: Option<u32>,
    max_per_day: Option<u32>,
}

/// Parses `HH:MM` or `HH:MM:SS`.
pub fn parse_time(s: &str) -> Result<NaiveTime, String> {
    NaiveTime::parse_from_str(s, "%H:%M:%S")
        .or_else(|_| NaiveTime::parse_from_str(s, "%H:%M"))
        .map_err(|_| format!("{s:?} is not a time of day (HH:MM)"))
}

/// Checks an IANA zone name.
pub fn check_timezone(s: &str) -> Result<(), String> {
    s.parse::<chrono_tz::Tz>()
        .map(|_| ())
        .map_err(|_| format!("{s:?} is not an IANA time zone"))
}

fn check_address(channel: Channel, a: &str) -> Result<(), String> {
    let r = match channel {
        Channel::Email => EmailAddress::parse(a).map(|_| ()),
        Channel::Sms => PhoneNumber::parse(a).map(|_| ()),
        Channel::Webhook => WebhookUrl::parse(a).map(|_| ()),
        Channel::Push | Channel::InApp => Ok(()),
    };
    r.map_err(|e| e.to_string())
}

impl PreferenceRecord {
    /// Checks what the database and the decision rely on: address syntax
    /// for the channel, the zone name, limits that fit.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(a) = &self.address {
            check_address(self.channel, a)?;
        }
        if let Some(tz) = &self.quiet_hours_timezone {
            check_timezone(tz)?;
        }
        if self.quiet_hours_start.is_some() != self.quiet_hours_end.is_some() {
            return Err("quiet hours need both start and end".into());
        }
        if self.max_per_hour.is_some_and(|v| v < 0) || self.max_per_day.is_some_and(|v| v < 0) {
            return Err("frequency limits must not be negative".into());
        }
        Ok(())
    }
}

/// Decodes one preference-update event into the record it writes.
pub fn decode_update(bytes: &[u8]) -> Result<PreferenceRecord, String> {
    let w: WireUpdate =
        serde_json::from_slice(bytes).map_err(|e| format!("not a preference update: {e}"))?;
    let (start, end, tz) = match w.quiet_hours {
        Some(q) => (
            Some(parse_time(&q.start)?),
            Some(parse_time(&q.end)?),
            q.timezone,
        ),
        None => (None, None, None),
    };
    let limit = |v: Option<u32>| v.map(|v| i32::try_from(v).unwrap_or(i32::MAX));
    let (max_per_hour, max_per_day) = match w.frequency_limit {
        Some(f) => (limit(f.max_per_hour), limit(f.max_per_day)),
        None => (None, None),
    };
    let r = PreferenceRecord {
        tenant_id: w.tenant_id.unwrap_or_default(),
        user_id: w.user_id.unwrap_or_default(),
        channel: w.channel,
        enabled: w.enabled,
        opt_in: w.opt_in,
        address: w.address,
        device_tokens: w.device_tokens,
        quiet_hours_start: start,
        quiet_hours_end: end,
        quiet_hours_timezone: tz,
        max_per_hour,
        max_per_day,
        muted_categories: w.muted_categories,
        updated_at: w.updated_at,
    };
    r.validate()?;
    Ok(r)
}

#[cfg(test)]
mod update_tests {
    use super::*;

    #[test]
    fn example_event_decodes_and_matches_the_schema() {
        let example = include_str!("../../schemas/examples/preferences/update.json");
        let r = decode_update(example.as_bytes()).expect("example decodes");
        assert_eq!(r.tenant_id, "acme");
        assert_eq!(r.user_id, "user-42");
        assert_eq!(r.max_per_hour, Some(3));
        assert_eq!(r.quiet_hours_start, NaiveTime::from_hms_opt(22, 0, 0));
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../schemas/preference-update.v1.json")).unwrap();
        let v = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("schema compiles");
        let instance: serde_json::Value = serde_json::from_str(example).unwrap();
        assert!(v.is_valid(&instance));
        let bad: serde_json::Value = serde_json::json!({"channel": "email"});
        assert!(!v.is_valid(&bad), "updated_at is required");
        assert!(decode_update(br#"{"channel":"email","updated_at":"2026-01-01T00:00:00Z","quiet_hours":{"start":"22:00","end":"08:00","timezone":"Mars/Base"}}"#).is_err());
        assert!(
            decode_update(
                br#"{"channel":"email","updated_at":"2026-01-01T00:00:00Z","address":"nope"}"#
            )
            .is_err()
        );
    }
}
