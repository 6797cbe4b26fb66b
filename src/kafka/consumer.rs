//! The request consumer: one member of the Herald consumer group.
//!
//! A dedicated OS thread polls librdkafka (so rebalance callbacks, which may
//! block while in-flight work drains, never block a tokio worker) and hands
//! each message to a *lane* of its partition: lane = hash(key) mod
//! `partition_concurrency`. A lane is a tokio task processing its messages in
//! order, so messages with the same key are processed in order and different
//! keys run concurrently. A global semaphore bounds messages in flight.
//!
//! Offsets: `enable.auto.offset.store=false`; when a message settles, the
//! partition's [`OffsetTracker`] says how far everything is done and only
//! that offset is stored. Stored offsets are auto-committed periodically, and
//! committed synchronously on revoke and at shutdown after a drain: work
//! already running finishes (up to `drain_timeout_ms`), work not yet started
//! is left for the next owner of the partition.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::TopicPartitionList;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::SourceMessage;
use super::offsets::OffsetTracker;
use crate::config::KafkaSettings;
use crate::pipeline::Pipeline;
use crate::telemetry::Metrics;

type PartitionKey = (String, i32);

/// Per-partition bookkeeping shared by the poll thread, the lanes and the
/// rebalance callback.
struct PartitionState {
    inner: Mutex<PartitionInner>,
    /// Signalled whenever a running message settles (the drain waits on it).
    settled: Condvar,
}

struct PartitionInner {
    /// Which offsets are done, in order.
    tracker: OffsetTracker,
    /// Messages currently being processed (started, not settled).
    running: usize,
    /// Set on revoke/shutdown: queued messages are not started any more.
    revoked: bool,
}

