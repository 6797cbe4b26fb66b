//! Fault-suite harness on top of `tests/it/helpers.rs`: a private broker
//! (tansu) and a private PostgreSQL cluster that a test may stop, pause and
//! restart without touching the shared services, a load generator that
//! remembers where each request landed, a webhook sink whose answer depends
//! on the path (200, 500, 429 + Retry-After, hang), a restartable smtp-sink,
//! and the end-state checks every scenario shares.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;
use sqlx::{Connection, PgConnection, PgPool};

use crate::helpers::*;

/// `HERALD_FAULTS_FULL=1`: the long variants (10 kills, 10,000 hostile, ...).
pub fn full() -> bool {
    std::env::var("HERALD_FAULTS_FULL").is_ok_and(|v| v == "1" || v == "true")
}

/// `n_fast` normally, `n_full` with `HERALD_FAULTS_FULL=1`.
pub fn scale(n_fast: usize, n_full: usize) -> usize {
    if full() { n_full } else { n_fast }
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn chown_postgres(p: &Path) {
    let ok = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(p)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "chown {} to postgres", p.display());
}

/// Runs a PostgreSQL binary as the `postgres` OS user when we are root.
fn pg_cmd(bin: &str) -> Command {
    let path = format!("{PG_BIN}/{bin}");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let mut c = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(path)
    };
    c.current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// A throwaway PostgreSQL cluster on a free 127.0.0.1 port (never the shared one).
pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// `initdb` in a temp dir, then start.
    pub fn start() -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("herald-faults-pg")
            .tempdir_in("/tmp")
            .expect("tmp");
        chown_postgres(dir.path());
        let data = dir.path().join("data");
        let ok = pg_cmd("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "initdb");
        let pg = Postgres {
            port: free_port(),
            dir,
        };
        pg.ctl(&["start"]);
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn ctl(&self, action: &[&str]) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=50",
            self.port,
            self.dir.path().display()
        );
        let ok = pg_cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-w", "-t", "60", "-o", &opts])
            .args(action)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pg_ctl {action:?}");
    }

    /// Stops the server like a crash (`-m immediate`: recovery on start).
    pub fn stop_immediate(&self) {
        self.ctl(&["-m", "immediate", "stop"]);
    }

    /// Starts the server again after [`Postgres::stop_immediate`].
    pub fn start_again(&self) {
        self.ctl(&["start"]);
    }

    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = pg_cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .status();
    }
}

/// A private tansu broker (sqlite storage) on a free 127.0.0.1 port.
pub struct Tansu {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Tansu {
    pub fn start() -> Tansu {
        let dir = tempfile::tempdir().expect("tmp");
        let mut t = Tansu {
            port: free_port(),
            dir,
            child: None,
        };
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .expect("log");
        let child = Command::new("tansu")
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tansu (cargo install tansu; see ARCHITECTURE.md)");
        self.child = Some(child);
        wait_port(self.port);
        // Same broker as scripts/services.sh runs: with the header index
        // tansu 0.6 lacks (scripts/tansu-index.py explains why).
        let indexed = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/tansu-index.py"
            ))
            .arg(self.dir.path().join("tansu.db"))
            .status()
            .expect("run scripts/tansu-index.py");
        assert!(indexed.success(), "tansu header index not added");
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// SIGSTOP: the broker stops answering (connections stay open).
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`Tansu::pause`].
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// SIGKILL, then start again on the same port and storage.
    pub fn kill_and_restart(&mut self, down: Duration) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        std::thread::sleep(down);
        self.spawn();
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.resume();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_port(port: u16) {
    crate::net::wait_for_port(port, Duration::from_secs(30));
}

/// A [`TestEnv`] on any broker and PostgreSQL: topics, group and a fresh
/// migrated database.
pub struct Faults {
    pub env: TestEnv,
    pub brokers: String,
}

impl Faults {
    /// On the shared services.
    pub async fn shared(partitions: i32) -> Faults {
        Faults::on(&brokers(), &admin_database_url(), partitions).await
    }

