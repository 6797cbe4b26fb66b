//! Provider channels end to end: providers registered in PostgreSQL, a
//! request produced on the request topic, Herald (in this process or as a
//! separate `herald serve`) sending through real local HTTP servers standing
//! in for SendGrid, Twilio, FCM (and Google's token endpoint) or writing the
//! in-app inbox, the outcome event read back from the outcome topic, and
//! delivery receipts POSTed to Herald's HTTP port.
//!
//! The stand-ins check what the real APIs check (path, method, auth header,
//! body encoding), answer as the real APIs answer, and record every call so
//! the tests can look at the exact request Herald made.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use secrecy::SecretString;
use serde_json::{Value, json};

use herald::domain::validate_delivery_status;
use herald::http::api::auth::{self, Role};
use herald::routing::ProviderType;
use herald::routing::store::NewProvider;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------- stand-in server

/// One request a stand-in received.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
    /// What the stand-in answered: status, headers, body.
    answer: (u16, Vec<(String, String)>, String),
}

impl Call {
    /// A header of the stand-in's answer.
    fn answer_header(&self, name: &str) -> Option<String> {
        self.answer
            .1
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    /// The stand-in's answer body as JSON.
    fn answer_json(&self) -> Value {
        serde_json::from_str(&self.answer.2).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn form(&self) -> BTreeMap<String, String> {
        serde_urlencoded::from_bytes(&self.body).unwrap_or_default()
    }
}

/// What a stand-in answers.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string(),
        }
    }

    fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type Responder = Arc<dyn Fn(&Call) -> Reply + Send + Sync>;

/// An HTTP server on 127.0.0.1 recording every request and answering with
/// its responder.
#[derive(Clone)]
struct StandIn {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    responder: Arc<Mutex<Responder>>,
}

