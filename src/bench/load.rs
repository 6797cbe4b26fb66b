//! Load generation and measurement: produce requests (as fast as possible or
//! at a fixed rate), read outcomes, and compute throughput and latency from
//! each request's produce time to its final outcome's arrival.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{
    BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord, Producer, ThreadedProducer,
};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sqlx::Connection;

use crate::config::Settings;

/// What the benchmark sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mix {
    Webhook,
    Email,
    Mixed,
}

/// Whether Herald applies recipient policy in a run (`--policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyMode {
    /// Policy on (Herald's default), with stored preferences for a share of
    /// the bench's users (see [`store_preferences`]).
    On,
    /// `policy.enabled = false`: no preference lookups, nothing suppressed.
    Off,
    /// The max-rate run twice, with policy and without, and their ratio.
    Compare,
}

/// The bench's recipients: request `i` goes to `user-{i % USERS}` of tenant
/// [`TENANT`].
pub const USERS: usize = 10_000;
pub const TENANT: &str = "bench";
/// The category of every bench request. Users who muted it get `suppressed`.
pub const CATEGORY: &str = "bench-news";

/// Users (by index) with stored preferences, and what they store:
/// - every 10th: quiet hours (Asia/Tokyo), six hours away from the run, so
///   they are looked up and evaluated but never in force;
/// - `capped_percent` in every 100 (by default 5; from index mod 100 = 50
///   on, so apart from the muted ones): at most 1,000 notifications per hour
///   on the channel, so the cap check reads the user's recent sends;
/// - `muted_percent` in every 100 (user index mod 100 below it; by default
///   1, every 100th): the bench's category muted, so their notifications
///   are `suppressed` (see [`suppressed`]).
fn has_preferences(user: usize, shares: Shares) -> bool {
    user.is_multiple_of(10) || muted(user, shares.muted_percent) || capped(user, shares)
}
fn capped(user: usize, shares: Shares) -> bool {
    (user + 50) % 100 < shares.capped_percent
}
fn muted(user: usize, muted_percent: usize) -> bool {
    user % 100 < muted_percent
}
/// Users (by index mod 100, from 25 on, apart from the default muted and
/// capped ones) whose webhook endpoint answers 503 (`--failing-percent`).
fn failing(user: usize, failing_percent: usize) -> bool {
    (user + 75) % 100 < failing_percent
}

/// Percentages of the bench's users who muted its category and who have a
/// frequency cap (`--muted-percent`, `--capped-percent`).
#[derive(Debug, Clone, Copy)]
pub struct Shares {
    pub muted_percent: usize,
    pub capped_percent: usize,
}

/// Stores the bench users' preferences (above) in the run's database, one
/// record per channel of `mix`, through Herald's own store. Returns how many
/// users have one.
pub async fn store_preferences(
    database_url: &str,
    mix: Mix,
    shares: Shares,
) -> anyhow::Result<usize> {
    use crate::domain::Channel;
    use crate::policy::PreferenceRecord;
    let pool = sqlx::PgPool::connect(database_url)
        .await
        .context("connecting to the run's database")?;
    let store = crate::store::PreferenceStore::new(pool.clone());
    let channels: &[Channel] = match mix {
        Mix::Webhook => &[Channel::Webhook],
        Mix::Email => &[Channel::Email],
        Mix::Mixed => &[Channel::Webhook, Channel::Email],
    };
    let zone = chrono_tz::Asia::Tokyo;
    let local = chrono::Utc::now().with_timezone(&zone).time();
    let start = local + chrono::Duration::hours(6);
    let end = start + chrono::Duration::hours(1);
    let now = chrono::Utc::now();
    let users: Vec<usize> = (0..USERS).filter(|u| has_preferences(*u, shares)).collect();
    for &u in &users {
        for &channel in channels {
            let mut r = PreferenceRecord::empty(TENANT, &format!("user-{u}"), channel, now);
            r.quiet_hours_start = Some(start);
            r.quiet_hours_end = Some(end);
            r.quiet_hours_timezone = Some(zone.name().to_string());
            if capped(u, shares) {
                r.max_per_hour = Some(1_000);
            }
            if muted(u, shares.muted_percent) {
                r.muted_categories = Some(vec![CATEGORY.to_string()]);
            }
            store.upsert(&r).await?;
        }
    }
    pool.close().await;
    Ok(users.len())
}

