//! The outcome and dead-letter publisher.
//!
//! [`OutcomePublisher`] is a seam (a trait) so pipeline unit tests can run
//! without a broker; [`KafkaPublisher`] is the real one: an idempotent
//! `FutureProducer` whose sends resolve only once the broker acknowledged.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::SourceMessage;
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
    /// for the acknowledgement.
    async fn publish_outcome(&self, event: &DeliveryStatusEvent) -> Result<(), PublishError>;

    /// Publishes the original message to the dead-letter topic with headers
    /// naming the error and the source position, and waits for the ack.
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
    /// Creates the idempotent producer.
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
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            })
            .insert(Header {
                key: "herald-event-id",
                value: Some(event.event_id.as_str()),
            });
        let record = FutureRecord::to(&self.outcome_topic)
            .key(key)
            .payload(&payload)
            .headers(headers);
        self.producer
            .send(record, Timeout::Never)
            .await
            .map_err(|(e, _)| PublishError::Kafka(e))?;
        Ok(())
    }

    async fn publish_dead_letter(
        &self,
        source: &SourceMessage,
        code: &str,
        message: &str,
    ) -> Result<(), PublishError> {
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
        self.producer
            .send(record, Timeout::Never)
            .await
            .map_err(|(e, _)| PublishError::Kafka(e))?;
        Ok(())
    }
}
