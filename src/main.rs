//! The `herald` command line: `serve`, `migrate`, `send`, `topics ensure`,
//! `retry`, `keys`, `templates`, `prefs`, `providers` (the last four in `cli/`).

mod cli;

/// jemalloc instead of glibc's malloc: Herald allocates many short-lived
/// buffers per message, and glibc's bins took ~20% of its CPU under load.
/// Measured (BENCHMARKS.md): ~16% less CPU per notification at the same
/// peak RSS; mimalloc saved as much but peaked up to ~45 MiB higher.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;

use herald::app::{App, shutdown_signal};
use herald::config::Settings;
use herald::domain::DeliveryStatusEvent;
use herald::kafka::{self, KafkaPublisher, topics};
use herald::store::RetryOutcome;

/// Herald: Kafka-native notification delivery.
///
/// Reads notification requests from Kafka, sends them (email over SMTP,
/// signed webhooks) and publishes a delivery-status event per status change.
/// Settings come from herald.toml (or --config) and HERALD_* environment
/// variables (HERALD_KAFKA__BROKERS, HERALD_DATABASE__URL, ...); see
/// herald.example.toml.
#[derive(Parser)]
#[command(name = "herald", version, about, long_about)]
struct Cli {
    /// Settings file (TOML). Default: ./herald.toml if present.
    #[arg(long, global = true, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run Herald: consume requests, deliver, publish outcomes; serve /healthz, /readyz, /metrics.
    ///
    /// Stops on SIGTERM/SIGINT after draining in-flight work and committing offsets.
    Serve,
    /// Apply database migrations (also done by `serve` when database.migrate_on_start is true).
    Migrate,
    /// Produce a notification request to the request topic and print its id.
    ///
    /// Example: herald send --channel email --to ada@example.com --subject Hi --text "Hello" --wait 30
    Send(Box<SendArgs>),
    /// Recipient preferences and the suppression list.
    Prefs {
        #[command(subcommand)]
        command: cli::prefs::PrefsCommand,
    },
    /// Benchmark a real `herald serve` process end to end against baselines
    /// (pass-through, raw sinks, raw broker) and append the results to BENCHMARKS.md.
    ///
    /// Needs the local services (scripts/services.sh start) and a release build.
    Bench(Box<herald::bench::BenchArgs>),
    /// Topic administration.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// API keys for the admin/query API.
    Keys {
        #[command(subcommand)]
        command: cli::keys::KeysCommand,
    },
    /// The template store: sync the shipped files, render a template.
    Templates {
        #[command(subcommand)]
        command: cli::templates::TemplatesCommand,
    },
    /// The provider registry: add, list, update, set-status, remove, validate, keygen.
    Providers {
        #[command(subcommand)]
        command: cli::providers::ProvidersCommand,
    },
    /// Send a `failed` notification again: it becomes `retrying`, due now,
    /// and the scheduler of a running instance re-sends it (attempts are kept).
    Retry {
        /// The notification id.
        id: String,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create the request, outcome and DLQ topics if they are missing.
    Ensure {
        /// Partitions for topics created now (default: kafka.topic_partitions).
        #[arg(long)]
        partitions: Option<i32>,
    },
}

#[derive(clap::Args)]
struct SendArgs {
    /// A complete request as JSON (`-` for stdin). Other flags then only override `id`.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Channel: email, webhook (sms, push, in_app are accepted by the schema).
    #[arg(long, default_value = "email")]
    channel: String,
    /// Recipient address: an email address, a phone number or a webhook URL, by channel.
    #[arg(long)]
    to: Option<String>,
    /// Recipient user id.
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    subject: Option<String>,
    #[arg(long)]
    text: Option<String>,
    #[arg(long)]
    html: Option<String>,
    /// Template key (files under templates/KEY/); use with --data.
    #[arg(long)]
    template: Option<String>,
    /// Template data as a JSON object.
    #[arg(long)]
    data: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    /// Request id (the idempotency key). Default: a new UUID.
    #[arg(long)]
    id: Option<String>,
    /// Kafka message key. Default: tenant:user, else the recipient address.
    #[arg(long)]
    key: Option<String>,
    /// Wait up to this many seconds for the final outcome(s) and print them.
    #[arg(long)]
    wait: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    herald::telemetry::init_tracing();
    let settings = Settings::load(cli.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve => {
                let app = App::build(settings).await?;
                app.run_until_stopped(shutdown_signal()).await
            }
            Command::Migrate => {
                let pool = herald::store::pool(&settings.database)?;
                herald::store::migrate(&pool)
                    .await
                    .context("running migrations")?;
                println!("migrations applied");
                Ok(())
            }
            Command::Topics {
                command: TopicsCommand::Ensure { partitions },
            } => {
                let all = topics::all_topics(&settings.kafka);
                let n = partitions.unwrap_or(settings.kafka.topic_partitions);
                let created = topics::ensure_topics(&settings.kafka, &all, n).await?;
                for t in &all {
                    let state = if created.contains(t) {
                        "created"
                    } else {
                        "exists"
                    };
                    println!("{t}\t{state}");
                }
                Ok(())
            }
            Command::Send(args) => send(&settings, *args).await,
            Command::Prefs { command } => cli::prefs::run(&settings, command).await,
            Command::Bench(args) => {
                let line = std::env::args().collect::<Vec<_>>().join(" ");
                herald::bench::run(&settings, *args, line).await
            }
            Command::Keys { command } => cli::keys::run(&settings, command).await,
            Command::Templates { command } => cli::templates::run(&settings, command).await,
            Command::Providers { command } => cli::providers::run(&settings, command).await,
            Command::Retry { id } => retry(&settings, &id).await,
        }
    })
}

