//! Hostile requests mixed into valid ones: random bytes, invalid UTF-8,
//! truncated JSON, wrong types, missing fields, 10 MB bodies, 10,000-deep
//! nesting, CR/LF in subjects and header values, invalid and overlong
//! addresses, templates that try to read the environment, include files or
//! loop forever, and template data carrying template syntax.
//!
//! Each hostile request must be answered (a dead letter at its position, or a
//! `rejected`/`failed` outcome for its id) and reach no sink; template data
//! carrying template syntax is inert (printed, never evaluated) and is sent;
//! every valid request in between is delivered exactly once; Herald stays up
//! and its RSS stays bounded.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::helpers::*;
use crate::support::*;

/// What must happen to one produced message.
#[derive(Debug, Clone)]
enum Expect {
    /// Delivered exactly once, `sent`.
    Sent(String),
    /// A dead letter at its position, or a `rejected`/`failed` outcome for
    /// the id (when it has one); never at a sink.
    Answered(Option<String>),
}

/// Size of the "huge" requests. 10 MB was the goal, but the local broker
/// (tansu 0.6.0) accepts a 5 or 10 MB record and then never serves it (nor
/// anything behind it) to any librdkafka consumer — a broker limit, not
/// Herald's (`probe_largest_message_the_broker_serves`). 2 MB is served, and
/// is over Herald's 1 MB `pipeline.max_request_bytes`, so it exercises the
/// `too_large` path and the dead letter's truncation.
const HUGE: usize = 2 * 1024 * 1024;
const TEN_MB: usize = 10 * 1024 * 1024;

fn email(id: &str, subject: &str) -> serde_json::Value {
    json!({"id": id, "channel": "email", "recipient": {"email": "ok@example.com"},
        "content": {"subject": subject, "text": "hello"}})
}

