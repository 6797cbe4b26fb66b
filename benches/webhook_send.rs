//! Client CPU per webhook send: Herald's adapter against the same POST (the
//! adapter's body and headers for each notification, made once beforehand)
//! from a bare reqwest client, both to a local nginx answering 200 (the sink
//! `herald bench` uses; apt `nginx-light`). The send is the largest single
//! step of the webhook path, so this is its floor and what Herald adds to it:
//! the payload, the signature and headers, the per-host turn, the timeout and
//! the reading of the reply.
//!
//! 64 tasks send concurrently on a two-worker runtime (as `herald serve`
//! runs, with jemalloc); each round sends [`SENDS`] requests and takes this
//! process's CPU (user + system, from `/proc`) for them. nginx's CPU is not
//! counted. The report gives the median of [`ROUNDS`] rounds.
//!
//! Run: `cargo bench --bench webhook_send` (add `-- adapter` or `-- reqwest`
//! for one of the two). Results in BENCHMARKS.md. Under
//! `cargo test --all-targets` each variant sends a few hundred requests in
//! one round: a check that the harness and the adapter still work against
//! nginx, not a measurement.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use herald::bench::load::{Mix, RequestSpec, build_request};
use herald::bench::machine::cpu_seconds;
use herald::bench::sinks::NginxSink;
use herald::channels::ChannelAdapter;
use herald::channels::webhook::{WebhookAdapter, payload, sign};
use herald::config::Settings;
use herald::domain::decode::{Decoded, decode_message};
use herald::domain::request::Notification;
use herald::render::{FileRenderer, RenderedContent, Renderer};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};

/// The allocator `herald serve` runs with (src/main.rs).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Rounds per variant; the report gives their median and spread.
const ROUNDS: usize = 7;
/// Sends per round (under `cargo test`: [`CHECK_SENDS`], one round).
const SENDS: usize = 50_000;
const CHECK_SENDS: usize = 256;
/// Sends in flight at once.
const CONCURRENCY: usize = 64;

/// One notification to send, and the request the adapter makes of it (made
/// once, for the bare client: the same body and headers).
struct Item {
    notification: Notification,
    content: RenderedContent,
    body: Vec<u8>,
    headers: HeaderMap,
}

fn main() -> anyhow::Result<()> {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not.
    let timed = std::env::args().any(|a| a == "--bench");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run(filter, timed))
}

async fn run(filter: Option<String>, timed: bool) -> anyhow::Result<()> {
    let nginx = NginxSink::start()?;
    let mut settings = Settings::load(None).context("loading the default settings")?;
    // The sink is on 127.0.0.1.
    settings.webhook.allow_private_targets = true;
    let renderer = FileRenderer::new(&settings.templates).context("loading the templates")?;
    let url = nginx.url("/hook");
    let spec = RequestSpec {
        mix: Mix::Webhook,
        template: false,
        batch: 1,
        webhook_url: url.clone(),
        failing_url: nginx.url("/unused"),
        failing_percent: 0,
        scheduled_in: None,
    };
    let mut items: Vec<Item> = Vec::with_capacity(1024);
    for i in 0..1024 {
        let bytes = build_request(&spec, "send", i, None).2;
        let Ok(Decoded::Notify(request)) =
            decode_message(&bytes, settings.pipeline.max_request_bytes)
        else {
            bail!("the bench's webhook request does not decode");
        };
        let n = request
            .into_notifications()
            .next()
            .context("a request without a notification")?;
        let content = renderer.render(&n)?;
        let now = chrono::Utc::now();
        let body = payload(&n, &content, now)?;
        let signature = sign(b"bench", &n.id, now.timestamp(), &body);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert("webhook-id", HeaderValue::from_str(&n.id)?);
        headers.insert("webhook-timestamp", HeaderValue::from(now.timestamp()));
        headers.insert("webhook-signature", HeaderValue::from_str(&signature)?);
        items.push(Item {
            notification: n,
            content,
            body,
            headers,
        });
    }
    let items = Arc::new(items);
    let adapter = Arc::new(WebhookAdapter::new(&settings.webhook)?);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()?;
    let bare = Bare {
        client,
        url: reqwest::Url::parse(&url)?,
    };

    if timed {
        println!(
            "{:<28} {:>12} {:>16} {:>12}",
            "send", "CPU µs/send", "spread (min-max)", "sends/s"
        );
    }
    let variants: [(&str, Sender); 2] = [
        ("adapter", Sender::Adapter(adapter)),
        ("reqwest", Sender::Bare(Arc::new(bare))),
    ];
    for (name, sender) in variants {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let label = match name {
            "adapter" => "Herald's webhook adapter",
            _ => "bare reqwest POST",
        };
        if !timed {
            round(&sender, &items, CHECK_SENDS).await?;
            println!("{label:<28} sent {CHECK_SENDS} (not timed: run with cargo bench)");
            continue;
        }
        // Warm-up: open the connections.
        round(&sender, &items, SENDS / 5).await?;
        let mut cpu = Vec::with_capacity(ROUNDS);
        let mut rate = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let (c, r) = round(&sender, &items, SENDS).await?;
            cpu.push(c);
            rate.push(r);
        }
        cpu.sort_by(f64::total_cmp);
        rate.sort_by(f64::total_cmp);
        println!(
            "{:<28} {:>12.1} {:>7.1}-{:<8.1} {:>12.0}",
            label,
            cpu[ROUNDS / 2],
            cpu[0],
            cpu[ROUNDS - 1],
            rate[ROUNDS / 2]
        );
    }
    Ok(())
}

/// A bare reqwest client and the sink's URL.
struct Bare {
    client: reqwest::Client,
    url: reqwest::Url,
}

#[derive(Clone)]
enum Sender {
    Adapter(Arc<WebhookAdapter>),
    Bare(Arc<Bare>),
}

impl Sender {
    async fn send(&self, item: &Item) -> anyhow::Result<()> {
        match self {
            Sender::Adapter(adapter) => {
                adapter.send(&item.notification, &item.content).await?;
            }
            Sender::Bare(b) => {
                let response = b
                    .client
                    .post(b.url.clone())
                    .headers(item.headers.clone())
                    .body(item.body.clone())
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!("nginx answered {}", response.status());
                }
                response.bytes().await?;
            }
        }
        Ok(())
    }
}

/// Sends `n` requests, [`CONCURRENCY`] at a time; returns this process's CPU
/// per send (µs) and the rate.
async fn round(sender: &Sender, items: &Arc<Vec<Item>>, n: usize) -> anyhow::Result<(f64, f64)> {
    let pid = std::process::id();
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = cpu_seconds(pid).context("reading /proc")?;
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (sender, items, next) = (sender.clone(), items.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<(), anyhow::Error>(());
                    }
                    sender.send(&items[i % items.len()]).await?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid).context("reading /proc")? - cpu_before;
    Ok((cpu * 1e6 / n as f64, n as f64 / wall))
}
