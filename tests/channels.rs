//! Adapter-level integration tests against real servers on 127.0.0.1:
//! postfix's `smtp-sink` for SMTP and an axum server for webhooks.

#[path = "common/net.rs"]
mod net;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use herald::channels::smtp::SmtpAdapter;
use herald::channels::webhook::{self, WebhookAdapter};
use herald::channels::{ChannelAdapter, SendError};
use herald::config::{Settings, SmtpSettings, SmtpTls, WebhookSettings};
use herald::domain::{
    Channel, Content, EmailAddress, InlineContent, Meta, Notification, Priority, Recipient,
    WebhookUrl,
};
use herald::render::RenderedContent;
use secrecy::SecretString;

// ---------------------------------------------------------------- helpers

use net::free_port;

fn notification(id: &str, channel: Channel, recipient: Recipient, meta: Meta) -> Notification {
    Notification {
        id: id.to_string(),
        request_id: id.split(':').next().unwrap().to_string(),
        tenant_id: Some("acme".into()),
        app_id: None,
        channel,
        recipient,
        content: Content::Inline(InlineContent::default()),
        priority: Priority::Normal,
        category: None,
        scheduled_at: None,
        expires_at: None,
        meta,
        correlation_id: Some("corr-9".into()),
    }
}

fn email(s: &str) -> EmailAddress {
    EmailAddress::parse(s).unwrap()
}

fn email_notification(id: &str, to: &str, meta: Meta) -> Notification {
    let recipient = Recipient {
        email: Some(email(to)),
        ..Default::default()
    };
    notification(id, Channel::Email, recipient, meta)
}

fn content() -> RenderedContent {
    RenderedContent {
        subject: Some("Your order shipped".into()),
        text: Some("Plain text part".into()),
        html: Some("<p>HTML part</p>".into()),
        data: serde_json::json!({"order": 42}),
    }
}

/// A running `smtp-sink`, killed on drop, dumping into its own directory.
struct SmtpSink {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl SmtpSink {
    fn start(extra: &[&str]) -> SmtpSink {
        let dir = tempfile::tempdir().unwrap();
        // smtp-sink drops privileges to `nobody`, which must write the dumps.
        Command::new("chmod")
            .arg("777")
            .arg(dir.path())
            .status()
            .unwrap();
        let template = format!("{}/%M.", dir.path().display());
        let (port, child) = net::start_smtp_sink(&template, extra);
        SmtpSink { child, port, dir }
    }

    fn settings(&self, pool_size: usize) -> SmtpSettings {
        smtp_settings(self.port, pool_size)
    }

    fn dumps(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            out.push(e.unwrap().path());
        }
        out
    }

