//! `herald prefs set|get|suppress`: manage recipient preferences and the
//! suppression list directly in PostgreSQL. A write here reaches running
//! instances when their cached entry expires (`policy.preference_cache_ttl_ms`).

use anyhow::{Context, bail};
use chrono::Utc;
use clap::{Args, Subcommand};

use herald::config::Settings;
use herald::domain::Channel;
use herald::policy::preferences::{PreferenceRecord, Preferences, parse_time};
use herald::store::{self, PreferenceStore};

/// `herald prefs ...`
#[derive(Debug, Subcommand)]
pub enum PrefsCommand {
    /// Write the preference record of (tenant, user, channel); the flags
    /// given replace the stored record (flags left out inherit defaults).
    ///
    /// Example: herald prefs set --tenant acme --user u-1 --channel email
    ///   --address ada@example.com --quiet-hours 22:00-08:00 --timezone America/New_York
    ///   --max-per-hour 3 --mute marketing
    Set(Box<SetArgs>),
    /// Print the stored record and the effective preferences as JSON.
    Get(KeyArgs),
    /// Add an address to the suppression list.
    Suppress {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        address: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Which record: no `--user` is the tenant default, neither is the global default.
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long)]
    pub user: Option<String>,
    /// email, sms, push, webhook, in_app
    #[arg(long)]
    pub channel: String,
}

/// `herald prefs set` flags.
#[derive(Debug, Args)]
pub struct SetArgs {
    #[command(flatten)]
    pub key: KeyArgs,
    #[arg(long)]
    pub enabled: Option<bool>,
    #[arg(long)]
    pub opt_in: Option<bool>,
    /// Address used when requests name only the user.
    #[arg(long)]
    pub address: Option<String>,
    /// Push device token (repeatable).
    #[arg(long = "device-token")]
    pub device_tokens: Vec<String>,
    /// Local window `HH:MM-HH:MM` (crossing midnight allowed).
    #[arg(long)]
    pub quiet_hours: Option<String>,
    /// IANA zone of the quiet hours.
    #[arg(long)]
    pub timezone: Option<String>,
    #[arg(long)]
    pub max_per_hour: Option<u32>,
    #[arg(long)]
    pub max_per_day: Option<u32>,
    /// Muted category (repeatable).
    #[arg(long = "mute")]
    pub muted_categories: Vec<String>,
}

fn channel(s: &str) -> anyhow::Result<Channel> {
    Channel::parse(s).with_context(|| format!("unknown channel {s:?}"))
}

/// Runs one `prefs` subcommand.
pub async fn run(settings: &Settings, command: PrefsCommand) -> anyhow::Result<()> {
    let pool = store::pool(&settings.database)?;
    let prefs = PreferenceStore::new(pool);
    match command {
        PrefsCommand::Set(a) => {
            let ch = channel(&a.key.channel)?;
            let mut r = PreferenceRecord::empty(
                a.key.tenant.as_deref().unwrap_or_default(),
                a.key.user.as_deref().unwrap_or_default(),
                ch,
                Utc::now(),
            );
            r.enabled = a.enabled;
            r.opt_in = a.opt_in;
            r.address = a.address;
            r.device_tokens = (!a.device_tokens.is_empty()).then_some(a.device_tokens);
            if let Some(q) = &a.quiet_hours {
                let Some((start, end)) = q.split_once('-') else {
                    bail!("--quiet-hours must be HH:MM-HH:MM");
                };
                r.quiet_hours_start = Some(parse_time(start).map_err(anyhow::Error::msg)?);
                r.quiet_hours_end = Some(parse_time(end).map_err(anyhow::Error::msg)?);
            }
            r.quiet_hours_timezone = a.timezone;
            let limit = |v: Option<u32>| v.map(|v| i32::try_from(v).unwrap_or(i32::MAX));
            r.max_per_hour = limit(a.max_per_hour);
            r.max_per_day = limit(a.max_per_day);
            r.muted_categories = (!a.muted_categories.is_empty()).then_some(a.muted_categories);
            r.validate().map_err(anyhow::Error::msg)?;
            prefs.upsert(&r).await.context("writing the preference")?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        PrefsCommand::Get(k) => {
            let ch = channel(&k.channel)?;
            let tenant = k.tenant.as_deref().unwrap_or_default();
            let user = k.user.as_deref().unwrap_or_default();
            let stored = prefs.get(tenant, user, ch).await?;
            let levels = prefs.levels(tenant, user, ch).await?;
            let refs: Vec<&PreferenceRecord> = levels.iter().collect();
            let effective = Preferences::resolve(&refs);
            let out = serde_json::json!({
                "stored": stored,
                "effective": {
                    "enabled": effective.enabled,
                    "opt_in": effective.opt_in,
                    "address": effective.address,
                    "device_tokens": effective.device_tokens,
                    "quiet_hours": effective.quiet_hours.map(|q| serde_json::json!({
                        "start": q.start.to_string(), "end": q.end.to_string(), "timezone": q.timezone,
                    })),
                    "max_per_hour": effective.max_per_hour,
                    "max_per_day": effective.max_per_day,
                    "muted_categories": effective.muted_categories,
                },
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        PrefsCommand::Suppress {
            tenant,
            address,
            reason,
        } => {
            prefs
                .suppress(
                    tenant.as_deref().unwrap_or_default(),
                    &address,
                    reason.as_deref(),
                )
                .await?;
            println!("suppressed");
            Ok(())
        }
    }
}