/// How many of the notifications of requests `0..n` (`batch` recipients
/// each) stored preferences suppress when policy is on.
pub fn suppressed(n: usize, batch: usize, muted_percent: usize) -> usize {
    (0..n).filter(|i| muted(i % USERS, muted_percent)).count() * batch.max(1)
}

/// How many of the notifications of requests `0..n` (`batch` recipients
/// each) go to a failing webhook endpoint and are not suppressed first: each
/// ends `failed` after its retries.
pub fn failing_notifications(
    n: usize,
    batch: usize,
    mix: Mix,
    muted_percent: usize,
    failing_percent: usize,
) -> usize {
    (0..n)
        .filter(|i| {
            let u = i % USERS;
            !is_email(mix, *i) && failing(u, failing_percent) && !muted(u, muted_percent)
        })
        .count()
        * batch.max(1)
}

/// Whether request `i` of `mix` is an email (else a webhook).
fn is_email(mix: Mix, i: usize) -> bool {
    match mix {
        Mix::Webhook => false,
        Mix::Email => true,
        Mix::Mixed => i % 2 == 1,
    }
}

/// How requests are built.
pub struct RequestSpec {
    pub mix: Mix,
    pub template: bool,
    pub batch: usize,
    pub webhook_url: String,
    /// The endpoint of the failing users' webhooks (answers 503), and
    /// their share (see [`failing`]).
    pub failing_url: String,
    pub failing_percent: usize,
    /// Max-rate loads only: every request carries `scheduled_at` this long
    /// after the load starts, so the notifications wait as scheduled rows
    /// and the due-work scheduler releases them together.
    pub scheduled_in: Option<Duration>,
}

/// Topics of one run.
pub struct Topics {
    pub id: String,
    pub requests: String,
    pub outcomes: String,
    pub dlq: String,
    pub partitions: i32,
}

impl Topics {
    pub async fn create(brokers: &str, partitions: i32) -> anyhow::Result<Topics> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let t = Topics {
            requests: format!("bench-{id}-requests"),
            outcomes: format!("bench-{id}-outcomes"),
            dlq: format!("bench-{id}-dlq"),
            partitions,
            id,
        };
        let settings = kafka_settings(brokers)?;
        let names = vec![t.requests.clone(), t.outcomes.clone(), t.dlq.clone()];
        crate::kafka::topics::ensure_topics(&settings.kafka, &names, partitions).await?;
        Ok(t)
    }
}

fn kafka_settings(brokers: &str) -> anyhow::Result<Settings> {
    Ok(Settings::load_with_env(
        None,
        [("HERALD_KAFKA__BROKERS".to_string(), brokers.to_string())],
    )?)
}

/// Creates database `bench_<id>` and returns its URL.
pub async fn create_database(admin_url: &str, id: &str) -> anyhow::Result<String> {
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .context("connecting to the admin database")?;
    let name = format!("bench_{id}");
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await?;
    let base = admin_url
        .rsplit_once('/')
        .map(|(b, _)| b)
        .context("admin URL has no database part")?;
    Ok(format!("{base}/{name}"))
}

/// Drops the run's database (`bench_{id}`) so repeated runs do not pile up
/// databases on the shared PostgreSQL.
pub async fn drop_database(admin_url: &str, id: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .context("connecting to the admin database")?;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"bench_{id}\" WITH (FORCE)"
    ))
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// Latency samples in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Latencies(Vec<f64>);

impl Latencies {
    pub fn p(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let i = ((q / 100.0) * (self.0.len() - 1) as f64).round() as usize;
        self.0[i.min(self.0.len() - 1)]
    }
    pub fn max(&self) -> f64 {
        self.0.last().copied().unwrap_or(0.0)
    }
}