    pub async fn on(brokers: &str, admin_url: &str, partitions: i32) -> Faults {
        let id = suffix();
        let name = format!("herald_faults_{id}");
        let mut conn = PgConnection::connect(admin_url)
            .await
            .expect("connect admin database");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("create database");
        let database_url = match admin_url.rfind('/') {
            Some(i) => format!("{}/{}", &admin_url[..i], name),
            None => panic!("admin url has no database part"),
        };
        let f = Faults {
            env: TestEnv {
                requests: format!("faults-{id}-requests"),
                outcomes: format!("faults-{id}-outcomes"),
                dlq: format!("faults-{id}-dlq"),
                group: format!("faults-{id}"),
                database_url,
                partitions,
                id,
            },
            brokers: brokers.to_string(),
        };
        let settings = f
            .env
            .settings(&[("HERALD_KAFKA__BROKERS", f.brokers.clone())]);
        let topics = herald::kafka::topics::all_topics(&settings.kafka);
        herald::kafka::topics::ensure_topics(&settings.kafka, &topics, partitions)
            .await
            .expect("create topics");
        let pool = herald::store::pool(&settings.database).expect("pool");
        herald::store::migrate(&pool).await.expect("migrate");
        f
    }

    /// Herald's environment with this broker plus `extra`. The session
    /// timeout is 60 s and offsets are committed every 5 s (Herald's
    /// default; the shared test environment commits every 200 ms): on the
    /// local broker (tansu 0.6.0) a member whose session expires — during a
    /// broker outage, or when the loaded broker answers heartbeats late
    /// because they queue behind slow offset commits — never gets an
    /// assignment again (see docs/faults.md), which would turn every fault
    /// into a stuck partition.
    pub fn vars(&self, extra: &[(&str, String)]) -> Vec<(String, String)> {
        let mut all: Vec<(&str, String)> = vec![
            ("HERALD_KAFKA__BROKERS", self.brokers.clone()),
            // Above any broker outage here and above the local broker's
            // slowest coordinator answers under load: a session that expires
            // on tansu 0.6.0 never gets partitions again (docs/faults.md).
            (
                "HERALD_KAFKA__PROPERTIES__SESSION_TIMEOUT_MS",
                "60000".into(),
            ),
            ("HERALD_KAFKA__COMMIT_INTERVAL_MS", "5000".into()),
        ];
        all.extend(extra.iter().cloned());
        self.env.vars(&all)
    }

    pub fn reader(&self, topic: &str) -> TopicReader {
        TopicReader::new_on(&self.brokers, topic, self.env.partitions)
    }

    pub fn producer(&self) -> FutureProducer {
        producer_on(&self.brokers)
    }

    pub async fn pool(&self) -> PgPool {
        self.env.pool().await
    }

    /// Ends a scenario: waits until the topics are quiet, checks that every
    /// request partition's committed offset reached its end (lag 0) and
    /// that Herald is still up, then stops Herald with SIGTERM.
    pub async fn finish(&self, herald: &mut HeraldProcess) {
        self.finish_all(&mut [herald]).await;
    }

    /// [`Faults::finish`] for several instances of one group: every one of
    /// them must still be up.
    pub async fn finish_all(&self, heralds: &mut [&mut HeraldProcess]) {
        self.wait_quiet(Duration::from_secs(300)).await;
        let lag = self.wait_lag_zero(Duration::from_secs(60)).await;
        let up: Vec<bool> = heralds
            .iter_mut()
            .map(|h| h.child.try_wait().ok().flatten().is_none())
            .collect();
        for h in heralds.iter_mut() {
            h.terminate();
        }
        assert!(up.iter().all(|u| *u), "every herald is still up: {up:?}");
        assert!(lag.is_ok(), "a partition is stuck: {lag:?}");
    }

    /// Waits (at most `timeout`) until every id has a final outcome, then
    /// [`Faults::finish`].
    pub async fn settle(
        &self,
        herald: &mut HeraldProcess,
        outcomes: &mut TopicReader,
        ids: &[String],
        log: &Path,
        timeout: Duration,
    ) {
        let done = read_events_until(outcomes, timeout, |e| all_final(e, ids)).await;
        assert!(done, "not every request finished; log:\n{}", log_tail(log));
        self.finish(herald).await;
    }

