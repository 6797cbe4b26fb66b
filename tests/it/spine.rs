//! The spine: email and webhook requests end to end, dead letters, dedup.

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::json;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(60);

fn events_for<'a>(events: &'a [serde_json::Value], id: &str) -> Vec<&'a serde_json::Value> {
    events
        .iter()
        .filter(|e| e["notification_id"] == id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn email_request_is_delivered_over_smtp_and_reported_sent() {
    let env = TestEnv::new(2).await;
    let sink = SmtpSink::start();
    let app =
        RunningApp::start(env.settings(&[("HERALD_SMTP__PORT", sink.port.to_string())])).await;
    let id = format!("email-{}", suffix());
    let request = json!({
        "id": id,
        "tenant_id": "acme",
        "channel": "email",
        "recipient": { "email": "ada@example.com", "user_id": "u-1" },
        "content": {
            "subject": "Your order {{ notification.id }} shipped",
            "text": "Hello {{ recipient.email }}, it shipped.",
            "html": "<p>Hello <b>{{ recipient.email }}</b></p>"
        },
        "meta": {
            "from": "shop@example.com",
            "reply_to": "help@example.com",
            "cc": ["cc@example.com"],
            "bcc": ["audit@example.com"],
            "headers": { "X-Campaign": "spring" }
        },
        "correlation_id": "corr-1"
    });
    produce(
        &producer(),
        &env.requests,
        "acme:u-1",
        request.to_string().as_bytes(),
    )
    .await;

    let mut outcomes = TopicReader::new(&env.outcomes, env.partitions);
    let id2 = id.clone();
    assert!(
        outcomes
            .read_until(WAIT, |r| r
                .iter()
                .any(|x| x.json()["notification_id"] == id2.as_str()))
            .await,
        "no outcome for {id}"
    );
    let events = outcomes.events();
    let mine = events_for(&events, &id);
    assert_eq!(mine.len(), 1, "{mine:?}");
    let e = mine[0];
    assert_eq!(e["status"], "sent", "{e}");
    assert_eq!(e["request_id"], id.as_str());
    assert_eq!(e["tenant_id"], "acme");
    assert_eq!(e["channel"], "email");
    assert_eq!(e["provider"], "smtp");
    assert_eq!(e["attempt"], 1);
    assert_eq!(e["correlation_id"], "corr-1");
    // outcome keyed by notification id, no headers (schemas/README.md)
    let rec = outcomes
        .records
        .iter()
        .find(|r| r.json()["notification_id"] == id.as_str())
        .expect("record");
    assert_eq!(rec.key.as_deref(), Some(id.as_str()));
    assert!(rec.headers.is_empty(), "{:?}", rec.headers);

    let messages = sink.messages();
    assert_eq!(messages.len(), 1, "exactly one message at the SMTP sink");
    let m = &messages[0];
    assert!(m.contains("shop@example.com"), "sender in dump: {m}");
    for rcpt in ["ada@example.com", "cc@example.com", "audit@example.com"] {
        assert!(m.contains(rcpt), "{rcpt} is a recipient: {m}");
    }
    assert!(
        m.contains(&format!("Subject: Your order {id} shipped")),
        "subject rendered: {m}"
    );
    assert!(
        m.contains("Hello ada@example.com, it shipped."),
        "text part: {m}"
    );
    assert!(m.contains("multipart/alternative"), "html + text: {m}");
    assert!(m.contains("X-Campaign: spring"), "custom header: {m}");
    assert!(
        !m.to_ascii_lowercase().contains("\nbcc:"),
        "no Bcc header: {m}"
    );

    let pool = env.pool().await;
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM notifications WHERE id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!((status.as_str(), attempts), ("sent", 1));
    let log: (String, String) =
        sqlx::query_as("SELECT status, provider FROM delivery_attempts WHERE notification_id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .expect("attempt row");
    assert_eq!(log, ("sent".to_string(), "smtp".to_string()));

    let metrics = reqwest::get(format!("http://{}/metrics", app.http))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(
        metrics.contains("herald_outcomes_total{channel=\"email\",status=\"sent\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("herald_send_duration_seconds_bucket"),
        "{metrics}"
    );
    for stage in ["fetch", "queued", "process"] {
        assert!(
            metrics.contains(&format!(
                "herald_request_stage_seconds_count{{stage=\"{stage}\"}} 1"
            )),
            "{metrics}"
        );
    }
    let health = reqwest::get(format!("http://{}/healthz", app.http))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let ready = reqwest::get(format!("http://{}/readyz", app.http))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_request_is_posted_with_a_valid_signature() {
    let env = TestEnv::new(1).await;
    let sink = HttpSink::start().await;
    let app = RunningApp::start(env.settings(&[])).await;
    let id = format!("hook-{}", suffix());
    let request = json!({
        "id": id,
        "channel": "webhook",
        "recipient": { "url": sink.url("/hooks/orders") },
        "template": { "key": "order_shipped", "data": { "order_id": "A-17", "items": [{"name": "Tea"}, {"name": "Mug"}] } }
    });
    produce(
        &producer(),
        &env.requests,
        "k",
        request.to_string().as_bytes(),
    )
    .await;
    let mut outcomes = TopicReader::new(&env.outcomes, 1);
    let id2 = id.clone();
    assert!(
        outcomes
            .read_until(WAIT, |r| r
                .iter()
                .any(|x| x.json()["notification_id"] == id2.as_str()))
            .await
    );
    let events = outcomes.events();
    let mine = events_for(&events, &id);
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["status"], "sent", "{}", mine[0]);
    assert_eq!(mine[0]["provider"], "webhook");

    let got = sink.received();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    let h = |k: &str| {
        r.headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(h("webhook-id"), id);
    let ts = h("webhook-timestamp");
    assert!(ts.parse::<i64>().is_ok(), "timestamp header: {ts:?}");
    // Standard Webhooks: v1,base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}"))
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SIGNING_SECRET.as_bytes()).expect("hmac");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&r.body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert!(
        h("webhook-signature").split(' ').any(|s| s == expected),
        "signature {} != {expected}",
        h("webhook-signature")
    );
    let body: serde_json::Value = serde_json::from_slice(&r.body).expect("json body");
    assert_eq!(body["notification_id"], id.as_str());
    assert_eq!(body["data"]["order_id"], "A-17");
    let text = body["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("A-17") && text.contains("Tea") && text.contains("Mug"),
        "rendered template: {body}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_are_dead_lettered_and_the_partition_moves_on() {
    let env = TestEnv::new(1).await;
    let sink = HttpSink::start().await;
    let app = RunningApp::start(env.settings(&[])).await;
    let p = producer();
    let good_id = format!("good-{}", suffix());
    let schema_bad_id = format!("bad-schema-{}", suffix());
    let addr_bad_id = format!("bad-addr-{}", suffix());
    // All on one partition, same key: each must be settled before the next.
    produce(&p, &env.requests, "same", b"{not json").await;
    produce(&p, &env.requests, "same", &[0xff, 0xfe, 0x00]).await;
    produce(
        &p,
        &env.requests,
        "same",
        json!({"id": schema_bad_id, "channel": "carrier-pigeon", "recipient": {}})
            .to_string()
            .as_bytes(),
    )
    .await;
    produce(&p, &env.requests, "same", json!({"id": addr_bad_id, "channel": "email", "recipient": {"email": "not-an-address"}, "content": {"text": "x"}}).to_string().as_bytes()).await;
    produce(&p, &env.requests, "same", json!({"id": good_id, "channel": "webhook", "recipient": {"url": sink.url("/ok")}, "content": {"text": "fine"}}).to_string().as_bytes()).await;

    let mut dlq = TopicReader::new(&env.dlq, 1);
    assert!(
        dlq.read_until(WAIT, |r| r.len() >= 4).await,
        "4 dead letters, got {}",
        dlq.records.len()
    );
    let codes: Vec<String> = dlq
        .records
        .iter()
        .map(|r| r.headers["herald-error-code"].clone())
        .collect();
    assert_eq!(
        codes,
        vec![
            "invalid_json",
            "invalid_json",
            "schema_violation",
            "invalid_address"
        ]
    );
    assert_eq!(dlq.records[0].payload, b"{not json");
    for r in &dlq.records {
        assert_eq!(r.headers["herald-source-topic"], env.requests);
        assert_eq!(r.headers["herald-source-partition"], "0");
        assert!(!r.headers["herald-error"].is_empty());
    }
    let offsets: Vec<&str> = dlq
        .records
        .iter()
        .map(|r| r.headers["herald-source-offset"].as_str())
        .collect();
    assert_eq!(offsets, vec!["0", "1", "2", "3"]);
    assert!(
        dlq.records[3].headers["herald-error"].contains("recipient.email"),
        "names the field: {:?}",
        dlq.records[3].headers
    );

    let mut outcomes = TopicReader::new(&env.outcomes, 1);
    let g = good_id.clone();
    assert!(
        outcomes
            .read_until(WAIT, |r| r
                .iter()
                .any(|x| x.json()["notification_id"] == g.as_str()))
            .await
    );
    let events = outcomes.events();
    for bad in [&schema_bad_id, &addr_bad_id] {
        let e = events_for(&events, bad);
        assert_eq!(e.len(), 1, "one rejected outcome for {bad}");
        assert_eq!(e[0]["status"], "rejected");
        assert_eq!(e[0]["error"]["retryable"], false);
    }
    assert_eq!(events_for(&events, &good_id)[0]["status"], "sent");
    assert_eq!(sink.received().len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_request_twice_sends_one_email() {
    let env = TestEnv::new(2).await;
    let sink = SmtpSink::start();
    let app =
        RunningApp::start(env.settings(&[("HERALD_SMTP__PORT", sink.port.to_string())])).await;
    let id = format!("dup-{}", suffix());
    let request = json!({"id": id, "channel": "email", "recipient": {"email": "bob@example.com"}, "content": {"subject": "Once", "text": "only once"}});
    let p = producer();
    produce(&p, &env.requests, "bob", request.to_string().as_bytes()).await;
    produce(&p, &env.requests, "bob", request.to_string().as_bytes()).await;
    let marker = format!("after-{}", suffix());
    let after = json!({"id": marker, "channel": "email", "recipient": {"email": "bob@example.com"}, "content": {"subject": "Marker", "text": "x"}});
    produce(&p, &env.requests, "bob", after.to_string().as_bytes()).await;
    let mut outcomes = TopicReader::new(&env.outcomes, 2);
    let (m, d) = (marker.clone(), id.clone());
    // Outcomes are keyed by notification id, so they may sit on different partitions.
    assert!(
        outcomes
            .read_until(WAIT, |r| {
                let seen = |x: &str| r.iter().any(|rec| rec.json()["notification_id"] == x);
                seen(&m) && seen(&d)
            })
            .await
    );
    // Same key → processed in order, so both copies of `id` were handled before the marker.
    let events = outcomes.events();
    let finals = finals_by_notification(&events);
    assert_eq!(
        finals[&id].len(),
        1,
        "one distinct final outcome (re-publication keeps the event id)"
    );
    assert_eq!(
        sink.count(),
        2,
        "one email for the duplicated request + one for the marker"
    );
    let dumps = sink.messages();
    assert_eq!(dumps.iter().filter(|m| m.contains("only once")).count(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn template_errors_and_missing_adapters_fail_without_sending() {
    let env = TestEnv::new(1).await;
    let sink = HttpSink::start().await;
    let app = RunningApp::start(env.settings(&[])).await;
    let p = producer();
    let missing_var = format!("tmpl-{}", suffix());
    let no_adapter = format!("sms-{}", suffix());
    produce(&p, &env.requests, "a", json!({"id": missing_var, "channel": "webhook", "recipient": {"url": sink.url("/x")}, "content": {"text": "Hi {{ user.first_name }}"}}).to_string().as_bytes()).await;
    produce(&p, &env.requests, "a", json!({"id": no_adapter, "channel": "sms", "recipient": {"phone": "+14155550123"}, "content": {"text": "hello"}}).to_string().as_bytes()).await;
    let mut outcomes = TopicReader::new(&env.outcomes, 1);
    assert!(outcomes.read_until(WAIT, |r| r.len() >= 2).await);
    let events = outcomes.events();
    let t = events_for(&events, &missing_var);
    assert_eq!(t[0]["status"], "failed");
    assert_eq!(t[0]["error"]["code"], "template_error");
    assert!(
        t[0]["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("user"),
        "{}",
        t[0]
    );
    let s = events_for(&events, &no_adapter);
    assert_eq!(s[0]["status"], "failed");
    assert_eq!(s[0]["error"]["code"], "channel_unavailable");
    assert!(sink.received().is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_request_becomes_one_notification_per_recipient() {
    let env = TestEnv::new(1).await;
    let sink = HttpSink::start().await;
    let app = RunningApp::start(env.settings(&[])).await;
    let id = format!("batch-{}", suffix());
    let recipients: Vec<_> = (0..5)
        .map(|i| json!({"url": sink.url(&format!("/r{i}"))}))
        .collect();
    produce(&producer(), &env.requests, "b", json!({"id": id, "channel": "webhook", "recipients": recipients, "content": {"text": "hi"}}).to_string().as_bytes()).await;
    let mut outcomes = TopicReader::new(&env.outcomes, 1);
    assert!(outcomes.read_until(WAIT, |r| r.len() >= 5).await);
    let finals = finals_by_notification(&outcomes.events());
    for i in 0..5 {
        assert_eq!(finals[&format!("{id}:{i}")].len(), 1);
    }
    assert_eq!(sink.counts_by_id().len(), 5);
    app.stop().await;
}

/// `pipeline.max_concurrent_deliveries` bounds deliveries over the whole
/// instance, not per request: two batch requests on different keys (each
/// would send up to 16 at once) against a receiver that takes 100 ms never
/// have more than 3 requests open at the receiver together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_of_all_batches_together_stay_within_the_instance_bound() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const TURNS: usize = 3;
    let open = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let app = {
        let (open, most, served) = (open.clone(), most.clone(), served.clone());
        axum::Router::new().route(
            "/{*path}",
            axum::routing::post(move || {
                let (open, most, served) = (open.clone(), most.clone(), served.clone());
                async move {
                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                    served.fetch_add(1, Ordering::SeqCst);
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let addr = serve(app).await;

    let env = TestEnv::new(1).await;
    let app = RunningApp::start(env.settings(&[(
        "HERALD_PIPELINE__MAX_CONCURRENT_DELIVERIES",
        TURNS.to_string(),
    )]))
    .await;
    let p = producer();
    let mut ids = Vec::new();
    for b in 0..2 {
        let id = format!("turns-{b}-{}", suffix());
        let recipients: Vec<_> = (0..8)
            .map(|i| json!({"url": format!("http://{addr}/{b}/{i}")}))
            .collect();
        ids.extend((0..8).map(|i| format!("{id}:{i}")));
        let request = json!({"id": id, "channel": "webhook", "recipients": recipients,
            "content": {"text": "hi"}});
        produce(
            &p,
            &env.requests,
            &format!("key-{b}"),
            request.to_string().as_bytes(),
        )
        .await;
    }
    let mut outcomes = TopicReader::new(&env.outcomes, 1);
    assert!(outcomes.read_until(WAIT, |r| r.len() >= ids.len()).await);
    let finals = finals_by_notification(&outcomes.events());
    for id in &ids {
        assert_eq!(finals[id].len(), 1, "{id}");
    }
    app.stop().await;
    assert_eq!(served.load(Ordering::SeqCst), ids.len());
    // Exactly the bound: lower would mean the batches ran one at a time.
    assert_eq!(most.load(Ordering::SeqCst), TURNS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retryable_failures_retry_with_growing_backoff_and_permanent_ones_do_not() {
    let env = TestEnv::new(1).await;
    let sink = HttpSink::start().await;
    let app = RunningApp::start(env.settings(&[
        ("HERALD_ROUTING__BUILTIN_MAX_RETRIES", "3".into()),
        ("HERALD_ROUTING__RETRY_BASE_MS", "400".into()),
    ]))
    .await;
    let p = producer();
    let mut outcomes = TopicReader::new(&env.outcomes, 1);
    let request = |id: &str, path: &str| {
        json!({"id": id, "channel": "webhook", "recipient": {"url": sink.url(path)}, "content": {"text": "x"}})
            .to_string()
    };

    // 503 twice: two `retrying` outcomes, the second due later than the
    // first; then the endpoint recovers and the third try is `sent`.
    *sink.status.lock().expect("lock") = 503;
    let a = format!("r503-{}", suffix());
    produce(&p, &env.requests, "k", request(&a, "/a").as_bytes()).await;
    assert!(
        outcomes
            .read_until(WAIT, |r| r
                .iter()
                .filter(|r| r.json()["status"] == "retrying")
                .count()
                >= 2)
            .await
    );
    *sink.status.lock().expect("lock") = 200;
    assert!(
        outcomes
            .read_until(WAIT, |r| r.iter().any(|r| r.json()["status"] == "sent"))
            .await
    );
    let events = outcomes.events();
    let ev = events_for(&events, &a);
    let statuses: Vec<_> = ev
        .iter()
        .map(|e| e["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses, ["retrying", "retrying", "sent"], "{ev:?}");
    let due = |e: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(e["next_attempt_at"].as_str().expect("due time"))
            .expect("rfc3339")
    };
    let occurred = |e: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(e["occurred_at"].as_str().expect("occurred_at"))
            .expect("rfc3339")
    };
    let first_wait = due(ev[0]) - occurred(ev[0]);
    let second_wait = due(ev[1]) - occurred(ev[1]);
    // Equal jitter: retry 1 waits 200-400 ms, retry 2 waits 400-800 ms.
    assert!(first_wait.num_milliseconds() >= 190, "{first_wait}");
    assert!(second_wait.num_milliseconds() >= 390, "{second_wait}");
    assert_eq!(ev[0]["error"]["code"], "http_status", "{}", ev[0]);
    assert_eq!(ev[0]["error"]["retryable"], true);
    assert_eq!(ev[2]["attempt"], 3, "{}", ev[2]);
    let sent_a = sink
        .received()
        .iter()
        .filter(|r| r.headers.get("webhook-id").and_then(|v| v.to_str().ok()) == Some(a.as_str()))
        .count();
    assert_eq!(sent_a, 3, "three calls: 503, 503, 200");

    // 429 with Retry-After: 2 → due no sooner than 2 s later.
    *sink.status.lock().expect("lock") = 429;
    *sink.headers.lock().expect("lock") = vec![("Retry-After".into(), "2".into())];
    let c = format!("r429-{}", suffix());
    produce(&p, &env.requests, "k", request(&c, "/c").as_bytes()).await;
    assert!(
        outcomes
            .read_until(WAIT, |r| r
                .iter()
                .any(|r| r.json()["notification_id"] == c.as_str()))
            .await
    );
    *sink.status.lock().expect("lock") = 400;
    sink.headers.lock().expect("lock").clear();
    let events = outcomes.events();
    let ec = events_for(&events, &c);
    assert_eq!(ec[0]["status"], "retrying", "{}", ec[0]);
    assert_eq!(ec[0]["error"]["code"], "rate_limited", "{}", ec[0]);
    let wait = due(ec[0]) - occurred(ec[0]);
    assert!(
        wait.num_milliseconds() >= 1990,
        "Retry-After honoured: {wait}"
    );

    // 400: failed at once, not retried.
    let b = format!("r400-{}", suffix());
    produce(&p, &env.requests, "k", request(&b, "/b").as_bytes()).await;
    assert!(
        outcomes
            .read_until(WAIT, |r| r
                .iter()
                .any(|r| r.json()["notification_id"] == b.as_str()))
            .await
    );
    let events = outcomes.events();
    let eb = events_for(&events, &b);
    assert_eq!(eb.len(), 1, "{eb:?}");
    assert_eq!(eb[0]["status"], "failed");
    assert_eq!(eb[0]["error"]["retryable"], false, "{}", eb[0]);
    // The 429'd one retries after its 2 s against the 400 endpoint and fails.
    assert!(
        outcomes
            .read_until(WAIT, |r| r.iter().any(|r| r.json()["notification_id"]
                == c.as_str()
                && r.json()["status"] == "failed"))
            .await
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_run_out_then_failed() {
    let env = TestEnv::new(1).await;
    let sink = HttpSink::start().await;
    *sink.status.lock().expect("lock") = 503;
    let app = RunningApp::start(env.settings(&[
        ("HERALD_ROUTING__BUILTIN_MAX_RETRIES", "2".into()),
        ("HERALD_ROUTING__RETRY_BASE_MS", "100".into()),
    ]))
    .await;
    let id = format!("exhaust-{}", suffix());
    produce(&producer(), &env.requests, "k", json!({"id": id, "channel": "webhook", "recipient": {"url": sink.url("/x")}, "content": {"text": "x"}}).to_string().as_bytes()).await;
    let mut outcomes = TopicReader::new(&env.outcomes, 1);
    assert!(
        outcomes
            .read_until(WAIT, |r| r.iter().any(|r| r.json()["status"] == "failed"))
            .await
    );
    let events = outcomes.events();
    let statuses: Vec<_> = events_for(&events, &id)
        .iter()
        .map(|e| e["status"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(statuses, ["retrying", "retrying", "failed"]);
    assert_eq!(sink.received().len(), 3, "first try + 2 retries");
    let row: (String, i32, i32, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
        "SELECT status, attempts, retries, failed_at FROM notifications WHERE id = $1",
    )
    .bind(&id)
    .fetch_one(&env.pool().await)
    .await
    .expect("row");
    assert_eq!((row.0.as_str(), row.1, row.2), ("failed", 3, 2));
    assert!(row.3.is_some(), "failed_at set");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_copies_of_a_request_under_different_keys_send_once() {
    let env = TestEnv::new(4).await;
    let sink = HttpSink::start().await;
    let app = RunningApp::start(env.settings(&[])).await;
    let p = producer();
    let ids: Vec<String> = (0..20).map(|i| format!("copy-{}-{i}", env.id)).collect();
    // Ten copies of each request under different keys: they land on different
    // partitions and lanes and are processed concurrently.
    for copy in 0..10 {
        for id in &ids {
            let body = json!({"id": id, "channel": "webhook", "recipient": {"url": sink.url("/c")}, "content": {"text": "once"}});
            produce(
                &p,
                &env.requests,
                &format!("k-{copy}-{id}"),
                body.to_string().as_bytes(),
            )
            .await;
        }
    }
    let mut outcomes = TopicReader::new(&env.outcomes, 4);
    // Every copy publishes (or re-publishes) an outcome: 200 records.
    assert!(
        outcomes.read_until(WAIT, |r| r.len() >= 200).await,
        "got {}",
        outcomes.records.len()
    );
    let finals = finals_by_notification(&outcomes.events());
    let counts = sink.counts_by_id();
    for id in &ids {
        assert_eq!(finals[id].len(), 1, "{id}: one distinct final outcome");
        assert_eq!(
            counts.get(id).copied(),
            Some(1),
            "{id}: exactly one delivery"
        );
    }
    app.stop().await;
}

/// Every statement on the hot path reads `notifications` and
/// `delivery_attempts` by index, however young the tables are. (A prepared
/// statement keeps the plan chosen while its tables were small; before
/// Herald's connections turned `enable_seqscan` off, the batched finish kept
/// scanning both tables whole as they grew.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_database_is_read_by_index_not_scanned() {
    const N: usize = 300;
    let env = TestEnv::new(2).await;
    let sink = HttpSink::start().await;
    // One connection, so "every other backend" below is exactly the app's.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&env.database_url)
        .await
        .expect("connect test database");
    let counters = |pool: sqlx::PgPool| async move {
        sqlx::query_as::<_, (String, i64, i64, i64)>(
            "SELECT relname, seq_scan, n_tup_ins, n_tup_upd FROM pg_stat_user_tables
             WHERE relname IN ('notifications', 'delivery_attempts') ORDER BY relname",
        )
        .fetch_all(&pool)
        .await
        .expect("table statistics")
    };
    // A backend reports its table statistics when it exits, and the
    // migrations' scans (each CREATE INDEX reads its table: 16 on
    // `notifications`, 2 on `delivery_attempts`) belong to the setup's pool.
    // Take the baseline once its connections are gone and the counters have
    // settled, or a loaded machine reports them after the baseline, as scans
    // of the app (seen once: exactly 16 and 2).
    let others = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&pool)
        .await
        .expect("backends")
    };
    let mut before = counters(pool.clone()).await;
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = counters(pool.clone()).await;
        if others().await == 0 && now == before {
            break;
        }
        before = now;
    }

    let app = RunningApp::start(env.settings(&[])).await;
    let p = producer();
    for wave in 0..6 {
        for i in 0..N / 6 {
            let id = format!("idx-{wave}-{i}-{}", suffix());
            let request = json!({
                "id": id,
                "channel": "webhook",
                "recipient": { "url": sink.url("/hooks/index") },
                "content": { "text": "hello" }
            });
            produce(&p, &env.requests, &id, request.to_string().as_bytes()).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let mut outcomes = TopicReader::new(&env.outcomes, env.partitions);
    assert!(
        outcomes
            .read_until(WAIT, |r| r
                .iter()
                .filter(|x| x.json()["status"] == "sent")
                .count()
                >= N)
            .await,
        "all {N} sent"
    );
    app.stop().await;
    assert_eq!(sink.received().len(), N);

    // A backend reports its table statistics when it exits: wait until every
    // connection of the app has left the database (so no backend's scans are
    // still unreported) and the writes show, then compare.
    let mut after = counters(pool.clone()).await;
    for _ in 0..300 {
        let flushed = after
            .iter()
            .zip(&before)
            .all(|(a, b)| a.2 - b.2 >= N as i64 && a.3 - b.3 >= N as i64);
        if flushed && others().await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = counters(pool.clone()).await;
    }
    assert_eq!(others().await, 0, "the app's connections closed");
    for (a, b) in after.iter().zip(&before) {
        assert!(
            a.2 - b.2 >= N as i64 && a.3 - b.3 >= N as i64,
            "{}: statistics never showed the writes: {before:?} → {after:?}",
            a.0
        );
        assert_eq!(
            a.1, b.1,
            "{}: sequential scans: {before:?} → {after:?}",
            a.0
        );
    }
}
