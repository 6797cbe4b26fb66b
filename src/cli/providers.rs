//! `herald providers add|list|update|set-status|remove|validate|keygen`: the
//! provider registry in PostgreSQL. Running instances pick a change up at
//! once (the table notifies them) or within `providers.refresh_ms`.
//!
//! Credentials are never printed. Pass them with `--credentials -` (stdin)
//! or `--credentials @file` so they stay out of shell history and the
//! process list.

use std::io::Read as _;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use secrecy::SecretString;

use herald::channels::{AdapterContext, build_provider};
use herald::config::Settings;
use herald::domain::Channel;
use herald::routing::crypto::{Cipher, generate_key};
use herald::routing::store::{
    NewProvider, ProviderPatch, ProviderRow, ProviderStatus, ProviderStore, ProviderStoreError,
};
use herald::routing::{ProviderType, RetryStrategy};

/// `herald providers ...`
#[derive(Debug, Subcommand)]
pub enum ProvidersCommand {
    /// Register a provider.
    ///
    /// Example: herald providers add --name sendgrid-main --type sendgrid
    ///   --provider-config '{"from":"ops@example.com"}' --credentials - --priority 10 < key.json
    Add(Box<AddArgs>),
    /// List the providers (credentials are never shown; CREDS says whether some are stored).
    List,
    /// Change a provider: only the flags given change.
    Update(Box<UpdateArgs>),
    /// Activate or deactivate a provider.
    SetStatus {
        name: String,
        /// active or inactive
        status: String,
    },
    /// Delete a provider.
    Remove { name: String },
    /// Build the provider's adapter and run its connection/auth check.
    /// Exits with 1 when it fails.
    Validate { name: String },
    /// Print a new random key for `[providers] encryption_key`.
    Keygen,
}

/// Settings shared by `add` and `update`.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// email, sms, push, webhook, in_app (default: the type's channel).
    #[arg(long)]
    pub channel: Option<String>,
    /// Non-secret settings: a JSON object, or @FILE. (Not `--config`: that
    /// global flag names Herald's settings file.)
    #[arg(long = "provider-config", id = "provider_config")]
    pub config: Option<String>,
    /// Secrets: a JSON object, @FILE, or `-` to read stdin (preferred: a
    /// value on the command line is visible in the process list).
    #[arg(long)]
    pub credentials: Option<String>,
    /// Lower is tried first.
    #[arg(long, allow_hyphen_values = true)]
    pub priority: Option<i32>,
    /// Mark as the channel's default (wins ties of priority).
    #[arg(long)]
    pub default: bool,
    /// Store as inactive (never selected).
    #[arg(long)]
    pub inactive: bool,
    /// exponential, linear or none.
    #[arg(long)]
    pub retry_strategy: Option<String>,
    #[arg(long)]
    pub max_retries: Option<u32>,
    /// Sends per second across all instances.
    #[arg(long)]
    pub rate_per_second: Option<u32>,
    /// Sends per minute across all instances.
    #[arg(long)]
    pub rate_per_minute: Option<u32>,
    /// Only for this tenant's notifications (tried before global providers).
    #[arg(long)]
    pub tenant: Option<String>,
}

/// `herald providers add` flags.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// 1-64 of a-z 0-9 _ . -
    #[arg(long)]
    pub name: String,
    /// smtp, sendgrid, twilio, fcm, webhook, inbox
    #[arg(long = "type")]
    pub provider_type: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `herald providers update` flags.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    pub name: String,
    #[arg(long = "type")]
    pub provider_type: Option<String>,
    #[command(flatten)]
    pub common: CommonArgs,
    /// Set status active.
    #[arg(long, conflicts_with = "inactive")]
    pub active: bool,
    /// No longer the channel's default.
    #[arg(long, conflicts_with = "default")]
    pub not_default: bool,
    /// Delete the stored credentials.
    #[arg(long, conflicts_with = "credentials")]
    pub no_credentials: bool,
    /// Remove the per-second limit.
    #[arg(long, conflicts_with = "rate_per_second")]
    pub no_rate_per_second: bool,
    /// Remove the per-minute limit.
    #[arg(long, conflicts_with = "rate_per_minute")]
    pub no_rate_per_minute: bool,
    /// Make the provider global (no tenant).
    #[arg(long, conflicts_with = "tenant")]
    pub global: bool,
}

