//! The request consumer: one member of the Herald consumer group.
//!
//! A dedicated OS thread polls librdkafka (so rebalance callbacks, which may
//! block while in-flight work drains, never block a tokio worker) and hands
//! each message to a *lane* of its partition: lane = hash(key) mod
//! `partition_concurrency`. A lane is a tokio task processing its messages in
//! order, so messages with the same key are processed in order and different
//! keys run concurrently. A global semaphore bounds messages in flight.
//!
//! A lane does not wait for the broker: the pipeline runs inside an
//! [`AckCollector`] scope, so its outcome events and dead letters are only
//! enqueued; once the request's state is durable the lane takes its next
//! message, and a task of the message's own awaits the acknowledgements
//! (see [`super::acks`]). The message stays in flight (permit, drain) until
//! they arrive; if one fails, the message is processed again.
//!
//! Offsets: `enable.auto.offset.store=false`; when a message settles (durable
//! *and* acknowledged), the partition's [`OffsetTracker`] says how far
//! everything is done and only that offset is stored. Stored offsets are
//! auto-committed periodically, and committed synchronously on revoke and at
//! shutdown after a drain: every message already handed to a lane finishes,
//! acknowledgements included (up to `drain_timeout_ms`), so the commit covers
//! all of it; only what is left at the deadline goes to the next owner of the
//! partition.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::topic_partition_list::TopicPartitionList;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use futures::future::BoxFuture;

use super::SourceMessage;
use super::acks::AckCollector;
use super::offsets::OffsetTracker;
use crate::config::KafkaSettings;
use crate::pipeline::{Pipeline, PipelineError};
use crate::telemetry::Metrics;
use crate::telemetry::metrics::RequestStage;

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
    /// Messages handed to a lane and not started yet.
    queued: usize,
    /// Messages started and not settled: being processed, or processed and
    /// waiting for their acknowledgements.
    running: usize,
    /// Set when a revoke/shutdown drain starts: a failing message is given up
    /// (left for the next owner) instead of retried.
    draining: bool,
    /// Set once the drain ends: queued messages are not started any more.
    revoked: bool,
}

