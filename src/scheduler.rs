//! The due-work scheduler: a loop in every instance that claims due rows
//! (`scheduled`, `deferred`, `throttled`, `retrying` whose `next_attempt_at`
//! has passed) in batches with `FOR UPDATE SKIP LOCKED` and a lease, and
//! fires each through [`Pipeline::fire_due`] — the same render → send →
//! persist → publish path as fresh requests. Urgent rows are claimed first.
//! Nothing ever waits inside a Kafka partition: waiting is a row.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Pipeline;
use crate::store::DueStore;

/// Rows of one batch fired at once.
const FIRE_CONCURRENCY: usize = 16;

/// How often the due-queue depth gauge is refreshed.
const DEPTH_INTERVAL: Duration = Duration::from_secs(5);

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    /// Sleep between rounds that found nothing due.
    pub interval: Duration,
    /// Rows claimed per round.
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
    owner: String,
}

impl Scheduler {
    pub fn new(due: DueStore, pipeline: Arc<Pipeline>, settings: SchedulerSettings) -> Self {
        Scheduler {
            due,
            pipeline,
            settings,
            owner: format!("herald-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// Claims and fires one batch; returns how many rows were claimed.
    /// A row whose firing fails on infrastructure is released (due again).
    pub async fn run_once(&self) -> Result<usize, crate::store::StoreError> {
        let rows = self
            .due
            .claim_batch(&self.owner, self.settings.batch_size, self.settings.lease)
            .await?;
        let n = rows.len();
        futures::stream::iter(rows)
            .for_each_concurrent(FIRE_CONCURRENCY, |row| async move {
                let id = row.notification.id.clone();
                if let Err(e) = self.pipeline.fire_due(row, &self.owner).await {
                    tracing::warn!(notification_id = %id, error = %e, "firing a due row failed; released");
                    self.pipeline
                        .metrics()
                        .infra_retries
                        .with_label_values(&[e.stage()])
                        .inc();
                    if let Err(e) = self.due.release(&id, &self.owner).await {
                        tracing::warn!(notification_id = %id, error = %e, "releasing a due row failed; its lease will expire");
                    }
                }
            })
            .await;
        Ok(n)
    }

    /// Runs rounds until `stop` is cancelled. A full batch is followed at
    /// once by the next; otherwise the loop sleeps `interval`. A round in
    /// progress finishes before the loop returns.
    pub async fn run(self, stop: CancellationToken) {
        let mut last_depth: Option<Instant> = None;
        loop {
            if stop.is_cancelled() {
                return;
            }
            if last_depth.is_none_or(|t| t.elapsed() >= DEPTH_INTERVAL) {
                if let Ok(d) = self.due.depth().await {
                    self.pipeline.metrics().due_depth.set(d);
                }
                last_depth = Some(Instant::now());
            }
            let claimed = match self.run_once().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming due rows failed");
                    0
                }
            };
            if i64::try_from(claimed).unwrap_or(i64::MAX) >= self.settings.batch_size {
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.settings.interval) => {}
            }
        }
    }
}