/// `herald retry <id>`: a `failed` notification becomes due again now.
async fn retry(settings: &Settings, id: &str) -> anyhow::Result<()> {
    let pool = herald::store::pool(&settings.database)?;
    match herald::store::DueStore::new(pool).retry_failed(id).await? {
        RetryOutcome::Due { attempts } => {
            println!(
                "{id}: retrying now ({attempts} attempt(s) so far; a running instance's scheduler sends it)"
            );
            Ok(())
        }
        RetryOutcome::NotFailed { status } => bail!(
            "{id} is {}, not failed: only failed notifications can be retried",
            status.as_str()
        ),
        RetryOutcome::NotFound => bail!("no notification with id {id:?}"),
    }
}

async fn send(settings: &Settings, args: SendArgs) -> anyhow::Result<()> {
    let request = build_request(&args)?;
    let id = request
        .get("id")
        .and_then(|v| v.as_str())
        .context("the request has no string `id`")?
        .to_string();
    let expected = request
        .get("recipients")
        .and_then(|r| r.as_array())
        .map_or(1, Vec::len);
    let key = args.key.clone().unwrap_or_else(|| default_key(&request));
    let payload = serde_json::to_vec(&request)?;
    let topic = settings
        .kafka
        .request_topics
        .first()
        .context("no request topic configured")?;

    // Position the outcome reader before producing, so no outcome is missed.
    let watcher = match args.wait {
        Some(_) => Some(outcome_watcher(settings)?),
        None => None,
    };
    let publisher = KafkaPublisher::new(&settings.kafka)?;
    publisher
        .producer()
        .send(
            FutureRecord::to(topic).key(&key).payload(&payload),
            Timeout::After(Duration::from_secs(30)),
        )
        .await
        .map_err(|(e, _)| e)
        .with_context(|| format!("producing to {topic}"))?;
    println!("{id}");
    if let (Some(secs), Some(consumer)) = (args.wait, watcher) {
        let found = tokio::task::spawn_blocking(move || {
            wait_for_outcomes(&consumer, &id, expected, Duration::from_secs(secs))
        })
        .await
        .context("waiting for outcomes")?;
        if found < expected {
            bail!("timed out: {found} of {expected} final outcome(s) seen");
        }
    }
    Ok(())
}

