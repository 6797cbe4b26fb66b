//! Provider adapters built from registry specs (`channels::build_provider`),
//! against real servers on 127.0.0.1: an axum server standing in for the
//! SendGrid, Twilio and FCM APIs (and Google's token endpoint), real
//! PostgreSQL for the in-app inbox, the services' smtp-sink for SMTP.
//!
//! Needs `scripts/services.sh start` (PostgreSQL, smtp-sink); reads
//! `HERALD_TEST_DATABASE_URL` and `HERALD_SMTP__PORT` as
//! `scripts/services.sh env` prints them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use herald::channels::{AdapterContext, ChannelAdapter, SendError, build_provider};
use herald::config::Settings;
use herald::domain::{
    Channel, Content, EmailAddress, InlineContent, Meta, Notification, PhoneNumber, Priority,
    Recipient,
};
use herald::render::RenderedContent;
use herald::routing::{ProviderSpec, ProviderType, RetryStrategy};
use herald::store::inbox::{InboxCursor, InboxStore, NewInboxMessage};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};

// ---------------------------------------------------------------- mock API server

/// One request the mock server received.
#[derive(Debug, Clone)]
struct Recorded {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }

    fn form(&self) -> BTreeMap<String, String> {
        serde_urlencoded::from_bytes(&self.body).expect("request body is a form")
    }
}

/// What the mock server answers.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    delay: Duration,
}

impl Reply {
    fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    fn json(status: u16, body: Value) -> Reply {
        Reply::status(status)
            .header("content-type", "application/json")
            .body(body.to_string())
    }

    fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn body(mut self, body: String) -> Reply {
        self.body = body;
        self
    }

    fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

type Responder = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// An HTTP server on 127.0.0.1 that records every request and answers
/// with the current responder.
#[derive(Clone)]
struct MockServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    responder: Arc<Mutex<Responder>>,
}