    /// Waits until the outcome and dead-letter topics stop growing for 5 s
    /// (at most `timeout`). Call before [`Faults::wait_lag_zero`]: reading
    /// committed offsets with the group's id while Herald still works has
    /// been seen to make the local broker rebalance the group, and a member
    /// rejoining on tansu 0.6.0 can wedge (see docs/faults.md).
    pub async fn wait_quiet(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = -1;
        let mut since = Instant::now();
        while Instant::now() < deadline {
            let now = match (
                self.try_topic_size(&self.env.outcomes),
                self.try_topic_size(&self.env.dlq),
            ) {
                (Some(a), Some(b)) => a + b,
                _ => -1,
            };
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= Duration::from_secs(5) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the group's committed offsets reach the end of every
    /// request partition (lag 0). Returns the last lag seen per partition on
    /// timeout.
    pub async fn wait_lag_zero(&self, timeout: Duration) -> Result<(), String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.env.group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("lag consumer");
        let deadline = Instant::now() + timeout;
        loop {
            let mut lags = Vec::new();
            let mut tpl = TopicPartitionList::new();
            for p in 0..self.env.partitions {
                tpl.add_partition(&self.env.requests, p);
            }
            let committed = consumer.committed_offsets(tpl, Duration::from_secs(10));
            for p in 0..self.env.partitions {
                let high = consumer
                    .fetch_watermarks(&self.env.requests, p, Duration::from_secs(10))
                    .map(|(_, h)| h)
                    .unwrap_or(-1);
                let at = committed
                    .as_ref()
                    .ok()
                    .and_then(|t| t.find_partition(&self.env.requests, p))
                    .map(|e| e.offset());
                let lag = match at {
                    Some(Offset::Offset(o)) if high >= 0 => high - o,
                    _ => high.max(1),
                };
                lags.push((p, lag));
            }
            if lags.iter().all(|(_, l)| *l == 0) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("lag per partition: {lags:?}"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// How many records `topic` holds (sum of high watermarks; topics here
    /// start at offset 0 and are never trimmed during a test).
    pub fn topic_size(&self, topic: &str) -> i64 {
        for _ in 0..5 {
            if let Some(n) = self.try_topic_size(topic) {
                return n;
            }
        }
        panic!("high watermarks of {topic}: the broker did not answer");
    }

    /// [`Faults::topic_size`], `None` when the (loaded) broker does not answer in time.
    fn try_topic_size(&self, topic: &str) -> Option<i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .expect("consumer");
        (0..self.env.partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(30))
                    .map(|(_, h)| h)
                    .ok()
            })
            .sum()
    }

    /// Notification id → attempts, from the database.
    /// The common ending of a scenario whose requests must all be sent:
    /// exactly one final outcome each, all `sent`, and each delivered once
    /// (more only with a recorded resumed attempt). Returns the resends.
    pub async fn assert_all_sent(
        &self,
        outcomes: &TopicReader,
        ids: &[String],
        sink_counts: &HashMap<String, usize>,
    ) -> usize {
        let events = outcomes.events();
        for (id, e) in &one_final_each(&events, ids) {
            assert_eq!(e["status"], "sent", "{id}: {e}");
        }
        delivered_once_or_resumed(ids, sink_counts, &self.attempts().await)
    }

    pub async fn attempts(&self) -> HashMap<String, i32> {
        sqlx::query_as::<_, (String, i32)>("SELECT id, attempts FROM notifications")
            .fetch_all(&self.pool().await)
            .await
            .expect("attempts")
            .into_iter()
            .collect()
    }
}

/// Where a produced message landed.
pub type Position = (i32, i64);

/// Produces all `(key, payload)` concurrently; returns each one's position
/// (in input order).
pub async fn produce_all(
    p: &FutureProducer,
    topic: &str,
    messages: Vec<(String, Vec<u8>)>,
) -> Vec<Position> {
    let futs = messages.iter().map(|(k, v)| async move {
        p.send(
            FutureRecord::to(topic).key(k).payload(v),
            Timeout::After(Duration::from_secs(120)),
        )
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| e)
        .expect("produce")
    });
    futures::stream::iter(futs).buffered(500).collect().await
}

