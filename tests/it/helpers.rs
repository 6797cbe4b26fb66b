//! Test harness: real broker, real PostgreSQL, real SMTP sink (postfix's
//! smtp-sink) and real HTTP endpoints, all on 127.0.0.1. Every test gets its
//! own topics, consumer group and database.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;
use sqlx::{Connection, PgConnection, PgPool};

use herald::app::App;
use herald::config::Settings;

pub const SIGNING_SECRET: &str = "test-signing-secret";

pub fn brokers() -> String {
    std::env::var("HERALD_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

pub fn admin_database_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/postgres".into())
}

pub fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// Topics, group and database of one test.
#[derive(Clone)]
pub struct TestEnv {
    pub id: String,
    pub requests: String,
    pub outcomes: String,
    pub dlq: String,
    pub group: String,
    pub database_url: String,
    pub partitions: i32,
}

impl TestEnv {
    /// Creates topics with `partitions` partitions and a fresh database (migrated).
    pub async fn new(partitions: i32) -> TestEnv {
        let id = suffix();
        let env = TestEnv {
            requests: format!("it-{id}-requests"),
            outcomes: format!("it-{id}-outcomes"),
            dlq: format!("it-{id}-dlq"),
            group: format!("it-{id}"),
            database_url: create_database(&format!("herald_it_{id}")).await,
            partitions,
            id,
        };
        let settings = env.settings(&[]);
        let topics = herald::kafka::topics::all_topics(&settings.kafka);
        herald::kafka::topics::ensure_topics(&settings.kafka, &topics, partitions)
            .await
            .expect("create topics");
        let pool = herald::store::pool(&settings.database).expect("pool");
        herald::store::migrate(&pool).await.expect("migrate");
        env
    }

    /// The HERALD_* environment for this test (also used for subprocesses).
    pub fn vars(&self, extra: &[(&str, String)]) -> Vec<(String, String)> {
        let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        let mut v: Vec<(String, String)> = vec![
            ("HERALD_KAFKA__BROKERS".into(), brokers()),
            ("HERALD_KAFKA__REQUEST_TOPICS".into(), self.requests.clone()),
            ("HERALD_KAFKA__OUTCOME_TOPIC".into(), self.outcomes.clone()),
            ("HERALD_KAFKA__DLQ_TOPIC".into(), self.dlq.clone()),
            ("HERALD_KAFKA__GROUP_ID".into(), self.group.clone()),
            ("HERALD_KAFKA__COMMIT_INTERVAL_MS".into(), "200".into()),
            ("HERALD_KAFKA__DRAIN_TIMEOUT_MS".into(), "5000".into()),
            ("HERALD_DATABASE__URL".into(), self.database_url.clone()),
            ("HERALD_DATABASE__MIGRATE_ON_START".into(), "false".into()),
            ("HERALD_HTTP__BIND".into(), "127.0.0.1:0".into()),
            (
                "HERALD_WEBHOOK__SIGNING_SECRET".into(),
                SIGNING_SECRET.into(),
            ),
            (
                "HERALD_WEBHOOK__ALLOW_PRIVATE_TARGETS".into(),
                "true".into(),
            ),
            ("HERALD_WEBHOOK__TIMEOUT_MS".into(), "2000".into()),
            (
                "HERALD_TEMPLATES__DIR".into(),
                templates.display().to_string(),
            ),
            ("HERALD_SMTP__PORT".into(), "1".into()),
            ("HERALD_SMTP__TIMEOUT_MS".into(), "2000".into()),
            ("HERALD_PIPELINE__SEND_LEASE_MS".into(), "3000".into()),
            // Retryable failures are final at once and circuits never open,
            // unless a test about retries and breakers says otherwise.
            ("HERALD_ROUTING__BUILTIN_MAX_RETRIES".into(), "0".into()),
            (
                "HERALD_ROUTING__BREAKER_FAILURE_THRESHOLD".into(),
                "1000000".into(),
            ),
            ("HERALD_ROUTING__RETRY_BASE_MS".into(), "200".into()),
            (
                "HERALD_PROVIDERS__ENCRYPTION_KEY".into(),
                TEST_ENCRYPTION_KEY.into(),
            ),
            ("HERALD_PROVIDERS__REFRESH_MS".into(), "500".into()),
        ];
        for (k, val) in extra {
            v.retain(|(key, _)| key != k);
            v.push((k.to_string(), val.clone()));
        }
        v
    }

    pub fn settings(&self, extra: &[(&str, String)]) -> Settings {
        Settings::load_with_env(None, self.vars(extra)).expect("test settings")
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.database_url)
            .await
            .expect("connect test database")
    }
}

