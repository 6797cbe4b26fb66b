//! The broker stops answering for 10 s mid-load (SIGSTOP/SIGCONT) and, in the
//! long variant, is also SIGKILLed and restarted after 10 s of downtime. Runs its own
//! tansu (sqlite storage): the shared broker on 19092 is never touched.

use std::time::Duration;

use crate::helpers::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_outage_mid_load_loses_nothing() {
    let n = scale(900, 6000);
    let mut tansu = Tansu::start();
    let f = Faults::on(&tansu.brokers(), &admin_database_url(), 4).await;
    let sink = FaultSink::start().await;
    let (_logs, logs) = log_dir("broker_outage_mid_load_loses_nothing");
    let log = logs.join("herald.log");
    // Faults::vars sets session.timeout.ms to 60 s, above the outage: on the
    // local broker (tansu 0.6.0) a member whose session expires during an
    // outage never gets an assignment again (found by this test; static and
    // dynamic members alike; see docs/faults.md and
    // probe_session_expiry_recovery). Real Kafka rejoins such a member.
    let extra: Vec<(&str, String)> = vec![(
        "HERALD_KAFKA__GROUP_INSTANCE_ID",
        format!("herald-{}-0", f.env.id),
    )];
    let mut herald = HeraldProcess::spawn(f.vars(&extra), &log);

    let (ids, messages) = ok_webhook_load("brk", &f.env.id, n, &sink);
    let p = f.producer();
    let mut outcomes = f.reader(&f.env.outcomes);
    let (first, rest) = messages.split_at(n * 2 / 3);
    produce_all(&p, &f.env.requests, first.to_vec()).await;
    assert!(
        outcomes
            .read_until(Duration::from_secs(120), |r| r.len() > n / 6)
            .await,
        "load started; log:\n{}",
        log_tail(&log)
    );
    tansu.pause();
    tokio::time::sleep(Duration::from_secs(10)).await;
    tansu.resume();
    let (second, third) = rest.split_at(rest.len() / 2);
    produce_all(&p, &f.env.requests, second.to_vec()).await;
    if full() {
        let seen = outcomes.records.len();
        let _ = outcomes
            .read_until(Duration::from_secs(60), |r| r.len() > seen + 10)
            .await;
        tansu.kill_and_restart(Duration::from_secs(10));
    }
    produce_all(&p, &f.env.requests, third.to_vec()).await;

    f.settle(
        &mut herald,
        &mut outcomes,
        &ids,
        &log,
        Duration::from_secs(240),
    )
    .await;

    let resent = f.assert_all_sent(&outcomes, &ids, &sink.counts()).await;
    eprintln!("broker outage: {n} requests, {resent} crash-window resends");
}

/// Probe (run by hand): what brings a member back after its session expired
/// on the local broker? Pauses the broker past the session timeout, waits,
/// then restarts Herald with the same static id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "probe, run by hand"]
async fn probe_session_expiry_recovery() {
    let n = 600;
    let tansu = Tansu::start();
    let f = Faults::on(&tansu.brokers(), &admin_database_url(), 4).await;
    let sink = FaultSink::start().await;
    let (_logs, logs) = log_dir("probe_session_expiry_recovery");
    let log = logs.join("herald.log");
    let static_id = std::env::var("PROBE_STATIC").is_ok();
    let mut extra: Vec<(&str, String)> = vec![(
        "HERALD_KAFKA__PROPERTIES__SESSION_TIMEOUT_MS",
        "10000".into(),
    )];
    if static_id {
        extra.push((
            "HERALD_KAFKA__GROUP_INSTANCE_ID",
            format!("herald-{}-0", f.env.id),
        ));
    }
    let vars = f.vars(&extra);
    let mut herald = HeraldProcess::spawn(vars.clone(), &log);
    let (ids, messages) = ok_webhook_load("prb", &f.env.id, n, &sink);
    let p = f.producer();
    let mut outcomes = f.reader(&f.env.outcomes);
    let (first, rest) = messages.split_at(n / 3);
    produce_all(&p, &f.env.requests, first.to_vec()).await;
    assert!(
        read_events_until(&mut outcomes, Duration::from_secs(120), |e| e.len()
            >= n / 3)
        .await
    );
    tansu.pause();
    tokio::time::sleep(Duration::from_secs(15)).await;
    tansu.resume();
    produce_all(&p, &f.env.requests, rest.to_vec()).await;
    let t0 = std::time::Instant::now();
    let ok = read_events_until(&mut outcomes, Duration::from_secs(90), |e| {
        all_final(e, &ids)
    })
    .await;
    eprintln!(
        "PROBE static={static_id}: recovered by itself: {ok} after {:?}",
        t0.elapsed()
    );
    if !ok {
        herald.terminate();
        let log2 = logs.join("herald2.log");
        let mut h2 = HeraldProcess::spawn(vars, &log2);
        let t1 = std::time::Instant::now();
        let ok2 = read_events_until(&mut outcomes, Duration::from_secs(120), |e| {
            all_final(e, &ids)
        })
        .await;
        eprintln!(
            "PROBE static={static_id}: after a restart: {ok2} after {:?}",
            t1.elapsed()
        );
        h2.terminate();
    }
    eprintln!("log: {}", log_tail(&log));
}
