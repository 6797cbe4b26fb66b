//! The outcome and dead-letter publisher.
//!
//! [`OutcomePublisher`] is a seam (a trait) so pipeline unit tests can run
//! without a broker; [`KafkaPublisher`] is the real one: a `FutureProducer`
//! with acks=all and one request in flight per broker (see
//! [`super::producer_config`]). A publish resolves once the record is
//! acknowledged by the broker, except inside an [`super::acks::AckCollector`] scope (the
//! request consumer): there it resolves once the record is enqueued, and the
//! acknowledgement goes to the collector (see [`super::acks`]).

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::SourceMessage;
use super::acks::{self, AckFuture, AckKind};
use crate::config::KafkaSettings;
use crate::domain::DeliveryStatusEvent;

/// Largest payload copied into a dead-letter record; longer payloads are
/// truncated and the record carries `herald-truncated-from: <original length>`.
pub const MAX_DEAD_LETTER_BYTES: usize = 512 * 1024;

/// A publish the broker did not acknowledge. Always transient for the
/// pipeline: the request is retried and its offset not stored.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("encoding outcome event: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Where outcome events and dead letters go.
#[async_trait]
pub trait OutcomePublisher: Send + Sync {
    /// Publishes `event` keyed by its notification id (or event id) and waits
    /// for the acknowledgement (inside an ack collector: for the enqueue).
    async fn publish_outcome(&self, event: &DeliveryStatusEvent) -> Result<(), PublishError>;

    /// Publishes the original message to the dead-letter topic with headers
    /// naming the error and the source position, and waits for the ack
    /// (inside an ack collector: for the enqueue; and nothing is published
    /// when the collector already holds this request's dead letter).
    async fn publish_dead_letter(
        &self,
        source: &SourceMessage,
        code: &str,
        message: &str,
    ) -> Result<(), PublishError>;
}

/// The Kafka implementation of [`OutcomePublisher`].
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: FutureProducer,
    outcome_topic: String,
    dlq_topic: String,
}

impl KafkaPublisher {
    /// Creates the producer.
    pub fn new(settings: &KafkaSettings) -> Result<Self, PublishError> {
        let producer: FutureProducer = super::producer_config(settings).create()?;
        Ok(KafkaPublisher {
            producer,
            outcome_topic: settings.outcome_topic.clone(),
            dlq_topic: settings.dlq_topic.clone(),
        })
    }

    /// The underlying producer (used by `herald send`).
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Enqueues `record`, waiting while the producer queue is full, and
    /// returns its acknowledgement.
    async fn enqueue<K, P>(
        &self,
        mut record: FutureRecord<'_, K, P>,
    ) -> Result<AckFuture, PublishError>
    where
        K: ToBytes + ?Sized + Sync,
        P: ToBytes + ?Sized + Sync,
    {
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    return Ok(Box::pin(async move {
                        match delivery.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err((e, _))) => Err(PublishError::Kafka(e)),
                            Err(_) => Err(PublishError::Kafka(KafkaError::Canceled)),
                        }
                    }));
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(PublishError::Kafka(e)),
            }
        }
    }

    /// Flushes queued messages (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(Timeout::After(timeout));
    }
}

#[async_trait]
impl OutcomePublisher for KafkaPublisher {
    async fn publish_outcome(&self, event: &DeliveryStatusEvent) -> Result<(), PublishError> {
        let payload = serde_json::to_vec(event)?;
        let key = event.notification_id.as_deref().unwrap_or(&event.event_id);
        // No headers: everything is in the value, and a broker that stores
        // headers as rows (tansu) pays an insert per header per event.
        let record = FutureRecord::to(&self.outcome_topic)
            .key(key)
            .payload(&payload);
        let ack = self.enqueue(record).await?;
        acks::route(AckKind::Outcome, ack).await
    }

