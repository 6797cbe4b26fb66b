//! Herald SIGKILLed at random moments, 10 times during one load, restarted
//! each time with the same `group.instance.id` (static membership: the local
//! broker gives a restarted static member its partitions back; see
//! ARCHITECTURE.md). Long: run by `scripts/faults.sh`. One kill cycle runs in
//! the normal suite (`tests/it/resilience.rs`).

use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::helpers::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long: scripts/faults.sh"]
async fn ten_sigkills_during_one_load_lose_nothing() {
    let kills = scale(3, 10);
    let n = scale(1500, 5000);
    let f = Faults::shared(4).await;
    let sink = FaultSink::start().await;
    let (_logs, logs) = log_dir("ten_sigkills_during_one_load_lose_nothing");
    let vars = f.vars(&[(
        "HERALD_KAFKA__GROUP_INSTANCE_ID",
        format!("herald-{}-0", f.env.id),
    )]);
    let seed: u64 = rand::rng().random();
    eprintln!("sigkill test: seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let (ids, messages) = ok_webhook_load("k10", &f.env.id, n, &sink);
    let p = f.producer();
    let mut outcomes = f.reader(&f.env.outcomes);
    let mut log = logs.join("run0.log");
    let mut herald = HeraldProcess::spawn(vars.clone(), &log);
    // Each slice is produced right before a kill, so every kill lands while
    // there is work: after a restart the member needs several seconds to get
    // its partitions back, then it works through the backlog.
    let per = n.div_ceil(kills + 1);
    let mut chunks = messages.chunks(per);
    for k in 0..kills {
        if let Some(c) = chunks.next() {
            produce_all(&p, &f.env.requests, c.to_vec()).await;
        }
        // Wait for progress (the member is back and working), then kill at a
        // random moment shortly after.
        let seen = outcomes.records.len();
        let _ = outcomes
            .read_until(Duration::from_secs(90), |r| r.len() > seen)
            .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
        herald.kill9();
        // Catch up with what the killed member published before it died
        // (the reader is only polled while waiting).
        outcomes
            .read_until(Duration::from_millis(500), |_| false)
            .await;
        eprintln!(
            "kill {}: after {} outcome records",
            k + 1,
            outcomes.records.len()
        );
        log = logs.join(format!("run{}.log", k + 1));
        herald = HeraldProcess::spawn(vars.clone(), &log);
    }
    for c in chunks {
        produce_all(&p, &f.env.requests, c.to_vec()).await;
    }
    f.settle(
        &mut herald,
        &mut outcomes,
        &ids,
        &log,
        Duration::from_secs(300),
    )
    .await;

    let resent = f.assert_all_sent(&outcomes, &ids, &sink.counts()).await;
    eprintln!("sigkill test: {kills} kills, {n} requests, {resent} crash-window resends");
}