async fn create_database(name: &str) -> String {
    let admin = admin_database_url();
    let mut conn = PgConnection::connect(&admin)
        .await
        .expect("connect to the admin database (is PostgreSQL running? scripts/services.sh start)");
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .expect("create database");
    match admin.rfind('/') {
        Some(i) => format!("{}/{}", &admin[..i], name),
        None => panic!("admin url has no database part"),
    }
}

/// A Herald running in this process.
pub struct RunningApp {
    pub http: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningApp {
    pub async fn start(settings: Settings) -> RunningApp {
        // Logs bypass the test harness's capture: only on request.
        if std::env::var_os("HERALD_TEST_LOG").is_some() {
            herald::telemetry::init_tracing();
        }
        let app = App::build(settings).await.expect("build app");
        let http = app.http_addr().expect("http addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        RunningApp {
            http,
            stop: Some(tx),
            task,
        }
    }

    /// Graceful stop: drain, commit, leave.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.await.expect("join").expect("app stopped cleanly");
    }
}

/// Herald as a separate OS process (`herald serve`), for kill tests.
pub struct HeraldProcess {
    pub child: Child,
}

impl HeraldProcess {
    pub fn spawn(vars: Vec<(String, String)>, log: &Path) -> HeraldProcess {
        let out = std::fs::File::create(log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,rdkafka=warn")
            .envs(vars)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn herald serve");
        HeraldProcess { child }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for HeraldProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer")
}

pub async fn produce(p: &FutureProducer, topic: &str, key: &str, payload: &[u8]) {
    p.send(
        FutureRecord::to(topic).key(key).payload(payload),
        Timeout::After(Duration::from_secs(30)),
    )
    .await
    .map_err(|(e, _)| e)
    .expect("produce");
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
    pub partition: i32,
}

impl Record {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).expect("json record")
    }
}

/// Reads a topic from the beginning (all partitions, no group commits).
pub struct TopicReader {
    consumer: BaseConsumer,
    pub records: Vec<Record>,
}

