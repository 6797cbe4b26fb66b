//! Provider routing through the real path: registered providers (local HTTP
//! stand-ins on 127.0.0.1), fallback, circuit breakers, global rate limits.

use std::time::{Duration, Instant};

use herald::routing::ProviderType;
use herald::routing::store::NewProvider;
use serde_json::json;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(60);

/// attempt, provider, status, error_code, retryable, provider_message_id
type AttemptRow = (
    i32,
    String,
    String,
    Option<String>,
    Option<bool>,
    Option<String>,
);

fn email_request(id: &str, to: &str) -> Vec<u8> {
    json!({"id": id, "channel": "email", "recipient": {"email": to},
           "content": {"subject": "Hello", "text": "Plain text body"}})
    .to_string()
    .into_bytes()
}

fn webhook_request(id: &str, url: &str) -> Vec<u8> {
    json!({"id": id, "channel": "webhook", "recipient": {"url": url}, "content": {"text": "x"}})
        .to_string()
        .into_bytes()
}

fn sendgrid(name: &str, sink: &HttpSink, priority: i32) -> NewProvider {
    let mut p = NewProvider::new(name, ProviderType::Sendgrid);
    p.config =
        json!({"base_url": format!("http://{}", sink.addr), "from": "Herald <herald@example.com>"});
    p.credentials = Some(secrecy::SecretString::from(
        json!({"api_key": "SG.test-key"}).to_string(),
    ));
    p.priority = priority;
    p
}

async fn metrics_text(port: u16) -> String {
    let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return String::new();
    };
    r.text().await.unwrap_or_default()
}

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Primary answers 503: the fallback sends, the outcome names it, the
/// delivery log has both tries. After `threshold` failures the primary's
/// circuit opens and it is no longer called; `/readyz` and `/metrics` say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_primary_falls_back_and_its_circuit_opens() {
    let env = TestEnv::new(1).await;
    let primary = HttpSink::start().await;
    *primary.status.lock().expect("lock") = 503;
    let fallback = HttpSink::start().await;
    *fallback.status.lock().expect("lock") = 202;
    *fallback.headers.lock().expect("lock") = vec![("X-Message-Id".into(), "sg-msg-42".into())];
    register_provider(&env, sendgrid("sg-primary", &primary, 1)).await;
    register_provider(&env, sendgrid("sg-fallback", &fallback, 2)).await;
    let port = free_port();
    let app = RunningApp::start(env.settings(&[
        ("HERALD_ROUTING__BREAKER_FAILURE_THRESHOLD", "2".into()),
        ("HERALD_ROUTING__BREAKER_COOLDOWN_MS", "600000".into()),
        ("HERALD_HTTP__BIND", format!("127.0.0.1:{port}")),
    ]))
    .await;
    let p = producer();
    let ids: Vec<String> = (0..5).map(|i| format!("fb-{i}-{}", suffix())).collect();
    let mut outcomes = TopicReader::new(&env.outcomes, 1);
    // One at a time (same key), so the breaker sees them in order.
    for id in &ids {
        produce(
            &p,
            &env.requests,
            "k",
            &email_request(id, "ann@example.com"),
        )
        .await;
    }
    assert!(
        outcomes
            .read_until(WAIT, |r| r
                .iter()
                .filter(|r| r.json()["status"] == "sent")
                .count()
                >= 5)
            .await
    );
    let events = outcomes.events();
    for id in &ids {
        let e: Vec<_> = events
            .iter()
            .filter(|e| e["notification_id"] == id.as_str())
            .collect();
        assert_eq!(e.len(), 1, "one outcome: {e:?}");
        assert_eq!(e[0]["status"], "sent");
        assert_eq!(e[0]["provider"], "sg-fallback", "{}", e[0]);
        assert_eq!(e[0]["provider_message_id"], "sg-msg-42");
    }
    assert_eq!(
        primary.received().len(),
        2,
        "the circuit opened after 2 failures; later sends skipped the primary"
    );
    assert_eq!(fallback.received().len(), 5);
    assert!(
        fallback
            .received()
            .iter()
            .all(|r| r.path == "/v3/mail/send"),
        "SendGrid's mail send path"
    );

    // The delivery log of the first notification: both tries.
    let rows: Vec<AttemptRow> = sqlx::query_as(
        "SELECT attempt, provider, status, error_code, retryable, provider_message_id
             FROM delivery_attempts WHERE notification_id = $1 ORDER BY attempt",
    )
    .bind(&ids[0])
    .fetch_all(&env.pool().await)
    .await
    .expect("attempts");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (rows[0].0, rows[0].1.as_str(), rows[0].2.as_str()),
        (1, "sg-primary", "failed")
    );
    assert_eq!(rows[0].4, Some(true), "retryable");
    assert!(rows[0].3.is_some(), "error code recorded");
    assert_eq!(
        (rows[1].0, rows[1].1.as_str(), rows[1].2.as_str()),
        (2, "sg-fallback", "sent")
    );
    assert_eq!(rows[1].5.as_deref(), Some("sg-msg-42"));

    // The breaker is visible.
    let ready: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(
        ready["providers"]["circuits"]["sg-primary"], "open",
        "{ready}"
    );
    let m = metrics_text(port).await;
    assert_eq!(
        metric(&m, "herald_provider_circuit_state{provider=\"sg-primary\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "herald_provider_fallbacks_total{channel=\"email\",provider=\"sg-primary\"}"
        ),
        Some(2.0)
    );
    app.stop().await;
}