/// One hostile request of kind `kind` (0..KINDS).
fn hostile(kind: usize, id: &str, url: &str, rng: &mut StdRng) -> (Vec<u8>, Expect) {
    let some = || Expect::Answered(Some(id.to_string()));
    let none = Expect::Answered(None);
    let valid = json!({"id": id, "channel": "webhook", "recipient": {"url": url},
        "content": {"text": "never {{ notification.id }}"}})
    .to_string();
    let v = |j: serde_json::Value| j.to_string().into_bytes();
    match kind {
        0 => {
            let mut b = vec![0u8; rng.random_range(1..4096)];
            rng.fill(&mut b[..]);
            (b, none)
        }
        1 => {
            let mut b = valid.into_bytes();
            let at = rng.random_range(1..b.len() - 1);
            b.insert(at, 0xff);
            (b, none)
        }
        2 => {
            let b = valid.into_bytes();
            let cut = rng.random_range(1..b.len() - 1);
            (b[..cut].to_vec(), none)
        }
        3 => {
            let j = match rng.random_range(0..5) {
                0 => {
                    json!({"id": id, "channel": 7, "recipient": {"url": url}, "content": {"text": "x"}})
                }
                1 => {
                    json!({"id": id, "channel": "webhook", "recipient": url, "content": {"text": "x"}})
                }
                2 => {
                    json!({"id": id, "channel": "email", "recipient": {"email": ["a@example.com"]}, "content": {"text": "x"}})
                }
                3 => {
                    json!({"id": id, "channel": "webhook", "recipient": {"url": url}, "content": {"text": 42}})
                }
                _ => {
                    json!({"id": 12345, "channel": "webhook", "recipient": {"url": url}, "content": {"text": "x"}})
                }
            };
            (v(j), some())
        }
        4 => {
            let j = match rng.random_range(0..5) {
                0 => json!({"id": id, "recipient": {"url": url}, "content": {"text": "x"}}),
                1 => json!({"id": id, "channel": "webhook", "content": {"text": "x"}}),
                2 => json!({"id": id, "channel": "webhook", "recipient": {"url": url}}),
                3 => json!({"id": id}),
                _ => json!({}),
            };
            (v(j), some())
        }
        5 => {
            let depth = 10_000;
            let j = if rng.random_bool(0.5) {
                format!("{}{}", "[".repeat(depth), "]".repeat(depth))
            } else {
                format!(
                    r#"{{"id":"{id}","channel":"webhook","recipient":{{"url":"{url}"}},"template":{{"key":"order_shipped","data":{{"x":{}1{}}}}}}}"#,
                    "{\"a\":".repeat(depth),
                    "}".repeat(depth)
                )
            };
            (j.into_bytes(), some())
        }
        6 => {
            let evil = "hi\r\nBcc: evil@example.com";
            let j = match rng.random_range(0..4) {
                0 => email(id, evil),
                1 => {
                    let mut j = email(id, "fine");
                    j["meta"] = json!({"headers": {"X-Evil": evil}});
                    j
                }
                2 => json!({"id": id, "channel": "webhook", "recipient": {"url": url},
                    "content": {"text": "x"}, "meta": {"headers": {"X-Evil": evil}}}),
                // CR/LF arriving through template data into a rendered subject.
                _ => json!({"id": id, "channel": "email", "recipient": {"email": "ok@example.com"},
                    "template": {"key": "order_shipped", "data": {"order_id": evil,
                        "customer_name": "Ada", "items": []}}}),
            };
            (v(j), some())
        }
        7 => {
            let long = "a".repeat(300);
            let j = match rng.random_range(0..6) {
                0 => {
                    json!({"id": id, "channel": "email", "recipient": {"email": format!("{long}@example.com")}, "content": {"subject": "s", "text": "x"}})
                }
                1 => {
                    json!({"id": id, "channel": "email", "recipient": {"email": "no-at-sign"}, "content": {"subject": "s", "text": "x"}})
                }
                2 => {
                    json!({"id": id, "channel": "email", "recipient": {"email": "a@example.com\r\nBcc: evil@example.com"}, "content": {"subject": "s", "text": "x"}})
                }
                3 => {
                    json!({"id": id, "channel": "webhook", "recipient": {"url": "ftp://example.com/x"}, "content": {"text": "x"}})
                }
                4 => {
                    json!({"id": id, "channel": "webhook", "recipient": {"url": format!("http://{}.example.com/", "a".repeat(5000))}, "content": {"text": "x"}})
                }
                _ => {
                    json!({"id": id, "channel": "sms", "recipient": {"phone": "+1"}, "content": {"text": "x"}})
                }
            };
            (v(j), some())
        }
        _ => {
            let attacks = [
                "{{ env.HOME }}",
                "{{ HOME }}",
                "{% include '/etc/passwd' %}",
                "{% include '../../../../etc/passwd' %}",
                "{% import 'order_shipped/text.jinja' as x %}{{ x }}{{ undefined_thing }}",
                "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
                "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
                "{{ range(1000000000) | join }}",
                "{% for x in notification|items %}{{ x }}{% endfor %}{{ nope.nope }}",
                "{{ ('x' * 1000) * 1000 * 1000 }}",
            ];
            let t = attacks[rng.random_range(0..attacks.len())];
            let j = json!({"id": id, "channel": "webhook", "recipient": {"url": url},
                "content": {"text": t}});
            (v(j), some())
        }
    }
}