impl PartitionState {
    fn new() -> Arc<Self> {
        Arc::new(PartitionState {
            inner: Mutex::new(PartitionInner {
                tracker: OffsetTracker::new(),
                running: 0,
                revoked: false,
            }),
            settled: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PartitionInner> {
        // A panic while holding the lock leaves consistent data (plain fields).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the partition revoked and waits until nothing runs or `deadline`.
    /// Returns how many messages were still running at the deadline.
    fn revoke_and_drain(&self, deadline: Instant) -> usize {
        let mut g = self.lock();
        g.revoked = true;
        while g.running > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = match self.settled.wait_timeout(g, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        g.running
    }
}

/// Told (owned, total) request partitions after every rebalance.
pub type AssignmentListener = Arc<dyn Fn(usize, usize) + Send + Sync>;

/// State shared with the rebalance callback.
struct Shared {
    partitions: Mutex<HashMap<PartitionKey, Arc<PartitionState>>>,
    drain_timeout: Duration,
    /// The request topics (to count all their partitions).
    topics: Vec<String>,
    listener: Mutex<Option<AssignmentListener>>,
}

impl Shared {
    /// Tells the listener how many of the request topics' partitions this
    /// member owns now.
    fn announce(&self, consumer: &BaseConsumer<HeraldContext>) {
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(listener) = listener else {
            return;
        };
        let owned = self.lock().len();
        let mut total = 0;
        for topic in &self.topics {
            match consumer.fetch_metadata(Some(topic), Duration::from_secs(2)) {
                Ok(md) => {
                    total += md
                        .topics()
                        .iter()
                        .filter(|t| t.name() == topic)
                        .map(|t| t.partitions().len())
                        .sum::<usize>();
                }
                Err(e) => {
                    // Keep the previous share rather than guess.
                    tracing::warn!(%topic, error = %e, "counting partitions after a rebalance failed");
                    return;
                }
            }
        }
        tracing::info!(owned, total, "request partitions owned");
        listener(owned, total);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PartitionKey, Arc<PartitionState>>> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Revokes and drains every partition in `keys` (all when `None`).
    fn drain(&self, keys: Option<Vec<PartitionKey>>) {
        let deadline = Instant::now() + self.drain_timeout;
        let states: Vec<(PartitionKey, Arc<PartitionState>)> = {
            let mut map = self.lock();
            match keys {
                Some(keys) => keys
                    .into_iter()
                    .filter_map(|k| map.remove(&k).map(|s| (k, s)))
                    .collect(),
                None => map.drain().collect(),
            }
        };
        for ((topic, partition), state) in states {
            let left = state.revoke_and_drain(deadline);
            if left > 0 {
                tracing::warn!(%topic, partition, left, "drain deadline passed with messages still running");
            }
        }
    }
}

/// The consumer context: drains and commits on revoke, prepares state on assign.
pub struct HeraldContext {
    shared: Arc<Shared>,
}

impl ClientContext for HeraldContext {}

impl ConsumerContext for HeraldContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let keys = tpl_keys(tpl);
            tracing::info!(partitions = ?keys, "partitions revoked: draining in-flight work");
            self.shared.drain(Some(keys));
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                // NoOffset just means nothing new was stored.
                tracing::debug!(error = %e, "commit on revoke");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let keys = tpl_keys(tpl);
                tracing::info!(partitions = ?keys, "partitions assigned");
                let mut map = self.shared.lock();
                for k in keys {
                    map.insert(k, PartitionState::new());
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(_) => return,
        }
        self.shared.announce(consumer);
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(error = %e, "offset commit");
        }
    }
}

fn tpl_keys(tpl: &TopicPartitionList) -> Vec<PartitionKey> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// One message handed to a lane, with its in-flight permit.
struct Job {
    message: SourceMessage,
    _permit: InFlight,
}

/// Holds a semaphore permit and the in-flight gauge while a message is in flight.
struct InFlight {
    _permit: OwnedSemaphorePermit,
    metrics: Metrics,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}

/// The lanes of one partition, owned by the poll thread.
struct PartitionLanes {
    state: Arc<PartitionState>,
    lanes: Vec<Option<mpsc::UnboundedSender<Job>>>,
}

/// The request consumer. [`RequestConsumer::run`] returns after shutdown,
/// once in-flight work drained and offsets were committed.
pub struct RequestConsumer {
    consumer: Arc<BaseConsumer<HeraldContext>>,
    shared: Arc<Shared>,
    topics: Vec<String>,
    partition_concurrency: usize,
    in_flight: Arc<Semaphore>,
    /// True with `group.instance.id` (static membership).
    static_member: bool,
}

impl RequestConsumer {
    /// Creates the consumer (no network I/O until `run`).
    pub fn new(settings: &KafkaSettings) -> KafkaResult<Self> {
        let shared = Arc::new(Shared {
            partitions: Mutex::new(HashMap::new()),
            drain_timeout: Duration::from_millis(settings.drain_timeout_ms),
            topics: settings.request_topics.clone(),
            listener: Mutex::new(None),
        });
        let consumer: BaseConsumer<HeraldContext> = super::consumer_config(settings)
            .create_with_context(HeraldContext {
                shared: shared.clone(),
            })?;
        Ok(RequestConsumer {
            consumer: Arc::new(consumer),
            shared,
            topics: settings.request_topics.clone(),
            partition_concurrency: settings.partition_concurrency,
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            static_member: settings.group_instance_id.is_some(),
        })
    }

    /// Calls `listener(owned, total)` after every rebalance with the number
    /// of request partitions this member owns and the number there are (the
    /// router derives this instance's share of provider rate limits).
    pub fn on_assignment(&self, listener: AssignmentListener) {
        *self
            .shared
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(listener);
    }

    /// Checks that the broker answers a metadata request (for `/readyz`).
    pub fn probe(&self, timeout: Duration) -> KafkaResult<()> {
        self.consumer.fetch_metadata(None, timeout).map(|_| ())
    }

    /// A handle for readiness probes that outlives `run`'s borrow.
    pub fn prober(&self) -> Arc<dyn Fn(Duration) -> bool + Send + Sync> {
        let c = self.consumer.clone();
        Arc::new(move |t| c.fetch_metadata(None, t).is_ok())
    }

    /// Subscribes and processes messages until `shutdown` is cancelled, then
    /// drains and commits. Blocks the calling thread: run it with
    /// `spawn_blocking` or on its own thread.
    pub fn run(
        self,
        pipeline: Arc<Pipeline>,
        metrics: Metrics,
        runtime: tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) -> KafkaResult<()> {
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        self.consumer.subscribe(&topics)?;
        tracing::info!(topics = ?self.topics, "consumer subscribed");
        let mut lanes: HashMap<PartitionKey, PartitionLanes> = HashMap::new();
        while !shutdown.is_cancelled() {
            let sem = self.in_flight.clone();
            let stop = shutdown.clone();
            let permit = runtime.block_on(async move {
                tokio::select! {
                    p = sem.acquire_owned() => p.ok(),
                    _ = stop.cancelled() => None,
                }
            });
            let Some(permit) = permit else { break };
            let message = match self.consumer.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    continue;
                }
                Some(Ok(m)) => SourceMessage::from_message(&m),
            };
            metrics.in_flight.inc();
            let job = Job {
                message,
                _permit: InFlight {
                    _permit: permit,
                    metrics: metrics.clone(),
                },
            };
            self.dispatch(&mut lanes, job, &pipeline, &runtime, &shutdown);
        }
        tracing::info!("consumer stopping: draining in-flight work");
        self.shared.drain(None);
        lanes.clear();
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!("offsets committed at shutdown"),
            Err(e) => tracing::debug!(error = %e, "commit at shutdown"),
        }
        // Close now, on this thread, rather than whenever the last handle is
        // dropped: a dynamic member leaves the group at once so survivors
        // take its partitions; a static member (group.instance.id) keeps them
        // until its session times out, expecting to come back.
        self.close(Duration::from_secs(10));
        Ok(())
    }