    /// Waits until `n` dump files exist and are complete (smtp-sink writes
    /// them while the transaction runs).
    async fn wait_for_dumps(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let paths = self.dumps();
            if paths.len() >= n {
                let texts: Vec<String> = paths
                    .iter()
                    .map(|p| std::fs::read_to_string(p).unwrap_or_default())
                    .collect();
                if texts.iter().all(|t| t.contains("Plain text part")) {
                    return texts;
                }
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} dumps, found {}",
                paths.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn smtp_settings(port: u16, pool_size: usize) -> SmtpSettings {
    let mut s = Settings::load_with_env(None, Vec::new()).unwrap().smtp;
    s.host = "127.0.0.1".into();
    s.port = port;
    s.tls = SmtpTls::None;
    s.pool_size = pool_size;
    s.timeout_ms = 2000;
    s.default_from = "Herald <herald@example.com>".into();
    s
}

fn assert_code(err: &SendError, code: &str, retryable: bool) {
    assert_eq!(err.code(), code, "{err:?}");
    assert_eq!(err.is_retryable(), retryable, "{err:?}");
}

// ---------------------------------------------------------------- SMTP

#[tokio::test]
async fn smtp_sends_full_message_with_envelope_and_headers() {
    let sink = SmtpSink::start(&[]);
    let adapter = SmtpAdapter::new(&sink.settings(2)).unwrap();
    let meta = Meta {
        from: Some(email("orders@shop.example")),
        reply_to: Some(email("support@shop.example")),
        cc: vec![email("cc@example.org")],
        bcc: vec![email("audit@example.org")],
        headers: [("X-Campaign".to_string(), "spring-sale".to_string())].into(),
    };
    let n = email_notification("req-1", "alice@example.com", meta);
    let receipt = adapter.send(&n, &content()).await.unwrap();
    assert_eq!(receipt.provider, "smtp");
    assert!(receipt.provider_message_id.is_some());

    let dumps = sink.wait_for_dumps(1).await;
    assert_eq!(dumps.len(), 1);
    let d = &dumps[0];
    assert!(d.contains("X-Mail-Args: <orders@shop.example>"), "{d}");
    for rcpt in ["alice@example.com", "cc@example.org", "audit@example.org"] {
        assert!(d.contains(&format!("X-Rcpt-Args: <{rcpt}>")), "{rcpt}: {d}");
    }
    for header in [
        "From: orders@shop.example\n",
        "To: alice@example.com\n",
        "Cc: cc@example.org\n",
        "Reply-To: support@shop.example\n",
        "Subject: Your order shipped\n",
        "X-Campaign: spring-sale\n",
        "Message-ID: <req-1@herald>\n",
        "Content-Type: multipart/alternative;",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Type: text/html; charset=utf-8",
        "Plain text part",
        "<p>HTML part</p>",
    ] {
        let found = d.contains(header) || d.contains(&header.replace('\n', "\r\n"));
        assert!(found, "missing {header:?} in {d}");
    }
    assert!(
        !d.lines()
            .any(|l| l.to_ascii_lowercase().starts_with("bcc:")),
        "Bcc header leaked: {d}"
    );
}

#[tokio::test]
async fn smtp_default_from_and_text_only() {
    let sink = SmtpSink::start(&[]);
    let adapter = SmtpAdapter::new(&sink.settings(1)).unwrap();
    let n = email_notification("req-2", "bob@example.com", Meta::default());
    let c = RenderedContent {
        html: None,
        ..content()
    };
    adapter.send(&n, &c).await.unwrap();
    let d = &sink.wait_for_dumps(1).await[0];
    assert!(d.contains("X-Mail-Args: <herald@example.com>"), "{d}");
    assert!(d.contains("Herald <herald@example.com>"), "{d}");
    assert!(!d.contains("multipart"), "{d}");
}

#[tokio::test]
async fn smtp_200_concurrent_sends_over_pool_of_8() {
    let sink = SmtpSink::start(&[]);
    let adapter = Arc::new(SmtpAdapter::new(&sink.settings(8)).unwrap());
    let started = Instant::now();
    let sends = (0..200).map(|i| {
        let adapter = adapter.clone();
        tokio::spawn(async move {
            let n = email_notification(&format!("bulk-{i}"), "bulk@example.com", Meta::default());
            adapter.send(&n, &content()).await
        })
    });
    let results = futures::future::join_all(sends).await;
    let elapsed = started.elapsed();
    for r in results {
        r.unwrap().unwrap();
    }
    let dumps = sink.wait_for_dumps(200).await;
    assert_eq!(dumps.len(), 200);
    // With TCP_NODELAY this takes well under a second; lettre's stock
    // connector (~22 msg/s per connection) would need over a second.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    eprintln!("200 messages over 8 connections in {elapsed:?}");
}

#[tokio::test]
async fn smtp_hard_reject_is_permanent_with_server_reply() {
    let sink = SmtpSink::start(&["-f", "RCPT"]);
    let adapter = SmtpAdapter::new(&sink.settings(1)).unwrap();
    let n = email_notification("req-3", "nobody@example.com", Meta::default());
    for _ in 0..2 {
        // The second send reuses the connection after RSET.
        let err = adapter.send(&n, &content()).await.unwrap_err();
        assert_code(&err, "smtp_permanent", false);
        // The relay's own reply (code and text) is kept for the outcome.
        assert!(err.message().contains("(5"), "{err:?}");
        eprintln!("hard reject: {}", err.message());
    }
}

#[tokio::test]
async fn smtp_relay_without_pipelining_gets_one_command_at_a_time() {
    // `-p`: smtp-sink does not offer PIPELINING. (Its `-f`/`-r` refusal
    // options imply `-p`, so the refusal tests around this one run the
    // one-at-a-time path too; the pipelined ones use `ScriptedRelay`.)
    let sink = SmtpSink::start(&["-p"]);
    let adapter = SmtpAdapter::new(&sink.settings(1)).unwrap();
    for i in 0..3 {
        let n = email_notification(&format!("nopipe-{i}"), "bob@example.com", Meta::default());
        adapter.send(&n, &content()).await.unwrap();
    }
    assert_eq!(sink.wait_for_dumps(3).await.len(), 3);
}

#[tokio::test]
async fn smtp_refused_sender_is_permanent_every_time() {
    let sink = SmtpSink::start(&["-f", "MAIL"]);
    let adapter = SmtpAdapter::new(&sink.settings(1)).unwrap();
    let n = email_notification("req-mail", "bob@example.com", Meta::default());
    for _ in 0..3 {
        let err = adapter.send(&n, &content()).await.unwrap_err();
        assert_code(&err, "smtp_permanent", false);
        assert!(err.message().contains("(5"), "{err:?}");
    }
    assert!(sink.dumps().is_empty());
}

/// What a [`ScriptedRelay`] saw.
#[derive(Clone, Default)]
struct RelayLog {
    connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Command lines (MAIL, RCPT, DATA, RSET, ...), EHLO left out.
    commands: Arc<Mutex<Vec<String>>>,
    /// Lines received as message text, and messages completed.
    text: Arc<Mutex<Vec<String>>>,
    delivered: Arc<std::sync::atomic::AtomicUsize>,
}

impl RelayLog {
    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn delivered(&self) -> usize {
        self.delivered.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn commands(&self) -> Vec<String> {
        self.commands.lock().unwrap().clone()
    }
}

/// A relay on 127.0.0.1 that offers PIPELINING and gives the scripted
/// replies to MAIL, RCPT and DATA. smtp-sink cannot refuse a command while
/// offering PIPELINING, so the pipelined refusal paths need this. It sends
/// no reply to a transaction before DATA has arrived: a client that waits
/// for each reply instead of pipelining stalls into its timeout.
struct ScriptedRelay {
    port: u16,
    log: RelayLog,
}

impl ScriptedRelay {
    async fn start(mail: &'static str, rcpt: &'static str, data: &'static str) -> ScriptedRelay {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = RelayLog::default();
        let shared = log.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = shared.clone();
                log.connections
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    write.write_all(b"220 scripted ESMTP\r\n").await.unwrap();
                    let mut pending = String::new();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                        if verb != "EHLO" {
                            log.commands.lock().unwrap().push(line.clone());
                        }
                        let reply = match verb.as_str() {
                            "EHLO" => "250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                            "MAIL" => {
                                pending += mail;
                                continue;
                            }
                            "RCPT" => {
                                pending += rcpt;
                                continue;
                            }
                            "DATA" => {
                                pending += data;
                                write.write_all(pending.as_bytes()).await.unwrap();
                                pending.clear();
                                if !data.starts_with("354") {
                                    continue;
                                }
                                while let Ok(Some(text)) = lines.next_line().await {
                                    if text == "." {
                                        log.delivered
                                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                        break;
                                    }
                                    log.text.lock().unwrap().push(text);
                                }
                                "250 2.0.0 Ok: queued as SCRIPTED\r\n"
                            }
                            "RSET" => "250 2.0.0 Ok\r\n",
                            "QUIT" => "221 2.0.0 Bye\r\n",
                            _ => "502 5.5.2 unknown command\r\n",
                        };
                        if write.write_all(reply.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        ScriptedRelay { port, log }
    }

    fn settings(&self) -> SmtpSettings {
        let mut s = smtp_settings(self.port, 1);
        s.timeout_ms = 2_000;
        s
    }
}

#[tokio::test]
async fn smtp_pipelines_mail_rcpt_and_data_when_offered() {
    let relay =
        ScriptedRelay::start("250 2.1.0 Ok\r\n", "250 2.1.5 Ok\r\n", "354 go ahead\r\n").await;
    let adapter = SmtpAdapter::new(&relay.settings()).unwrap();
    for i in 0..2 {
        let n = email_notification(&format!("pipe-{i}"), "bob@example.com", Meta::default());
        // The relay answers nothing before DATA: only a pipelining client
        // gets through.
        adapter.send(&n, &content()).await.unwrap();
    }
    assert_eq!(relay.log.delivered(), 2);
    assert_eq!(relay.log.connections(), 1, "the connection is reused");
}

#[tokio::test]
async fn smtp_pipelined_refused_recipient_keeps_the_connection_in_step() {
    let relay = ScriptedRelay::start(
        "250 2.1.0 Ok\r\n",
        "550 5.1.1 no such user\r\n",
        "554 5.5.1 no valid recipients\r\n",
    )
    .await;
    let adapter = SmtpAdapter::new(&relay.settings()).unwrap();
    let n = email_notification("pipe-rcpt", "nobody@example.com", Meta::default());
    for _ in 0..2 {
        let err = adapter.send(&n, &content()).await.unwrap_err();
        assert_code(&err, "smtp_permanent", false);
        assert!(err.message().contains("no such user"), "{err:?}");
    }
    // Every reply was read, so RSET got its own answer and the one
    // connection was kept.
    assert_eq!(relay.log.connections(), 1);
    assert_eq!(relay.log.delivered(), 0);
    let verbs: Vec<String> = relay
        .log
        .commands()
        .iter()
        .map(|c| c[..4].to_string())
        .collect();
    assert_eq!(
        verbs,
        [
            "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "RSET"
        ]
    );
}

#[tokio::test]
async fn smtp_pipelined_refusal_after_data_was_accepted_drops_the_connection() {
    // The sender is refused but DATA is accepted (smtp-sink answers like
    // that too): the relay now reads message text. Sending anything, even
    // RSET, would become text; closing the connection delivers nothing.
    let relay = ScriptedRelay::start(
        "550 5.7.1 sender refused\r\n",
        "250 2.1.5 Ok\r\n",
        "354 go ahead\r\n",
    )
    .await;
    let adapter = SmtpAdapter::new(&relay.settings()).unwrap();
    let n = email_notification("pipe-abandon", "bob@example.com", Meta::default());
    for _ in 0..2 {
        let err = adapter.send(&n, &content()).await.unwrap_err();
        assert_code(&err, "smtp_permanent", false);
        assert!(err.message().contains("sender refused"), "{err:?}");
    }
    assert_eq!(
        relay.log.connections(),
        2,
        "each abandoned connection is dropped"
    );
    assert_eq!(relay.log.delivered(), 0);
    let text = relay.log.text.lock().unwrap().clone();
    assert!(text.is_empty(), "no message text was sent: {text:?}");
}

#[tokio::test]
async fn smtp_soft_reject_is_retryable() {
    let sink = SmtpSink::start(&["-r", "DATA"]);
    let adapter = SmtpAdapter::new(&sink.settings(1)).unwrap();
    let n = email_notification("req-4", "later@example.com", Meta::default());
    let err = adapter.send(&n, &content()).await.unwrap_err();
    assert_code(&err, "smtp_transient", true);
}

#[tokio::test]
async fn smtp_refused_port_is_retryable() {
    let adapter = SmtpAdapter::new(&smtp_settings(free_port(), 1)).unwrap();
    let n = email_notification("req-5", "x@example.com", Meta::default());
    let err = adapter.send(&n, &content()).await.unwrap_err();
    assert_code(&err, "smtp_connect", true);
    assert!(adapter.check().await.is_err());
}

#[tokio::test]
async fn smtp_silent_server_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts and never says a word.
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = listener.accept().await.unwrap();
            held.push(s);
        }
    });
    let mut settings = smtp_settings(port, 1);
    settings.timeout_ms = 300;
    let adapter = SmtpAdapter::new(&settings).unwrap();
    let n = email_notification("req-6", "x@example.com", Meta::default());
    let started = Instant::now();
    let err = adapter.send(&n, &content()).await.unwrap_err();
    assert_code(&err, "smtp_timeout", true);
    assert!(started.elapsed() < Duration::from_secs(2));
    server.abort();
}

