//! No loss, no duplicates: SIGKILL mid-load with restart, and two instances
//! sharing the partitions (one leaving gracefully mid-load).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

fn webhook_request(id: &str, url: &str) -> Vec<u8> {
    json!({"id": id, "channel": "webhook", "recipient": {"url": url}, "content": {"text": "load {{ notification.id }}"}})
        .to_string()
        .into_bytes()
}

/// Checks the end state after a load of `ids`: one distinct final outcome
/// each, every id reached the sink, and any extra delivery is a documented
/// crash-window resend (the notification shows more than one attempt).
async fn assert_exactly_once(
    env: &TestEnv,
    ids: &[String],
    sink: &HttpSink,
    outcomes: &TopicReader,
) -> usize {
    let events = outcomes.events();
    let finals = finals_by_notification(&events);
    for id in ids {
        let f = finals.get(id).map_or(0, |s| s.len());
        assert_eq!(f, 1, "notification {id} has {f} distinct final outcomes");
    }
    let counts = sink.counts_by_id();
    let pool = env.pool().await;
    let attempts: HashMap<String, i32> =
        sqlx::query_as::<_, (String, i32)>("SELECT id, attempts FROM notifications")
            .fetch_all(&pool)
            .await
            .expect("attempts")
            .into_iter()
            .collect();
    let mut resent = 0;
    for id in ids {
        let c = counts.get(id).copied().unwrap_or(0);
        assert!(c >= 1, "notification {id} never reached the sink");
        if c > 1 {
            assert!(
                attempts.get(id).copied().unwrap_or(0) > 1,
                "{id} delivered {c} times without a recorded resumed attempt"
            );
            resent += c - 1;
        }
    }
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM notifications GROUP BY status")
            .fetch_all(&pool)
            .await
            .expect("statuses");
    assert_eq!(statuses, vec![("sent".to_string(), ids.len() as i64)]);
    resent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_load_and_restart_loses_nothing() {
    const N: usize = 2000;
    let env = TestEnv::new(4).await;
    let sink = HttpSink::start().await;
    let logs = tempfile::tempdir().expect("tmp");
    let vars = env.vars(&[(
        "HERALD_KAFKA__GROUP_INSTANCE_ID",
        format!("herald-{}-0", env.id),
    )]);
    let mut herald = HeraldProcess::spawn(vars.clone(), &logs.path().join("run1.log"));

    let p = producer();
    let ids: Vec<String> = (0..N).map(|i| format!("kill-{}-{i}", env.id)).collect();
    for (i, id) in ids.iter().enumerate() {
        produce(
            &p,
            &env.requests,
            &format!("user-{}", i % 97),
            &webhook_request(id, &sink.url("/load")),
        )
        .await;
    }
    let mut outcomes = TopicReader::new(&env.outcomes, env.partitions);
    assert!(
        outcomes
            .read_until(Duration::from_secs(90), |r| r.len() >= N / 4)
            .await,
        "first quarter processed"
    );
    herald.kill9();
    let at_kill = outcomes.records.len();
    let mut herald = HeraldProcess::spawn(vars, &logs.path().join("run2.log"));
    let done = outcomes
        .read_until(Duration::from_secs(180), |r| {
            let finals = finals_by_notification(&r.iter().map(Record::json).collect::<Vec<_>>());
            finals.len() >= N
        })
        .await;
    herald.terminate();
    if !done {
        let log = std::fs::read_to_string(logs.path().join("run2.log")).unwrap_or_default();
        panic!(
            "not every request finished after the restart ({} outcomes); log:\n{}",
            outcomes.records.len(),
            &log[log.len().saturating_sub(4000)..]
        );
    }
    let resent = assert_exactly_once(&env, &ids, &sink, &outcomes).await;
    eprintln!(
        "sigkill test: killed after {at_kill} outcomes; {resent} crash-window resends (same webhook-id)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_partitions_and_a_graceful_leave_hands_over() {
    const N: usize = 600;
    let env = TestEnv::new(4).await;
    let sink = HttpSink::start().await;
    let logs = tempfile::tempdir().expect("tmp");
    // Dynamic membership: a static member (group.instance.id) that stops does
    // not leave the group (KIP-345 assumes it comes back), so a graceful
    // hand-over to a survivor needs dynamic members.
    let port_a = free_port();
    let port_b = free_port();
    let mut a = HeraldProcess::spawn(
        env.vars(&[("HERALD_HTTP__BIND", format!("127.0.0.1:{port_a}"))]),
        &logs.path().join("a.log"),
    );
    let mut b = HeraldProcess::spawn(
        env.vars(&[("HERALD_HTTP__BIND", format!("127.0.0.1:{port_b}"))]),
        &logs.path().join("b.log"),
    );
    let p = producer();
    let ids: Vec<String> = (0..N).map(|i| format!("pair-{}-{i}", env.id)).collect();
    let url = sink.url("/pair");
    for (i, id) in ids.iter().take(N / 2).enumerate() {
        produce(
            &p,
            &env.requests,
            &format!("user-{i}"),
            &webhook_request(id, &url),
        )
        .await;
    }
    let mut outcomes = TopicReader::new(&env.outcomes, env.partitions);
    assert!(
        outcomes
            .read_until(Duration::from_secs(90), |r| r.len() >= N / 2)
            .await
    );
    let (ca, cb) = (
        requests_consumed(port_a).await.unwrap_or(0),
        requests_consumed(port_b).await.unwrap_or(0),
    );
    assert!(ca > 0 && cb > 0, "both instances consumed: a={ca} b={cb}");
    assert_eq!(ca + cb, (N / 2) as u64, "each request consumed once");
    b.terminate(); // SIGTERM: drains, commits, leaves the group
    for (i, id) in ids.iter().enumerate().skip(N / 2) {
        produce(
            &p,
            &env.requests,
            &format!("user-{i}"),
            &webhook_request(id, &url),
        )
        .await;
    }
    let took_over = outcomes
        .read_until(Duration::from_secs(120), |r| r.len() >= N)
        .await;
    a.terminate();
    if !took_over {
        let log = std::fs::read_to_string(logs.path().join("a.log")).unwrap_or_default();
        panic!(
            "survivor did not take over: {} outcomes; log a:\n{}",
            outcomes.records.len(),
            &log[log.len().saturating_sub(3000)..]
        );
    }
    let resent = assert_exactly_once(&env, &ids, &sink, &outcomes).await;
    assert_eq!(resent, 0, "no crash here, so no resends");
}
