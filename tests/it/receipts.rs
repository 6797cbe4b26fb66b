//! Delivery receipts through the real path: a notification sent by Herald
//! (or stored through the notification store with a provider message id),
//! a signed receipt POSTed to Herald's HTTP port, the outcome event on the
//! outcome topic, the row in PostgreSQL and the suppression list the policy
//! reads on the next request.
//!
//! Every test uses one partition, so "no further event" can be checked by
//! reading up to a later event: Herald answers a receipt only after the
//! broker acknowledged its event, so anything a refused or repeated receipt
//! had published would be in the log before it.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sqlx::PgPool;

use herald::domain::{DeliveryStatusEvent, Notification, Status, decode_request};
use herald::store::{AttemptResult, Claim, NotificationStore};

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(60);
const RECEIPT_SECRET: &str = "receipt-secret-for-tests";

async fn db_status(pool: &PgPool, id: &str) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, error_code FROM notifications WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("notification row")
}

async fn suppression(pool: &PgPool, address: &str) -> Vec<(String, Option<String>)> {
    sqlx::query_as(
        "SELECT tenant_id, reason FROM suppressed_addresses WHERE address = $1 ORDER BY tenant_id",
    )
    .bind(address)
    .fetch_all(pool)
    .await
    .expect("suppressed_addresses")
}

/// POSTs a generic receipt signed with `secret` (Standard Webhooks) `age`
/// seconds in the past.
async fn post_generic(
    app: &RunningApp,
    secret: &str,
    id: &str,
    body: &Value,
    age: i64,
) -> PostReply {
    let body = body.to_string().into_bytes();
    let ts = chrono::Utc::now().timestamp() - age;
    // Standard Webhooks, computed here rather than with Herald's own signer:
    // `v1,` + base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}").
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("hmac key");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&body);
    let sig = format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()));
    post(
        &format!("http://{}/webhooks/generic", app.http),
        &[
            ("content-type", "application/json".into()),
            ("webhook-id", id.into()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", sig),
        ],
        body,
    )
    .await
}