#[tokio::test]
async fn smtp_reconnects_when_idle_connection_was_closed() {
    // `-t 1`: the sink drops clients idle for a second.
    let sink = SmtpSink::start(&["-t", "1"]);
    let adapter = SmtpAdapter::new(&sink.settings(1)).unwrap();
    let n = email_notification("req-7", "x@example.com", Meta::default());
    adapter.send(&n, &content()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    adapter.send(&n, &content()).await.unwrap();
    sink.wait_for_dumps(2).await;
}

#[tokio::test]
async fn smtp_starttls_required_but_not_offered_fails() {
    let sink = SmtpSink::start(&[]);
    let mut settings = sink.settings(1);
    settings.tls = SmtpTls::Starttls;
    let adapter = SmtpAdapter::new(&settings).unwrap();
    let n = email_notification("req-8", "x@example.com", Meta::default());
    let err = adapter.send(&n, &content()).await.unwrap_err();
    assert_code(&err, "smtp_tls", true);
    assert!(sink.dumps().is_empty());
}

#[tokio::test]
async fn smtp_check_connects_and_quits() {
    let sink = SmtpSink::start(&[]);
    let adapter = SmtpAdapter::new(&sink.settings(1)).unwrap();
    adapter.check().await.unwrap();
}

#[tokio::test]
async fn smtp_missing_address_and_injection_are_permanent() {
    let sink = SmtpSink::start(&[]);
    let adapter = SmtpAdapter::new(&sink.settings(1)).unwrap();
    let mut n = email_notification("req-9", "x@example.com", Meta::default());
    n.recipient.email = None;
    assert_code(
        &adapter.send(&n, &content()).await.unwrap_err(),
        "no_address",
        false,
    );
    let meta = Meta {
        headers: [(
            "X-Evil".to_string(),
            "a\r\nBcc: victim@example.com".to_string(),
        )]
        .into(),
        ..Default::default()
    };
    let n = email_notification("req-10", "x@example.com", meta);
    assert_code(
        &adapter.send(&n, &content()).await.unwrap_err(),
        "invalid_header",
        false,
    );
    assert!(sink.dumps().is_empty());
}

// ---------------------------------------------------------------- webhook

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Clone, Default)]
struct Recorder {
    requests: Arc<Mutex<Vec<(String, HeaderMap, Bytes)>>>,
}