/// The outcome of one load.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    pub notifications: usize,
    pub elapsed: Duration,
    pub latency_ms: Latencies,
    pub final_distinct: usize,
    pub duplicate_finals: usize,
    /// Final outcomes that are `suppressed`, and how many stored preferences
    /// should suppress.
    pub suppressed: usize,
    pub expected_suppressed: usize,
    /// Final outcomes that are `failed`, and how many go to a failing
    /// endpoint (`--failing-percent`).
    pub failed: usize,
    pub expected_failed: usize,
    pub sink_http: usize,
    /// Requests the failing endpoint answered (one per attempt).
    pub sink_failing: usize,
    pub sink_smtp: usize,
    /// Herald's own view (from its `/metrics`): time from the start of the
    /// load until every request was consumed and nothing was in flight any
    /// more (processed, durable, outcomes acknowledged). Independent of how
    /// fast the local broker serves the outcomes back to the reader.
    pub drained: Option<Duration>,
    /// A scheduled load: from the release (every request due) until the
    /// last final outcome arrived.
    pub released: Option<Duration>,
    /// CPU of every process on the machine while the load ran (Herald runs
    /// only; see [`super::machine`]).
    pub machine: Option<super::machine::Usage>,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        if self.elapsed.is_zero() {
            0.0
        } else {
            self.final_distinct as f64 / self.elapsed.as_secs_f64()
        }
    }
}

const FINAL: &[&str] = &[
    "sent",
    "delivered",
    "failed",
    "rejected",
    "suppressed",
    "expired",
    "bounced",
    "cancelled",
];

#[derive(serde::Deserialize)]
struct OutcomeView {
    notification_id: Option<String>,
    status: String,
    event_id: String,
}

/// The final outcomes a reader saw.
struct Finals {
    /// Arrival time of each notification's first final outcome.
    arrivals: HashMap<String, Instant>,
    /// Final outcomes with a different `event_id` than the first.
    duplicates: usize,
    /// First final outcomes that are `suppressed`, and `failed`.
    suppressed: usize,
    failed: usize,
}

/// Reads `topic` from the beginning until `expected` distinct final outcomes
/// arrived (or nothing new for `idle`).
fn read_finals(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
    idle: Duration,
    stop: Arc<AtomicBool>,
    prefix: String,
) -> anyhow::Result<Finals> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut arrivals: HashMap<String, Instant> = HashMap::with_capacity(expected);
    let mut events: HashMap<String, String> = HashMap::with_capacity(expected);
    let mut duplicates = 0;
    let mut suppressed = 0;
    let mut failed = 0;
    let mut last_progress = Instant::now();
    let mut last_print = Instant::now();
    while arrivals.len() < expected && !stop.load(Ordering::Relaxed) {
        if last_progress.elapsed() > idle {
            break;
        }
        let Some(m) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let m = m?;
        let now = Instant::now();
        let Some(Ok(o)) = m.payload().map(serde_json::from_slice::<OutcomeView>) else {
            continue;
        };
        if !FINAL.contains(&o.status.as_str()) {
            continue;
        }
        let id = o.notification_id.unwrap_or_default();
        if !id.starts_with(&prefix) {
            continue;
        }
        match events.get(&id) {
            Some(prev) if *prev != o.event_id => duplicates += 1,
            Some(_) => {}
            None => {
                match o.status.as_str() {
                    "suppressed" => suppressed += 1,
                    "failed" => failed += 1,
                    _ => {}
                }
                events.insert(id.clone(), o.event_id);
                arrivals.insert(id, now);
                last_progress = now;
            }
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            eprintln!("  … {} / {expected} final outcomes", arrivals.len());
            last_print = Instant::now();
        }
    }
    Ok(Finals {
        arrivals,
        duplicates,
        suppressed,
        failed,
    })
}

fn producer(brokers: &str) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        // Not idempotent: librdkafka's idempotent producer spins its broker
        // thread while a partition has 5 messages in flight, taking a core
        // from the system under test (see `kafka::producer_config`).
        .set("enable.idempotence", "false")
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