fn build_request(args: &SendArgs) -> anyhow::Result<serde_json::Value> {
    let mut request = if let Some(path) = &args.file {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading stdin")?
        } else {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        };
        serde_json::from_str::<serde_json::Value>(&text).context("the request file is not JSON")?
    } else {
        let mut recipient = serde_json::Map::new();
        if let Some(to) = &args.to {
            let field = match args.channel.as_str() {
                "email" => "email",
                "sms" => "phone",
                "webhook" => "url",
                "push" => "device_tokens",
                other => bail!("--to is not used for channel {other}; use --user"),
            };
            let value = if field == "device_tokens" {
                serde_json::json!([to])
            } else {
                serde_json::json!(to)
            };
            recipient.insert(field.into(), value);
        }
        if let Some(u) = &args.user {
            recipient.insert("user_id".into(), serde_json::json!(u));
        }
        let mut r = serde_json::json!({ "channel": args.channel, "recipient": recipient });
        if let Some(key) = &args.template {
            let data: serde_json::Value = match &args.data {
                Some(d) => serde_json::from_str(d).context("--data is not JSON")?,
                None => serde_json::json!({}),
            };
            r["template"] = serde_json::json!({ "key": key, "data": data });
        } else {
            let mut content = serde_json::Map::new();
            for (k, v) in [
                ("subject", &args.subject),
                ("text", &args.text),
                ("html", &args.html),
            ] {
                if let Some(v) = v {
                    content.insert(k.into(), serde_json::json!(v));
                }
            }
            r["content"] = serde_json::Value::Object(content);
        }
        if let Some(t) = &args.tenant {
            r["tenant_id"] = serde_json::json!(t);
        }
        r
    };
    let obj = request
        .as_object_mut()
        .context("the request must be a JSON object")?;
    if let Some(id) = &args.id {
        obj.insert("id".into(), serde_json::json!(id));
    }
    if !obj.contains_key("id") {
        obj.insert(
            "id".into(),
            serde_json::json!(uuid::Uuid::new_v4().to_string()),
        );
    }
    Ok(request)
}

/// `tenant:user` when the request names a user, else the recipient's address.
fn default_key(request: &serde_json::Value) -> String {
    let tenant = request
        .get("tenant_id")
        .and_then(|v| v.as_str())
        .unwrap_or("-");
    let r = &request["recipient"];
    if let Some(u) = r.get("user_id").and_then(|v| v.as_str()) {
        return format!("{tenant}:{u}");
    }
    for f in ["email", "phone", "url"] {
        if let Some(a) = r.get(f).and_then(|v| v.as_str()) {
            return a.to_string();
        }
    }
    request
        .get("id")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string()
}

/// A consumer assigned to every outcome partition at its current end.
fn outcome_watcher(settings: &Settings) -> anyhow::Result<BaseConsumer> {
    let mut cfg = kafka::consumer_config(&settings.kafka, kafka::FETCH_WAIT_MS);
    cfg.set("group.id", format!("herald-send-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false");
    cfg.remove("group.instance.id");
    let consumer: BaseConsumer = cfg.create()?;
    let topic = &settings.kafka.outcome_topic;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(high))?;
        }
    }
    if tpl.count() == 0 {
        bail!("outcome topic {topic} has no partitions (run `herald topics ensure`)");
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// Prints outcome events of request `id` until `expected` final ones arrived.
fn wait_for_outcomes(
    consumer: &BaseConsumer,
    id: &str,
    expected: usize,
    timeout: Duration,
) -> usize {
    let deadline = Instant::now() + timeout;
    let mut finals = std::collections::HashSet::new();
    while finals.len() < expected && Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let Some(Ok(event)) = m
            .payload()
            .map(serde_json::from_slice::<DeliveryStatusEvent>)
        else {
            continue;
        };
        if event.request_id.as_deref() != Some(id) {
            continue;
        }
        println!("{}", serde_json::to_string(&event).unwrap_or_default());
        if event.status.is_final() {
            finals.insert(event.notification_id.clone().unwrap_or_default());
        }
    }
    finals.len()
}