/// An inactive provider is never used; a tenant's own provider wins over the
/// global one for that tenant only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inactive_providers_are_skipped_and_tenant_providers_win() {
    let env = TestEnv::new(1).await;
    let global = HttpSink::start().await;
    let tenant = HttpSink::start().await;
    let inactive = HttpSink::start().await;
    for s in [&global, &tenant, &inactive] {
        *s.status.lock().expect("lock") = 202;
    }
    let mut off = sendgrid("sg-off", &inactive, 0);
    off.status = herald::routing::store::ProviderStatus::Inactive;
    register_provider(&env, off).await;
    register_provider(&env, sendgrid("sg-global", &global, 10)).await;
    let mut t = sendgrid("sg-acme", &tenant, 50);
    t.tenant_id = Some("acme".into());
    register_provider(&env, t).await;
    let app = RunningApp::start(env.settings(&[])).await;
    let p = producer();
    let a = format!("ten-a-{}", suffix());
    let b = format!("ten-b-{}", suffix());
    let with_tenant = json!({"id": a, "tenant_id": "acme", "channel": "email",
        "recipient": {"email": "x@example.com"}, "content": {"subject": "s", "text": "t"}});
    produce(&p, &env.requests, "k", with_tenant.to_string().as_bytes()).await;
    produce(&p, &env.requests, "k", &email_request(&b, "y@example.com")).await;
    let mut outcomes = TopicReader::new(&env.outcomes, 1);
    assert!(outcomes.read_until(WAIT, |r| r.len() >= 2).await);
    let events = outcomes.events();
    let provider_of = |id: &str| {
        events
            .iter()
            .find(|e| e["notification_id"] == id)
            .map(|e| e["provider"].clone())
    };
    assert_eq!(provider_of(&a), Some(json!("sg-acme")));
    assert_eq!(provider_of(&b), Some(json!("sg-global")));
    assert!(inactive.received().is_empty());
    app.stop().await;
}

/// One final outcome per request, each notification at the sink exactly
/// once, and the sink's send rate within the provider's 20/s (+10%).
fn assert_each_sent_once_within_the_limit(
    events: &[serde_json::Value],
    ids: &[String],
    sink: &HttpSink,
) {
    let finals = finals_by_notification(events);
    for id in ids {
        assert_eq!(finals.get(id).map(|s| s.len()), Some(1), "{id}");
    }
    let counts = sink.counts_by_id();
    assert_eq!(counts.len(), LIMITED, "every notification reached the sink");
    assert!(counts.values().all(|c| *c == 1), "exactly once each");
    let rate = send_rate(sink);
    assert!(rate <= 22.0, "send rate {rate:.1}/s exceeds 20/s + 10%");
}

/// Sends per second at the sink over the whole run: (n - 1) / span.
fn send_rate(sink: &HttpSink) -> f64 {
    let mut at: Vec<Instant> = sink.received().iter().map(|r| r.at).collect();
    at.sort();
    match (at.first(), at.last()) {
        (Some(a), Some(b)) if at.len() > 1 => (at.len() - 1) as f64 / (*b - *a).as_secs_f64(),
        _ => 0.0,
    }
}