impl Recorder {
    fn record(&self, path: &str, headers: HeaderMap, body: Bytes) {
        self.requests
            .lock()
            .unwrap()
            .push((path.to_string(), headers, body));
    }
    fn paths(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.0.clone())
            .collect()
    }
}

async fn hook_server() -> (SocketAddr, Recorder) {
    let rec = Recorder::default();
    async fn ok(State(r): State<Recorder>, h: HeaderMap, b: Bytes) -> impl IntoResponse {
        r.record("/ok", h, b);
        (StatusCode::OK, "thanks")
    }
    async fn fail(State(r): State<Recorder>, h: HeaderMap, b: Bytes) -> impl IntoResponse {
        r.record("/fail", h, b);
        (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance")
    }
    async fn limited(State(r): State<Recorder>, h: HeaderMap, b: Bytes) -> impl IntoResponse {
        r.record("/limited", h, b);
        (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "7")],
            "slow down",
        )
    }
    async fn gone(State(r): State<Recorder>, h: HeaderMap, b: Bytes) -> impl IntoResponse {
        r.record("/gone", h, b);
        StatusCode::NOT_FOUND
    }
    async fn redirect(State(r): State<Recorder>, h: HeaderMap, b: Bytes) -> impl IntoResponse {
        r.record("/redirect", h, b);
        (StatusCode::FOUND, [("location", "/ok")])
    }
    async fn hang(State(r): State<Recorder>, h: HeaderMap, b: Bytes) -> impl IntoResponse {
        r.record("/hang", h, b);
        tokio::time::sleep(Duration::from_secs(30)).await;
        StatusCode::OK
    }
    async fn big(State(r): State<Recorder>, h: HeaderMap, b: Bytes) -> impl IntoResponse {
        r.record("/big", h, b);
        (StatusCode::BAD_REQUEST, "x".repeat(1_000_000))
    }
    let app = Router::new()
        .route("/ok", post(ok))
        .route("/fail", post(fail))
        .route("/limited", post(limited))
        .route("/gone", post(gone))
        .route("/redirect", post(redirect))
        .route("/hang", post(hang))
        .route("/big", post(big))
        .with_state(rec.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, rec)
}