const KINDS: usize = 9;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_are_answered_and_valid_ones_delivered() {
    let n_hostile = scale(2000, 10_000);
    let n_valid = scale(400, 2000);
    let n_huge = scale(2, 10);
    let seed: u64 = rand::rng().random();
    eprintln!("hostile test: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let f = Faults::shared(4).await;
    let sink = FaultSink::start().await;
    let smtp = RestartableSmtp::start();
    let (_logs, logs) = log_dir("hostile_requests_are_answered_and_valid_ones_delivered");
    let log = logs.join("herald.log");
    let mut herald = HeraldProcess::spawn(
        f.vars(&[
            ("HERALD_SMTP__PORT", smtp.port.to_string()),
            ("HERALD_WEBHOOK__TIMEOUT_MS", "2000".into()),
        ]),
        &log,
    );
    let pid = herald.child.id();
    let p = f.producer();
    let mut outcomes = f.reader(&f.env.outcomes);

    warm_up(&f, &sink, &p, &mut outcomes, 50, &log).await;
    let rss_before = rss_kib(pid).unwrap_or(0);

    // The mix: valid webhook and email requests interleaved with hostile ones.
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    let mut expect: Vec<Expect> = Vec::new();
    let mut valid_webhooks = Vec::new();
    let mut valid_emails = Vec::new();
    let total = n_hostile + n_valid;
    for i in 0..total {
        let key = format!("user-{}", i % 61);
        if i % (total / n_valid) == 0 && valid_webhooks.len() + valid_emails.len() < n_valid {
            let id = format!("ok-{}-{i}", f.env.id);
            if i % 2 == 0 {
                messages.push((key, webhook_request(&id, &sink.url("ok", &id))));
                valid_webhooks.push(id.clone());
            } else {
                let j = email(&id, "fault {{ notification.id }}");
                messages.push((key, j.to_string().into_bytes()));
                valid_emails.push(id.clone());
            }
            expect.push(Expect::Sent(id));
            continue;
        }
        let id = format!("bad-{}-{i}", f.env.id);
        if i % 97 == 1 {
            // Template data carrying template syntax: printed, not evaluated.
            let j = json!({"id": id, "channel": "email", "recipient": {"email": "ok@example.com"},
                "template": {"key": "order_shipped", "data": {"order_id": "{{ config }}",
                    "customer_name": "{% for i in range(99999999) %}x{% endfor %}${HOME}",
                    "items": [{"name": "{{ env.PATH }}", "qty": 1}]}}});
            messages.push((key, j.to_string().into_bytes()));
            expect.push(Expect::Sent(id));
            continue;
        }
        let (bytes, e) = hostile(
            rng.random_range(0..KINDS),
            &id,
            &sink.url("bad", &id),
            &mut rng,
        );
        messages.push((key, bytes));
        expect.push(e);
    }
    let mut positions = produce_all(&p, &f.env.requests, messages).await;
    // Oversized requests one at a time (each its own produce batch: the
    // local broker fails to serve a batch of several MB; see HUGE).
    for i in 0..n_huge {
        let id = format!("huge-{}-{i}", f.env.id);
        let text = "x".repeat(HUGE);
        let j = json!({"id": id, "channel": "webhook", "recipient": {"url": sink.url("bad", &id)},
            "content": {"text": text}});
        let pos = produce_all(
            &p,
            &f.env.requests,
            vec![(format!("huge-{i}"), j.to_string().into_bytes())],
        )
        .await;
        positions.extend(pos);
        expect.push(Expect::Answered(None));
        // Valid requests behind it on every partition.
        let behind: Vec<(String, Vec<u8>)> = (0..8)
            .map(|k| {
                let id = format!("behind-{}-{i}-{k}", f.env.id);
                expect.push(Expect::Sent(id.clone()));
                valid_webhooks.push(id.clone());
                (
                    format!("user-{k}"),
                    webhook_request(&id, &sink.url("ok", &id)),
                )
            })
            .collect();
        positions.extend(produce_all(&p, &f.env.requests, behind).await);
    }

    let answered_ids: Vec<String> = expect
        .iter()
        .filter_map(|e| match e {
            Expect::Sent(id) => Some(id.clone()),
            Expect::Answered(_) => None,
        })
        .collect();
    let done = read_events_until(&mut outcomes, Duration::from_secs(300), |e| {
        all_final(e, &answered_ids)
    })
    .await;
    assert!(
        done,
        "valid requests not all finished; log:\n{}",
        log_tail(&log)
    );
    f.wait_quiet(Duration::from_secs(300)).await;
    let lag = f.wait_lag_zero(Duration::from_secs(120)).await;
    let rss_after = rss_kib(pid).unwrap_or(0);
    let still_up = herald.child.try_wait().ok().flatten().is_none();
    assert!(still_up, "herald died; log:\n{}", log_tail(&log));
    assert!(lag.is_ok(), "a partition is stuck: {lag:?}");
    // Everything is consumed and committed: read what was published.
    let _ = outcomes.read_until(Duration::from_secs(3), |_| false).await;
    let mut dlq = f.reader(&f.env.dlq);
    let _ = dlq
        .read_until(Duration::from_secs(60), |r| !r.is_empty())
        .await;
    let mut seen = usize::MAX;
    while dlq.records.len() != seen {
        seen = dlq.records.len();
        let _ = dlq.read_until(Duration::from_secs(3), |_| false).await;
    }
    herald.terminate();

    let dead: HashSet<(i32, i64)> = dlq
        .records
        .iter()
        .filter_map(|r| {
            let p = r.headers.get("herald-source-partition")?.parse().ok()?;
            let o = r.headers.get("herald-source-offset")?.parse().ok()?;
            Some((p, o))
        })
        .collect();
    let events = outcomes.events();
    let finals = finals_by_notification(&events);
    let mut final_status: HashMap<String, String> = HashMap::new();
    for e in &events {
        let st = e["status"].as_str().unwrap_or_default();
        if final_statuses().contains(&st) {
            final_status.insert(
                e["notification_id"].as_str().unwrap_or_default().into(),
                st.into(),
            );
        }
    }
    let webhook_counts = sink.counts();
    let mail_counts = smtp.counts_by_subject();
    let mut by_answer: HashMap<&str, usize> = HashMap::new();
    for (e, pos) in expect.iter().zip(&positions) {
        match e {
            Expect::Sent(id) => {
                assert_eq!(
                    final_status.get(id).map(String::as_str),
                    Some("sent"),
                    "{id}"
                );
                assert_eq!(finals[id].len(), 1, "{id}: one distinct final outcome");
            }
            Expect::Answered(id) => {
                let outcome = id.as_ref().and_then(|id| final_status.get(id));
                if let Some(id) = id {
                    assert!(
                        finals.get(id).is_none_or(|s| s.len() == 1),
                        "{id}: one final outcome"
                    );
                    assert!(
                        !webhook_counts.contains_key(id),
                        "hostile {id} reached the webhook sink"
                    );
                }
                let how = match outcome.map(String::as_str) {
                    Some("rejected") if dead.contains(pos) => "dlq+rejected",
                    Some("failed") => "failed",
                    Some("rejected") => "rejected, dead letter not read back",
                    Some(other) => panic!(
                        "hostile request {id:?} at {pos:?} ended {other}; {} dead letters, first {:?}",
                        dead.len(),
                        dead.iter().take(3).collect::<Vec<_>>()
                    ),
                    None if dead.contains(pos) => "dlq",
                    // The local broker sometimes does not serve one partition
                    // to a fresh reader within the window; the count check
                    // below still accounts for these.
                    None => "dead letter not read back",
                };
                *by_answer.entry(how).or_default() += 1;
            }
        }
    }
    // At least one dead letter per request without an outcome and per
    // rejected one. Not exactly one: runs here saw a few percent more dead
    // letters than such requests (re-published on a retried message, or
    // duplicated by the local broker) — see docs/notes/faults.md.
    let dlq_total = f.topic_size(&f.env.dlq);
    let expected_dead: usize = [
        "dlq",
        "dlq+rejected",
        "dead letter not read back",
        "rejected, dead letter not read back",
    ]
    .iter()
    .map(|k| by_answer.get(k).copied().unwrap_or(0))
    .sum();
    assert!(
        dlq_total >= expected_dead as i64,
        "{dlq_total} dead letters for {expected_dead} requests: {by_answer:?}"
    );
    eprintln!("hostile: {dlq_total} dead letters for {expected_dead} dead-lettered requests");
    for id in &valid_webhooks {
        assert_eq!(
            webhook_counts.get(id).copied().unwrap_or(0),
            1,
            "{id} at the webhook sink"
        );
    }
    for id in &valid_emails {
        assert_eq!(
            mail_counts.get(id).copied().unwrap_or(0),
            1,
            "{id} at the relay"
        );
    }
    // Only the valid emails and the inert-data ones reached the relay, and no
    // injected Bcc made it into any message.
    let expected_mail = valid_emails.len();
    assert_eq!(
        mail_counts.values().sum::<usize>(),
        expected_mail,
        "mails by subject"
    );
    let mut extra_mails = 0;
    for text in std::fs::read_dir(smtp.dir.path()).expect("dir").flatten() {
        let s = std::fs::read_to_string(text.path()).unwrap_or_default();
        assert!(
            !s.contains("evil@example.com"),
            "injected header delivered: {s}"
        );
        if !s.contains("Subject: fault ") {
            extra_mails += 1;
            assert!(
                !s.contains("/root") && !s.contains("/usr/bin"),
                "environment leaked: {s}"
            );
        }
    }
    eprintln!(
        "hostile: {n_hostile} hostile + {n_valid} valid + {n_huge} x {HUGE} B; answers {by_answer:?}; \
         inert template data sent {extra_mails}; RSS {rss_before} KiB -> {rss_after} KiB"
    );
    assert!(
        rss_after < rss_before + 512 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

/// An oversized request (see [`HUGE`]) is dead-lettered, truncated, and the
/// requests behind it on the same partition are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_request_is_dead_lettered_and_the_partition_moves_on() {
    let f = Faults::shared(1).await;
    let sink = FaultSink::start().await;
    let (_logs, logs) = log_dir("an_oversized_request_is_dead_lettered_and_the_partition_moves_on");
    let log = logs.join("herald.log");
    let mut herald = HeraldProcess::spawn(f.vars(&[]), &log);
    let huge_id = format!("huge-{}", f.env.id);
    let huge = json!({"id": huge_id, "channel": "webhook", "recipient": {"url": sink.url("bad", &huge_id)},
        "content": {"text": "x".repeat(HUGE)}});
    let after: Vec<String> = (0..5).map(|i| format!("after-{}-{i}", f.env.id)).collect();
    let mut msgs = vec![("k".to_string(), huge.to_string().into_bytes())];
    msgs.extend(
        after
            .iter()
            .map(|id| ("k".to_string(), webhook_request(id, &sink.url("ok", id)))),
    );
    produce_all(&f.producer(), &f.env.requests, msgs).await;
    let mut outcomes = f.reader(&f.env.outcomes);
    let done = read_events_until(&mut outcomes, Duration::from_secs(60), |e| {
        all_final(e, &after)
    })
    .await;
    let mut dlq = f.reader(&f.env.dlq);
    let _ = dlq
        .read_until(Duration::from_secs(5), |r| !r.is_empty())
        .await;
    herald.terminate();
    assert!(
        done,
        "the partition is stuck behind the oversized request; log:\n{}",
        log_tail(&log)
    );
    assert_eq!(dlq.records.len(), 1);
    let r = &dlq.records[0];
    assert_eq!(r.headers["herald-error-code"], "too_large");
    assert!(
        r.headers.contains_key("herald-truncated-from"),
        "{:?}",
        r.headers
    );
}

/// Probe: which payload sizes the broker both accepts and serves back to a
/// plain consumer. Run by hand: `cargo test --test faults probe -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "probe, run by hand"]
async fn probe_largest_message_the_broker_serves() {
    for size in [900 * 1024, 2 * 1024 * 1024, 5 * 1024 * 1024, TEN_MB] {
        let f = Faults::shared(1).await;
        let payload = vec![b'x'; size];
        produce_all(
            &f.producer(),
            &f.env.requests,
            vec![("k".into(), payload), ("k".into(), b"small".to_vec())],
        )
        .await;
        let mut r = f.reader(&f.env.requests);
        let ok = r
            .read_until(Duration::from_secs(20), |r| r.len() >= 2)
            .await;
        eprintln!(
            "size {size}: produced; served back: {ok} ({} records)",
            r.records.len()
        );
    }
}

/// Sends `n` valid webhook requests and waits for their final outcomes, so
/// an RSS baseline taken afterwards includes Herald's pools and caches.
async fn warm_up(
    f: &Faults,
    sink: &FaultSink,
    p: &rdkafka::producer::FutureProducer,
    outcomes: &mut TopicReader,
    n: usize,
    log: &std::path::Path,
) {
    let warm: Vec<String> = (0..n).map(|i| format!("warm-{}-{i}", f.env.id)).collect();
    let msgs = warm
        .iter()
        .map(|id| (id.clone(), webhook_request(id, &sink.url("ok", id))))
        .collect();
    produce_all(p, &f.env.requests, msgs).await;
    assert!(
        read_events_until(outcomes, Duration::from_secs(90), |e| all_final(e, &warm)).await,
        "warm-up; log:\n{}",
        log_tail(log)
    );
}

/// Runs Herald (default settings, one partition) and warms it up, then
/// sends `msgs` and waits until each of `ids` has a final outcome and was
/// delivered exactly once at `sink`. Returns Herald's RSS in KiB after the
/// warm-up, and the highest RSS sampled (every 20 ms) while `msgs` were
/// handled.
async fn peak_rss_while_sending(
    test: &str,
    f: &Faults,
    sink: &FaultSink,
    ids: &[String],
    msgs: Vec<(String, Vec<u8>)>,
) -> (u64, u64) {
    let (_logs, logs) = log_dir(test);
    let log = logs.join("herald.log");
    let mut herald = HeraldProcess::spawn(f.vars(&[]), &log);
    let pid = herald.child.id();
    let p = f.producer();
    let mut outcomes = f.reader(&f.env.outcomes);

    warm_up(f, sink, &p, &mut outcomes, 20, &log).await;
    let rss_before = rss_kib(pid).unwrap_or(0);

    let peak = Arc::new(AtomicU64::new(rss_before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(rss) = rss_kib(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    produce_all(&p, &f.env.requests, msgs).await;
    let done = read_events_until(&mut outcomes, Duration::from_secs(240), |e| {
        all_final(e, ids)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    assert!(done, "not every request finished; log:\n{}", log_tail(&log));
    f.finish(&mut herald).await;
    let counts = sink.counts();
    for id in ids {
        assert_eq!(counts.get(id).copied().unwrap_or(0), 1, "{id} at the sink");
    }
    (rss_before, peak.load(Ordering::Relaxed))
}

/// Batch requests are expanded as their notifications are sent, not all at
/// once: two 1,000-recipient requests carrying 100 KB of content each must
/// not hold 2,000 copies of it (~200 MB) while they are sent. Every
/// recipient is delivered exactly once and Herald's RSS stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_batch_is_expanded_as_it_is_sent_not_at_once() {
    const RECIPIENTS: usize = 1000;
    const CONTENT: usize = 100 * 1000;
    let f = Faults::shared(1).await;
    let sink = FaultSink::start().await;
    let mut ids = Vec::new();
    let mut msgs = Vec::new();
    for b in 0..2 {
        let id = format!("batch-{}-{b}", f.env.id);
        let recipients: Vec<serde_json::Value> = (0..RECIPIENTS)
            .map(|i| {
                let nid = format!("{id}:{i}");
                let r = json!({"url": sink.url("ok", &nid)});
                ids.push(nid);
                r
            })
            .collect();
        let j = json!({"id": id, "channel": "webhook", "recipients": recipients,
            "content": {"text": "x".repeat(CONTENT)}});
        // Different keys: both requests are processed at once.
        msgs.push((format!("key-{b}"), j.to_string().into_bytes()));
    }
    let (rss_before, peak) = peak_rss_while_sending(
        "a_large_batch_is_expanded_as_it_is_sent_not_at_once",
        &f,
        &sink,
        &ids,
        msgs,
    )
    .await;
    eprintln!("large batch: RSS {rss_before} KiB before, peak {peak} KiB while sending");
    assert!(
        peak < rss_before + 100 * 1024,
        "RSS rose from {rss_before} KiB to {peak} KiB: the batches were expanded at once"
    );
}

/// Large valid requests are admitted by their size, not only by their
/// count: 300 requests of 500 KB each, all on different keys (so all could
/// run at once), must not all be held (with their copies: decoded, stored,
/// sent) at once. Every one is delivered exactly once and Herald's RSS stays
/// bounded by the defaults (`kafka.max_in_flight_bytes`, the consumer's
/// prefetch): it rose by ~370 MB for 200 such requests before they existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_requests_are_admitted_by_size_and_memory_stays_bounded() {
    const REQUESTS: usize = 300;
    const CONTENT: usize = 500 * 1000;
    let f = Faults::shared(1).await;
    let sink = FaultSink::start().await;
    let ids: Vec<String> = (0..REQUESTS)
        .map(|i| format!("large-{}-{i}", f.env.id))
        .collect();
    let msgs = ids
        .iter()
        .map(|id| {
            let j = json!({"id": id, "channel": "webhook", "recipient": {"url": sink.url("ok", id)},
                "content": {"text": "x".repeat(CONTENT)}});
            (id.clone(), j.to_string().into_bytes())
        })
        .collect();
    let (rss_before, peak) = peak_rss_while_sending(
        "large_requests_are_admitted_by_size_and_memory_stays_bounded",
        &f,
        &sink,
        &ids,
        msgs,
    )
    .await;
    eprintln!("large requests: RSS {rss_before} KiB before, peak {peak} KiB while sending");
    assert!(
        peak < rss_before + 256 * 1024,
        "RSS rose from {rss_before} KiB to {peak} KiB"
    );
}