fn limited_webhook(name: &str, per_second: u32) -> NewProvider {
    let mut p = NewProvider::new(name, ProviderType::Webhook);
    p.rate_limit_per_second = Some(per_second);
    p
}

const LIMITED: usize = 200;

/// Produces [`LIMITED`] webhook requests to `sink`, one key each.
async fn produce_limited(env: &TestEnv, sink: &HttpSink, prefix: &str) -> Vec<String> {
    let p = producer();
    let ids: Vec<String> = (0..LIMITED)
        .map(|i| format!("{prefix}-{i}-{}", suffix()))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        produce(
            &p,
            &env.requests,
            &format!("user-{i}"),
            &webhook_request(id, &sink.url("/rl")),
        )
        .await;
    }
    ids
}

/// 200 requests to a provider limited to 20/s, one instance: the sink sees
/// at most 20/s (+10%), and every request is sent exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_provider_is_held_to_its_limit_by_one_instance() {
    let env = TestEnv::new(4).await;
    let sink = HttpSink::start().await;
    register_provider(&env, limited_webhook("hook-20", 20)).await;
    let app = RunningApp::start(env.settings(&[])).await;
    let ids = produce_limited(&env, &sink, "rl1").await;
    let mut outcomes = TopicReader::new(&env.outcomes, env.partitions);
    assert!(
        outcomes
            .read_until(Duration::from_secs(120), |r| {
                finals_by_notification(&r.iter().map(Record::json).collect::<Vec<_>>()).len()
                    >= LIMITED
            })
            .await,
        "every request finished"
    );
    assert_each_sent_once_within_the_limit(&outcomes.events(), &ids, &sink);
    // Some had to wait as due rows (200 at once cannot pass in 2 s).
    let throttled = outcomes
        .events()
        .iter()
        .filter(|e| e["status"] == "throttled" && e["reason"] == "provider_rate_limit")
        .count();
    assert!(throttled > 0, "no request was deferred by the rate limit");
    app.stop().await;
}

/// The same with two instances in the group: each takes half the quota
/// (owned / all partitions), so together they stay within 20/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_together_stay_within_a_provider_rate_limit() {
    let env = TestEnv::new(4).await;
    let sink = HttpSink::start().await;
    register_provider(&env, limited_webhook("hook-20", 20)).await;
    let logs = tempfile::tempdir().expect("tmp");
    let ports = [free_port(), free_port()];
    let mut procs: Vec<HeraldProcess> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            HeraldProcess::spawn(
                env.vars(&[("HERALD_HTTP__BIND", format!("127.0.0.1:{port}"))]),
                &logs.path().join(format!("h{i}.log")),
            )
        })
        .collect();
    // Wait until each owns half of the partitions.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut shares = Vec::new();
        for port in ports {
            shares.push(metric(
                &metrics_text(port).await,
                "herald_provider_rate_share",
            ));
        }
        if shares.iter().all(|s| *s == Some(0.5)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the two instances did not split the partitions: {shares:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ids = produce_limited(&env, &sink, "rl2").await;
    let mut outcomes = TopicReader::new(&env.outcomes, env.partitions);
    let done = outcomes
        .read_until(Duration::from_secs(120), |r| {
            finals_by_notification(&r.iter().map(Record::json).collect::<Vec<_>>()).len() >= LIMITED
        })
        .await;
    for h in procs.iter_mut() {
        h.terminate();
    }
    assert!(done, "every request finished");
    assert_each_sent_once_within_the_limit(&outcomes.events(), &ids, &sink);
}

/// One key's requests wait on a slow rate limit; other keys on the same
/// partition (another channel) keep flowing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_keys_flow_while_one_waits_on_a_rate_limit() {
    let env = TestEnv::new(1).await;
    let hooks = HttpSink::start().await;
    let smtp = SmtpSink::start();
    register_provider(&env, limited_webhook("hook-2", 2)).await;
    let app =
        RunningApp::start(env.settings(&[("HERALD_SMTP__PORT", smtp.port.to_string())])).await;
    let p = producer();
    let slow: Vec<String> = (0..20).map(|i| format!("slow-{i}-{}", suffix())).collect();
    for id in &slow {
        produce(
            &p,
            &env.requests,
            "slow-key",
            &webhook_request(id, &hooks.url("/slow")),
        )
        .await;
    }
    let fast: Vec<String> = (0..20).map(|i| format!("fast-{i}-{}", suffix())).collect();
    for (i, id) in fast.iter().enumerate() {
        produce(
            &p,
            &env.requests,
            &format!("fast-{i}"),
            &email_request(id, "f@example.com"),
        )
        .await;
    }
    let mut outcomes = TopicReader::new(&env.outcomes, 1);
    let sent = |r: &[Record], ids: &[String]| {
        r.iter()
            .filter(|r| {
                let e = r.json();
                e["status"] == "sent" && ids.iter().any(|id| e["notification_id"] == id.as_str())
            })
            .count()
    };
    assert!(
        outcomes.read_until(WAIT, |r| sent(r, &fast) >= 20).await,
        "the emails behind the rate-limited key were all sent"
    );
    let hooks_sent = hooks.received().len();
    assert!(
        hooks_sent < slow.len(),
        "the emails finished before the rate-limited key's 20 webhooks ({hooks_sent} sent)"
    );
    // And the slow key's requests all arrive eventually, once each.
    assert!(outcomes.read_until(WAIT, |r| sent(r, &slow) >= 20).await);
    assert_eq!(hooks.counts_by_id().len(), 20);
    app.stop().await;
}