fn webhook_settings(allow_private: bool) -> WebhookSettings {
    let mut s = Settings::load_with_env(None, Vec::new()).unwrap().webhook;
    s.signing_secret = SecretString::from(SECRET);
    s.allow_private_targets = allow_private;
    s.timeout_ms = 500;
    s.max_response_bytes = 1024;
    s
}

fn webhook_notification(id: &str, url: &str) -> Notification {
    let recipient = Recipient {
        url: Some(WebhookUrl::parse(url).unwrap()),
        ..Default::default()
    };
    let meta = Meta {
        headers: [("X-Tenant-Route".to_string(), "blue".to_string())].into(),
        ..Default::default()
    };
    notification(id, Channel::Webhook, recipient, meta)
}

#[tokio::test]
async fn webhook_posts_signed_json() {
    let (addr, rec) = hook_server().await;
    let adapter = WebhookAdapter::new(&webhook_settings(true)).unwrap();
    let n = webhook_notification("req-1:3", &format!("http://{addr}/ok"));
    let receipt = adapter.send(&n, &content()).await.unwrap();
    assert_eq!(receipt.provider, "webhook");
    assert_eq!(receipt.provider_message_id.as_deref(), Some("req-1:3"));

    let reqs = rec.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1);
    let (_, headers, body) = &reqs[0];
    assert!(
        webhook::verify(SECRET, headers, body),
        "signature must verify"
    );
    assert!(!webhook::verify("whsec_AAAAAAAA", headers, body));
    let h = |n: &str| headers.get(n).unwrap().to_str().unwrap().to_string();
    assert_eq!(h("content-type"), "application/json");
    assert_eq!(
        h("user-agent"),
        format!("herald/{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(h("webhook-id"), "req-1:3");
    assert!(h("webhook-signature").starts_with("v1,"));
    assert_eq!(h("x-tenant-route"), "blue");
    let ts: i64 = h("webhook-timestamp").parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - ts).abs() < 10);

    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(json["notification_id"], "req-1:3");
    assert_eq!(json["request_id"], "req-1");
    assert_eq!(json["tenant_id"], "acme");
    assert_eq!(json["channel"], "webhook");
    assert_eq!(json["subject"], "Your order shipped");
    assert_eq!(json["text"], "Plain text part");
    assert_eq!(json["html"], "<p>HTML part</p>");
    assert_eq!(json["data"], serde_json::json!({"order": 42}));
    assert_eq!(json["correlation_id"], "corr-9");
    assert!(chrono::DateTime::parse_from_rfc3339(json["occurred_at"].as_str().unwrap()).is_ok());
}