/// Reads `reader` until `done` holds over the decoded events, or `timeout`.
/// Checks `done` every second, not per record.
pub async fn read_events_until(
    reader: &mut TopicReader,
    timeout: Duration,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut events: Vec<serde_json::Value> = Vec::new();
    loop {
        reader
            .read_until(Duration::from_millis(500), |_| false)
            .await;
        let from = events.len();
        events.extend(reader.records[from..].iter().map(Record::json));
        if done(&events) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

/// Every id in `ids` has a final outcome.
pub fn all_final(events: &[serde_json::Value], ids: &[String]) -> bool {
    let finals = finals_by_notification(events);
    ids.iter().all(|id| finals.contains_key(id))
}

/// Asserts exactly one distinct final outcome per id and returns it.
pub fn one_final_each<'a>(
    events: &'a [serde_json::Value],
    ids: &[String],
) -> HashMap<String, &'a serde_json::Value> {
    let mut by_id: HashMap<&str, HashMap<&str, &serde_json::Value>> = HashMap::new();
    for e in events {
        if final_statuses().contains(&e["status"].as_str().unwrap_or_default()) {
            by_id
                .entry(e["notification_id"].as_str().unwrap_or_default())
                .or_default()
                .insert(e["event_id"].as_str().unwrap_or_default(), e);
        }
    }
    let mut out = HashMap::new();
    for id in ids {
        let f = by_id.get(id.as_str());
        let n = f.map_or(0, HashMap::len);
        assert_eq!(
            n, 1,
            "notification {id} has {n} distinct final outcomes: {f:?}"
        );
        if let Some(e) = f.and_then(|m| m.values().next()) {
            out.insert(id.clone(), *e);
        }
    }
    out
}

/// Asserts that each of `ids` reached the sink at least once and more than
/// once only when the database shows a resumed attempt (`attempts > 1`).
/// Returns how many extra deliveries there were.
pub fn delivered_once_or_resumed(
    ids: &[String],
    counts: &HashMap<String, usize>,
    attempts: &HashMap<String, i32>,
) -> usize {
    let mut resent = 0;
    for id in ids {
        let c = counts.get(id).copied().unwrap_or(0);
        assert!(c >= 1, "notification {id} never reached the sink");
        if c > 1 {
            let a = attempts.get(id).copied().unwrap_or(0);
            assert!(
                a > 1,
                "{id} delivered {c} times without a recorded resumed attempt (attempts {a})"
            );
            resent += c - 1;
        }
    }
    resent
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Where Herald's logs go: `HERALD_FAULTS_LOG_DIR/<test>` when set (kept
/// for inspection), else a temp dir removed with the returned guard.
pub fn log_dir(test: &str) -> (Option<tempfile::TempDir>, PathBuf) {
    match std::env::var("HERALD_FAULTS_LOG_DIR") {
        Ok(d) if !d.is_empty() => {
            let p = Path::new(&d).join(test);
            std::fs::create_dir_all(&p).expect("log dir");
            (None, p)
        }
        _ => {
            let t = tempfile::tempdir().expect("tmp");
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    }
}

/// Lines of Herald's log that tell a stalled consumer group from a stalled
/// pipeline: assignments, revokes, librdkafka session and request timeouts,
/// drain deadlines, panics.
const GROUP_HISTORY: &[&str] = &[
    "partitions assigned",
    "partitions revoked",
    "SESSTMOUT",
    "REQTMOUT",
    "drain deadline",
    "lane closed",
    "panicked",
];

/// For failure messages: the consumer-group history of a Herald log (see
/// [`GROUP_HISTORY`]; a `SESSTMOUT` without a later `partitions assigned` is
/// the local broker's group wedge, docs/faults.md), then the log's tail.
pub fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let history: Vec<&str> = log
        .lines()
        .filter(|l| GROUP_HISTORY.iter().any(|k| l.contains(k)))
        .collect();
    let mut start = log.len().saturating_sub(4000);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    format!(
        "consumer group history ({} lines):\n{}\n--- log tail:\n{}",
        history.len(),
        history.join("\n"),
        &log[start..]
    )
}

/// A webhook request to `url` whose content mentions its id.
pub fn webhook_request(id: &str, url: &str) -> Vec<u8> {
    serde_json::json!({"id": id, "channel": "webhook", "recipient": {"url": url},
        "content": {"text": "fault {{ notification.id }}"}})
    .to_string()
    .into_bytes()
}

/// `n` webhook requests to `sink`'s `/ok/` path with ids `{tag}-{run}-{i}`,
/// keyed over 97 users: the ids and the (key, payload) messages.
pub fn ok_webhook_load(
    tag: &str,
    run: &str,
    n: usize,
    sink: &FaultSink,
) -> (Vec<String>, Vec<(String, Vec<u8>)>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{run}-{i}")).collect();
    let messages = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                format!("user-{}", i % 97),
                webhook_request(id, &sink.url("ok", id)),
            )
        })
        .collect();
    (ids, messages)
}

/// What [`FaultSink`] answers, chosen by the first path segment.
/// `/ok/..` → 200, `/s500/..` → 500, `/s429/..` → 429 with `Retry-After: 1`,
/// `/hang/..` → never answers.
pub struct FaultSink {
    pub addr: std::net::SocketAddr,
    received: FaultState,
}

