//! Downstream failures: the HTTP endpoint answers 500, 429 with Retry-After,
//! or hangs past the webhook timeout, and then recovers; the SMTP relay is
//! down for 10 s.
//!
//! With retries on (the built-in providers' `routing.builtin_max_retries`):
//! every request reaches the sink once it recovers, is accepted there
//! exactly once, and its outcome stream shows `retrying` before `sent`. An
//! endpoint that never recovers gets exactly `1 + max_retries` attempts and
//! a `failed` outcome with `error.retryable = true`. Nothing is lost and no
//! partition is stuck.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;
use crate::support::*;

/// Retries of the built-in providers in these scenarios.
const WEBHOOK_RETRIES: usize = 3;

/// The statuses published for each notification, in the order read.
fn statuses_by_id(events: &[serde_json::Value]) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for e in events {
        if let (Some(id), Some(status)) = (e["notification_id"].as_str(), e["status"].as_str()) {
            out.entry(id.to_string())
                .or_default()
                .push(status.to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_500_429_and_hanging_endpoints_are_retried_until_delivered() {
    let per_mode = scale(150, 1000);
    let f = Faults::shared(4).await;
    let sink = FaultSink::start().await;
    let (_logs, logs) =
        log_dir("webhook_500_429_and_hanging_endpoints_are_retried_until_delivered");
    let log = logs.join("herald.log");
    let mut herald = HeraldProcess::spawn(
        f.vars(&[
            ("HERALD_WEBHOOK__TIMEOUT_MS", "1000".into()),
            // Every request may hold a connection to the one sink host at
            // once: a send never waits for a turn (and fails on that wait),
            // so each attempt reaches the endpoint.
            ("HERALD_WEBHOOK__MAX_CONNECTIONS_PER_HOST", "8192".into()),
            (
                "HERALD_ROUTING__BUILTIN_MAX_RETRIES",
                WEBHOOK_RETRIES.to_string(),
            ),
            ("HERALD_ROUTING__RETRY_BASE_MS", "200".into()),
            ("HERALD_ROUTING__RETRY_CAP_MS", "1000".into()),
        ]),
        &log,
    );
    // See FaultSink: how each mode answers, attempt by attempt.
    let modes = ["ok", "s500", "s429", "hang", "dead"];
    let mut ids_by_mode: HashMap<&str, Vec<String>> = HashMap::new();
    let mut messages = Vec::new();
    for i in 0..per_mode {
        for m in modes {
            let id = format!("sink-{}-{m}-{i}", f.env.id);
            messages.push((
                format!("user-{}", i % 31),
                webhook_request(&id, &sink.url(m, &id)),
            ));
            ids_by_mode.entry(m).or_default().push(id);
        }
    }
    let all: Vec<String> = ids_by_mode.values().flatten().cloned().collect();
    produce_all(&f.producer(), &f.env.requests, messages).await;
    let mut outcomes = f.reader(&f.env.outcomes);
    f.settle(
        &mut herald,
        &mut outcomes,
        &all,
        &log,
        Duration::from_secs(240),
    )
    .await;

    let events = outcomes.events();
    let finals = one_final_each(&events, &all);
    let statuses = statuses_by_id(&events);
    let receipts = sink.receipts();
    let mut retry_after_gaps = Vec::new();
    for (mode, ids) in &ids_by_mode {
        for id in ids {
            let e = finals[id];
            let got = receipts.get(id).cloned().unwrap_or_default();
            let accepted = got.iter().filter(|r| r.accepted).count();
            let seen = &statuses[id];
            let retrying = seen.iter().filter(|s| *s == "retrying").count();
            // Attempts the endpoint saw: the failing ones, then the one it accepted.
            let expected = match *mode {
                "ok" => 1,
                "s500" => 3,
                "s429" | "hang" => 2,
                _ => 1 + WEBHOOK_RETRIES,
            };
            assert_eq!(
                got.len(),
                expected,
                "{id}: receipts {got:?}, outcomes {seen:?}"
            );
            assert_eq!(retrying, expected - 1, "{id}: outcomes {seen:?}");
            assert_eq!(
                seen.last().map(String::as_str),
                Some(e["status"].as_str().unwrap_or_default()),
                "{id}: the final outcome is the last one: {seen:?}"
            );
            if *mode == "dead" {
                assert_eq!(e["status"], "failed", "{id}: {e}");
                assert_eq!(e["error"]["retryable"], true, "{id}: {e}");
                assert_eq!(accepted, 0, "{id}");
            } else {
                assert_eq!(e["status"], "sent", "{id}: {e}");
                assert_eq!(accepted, 1, "{id}: accepted exactly once");
            }
            if *mode == "s429" {
                retry_after_gaps.push(got[1].at.duration_since(got[0].at));
            }
        }
    }
    // The 429 said `Retry-After: 1`; the backoff alone would be 100-200 ms.
    let shortest = retry_after_gaps.iter().min().copied().unwrap_or_default();
    assert!(
        shortest >= Duration::from_millis(950),
        "a 429 was retried after {shortest:?}, before its Retry-After"
    );
    eprintln!("webhook faults: {per_mode} per mode; shortest retry after a 429: {shortest:?}");
}

async fn wait_all(outcomes: &mut TopicReader, ids: &[String], log: &std::path::Path) {
    let ok = read_events_until(outcomes, Duration::from_secs(180), |e| all_final(e, ids)).await;
    assert!(ok, "phase did not finish; log:\n{}", log_tail(log));
}

fn email_request(id: &str, i: usize) -> Vec<u8> {
    json!({"id": id, "channel": "email", "recipient": {"email": format!("user{i}@example.com")},
        "content": {"subject": "fault {{ notification.id }}", "text": "hello"}})
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smtp_relay_down_for_ten_seconds_is_retried_until_delivered() {
    let per_phase = scale(200, 1500);
    let f = Faults::shared(4).await;
    let mut smtp = RestartableSmtp::start();
    let (_logs, logs) = log_dir("smtp_relay_down_for_ten_seconds_is_retried_until_delivered");
    let log = logs.join("herald.log");
    // Ten retries 0.5 s apart, doubling up to 4 s: with the "equal jitter"
    // backoff they span at least 15.75 s, more than the outage.
    let mut herald = HeraldProcess::spawn(
        f.vars(&[
            ("HERALD_SMTP__PORT", smtp.port.to_string()),
            ("HERALD_SMTP__TIMEOUT_MS", "2000".into()),
            ("HERALD_ROUTING__BUILTIN_MAX_RETRIES", "10".into()),
            ("HERALD_ROUTING__RETRY_BASE_MS", "500".into()),
            ("HERALD_ROUTING__RETRY_CAP_MS", "4000".into()),
        ]),
        &log,
    );
    let p = f.producer();
    let mut outcomes = f.reader(&f.env.outcomes);
    let phase = |name: &str| -> (Vec<String>, Vec<(String, Vec<u8>)>) {
        let ids: Vec<String> = (0..per_phase)
            .map(|i| format!("smtp-{}-{name}-{i}", f.env.id))
            .collect();
        let msgs = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (format!("user-{}", i % 31), email_request(id, i)))
            .collect();
        (ids, msgs)
    };
    // Phase 1: relay up. Phase 2: relay down for 10 s. Phase 3: relay back.
    let (before, m1) = phase("before");
    produce_all(&p, &f.env.requests, m1).await;
    wait_all(&mut outcomes, &before, &log).await;
    smtp.down();
    let down_at = std::time::Instant::now();
    let (during, m2) = phase("during");
    produce_all(&p, &f.env.requests, m2).await;
    // Every request of the outage is attempted, fails, and waits to retry.
    let all_retrying = read_events_until(&mut outcomes, Duration::from_secs(60), |e| {
        let retrying: std::collections::HashSet<&str> = e
            .iter()
            .filter(|v| v["status"] == "retrying")
            .filter_map(|v| v["notification_id"].as_str())
            .collect();
        during.iter().all(|id| retrying.contains(id.as_str()))
    })
    .await;
    assert!(
        all_retrying,
        "not every request of the outage is retrying; log:\n{}",
        log_tail(&log)
    );
    if let Some(left) = Duration::from_secs(10).checked_sub(down_at.elapsed()) {
        tokio::time::sleep(left).await;
    }
    smtp.up();
    let (after, m3) = phase("after");
    produce_all(&p, &f.env.requests, m3).await;
    let rest: Vec<String> = during.iter().chain(&after).cloned().collect();
    wait_all(&mut outcomes, &rest, &log).await;
    f.finish(&mut herald).await;

    let all: Vec<String> = [&before, &during, &after]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let events = outcomes.events();
    let finals = one_final_each(&events, &all);
    let statuses = statuses_by_id(&events);
    let counts = smtp.counts_by_subject();
    for id in &all {
        assert_eq!(finals[id]["status"], "sent", "{id}: {}", finals[id]);
        assert_eq!(counts.get(id).copied().unwrap_or(0), 1, "{id} at the relay");
    }
    let mut most = 0;
    for id in &during {
        let retries = statuses[id].iter().filter(|s| *s == "retrying").count();
        assert!(retries >= 1, "{id}: {:?}", statuses[id]);
        most = most.max(retries);
    }
    for id in before.iter().chain(&after) {
        assert_eq!(statuses[id], ["sent"], "{id}");
    }
    eprintln!("smtp down: {per_phase} per phase; most retries of one notification: {most}");
}