    fn close(&self, timeout: Duration) {
        if !self.static_member {
            // Leave explicitly; a static member keeps its membership so a
            // restart with the same id resumes at once.
            self.consumer.unsubscribe();
            for _ in 0..5 {
                let _ = self.consumer.poll(Duration::from_millis(20));
            }
        }
        if let Err(e) = self.consumer.close_queue() {
            tracing::warn!(error = %e, "closing the consumer");
            return;
        }
        let deadline = Instant::now() + timeout;
        while !self.consumer.closed() && Instant::now() < deadline {
            let _ = self.consumer.poll(Duration::from_millis(100));
        }
        tracing::info!("consumer closed");
    }

    fn dispatch(
        &self,
        lanes: &mut HashMap<PartitionKey, PartitionLanes>,
        job: Job,
        pipeline: &Arc<Pipeline>,
        runtime: &tokio::runtime::Handle,
        shutdown: &CancellationToken,
    ) {
        let key = (job.message.topic.clone(), job.message.partition);
        let state = {
            let mut map = self.shared.lock();
            map.entry(key.clone())
                .or_insert_with(PartitionState::new)
                .clone()
        };
        // A new assignment replaces the state: old lanes (of a revoked
        // assignment) are dropped and end after skipping what they hold.
        let entry = lanes.entry(key.clone()).or_insert_with(|| PartitionLanes {
            state: state.clone(),
            lanes: Vec::new(),
        });
        if !Arc::ptr_eq(&entry.state, &state) {
            *entry = PartitionLanes {
                state: state.clone(),
                lanes: Vec::new(),
            };
        }
        if entry.lanes.is_empty() {
            entry.lanes.resize_with(self.partition_concurrency, || None);
        }
        state.lock().tracker.begin(job.message.offset);
        let lane = lane_for(&job.message, self.partition_concurrency);
        let sender = entry.lanes[lane].get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            runtime.spawn(run_lane(
                rx,
                state.clone(),
                self.consumer.clone(),
                pipeline.clone(),
                shutdown.clone(),
            ));
            tx
        });
        if let Err(mpsc::error::SendError(job)) = sender.send(job) {
            // The lane ended (cannot happen while we hold the sender); leave
            // the offset unsettled so it is redelivered.
            tracing::error!(offset = job.message.offset, "lane closed unexpectedly");
        }
    }
}

/// Chooses the lane: same key → same lane (in order); no key → spread by offset.
fn lane_for(m: &SourceMessage, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match &m.key {
        Some(k) => k.hash(&mut h),
        None => m.offset.hash(&mut h),
    }
    (h.finish() % lanes as u64) as usize
}

/// Processes one lane's messages in order. Infrastructure failures (database,
/// broker) are retried with backoff: the message is never skipped, only left
/// unsettled when the partition is revoked or Herald shuts down.
async fn run_lane(
    mut rx: mpsc::UnboundedReceiver<Job>,
    state: Arc<PartitionState>,
    consumer: Arc<BaseConsumer<HeraldContext>>,
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
) {
    while let Some(job) = rx.recv().await {
        {
            let mut g = state.lock();
            if g.revoked {
                continue;
            }
            g.running += 1;
        }
        let m = &job.message;
        let mut backoff = Duration::from_millis(100);
        let done = loop {
            match pipeline.process(m).await {
                Ok(()) => break true,
                Err(e) => {
                    tracing::warn!(topic = %m.topic, partition = m.partition, offset = m.offset,
                        error = %e, retry_in_ms = backoff.as_millis() as u64, "processing failed; retrying");
                    pipeline
                        .metrics()
                        .infra_retries
                        .with_label_values(&[e.stage()])
                        .inc();
                    if state.lock().revoked || shutdown.is_cancelled() {
                        break false;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let mut g = state.lock();
        g.running -= 1;
        if done && let Some(offset) = g.tracker.complete(m.offset) {
            // Fails harmlessly if the partition is no longer assigned.
            if let Err(e) = consumer.store_offset(&m.topic, m.partition, offset) {
                tracing::debug!(error = %e, "store offset");
            }
        }
        drop(g);
        state.settled.notify_all();
    }
}