impl MockServer {
    async fn start(responder: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> MockServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = MockServer {
            addr: listener.local_addr().unwrap(),
            requests: Arc::default(),
            responder: Arc::new(Mutex::new(Arc::new(responder))),
        };
        async fn handle(
            State(s): State<MockServer>,
            method: Method,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> Response {
            let rec = Recorded {
                method,
                path: uri.path().to_string(),
                headers,
                body: body.to_vec(),
            };
            s.requests.lock().unwrap().push(rec.clone());
            let responder = s.responder.lock().unwrap().clone();
            let reply = responder(&rec);
            tokio::time::sleep(reply.delay).await;
            let mut response =
                (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
            for (k, v) in reply.headers {
                response.headers_mut().insert(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            response
        }
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(server.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        server
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn respond(&self, responder: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) {
        *self.responder.lock().unwrap() = Arc::new(responder);
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    fn clear(&self) {
        self.requests.lock().unwrap().clear();
    }
}

// ---------------------------------------------------------------- fixtures

const FROM_DEFAULT: &str = "Herald Test <noreply@herald.test>";

fn settings(extra: &[(&str, &str)]) -> Settings {
    let mut env: Vec<(String, String)> = vec![
        (
            "HERALD_WEBHOOK__SIGNING_SECRET".into(),
            "test-signing-secret".into(),
        ),
        ("HERALD_SMTP__DEFAULT_FROM".into(), FROM_DEFAULT.into()),
    ];
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v.to_string()));
    }
    Settings::load_with_env(None, env).expect("test settings")
}

fn ctx() -> AdapterContext {
    AdapterContext {
        settings: settings(&[]),
        pool: None,
    }
}

fn spec(name: &str, kind: ProviderType, config: Value, credentials: Value) -> ProviderSpec {
    ProviderSpec {
        name: name.into(),
        provider_type: kind,
        channel: kind.channel(),
        config,
        credentials: credentials.to_string().into(),
        priority: 10,
        is_default: false,
        active: true,
        retry_strategy: RetryStrategy::Exponential,
        max_retries: 3,
        rate_limit_per_second: None,
        rate_limit_per_minute: None,
        tenant_id: None,
    }
}

fn notification(id: &str, channel: Channel, recipient: Recipient, meta: Meta) -> Notification {
    Notification {
        id: id.into(),
        request_id: id.into(),
        tenant_id: Some("acme".into()),
        app_id: None,
        channel,
        recipient,
        content: Content::Inline(InlineContent::default()),
        priority: Priority::Normal,
        category: Some("orders".into()),
        scheduled_at: None,
        expires_at: None,
        meta,
        correlation_id: None,
    }
}

fn email(s: &str) -> EmailAddress {
    EmailAddress::parse(s).unwrap()
}

fn email_to(id: &str, to: &str) -> Notification {
    let recipient = Recipient {
        email: Some(email(to)),
        ..Default::default()
    };
    notification(id, Channel::Email, recipient, Meta::default())
}

fn sms_to(id: &str, phone: &str) -> Notification {
    let recipient = Recipient {
        phone: Some(PhoneNumber::parse(phone).unwrap()),
        ..Default::default()
    };
    notification(id, Channel::Sms, recipient, Meta::default())
}

fn push_to(id: &str, tokens: &[&str]) -> Notification {
    let recipient = Recipient {
        device_tokens: tokens.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    notification(id, Channel::Push, recipient, Meta::default())
}

fn content() -> RenderedContent {
    RenderedContent {
        subject: Some("Your order shipped".into()),
        text: Some("Plain text part".into()),
        html: Some("<p>HTML part</p>".into()),
        data: json!({"order": 42, "carrier": "UPS", "express": true, "items": [1, 2], "from": "x"}),
    }
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Asserts `e` is `RateLimited` with `retry_after`.
fn assert_rate_limited(e: &SendError, retry_after: Duration) {
    assert!(matches!(e, SendError::RateLimited { .. }), "{e:?}");
    assert_eq!(e.retry_after(), Some(retry_after), "{e:?}");
}

fn assert_permanent(e: &SendError, code: &str) {
    assert!(matches!(e, SendError::Permanent { .. }), "{e:?}");
    assert_eq!(e.code(), code, "{e:?}");
}

fn assert_retryable(e: &SendError, code: &str) {
    assert!(matches!(e, SendError::Retryable { .. }), "{e:?}");
    assert_eq!(e.code(), code, "{e:?}");
}

// ---------------------------------------------------------------- SendGrid

const SG_KEY: &str = "SG.test-key-do-not-log";

fn sendgrid(server: &MockServer, config: Value) -> Arc<dyn ChannelAdapter> {
    let mut config = config;
    config["base_url"] = json!(server.url());
    build_provider(
        &spec(
            "sg-main",
            ProviderType::Sendgrid,
            config,
            json!({"api_key": SG_KEY}),
        ),
        &ctx(),
    )
    .unwrap()
}

#[tokio::test]
async fn sendgrid_mail_send_request_has_the_documented_shape() {
    let server = MockServer::start(|_| Reply::status(202).header("x-message-id", "sg-msg-1")).await;
    let adapter = sendgrid(&server, json!({"from": "Shop <shop@example.com>"}));
    assert_eq!(adapter.provider(), "sg-main");
    assert_eq!(adapter.channel(), Channel::Email);

    let mut n = email_to("n-1", "alice@example.com");
    n.meta = Meta {
        reply_to: Some(email("help@example.com")),
        cc: vec![email("carol@example.com"), email("ALICE@example.com")],
        bcc: vec![email("audit@example.com")],
        headers: [("X-Campaign".to_string(), "fall".to_string())].into(),
        ..Default::default()
    };
    let receipt = adapter.send(&n, &content()).await.unwrap();
    assert_eq!(receipt.provider, "sg-main");
    assert_eq!(receipt.provider_message_id.as_deref(), Some("sg-msg-1"));

    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, Method::POST);
    assert_eq!(r.path, "/v3/mail/send");
    assert_eq!(
        r.header("authorization").unwrap(),
        format!("Bearer {SG_KEY}")
    );
    assert_eq!(r.header("content-type").unwrap(), "application/json");
    assert_eq!(
        r.json(),
        json!({
            "personalizations": [{
                "to": [{"email": "alice@example.com"}],
                // ALICE@ is the `to` address again: the API refuses duplicates.
                "cc": [{"email": "carol@example.com"}],
                "bcc": [{"email": "audit@example.com"}],
            }],
            "from": {"email": "shop@example.com", "name": "Shop"},
            "reply_to": {"email": "help@example.com"},
            "subject": "Your order shipped",
            "content": [
                {"type": "text/plain", "value": "Plain text part"},
                {"type": "text/html", "value": "<p>HTML part</p>"},
            ],
            "custom_args": {"notification_id": "n-1"},
            "headers": {"X-Campaign": "fall"},
        })
    );
}

#[tokio::test]
async fn sendgrid_defaults_sender_to_smtp_default_from_and_html_only_body() {
    let server = MockServer::start(|_| Reply::status(202)).await;
    let adapter = sendgrid(&server, json!({}));
    let mut n = email_to("n-2", "bob@example.com");
    n.meta.from = Some(email("override@example.com"));
    let html_only = RenderedContent {
        subject: None,
        text: None,
        html: Some("<b>hi</b>".into()),
        data: json!({}),
    };
    let receipt = adapter.send(&n, &html_only).await.unwrap();
    // No X-Message-Id header: no id, still a success.
    assert_eq!(receipt.provider_message_id, None);
    adapter
        .send(&email_to("n-3", "bob@example.com"), &content())
        .await
        .unwrap();

    let reqs = server.requests();
    let first = reqs[0].json();
    assert_eq!(first["from"], json!({"email": "override@example.com"}));
    assert_eq!(
        first["content"],
        json!([{"type": "text/html", "value": "<b>hi</b>"}])
    );
    assert!(first.get("subject").is_none());
    assert!(first.get("reply_to").is_none());
    assert_eq!(
        reqs[1].json()["from"],
        json!({"email": "noreply@herald.test", "name": "Herald Test"})
    );
}

#[tokio::test]
async fn sendgrid_status_mapping() {
    let server = MockServer::start(|_| Reply::status(202)).await;
    let adapter = sendgrid(&server, json!({}));
    let n = email_to("n-4", "alice@example.com");
    let errors = json!({"errors": [{"message": "The to email does not contain a valid address.", "field": "personalizations.0.to.0.email"}]});

    let cases: Vec<(Reply, &str)> = vec![
        (Reply::json(400, errors.clone()), "provider_rejected"),
        (Reply::json(413, json!({})), "provider_rejected"),
        (
            Reply::json(401, json!({"errors": [{"message": "bad key"}]})),
            "provider_auth",
        ),
        (Reply::status(403), "provider_auth"),
    ];
    for (reply, code) in cases {
        let status = reply.status;
        server.respond(move |_| reply.clone());
        let e = adapter.send(&n, &content()).await.unwrap_err();
        assert_permanent(&e, code);
        assert!(e.message().starts_with(&format!("HTTP {status}")), "{e:?}");
    }
    server.respond(move |_| Reply::json(400, errors.clone()));
    let e = adapter.send(&n, &content()).await.unwrap_err();
    assert!(
        e.message().contains(
            "personalizations.0.to.0.email: The to email does not contain a valid address."
        ),
        "{e:?}"
    );

    server.respond(|_| Reply::status(429).header("retry-after", "2"));
    let e = adapter.send(&n, &content()).await.unwrap_err();
    assert_rate_limited(&e, Duration::from_secs(2));

    // SendGrid's own rate-limit header: the reset time in unix seconds.
    let reset = (chrono::Utc::now().timestamp() + 20).to_string();
    server.respond(move |_| Reply::status(429).header("x-ratelimit-reset", &reset));
    let e = adapter.send(&n, &content()).await.unwrap_err();
    let wait = e.retry_after().unwrap();
    assert!(
        (Duration::from_secs(18)..=Duration::from_secs(20)).contains(&wait),
        "{wait:?}"
    );

    server.respond(|_| Reply::status(503));
    let e = adapter.send(&n, &content()).await.unwrap_err();
    assert_retryable(&e, "provider_unavailable");
    assert_eq!(e.retry_after(), None);
    server.respond(|_| Reply::status(500).header("retry-after", "7"));
    let e = adapter.send(&n, &content()).await.unwrap_err();
    assert_retryable(&e, "provider_unavailable");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    server.respond(|_| Reply::status(408));
    assert_retryable(
        &adapter.send(&n, &content()).await.unwrap_err(),
        "provider_unavailable",
    );

    // A redirect is not followed (it could carry the key elsewhere).
    server.respond(|_| Reply::status(307).header("location", "http://127.0.0.1:1/v3/mail/send"));
    assert_permanent(
        &adapter.send(&n, &content()).await.unwrap_err(),
        "provider_redirect",
    );
}

#[tokio::test]
async fn sendgrid_transport_failures_are_retryable() {
    let server = MockServer::start(|_| Reply::status(202).delay(Duration::from_secs(5))).await;
    let adapter = sendgrid(&server, json!({"timeout_ms": 300}));
    let n = email_to("n-5", "alice@example.com");
    assert_retryable(
        &adapter.send(&n, &content()).await.unwrap_err(),
        "provider_timeout",
    );

    // Nothing listens on the port of a dropped listener.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let adapter = build_provider(
        &spec(
            "sg-down",
            ProviderType::Sendgrid,
            json!({"base_url": format!("http://127.0.0.1:{port}")}),
            json!({"api_key": SG_KEY}),
        ),
        &ctx(),
    )
    .unwrap();
    let e = adapter.send(&n, &content()).await.unwrap_err();
    assert_retryable(&e, "provider_connect");
    assert!(!e.message().contains(SG_KEY));
}

#[tokio::test]
async fn sendgrid_check_reads_the_key_scopes() {
    let server =
        MockServer::start(|_| Reply::json(200, json!({"scopes": ["alerts.read", "mail.send"]})))
            .await;
    let adapter = sendgrid(&server, json!({}));
    adapter.check().await.unwrap();
    let r = &server.requests()[0];
    assert_eq!(r.method, Method::GET);
    assert_eq!(r.path, "/v3/scopes");
    assert_eq!(
        r.header("authorization").unwrap(),
        format!("Bearer {SG_KEY}")
    );

    server.respond(|_| Reply::json(200, json!({"scopes": ["alerts.read"]})));
    assert_permanent(&adapter.check().await.unwrap_err(), "provider_auth");
    server.respond(|_| {
        Reply::json(
            401,
            json!({"errors": [{"message": "authorization required"}]}),
        )
    });
    assert_permanent(&adapter.check().await.unwrap_err(), "provider_auth");
    server.respond(|_| Reply::status(403));
    assert_permanent(&adapter.check().await.unwrap_err(), "provider_auth");
    server.respond(|_| Reply::status(503));
    assert_retryable(&adapter.check().await.unwrap_err(), "provider_unavailable");
}

#[tokio::test]
async fn sendgrid_refuses_what_it_cannot_send() {
    let server = MockServer::start(|_| Reply::status(202)).await;
    let adapter = sendgrid(&server, json!({}));
    let no_address = notification("n-6", Channel::Email, Recipient::default(), Meta::default());
    assert_permanent(
        &adapter.send(&no_address, &content()).await.unwrap_err(),
        "no_address",
    );
    let empty = RenderedContent {
        subject: Some("s".into()),
        text: None,
        html: None,
        data: json!({}),
    };
    assert_permanent(
        &adapter
            .send(&email_to("n-7", "a@example.com"), &empty)
            .await
            .unwrap_err(),
        "empty_content",
    );
    let mut n = email_to("n-8", "a@example.com");
    n.meta.headers = [("Reply-To".to_string(), "x@evil.example".to_string())].into();
    assert_permanent(
        &adapter.send(&n, &content()).await.unwrap_err(),
        "invalid_header",
    );
    assert!(server.requests().is_empty());
}

// ---------------------------------------------------------------- Twilio

const TW_SID: &str = "AC0123456789abcdef0123456789abcdef";
const TW_TOKEN: &str = "twilio-auth-token-do-not-log";

fn twilio(
    server: &MockServer,
    config: Value,
    credentials: Value,
    ctx: &AdapterContext,
) -> Arc<dyn ChannelAdapter> {
    let mut config = config;
    config["base_url"] = json!(server.url());
    build_provider(
        &spec("tw-main", ProviderType::Twilio, config, credentials),
        ctx,
    )
    .unwrap()
}

#[tokio::test]
async fn twilio_messages_request_has_the_documented_shape() {
    let server = MockServer::start(|_| {
        Reply::json(
            201,
            json!({"sid": "SM0123456789abcdef0123456789abcdef", "status": "queued"}),
        )
    })
    .await;
    let ctx = AdapterContext {
        settings: settings(&[(
            "HERALD_RECEIPTS__PUBLIC_BASE_URL",
            "https://herald.example.com/",
        )]),
        pool: None,
    };
    let adapter = twilio(
        &server,
        json!({"from": "+15005550006"}),
        json!({"account_sid": TW_SID, "auth_token": TW_TOKEN}),
        &ctx,
    );
    assert_eq!(
        (adapter.provider(), adapter.channel()),
        ("tw-main", Channel::Sms)
    );

    let receipt = adapter
        .send(&sms_to("n-10", "+14155550123"), &content())
        .await
        .unwrap();
    assert_eq!(receipt.provider, "tw-main");
    assert_eq!(
        receipt.provider_message_id.as_deref(),
        Some("SM0123456789abcdef0123456789abcdef")
    );

    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, Method::POST);
    assert_eq!(
        r.path,
        format!("/2010-04-01/Accounts/{TW_SID}/Messages.json")
    );
    assert_eq!(r.header("authorization").unwrap(), basic(TW_SID, TW_TOKEN));
    assert_eq!(
        r.header("content-type").unwrap(),
        "application/x-www-form-urlencoded"
    );
    let form = r.form();
    let want: BTreeMap<String, String> = [
        ("To", "+14155550123"),
        ("From", "+15005550006"),
        ("Body", "Plain text part"),
        (
            "StatusCallback",
            "https://herald.example.com/webhooks/twilio",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(form, want);
}

#[tokio::test]
async fn twilio_api_key_and_messaging_service() {
    let server = MockServer::start(|_| Reply::json(201, json!({"sid": "SMx"}))).await;
    let adapter = twilio(
        &server,
        json!({"messaging_service_sid": "MG0123456789abcdef0123456789abcdef"}),
        json!({"account_sid": TW_SID, "api_key_sid": "SK0123", "api_key_secret": "key-secret"}),
        &ctx(),
    );
    adapter
        .send(&sms_to("n-11", "+14155550123"), &content())
        .await
        .unwrap();
    let r = &server.requests()[0];
    assert_eq!(
        r.path,
        format!("/2010-04-01/Accounts/{TW_SID}/Messages.json")
    );
    assert_eq!(
        r.header("authorization").unwrap(),
        basic("SK0123", "key-secret")
    );
    let form = r.form();
    assert_eq!(
        form.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["Body", "MessagingServiceSid", "To"],
        "no From and no StatusCallback without a public base URL"
    );
    assert_eq!(
        form["MessagingServiceSid"],
        "MG0123456789abcdef0123456789abcdef"
    );
}

#[tokio::test]
async fn twilio_status_mapping_and_check() {
    let server = MockServer::start(|_| Reply::status(201)).await;
    let adapter = twilio(
        &server,
        json!({"from": "+15005550006"}),
        json!({"account_sid": TW_SID, "auth_token": TW_TOKEN}),
        &ctx(),
    );
    let n = sms_to("n-12", "+14155550123");
    for (code, want) in [(21211, "twilio_21211"), (21610, "twilio_21610")] {
        server.respond(move |_| {
            Reply::json(
                400,
                json!({"code": code, "message": "The 'To' number is not valid.", "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": 400}),
            )
        });
        let e = adapter.send(&n, &content()).await.unwrap_err();
        assert_permanent(&e, want);
        assert!(
            e.message().contains(&format!(
                "The 'To' number is not valid. (Twilio error {code})"
            )),
            "{e:?}"
        );
    }
    server.respond(|_| Reply::json(400, json!({"message": "no code"})));
    assert_permanent(
        &adapter.send(&n, &content()).await.unwrap_err(),
        "provider_rejected",
    );
    server.respond(|_| {
        Reply::json(
            401,
            json!({"code": 20003, "message": "Authenticate", "status": 401}),
        )
    });
    assert_permanent(
        &adapter.send(&n, &content()).await.unwrap_err(),
        "provider_auth",
    );
    server.respond(|_| Reply::status(403));
    assert_permanent(
        &adapter.send(&n, &content()).await.unwrap_err(),
        "provider_auth",
    );
    server.respond(|_| {
        Reply::json(429, json!({"code": 20429, "message": "Too Many Requests"}))
            .header("retry-after", "2")
    });
    assert_rate_limited(
        &adapter.send(&n, &content()).await.unwrap_err(),
        Duration::from_secs(2),
    );
    server.respond(|_| Reply::status(503));
    assert_retryable(
        &adapter.send(&n, &content()).await.unwrap_err(),
        "provider_unavailable",
    );

    // No phone number: refused before any request.
    server.clear();
    let no_phone = notification("n-13", Channel::Sms, Recipient::default(), Meta::default());
    assert_permanent(
        &adapter.send(&no_phone, &content()).await.unwrap_err(),
        "no_address",
    );
    assert!(server.requests().is_empty());

    server.respond(|_| Reply::json(200, json!({"sid": TW_SID, "status": "active"})));
    adapter.check().await.unwrap();
    let r = &server.requests()[0];
    assert_eq!(r.method, Method::GET);
    assert_eq!(r.path, format!("/2010-04-01/Accounts/{TW_SID}.json"));
    assert_eq!(r.header("authorization").unwrap(), basic(TW_SID, TW_TOKEN));
    server.respond(|_| Reply::json(401, json!({"code": 20003, "message": "Authenticate"})));
    assert_permanent(&adapter.check().await.unwrap_err(), "provider_auth");
}

// ---------------------------------------------------------------- FCM

const FCM_KEY: &str = include_str!("fixtures/fcm-test-key.pem");
const FCM_PUBLIC_KEY: &str = include_str!("fixtures/fcm-test-key.pub.pem");
const OTHER_KEY: &str = include_str!("fixtures/fcm-other-key.pem");
const CLIENT_EMAIL: &str = "herald@test-project.iam.gserviceaccount.com";
const SEND_PATH: &str = "/v1/projects/test-project/messages:send";
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// A local Google token endpoint plus FCM: the token endpoint verifies the
/// JWT's signature with the public key, its claims and the grant type, and
/// hands out `tok-1`, `tok-2`, …; FCM accepts the tokens `accept` says yes
/// to and answers per device token by its prefix.
struct FakeGoogle {
    server: MockServer,
    minted: Arc<AtomicUsize>,
}

fn verify_assertion(form: &BTreeMap<String, String>, token_uri: &str) -> Result<Value, String> {
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return Err(format!("grant_type {:?}", form.get("grant_type")));
    }
    let assertion = form.get("assertion").ok_or("no assertion")?;
    let header = jsonwebtoken::decode_header(assertion).map_err(|e| e.to_string())?;
    if header.alg != jsonwebtoken::Algorithm::RS256 || header.kid.as_deref() != Some("kid-1") {
        return Err(format!("header {header:?}"));
    }
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(FCM_PUBLIC_KEY.as_bytes()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[token_uri]);
    validation.set_issuer(&[CLIENT_EMAIL]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    let data = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
        .map_err(|e| format!("assertion refused: {e}"))?;
    let c = data.claims;
    if c["scope"] != SCOPE {
        return Err(format!("scope {}", c["scope"]));
    }
    let (iat, exp) = (c["iat"].as_i64().unwrap(), c["exp"].as_i64().unwrap());
    let now = chrono::Utc::now().timestamp();
    if exp - iat != 3600 || (now - iat).abs() > 60 {
        return Err(format!("iat {iat} exp {exp} now {now}"));
    }
    Ok(c)
}

impl FakeGoogle {
    async fn start(
        expires_in: u64,
        accept: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> FakeGoogle {
        let minted = Arc::new(AtomicUsize::new(0));
        let server = MockServer::start(|_| Reply::status(500)).await;
        let token_uri = format!("{}/token", server.url());
        let m = minted.clone();
        server.respond(move |r| {
            if r.path == "/token" {
                assert_eq!(r.method, Method::POST);
                assert_eq!(
                    r.header("content-type").as_deref(),
                    Some("application/x-www-form-urlencoded")
                );
                return match verify_assertion(&r.form(), &token_uri) {
                    Ok(_) => {
                        let n = m.fetch_add(1, Ordering::SeqCst) + 1;
                        Reply::json(
                            200,
                            json!({"access_token": format!("tok-{n}"), "expires_in": expires_in, "token_type": "Bearer"}),
                        )
                    }
                    Err(why) => Reply::json(
                        400,
                        json!({"error": "invalid_grant", "error_description": why}),
                    ),
                };
            }
            if r.path != SEND_PATH || r.method != Method::POST {
                return Reply::status(404);
            }
            let bearer = r.header("authorization").unwrap_or_default();
            let Some(tok) = bearer.strip_prefix("Bearer ") else {
                return Reply::status(401);
            };
            if !accept(tok) {
                return fcm_error(401, "UNAUTHENTICATED", None);
            }
            let device = r.json()["message"]["token"].as_str().unwrap().to_string();
            match device.split('-').next().unwrap() {
                "gone" => fcm_error(404, "NOT_FOUND", Some("UNREGISTERED")),
                "bad" => fcm_error(400, "INVALID_ARGUMENT", Some("INVALID_ARGUMENT")),
                "busy" => fcm_error(503, "UNAVAILABLE", Some("UNAVAILABLE")),
                "apns" => fcm_error(401, "UNAUTHENTICATED", Some("THIRD_PARTY_AUTH_ERROR")),
                "slow" => fcm_error(429, "RESOURCE_EXHAUSTED", Some("QUOTA_EXCEEDED"))
                    .header("retry-after", "2"),
                _ => Reply::json(
                    200,
                    json!({"name": format!("projects/test-project/messages/{device}")}),
                ),
            }
        });
        FakeGoogle { server, minted }
    }

    fn credentials(&self, private_key: &str) -> Value {
        json!({
            "type": "service_account",
            "project_id": "test-project",
            "private_key_id": "kid-1",
            "private_key": private_key,
            "client_email": CLIENT_EMAIL,
            "client_id": "1234567890",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": format!("{}/token", self.server.url()),
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/herald",
            "universe_domain": "googleapis.com",
        })
    }

    fn adapter(&self) -> Arc<dyn ChannelAdapter> {
        self.adapter_with_key(FCM_KEY)
    }

    fn adapter_with_key(&self, key: &str) -> Arc<dyn ChannelAdapter> {
        build_provider(
            &spec(
                "fcm-main",
                ProviderType::Fcm,
                json!({"base_url": self.server.url()}),
                self.credentials(key),
            ),
            &ctx(),
        )
        .unwrap()
    }

    fn minted(&self) -> usize {
        self.minted.load(Ordering::SeqCst)
    }

    fn sends(&self) -> Vec<Recorded> {
        self.server.requests_to(SEND_PATH)
    }
}

fn fcm_error(status: u16, rpc_status: &str, error_code: Option<&str>) -> Reply {
    let details = match error_code {
        Some(c) => {
            json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": c}])
        }
        None => json!([]),
    };
    Reply::json(
        status,
        json!({"error": {"code": status, "message": format!("{rpc_status} from the fake"), "status": rpc_status, "details": details}}),
    )
}

#[tokio::test]
async fn fcm_mints_one_token_and_sends_the_documented_message_per_device() {
    let google = FakeGoogle::start(3600, |_| true).await;
    let adapter = google.adapter();
    assert_eq!(
        (adapter.provider(), adapter.channel()),
        ("fcm-main", Channel::Push)
    );

    let n = push_to("n-20", &["dev-a", "dev-b"]);
    let receipt = adapter.send(&n, &content()).await.unwrap();
    assert_eq!(receipt.provider, "fcm-main");
    assert_eq!(
        receipt.provider_message_id.as_deref(),
        Some("projects/test-project/messages/dev-a,projects/test-project/messages/dev-b")
    );
    // Two more sends (one concurrent pair) reuse the cached token.
    let (c, d) = (push_to("n-21", &["dev-c"]), push_to("n-22", &["dev-d"]));
    let rendered = content();
    let (a, b) = tokio::join!(adapter.send(&c, &rendered), adapter.send(&d, &rendered));
    a.unwrap();
    b.unwrap();
    assert_eq!(google.minted(), 1, "one token request for several sends");

    let token_reqs = google.server.requests_to("/token");
    assert_eq!(token_reqs.len(), 1);
    let claims = verify_assertion(
        &token_reqs[0].form(),
        &format!("{}/token", google.server.url()),
    )
    .unwrap();
    assert_eq!(claims["iss"], CLIENT_EMAIL);
    assert_eq!(claims["scope"], SCOPE);

    let sends = google.sends();
    assert_eq!(sends.len(), 4);
    let mut devices = Vec::new();
    for r in &sends {
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.header("authorization").as_deref(), Some("Bearer tok-1"));
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        devices.push(r.json()["message"]["token"].as_str().unwrap().to_string());
    }
    devices.sort();
    assert_eq!(devices, ["dev-a", "dev-b", "dev-c", "dev-d"]);
    let first = sends
        .iter()
        .find(|r| r.json()["message"]["token"] == "dev-a")
        .unwrap();
    assert_eq!(
        first.json(),
        json!({"message": {
            "token": "dev-a",
            "notification": {"title": "Your order shipped", "body": "Plain text part"},
            // String values only; `from` is reserved by FCM; arrays are left out.
            "data": {"notification_id": "n-20", "order": "42", "carrier": "UPS", "express": "true"},
        }})
    );
}

#[tokio::test]
async fn fcm_refreshes_the_token_once_on_401() {
    // FCM refuses the first token it sees (say it was revoked).
    let google = FakeGoogle::start(3600, |tok| tok != "tok-1").await;
    let adapter = google.adapter();
    adapter
        .send(&push_to("n-30", &["dev-a"]), &content())
        .await
        .unwrap();
    assert_eq!(google.minted(), 2);
    let auth: Vec<String> = google
        .sends()
        .iter()
        .map(|r| r.header("authorization").unwrap())
        .collect();
    assert_eq!(auth, ["Bearer tok-1", "Bearer tok-2"]);
    // The new token is cached.
    adapter
        .send(&push_to("n-31", &["dev-b"]), &content())
        .await
        .unwrap();
    assert_eq!(google.minted(), 2);

    // A 401 that a fresh token does not cure: one retry, then permanent.
    let google = FakeGoogle::start(3600, |_| false).await;
    let adapter = google.adapter();
    let e = adapter
        .send(&push_to("n-32", &["dev-a"]), &content())
        .await
        .unwrap_err();
    assert_permanent(&e, "provider_auth");
    assert_eq!(google.minted(), 2);
    assert_eq!(google.sends().len(), 2);
}

#[tokio::test]
async fn fcm_token_is_replaced_a_minute_before_it_expires() {
    // expires_in 30 s is inside the 60 s margin: every send mints anew.
    let google = FakeGoogle::start(30, |_| true).await;
    let adapter = google.adapter();
    for i in 0..3 {
        adapter
            .send(&push_to(&format!("n-4{i}"), &["dev-a"]), &content())
            .await
            .unwrap();
    }
    assert_eq!(google.minted(), 3);
}

#[tokio::test]
async fn fcm_combines_per_device_results() {
    let google = FakeGoogle::start(3600, |_| true).await;
    let adapter = google.adapter();

    // Partial success is a success naming the accepted message only.
    let r = adapter
        .send(&push_to("n-50", &["gone-1", "dev-ok", "bad-1"]), &content())
        .await
        .unwrap();
    assert_eq!(
        r.provider_message_id.as_deref(),
        Some("projects/test-project/messages/dev-ok")
    );

    let send = |tokens: &'static [&'static str]| {
        let adapter = adapter.clone();
        async move {
            adapter
                .send(&push_to("n-51", tokens), &content())
                .await
                .unwrap_err()
        }
    };
    assert_permanent(&send(&["gone-1"]).await, "fcm_unregistered");
    assert_permanent(&send(&["bad-1"]).await, "fcm_invalid_argument");
    assert_permanent(&send(&["gone-1", "bad-1"]).await, "fcm_unregistered");
    assert_retryable(&send(&["gone-1", "busy-1"]).await, "provider_unavailable");
    assert_retryable(&send(&["busy-1"]).await, "provider_unavailable");
    assert_rate_limited(&send(&["slow-1"]).await, Duration::from_secs(2));
    // The app's APNs credentials are wrong: permanent, and our access token
    // is not the problem (no new token minted).
    assert_permanent(&send(&["apns-1"]).await, "fcm_third_party_auth");
    let e = send(&["gone-1"]).await;
    assert!(e.message().contains("UNREGISTERED"), "{e:?}");

    let no_tokens = notification("n-52", Channel::Push, Recipient::default(), Meta::default());
    assert_permanent(
        &adapter.send(&no_tokens, &content()).await.unwrap_err(),
        "no_address",
    );
    assert_eq!(google.minted(), 1);
}

#[tokio::test]
async fn fcm_check_mints_a_token_and_a_wrong_key_is_an_auth_failure() {
    let google = FakeGoogle::start(3600, |_| true).await;
    google.adapter().check().await.unwrap();
    assert_eq!(google.minted(), 1);
    assert!(google.sends().is_empty());

    // Signed with a key the token endpoint does not know: refused.
    let adapter = google.adapter_with_key(OTHER_KEY);
    let e = adapter.check().await.unwrap_err();
    assert_permanent(&e, "provider_auth");
    assert!(e.message().contains("invalid_grant"), "{e:?}");
    let e = adapter
        .send(&push_to("n-60", &["dev-a"]), &content())
        .await
        .unwrap_err();
    assert_permanent(&e, "provider_auth");
    assert!(google.sends().is_empty());
    assert_eq!(google.minted(), 1);

    // The token endpoint down: retryable.
    let google = FakeGoogle::start(3600, |_| true).await;
    let adapter = google.adapter();
    google
        .server
        .respond(|_| Reply::status(503).header("retry-after", "4"));
    let e = adapter.check().await.unwrap_err();
    assert_retryable(&e, "provider_unavailable");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(4)));
}

// ---------------------------------------------------------------- inbox

fn admin_database_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/postgres".into())
}

/// A fresh, migrated database for one test.
async fn test_pool() -> PgPool {
    let admin = admin_database_url();
    let name = format!(
        "herald_providers_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut conn = PgConnection::connect(&admin)
        .await
        .expect("connect to the admin database (is PostgreSQL running? scripts/services.sh start)");
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .unwrap();
    let url = format!("{}/{name}", &admin[..admin.rfind('/').unwrap()]);
    let pool = PgPool::connect(&url).await.unwrap();
    sqlx::migrate!().run(&pool).await.unwrap();
    pool
}

/// `id, tenant_id, user_id, title, body, data, category` of `inbox_messages`.
type InboxRow = (
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    Value,
    Option<String>,
);

fn in_app_to(id: &str, user: Option<&str>) -> Notification {
    let recipient = Recipient {
        user_id: user.map(str::to_string),
        ..Default::default()
    };
    notification(id, Channel::InApp, recipient, Meta::default())
}

#[tokio::test]
async fn inbox_send_is_idempotent_by_notification_id() {
    let pool = test_pool().await;
    let ctx = AdapterContext {
        settings: settings(&[]),
        pool: Some(pool.clone()),
    };
    let adapter = build_provider(
        &spec("inbox", ProviderType::Inbox, json!({}), json!({})),
        &ctx,
    )
    .unwrap();
    assert_eq!(
        (adapter.provider(), adapter.channel()),
        ("inbox", Channel::InApp)
    );

    let n = in_app_to("n-70", Some("user-1"));
    let first = adapter.send(&n, &content()).await.unwrap();
    let again = adapter.send(&n, &content()).await.unwrap();
    assert_eq!(first.provider, "inbox");
    assert!(first.provider_message_id.is_some());
    assert_eq!(first.provider_message_id, again.provider_message_id);
    let other = adapter
        .send(&in_app_to("n-71", Some("user-1")), &content())
        .await
        .unwrap();
    assert_ne!(other.provider_message_id, first.provider_message_id);

    let rows: Vec<InboxRow> = sqlx::query_as(
        "SELECT id, tenant_id, user_id, title, body, data, category \
             FROM inbox_messages WHERE notification_id = 'n-70'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    let (id, tenant, user, title, body, data, category) = rows[0].clone();
    assert_eq!(Some(id.to_string()), first.provider_message_id);
    assert_eq!((tenant.as_str(), user.as_str()), ("acme", "user-1"));
    assert_eq!(title.as_deref(), Some("Your order shipped"));
    assert_eq!(body.as_deref(), Some("Plain text part"));
    assert_eq!(data, content().data);
    assert_eq!(category.as_deref(), Some("orders"));

    let e = adapter
        .send(&in_app_to("n-72", None), &content())
        .await
        .unwrap_err();
    assert_permanent(&e, "no_address");

    // The database gone: retryable.
    pool.close().await;
    let e = adapter
        .send(&in_app_to("n-73", Some("user-1")), &content())
        .await
        .unwrap_err();
    assert_retryable(&e, "inbox_store");
}

fn message(tenant: Option<&str>, user: &str, id: &str) -> NewInboxMessage {
    NewInboxMessage {
        tenant_id: tenant.map(str::to_string),
        user_id: user.into(),
        notification_id: id.into(),
        title: Some(format!("title {id}")),
        body: None,
        data: json!({"n": id}),
        category: None,
    }
}

#[tokio::test]
async fn inbox_store_lists_pages_counts_and_marks_read() {
    let pool = test_pool().await;
    let store = InboxStore::new(pool.clone());
    let mut ids = Vec::new();
    for i in 0..5 {
        let ins = store
            .insert(&message(Some("acme"), "u1", &format!("m-{i}")))
            .await
            .unwrap();
        assert!(ins.created);
        ids.push(ins.id);
    }
    let dup = store
        .insert(&message(Some("acme"), "u1", "m-2"))
        .await
        .unwrap();
    assert_eq!((dup.id, dup.created), (ids[2], false));
    let other_user = store
        .insert(&message(Some("acme"), "u2", "x-1"))
        .await
        .unwrap();
    store.insert(&message(None, "u1", "y-1")).await.unwrap();
    store
        .insert(&message(Some("globex"), "u1", "z-1"))
        .await
        .unwrap();

    // Newest first, in pages of 2, the cursor surviving a round trip as text.
    let mut seen = Vec::new();
    let mut cursor: Option<InboxCursor> = None;
    let mut pages = 0;
    loop {
        let page = store
            .list(Some("acme"), "u1", false, 2, cursor.as_ref())
            .await
            .unwrap();
        pages += 1;
        assert!(page.messages.len() <= 2);
        seen.extend(page.messages.iter().map(|m| m.notification_id.clone()));
        match page.next {
            Some(c) => cursor = Some(InboxCursor::parse(&c.encode()).unwrap()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["m-4", "m-3", "m-2", "m-1", "m-0"]);

    let no_tenant = store.list(None, "u1", false, 50, None).await.unwrap();
    assert_eq!(no_tenant.messages.len(), 1);
    assert_eq!(no_tenant.messages[0].notification_id, "y-1");
    assert_eq!(no_tenant.messages[0].tenant_id, None);
    assert_eq!(no_tenant.messages[0].data, json!({"n": "y-1"}));

    assert_eq!(store.unread_count(Some("acme"), "u1").await.unwrap(), 5);
    // Someone else's message id is ignored.
    let marked = store
        .mark_read(Some("acme"), "u1", &[ids[0], ids[3], other_user.id])
        .await
        .unwrap();
    assert_eq!(marked, 2);
    assert_eq!(
        store
            .mark_read(Some("acme"), "u1", &[ids[0]])
            .await
            .unwrap(),
        0,
        "already read"
    );
    assert_eq!(store.unread_count(Some("acme"), "u1").await.unwrap(), 3);
    assert_eq!(store.unread_count(Some("acme"), "u2").await.unwrap(), 1);

    let unread = store
        .list(Some("acme"), "u1", true, 50, None)
        .await
        .unwrap();
    let names: Vec<&str> = unread
        .messages
        .iter()
        .map(|m| m.notification_id.as_str())
        .collect();
    assert_eq!(names, ["m-4", "m-2", "m-1"]);
    assert!(unread.messages.iter().all(|m| m.read_at.is_none()));
    let all = store
        .list(Some("acme"), "u1", false, 50, None)
        .await
        .unwrap();
    assert!(
        all.messages
            .iter()
            .find(|m| m.id == ids[3])
            .unwrap()
            .read_at
            .is_some()
    );
    assert_eq!(all.next, None);

    assert_eq!(store.mark_all_read(Some("acme"), "u1").await.unwrap(), 3);
    assert_eq!(store.unread_count(Some("acme"), "u1").await.unwrap(), 0);
    assert_eq!(store.unread_count(None, "u1").await.unwrap(), 1);
    assert_eq!(store.unread_count(Some("globex"), "u1").await.unwrap(), 1);
    assert_eq!(store.unread_count(Some("acme"), "u2").await.unwrap(), 1);
}

// ---------------------------------------------------------------- build_provider

fn build_error(spec: &ProviderSpec, ctx: &AdapterContext) -> String {
    match build_provider(spec, ctx) {
        Ok(_) => panic!("{} should not build", spec.name),
        Err(e) => {
            let text = format!("{e} {e:?}");
            text
        }
    }
}

#[tokio::test]
async fn build_provider_errors_name_the_field() {
    let ctx = ctx();
    let sg = |config: Value, creds: Value| spec("sg", ProviderType::Sendgrid, config, creds);
    let key = json!({"api_key": "k"});
    for (s, want) in [
        (
            sg(json!({"timeout_ms": "soon"}), key.clone()),
            "config.timeout_ms",
        ),
        (
            sg(json!({"timeout_ms": 0}), key.clone()),
            "config.timeout_ms",
        ),
        (
            sg(json!({"base_uri": "http://x"}), key.clone()),
            "unknown field `base_uri`",
        ),
        (
            sg(json!({"base_url": "ftp://x"}), key.clone()),
            "config.base_url",
        ),
        (
            sg(json!({"from": "not an address"}), key.clone()),
            "config.from",
        ),
        (sg(json!({}), json!({})), "missing field `api_key`"),
        (
            sg(json!({}), json!({"api_key": "k", "extra": 1})),
            "unknown field `extra`",
        ),
        (
            spec(
                "tw",
                ProviderType::Twilio,
                json!({}),
                json!({"account_sid": "AC1", "auth_token": "t"}),
            ),
            "`from` or `messaging_service_sid`",
        ),
        (
            spec(
                "tw",
                ProviderType::Twilio,
                json!({"from": "+15005550006"}),
                json!({"account_sid": "AC1/../x", "auth_token": "t"}),
            ),
            "credentials.account_sid",
        ),
        (
            spec(
                "tw",
                ProviderType::Twilio,
                json!({"from": "+15005550006"}),
                json!({"account_sid": "AC1", "api_key_sid": "SK1"}),
            ),
            "api_key_secret",
        ),
        (
            spec(
                "fcm",
                ProviderType::Fcm,
                json!({}),
                json!({"client_email": "a@b", "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "project_id": "p"}),
            ),
            "credentials.private_key",
        ),
        (
            spec(
                "fcm",
                ProviderType::Fcm,
                json!({}),
                json!({"client_email": "a@b", "private_key": FCM_KEY}),
            ),
            "config.project_id",
        ),
        (
            spec(
                "fcm",
                ProviderType::Fcm,
                json!({"project_id": "Bad/Project"}),
                json!({"client_email": "a@b", "private_key": FCM_KEY}),
            ),
            "config.project_id",
        ),
        (
            spec("smtp", ProviderType::Smtp, json!({"port": "25"}), json!({})),
            "config.port",
        ),
        (
            spec(
                "smtp",
                ProviderType::Smtp,
                json!({"username": "u"}),
                json!({}),
            ),
            "credentials.password",
        ),
        (
            spec(
                "hook",
                ProviderType::Webhook,
                json!({"allow_private_targets": true}),
                json!({}),
            ),
            "config.allow_private_targets",
        ),
        (
            spec(
                "hook",
                ProviderType::Webhook,
                json!({}),
                json!({"signing_secret": ""}),
            ),
            "credentials.signing_secret",
        ),
        (
            spec("inbox", ProviderType::Inbox, json!({}), json!({})),
            "needs the database",
        ),
        (
            spec(
                "inbox",
                ProviderType::Inbox,
                json!({"table": "x"}),
                json!({}),
            ),
            "unknown field `table`",
        ),
    ] {
        let e = build_error(&s, &ctx);
        assert!(e.contains(want), "{}: want {want:?} in {e}", s.name);
        assert!(e.starts_with(&format!("provider {}:", s.name)), "{e}");
    }

    let mut mismatched = sg(json!({}), key);
    mismatched.channel = Channel::Sms;
    assert!(build_error(&mismatched, &ctx).contains("delivers email, not sms"));
}

#[tokio::test]
async fn credentials_never_appear_in_errors_or_debug() {
    let ctx = ctx();
    let secret = "SUPER-SECRET-VALUE-42";
    let cases = [
        spec(
            "sg",
            ProviderType::Sendgrid,
            json!({"from": "bad"}),
            json!({"api_key": secret}),
        ),
        spec(
            "sg",
            ProviderType::Sendgrid,
            json!({}),
            json!({"api_key": [secret]}),
        ),
        spec(
            "sg",
            ProviderType::Sendgrid,
            json!({}),
            json!({"api_key": secret, "note": secret}),
        ),
        spec(
            "tw",
            ProviderType::Twilio,
            json!({}),
            json!({"account_sid": "AC1", "auth_token": secret}),
        ),
        spec(
            "tw",
            ProviderType::Twilio,
            json!({"from": "+1"}),
            json!({"account_sid": "AC1", "auth_token": 42, "x": secret}),
        ),
        spec(
            "fcm",
            ProviderType::Fcm,
            json!({}),
            json!({"client_email": "a@b", "project_id": "p", "private_key": secret}),
        ),
        spec(
            "smtp",
            ProviderType::Smtp,
            json!({"username": 5}),
            json!({"password": secret}),
        ),
        spec(
            "smtp",
            ProviderType::Smtp,
            json!({}),
            json!({"password": {"v": secret}}),
        ),
        spec(
            "hook",
            ProviderType::Webhook,
            json!({}),
            json!({"signing_secret": format!("whsec_{secret}!")}),
        ),
    ];
    for s in &cases {
        let e = build_error(s, &ctx);
        assert!(!e.contains(secret), "{}: {e}", s.name);
        assert!(!format!("{s:?}").contains(secret));
    }
    // Not JSON at all.
    let mut s = spec("sg", ProviderType::Sendgrid, json!({}), json!({}));
    s.credentials = format!("{{\"api_key\": \"{secret}\"").into();
    let e = build_error(&s, &ctx);
    assert!(e.contains("not valid JSON") && !e.contains(secret), "{e}");

    // Adapters that build keep their secrets out of Debug too.
    let sg = herald::channels::sendgrid::SendgridAdapter::from_spec(
        &spec(
            "sg",
            ProviderType::Sendgrid,
            json!({}),
            json!({"api_key": secret}),
        ),
        &ctx,
    )
    .unwrap();
    let tw = herald::channels::twilio::TwilioAdapter::from_spec(
        &spec(
            "tw",
            ProviderType::Twilio,
            json!({"from": "+15005550006"}),
            json!({"account_sid": "AC1", "auth_token": secret}),
        ),
        &ctx,
    )
    .unwrap();
    let fcm = herald::channels::fcm::FcmAdapter::from_spec(
        &spec("fcm", ProviderType::Fcm, json!({}), json!({"client_email": "a@b", "project_id": "p", "private_key": FCM_KEY, "private_key_id": secret})),
        &ctx,
    )
    .unwrap();
    let smtp = herald::channels::smtp::SmtpAdapter::from_spec(
        &spec(
            "smtp",
            ProviderType::Smtp,
            json!({"username": "u"}),
            json!({"password": secret}),
        ),
        &ctx,
    )
    .unwrap();
    for debug in [
        format!("{sg:?}"),
        format!("{tw:?}"),
        format!("{fcm:?}"),
        format!("{smtp:?}"),
    ] {
        assert!(!debug.contains(secret), "{debug}");
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
    }
}

#[tokio::test]
async fn smtp_from_registry_sends_under_its_own_name_and_keeps_the_relay_login_home() {
    let port: u16 = std::env::var("HERALD_SMTP__PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(2525);
    let ctx = ctx();
    let adapter = build_provider(
        &spec(
            "relay-b",
            ProviderType::Smtp,
            json!({"host": "127.0.0.1", "port": port, "tls": "none", "default_from": "B <b@herald.test>", "pool_size": 2, "timeout_ms": 5000, "hello_name": "b.herald.test"}),
            json!({}),
        ),
        &ctx,
    )
    .unwrap();
    assert_eq!(
        (adapter.provider(), adapter.channel()),
        ("relay-b", Channel::Email)
    );
    let receipt = adapter
        .send(&email_to("n-80", "carol@example.com"), &content())
        .await
        .expect("send through the services' smtp-sink (scripts/services.sh start)");
    assert_eq!(receipt.provider, "relay-b");
    adapter.check().await.unwrap();

    // The built-in relay's login goes only to the same relay.
    let with_login = AdapterContext {
        settings: settings(&[
            ("HERALD_SMTP__USERNAME", "builtin-user"),
            ("HERALD_SMTP__PASSWORD", "builtin-pass"),
        ]),
        pool: None,
    };
    let same = herald::channels::smtp::SmtpAdapter::from_spec(
        &spec("same", ProviderType::Smtp, json!({}), json!({})),
        &with_login,
    )
    .unwrap();
    assert!(format!("{same:?}").contains("auth: true"), "{same:?}");
    let elsewhere = herald::channels::smtp::SmtpAdapter::from_spec(
        &spec(
            "elsewhere",
            ProviderType::Smtp,
            json!({"host": "smtp.other.example"}),
            json!({}),
        ),
        &with_login,
    )
    .unwrap();
    assert!(
        format!("{elsewhere:?}").contains("auth: false"),
        "{elsewhere:?}"
    );
}

#[tokio::test]
async fn webhook_from_registry_takes_private_target_policy_from_settings_only() {
    let server = MockServer::start(|_| Reply::status(204)).await;
    let recipient = Recipient {
        url: Some(herald::domain::WebhookUrl::parse(&format!("{}/hook", server.url())).unwrap()),
        ..Default::default()
    };
    let n = notification("n-90", Channel::Webhook, recipient, Meta::default());
    let hook_spec = spec(
        "hook-b",
        ProviderType::Webhook,
        json!({"timeout_ms": 2000}),
        json!({"signing_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}),
    );

    // herald.toml says no private targets: 127.0.0.1 is refused.
    let strict = build_provider(&hook_spec, &ctx()).unwrap();
    assert_permanent(
        &strict.send(&n, &content()).await.unwrap_err(),
        "address_not_allowed",
    );
    assert!(server.requests().is_empty());

    let lax = AdapterContext {
        settings: settings(&[("HERALD_WEBHOOK__ALLOW_PRIVATE_TARGETS", "true")]),
        pool: None,
    };
    let adapter = build_provider(&hook_spec, &lax).unwrap();
    let receipt = adapter.send(&n, &content()).await.unwrap();
    assert_eq!(receipt.provider, "hook-b");
    // Signed with the row's secret, not herald.toml's.
    let r = &server.requests()[0];
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, v) in &r.headers {
        headers.insert(k.clone(), v.clone());
    }
    assert!(herald::channels::webhook::verify(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        &headers,
        &r.body
    ));
    assert!(!herald::channels::webhook::verify(
        "test-signing-secret",
        &headers,
        &r.body
    ));
}
