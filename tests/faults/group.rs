//! Two Herald instances in one consumer group under load: one leaves
//! gracefully and the survivor takes over its partitions; one is SIGKILLed
//! and restarted with its static `group.instance.id` and gets its partitions
//! back (the local broker does not hand a crashed static member's partitions
//! to the survivor; see ARCHITECTURE.md).

use std::time::Duration;

use crate::helpers::*;
use crate::support::*;

/// One instance of the pair: its process, HTTP port (for `/metrics`) and log.
struct Member {
    herald: HeraldProcess,
    port: u16,
    log: std::path::PathBuf,
}

impl Member {
    fn spawn(f: &Faults, extra: &[(&str, String)], log: std::path::PathBuf) -> Member {
        let port = free_port();
        let mut vars = vec![("HERALD_HTTP__BIND", format!("127.0.0.1:{port}"))];
        vars.extend(extra.iter().cloned());
        let herald = HeraldProcess::spawn(f.vars(&vars), &log);
        Member { herald, port, log }
    }

    /// Whether the last assignment in this member's log gave it partitions.
    fn owns_partitions(&self) -> bool {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .rev()
            .find(|l| l.contains("partitions assigned"))
            .is_some_and(|l| l.contains("-requests\""))
    }

    /// Requests this process consumed so far (0 while it is not answering yet).
    async fn consumed(&self) -> u64 {
        requests_consumed(self.port).await.unwrap_or(0)
    }
}