impl PartitionState {
    fn new() -> Arc<Self> {
        Arc::new(PartitionState {
            inner: Mutex::new(PartitionInner {
                tracker: OffsetTracker::new(),
                queued: 0,
                running: 0,
                draining: false,
                revoked: false,
            }),
            settled: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PartitionInner> {
        // A panic while holding the lock leaves consistent data (plain fields).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a message handed to a lane.
    fn dispatched(&self, offset: i64) {
        let mut g = self.lock();
        g.tracker.begin(offset);
        g.queued += 1;
    }

    /// Whether a failing message should be given up rather than retried.
    fn draining(&self) -> bool {
        self.lock().draining
    }

    /// Lets the lanes finish every message handed to them, then marks the
    /// partition revoked. Waits until nothing is queued or running, or
    /// `deadline`; past it, queued messages are not started any more and are
    /// left for the next owner. A message that fails while draining is given
    /// up, not retried (it is left for the next owner too), so a database or
    /// broker outage does not hold the drain until its deadline. Returns how
    /// many messages were still running at the deadline.
    ///
    /// Finishing the queue, not only what already runs, is what makes a
    /// hand-over clean: lanes complete out of order, so a message left in one
    /// lane would hold the committed offset below work other lanes already
    /// did, and the next owner would read that work again (and re-publish
    /// its outcomes).
    fn revoke_and_drain(&self, deadline: Instant) -> usize {
        let mut g = self.lock();
        g.draining = true;
        while g.queued + g.running > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = match self.settled.wait_timeout(g, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        g.revoked = true;
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
            commit_drained(consumer, "on revoke");
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

/// Commits what a drain stored, `when` ("on revoke", "at shutdown") naming
/// the occasion in the log. Nothing new stored is not an error; a failed
/// commit means the next owner re-reads from the last one.
fn commit_drained(consumer: &BaseConsumer<HeraldContext>, when: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!("offsets committed {when}"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e,
            "offset commit {when} failed: the next owner re-reads from the last commit"),
    }
}

fn tpl_keys(tpl: &TopicPartitionList) -> Vec<PartitionKey> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// Takes `n` permits of `sem` for the poll thread: at once when they are
/// free, else waiting on `runtime`; `None` once `stop` is cancelled.
fn take_permits(
    runtime: &tokio::runtime::Handle,
    sem: &Arc<Semaphore>,
    n: u32,
    stop: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = sem.clone().try_acquire_many_owned(n) {
        return Some(p);
    }
    let (sem, stop) = (sem.clone(), stop.clone());
    runtime.block_on(async move {
        tokio::select! {
            p = sem.acquire_many_owned(n) => p.ok(),
            _ = stop.cancelled() => None,
        }
    })
}

/// One message handed to a lane, with its in-flight permit. Lanes carry it
/// boxed: a lane's channel allocates its slots in blocks of 32 and keeps
/// them, so with 256 lanes per partition the size of a slot is what the
/// lanes hold in memory (measured: ~23 MB for four partitions unboxed).
struct Job {
    message: SourceMessage,
    /// When the consumer received it.
    received: Instant,
    _permit: InFlight,
}

/// Holds a semaphore permit and the in-flight gauge while a message is in flight.
struct InFlight {
    _permit: OwnedSemaphorePermit,
    /// One permit per payload byte (`kafka.max_in_flight_bytes`).
    _bytes: OwnedSemaphorePermit,
    /// `herald_in_flight_messages`, decremented on drop.
    gauge: prometheus::IntGauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The lanes of one partition, owned by the poll thread.
struct PartitionLanes {
    state: Arc<PartitionState>,
    lanes: Vec<Option<mpsc::UnboundedSender<Box<Job>>>>,
}

/// The request consumer. [`RequestConsumer::run`] returns after shutdown,
/// once in-flight work drained and offsets were committed.
pub struct RequestConsumer {
    consumer: Arc<BaseConsumer<HeraldContext>>,
    shared: Arc<Shared>,
    topics: Vec<String>,
    partition_concurrency: usize,
    in_flight: Arc<Semaphore>,
    /// Payload bytes in flight, one permit per byte.
    in_flight_bytes: Arc<Semaphore>,
    /// Permits of `in_flight_bytes`: the most one message takes.
    max_in_flight_bytes: u32,
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
        let max_in_flight_bytes =
            u32::try_from(settings.max_in_flight_bytes.max(1)).unwrap_or(u32::MAX);
        let consumer: BaseConsumer<HeraldContext> =
            super::consumer_config(settings, super::FETCH_WAIT_MS).create_with_context(
                HeraldContext {
                    shared: shared.clone(),
                },
            )?;
        Ok(RequestConsumer {
            consumer: Arc::new(consumer),
            shared,
            topics: settings.request_topics.clone(),
            partition_concurrency: settings.partition_concurrency,
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            in_flight_bytes: Arc::new(Semaphore::new(max_in_flight_bytes as usize)),
            max_in_flight_bytes,
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
        let handler: Arc<dyn Handler> = pipeline;
        let mut lanes: HashMap<PartitionKey, PartitionLanes> = HashMap::new();
        while !shutdown.is_cancelled() {
            let Some(permit) = take_permits(&runtime, &self.in_flight, 1, &shutdown) else {
                break;
            };
            let message = match self.consumer.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    continue;
                }
                Some(Ok(m)) => SourceMessage::from_message(&m),
            };
            // Admit the message by its size too; a larger one than the
            // budget waits until it is alone.
            let size = message.payload.as_ref().map_or(0, Vec::len)
                + message.key.as_ref().map_or(0, Vec::len);
            let need = u32::try_from(size)
                .unwrap_or(u32::MAX)
                .min(self.max_in_flight_bytes);
            // Stopping: this message is not handed to a lane, so its offset
            // is not stored; it is read again after a restart.
            let Some(bytes) = take_permits(&runtime, &self.in_flight_bytes, need, &shutdown) else {
                break;
            };
            metrics.in_flight.inc();
            if let Some(fetched) = age(&message) {
                handler.timed(RequestStage::Fetch, fetched);
            }
            let job = Box::new(Job {
                message,
                received: Instant::now(),
                _permit: InFlight {
                    _permit: permit,
                    _bytes: bytes,
                    gauge: metrics.in_flight.clone(),
                },
            });
            self.dispatch(&mut lanes, job, &handler, &runtime, &shutdown);
        }
        tracing::info!("consumer stopping: draining in-flight work");
        self.shared.drain(None);
        lanes.clear();
        commit_drained(&self.consumer, "at shutdown");
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
        job: Box<Job>,
        handler: &Arc<dyn Handler>,
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
        state.dispatched(job.message.offset);
        let lane = lane_for(&job.message, self.partition_concurrency);
        let sender = entry.lanes[lane].get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            runtime.spawn(run_lane(
                rx,
                state.clone(),
                self.consumer.clone() as Arc<dyn OffsetSink>,
                handler.clone(),
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

/// What the lanes run for each message: the pipeline in production, fakes in
/// tests. `Ok` means the request's state is durable and its outcome events are
/// published — or, inside an [`AckCollector`] scope, enqueued with their
/// acknowledgements in the collector.
pub trait Handler: Send + Sync + 'static {
    /// Processes one message (see [`Pipeline::process`]).
    fn handle<'a>(&'a self, message: &'a SourceMessage)
    -> BoxFuture<'a, Result<(), PipelineError>>;

    /// Counts an infrastructure retry at `stage` (bounded label).
    fn retried(&self, stage: &'static str);

    /// Records how long a message spent in `stage`.
    fn timed(&self, _stage: RequestStage, _took: Duration) {}
}

impl Handler for Pipeline {
    fn handle<'a>(
        &'a self,
        message: &'a SourceMessage,
    ) -> BoxFuture<'a, Result<(), PipelineError>> {
        Box::pin(self.process(message))
    }

    fn retried(&self, stage: &'static str) {
        self.metrics()
            .infra_retries
            .with_label_values(&[stage])
            .inc();
    }

    fn timed(&self, stage: RequestStage, took: Duration) {
        self.metrics().request_stage(stage, took);
    }
}

/// Where settled offsets go: the consumer's offset store in production.
pub trait OffsetSink: Send + Sync + 'static {
    /// Stores `offset` (everything up to it is done) for the next commit.
    fn store(&self, topic: &str, partition: i32, offset: i64);
}

impl OffsetSink for BaseConsumer<HeraldContext> {
    fn store(&self, topic: &str, partition: i32, offset: i64) {
        // Fails harmlessly if the partition is no longer assigned.
        if let Err(e) = self.store_offset(topic, partition, offset) {
            tracing::debug!(error = %e, "store offset");
        }
    }
}

/// Processes one lane's messages in order. A message's lane is free for the
/// next one as soon as the message is processed (state durable, outcome
/// events enqueued); its broker acknowledgements are awaited by a task of
/// its own ([`await_acks`]), which then settles the offset. Infrastructure
/// failures (database, broker) are retried with backoff: the message is
/// never skipped, only left unsettled when the partition is drained or
/// Herald shuts down.
async fn run_lane(
    mut rx: mpsc::UnboundedReceiver<Box<Job>>,
    state: Arc<PartitionState>,
    sink: Arc<dyn OffsetSink>,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) {
    while let Some(job) = rx.recv().await {
        {
            let mut g = state.lock();
            g.queued -= 1;
            if g.revoked {
                continue;
            }
            g.running += 1;
        }
        let started = Instant::now();
        handler.timed(RequestStage::Queued, started - job.received);
        let acks = AckCollector::new();
        let done = process(handler.as_ref(), &job.message, &acks, &state, &shutdown).await;
        let enqueued = Instant::now();
        if done {
            handler.timed(RequestStage::Process, enqueued - started);
        }
        if done && acks.pending() > 0 {
            // The permit travels with the job: the message stays in flight
            // (and counts for the drain) until its acknowledgements arrive.
            tokio::spawn(await_acks(
                job,
                acks,
                enqueued,
                state.clone(),
                sink.clone(),
                handler.clone(),
                shutdown.clone(),
            ));
        } else {
            settle(&state, &job.message, done, sink.as_ref());
        }
    }
}

/// Runs `handler` on `m` inside `acks` until it succeeds (`true`) or the
/// partition is drained / Herald stops (`false`).
async fn process(
    handler: &dyn Handler,
    m: &SourceMessage,
    acks: &AckCollector,
    state: &PartitionState,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        match acks.scope(handler.handle(m)).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(topic = %m.topic, partition = m.partition, offset = m.offset,
                    error = %e, retry_in_ms = backoff.as_millis() as u64, "processing failed; retrying");
                handler.retried(e.stage());
                if state.draining() || shutdown.is_cancelled() {
                    return false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Waits for a processed message's acknowledgements, then settles it. When
/// one failed, the message is processed again (a redelivery: the claim finds
/// the row and re-publishes its stored outcome with the same event id; a dead
/// letter already acknowledged is not published again).
async fn await_acks(
    job: Box<Job>,
    acks: AckCollector,
    enqueued: Instant,
    state: Arc<PartitionState>,
    sink: Arc<dyn OffsetSink>,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) {
    let m = &job.message;
    let done = loop {
        match acks.settle().await {
            Ok(()) => break true,
            Err(e) => {
                tracing::warn!(topic = %m.topic, partition = m.partition, offset = m.offset,
                    error = %e, "outcome not acknowledged; processing the request again");
                handler.retried("publish");
                if state.draining() || shutdown.is_cancelled() {
                    break false;
                }
                if !process(handler.as_ref(), m, &acks, &state, &shutdown).await {
                    break false;
                }
            }
        }
    };
    if done {
        handler.timed(RequestStage::Ack, enqueued.elapsed());
    }
    settle(&state, m, done, sink.as_ref());
    drop(job);
}

/// How long ago the record was stamped (producer create time or broker
/// append time); `None` without a timestamp or when the clock is behind it.
fn age(m: &SourceMessage) -> Option<Duration> {
    let stamped = u64::try_from(m.timestamp_ms?).ok()?;
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis(),
    )
    .ok()?;
    now.checked_sub(stamped).map(Duration::from_millis)
}

/// Ends a running message: when `done`, marks its offset complete and stores
/// the new watermark; either way wakes the drain.
fn settle(state: &PartitionState, m: &SourceMessage, done: bool, sink: &dyn OffsetSink) {
    let mut g = state.lock();
    g.running -= 1;
    if done && let Some(offset) = g.tracker.complete(m.offset) {
        sink.store(&m.topic, m.partition, offset);
    }
    drop(g);
    state.settled.notify_all();
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::oneshot;

    use super::*;
    use crate::kafka::PublishError;
    use crate::kafka::acks::{self, AckFuture, AckKind};

    /// Records stored offsets.
    #[derive(Default)]
    struct Stored(Mutex<Vec<i64>>);

    impl OffsetSink for Stored {
        fn store(&self, _topic: &str, _partition: i32, offset: i64) {
            self.0.lock().unwrap().push(offset);
        }
    }

    impl Stored {
        fn offsets(&self) -> Vec<i64> {
            self.0.lock().unwrap().clone()
        }
    }

    /// Publishes like the pipeline does, with acknowledgements the test
    /// resolves by hand: optionally a dead letter (unless the collector
    /// already has one), then `outcomes` outcome events.
    struct Fake {
        outcomes: usize,
        dead_letter: bool,
        /// Offsets handled, in order (re-runs included).
        calls: Mutex<Vec<i64>>,
        /// Unresolved acknowledgements, in publish order.
        acks: Mutex<Vec<(i64, AckKind, oneshot::Sender<bool>)>>,
        dead_letters: AtomicUsize,
    }

    impl Fake {
        fn new(outcomes: usize, dead_letter: bool) -> Arc<Fake> {
            Arc::new(Fake {
                outcomes,
                dead_letter,
                calls: Mutex::new(Vec::new()),
                acks: Mutex::new(Vec::new()),
                dead_letters: AtomicUsize::new(0),
            })
        }

        fn calls(&self) -> Vec<i64> {
            self.calls.lock().unwrap().clone()
        }

        fn pending(&self) -> usize {
            self.acks.lock().unwrap().len()
        }

        /// Resolves the oldest pending acknowledgement of `offset` and `kind`.
        fn ack(&self, offset: i64, kind: AckKind, ok: bool) {
            let mut acks = self.acks.lock().unwrap();
            let i = acks
                .iter()
                .position(|(o, k, _)| *o == offset && *k == kind)
                .expect("a pending ack");
            let (_, _, tx) = acks.remove(i);
            tx.send(ok).unwrap();
        }

        fn publish(&self, offset: i64, kind: AckKind) -> AckFuture {
            let (tx, rx) = oneshot::channel::<bool>();
            self.acks.lock().unwrap().push((offset, kind, tx));
            Box::pin(async move {
                match rx.await {
                    Ok(true) => Ok(()),
                    _ => Err(PublishError::Kafka(rdkafka::error::KafkaError::Canceled)),
                }
            })
        }
    }

    impl Handler for Fake {
        fn handle<'a>(&'a self, m: &'a SourceMessage) -> BoxFuture<'a, Result<(), PipelineError>> {
            Box::pin(async move {
                self.calls.lock().unwrap().push(m.offset);
                if self.dead_letter && !acks::dead_letter_already_published() {
                    self.dead_letters.fetch_add(1, Ordering::SeqCst);
                    let f = self.publish(m.offset, AckKind::DeadLetter);
                    acks::route(AckKind::DeadLetter, f).await?;
                }
                for _ in 0..self.outcomes {
                    let f = self.publish(m.offset, AckKind::Outcome);
                    acks::route(AckKind::Outcome, f).await?;
                }
                Ok(())
            })
        }

        fn retried(&self, _stage: &'static str) {}
    }

    /// One lane of one partition, fed by hand.
    struct Lane {
        tx: mpsc::UnboundedSender<Box<Job>>,
        state: Arc<PartitionState>,
        stored: Arc<Stored>,
        permits: Arc<Semaphore>,
        metrics: Metrics,
    }

    impl Lane {
        fn start(handler: Arc<dyn Handler>) -> Lane {
            let (tx, rx) = mpsc::unbounded_channel();
            let state = PartitionState::new();
            let stored = Arc::new(Stored::default());
            tokio::spawn(run_lane(
                rx,
                state.clone(),
                stored.clone(),
                handler,
                CancellationToken::new(),
            ));
            Lane {
                tx,
                state,
                stored,
                permits: Arc::new(Semaphore::new(100)),
                metrics: Metrics::new(),
            }
        }

        fn send(&self, offset: i64) {
            self.state.dispatched(offset);
            let job = Box::new(Job {
                message: SourceMessage {
                    topic: "t".into(),
                    partition: 0,
                    offset,
                    key: Some(b"same-key".to_vec()),
                    payload: None,
                    headers: Vec::new(),
                    timestamp_ms: None,
                },
                received: Instant::now(),
                _permit: InFlight {
                    _permit: self.permits.clone().try_acquire_owned().unwrap(),
                    _bytes: self.permits.clone().try_acquire_many_owned(0).unwrap(),
                    gauge: self.metrics.in_flight.clone(),
                },
            });
            assert!(self.tx.send(job).is_ok());
        }

        fn running(&self) -> usize {
            self.state.lock().running
        }

        /// Drains the lane's partition on a blocking thread (as the
        /// rebalance callback would) with a deadline `within` from now.
        fn drain(&self, within: Duration) -> tokio::task::JoinHandle<usize> {
            let state = self.state.clone();
            tokio::task::spawn_blocking(move || state.revoke_and_drain(Instant::now() + within))
        }

        fn in_flight(&self) -> usize {
            100 - self.permits.available_permits()
        }
    }

    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Gives spawned tasks a chance to run (and to do what they must not).
    async fn settle_tasks() {
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    #[tokio::test]
    async fn the_lane_takes_the_next_message_before_the_ack_and_the_offset_waits_for_it() {
        let fake = Fake::new(1, false);
        let lane = Lane::start(fake.clone());
        lane.send(0);
        lane.send(1);
        // Same lane, in order, and the second ran while the first's ack is pending.
        eventually("both processed", || fake.calls() == vec![0, 1]).await;
        assert_eq!(lane.running(), 2);
        assert_eq!(lane.in_flight(), 2, "permits are held until the acks");
        fake.ack(1, AckKind::Outcome, true);
        settle_tasks().await;
        assert!(
            lane.stored.offsets().is_empty(),
            "offset 0 is not acked yet"
        );
        fake.ack(0, AckKind::Outcome, true);
        eventually("offset stored", || lane.stored.offsets() == vec![1]).await;
        eventually("settled", || lane.running() == 0 && lane.in_flight() == 0).await;
    }

    #[tokio::test]
    async fn the_offset_waits_for_every_ack_of_the_message() {
        let fake = Fake::new(3, false);
        let lane = Lane::start(fake.clone());
        lane.send(7);
        eventually("three acks pending", || fake.pending() == 3).await;
        fake.ack(7, AckKind::Outcome, true);
        fake.ack(7, AckKind::Outcome, true);
        settle_tasks().await;
        assert!(lane.stored.offsets().is_empty());
        fake.ack(7, AckKind::Outcome, true);
        eventually("offset stored", || lane.stored.offsets() == vec![7]).await;
        assert_eq!(fake.calls(), vec![7]);
    }

    #[tokio::test]
    async fn a_failed_ack_reprocesses_the_message_without_a_second_dead_letter() {
        let fake = Fake::new(1, true);
        let lane = Lane::start(fake.clone());
        lane.send(5);
        eventually("dead letter and outcome pending", || fake.pending() == 2).await;
        fake.ack(5, AckKind::DeadLetter, true);
        fake.ack(5, AckKind::Outcome, false);
        eventually("processed again", || fake.calls() == vec![5, 5]).await;
        eventually("new outcome pending", || fake.pending() == 1).await;
        assert_eq!(fake.dead_letters.load(Ordering::SeqCst), 1);
        assert!(lane.stored.offsets().is_empty());
        fake.ack(5, AckKind::Outcome, true);
        eventually("offset stored", || lane.stored.offsets() == vec![5]).await;
        assert_eq!(lane.running(), 0);
    }

    #[tokio::test]
    async fn a_failed_dead_letter_is_published_again() {
        let fake = Fake::new(1, true);
        let lane = Lane::start(fake.clone());
        lane.send(3);
        eventually("dead letter and outcome pending", || fake.pending() == 2).await;
        fake.ack(3, AckKind::DeadLetter, false);
        fake.ack(3, AckKind::Outcome, true);
        eventually("processed again", || fake.calls() == vec![3, 3]).await;
        eventually("both pending again", || fake.pending() == 2).await;
        assert_eq!(fake.dead_letters.load(Ordering::SeqCst), 2);
        fake.ack(3, AckKind::DeadLetter, true);
        fake.ack(3, AckKind::Outcome, true);
        eventually("offset stored", || lane.stored.offsets() == vec![3]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_drain_waits_for_pending_acks() {
        let fake = Fake::new(1, false);
        let lane = Lane::start(fake.clone());
        lane.send(0);
        eventually("processed", || fake.pending() == 1).await;
        let left = lane.drain(Duration::from_millis(50)).await.unwrap();
        assert_eq!(left, 1, "the message waiting for its ack is still running");
        let drain = lane.drain(Duration::from_secs(5));
        settle_tasks().await;
        assert!(!drain.is_finished());
        fake.ack(0, AckKind::Outcome, true);
        assert_eq!(drain.await.unwrap(), 0);
        // Work that finished during the drain is committed with it.
        assert_eq!(lane.stored.offsets(), vec![0]);
    }

    /// Handles a message only when the test lets it (one permit each), so
    /// later messages of the lane queue behind it.
    struct Gated {
        gate: Semaphore,
        calls: Mutex<Vec<i64>>,
    }

    impl Handler for Gated {
        fn handle<'a>(&'a self, m: &'a SourceMessage) -> BoxFuture<'a, Result<(), PipelineError>> {
            Box::pin(async move {
                self.gate.acquire().await.expect("gate open").forget();
                self.calls.lock().unwrap().push(m.offset);
                Ok(())
            })
        }

        fn retried(&self, _stage: &'static str) {}
    }

    fn gated() -> Arc<Gated> {
        Arc::new(Gated {
            gate: Semaphore::new(0),
            calls: Mutex::new(Vec::new()),
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_drain_finishes_what_is_queued_in_the_lanes_so_the_commit_covers_it() {
        let handler = gated();
        let lane = Lane::start(handler.clone());
        for offset in 0..3 {
            lane.send(offset);
        }
        eventually("the first one runs", || lane.running() == 1).await;
        let drain = lane.drain(Duration::from_secs(5));
        settle_tasks().await;
        assert!(!drain.is_finished(), "two messages still queued");
        handler.gate.add_permits(3);
        assert_eq!(drain.await.unwrap(), 0);
        assert_eq!(*handler.calls.lock().unwrap(), vec![0, 1, 2]);
        assert_eq!(
            lane.stored.offsets().last(),
            Some(&2),
            "the commit covers all three"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_drain_deadline_queued_messages_are_left_for_the_next_owner() {
        let handler = gated();
        let lane = Lane::start(handler.clone());
        lane.send(0);
        lane.send(1);
        eventually("the first one runs", || lane.running() == 1).await;
        let left = lane.drain(Duration::from_millis(50)).await.unwrap();
        assert_eq!(left, 1, "the first one is still running");
        handler.gate.add_permits(2);
        eventually("settled", || lane.running() == 0).await;
        settle_tasks().await;
        assert_eq!(*handler.calls.lock().unwrap(), vec![0], "1 is not started");
        assert_eq!(lane.stored.offsets(), vec![0], "offset 1 is read again");
    }

    /// Fails every message as an infrastructure error (retried until the
    /// partition is drained).
    struct Failing(AtomicUsize);

    impl Handler for Failing {
        fn handle<'a>(&'a self, m: &'a SourceMessage) -> BoxFuture<'a, Result<(), PipelineError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Err(PipelineError::SendInProgress(m.offset.to_string())) })
        }

        fn retried(&self, _stage: &'static str) {}
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_does_not_wait_out_its_deadline_for_messages_that_keep_failing() {
        // The database is down: every message fails and is retried. A drain
        // gives each one up at its next failure (the next owner retries it)
        // rather than holding the rebalance or the shutdown for the deadline.
        let handler = Arc::new(Failing(AtomicUsize::new(0)));
        let lane = Lane::start(handler.clone());
        lane.send(0);
        lane.send(1);
        eventually("the first one failed", || {
            handler.0.load(Ordering::SeqCst) > 0
        })
        .await;
        let drain = lane.drain(Duration::from_secs(60));
        eventually("the drain ended long before its deadline", || {
            drain.is_finished()
        })
        .await;
        assert_eq!(drain.await.unwrap(), 0, "nothing left running");
        assert!(lane.stored.offsets().is_empty(), "both are read again");
    }

    #[tokio::test]
    async fn a_failed_ack_after_revoke_leaves_the_offset_for_the_next_owner() {
        let fake = Fake::new(1, false);
        let lane = Lane::start(fake.clone());
        lane.send(0);
        lane.send(1);
        eventually("processed", || fake.pending() == 2).await;
        lane.state.lock().draining = true;
        fake.ack(0, AckKind::Outcome, false);
        fake.ack(1, AckKind::Outcome, true);
        eventually("settled", || lane.running() == 0).await;
        assert_eq!(fake.calls(), vec![0, 1], "not processed again after revoke");
        assert!(
            lane.stored.offsets().is_empty(),
            "offset 0 must be redelivered"
        );
    }
}