fn provider_type(s: &str) -> anyhow::Result<ProviderType> {
    ProviderType::parse(s).with_context(|| {
        format!("unknown provider type {s:?} (smtp, sendgrid, twilio, fcm, webhook, inbox)")
    })
}

fn channel(s: &str) -> anyhow::Result<Channel> {
    Channel::parse(s)
        .with_context(|| format!("unknown channel {s:?} (email, sms, push, webhook, in_app)"))
}

fn retry_strategy(s: &str) -> anyhow::Result<RetryStrategy> {
    RetryStrategy::parse(s)
        .with_context(|| format!("unknown retry strategy {s:?} (exponential, linear, none)"))
}

fn status(s: &str) -> anyhow::Result<ProviderStatus> {
    ProviderStatus::parse(s).with_context(|| format!("unknown status {s:?} (active, inactive)"))
}

/// `--provider-config`: a JSON object or @FILE.
fn config_arg(v: &str) -> anyhow::Result<serde_json::Value> {
    let text = match v.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => v.to_string(),
    };
    serde_json::from_str(&text).context("--provider-config is not JSON")
}

/// `--credentials`: a JSON object, @FILE or `-` (stdin). The text is
/// checked by the store; errors never echo it.
fn credentials_arg(v: &str) -> anyhow::Result<SecretString> {
    let text = if v == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading credentials from stdin")?;
        s
    } else if let Some(path) = v.strip_prefix('@') {
        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
    } else {
        v.to_string()
    };
    Ok(SecretString::from(text.trim().to_string()))
}