/// Produces `messages` a slice at a time until the load is under way on
/// both members (each consumed something: a member that joins late finds
/// its partitions empty otherwise), then returns the slices not produced.
async fn produce_until_both_working<'m>(
    f: &Faults,
    p: &rdkafka::producer::FutureProducer,
    messages: &'m [(String, Vec<u8>)],
    a: &Member,
    b: &Member,
) -> &'m [(String, Vec<u8>)] {
    let slice = (messages.len() / 20).max(1);
    let mut rest = messages;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    // Both in the group first: the first member alone would take every
    // partition and could finish a slice before the second one joins.
    while !(a.owns_partitions() && b.owns_partitions()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the two members never shared the partitions; log a:\n{}\nlog b:\n{}",
            log_tail(&a.log),
            log_tail(&b.log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    loop {
        let (ca, cb) = (a.consumed().await, b.consumed().await);
        if ca > 0 && cb > 0 {
            eprintln!(
                "both working: a consumed {ca}, b {cb}; {} of {} produced",
                messages.len() - rest.len(),
                messages.len()
            );
            return rest;
        }
        assert!(
            std::time::Instant::now() < deadline && !rest.is_empty(),
            "both members never worked (a {ca}, b {cb}); log a:\n{}\nlog b:\n{}",
            log_tail(&a.log),
            log_tail(&b.log)
        );
        let (now, later) = rest.split_at(slice.min(rest.len()));
        produce_all(p, &f.env.requests, now.to_vec()).await;
        rest = later;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits (at most `timeout`) until every id has a final outcome; fails with
/// `what` and both members' logs otherwise.
async fn all_finished(
    outcomes: &mut TopicReader,
    ids: &[String],
    timeout: Duration,
    what: &str,
    (a, b): (&Member, &Member),
) {
    let done = read_events_until(outcomes, timeout, |e| all_final(e, ids)).await;
    assert!(
        done,
        "{what}; log a:\n{}\nlog b:\n{}",
        log_tail(&a.log),
        log_tail(&b.log)
    );
}

/// Two dynamic members (a static one that stops does not leave the group:
/// KIP-345 expects it back). One is stopped with SIGTERM while its partitions
/// have work; it finishes what it holds, commits and leaves, and the survivor
/// takes over its partitions. A graceful hand-over resends nothing and reads
/// nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_two_instances_leaves_gracefully_mid_load_and_the_survivor_takes_over() {
    let n = scale(2000, 6000);
    let f = Faults::shared(4).await;
    let sink = FaultSink::start().await;
    let (_logs, logs) = log_dir("one_of_two_instances_leaves_gracefully");
    let (ids, messages) = ok_webhook_load("leave", &f.env.id, n, &sink);
    let p = f.producer();
    let mut outcomes = f.reader(&f.env.outcomes);

    // Time to finish what a member holds (the shared test setting, 5 s, is
    // short for the long variant's backlog on a debug build).
    let drain = [("HERALD_KAFKA__DRAIN_TIMEOUT_MS", "30000".to_string())];
    let mut a = Member::spawn(&f, &drain, logs.join("a.log"));
    let mut b = Member::spawn(&f, &drain, logs.join("b.log"));
    let rest = produce_until_both_working(&f, &p, &messages, &a, &b).await;
    let (more, rest) = rest.split_at(rest.len() / 3);
    produce_all(&p, &f.env.requests, more.to_vec()).await;

    // Leave while that is being worked through, and keep producing: the
    // survivor must take over b's partitions, their backlog included.
    let b_consumed = b.consumed().await;
    b.herald.terminate();
    eprintln!(
        "b stopped (SIGTERM) after consuming at least {b_consumed}; {} outcome records",
        outcomes.records.len()
    );
    let after = rest.len() as u64;
    produce_all(&p, &f.env.requests, rest.to_vec()).await;

    all_finished(
        &mut outcomes,
        &ids,
        Duration::from_secs(240),
        "the survivor did not finish b's partitions",
        (&a, &b),
    )
    .await;
    let a_consumed = a.consumed().await;
    f.finish(&mut a.herald).await;
    let resent = f.assert_all_sent(&outcomes, &ids, &sink.counts()).await;
    eprintln!(
        "graceful leave: a consumed {a_consumed} of {n}, b at least {b_consumed}; {resent} resends"
    );
    assert!(
        a_consumed + b_consumed <= n as u64 && a_consumed >= after,
        "the survivor consumed what came after b left ({after}) and b's leftovers, each once: \
         a {a_consumed}, b {b_consumed}"
    );
    assert_eq!(resent, 0, "a graceful hand-over resends nothing");
    // A drain finishes what its lanes hold, so its commit covers all the
    // work done and nothing is read (and its outcome re-published) twice —
    // unless a drain ran out of time (`kafka.drain_timeout_ms`), which the
    // member logs.
    let cut_short = [&a.log, &b.log].iter().any(|l| {
        std::fs::read_to_string(l)
            .unwrap_or_default()
            .contains("drain deadline passed")
    });
    eprintln!(
        "graceful leave: {} outcome records for {n} requests (a drain ran out of time: {cut_short})",
        outcomes.records.len()
    );
    if !cut_short {
        assert_eq!(
            outcomes.records.len(),
            n,
            "one outcome record per request: nothing was read again after a hand-over"
        );
    }
}

/// Two static members. One is SIGKILLed mid-load and restarted with the same
/// `group.instance.id`: it gets its partitions back and works through their
/// backlog and the rest of the load. A send cut off by the kill may be made
/// again (the documented crash window), never without a recorded resumed
/// attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_two_static_instances_sigkilled_and_restarted_gets_its_partitions_back() {
    let n = scale(2000, 6000);
    let f = Faults::shared(4).await;
    let sink = FaultSink::start().await;
    let (_logs, logs) = log_dir("one_of_two_static_instances_sigkilled");
    let (ids, messages) = ok_webhook_load("static", &f.env.id, n, &sink);
    let p = f.producer();
    let mut outcomes = f.reader(&f.env.outcomes);
    let id_a = (
        "HERALD_KAFKA__GROUP_INSTANCE_ID",
        format!("herald-{}-a", f.env.id),
    );
    let id_b = (
        "HERALD_KAFKA__GROUP_INSTANCE_ID",
        format!("herald-{}-b", f.env.id),
    );

    let mut a = Member::spawn(&f, std::slice::from_ref(&id_a), logs.join("a.log"));
    let mut b = Member::spawn(&f, std::slice::from_ref(&id_b), logs.join("b-run1.log"));
    let rest = produce_until_both_working(&f, &p, &messages, &a, &b).await;
    let (more, rest) = rest.split_at(rest.len() / 3);
    produce_all(&p, &f.env.requests, more.to_vec()).await;
    let (second, last) = rest.split_at(rest.len() / 2);

    b.herald.kill9();
    eprintln!("b SIGKILLed; {} outcome records", outcomes.records.len());
    // b's partitions wait for it (on this broker they are not reassigned):
    // the second slice lands on them while it is down.
    produce_all(&p, &f.env.requests, second.to_vec()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut b = Member::spawn(&f, std::slice::from_ref(&id_b), logs.join("b-run2.log"));
    produce_all(&p, &f.env.requests, last.to_vec()).await;

    all_finished(
        &mut outcomes,
        &ids,
        Duration::from_secs(300),
        "not every request finished after b's restart",
        (&a, &b),
    )
    .await;
    let b_after = b.consumed().await;
    assert!(
        b_after > 0,
        "the restarted member got no partitions back; its log:\n{}",
        log_tail(&b.log)
    );
    f.finish_all(&mut [&mut a.herald, &mut b.herald]).await;
    let resent = f.assert_all_sent(&outcomes, &ids, &sink.counts()).await;
    eprintln!("static kill: b consumed {b_after} after its restart; {resent} crash-window resends");
}