    async fn publish_dead_letter(
        &self,
        source: &SourceMessage,
        code: &str,
        message: &str,
    ) -> Result<(), PublishError> {
        if acks::dead_letter_already_published() {
            return Ok(());
        }
        let partition = source.partition.to_string();
        let offset = source.offset.to_string();
        let mut headers = OwnedHeaders::new();
        for (k, v) in &source.headers {
            if !k.starts_with("herald-") {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
                });
            }
        }
        let headers = headers
            .insert(Header {
                key: "herald-error-code",
                value: Some(code),
            })
            .insert(Header {
                key: "herald-error",
                value: Some(message),
            })
            .insert(Header {
                key: "herald-source-topic",
                value: Some(source.topic.as_str()),
            })
            .insert(Header {
                key: "herald-source-partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "herald-source-offset",
                value: Some(offset.as_str()),
            });
        // Keep the record under the broker's default 1 MB message limit: a
        // dead letter that cannot be produced would stall the partition.
        let payload = source.payload.as_deref().unwrap_or(&[]);
        let (payload, headers) = if payload.len() > MAX_DEAD_LETTER_BYTES {
            let original = payload.len().to_string();
            let h = headers.insert(Header {
                key: "herald-truncated-from",
                value: Some(original.as_str()),
            });
            (&payload[..MAX_DEAD_LETTER_BYTES], h)
        } else {
            (payload, headers)
        };
        let mut record = FutureRecord::to(&self.dlq_topic)
            .payload(payload)
            .headers(headers);
        if let Some(k) = source.key.as_deref() {
            record = record.key(k);
        }
        let ack = self.enqueue(record).await?;
        acks::route(AckKind::DeadLetter, ack).await
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;

    use super::*;
    use crate::config::Settings;
    use crate::domain::Status;
    use crate::kafka::acks::AckCollector;

    fn publisher(
        mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    ) -> KafkaPublisher {
        let settings = Settings::load_with_env(
            None,
            [
                (
                    "HERALD_KAFKA__BROKERS".to_string(),
                    mock.bootstrap_servers(),
                ),
                (
                    "HERALD_KAFKA__OUTCOME_TOPIC".to_string(),
                    "outcomes".to_string(),
                ),
                ("HERALD_KAFKA__DLQ_TOPIC".to_string(), "dlq".to_string()),
            ],
        )
        .unwrap();
        KafkaPublisher::new(&settings.kafka).unwrap()
    }

    fn records(
        mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        topic: &str,
    ) -> i64 {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .create()
            .unwrap();
        let (low, high) = c
            .fetch_watermarks(topic, 0, Duration::from_secs(10))
            .unwrap();
        high - low
    }

    fn source() -> SourceMessage {
        SourceMessage {
            topic: "requests".into(),
            partition: 0,
            offset: 42,
            key: Some(b"k".to_vec()),
            payload: Some(b"not json".to_vec()),
            headers: Vec::new(),
            timestamp_ms: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inside_a_collector_publishes_are_enqueued_and_a_dead_letter_goes_out_once() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("outcomes", 1, 1).unwrap();
        mock.create_topic("dlq", 1, 1).unwrap();
        let p = publisher(&mock);
        let acks = AckCollector::new();
        let event = DeliveryStatusEvent::new(Status::Rejected);
        acks.scope(async {
            p.publish_dead_letter(&source(), "invalid_json", "bad")
                .await
                .unwrap();
            // A re-run of the same request (same collector): no second dead letter.
            p.publish_dead_letter(&source(), "invalid_json", "bad")
                .await
                .unwrap();
            p.publish_outcome(&event).await.unwrap();
        })
        .await;
        assert_eq!(
            acks.pending(),
            2,
            "one dead letter and one outcome, not awaited"
        );
        acks.settle().await.unwrap();
        assert_eq!(records(&mock, "dlq"), 1);
        assert_eq!(records(&mock, "outcomes"), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outside_a_collector_a_publish_waits_for_the_ack() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("outcomes", 1, 1).unwrap();
        mock.create_topic("dlq", 1, 1).unwrap();
        let p = publisher(&mock);
        p.publish_outcome(&DeliveryStatusEvent::new(Status::Sent))
            .await
            .unwrap();
        p.publish_dead_letter(&source(), "invalid_json", "bad")
            .await
            .unwrap();
        p.publish_dead_letter(&source(), "invalid_json", "bad")
            .await
            .unwrap();
        // Acknowledged on return: already on the broker.
        assert_eq!(records(&mock, "outcomes"), 1);
        assert_eq!(records(&mock, "dlq"), 2, "no collector, no deduplication");
    }
}