async fn metrics(app: &RunningApp) -> String {
    reqwest::get(format!("http://{}/metrics", app.http))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// The value of `herald_receipts_total` for these labels (0 when absent).
fn receipts_metric(text: &str, provider: &str, status: &str, outcome: &str) -> u64 {
    let labels = format!(
        "herald_receipts_total{{outcome=\"{outcome}\",provider=\"{provider}\",status=\"{status}\"}}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&labels))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generic_delivered_receipt_publishes_one_delivered_outcome() {
    let env = TestEnv::new(1).await;
    let sink = HttpSink::start().await;
    let app = RunningApp::start(
        env.settings(&[("HERALD_RECEIPTS__SIGNING_SECRET", RECEIPT_SECRET.into())]),
    )
    .await;
    let pool = env.pool().await;
    let mut out = TopicReader::new(&env.outcomes, 1);

    let id = format!("rcpt-{}", suffix());
    let request = json!({
        "id": id, "tenant_id": "acme", "channel": "webhook",
        "recipient": { "url": sink.url("/hook") },
        "content": { "text": "hello" },
        "correlation_id": "corr-7"
    });
    produce(
        &producer(),
        &env.requests,
        "acme:r",
        request.to_string().as_bytes(),
    )
    .await;
    out.wait_for(WAIT, &[(&id, "sent")]).await;
    let sent = event(&out.events(), &id, "sent");
    let message_id = sent["provider_message_id"]
        .as_str()
        .expect("sent outcome names the provider message id")
        .to_string();

    // Refused before anything is looked at: wrong secret, stale timestamp,
    // no signature at all.
    let receipt = json!({ "provider_message_id": message_id, "status": "delivered" });
    let r = post_generic(&app, "another-secret", "r-bad", &receipt, 0).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert_eq!(r.content_type, "application/problem+json");
    let r = post_generic(&app, RECEIPT_SECRET, "r-old", &receipt, 3600).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    let r = post(
        &format!("http://{}/webhooks/generic", app.http),
        &[],
        receipt.to_string().into_bytes(),
    )
    .await;
    assert_eq!(r.status, 401);
    // Signed but malformed: 400 problem.
    let r = post_generic(
        &app,
        RECEIPT_SECRET,
        "r-malformed",
        &json!({ "provider_message_id": message_id, "status": "opened" }),
        0,
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.content_type, "application/problem+json");
    assert_eq!(db_status(&pool, &id).await.0, "sent");

    // The real receipt.
    let r = post_generic(&app, RECEIPT_SECRET, "r-1", &receipt, 0).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["matched"], 1, "{:?}", r.body);
    out.wait_for(WAIT, &[(&id, "delivered")]).await;
    let delivered = event(&out.events(), &id, "delivered");
    assert_eq!(delivered["request_id"], id.as_str());
    assert_eq!(delivered["tenant_id"], "acme");
    assert_eq!(delivered["channel"], "webhook");
    assert_eq!(delivered["provider"], "webhook");
    assert_eq!(delivered["provider_message_id"], message_id.as_str());
    assert_eq!(delivered["attempt"], 1);
    assert_eq!(delivered["correlation_id"], "corr-7");
    assert!(delivered.get("error").is_none(), "{delivered}");
    assert_ne!(delivered["event_id"], sent["event_id"]);
    assert_eq!(db_status(&pool, &id).await.0, "delivered");
    let last: Value = sqlx::query_scalar("SELECT last_event FROM notifications WHERE id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .expect("last_event");
    assert_eq!(last["event_id"], delivered["event_id"]);

    // The provider retries (same webhook-id, signed anew), and sends another
    // delivered receipt by notification id: no second event.
    let r = post_generic(&app, RECEIPT_SECRET, "r-1", &receipt, 1).await;
    assert_eq!((r.status, r.body["duplicate"].clone()), (200, json!(1)));
    let by_id = json!({ "notification_id": id, "status": "delivered" });
    let r = post_generic(&app, RECEIPT_SECRET, "r-2", &by_id, 0).await;
    assert_eq!((r.status, r.body["duplicate"].clone()), (200, json!(1)));
    // A receipt naming the notification with another provider message id
    // does not match; an unknown id is acknowledged and counted.
    let mismatch =
        json!({ "notification_id": id, "provider_message_id": "other", "status": "failed" });
    let r = post_generic(&app, RECEIPT_SECRET, "r-3", &mismatch, 0).await;
    assert_eq!((r.status, r.body["unmatched"].clone()), (200, json!(1)));
    let unknown = json!({ "provider_message_id": "no-such-message", "status": "delivered" });
    let r = post_generic(&app, RECEIPT_SECRET, "r-4", &unknown, 0).await;
    assert_eq!((r.status, r.body["unmatched"].clone()), (200, json!(1)));
    // delivered is not undone by a later failure.
    assert_eq!(db_status(&pool, &id).await.0, "delivered");

    // A receipt for a notification still being sent (the provider was
    // quicker than Herald's write): 503, retry later; nothing changes.
    let store = NotificationStore::new(pool.clone(), Duration::from_secs(30));
    let sending = format!("sending-{}", suffix());
    claim_sending(
        &store,
        json!({ "id": sending, "channel": "webhook", "recipient": { "url": sink.url("/hook") },
                "content": { "text": "s" } }),
        "webhook",
    )
    .await;
    let early = json!({ "notification_id": sending, "status": "delivered" });
    let r = post_generic(&app, RECEIPT_SECRET, "r-5", &early, 0).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.retry_after.as_deref(), Some("10"));
    assert_eq!(db_status(&pool, &sending).await.0, "sending");

    // A marker after everything: all of the above is before it in the log.
    let marker = format!("marker-{}", suffix());
    let m = json!({ "id": marker, "channel": "webhook", "recipient": { "url": sink.url("/hook") },
                    "content": { "text": "m" } });
    produce(&producer(), &env.requests, "m", m.to_string().as_bytes()).await;
    out.wait_for(WAIT, &[(&marker, "sent")]).await;
    assert_eq!(statuses(&out.events(), &id), ["sent", "delivered"]);

    let text = metrics(&app).await;
    assert_eq!(receipts_metric(&text, "generic", "delivered", "matched"), 1);
    assert_eq!(
        receipts_metric(&text, "generic", "delivered", "duplicate"),
        2
    );
    assert_eq!(
        receipts_metric(&text, "generic", "delivered", "unmatched"),
        1
    );
    assert_eq!(receipts_metric(&text, "generic", "failed", "unmatched"), 1);
    assert_eq!(
        receipts_metric(&text, "generic", "none", "invalid_signature"),
        3
    );
    assert_eq!(receipts_metric(&text, "generic", "none", "malformed"), 1);
    assert_eq!(receipts_metric(&text, "generic", "delivered", "pending"), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hard_bounce_receipt_suppresses_the_address_for_the_next_request() {
    let env = TestEnv::new(1).await;
    let sink = SmtpSink::start();
    // A long cache: the next request is suppressed only because the receipt
    // invalidated the cached "not suppressed".
    let app = RunningApp::start(env.settings(&[
        ("HERALD_SMTP__PORT", sink.port.to_string()),
        ("HERALD_RECEIPTS__SIGNING_SECRET", RECEIPT_SECRET.into()),
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
        .to_string()
    };

    let first = format!("first-{}", suffix());
    produce(
        &producer(),
        &env.requests,
        "acme:u-9",
        email(&first).as_bytes(),
    )
    .await;
    out.wait_for(WAIT, &[(&first, "sent")]).await;
    let message_id = event(&out.events(), &first, "sent")["provider_message_id"]
        .as_str()
        .expect("smtp provider message id")
        .to_string();
    assert_eq!(sink.count(), 1);

    let bounce = json!({
        "provider_message_id": message_id, "status": "bounced", "bounce_type": "hard",
        "reason": "550 5.1.1 User unknown", "occurred_at": "2026-11-28T10:00:00Z"
    });
    let r = post_generic(&app, RECEIPT_SECRET, "bounce-1", &bounce, 0).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["matched"], 1);
    out.wait_for(WAIT, &[(&first, "bounced")]).await;
    let bounced = event(&out.events(), &first, "bounced");
    assert_eq!(bounced["error"]["code"], "hard_bounce");
    assert_eq!(bounced["error"]["message"], "550 5.1.1 User unknown");
    assert_eq!(bounced["error"]["retryable"], false);
    assert_eq!(bounced["occurred_at"], "2026-11-28T10:00:00Z");
    assert_eq!(bounced["provider"], "smtp");
    assert_eq!(
        db_status(&pool, &first).await,
        ("bounced".to_string(), Some("hard_bounce".to_string()))
    );
    // A hard bounce suppresses the address for every tenant.
    assert_eq!(
        suppression(&pool, &address).await,
        [(String::new(), Some("hard_bounce".to_string()))]
    );

    // Bounced is final: a late delivered receipt changes nothing.
    let late = json!({ "provider_message_id": message_id, "status": "delivered" });
    let r = post_generic(&app, RECEIPT_SECRET, "late-1", &late, 0).await;
    assert_eq!((r.status, r.body["ignored"].clone()), (200, json!(1)));

    let second = format!("second-{}", suffix());
    produce(
        &producer(),
        &env.requests,
        "acme:u-9",
        email(&second).as_bytes(),
    )
    .await;
    out.wait_for(WAIT, &[(&second, "suppressed")]).await;
    let suppressed = event(&out.events(), &second, "suppressed");
    assert_eq!(suppressed["reason"], "suppressed_address");
    assert_eq!(sink.count(), 1, "nothing sent to a suppressed address");
    assert_eq!(statuses(&out.events(), &first), ["sent", "bounced"]);
    app.stop().await;
}

/// Stores a notification as being sent (attempt 1 started) by `provider`.
async fn claim_sending(store: &NotificationStore, request: Value, provider: &str) -> Notification {
    let n = decode_request(request.to_string().as_bytes(), 1 << 20)
        .expect("valid request")
        .into_notifications()
        .next()
        .expect("one notification");
    let claim = store
        .claim(&n, Status::Sending, provider, None)
        .await
        .expect("claim");
    assert_eq!(claim, Claim::New { attempt: 1 });
    n
}

/// Stores a notification as sent by `provider` with `message_id`, through
/// the notification store (the SendGrid and Twilio adapters live elsewhere).
async fn store_sent(
    store: &NotificationStore,
    request: Value,
    provider: &str,
    message_id: &str,
) -> Notification {
    let n = claim_sending(store, request, provider).await;
    let mut e = DeliveryStatusEvent::for_notification(&n, Status::Sent, 1);
    e.provider = Some(provider.into());
    e.provider_message_id = Some(message_id.into());
    store
        .finish_attempt(
            &n.id,
            1,
            &AttemptResult {
                status: Status::Sent,
                provider: provider.into(),
                provider_message_id: Some(message_id.into()),
                error: None,
                duration_ms: 3,
            },
            &e,
        )
        .await
        .expect("finish");
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sendgrid_events_are_verified_matched_and_applied() {
    let env = TestEnv::new(1).await;
    let (sk, public) = sendgrid_keys();
    let app =
        RunningApp::start(env.settings(&[("HERALD_RECEIPTS__SENDGRID_VERIFICATION_KEY", public)]))
            .await;
    let pool = env.pool().await;
    let store = NotificationStore::new(pool.clone(), Duration::from_secs(30));
    let mut out = TopicReader::new(&env.outcomes, 1);
    let s = suffix();
    let (a, b, c) = (
        format!("sg-a-{s}"),
        format!("sg-b-{s}"),
        format!("sg-c-{s}"),
    );
    let addr = |n: &str| format!("{n}@example.com");
    for (id, mid) in [(&a, "XA"), (&b, "XB"), (&c, "XC")] {
        let req = json!({ "id": id, "tenant_id": "acme", "channel": "email",
                          "recipient": { "email": addr(id) }, "content": { "text": "x" } });
        store_sent(&store, req, "sendgrid-primary", &format!("{mid}{s}")).await;
    }
    let sg = |mid: &str| format!("{mid}{s}.filterdrecv-5645d9c87f-2zbwz-1-5F2C6E7A-4.0");

    // Refused: signed by another key, or too old. Nothing happens.
    let delivered_c = json!([{ "event": "delivered", "email": addr(&c), "sg_message_id": sg("XC"),
                               "sg_event_id": "ev-c-1", "timestamp": 1_700_000_000 }]);
    let (other, _) = sendgrid_keys();
    let r = post_sendgrid(&app, &other, &delivered_c, 0).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    let r = post_sendgrid(&app, &sk, &delivered_c, 3600).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    let r = post_sendgrid(&app, &sk, &json!({ "event": "delivered" }), 0).await;
    assert_eq!(r.status, 400, "not an array: {:?}", r.body);
    assert_eq!(db_status(&pool, &c).await.0, "sent");

    let batch = json!([
        { "event": "processed", "email": addr(&a), "sg_message_id": sg("XA"), "sg_event_id": "ev-a-0", "timestamp": 1_700_000_000 },
        { "event": "delivered", "email": addr(&a), "sg_message_id": sg("XA"), "sg_event_id": "ev-a-1",
          "timestamp": 1_700_000_005, "response": "250 OK" },
        { "event": "open", "email": addr(&a), "sg_message_id": sg("XA"), "sg_event_id": "ev-a-2", "timestamp": 1_700_000_100 },
        { "event": "bounce", "type": "bounce", "email": addr(&b), "sg_message_id": sg("XB"),
          "sg_event_id": "ev-b-1", "timestamp": 1_700_000_006, "status": "5.1.1",
          "reason": "550 5.1.1 The email account does not exist", "notification_id": b },
        { "event": "spamreport", "email": addr(&c), "sg_message_id": sg("XC"), "sg_event_id": "ev-c-2", "timestamp": 1_700_000_200 },
        { "event": "deferred", "email": addr(&c), "sg_message_id": sg("XC"), "sg_event_id": "ev-c-3", "timestamp": 1_700_000_201 },
        { "event": "delivered", "email": "nobody@example.com", "sg_message_id": "unknown.filter1", "sg_event_id": "ev-x", "timestamp": 1_700_000_000 },
        // Names notification c but carries a's message id: refused.
        { "event": "delivered", "email": addr(&c), "sg_message_id": sg("XA"), "sg_event_id": "ev-c-4",
          "timestamp": 1_700_000_000, "notification_id": c }
    ]);
    let r = post_sendgrid(&app, &sk, &batch, 0).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body,
        json!({ "received": 8, "matched": 2, "suppressed": 1, "duplicate": 0,
                "ignored": 3, "unmatched": 2, "pending": 0 })
    );
    out.wait_for(WAIT, &[(&a, "delivered"), (&b, "bounced")])
        .await;
    let events = out.events();
    let da = event(&events, &a, "delivered");
    assert_eq!(da["provider"], "sendgrid-primary");
    assert_eq!(da["provider_message_id"], format!("XA{s}"));
    assert_eq!(da["occurred_at"], "2023-11-14T22:13:25Z");
    let bb = event(&events, &b, "bounced");
    assert_eq!(bb["error"]["code"], "hard_bounce");
    assert_eq!(
        bb["error"]["message"],
        "5.1.1 550 5.1.1 The email account does not exist"
    );
    assert_eq!(db_status(&pool, &a).await.0, "delivered");
    assert_eq!(db_status(&pool, &b).await.0, "bounced");
    assert_eq!(
        db_status(&pool, &c).await.0,
        "sent",
        "a complaint changes no status"
    );
    assert_eq!(
        suppression(&pool, &addr(&b)).await,
        [(String::new(), Some("hard_bounce".into()))]
    );
    assert_eq!(
        suppression(&pool, &addr(&c)).await,
        [("acme".to_string(), Some("spam_complaint".into()))]
    );

    // SendGrid retries the whole batch: every event is a no-op now.
    let r = post_sendgrid(&app, &sk, &batch, 0).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["matched"], 0);
    assert_eq!(r.body["duplicate"], 2);

    // Last: c delivered, so every earlier event is already in the log.
    let r = post_sendgrid(&app, &sk, &delivered_c, 0).await;
    assert_eq!(r.body["matched"], 1, "{:?}", r.body);
    out.wait_for(WAIT, &[(&c, "delivered")]).await;
    let events = out.events();
    assert_eq!(statuses(&events, &a), ["delivered"]);
    assert_eq!(statuses(&events, &b), ["bounced"]);
    assert_eq!(statuses(&events, &c), ["delivered"]);

    let text = metrics(&app).await;
    assert_eq!(
        receipts_metric(&text, "sendgrid", "none", "invalid_signature"),
        2
    );
    assert_eq!(receipts_metric(&text, "sendgrid", "bounced", "matched"), 1);
    assert_eq!(
        receipts_metric(&text, "sendgrid", "bounced", "duplicate"),
        1
    );
    assert_eq!(receipts_metric(&text, "sendgrid", "deferred", "ignored"), 2);
    assert_eq!(
        receipts_metric(&text, "sendgrid", "spam_complaint", "suppressed"),
        1
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twilio_status_callbacks_are_verified_and_applied() {
    let env = TestEnv::new(1).await;
    let token = "twilio-auth-token-for-tests";
    let app = RunningApp::start(env.settings(&[
        ("HERALD_RECEIPTS__TWILIO_AUTH_TOKEN", token.into()),
        (
            "HERALD_RECEIPTS__PUBLIC_BASE_URL",
            "https://herald.example.com/".into(),
        ),
    ]))
    .await;
    let pool = env.pool().await;
    let store = NotificationStore::new(pool.clone(), Duration::from_secs(30));
    let mut out = TopicReader::new(&env.outcomes, 1);
    let s = suffix();
    let (d, f) = (format!("tw-d-{s}"), format!("tw-f-{s}"));
    let (sid_d, sid_f) = (format!("SMd{s}"), format!("SMf{s}"));
    let phone_f = "+15005550006";
    for (id, sid, phone) in [(&d, &sid_d, "+15005550001"), (&f, &sid_f, phone_f)] {
        let req = json!({ "id": id, "tenant_id": "acme", "channel": "sms",
                          "recipient": { "phone": phone }, "content": { "text": "x" } });
        store_sent(&store, req, "twilio", sid).await;
    }
    let url = "https://herald.example.com/webhooks/twilio?tenant=acme";

    // Signed for another URL (Herald's own address, not the public one), or
    // with another token: refused.
    let delivered = [
        ("MessageSid", sid_d.as_str()),
        ("MessageStatus", "delivered"),
        ("To", "+15005550001"),
        ("AccountSid", "AC123"),
    ];
    let local = format!("http://{}/webhooks/twilio?tenant=acme", app.http);
    let r = post_twilio(&local, token, &local, &delivered).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    let r = post_twilio(&local, "other-token", url, &delivered).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    let r = post_twilio(&local, token, url, &[("AccountSid", "AC123")]).await;
    assert_eq!(r.status, 400, "signed but no MessageSid: {:?}", r.body);
    // SendGrid is not configured here.
    let r = post(
        &format!("http://{}/webhooks/sendgrid", app.http),
        &[],
        b"[]".to_vec(),
    )
    .await;
    assert_eq!(r.status, 503);

    // Intermediate statuses are acknowledged only.
    let sent = [
        ("MessageSid", sid_d.as_str()),
        ("MessageStatus", "sent"),
        ("To", "+15005550001"),
    ];
    let r = post_twilio(&local, token, url, &sent).await;
    assert_eq!((r.status, r.body["ignored"].clone()), (200, json!(1)));
    let r = post_twilio(&local, token, url, &delivered).await;
    assert_eq!(
        (r.status, r.body["matched"].clone()),
        (200, json!(1)),
        "{:?}",
        r.body
    );
    let undelivered = [
        ("MessageSid", sid_f.as_str()),
        ("MessageStatus", "undelivered"),
        ("ErrorCode", "30006"),
        ("To", phone_f),
    ];
    let r = post_twilio(&local, token, url, &undelivered).await;
    assert_eq!(
        (r.status, r.body["matched"].clone()),
        (200, json!(1)),
        "{:?}",
        r.body
    );
    // Twilio sends it again: nothing new.
    let r = post_twilio(&local, token, url, &undelivered).await;
    assert_eq!((r.status, r.body["duplicate"].clone()), (200, json!(1)));

    out.wait_for(WAIT, &[(&d, "delivered"), (&f, "bounced")])
        .await;
    let events = out.events();
    assert_eq!(statuses(&events, &d), ["delivered"]);
    assert_eq!(statuses(&events, &f), ["bounced"]);
    let bf = event(&events, &f, "bounced");
    assert_eq!(bf["channel"], "sms");
    assert_eq!(bf["error"]["code"], "hard_bounce");
    assert_eq!(bf["error"]["message"], "Twilio error 30006");
    assert_eq!(db_status(&pool, &d).await.0, "delivered");
    assert_eq!(
        suppression(&pool, phone_f).await,
        [(String::new(), Some("hard_bounce".into()))]
    );
    app.stop().await;
}