impl StandIn {
    async fn start(responder: impl Fn(&Call) -> Reply + Send + Sync + 'static) -> StandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stand-in");
        let s = StandIn {
            addr: listener.local_addr().expect("addr"),
            calls: Arc::default(),
            responder: Arc::new(Mutex::new(Arc::new(responder))),
        };
        async fn handle(
            State(s): State<StandIn>,
            method: Method,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> Response {
            let mut call = Call {
                method,
                path: uri.path().to_string(),
                headers,
                body: body.to_vec(),
                answer: (0, Vec::new(), String::new()),
            };
            let responder = s.responder.lock().expect("lock").clone();
            let reply = responder(&call);
            call.answer = (reply.status, reply.headers.clone(), reply.body.clone());
            s.calls.lock().expect("lock").push(call);
            let mut response = (
                StatusCode::from_u16(reply.status).expect("status"),
                reply.body,
            )
                .into_response();
            for (k, v) in reply.headers {
                response.headers_mut().insert(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                    v.parse().expect("header value"),
                );
            }
            response
        }
        let app = axum::Router::new().fallback(handle).with_state(s.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        s
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn respond(&self, responder: impl Fn(&Call) -> Reply + Send + Sync + 'static) {
        *self.responder.lock().expect("lock") = Arc::new(responder);
    }

    fn calls(&self) -> usize {
        self.calls.lock().expect("lock").len()
    }

    fn calls_to(&self, path: &str) -> Vec<Call> {
        self.calls
            .lock()
            .expect("lock")
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", BASE64.encode(format!("{user}:{password}")))
}

// ---------------------------------------------------------------- SendGrid

const SG_FROM: &str = "shop@example.com";

/// SendGrid v3 Mail Send: `POST /v3/mail/send` with `Authorization: Bearer
/// <key>` and a JSON body → 202 with `X-Message-Id`; a wrong key → 401; a
/// body without personalizations, sender or content → 400. `GET
/// /v3/scopes` lists the key's scopes.
async fn sendgrid_standin(api_key: &str) -> StandIn {
    let key = api_key.to_string();
    let n = Arc::new(AtomicUsize::new(0));
    StandIn::start(move |c| {
        if c.header("authorization") != Some(format!("Bearer {key}")) {
            return Reply::json(
                401,
                json!({"errors": [{"field": null, "message": "The provided authorization grant is invalid, expired, or revoked"}]}),
            );
        }
        match (c.method.as_str(), c.path.as_str()) {
            ("GET", "/v3/scopes") => Reply::json(200, json!({"scopes": ["mail.send"]})),
            ("POST", "/v3/mail/send") => {
                let b = c.json();
                let ok = c.header("content-type").as_deref() == Some("application/json")
                    && b["personalizations"][0]["to"][0]["email"].is_string()
                    && b["from"]["email"].is_string()
                    && b["content"][0]["type"].is_string()
                    && b["content"][0]["value"].is_string();
                if !ok {
                    return Reply::json(
                        400,
                        json!({"errors": [{"field": null, "message": "Bad Request"}]}),
                    );
                }
                let i = n.fetch_add(1, Ordering::SeqCst) + 1;
                Reply {
                    status: 202,
                    headers: vec![],
                    body: String::new(),
                }
                .header("x-message-id", &format!("sgE2eMsg{i}x{}", &suffix()[..6]))
            }
            _ => Reply::json(404, json!({"errors": [{"message": "not found"}]})),
        }
    })
    .await
}

fn sendgrid_provider(name: &str, server: &StandIn, api_key: &str) -> NewProvider {
    let mut p = NewProvider::new(name, ProviderType::Sendgrid);
    p.config = json!({"base_url": server.url(), "from": format!("Shop <{SG_FROM}>")});
    p.credentials = Some(SecretString::from(json!({"api_key": api_key}).to_string()));
    p
}

// ---------------------------------------------------------------- Twilio

const TW_SID: &str = "AC0123456789abcdef0123456789abcdef";
const TW_FROM: &str = "+15005550006";

fn twilio_messages_path() -> String {
    format!("/2010-04-01/Accounts/{TW_SID}/Messages.json")
}

/// Twilio Messages API: `POST /2010-04-01/Accounts/{sid}/Messages.json`,
/// HTTP Basic with the account SID and auth token, form-encoded `To`,
/// `From`, `Body` → 201 with the message `sid`. `GET
/// /2010-04-01/Accounts/{sid}.json` is the account.
async fn twilio_standin(auth_token: &str) -> StandIn {
    let token = auth_token.to_string();
    StandIn::start(move |c| {
        if c.header("authorization") != Some(basic(TW_SID, &token)) {
            return Reply::json(
                401,
                json!({"code": 20003, "message": "Authenticate", "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401}),
            );
        }
        let messages = twilio_messages_path();
        match (c.method.as_str(), c.path.as_str()) {
            ("GET", p) if p == format!("/2010-04-01/Accounts/{TW_SID}.json") => {
                Reply::json(200, json!({"sid": TW_SID, "status": "active"}))
            }
            ("POST", p) if p == messages => {
                let f = c.form();
                let form_ok = c.header("content-type").as_deref()
                    == Some("application/x-www-form-urlencoded")
                    && f.contains_key("To")
                    && f.contains_key("Body")
                    && (f.contains_key("From") || f.contains_key("MessagingServiceSid"));
                if !form_ok {
                    return Reply::json(
                        400,
                        json!({"code": 21604, "message": "A 'To' phone number is required.", "status": 400}),
                    );
                }
                let sid = format!("SM{}", uuid::Uuid::new_v4().simple());
                Reply::json(
                    201,
                    json!({"sid": sid, "status": "queued", "to": f["To"], "from": f.get("From"),
                           "body": f["Body"], "account_sid": TW_SID, "num_segments": "1"}),
                )
            }
            _ => Reply::json(404, json!({"code": 20404, "message": "not found", "status": 404})),
        }
    })
    .await
}

fn twilio_provider(name: &str, server: &StandIn, auth_token: &str) -> NewProvider {
    let mut p = NewProvider::new(name, ProviderType::Twilio);
    p.config = json!({"base_url": server.url(), "from": TW_FROM});
    p.credentials = Some(SecretString::from(
        json!({"account_sid": TW_SID, "auth_token": auth_token}).to_string(),
    ));
    p
}

// ---------------------------------------------------------------- FCM

const FCM_KEY: &str = include_str!("../fixtures/fcm-test-key.pem");
const FCM_PUBLIC_KEY: &str = include_str!("../fixtures/fcm-test-key.pub.pem");
const FCM_CLIENT_EMAIL: &str = "herald@test-project.iam.gserviceaccount.com";
const FCM_SEND_PATH: &str = "/v1/projects/test-project/messages:send";
const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// Checks a JWT-bearer grant as Google's token endpoint does: grant type,
/// RS256 signature by the service account's key, issuer, audience, scope.
fn google_grant_ok(form: &BTreeMap<String, String>, token_uri: &str) -> Result<(), String> {
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return Err(format!("grant_type {:?}", form.get("grant_type")));
    }
    let assertion = form.get("assertion").ok_or("no assertion")?;
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(FCM_PUBLIC_KEY.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[token_uri]);
    v.set_issuer(&[FCM_CLIENT_EMAIL]);
    v.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    let data = jsonwebtoken::decode::<Value>(assertion, &key, &v).map_err(|e| e.to_string())?;
    if data.claims["scope"] != FCM_SCOPE {
        return Err(format!("scope {}", data.claims["scope"]));
    }
    Ok(())
}

/// Google's OAuth token endpoint (`POST /token`) and FCM HTTP v1 (`POST
/// /v1/projects/test-project/messages:send` with the minted bearer token).
async fn fcm_standin() -> StandIn {
    let server = StandIn::start(|_| Reply::json(500, json!({}))).await;
    let token_uri = format!("{}/token", server.url());
    server.respond(move |c| match (c.method.as_str(), c.path.as_str()) {
        ("POST", "/token") => match google_grant_ok(&c.form(), &token_uri) {
            Ok(()) => Reply::json(
                200,
                json!({"access_token": "ya29.e2e-access-token", "expires_in": 3600, "token_type": "Bearer"}),
            ),
            Err(why) => Reply::json(
                400,
                json!({"error": "invalid_grant", "error_description": why}),
            ),
        },
        ("POST", FCM_SEND_PATH) => {
            if c.header("authorization").as_deref() != Some("Bearer ya29.e2e-access-token") {
                return Reply::json(
                    401,
                    json!({"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "bad token"}}),
                );
            }
            let Some(device) = c.json()["message"]["token"].as_str().map(str::to_string) else {
                return Reply::json(
                    400,
                    json!({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "no token"}}),
                );
            };
            Reply::json(
                200,
                json!({"name": format!(
                    "projects/test-project/messages/0:{}_{device}",
                    uuid::Uuid::new_v4().simple()
                )}),
            )
        }
        _ => Reply::json(404, json!({"error": {"code": 404, "status": "NOT_FOUND"}})),
    });
    server
}

fn fcm_provider(name: &str, server: &StandIn) -> NewProvider {
    let mut p = NewProvider::new(name, ProviderType::Fcm);
    p.config = json!({"base_url": server.url()});
    p.credentials = Some(SecretString::from(
        json!({
            "type": "service_account",
            "project_id": "test-project",
            "private_key_id": "kid-1",
            "private_key": FCM_KEY,
            "client_email": FCM_CLIENT_EMAIL,
            "client_id": "1234567890",
            "token_uri": format!("{}/token", server.url()),
        })
        .to_string(),
    ));
    p
}

// ---------------------------------------------------------------- topic helpers

async fn send(env: &TestEnv, key: &str, request: &Value) {
    produce(
        &producer(),
        &env.requests,
        key,
        request.to_string().as_bytes(),
    )
    .await;
}

// ---------------------------------------------------------------- 1. every channel

/// `id, notification_id, tenant_id, title, body` of `inbox_messages`.
type InboxRow = (i64, String, Option<String>, Option<String>, Option<String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_channel_sends_through_its_registered_provider() {
    let env = TestEnv::new(1).await;
    let sg_key = format!("SG.e2e-{}", suffix());
    let tw_token = format!("tw-e2e-{}", suffix());
    let sendgrid = sendgrid_standin(&sg_key).await;
    let twilio = twilio_standin(&tw_token).await;
    let google = fcm_standin().await;
    register_provider(&env, sendgrid_provider("sg-e2e", &sendgrid, &sg_key)).await;
    register_provider(&env, twilio_provider("tw-e2e", &twilio, &tw_token)).await;
    register_provider(&env, fcm_provider("fcm-e2e", &google)).await;
    register_provider(&env, NewProvider::new("inbox-e2e", ProviderType::Inbox)).await;
    let app = RunningApp::start(env.settings(&[])).await;
    let mut out = TopicReader::new(&env.outcomes, 1);

    let s = suffix();
    let (email, welcome, sms, push, in_app) = (
        format!("e-{s}"),
        format!("w-{s}"),
        format!("s-{s}"),
        format!("p-{s}"),
        format!("i-{s}"),
    );
    let user = format!("user-{s}");
    send(
        &env,
        "acme:u-1",
        &json!({ "id": email, "tenant_id": "acme", "channel": "email",
                 "recipient": { "email": "alice@example.com" },
                 "content": { "subject": "Order {{ 40 + 2 }} shipped", "text": "It is on its way.",
                              "html": "<p>It is on its way.</p>" } }),
    )
    .await;
    send(
        &env,
        "acme:u-2",
        &json!({ "id": welcome, "tenant_id": "acme", "channel": "email",
                 "recipient": { "email": "ana@example.com" },
                 "template": { "key": "welcome",
                               "data": { "app_name": "Acme Cloud", "user": { "first_name": "Ana" } } } }),
    )
    .await;
    send(
        &env,
        "acme:u-3",
        &json!({ "id": sms, "tenant_id": "acme", "channel": "sms",
                 "recipient": { "phone": "+14155550123" },
                 "content": { "text": "Your code is 123456" } }),
    )
    .await;
    send(
        &env,
        "acme:u-4",
        &json!({ "id": push, "tenant_id": "acme", "channel": "push",
                 "recipient": { "device_tokens": ["dev-e2e-1"] },
                 "content": { "subject": "New message", "text": "Grace: lunch?" } }),
    )
    .await;
    send(
        &env,
        "acme:u-5",
        &json!({ "id": in_app, "tenant_id": "acme", "channel": "in_app",
                 "recipient": { "user_id": user },
                 "content": { "subject": "Mentioned", "text": "Bob mentioned you" } }),
    )
    .await;

    out.wait_for(
        WAIT,
        &[
            (&email, "sent"),
            (&welcome, "sent"),
            (&sms, "sent"),
            (&push, "sent"),
            (&in_app, "sent"),
        ],
    )
    .await;
    let events = out.events();
    for id in [&email, &welcome, &sms, &push, &in_app] {
        assert_eq!(statuses(&events, id), ["sent"], "{id}");
    }

    // SendGrid: one Mail Send call per email, as documented, and nothing else.
    let mails = sendgrid.calls_to("/v3/mail/send");
    assert_eq!(mails.len(), 2, "{mails:?}");
    assert_eq!(sendgrid.calls(), 2);
    let mail_to = |addr: &str| {
        mails
            .iter()
            .find(|c| c.json()["personalizations"][0]["to"][0]["email"] == addr)
            .unwrap_or_else(|| panic!("no mail to {addr}"))
            .clone()
    };
    for (id, addr) in [(&email, "alice@example.com"), (&welcome, "ana@example.com")] {
        let call = mail_to(addr);
        assert_eq!(call.method, Method::POST);
        assert_eq!(
            call.header("authorization"),
            Some(format!("Bearer {sg_key}"))
        );
        assert_eq!(
            call.json()["from"],
            json!({"email": SG_FROM, "name": "Shop"})
        );
        assert_eq!(call.json()["custom_args"]["notification_id"], id.as_str());
        let sent = event(&events, id, "sent");
        assert_eq!(sent["provider"], "sg-e2e", "{sent}");
        assert_eq!(sent["channel"], "email");
        // The id the stand-in answered this very call with.
        let mid = call.answer_header("x-message-id").expect("stand-in id");
        assert_eq!(sent["provider_message_id"], mid.as_str(), "{sent}");
    }
    let inline = mail_to("alice@example.com").json();
    assert_eq!(inline["subject"], "Order 42 shipped");
    assert_eq!(
        inline["content"],
        json!([{"type": "text/plain", "value": "It is on its way."},
               {"type": "text/html", "value": "<p>It is on its way.</p>"}])
    );
    let templated = mail_to("ana@example.com").json();
    assert_eq!(templated["subject"], "Welcome to Acme Cloud, Ana!");
    assert_eq!(templated["content"][0]["type"], "text/plain");
    let text = templated["content"][0]["value"].as_str().expect("text");
    assert!(text.starts_with("Hi Ana,"), "{text}");
    assert!(text.contains("Thanks for joining Acme Cloud!"), "{text}");
    assert_eq!(templated["content"][1]["type"], "text/html");
    let html = templated["content"][1]["value"].as_str().expect("html");
    assert!(html.contains("<h1>Hi Ana,</h1>"), "{html}");

    // Twilio: one Messages call.
    let texts = twilio.calls_to(&twilio_messages_path());
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert_eq!(twilio.calls(), 1);
    assert_eq!(
        texts[0].header("authorization"),
        Some(basic(TW_SID, &tw_token))
    );
    let form = texts[0].form();
    assert_eq!(form["To"], "+14155550123");
    assert_eq!(form["From"], TW_FROM);
    assert_eq!(form["Body"], "Your code is 123456");
    let sent = event(&events, &sms, "sent");
    assert_eq!(sent["provider"], "tw-e2e");
    assert_eq!(
        sent["provider_message_id"],
        texts[0].answer_json()["sid"],
        "{sent}"
    );

    // FCM: a token minted once at the token endpoint, one send.
    assert_eq!(google.calls_to("/token").len(), 1);
    let pushes = google.calls_to(FCM_SEND_PATH);
    assert_eq!(pushes.len(), 1, "{pushes:?}");
    assert_eq!(google.calls(), 2);
    let message = &pushes[0].json()["message"];
    assert_eq!(message["token"], "dev-e2e-1");
    assert_eq!(
        message["notification"],
        json!({"title": "New message", "body": "Grace: lunch?"})
    );
    assert_eq!(message["data"]["notification_id"], push.as_str());
    let sent = event(&events, &push, "sent");
    assert_eq!(sent["provider"], "fcm-e2e");
    assert_eq!(
        sent["provider_message_id"],
        pushes[0].answer_json()["name"],
        "{sent}"
    );

    // In-app: a row in the user's inbox.
    let pool = env.pool().await;
    let rows: Vec<InboxRow> = sqlx::query_as(
        "SELECT id, notification_id, tenant_id, title, body FROM inbox_messages \
             WHERE user_id = $1",
    )
    .bind(&user)
    .fetch_all(&pool)
    .await
    .expect("inbox rows");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (row_id, nid, tenant, title, body) = rows[0].clone();
    assert_eq!(nid, in_app);
    assert_eq!(tenant.as_deref(), Some("acme"));
    assert_eq!(title.as_deref(), Some("Mentioned"));
    assert_eq!(body.as_deref(), Some("Bob mentioned you"));
    let sent = event(&events, &in_app, "sent");
    assert_eq!(sent["provider"], "inbox-e2e");
    assert_eq!(sent["provider_message_id"], row_id.to_string());
    app.stop().await;
}

// ---------------------------------------------------------------- 2. SendGrid bounce

/// A provider answering with a NUL in its message id (PostgreSQL's text and
/// jsonb cannot store U+0000; the outcome schema allows no control
/// characters in ids) must not fail the batched finish that other
/// notifications share: every SMS still ends `sent`, with no message id,
/// and every outcome is valid against the published schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_message_id_with_nul_is_dropped_and_fails_no_batch() {
    let env = TestEnv::new(1).await;
    let token = format!("tw-nul-{}", suffix());
    let twilio = StandIn::start(|c| {
        if c.method.as_str() == "POST" && c.path == twilio_messages_path() {
            Reply::json(201, json!({"sid": "SM\u{0}nul", "status": "queued"}))
        } else {
            Reply::json(
                404,
                json!({"code": 20404, "message": "not found", "status": 404}),
            )
        }
    })
    .await;
    register_provider(&env, twilio_provider("tw-nul", &twilio, &token)).await;
    let app = RunningApp::start(env.settings(&[])).await;
    let mut out = TopicReader::new(&env.outcomes, 1);

    let s = suffix();
    let ids: Vec<String> = (0..20).map(|i| format!("nul-{s}-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        send(
            &env,
            &format!("acme:u-{i}"),
            &json!({ "id": id, "tenant_id": "acme", "channel": "sms",
                     "recipient": { "phone": "+14155550123" },
                     "content": { "text": "Your code is 123456" } }),
        )
        .await;
    }
    let expected: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "sent")).collect();
    out.wait_for(WAIT, &expected).await;
    let events = out.events();
    for id in &ids {
        assert_eq!(statuses(&events, id), ["sent"], "{id}");
        let sent = event(&events, id, "sent");
        assert_eq!(sent["provider"], "tw-nul", "{sent}");
        assert!(sent.get("provider_message_id").is_none(), "{sent}");
        validate_delivery_status(&sent).unwrap_or_else(|e| panic!("{e}: {sent}"));
    }
    let stored: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT provider_message_id FROM notifications WHERE id = ANY($1) AND status = 'sent'",
    )
    .bind(&ids)
    .fetch_all(&env.pool().await)
    .await
    .expect("query");
    assert_eq!(stored.len(), ids.len(), "every row is sent");
    assert!(stored.iter().all(Option::is_none), "{stored:?}");
    assert_eq!(twilio.calls(), ids.len(), "one call per notification");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sendgrid_bounce_receipt_bounces_and_suppresses_the_address() {
    let env = TestEnv::new(1).await;
    let sg_key = format!("SG.e2e-{}", suffix());
    let sendgrid = sendgrid_standin(&sg_key).await;
    register_provider(&env, sendgrid_provider("sg-bounce", &sendgrid, &sg_key)).await;
    let (sk, public) = sendgrid_keys();
    let app = RunningApp::start(env.settings(&[
        ("HERALD_RECEIPTS__SENDGRID_VERIFICATION_KEY", public),
        // A long cache: the next request is suppressed only because the
        // receipt invalidated the cached answer.
        ("HERALD_POLICY__PREFERENCE_CACHE_TTL_MS", "600000".into()),
    ]))
    .await;
    let pool = env.pool().await;
    let mut out = TopicReader::new(&env.outcomes, 1);
    let address = format!("bouncy-{}@example.com", suffix());
    let email = |id: &str| {
        json!({ "id": id, "tenant_id": "acme", "channel": "email",
                "recipient": { "email": address, "user_id": "u-9" },
                "content": { "subject": "hi", "text": "hello" } })
    };

    let first = format!("first-{}", suffix());
    send(&env, "acme:u-9", &email(&first)).await;
    out.wait_for(WAIT, &[(&first, "sent")]).await;
    let sent = event(&out.events(), &first, "sent");
    assert_eq!(sent["provider"], "sg-bounce");
    let mails = sendgrid.calls_to("/v3/mail/send");
    assert_eq!(mails.len(), 1);
    let message_id = mails[0].answer_header("x-message-id").expect("stand-in id");
    assert_eq!(sent["provider_message_id"], message_id.as_str(), "{sent}");

    let bounce = json!([{
        "email": address,
        "event": "bounce",
        "type": "bounce",
        "sg_event_id": format!("ev-{}", suffix()),
        "sg_message_id": format!("{message_id}.filter0001.16648.5515E0B88.0"),
        "timestamp": chrono::Utc::now().timestamp(),
        "status": "5.1.1",
        "reason": "550 5.1.1 The email account that you tried to reach does not exist",
        "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
        "tls": 1,
        "category": ["orders"]
    }]);
    let r = post_sendgrid(&app, &sk, &bounce, 0).await;
    let (status, body) = (r.status, r.body);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["matched"], 1, "{body}");
    out.wait_for(WAIT, &[(&first, "bounced")]).await;
    let bounced = event(&out.events(), &first, "bounced");
    assert_eq!(bounced["provider"], "sg-bounce");
    assert_eq!(bounced["provider_message_id"], message_id.as_str());
    assert_eq!(bounced["error"]["code"], "hard_bounce");
    let suppressed: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT tenant_id, reason FROM suppressed_addresses WHERE address = $1")
            .bind(&address)
            .fetch_all(&pool)
            .await
            .expect("suppressed_addresses");
    assert_eq!(
        suppressed,
        [(String::new(), Some("hard_bounce".to_string()))]
    );

    let second = format!("second-{}", suffix());
    send(&env, "acme:u-9", &email(&second)).await;
    out.wait_for(WAIT, &[(&second, "suppressed")]).await;
    let events = out.events();
    assert_eq!(statuses(&events, &second), ["suppressed"]);
    assert_eq!(statuses(&events, &first), ["sent", "bounced"]);
    assert_eq!(
        sendgrid.calls_to("/v3/mail/send").len(),
        1,
        "nothing sent to a suppressed address"
    );
    app.stop().await;
}

// ---------------------------------------------------------------- 3. secrets

/// Runs the `herald` binary with the test's environment.
fn herald_cli(vars: &[(String, String)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(vars.iter().cloned())
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .output()
        .expect("run herald")
}

fn output_text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Polls `GET /readyz` until 200.
async fn wait_ready(base: &str, log: &Path) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/readyz")).await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "herald serve not ready; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_in_logs_or_outputs_and_ciphertext_at_rest() {
    let env = TestEnv::new(1).await;
    let sg_key = format!("SG.e2eSecretKey-{}", suffix());
    let tw_token = format!("twE2eSecretToken{}", suffix());
    let sendgrid = sendgrid_standin(&sg_key).await;
    // Twilio refuses every call: the auth token is "wrong".
    let twilio = twilio_standin(&tw_token).await;
    twilio.respond(|_| {
        Reply::json(
            401,
            json!({"code": 20003, "message": "Authenticate", "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401}),
        )
    });
    register_provider(&env, sendgrid_provider("sg-secret", &sendgrid, &sg_key)).await;
    register_provider(&env, twilio_provider("tw-secret", &twilio, &tw_token)).await;

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("herald.log");
    let mut vars = env.vars(&[
        ("HERALD_HTTP__BIND", format!("127.0.0.1:{port}")),
        ("RUST_LOG", "debug".into()),
    ]);
    vars.push(("RUST_BACKTRACE".into(), "0".into()));
    let mut herald = HeraldProcess::spawn(vars.clone(), &log);
    wait_ready(&base, &log).await;
    let mut out = TopicReader::new(&env.outcomes, 1);

    let s = suffix();
    let (ok, bad) = (format!("ok-{s}"), format!("bad-{s}"));
    send(
        &env,
        "acme:u-1",
        &json!({ "id": ok, "tenant_id": "acme", "channel": "email",
                 "recipient": { "email": "alice@example.com" },
                 "content": { "subject": "hi", "text": "hello" } }),
    )
    .await;
    send(
        &env,
        "acme:u-2",
        &json!({ "id": bad, "tenant_id": "acme", "channel": "sms",
                 "recipient": { "phone": "+14155550123" },
                 "content": { "text": "code 1" } }),
    )
    .await;
    out.wait_for(WAIT, &[(&ok, "sent"), (&bad, "failed")]).await;
    let events = out.events();
    assert_eq!(event(&events, &ok, "sent")["provider"], "sg-secret");
    let failed = event(&events, &bad, "failed");
    assert_eq!(failed["provider"], "tw-secret", "{failed}");
    assert_eq!(failed["error"]["code"], "provider_auth", "{failed}");
    assert_eq!(failed["error"]["retryable"], false, "{failed}");
    assert_eq!(twilio.calls_to(&twilio_messages_path()).len(), 1);

    // Everything a person could see: the API, the CLI, the outcome events.
    let mut outputs: Vec<(String, String)> = Vec::new();
    let admin = auth::create_key(&env.pool().await, Role::Admin, None, None, Some("e2e"))
        .await
        .expect("admin key")
        .token;
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{base}/v1/providers"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("GET /v1/providers");
    assert_eq!(r.status(), 200);
    let listed = r.text().await.expect("body");
    assert!(
        listed.contains("sg-secret") && listed.contains("tw-secret"),
        "{listed}"
    );
    outputs.push(("GET /v1/providers".into(), listed));
    for name in ["sg-secret", "tw-secret"] {
        let r = client
            .get(format!("{base}/v1/providers/{name}"))
            .bearer_auth(&admin)
            .send()
            .await
            .expect("GET /v1/providers/{name}");
        outputs.push((
            format!("GET /v1/providers/{name}"),
            r.text().await.expect("body"),
        ));
    }
    let list = herald_cli(&vars, &["providers", "list"]);
    assert!(list.status.success(), "{}", output_text(&list));
    assert!(
        output_text(&list).contains("sg-secret"),
        "{}",
        output_text(&list)
    );
    outputs.push(("herald providers list".into(), output_text(&list)));
    let valid = herald_cli(&vars, &["providers", "validate", "sg-secret"]);
    assert!(valid.status.success(), "{}", output_text(&valid));
    assert_eq!(sendgrid.calls_to("/v3/scopes").len(), 1);
    outputs.push((
        "herald providers validate sg-secret".into(),
        output_text(&valid),
    ));
    let invalid = herald_cli(&vars, &["providers", "validate", "tw-secret"]);
    assert_eq!(invalid.status.code(), Some(1), "{}", output_text(&invalid));
    // It did ask Twilio (and was refused).
    assert_eq!(
        twilio
            .calls_to(&format!("/2010-04-01/Accounts/{TW_SID}.json"))
            .len(),
        1
    );
    outputs.push((
        "herald providers validate tw-secret".into(),
        output_text(&invalid),
    ));
    outputs.push((
        "outcome events".into(),
        serde_json::to_string(&events).expect("json"),
    ));

    herald.terminate();
    let logged = std::fs::read_to_string(&log).expect("read the captured log");
    // The log is the real one, at debug level, covering both sends.
    assert!(logged.contains("DEBUG"), "not a debug log:\n{logged}");
    assert!(
        logged.contains(&bad) && logged.contains("provider_auth"),
        "the failed send is not logged:\n{logged}"
    );
    outputs.push(("herald serve log".into(), logged));

    let forbidden = [
        sg_key.clone(),
        tw_token.clone(),
        // What travels in the auth headers, in case a header is logged.
        basic(TW_SID, &tw_token),
        BASE64.encode(format!("{TW_SID}:{tw_token}")),
    ];
    for (what, text) in &outputs {
        for secret in &forbidden {
            assert!(!text.contains(secret.as_str()), "{what} shows a secret");
        }
    }

    // At rest: ciphertext, not the JSON text.
    let rows: Vec<(String, Vec<u8>, Option<String>)> =
        sqlx::query_as("SELECT name, credentials, credentials_key_id FROM providers ORDER BY name")
            .fetch_all(&env.pool().await)
            .await
            .expect("providers rows");
    assert_eq!(rows.len(), 2);
    for (name, bytes, key_id) in &rows {
        assert!(key_id.is_some(), "{name}");
        assert!(bytes.len() > 16, "{name}");
        for secret in [&sg_key, &tw_token] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{name}: the secret is stored in clear"
            );
        }
        assert!(
            serde_json::from_slice::<Value>(bytes).is_err(),
            "{name}: the credentials column holds JSON"
        );
    }
}

// ---------------------------------------------------------------- 4. Twilio status callback

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twilio_status_callback_delivers() {
    let env = TestEnv::new(1).await;
    let tw_token = format!("tw-e2e-{}", suffix());
    let twilio = twilio_standin(&tw_token).await;
    register_provider(&env, twilio_provider("tw-callback", &twilio, &tw_token)).await;
    let port = free_port();
    let public = format!("http://127.0.0.1:{port}");
    let app = RunningApp::start(env.settings(&[
        ("HERALD_HTTP__BIND", format!("127.0.0.1:{port}")),
        ("HERALD_RECEIPTS__PUBLIC_BASE_URL", public.clone()),
        ("HERALD_RECEIPTS__TWILIO_AUTH_TOKEN", tw_token.clone()),
    ]))
    .await;
    assert_eq!(app.http.port(), port);
    let mut out = TopicReader::new(&env.outcomes, 1);

    let id = format!("sms-{}", suffix());
    send(
        &env,
        "acme:u-1",
        &json!({ "id": id, "tenant_id": "acme", "channel": "sms",
                 "recipient": { "phone": "+14155550123" },
                 "content": { "text": "Your code is 654321" } }),
    )
    .await;
    out.wait_for(WAIT, &[(&id, "sent")]).await;
    let sent = event(&out.events(), &id, "sent");
    assert_eq!(sent["provider"], "tw-callback");
    let calls = twilio.calls_to(&twilio_messages_path());
    assert_eq!(calls.len(), 1);
    let sid = calls[0].answer_json()["sid"]
        .as_str()
        .expect("the stand-in's sid")
        .to_string();
    assert_eq!(sent["provider_message_id"], sid.as_str(), "{sent}");
    let callback = calls[0].form()["StatusCallback"].clone();
    assert_eq!(callback, format!("{public}/webhooks/twilio"));

    // What Twilio POSTs to the StatusCallback URL, signed for that URL.
    let params = [
        ("AccountSid", TW_SID),
        ("ApiVersion", "2010-04-01"),
        ("From", TW_FROM),
        ("MessageSid", sid.as_str()),
        ("MessageStatus", "delivered"),
        ("SmsSid", sid.as_str()),
        ("SmsStatus", "delivered"),
        ("To", "+14155550123"),
    ];
    // Signed with another token first: refused, nothing happens.
    let r = post_twilio(&callback, "not-the-token", &callback, &params).await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = post_twilio(&callback, &tw_token, &callback, &params).await;
    let reply = r.body;
    assert_eq!(r.status, 200, "{reply}");
    assert_eq!(reply["matched"], 1, "{reply}");
    out.wait_for(WAIT, &[(&id, "delivered")]).await;
    let events = out.events();
    assert_eq!(statuses(&events, &id), ["sent", "delivered"]);
    let delivered = event(&events, &id, "delivered");
    assert_eq!(delivered["provider"], "tw-callback");
    assert_eq!(delivered["provider_message_id"], sid.as_str());
    assert_eq!(delivered["channel"], "sms");
    app.stop().await;
}