/// Produces `n` payloads (`make(i) -> (id, key, payload)`) to `topic`, as fast
/// as possible or at `rate` per second. Returns produce instants by id.
async fn produce_all(
    p: &FutureProducer,
    topic: &str,
    n: usize,
    rate: Option<u64>,
    make: impl Fn(usize) -> (String, String, Vec<u8>),
) -> anyhow::Result<(HashMap<String, Instant>, Instant)> {
    let mut sent = HashMap::with_capacity(n);
    let mut pending = FuturesUnordered::new();
    let start = Instant::now();
    for i in 0..n {
        if let Some(r) = rate {
            let due = start + Duration::from_secs_f64(i as f64 / r as f64);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
        let (id, key, payload) = make(i);
        sent.insert(id, Instant::now());
        let fut = p
            .send_result(FutureRecord::to(topic).key(&key).payload(&payload))
            .map_err(|(e, _)| e)?;
        pending.push(fut);
        while pending.len() > 20_000 {
            if let Some(r) = pending.next().await {
                r.context("delivery future")?.map_err(|(e, _)| e)?;
            }
        }
    }
    while let Some(r) = pending.next().await {
        r.context("delivery future")?.map_err(|(e, _)| e)?;
    }
    Ok((sent, start))
}

/// One request of the load: its id, its Kafka key and its JSON bytes (also what
/// `benches/hot_path.rs` measures the pure steps on).
pub fn build_request(
    spec: &RequestSpec,
    run: &str,
    i: usize,
    scheduled_at: Option<&str>,
) -> (String, String, Vec<u8>) {
    let id = format!("{run}-{i}");
    let email = is_email(spec.mix, i);
    let url = match failing(i % USERS, spec.failing_percent) {
        true => &spec.failing_url,
        false => &spec.webhook_url,
    };
    let user = format!("user-{}", i % USERS);
    let recipient = |k: usize| {
        if email {
            serde_json::json!({ "email": format!("{user}.{k}@example.com"), "user_id": user })
        } else {
            serde_json::json!({ "url": url, "user_id": user })
        }
    };
    let mut r = serde_json::json!({
        "id": id,
        "tenant_id": TENANT,
        "channel": if email { "email" } else { "webhook" },
        "category": CATEGORY,
    });
    if let Some(at) = scheduled_at {
        r["scheduled_at"] = serde_json::json!(at);
    }
    if spec.batch > 1 {
        r["recipients"] = serde_json::Value::Array((0..spec.batch).map(recipient).collect());
    } else {
        r["recipient"] = recipient(0);
    }
    if spec.template {
        r["template"] = if email {
            serde_json::json!({ "key": "order_shipped", "data": { "order_id": format!("A-{i}"), "customer_name": "Ada", "items": [{"name": "Tea", "qty": 2}, {"name": "Mug"}] } })
        } else {
            serde_json::json!({ "key": "order_shipped", "data": { "order_id": format!("A-{i}"), "items": [{"name": "Tea"}] } })
        };
    } else {
        r["content"] = serde_json::json!({ "subject": "Order shipped", "text": "Your order {{ notification.id }} is on its way." });
    }
    (id, format!("bench:{user}"), r.to_string().into_bytes())
}

/// Produces `n` requests to a running Herald and waits for their outcomes.
pub async fn herald_load(
    brokers: &str,
    topics: &Topics,
    spec: &RequestSpec,
    n: usize,
    rate: Option<u64>,
) -> anyhow::Result<LoadResult> {
    let run = format!("r{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let expected = n * spec.batch.max(1);
    let p = producer(brokers)?;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (b, t, parts, stop) = (
            brokers.to_string(),
            topics.outcomes.clone(),
            topics.partitions,
            stop.clone(),
        );
        let prefix = format!("{run}-");
        std::thread::spawn(move || {
            read_finals(
                &b,
                &t,
                parts,
                expected,
                Duration::from_secs(60),
                stop,
                prefix,
            )
        })
    };
    // The release: when every request of a scheduled load is due.
    let release = spec.scheduled_in.filter(|_| rate.is_none()).map(|d| {
        let at = chrono::Utc::now() + chrono::Duration::from_std(d).unwrap_or_default();
        (at.to_rfc3339(), Instant::now() + d)
    });
    let scheduled_at = release.as_ref().map(|(at, _)| at.as_str());
    let (sent, start) = produce_all(&p, &topics.requests, n, rate, |i| {
        build_request(spec, &run, i, scheduled_at)
    })
    .await?;
    let finals = tokio::task::spawn_blocking(move || reader.join())
        .await?
        .map_err(|_| anyhow::anyhow!("outcome reader panicked"))??;
    stop.store(true, Ordering::Relaxed);
    let mut r = summarize(&sent, start, finals, expected)?;
    if let Some((_, due)) = release {
        let last = start + r.elapsed;
        r.released = Some(if last > due {
            last - due
        } else {
            Duration::ZERO
        });
    }
    Ok(r)
}

fn summarize(
    sent: &HashMap<String, Instant>,
    start: Instant,
    finals: Finals,
    expected: usize,
) -> anyhow::Result<LoadResult> {
    let arrivals = finals.arrivals;
    let mut lat = Vec::with_capacity(arrivals.len());
    let mut last = start;
    for (id, at) in &arrivals {
        let request_id = match sent.get(id) {
            Some(_) => id.as_str(),
            None => id.rsplit_once(':').map_or(id.as_str(), |(r, _)| r),
        };
        if let Some(t0) = sent.get(request_id) {
            lat.push(at.saturating_duration_since(*t0).as_secs_f64() * 1000.0);
        }
        if *at > last {
            last = *at;
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    if arrivals.len() < expected {
        eprintln!(
            "WARNING: only {} of {expected} final outcomes arrived",
            arrivals.len()
        );
    }
    Ok(LoadResult {
        notifications: expected,
        elapsed: last.saturating_duration_since(start),
        latency_ms: Latencies(lat),
        final_distinct: arrivals.len(),
        duplicate_finals: finals.duplicates,
        suppressed: finals.suppressed,
        expected_suppressed: 0,
        failed: finals.failed,
        expected_failed: 0,
        sink_http: 0,
        sink_failing: 0,
        sink_smtp: 0,
        drained: None,
        released: None,
        machine: None,
    })
}

/// Sends a few requests and waits for their outcomes, so the consumer group
/// has formed (a join takes seconds) before anything is measured.
pub async fn warm_up(brokers: &str, topics: &Topics, spec: &RequestSpec) -> anyhow::Result<()> {
    let n = (topics.partitions.max(1) as usize) * 4;
    let r = herald_load(brokers, topics, spec, n, None).await?;
    if r.final_distinct < n {
        bail!("warm-up: only {} of {n} outcomes arrived", r.final_distinct);
    }
    Ok(())
}

/// Baseline: a bare consumer-group member that parses each request and
/// produces one small event per message (no database, no send).
pub async fn passthrough(
    brokers: &str,
    partitions: i32,
    n: usize,
    rate: Option<u64>,
) -> anyhow::Result<LoadResult> {
    let topics = Topics::create(brokers, partitions).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (b, input, output, stop) = (
            brokers.to_string(),
            topics.requests.clone(),
            topics.outcomes.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || -> anyhow::Result<()> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &b)
                .set("group.id", format!("bench-pt-{}", uuid::Uuid::new_v4()))
                .set("auto.offset.reset", "earliest")
                // Herald's own consumer setting, so the baseline differs
                // from Herald only in the work done per message.
                .set("fetch.wait.max.ms", crate::kafka::FETCH_WAIT_MS.to_string())
                .create()?;
            consumer.subscribe(&[&input])?;
            let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
                .set("bootstrap.servers", &b)
                .set("linger.ms", "5")
                .set("queue.buffering.max.messages", "1000000")
                .create()?;
            while !stop.load(Ordering::Relaxed) {
                let Some(m) = consumer.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let m = m?;
                let id = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
                    .unwrap_or_default();
                let event =
                    serde_json::json!({ "notification_id": id, "status": "sent", "event_id": id })
                        .to_string();
                let mut record = BaseRecord::to(&output).key(&id).payload(&event);
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((_, r)) => {
                            record = r;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            }
            let _ = producer.flush(Duration::from_secs(10));
            Ok(())
        })
    };
    let spec = RequestSpec {
        mix: Mix::Webhook,
        template: false,
        batch: 1,
        webhook_url: "http://127.0.0.1:9/".into(),
        failing_url: String::new(),
        failing_percent: 0,
        scheduled_in: None,
    };
    let r = herald_load(brokers, &topics, &spec, n, rate).await;
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    r
}

/// Baseline: the broker's raw produce rate and a plain consumer's read rate.
pub async fn raw_broker(brokers: &str, partitions: i32, n: usize) -> anyhow::Result<(f64, f64)> {
    let topics = Topics::create(brokers, partitions).await?;
    let p = producer(brokers)?;
    let payload = vec![b'x'; 300];
    let (_, start) = produce_all(&p, &topics.requests, n, None, |i| {
        (i.to_string(), i.to_string(), payload.clone())
    })
    .await?;
    let produce_rate = n as f64 / start.elapsed().as_secs_f64();
    let (b, t) = (brokers.to_string(), topics.requests.clone());
    let consume_rate = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("group.id", format!("bench-raw-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for part in 0..partitions {
            tpl.add_partition_offset(&t, part, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let start = Instant::now();
        let mut got = 0;
        while got < n {
            if start.elapsed() > Duration::from_secs(120) {
                bail!("raw consume: only {got} of {n} in 120 s");
            }
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                m?;
                got += 1;
            }
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
    .await??;
    Ok((produce_rate, consume_rate))
}

/// Baseline: reqwest POSTs straight to nginx, 256 at a time.
pub async fn raw_http(url: &str, n: usize) -> anyhow::Result<f64> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()?;
    let start = Instant::now();
    let results: Vec<bool> = futures::stream::iter(0..n)
        .map(|i| {
            let c = client.clone();
            let body = format!("{{\"i\":{i}}}");
            async move {
                c.post(url)
                    .body(body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let ok = results.iter().filter(|b| **b).count();
    if ok < n {
        bail!("raw HTTP: {} of {n} failed", n - ok);
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Baseline: Herald's SMTP adapter (lettre on nodelay connections, PIPELINING
/// when offered, pool of 16) straight to smtp-sink, 64 at a time: the best
/// this client does against the sink, with no Kafka, database or policy.
pub async fn raw_smtp(settings: &Settings, port: u16, n: usize) -> anyhow::Result<f64> {
    use crate::channels::ChannelAdapter;
    let mut smtp = settings.smtp.clone();
    smtp.host = "127.0.0.1".into();
    smtp.port = port;
    smtp.pool_size = 16;
    let adapter = crate::channels::smtp::SmtpAdapter::new(&smtp)?;
    let content = crate::render::RenderedContent {
        subject: Some("bench".into()),
        text: Some("hello".into()),
        ..Default::default()
    };
    let make = |i: usize| crate::domain::Notification {
        id: format!("raw-{i}"),
        request_id: format!("raw-{i}"),
        tenant_id: None,
        app_id: None,
        channel: crate::domain::Channel::Email,
        recipient: crate::domain::Recipient {
            email: crate::domain::EmailAddress::parse("sink@example.com").ok(),
            ..Default::default()
        },
        content: crate::domain::Content::Inline(Default::default()),
        priority: Default::default(),
        category: None,
        scheduled_at: None,
        expires_at: None,
        meta: Default::default(),
        correlation_id: None,
    };
    let start = Instant::now();
    let results: Vec<bool> = futures::stream::iter(0..n)
        .map(|i| {
            let (a, c, notification) = (&adapter, &content, make(i));
            async move { a.send(&notification, c).await.is_ok() }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let ok = results.iter().filter(|b| **b).count();
    if ok < n {
        bail!("raw SMTP: {} of {n} failed", n - ok);
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The raw SMTP sink rate: lettre as released, one message at a time
/// on each of `connections` connections with `TCP_NODELAY` set (lettre does
/// not set it), no pipelining, no Herald code. One message is built once and
/// sent `n` times. Messages per second.
pub async fn raw_lettre(port: u16, n: usize, connections: usize) -> anyhow::Result<f64> {
    use lettre::transport::smtp::client::AsyncSmtpConnection;
    use lettre::transport::smtp::extension::ClientId;
    let message = lettre::Message::builder()
        .from("Bench <bench@localhost>".parse()?)
        .to("sink@example.com".parse()?)
        .subject("bench")
        .body(String::from("hello"))?;
    let envelope = message.envelope().clone();
    let email = Arc::new(message.formatted());
    let hello = ClientId::Domain("bench.localhost".into());
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        conns.push(AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &hello).await?);
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (k, mut conn) in conns.into_iter().enumerate() {
        let count = n / connections + usize::from(k < n % connections);
        let (envelope, email) = (envelope.clone(), email.clone());
        tasks.spawn(async move {
            for _ in 0..count {
                conn.send(&envelope, &email).await?;
            }
            conn.quit().await?;
            Ok::<_, lettre::transport::smtp::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Requests consumed (sum over topics) and messages in flight, from a
/// Prometheus text page of Herald's `/metrics`.
pub fn consumed_and_in_flight(page: &str) -> (u64, i64) {
    let mut consumed = 0u64;
    let mut in_flight = 0i64;
    for line in page.lines() {
        let value = line.rsplit(' ').next().unwrap_or_default();
        if line.starts_with("herald_requests_consumed_total") {
            consumed += value.parse::<f64>().unwrap_or(0.0) as u64;
        } else if line.starts_with("herald_in_flight_messages") {
            in_flight = value.parse::<f64>().unwrap_or(0.0) as i64;
        }
    }
    (consumed, in_flight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_preferences_suppress_the_requests_of_every_hundredth_user() {
        assert_eq!(suppressed(0, 1, 1), 0);
        assert_eq!(suppressed(1, 1, 1), 1);
        assert_eq!(suppressed(250, 1, 1), 3);
        assert_eq!(suppressed(250, 3, 1), 9);
        // Users wrap around at USERS: request 10,000 goes to user-0 again.
        assert_eq!(suppressed(USERS + 1, 1, 1), 101);
        assert_eq!(suppressed(250, 1, 0), 0);
        assert_eq!(suppressed(250, 1, 50), 150);
        assert_eq!(suppressed(250, 2, 100), 500);
        for pct in [0, 1, 50, 100] {
            let shares = Shares {
                muted_percent: pct,
                capped_percent: 100 - pct,
            };
            for u in 0..USERS {
                // Whoever is muted or capped has a stored record.
                if muted(u, pct) || capped(u, shares) {
                    assert!(has_preferences(u, shares), "user-{u} at {pct}%");
                }
            }
        }
        // The default shares: 1 in 100 muted, 5 in 100 capped, apart.
        let shares = Shares {
            muted_percent: 1,
            capped_percent: 5,
        };
        let capped_users = (0..USERS).filter(|u| capped(*u, shares)).count();
        assert_eq!(capped_users, USERS / 20);
        assert!((0..USERS).all(|u| !(muted(u, 1) && capped(u, shares))));
    }

    #[test]
    fn failing_users_are_counted_apart_from_muted_ones_and_emails() {
        use Mix::*;
        assert_eq!(failing_notifications(300, 1, Webhook, 1, 0), 0);
        // Users 25 and 26 of every hundred.
        assert_eq!(failing_notifications(300, 1, Webhook, 1, 2), 6);
        assert_eq!(failing_notifications(300, 3, Webhook, 1, 2), 18);
        assert_eq!(failing_notifications(300, 1, Email, 1, 2), 0);
        // Mixed: odd requests are emails, so only 26, 126, 226 stay.
        assert_eq!(failing_notifications(300, 1, Mixed, 1, 2), 3);
        // Everyone failing, the muted ones suppressed first.
        assert_eq!(failing_notifications(300, 1, Webhook, 1, 100), 297);
        assert_eq!(failing_notifications(300, 1, Webhook, 0, 100), 300);
        // The default muted and capped users fail only from 26% on.
        let shares = Shares {
            muted_percent: 1,
            capped_percent: 5,
        };
        for u in 0..USERS {
            if failing(u, 25) {
                assert!(!muted(u, 1) && !capped(u, shares), "user-{u}");
            }
        }
    }
}
