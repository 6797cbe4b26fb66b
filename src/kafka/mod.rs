//! Kafka: client configuration, the request consumer, the in-order offset
//! tracker, the outcome/DLQ publisher and topic administration.

pub mod acks;
pub mod consumer;
pub mod offsets;
pub mod preferences;
pub mod producer;
pub mod topics;

use rdkafka::ClientConfig;
use rdkafka::message::{Headers, Message};

use crate::config::KafkaSettings;

pub use producer::{KafkaPublisher, OutcomePublisher, PublishError};

/// A request message as read from Kafka, detached from the consumer.
#[derive(Debug, Clone)]
pub struct SourceMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Kafka headers as given (`traceparent`, `content-type`, ...).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Broker/producer timestamp in milliseconds, when present.
    pub timestamp_ms: Option<i64>,
}

impl SourceMessage {
    /// Copies what Herald needs out of a consumed message.
    pub fn from_message<M: Message>(m: &M) -> SourceMessage {
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        SourceMessage {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: m.timestamp().to_millis(),
        }
    }
}

/// Settings every Herald client shares; `properties` from the configuration
/// are applied last by [`apply_overrides`].
fn base_config(settings: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.brokers)
        .set("client.id", "herald")
        .set("socket.keepalive.enable", "true");
    c
}

fn apply_overrides(c: &mut ClientConfig, settings: &KafkaSettings, only_prefix_free: bool) {
    for (k, v) in &settings.properties {
        // Consumer-only keys make the producer log warnings; skip the obvious ones there.
        if only_prefix_free && is_consumer_only(k) {
            continue;
        }
        c.set(k, v);
    }
}

fn is_consumer_only(key: &str) -> bool {
    key.starts_with("fetch.")
        || key.starts_with("group.")
        || key.starts_with("session.")
        || key.starts_with("auto.")
        || key.starts_with("enable.auto")
        || key.starts_with("max.poll")
        || key.starts_with("partition.assignment")
        || key.starts_with("heartbeat.")
        || key.starts_with("isolation.")
}

/// How long a fetch of the request topics may wait, in milliseconds.
///
/// A Kafka broker answers a fetch as soon as data is there, so this only
/// bounds idle polling. The local broker (tansu 0.6) holds every fetch for
/// the whole wait, data or not, so it is also the latency of each hop: 5 ms
/// kept it polling so hard that at 2,000 requests/s the machine could not
/// keep up (p99 3.3 s), 50 ms keeps up (p99 ~0.5 s) at +~70 ms p50 under
/// light load (BENCHMARKS.md). The bench's pass-through uses it too.
pub const FETCH_WAIT_MS: u32 = 50;

/// Consumer configuration: manual offset store, periodic auto-commit of
/// stored offsets, `fetch_wait_ms` of fetch wait ([`FETCH_WAIT_MS`] for
/// the request topics). `kafka.properties` are applied last and win.
/// The 45 s session timeout (Kafka's default) rides out short broker outages
/// and slow coordinator answers: the local broker (tansu 0.6) never hands
/// partitions back to a member whose session expired (docs/faults.md).
/// librdkafka prefetches at most 16 MiB (its default is 64 MiB): with
/// `kafka.max_in_flight_bytes` this bounds what large requests hold.
pub fn consumer_config(settings: &KafkaSettings, fetch_wait_ms: u32) -> ClientConfig {
    let mut c = base_config(settings);
    c.set("group.id", &settings.group_id)
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            settings.commit_interval_ms.to_string(),
        )
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("session.timeout.ms", "45000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "300000")
        .set("enable.partition.eof", "false")
        .set("queued.max.messages.kbytes", "16384");
    if let Some(id) = &settings.group_instance_id {
        c.set("group.instance.id", id);
    }
    apply_overrides(&mut c, settings, false);
    c
}

/// Producer configuration: acks=all, one produce request in flight per
/// broker connection (so a retried batch can never land after a later one:
/// outcome events keep their order), and 20 ms of linger so outcome events
/// go out in batches.
///
/// Not librdkafka's idempotent mode. Its only addition here would be to drop
/// the duplicate a retried produce request can create; outcome consumers
/// already deduplicate on `event_id`, which a redelivered request repeats
/// unchanged. And it costs: librdkafka (2.12) caps each partition at 5
/// *messages* in flight, so with batches of more than 5 every partition has
/// one request outstanding, and while it waits the broker thread spins on an
/// immediate wake-up. Measured on the local broker (BENCHMARKS.md): 28% of
/// Herald's CPU in that spin; without it, ~190 instead of ~245 µs of CPU per
/// notification.
pub fn producer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut c = base_config(settings);
    c.set("enable.idempotence", "false")
        .set("max.in.flight.requests.per.connection", "1")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("message.timeout.ms", "60000");
    apply_overrides(&mut c, settings, true);
    c
}