/// Requests a receiver holds at once: now, and the most seen.
#[derive(Clone, Default)]
struct InFlight {
    now: Arc<std::sync::atomic::AtomicUsize>,
    max: Arc<std::sync::atomic::AtomicUsize>,
}

impl InFlight {
    fn enter(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(n, SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn max(&self) -> usize {
        self.max.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A receiver that holds every request 100 ms, counting its own and all
/// receivers' requests in flight.
async fn slow_receiver(all: InFlight) -> (SocketAddr, InFlight) {
    let mine = InFlight::default();
    async fn slow(State((mine, all)): State<(InFlight, InFlight)>) -> StatusCode {
        mine.enter();
        all.enter();
        tokio::time::sleep(Duration::from_millis(100)).await;
        mine.leave();
        all.leave();
        StatusCode::OK
    }
    let app = Router::new()
        .route("/slow", post(slow))
        .with_state((mine.clone(), all));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, mine)
}

#[tokio::test]
async fn webhook_caps_requests_in_flight_per_host() {
    let all = InFlight::default();
    let (a, at_a) = slow_receiver(all.clone()).await;
    let (b, at_b) = slow_receiver(all.clone()).await;
    let mut settings = webhook_settings(true);
    settings.timeout_ms = 5_000;
    settings.max_connections_per_host = 3;
    let adapter = WebhookAdapter::new(&settings).unwrap();
    let sends: Vec<_> = (0..24)
        .map(|i| {
            let host = if i % 2 == 0 { a } else { b };
            webhook_notification(&format!("cap-{i}"), &format!("http://{host}/slow"))
        })
        .collect();
    let c = content();
    let results = futures::future::join_all(sends.iter().map(|n| adapter.send(n, &c))).await;
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    // 12 requests per receiver, never more than 3 at once at either; the
    // cap is per host, so both ran 3 at the same time.
    assert_eq!(at_a.max(), 3);
    assert_eq!(at_b.max(), 3);
    assert!(all.max() > 3, "per host, not global: {}", all.max());
}

#[tokio::test]
async fn webhook_omits_null_fields() {
    let (addr, rec) = hook_server().await;
    let adapter = WebhookAdapter::new(&webhook_settings(true)).unwrap();
    let mut n = webhook_notification("req-2", &format!("http://{addr}/ok"));
    n.tenant_id = None;
    n.correlation_id = None;
    let c = RenderedContent {
        data: serde_json::json!({"k": 1}),
        ..Default::default()
    };
    adapter.send(&n, &c).await.unwrap();
    let body = rec.requests.lock().unwrap()[0].2.clone();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
    for absent in ["tenant_id", "subject", "text", "html", "correlation_id"] {
        assert!(!keys.iter().any(|k| *k == absent), "{absent} in {json}");
    }
}

#[tokio::test]
async fn webhook_status_classification() {
    let (addr, rec) = hook_server().await;
    let adapter = WebhookAdapter::new(&webhook_settings(true)).unwrap();
    let send = |path: &str| {
        let n = webhook_notification("req-3", &format!("http://{addr}{path}"));
        let adapter = &adapter;
        async move { adapter.send(&n, &content()).await.unwrap_err() }
    };

    let e = send("/fail").await;
    assert_code(&e, "http_status", true);
    assert!(e.message().starts_with("HTTP 503"), "{e:?}");
    assert!(e.message().contains("down for maintenance"), "{e:?}");

    let e = send("/limited").await;
    assert!(matches!(e, SendError::RateLimited { .. }), "{e:?}");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));

    assert_code(&send("/gone").await, "http_status", false);

    let e = send("/redirect").await;
    assert_code(&e, "http_redirect", false);
    assert!(
        !rec.paths().contains(&"/ok".to_string()),
        "redirect was followed"
    );

    let e = send("/big").await;
    assert_code(&e, "http_status", false);
    assert!(
        e.message().len() < 400,
        "body not bounded: {}",
        e.message().len()
    );

    let started = Instant::now();
    let e = send("/hang").await;
    assert_code(&e, "http_timeout", true);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn webhook_connection_refused_is_retryable() {
    let adapter = WebhookAdapter::new(&webhook_settings(true)).unwrap();
    let n = webhook_notification("req-4", &format!("http://127.0.0.1:{}/ok", free_port()));
    assert_code(
        &adapter.send(&n, &content()).await.unwrap_err(),
        "http_connect",
        true,
    );
}

#[tokio::test]
async fn webhook_refuses_private_targets() {
    let (addr, rec) = hook_server().await;
    let adapter = WebhookAdapter::new(&webhook_settings(false)).unwrap();
    let port = addr.port();
    for url in [
        format!("http://127.0.0.1:{port}/ok"),
        format!("http://localhost:{port}/ok"),
        format!("http://[::1]:{port}/ok"),
        format!("http://2130706433:{port}/ok"),
        "http://169.254.169.254/latest/meta-data".to_string(),
    ] {
        let n = webhook_notification("req-5", &url);
        let e = adapter.send(&n, &content()).await.unwrap_err();
        assert_code(&e, "address_not_allowed", false);
    }
    assert!(rec.paths().is_empty(), "a refused target was called");
}

#[tokio::test]
async fn webhook_refuses_header_injection() {
    let (addr, rec) = hook_server().await;
    let adapter = WebhookAdapter::new(&webhook_settings(true)).unwrap();
    let mut n = webhook_notification("req-6", &format!("http://{addr}/ok"));
    n.meta
        .headers
        .insert("X-Evil".into(), "a\r\nX-Injected: 1".into());
    assert_code(
        &adapter.send(&n, &content()).await.unwrap_err(),
        "invalid_header",
        false,
    );
    assert!(rec.paths().is_empty());
}

#[tokio::test]
async fn smtp_auth_when_credentials_set() {
    // smtp-sink announces AUTH and accepts any credentials.
    let sink = SmtpSink::start(&[]);
    let mut settings = sink.settings(1);
    settings.username = Some("herald".into());
    settings.password = Some(SecretString::from("s3cret-pw"));
    let adapter = SmtpAdapter::new(&settings).unwrap();
    assert!(!format!("{adapter:?}").contains("s3cret-pw"));
    adapter.check().await.unwrap();
    let n = email_notification("req-11", "x@example.com", Meta::default());
    adapter.send(&n, &content()).await.unwrap();
    sink.wait_for_dumps(1).await;
}
