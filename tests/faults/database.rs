//! PostgreSQL crashes (`pg_ctl stop -m immediate`) and comes back mid-load.
//! Runs its own throwaway cluster: the shared one on 55432 is never touched.

use std::time::Duration;

use crate::helpers::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart_mid_load_loses_nothing() {
    let n = scale(900, 6000);
    let outages = scale(1, 3);
    let pg = Postgres::start();
    let f = Faults::on(&brokers(), &pg.admin_url(), 4).await;
    let sink = FaultSink::start().await;
    let (_logs, logs) = log_dir("postgres_restart_mid_load_loses_nothing");
    let log = logs.join("herald.log");
    let mut herald = HeraldProcess::spawn(f.vars(&[]), &log);

    let (ids, messages) = ok_webhook_load("pg", &f.env.id, n, &sink);
    let p = f.producer();
    let mut outcomes = f.reader(&f.env.outcomes);
    // Slices: one before each outage (it starts while that slice is being
    // processed), one produced while the database is down, one at the end.
    let slices = outages * 2 + 1;
    let per = n.div_ceil(slices);
    let mut chunks = messages.chunks(per);
    for _ in 0..outages {
        if let Some(c) = chunks.next() {
            produce_all(&p, &f.env.requests, c.to_vec()).await;
        }
        let seen = outcomes.records.len();
        assert!(
            outcomes
                .read_until(Duration::from_secs(120), |r| r.len() > seen + per / 4)
                .await,
            "load started; log:\n{}",
            log_tail(&log)
        );
        pg.stop_immediate();
        if let Some(c) = chunks.next() {
            produce_all(&p, &f.env.requests, c.to_vec()).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        pg.start_again();
    }
    for c in chunks {
        produce_all(&p, &f.env.requests, c.to_vec()).await;
    }
    f.settle(
        &mut herald,
        &mut outcomes,
        &ids,
        &log,
        Duration::from_secs(240),
    )
    .await;

    let resent = f.assert_all_sent(&outcomes, &ids, &sink.counts()).await;
    eprintln!("postgres restart: {n} requests, {outages} outage(s), {resent} crash-window resends");
}