impl TopicReader {
    pub fn new(topic: &str, partitions: i32) -> TopicReader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", format!("reader-{}", suffix()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5")
            .create()
            .expect("reader");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("tpl");
        }
        consumer.assign(&tpl).expect("assign");
        TopicReader {
            consumer,
            records: Vec::new(),
        }
    }

    /// Polls until `done(records)` or the timeout; returns whether `done` held.
    pub async fn read_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[Record]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.records) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            match self.consumer.poll(Duration::from_millis(0)) {
                Some(Ok(m)) => {
                    let headers = m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| {
                                    (
                                        h.key.to_string(),
                                        String::from_utf8_lossy(h.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    self.records.push(Record {
                        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        payload: m.payload().unwrap_or_default().to_vec(),
                        headers,
                        partition: m.partition(),
                    });
                }
                // The connection dropped (a fault test stopped the broker):
                // librdkafka reconnects and resumes from its position.
                Some(Err(e)) if is_transient(&e) => {
                    eprintln!("reader: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some(Err(e)) => panic!("reader error: {e}"),
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Outcome events read so far, each validated against the published schema.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.records
            .iter()
            .map(|r| {
                let v = r.json();
                herald::domain::decode::validate_delivery_status(&v).unwrap_or_else(|e| {
                    panic!("outcome event violates delivery-status.v1.json: {e}: {v}")
                });
                v
            })
            .collect()
    }
}

impl TopicReader {
    /// Reads until every `(notification id, status)` in `wanted` has an
    /// event (at most `timeout`); panics with what was seen otherwise.
    pub async fn wait_for(&mut self, timeout: Duration, wanted: &[(&str, &str)]) {
        let w: Vec<(String, String)> = wanted
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let ok = self
            .read_until(timeout, move |records| {
                w.iter().all(|(id, status)| {
                    records.iter().any(|r| {
                        let v = r.json();
                        v["notification_id"] == id.as_str() && v["status"] == status.as_str()
                    })
                })
            })
            .await;
        let seen: Vec<String> = self
            .events()
            .iter()
            .map(|v| {
                format!(
                    "{} {} {}",
                    v["notification_id"], v["status"], v["error"]["code"]
                )
            })
            .collect();
        assert!(ok, "waited for {wanted:?}; saw {seen:?}");
    }
}

pub fn final_statuses() -> &'static [&'static str] {
    &[
        "sent",
        "delivered",
        "failed",
        "rejected",
        "suppressed",
        "expired",
        "bounced",
        "cancelled",
    ]
}

/// Distinct final event ids per notification id.
pub fn finals_by_notification(
    events: &[serde_json::Value],
) -> HashMap<String, std::collections::HashSet<String>> {
    let mut m: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for e in events {
        let status = e["status"].as_str().unwrap_or_default();
        if final_statuses().contains(&status) {
            let id = e["notification_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            m.entry(id)
                .or_default()
                .insert(e["event_id"].as_str().unwrap_or_default().to_string());
        }
    }
    m
}

/// The provider-credentials key of every test app (32 bytes of 0x2a).
pub const TEST_ENCRYPTION_KEY: &str = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";

/// Registers a provider in the test database, credentials encrypted with
/// [`TEST_ENCRYPTION_KEY`]. Running apps pick it up through NOTIFY; start
/// the app after registering to have it from the first message.
pub async fn register_provider(env: &TestEnv, p: herald::routing::store::NewProvider) {
    let cipher =
        herald::routing::crypto::Cipher::from_base64(TEST_ENCRYPTION_KEY).expect("test key");
    herald::routing::store::ProviderStore::new(env.pool().await)
        .create(p, &cipher)
        .await
        .expect("register provider");
}

/// postfix's smtp-sink on a free 127.0.0.1 port, dumping each message to a file.
pub struct SmtpSink {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl SmtpSink {
    pub fn start() -> SmtpSink {
        let dir = tempfile::tempdir().expect("tempdir");
        set_mode_777(dir.path());
        let template = format!("{}/%M%S.", dir.path().display());
        let (port, child) = crate::net::start_smtp_sink(&template, &[]);
        SmtpSink { port, dir, child }
    }

    /// The dumped messages.
    pub fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            for e in rd.flatten() {
                if let Ok(s) = std::fs::read_to_string(e.path()) {
                    out.push(s);
                }
            }
        }
        out
    }

    pub fn count(&self) -> usize {
        std::fs::read_dir(self.dir.path())
            .map(|rd| rd.count())
            .unwrap_or(0)
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_mode_777(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
}

pub use crate::net::free_port;

/// `herald_requests_consumed_total` (all partitions) of the instance whose
/// HTTP API listens on `port`; `None` while it does not answer.
pub async fn requests_consumed(port: u16) -> Option<u64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("herald_requests_consumed_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>(),
    )
}

fn wait_for_port(port: u16) {
    crate::net::wait_for_port(port, Duration::from_secs(10));
}

/// One request received by [`HttpSink`].
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it arrived.
    pub at: Instant,
    /// The request path.
    pub path: String,
}

/// A real HTTP server on 127.0.0.1 recording every POST; answers `status`
/// with the response headers in `headers`.
pub struct HttpSink {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub status: Arc<Mutex<u16>>,
    pub headers: Arc<Mutex<Vec<(String, String)>>>,
}

/// Serves `app` on 127.0.0.1 (a port the kernel picks, held while the test
/// runs); returns its address.
pub async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

impl HttpSink {
    pub async fn start() -> HttpSink {
        let received = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(200u16));
        let headers = Arc::new(Mutex::new(Vec::new()));
        let state = (received.clone(), status.clone(), headers.clone());
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(record))
            .with_state(state);
        let addr = serve(app).await;
        HttpSink {
            addr,
            received,
            status,
            headers,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// How many times each `webhook-id` arrived.
    pub fn counts_by_id(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for r in self.received() {
            let id = r
                .headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            *m.entry(id).or_insert(0) += 1;
        }
        m
    }
}

type SinkState = (
    Arc<Mutex<Vec<Received>>>,
    Arc<Mutex<u16>>,
    Arc<Mutex<Vec<(String, String)>>>,
);

async fn record(
    State((received, status, reply_headers)): State<SinkState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    received.lock().expect("lock").push(Received {
        headers,
        body,
        at: Instant::now(),
        path: uri.path().to_string(),
    });
    let code = *status.lock().expect("lock");
    let mut out = HeaderMap::new();
    for (k, v) in reply_headers.lock().expect("lock").iter() {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            axum::http::HeaderValue::from_str(v),
        ) {
            out.insert(k, v);
        }
    }
    (StatusCode::from_u16(code).unwrap_or(StatusCode::OK), out).into_response()
}

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// [`producer`] for another broker (the fault suite runs its own).
pub fn producer_on(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "16000000")
        .set("message.timeout.ms", "120000")
        .create()
        .expect("producer")
}

impl TopicReader {
    /// [`TopicReader::new`] for another broker (the fault suite runs its own).
    pub fn new_on(brokers: &str, topic: &str, partitions: i32) -> TopicReader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("reader-{}", suffix()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5")
            .create()
            .expect("reader");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("tpl");
        }
        consumer.assign(&tpl).expect("assign");
        TopicReader {
            consumer,
            records: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------- outcome events

/// The outcome event of `id` with `status` (panics when there is none).
pub fn event(events: &[serde_json::Value], id: &str, status: &str) -> serde_json::Value {
    events
        .iter()
        .find(|e| e["notification_id"] == id && e["status"] == status)
        .cloned()
        .unwrap_or_else(|| panic!("no {status} event for {id}"))
}

/// The statuses of `id`'s outcome events, in topic order.
pub fn statuses(events: &[serde_json::Value], id: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["notification_id"] == id)
        .map(|e| e["status"].as_str().unwrap_or_default().to_string())
        .collect()
}

// ---------------------------------------------------------------- receipts, as providers send them

/// What Herald answered to a POST.
pub struct PostReply {
    pub status: u16,
    pub content_type: String,
    pub retry_after: Option<String>,
    /// The body as JSON, or as a JSON string when it is not JSON.
    pub body: serde_json::Value,
}

/// POSTs `body` to `url` with `headers`.
pub async fn post(url: &str, headers: &[(&str, String)], body: Vec<u8>) -> PostReply {
    let mut req = reqwest::Client::new().post(url).body(body);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req.send().await.expect("POST");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let status = resp.status().as_u16();
    let content_type = header("content-type").unwrap_or_default();
    let retry_after = header("retry-after");
    let text = resp.text().await.expect("body");
    PostReply {
        status,
        content_type,
        retry_after,
        body: serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    }
}

/// A fresh SendGrid Event Webhook key pair: the signing key and the base64
/// DER public key Herald is configured with.
pub fn sendgrid_keys() -> (p256::ecdsa::SigningKey, String) {
    use base64::Engine as _;
    use p256::pkcs8::EncodePublicKey;
    let sk = loop {
        if let Ok(k) = p256::ecdsa::SigningKey::from_slice(&rand::random::<[u8; 32]>()) {
            break k;
        }
    };
    let der = p256::ecdsa::VerifyingKey::from(&sk)
        .to_public_key_der()
        .expect("encode public key");
    (
        sk,
        base64::engine::general_purpose::STANDARD.encode(der.as_bytes()),
    )
}

/// POSTs an Event Webhook batch to `app` signed as SendGrid signs it
/// (ECDSA P-256 over timestamp + body, DER signature in base64), stamped
/// `age` seconds in the past.
pub async fn post_sendgrid(
    app: &RunningApp,
    sk: &p256::ecdsa::SigningKey,
    events: &serde_json::Value,
    age: i64,
) -> PostReply {
    use base64::Engine as _;
    use p256::ecdsa::signature::Signer;
    let body = events.to_string().into_bytes();
    let ts = (chrono::Utc::now().timestamp() - age).to_string();
    let mut signed = ts.as_bytes().to_vec();
    signed.extend_from_slice(&body);
    let sig: p256::ecdsa::Signature = sk.sign(&signed);
    post(
        &format!("http://{}/webhooks/sendgrid", app.http),
        &[
            ("content-type", "application/json".into()),
            (
                "X-Twilio-Email-Event-Webhook-Signature",
                base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes()),
            ),
            ("X-Twilio-Email-Event-Webhook-Timestamp", ts),
        ],
        body,
    )
    .await
}

/// Twilio's `X-Twilio-Signature`, computed here independently of Herald:
/// base64 HMAC-SHA1 (auth token) of the URL followed by each POST
/// parameter's name and value, sorted by name.
pub fn twilio_sign(token: &str, url: &str, params: &[(&str, &str)]) -> String {
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    let mut sorted = params.to_vec();
    sorted.sort();
    let mut data = url.to_string();
    for (k, v) in sorted {
        data.push_str(k);
        data.push_str(v);
    }
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(token.as_bytes()).expect("hmac key");
    mac.update(data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// POSTs a Twilio status callback with `params`, signed with `token` for
/// `signed_url` (the URL Twilio was told), to `url`.
pub async fn post_twilio(
    url: &str,
    token: &str,
    signed_url: &str,
    params: &[(&str, &str)],
) -> PostReply {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    post(
        url,
        &[
            ("content-type", "application/x-www-form-urlencoded".into()),
            ("X-Twilio-Signature", twilio_sign(token, signed_url, params)),
        ],
        body.into_bytes(),
    )
    .await
}

/// A consumer error librdkafka recovers from by itself (lost connection).
fn is_transient(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::{AllBrokersDown, BrokerTransportFailure};
    matches!(
        e.rdkafka_error_code(),
        Some(BrokerTransportFailure | AllBrokersDown)
    )
}