/// Runs one `providers` subcommand.
pub async fn run(settings: &Settings, command: ProvidersCommand) -> anyhow::Result<()> {
    if let ProvidersCommand::Keygen = command {
        println!("{}", generate_key());
        return Ok(());
    }
    let cipher = Cipher::from_settings(&settings.providers)?;
    let pool = herald::store::pool(&settings.database)?;
    let store = ProviderStore::new(pool.clone());
    match command {
        ProvidersCommand::Keygen => Ok(()),
        ProvidersCommand::Add(a) => {
            let c = a.common;
            let mut p = NewProvider::new(a.name, provider_type(&a.provider_type)?);
            p.channel = c.channel.as_deref().map(channel).transpose()?;
            if let Some(v) = &c.config {
                p.config = config_arg(v)?;
            }
            p.credentials = c.credentials.as_deref().map(credentials_arg).transpose()?;
            if let Some(v) = c.priority {
                p.priority = v;
            }
            p.is_default = c.default;
            if c.inactive {
                p.status = ProviderStatus::Inactive;
            }
            if let Some(v) = &c.retry_strategy {
                p.retry_strategy = retry_strategy(v)?;
            }
            if let Some(v) = c.max_retries {
                p.max_retries = v;
            }
            p.rate_limit_per_second = c.rate_per_second;
            p.rate_limit_per_minute = c.rate_per_minute;
            p.tenant_id = c.tenant;
            let row = store.create(p, &cipher).await.map_err(explain)?;
            println!("{}", serde_json::to_string(&row)?);
            Ok(())
        }
        ProvidersCommand::List => {
            print_table(&store.list().await?);
            Ok(())
        }
        ProvidersCommand::Update(a) => {
            let c = a.common;
            let patch = ProviderPatch {
                provider_type: a.provider_type.as_deref().map(provider_type).transpose()?,
                channel: c.channel.as_deref().map(channel).transpose()?,
                config: c.config.as_deref().map(config_arg).transpose()?,
                credentials: if a.no_credentials {
                    Some(None)
                } else {
                    c.credentials
                        .as_deref()
                        .map(credentials_arg)
                        .transpose()?
                        .map(Some)
                },
                priority: c.priority,
                is_default: match (c.default, a.not_default) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
                status: match (a.active, c.inactive) {
                    (true, _) => Some(ProviderStatus::Active),
                    (_, true) => Some(ProviderStatus::Inactive),
                    _ => None,
                },
                retry_strategy: c
                    .retry_strategy
                    .as_deref()
                    .map(retry_strategy)
                    .transpose()?,
                max_retries: c.max_retries,
                rate_limit_per_second: if a.no_rate_per_second {
                    Some(None)
                } else {
                    c.rate_per_second.map(Some)
                },
                rate_limit_per_minute: if a.no_rate_per_minute {
                    Some(None)
                } else {
                    c.rate_per_minute.map(Some)
                },
                tenant_id: if a.global {
                    Some(None)
                } else {
                    c.tenant.map(Some)
                },
            };
            if patch.is_empty() {
                bail!("nothing to change: give at least one flag (see --help)");
            }
            let row = store
                .update(&a.name, patch, &cipher)
                .await
                .map_err(explain)?;
            println!("{}", serde_json::to_string(&row)?);
            Ok(())
        }
        ProvidersCommand::SetStatus { name, status: s } => {
            let row = store
                .set_status(&name, status(&s)?)
                .await
                .map_err(explain)?;
            println!("{} {}", row.name, row.status.as_str());
            Ok(())
        }
        ProvidersCommand::Remove { name } => {
            store.delete(&name).await.map_err(explain)?;
            println!("{name} removed");
            Ok(())
        }
        ProvidersCommand::Validate { name } => {
            let spec = store.load_spec(&name, &cipher).await.map_err(explain)?.spec;
            let ctx = AdapterContext {
                settings: settings.clone(),
                pool: Some(pool),
            };
            let adapter = build_provider(&spec, &ctx)
                .map_err(|e| anyhow::anyhow!("{name}: the adapter cannot be built: {e}"))?;
            match adapter.check().await {
                Ok(()) => {
                    println!("{name}: ok");
                    Ok(())
                }
                Err(e) => bail!("{name}: check failed: {e}"),
            }
        }
    }
}

/// A store error as a CLI message (the store's messages never contain secrets).
fn explain(e: ProviderStoreError) -> anyhow::Error {
    match e {
        ProviderStoreError::Database(e) => anyhow::Error::new(e).context("database"),
        other => anyhow::anyhow!("{other}"),
    }
}

fn print_table(rows: &[ProviderRow]) {
    let header = [
        "NAME", "TYPE", "CHANNEL", "TENANT", "PRIO", "DEFAULT", "STATUS", "RETRY", "MAX", "RATE/S",
        "RATE/MIN", "CREDS",
    ];
    let opt = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.provider_type.as_str().to_string(),
                r.channel.to_string(),
                r.tenant_id.clone().unwrap_or_else(|| "-".into()),
                r.priority.to_string(),
                if r.is_default { "yes" } else { "no" }.to_string(),
                r.status.as_str().to_string(),
                r.retry_strategy.as_str().to_string(),
                r.max_retries.to_string(),
                opt(r.rate_limit_per_second),
                opt(r.rate_limit_per_minute),
                match (&r.has_credentials, &r.credentials_key_id) {
                    (true, Some(k)) => format!("yes (key {k})"),
                    (true, None) => "yes".into(),
                    (false, _) => "no".into(),
                },
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l) {
            *w = (*w).max(c.chars().count());
        }
    }
    let print = |cells: Vec<String>| {
        let line: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    };
    print(header.iter().map(|h| h.to_string()).collect());
    for l in lines {
        print(l);
    }
}