/// When every provider's circuit is open, a notification waits as a due row
/// (`retrying`, reason `circuit_open`) without a call, and the round counts
/// as a retry: for a fresh notification (stored with its claim) and for a due
/// row fired again (stored with its settle). Once a trial send gets through,
/// both are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_every_circuit_open_notifications_wait_and_count_the_round() {
    let env = TestEnv::new(1).await;
    let down = HttpSink::start().await;
    *down.status.lock().expect("lock") = 503;
    let up = HttpSink::start().await;
    let app = RunningApp::start(env.settings(&[
        ("HERALD_ROUTING__BUILTIN_MAX_RETRIES", "10".into()),
        ("HERALD_ROUTING__BREAKER_FAILURE_THRESHOLD", "1".into()),
        ("HERALD_ROUTING__BREAKER_COOLDOWN_MS", "3000".into()),
    ]))
    .await;
    let p = producer();
    let mut out = TopicReader::new(&env.outcomes, 1);
    let s = suffix();
    let (failing, waiting) = (format!("co-fail-{s}"), format!("co-wait-{s}"));
    let pool = env.pool().await;
    let retries = |id: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>("SELECT retries FROM notifications WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("retries")
        }
    };
    // The first failure opens the webhook provider's circuit for 3 s.
    produce(
        &p,
        &env.requests,
        "k",
        &webhook_request(&failing, &down.url("a")),
    )
    .await;
    out.wait_for(WAIT, &[(&failing, "retrying")]).await;
    // A fresh notification finds it open: it waits without a call.
    produce(
        &p,
        &env.requests,
        "k",
        &webhook_request(&waiting, &up.url("b")),
    )
    .await;
    out.wait_for(WAIT, &[(&waiting, "retrying")]).await;
    let first = event(&out.events(), &waiting, "retrying");
    assert_eq!(first["reason"], "circuit_open", "{first}");
    assert_eq!(first["error"]["code"], "circuit_open", "{first}");
    assert_eq!(retries(waiting.clone()).await, 1, "the round counts");
    assert!(up.received().is_empty(), "nothing was called");
    // The failed one is due again 200 ms later, and finds the circuit open.
    let read = out
        .read_until(WAIT, |r| {
            r.iter().any(|x| {
                let v = x.json();
                v["notification_id"] == failing.as_str()
                    && v["status"] == "retrying"
                    && v["reason"] == "circuit_open"
            })
        })
        .await;
    assert!(read, "{:?}", statuses(&out.events(), &failing));
    assert_eq!(retries(failing.clone()).await, 2, "its second round counts");
    assert_eq!(down.received().len(), 1, "no call while open");

    // The endpoint recovers: once the circuit lets a trial through, both
    // are sent.
    *down.status.lock().expect("lock") = 200;
    out.wait_for(WAIT, &[(&waiting, "sent"), (&failing, "sent")])
        .await;
    assert_eq!(down.received().len(), 2, "the failed try and the send");
    assert_eq!(up.received().len(), 1, "sent once");
    app.stop().await;
}