/// One request the sink received: when, and whether it answered 2xx.
#[derive(Debug, Clone, Copy)]
pub struct Receipt {
    pub at: Instant,
    pub accepted: bool,
}

/// `webhook-id` → what the sink received for it, in order.
type FaultState = Arc<Mutex<HashMap<String, Vec<Receipt>>>>;

/// Answers by the path's first segment (the mode) and by how often this
/// `webhook-id` was received before:
/// - `s500`: 500 the first two times, then 200;
/// - `s429`: 429 with `Retry-After: 1` the first time, then 200;
/// - `hang`: never answers the first time, then 200;
/// - `dead`: always 500;
/// - anything else (`ok`, `bad`): 200.
async fn fault_handler(
    State(received): State<FaultState>,
    UrlPath((mode, _rest)): UrlPath<(String, String)>,
    headers: HeaderMap,
    // Read the whole body before answering: a server that answers early and
    // closes makes the sender's write fail (a broken pipe).
    _body: axum::body::Bytes,
) -> axum::response::Response {
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let answer = {
        let mut received = received.lock().unwrap_or_else(|p| p.into_inner());
        let before = received.get(&id).map_or(0, Vec::len);
        let answer = match (mode.as_str(), before) {
            ("s500", 0 | 1) | ("dead", _) => Some(StatusCode::INTERNAL_SERVER_ERROR),
            ("s429", 0) => Some(StatusCode::TOO_MANY_REQUESTS),
            ("hang", 0) => None,
            _ => Some(StatusCode::OK),
        };
        received.entry(id).or_default().push(Receipt {
            at: Instant::now(),
            accepted: answer == Some(StatusCode::OK),
        });
        answer
    };
    match answer {
        None => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        Some(StatusCode::TOO_MANY_REQUESTS) => {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response()
        }
        Some(code) => code.into_response(),
    }
}

impl FaultSink {
    pub async fn start() -> FaultSink {
        let received: FaultState = Arc::new(Mutex::new(HashMap::new()));
        let app = axum::Router::new()
            .route("/{mode}/{*rest}", axum::routing::post(fault_handler))
            .with_state(received.clone());
        let addr = serve(app).await;
        FaultSink { addr, received }
    }

    pub fn url(&self, mode: &str, id: &str) -> String {
        format!("http://{}/{mode}/{id}", self.addr)
    }

    /// Times each `webhook-id` was received, whatever the answer.
    pub fn counts(&self) -> HashMap<String, usize> {
        self.receipts()
            .into_iter()
            .map(|(id, r)| (id, r.len()))
            .collect()
    }

    /// What the sink received per `webhook-id`, in order.
    pub fn receipts(&self) -> HashMap<String, Vec<Receipt>> {
        self.received.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// postfix's smtp-sink on a fixed port that can be stopped and started again.
pub struct RestartableSmtp {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RestartableSmtp {
    pub fn start() -> RestartableSmtp {
        let dir = tempfile::tempdir().expect("tmp");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                .expect("chmod");
        }
        let mut s = RestartableSmtp {
            port: free_port(),
            dir,
            child: None,
        };
        s.up();
        s
    }

    /// Starts the sink again on the same port. The port is below the
    /// ephemeral range, but while the sink was down another test may have
    /// bound it: keep trying for a while rather than talk to someone else.
    pub fn up(&mut self) {
        let template = format!("{}/%M%S.", self.dir.path().display());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) =
                crate::net::spawn_smtp_sink(self.port, &template, &[], Duration::from_secs(5))
            {
                self.child = Some(child);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "smtp-sink could not take 127.0.0.1:{} again",
                self.port
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// How many messages carry `Subject: fault <id>`, per id.
    pub fn counts_by_subject(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            for e in rd.flatten() {
                if let Ok(s) = std::fs::read_to_string(e.path())
                    && let Some(id) = s.lines().find_map(|l| l.strip_prefix("Subject: fault "))
                {
                    *m.entry(id.trim().to_string()).or_insert(0) += 1;
                }
            }
        }
        m
    }
}

impl Drop for RestartableSmtp {
    fn drop(&mut self) {
        self.down();
    }
}

/// Distinct values, for reports.
pub fn distinct<'a>(it: impl Iterator<Item = &'a str>) -> HashSet<&'a str> {
    it.collect()
}
