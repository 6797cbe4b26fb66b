//! Downstream failures: the HTTP endpoint answers 500, 429 with Retry-After,
//! or hangs past the webhook timeout; the SMTP relay is down for 10 s.
//!
//! What holds today (before provider retries exist): nothing is lost, each
//! request has one final outcome, no partition is stuck, and the failure is
//! reported as `failed` with `error.retryable = true`.
//! TODO(retries): once the providers issue lands retries, these scenarios
//! must check eventual delivery instead: every request reaches the sink once
//! the sink recovers, and the outcome stream shows `retrying` then `sent`.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_500_429_and_hanging_endpoints_fail_retryably_and_nothing_is_stuck() {
    let per_mode = scale(150, 1000);
    let f = Faults::shared(4).await;
    let sink = FaultSink::start().await;
    let (_logs, logs) =
        log_dir("webhook_500_429_and_hanging_endpoints_fail_retryably_and_nothing_is_stuck");
    let log = logs.join("herald.log");
    let mut herald = HeraldProcess::spawn(
        f.vars(&[("HERALD_WEBHOOK__TIMEOUT_MS", "1000".into())]),
        &log,
    );
    let modes = ["ok", "s500", "s429", "hang"];
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
    let counts = sink.counts();
    for (mode, ids) in &ids_by_mode {
        for id in ids {
            let e = finals[id];
            // No crash here: every request reached the endpoint exactly once.
            assert_eq!(counts.get(id).copied().unwrap_or(0), 1, "{id} at the sink");
            if *mode == "ok" {
                assert_eq!(e["status"], "sent", "{id}: {e}");
            } else {
                assert_eq!(e["status"], "failed", "{id}: {e}");
                assert_eq!(e["error"]["retryable"], true, "{id}: {e}");
            }
        }
    }
    let codes: std::collections::BTreeSet<String> = ids_by_mode["hang"]
        .iter()
        .map(|id| {
            finals[id]["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    eprintln!("webhook faults: {per_mode} per mode; hang error codes {codes:?}");
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
async fn smtp_relay_down_for_ten_seconds_fails_retryably_and_recovers() {
    let per_phase = scale(200, 1500);
    let f = Faults::shared(4).await;
    let mut smtp = RestartableSmtp::start();
    let (_logs, logs) = log_dir("smtp_relay_down_for_ten_seconds_fails_retryably_and_recovers");
    let log = logs.join("herald.log");
    let mut herald = HeraldProcess::spawn(
        f.vars(&[
            ("HERALD_SMTP__PORT", smtp.port.to_string()),
            ("HERALD_SMTP__TIMEOUT_MS", "2000".into()),
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
    // Phase 1: relay up. Phase 2: relay down. Phase 3: relay back.
    let (before, m1) = phase("before");
    produce_all(&p, &f.env.requests, m1).await;
    wait_all(&mut outcomes, &before, &log).await;
    smtp.down();
    let down_at = std::time::Instant::now();
    let (during, m2) = phase("during");
    produce_all(&p, &f.env.requests, m2).await;
    wait_all(&mut outcomes, &during, &log).await;
    if let Some(left) = Duration::from_secs(10).checked_sub(down_at.elapsed()) {
        tokio::time::sleep(left).await;
    }
    smtp.up();
    let (after, m3) = phase("after");
    produce_all(&p, &f.env.requests, m3).await;
    wait_all(&mut outcomes, &after, &log).await;
    f.finish(&mut herald).await;

    let all: Vec<String> = [&before, &during, &after]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let events = outcomes.events();
    let finals = one_final_each(&events, &all);
    let counts = smtp.counts_by_subject();
    for id in before.iter().chain(&after) {
        assert_eq!(finals[id]["status"], "sent", "{id}: {}", finals[id]);
        assert_eq!(counts.get(id).copied().unwrap_or(0), 1, "{id} at the relay");
    }
    for id in &during {
        let e = finals[id];
        assert_eq!(e["status"], "failed", "{id}: {e}");
        assert_eq!(e["error"]["retryable"], true, "{id}: {e}");
        assert_eq!(
            counts.get(id).copied().unwrap_or(0),
            0,
            "{id} cannot have arrived"
        );
    }
    eprintln!("smtp down: {per_phase} per phase");
}
