//! The due-work scheduler: a loop in every instance that claims due rows
//! (`scheduled`, `deferred`, `throttled`, `retrying` whose `next_attempt_at`
//! has passed) in batches with `FOR UPDATE SKIP LOCKED` and a lease, and
//! fires each through [`Pipeline::fire_due`] — the same render → send →
//! persist → publish path as fresh requests. Urgent rows are claimed first.
//! Nothing ever waits inside a Kafka partition: waiting is a row.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Pipeline;
use crate::store::{DueRow, DueStore};

/// Rows in flight at most, in batches: the scheduler claims the next batch
/// while earlier rows are still being sent (each waits for its provider and
/// for the broker's acknowledgement of its outcome), and waits only when
/// this many batches are in flight.
const IN_FLIGHT_BATCHES: usize = 4;

/// How often the due-queue depth gauge is refreshed.
const DEPTH_INTERVAL: Duration = Duration::from_secs(5);

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    /// Sleep after a claim that found less than a full batch due.
    pub interval: Duration,
    /// Rows claimed at a time.
    pub batch_size: i64,
    /// How long claimed rows belong to this instance.
    pub lease: Duration,
}

/// One scheduler (one per instance).
pub struct Scheduler {
    due: DueStore,
    pipeline: Arc<Pipeline>,
    settings: SchedulerSettings,
    /// This instance's lease owner id (unique per process start).
    owner: Arc<str>,
}

impl Scheduler {
    pub fn new(due: DueStore, pipeline: Arc<Pipeline>, settings: SchedulerSettings) -> Self {
        Scheduler {
            due,
            pipeline,
            settings,
            owner: format!("herald-{}", uuid::Uuid::new_v4().simple()).into(),
        }
    }

    /// Claims due rows and fires each as its own task, until `stop` is
    /// cancelled. A full batch is followed at once by the next claim (while
    /// up to [`IN_FLIGHT_BATCHES`] batches are in flight); a partial one by
    /// a sleep of `interval`. Rows in flight finish before it returns.
    pub async fn run(self, stop: CancellationToken) {
        let batch = usize::try_from(self.settings.batch_size)
            .unwrap_or(1)
            .max(1);
        let max_in_flight = batch.saturating_mul(IN_FLIGHT_BATCHES);
        let mut firing = JoinSet::new();
        let mut last_depth: Option<Instant> = None;
        loop {
            while let Some(done) = firing.try_join_next() {
                reap(done);
            }
            if stop.is_cancelled() {
                break;
            }
            if firing.len() + batch > max_in_flight {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    done = firing.join_next() => {
                        if let Some(done) = done {
                            reap(done);
                        }
                        continue;
                    }
                }
            }
            if last_depth.is_none_or(|t| t.elapsed() >= DEPTH_INTERVAL) {
                if let Ok(d) = self.due.depth().await {
                    self.pipeline.metrics().due_depth.set(d);
                }
                last_depth = Some(Instant::now());
            }
            let rows = match self
                .due
                .claim_batch(&self.owner, self.settings.batch_size, self.settings.lease)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming due rows failed");
                    Vec::new()
                }
            };
            let claimed = rows.len();
            for row in rows {
                let (pipeline, due, owner) =
                    (self.pipeline.clone(), self.due.clone(), self.owner.clone());
                firing.spawn(fire(pipeline, due, owner, row));
            }
            if claimed >= batch {
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.settings.interval) => {}
            }
        }
        while let Some(done) = firing.join_next().await {
            reap(done);
        }
    }
}

/// Logs a firing task that panicked (its row's lease lapses and another
/// claim takes it again).
fn reap(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "firing a due row panicked; its lease will lapse");
    }
}

/// Fires one claimed row through [`Pipeline::fire_due`]. A row whose firing
/// fails on infrastructure is released (due again).
async fn fire(pipeline: Arc<Pipeline>, due: DueStore, owner: Arc<str>, row: DueRow) {
    let id = row.notification.id.clone();
    if let Err(e) = pipeline.fire_due(row, &owner).await {
        tracing::warn!(notification_id = %id, error = %e, "firing a due row failed; released");
        pipeline
            .metrics()
            .infra_retries
            .with_label_values(&[e.stage()])
            .inc();
        if let Err(e) = due.release(&id, &owner).await {
            tracing::warn!(notification_id = %id, error = %e, "releasing a due row failed; its lease will expire");
        }
    }
}
