//! One request through Herald: decode → claim → render → send → persist →
//! publish. [`Pipeline::process`] returns `Ok` once the request's state is
//! durable in PostgreSQL and its outcome events are acknowledged by Kafka —
//! only then may the consumer store the offset. An `Err` is always an
//! infrastructure failure (database, broker): the caller retries the message.
//!
//! Bad input is never an `Err`: it becomes a dead letter plus a `rejected`
//! outcome, or a `failed` outcome, and processing moves on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};

use crate::channels::{ChannelAdapter, SendError};
use crate::domain::{
    Channel, DecodeError, DeliveryStatusEvent, ErrorInfo, Notification, Status, decode_request,
};
use crate::kafka::{OutcomePublisher, PublishError, SourceMessage};
use crate::render::Renderer;
use crate::store::{AttemptResult, Claim, NotificationStore, StoreError};
use crate::telemetry::Metrics;

/// Notifications of one batch request processed at once.
const BATCH_CONCURRENCY: usize = 16;

/// Namespace for deterministic event ids of `rejected` outcomes.
const REJECTED_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6865_7261_6c64_2d72_656a_6563_7465_6400);

/// An infrastructure failure: the message must be retried, not skipped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The notification is being sent by another claimer whose lease has
    /// not expired; retrying later either finds it finished or takes it over.
    #[error("notification {0} is being sent by another claimer")]
    SendInProgress(String),
}

impl PipelineError {
    /// Bounded label for metrics.
    pub fn stage(&self) -> &'static str {
        match self {
            PipelineError::Store(_) => "database",
            PipelineError::Publish(_) => "publish",
            PipelineError::SendInProgress(_) => "send_lease",
        }
    }
}

/// Everything needed to process requests.
pub struct Pipeline {
    /// Notifications and delivery attempts.
    store: NotificationStore,
    /// Inline content and templates → subject/text/html.
    renderer: Arc<dyn Renderer>,
    /// One adapter per channel; a channel without one fails its notifications.
    adapters: HashMap<Channel, Arc<dyn ChannelAdapter>>,
    /// Outcome events and dead letters.
    publisher: Arc<dyn OutcomePublisher>,
    metrics: Metrics,
    /// Larger payloads are rejected before parsing.
    max_request_bytes: usize,
}

impl Pipeline {
    pub fn new(
        store: NotificationStore,
        renderer: Arc<dyn Renderer>,
        adapters: Vec<Arc<dyn ChannelAdapter>>,
        publisher: Arc<dyn OutcomePublisher>,
        metrics: Metrics,
        max_request_bytes: usize,
    ) -> Self {
        let adapters = adapters.into_iter().map(|a| (a.channel(), a)).collect();
        Pipeline {
            store,
            renderer,
            adapters,
            publisher,
            metrics,
            max_request_bytes,
        }
    }

    /// The metrics this pipeline updates.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Processes one Kafka message. See the module docs for the contract.
    pub async fn process(&self, message: &SourceMessage) -> Result<(), PipelineError> {
        self.metrics
            .requests_consumed
            .with_label_values(&[&message.topic])
            .inc();
        let payload = message.payload.as_deref().unwrap_or(&[]);
        let request = match decode_request(payload, self.max_request_bytes) {
            Ok(r) => r,
            Err(e) => return self.reject(message, &e).await,
        };
        let notifications = request.into_notifications();
        if notifications.len() == 1 {
            for n in notifications {
                self.deliver(n).await?;
            }
            return Ok(());
        }
        futures::stream::iter(notifications.into_iter().map(|n| self.deliver(n)))
            .buffer_unordered(BATCH_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Dead-letters an undecodable request and publishes `rejected` when its id is known.
    async fn reject(&self, message: &SourceMessage, e: &DecodeError) -> Result<(), PipelineError> {
        tracing::info!(topic = %message.topic, partition = message.partition, offset = message.offset,
            code = e.code.as_str(), error = %e.message, "request rejected");
        self.publisher
            .publish_dead_letter(message, e.code.as_str(), &e.message)
            .await?;
        self.metrics
            .dead_letters
            .with_label_values(&[e.code.as_str()])
            .inc();
        let Some(id) = &e.request_id else {
            return Ok(());
        };
        let mut event = DeliveryStatusEvent::new(Status::Rejected);
        // Deterministic per source position: a redelivery re-publishes the same event id.
        let position = format!("{}/{}/{}", message.topic, message.partition, message.offset);
        event.event_id = uuid::Uuid::new_v5(&REJECTED_NAMESPACE, position.as_bytes()).to_string();
        event.notification_id = Some(id.clone());
        event.request_id = Some(id.clone());
        event.tenant_id = e.tenant_id.clone();
        event.correlation_id = e.correlation_id.clone();
        event.reason = Some(e.code.as_str().to_string());
        event.error = Some(ErrorInfo {
            code: e.code.as_str().to_string(),
            message: e.message.clone(),
            retryable: false,
        });
        self.publish(&event, None).await
    }

    /// Delivers one notification exactly once per claim.
    pub async fn deliver(&self, n: Notification) -> Result<(), PipelineError> {
        let adapter = self.adapters.get(&n.channel).cloned();
        let provider = adapter
            .as_ref()
            .map_or("none", |a| a.provider())
            .to_string();
        let ready = match adapter {
            None => Err(ErrorInfo {
                code: "channel_unavailable".into(),
                message: format!("no adapter is configured for channel {}", n.channel),
                retryable: false,
            }),
            Some(a) => match self.renderer.render(&n) {
                Ok(content) => Ok((a, content)),
                Err(e) => Err(ErrorInfo {
                    code: e.code.as_str().into(),
                    message: e.message,
                    retryable: false,
                }),
            },
        };
        let (adapter, content) = match ready {
            Ok(ready) => ready,
            Err(error) => {
                let mut event = DeliveryStatusEvent::for_notification(&n, Status::Failed, 0);
                event.reason = Some(error.code.clone());
                event.error = Some(error);
                return match self
                    .store
                    .claim(&n, Status::Failed, &provider, Some(&event))
                    .await?
                {
                    Claim::New { .. } => self.publish(&event, Some(&n)).await,
                    existing => self.already_handled(&n, existing).await,
                };
            }
        };

        let attempt = match self
            .store
            .claim(&n, Status::Sending, &provider, None)
            .await?
        {
            Claim::New { attempt } => attempt,
            Claim::Existing {
                status: Status::Sending | Status::Accepted,
                ..
            } => {
                // A previous owner stopped between claiming and finishing: the
                // send may or may not have happened. Send again with the same
                // idempotency key (the documented at-least-once window).
                match self.store.take_over(&n.id, &provider).await? {
                    Some(a) => {
                        tracing::info!(notification_id = %n.id, attempt = a, "resuming unfinished send");
                        a
                    }
                    // Someone holds the send (lease not expired) or it just
                    // finished: try this message again shortly.
                    None => return Err(PipelineError::SendInProgress(n.id.clone())),
                }
            }
            existing => return self.already_handled(&n, existing).await,
        };

        let started = Instant::now();
        let result = adapter.send(&n, &content).await;
        let elapsed = started.elapsed();
        let attempt_no = u32::try_from(attempt).unwrap_or(0);
        let (event, attempt_result) = match result {
            Ok(receipt) => {
                self.metrics
                    .send_duration
                    .with_label_values(&[n.channel.as_str(), "ok"])
                    .observe(elapsed.as_secs_f64());
                let mut event = DeliveryStatusEvent::for_notification(&n, Status::Sent, attempt_no);
                event.provider = Some(receipt.provider.clone());
                event.provider_message_id = receipt.provider_message_id.clone();
                let r = AttemptResult {
                    status: Status::Sent,
                    provider: receipt.provider,
                    provider_message_id: receipt.provider_message_id,
                    error: None,
                    duration_ms: millis(elapsed),
                };
                (event, r)
            }
            Err(e) => {
                let label = if e.is_retryable() {
                    "retryable"
                } else {
                    "permanent"
                };
                self.metrics
                    .send_duration
                    .with_label_values(&[n.channel.as_str(), label])
                    .observe(elapsed.as_secs_f64());
                tracing::info!(notification_id = %n.id, code = e.code(), error = %e.message(), "send failed");
                let error = error_info(&e);
                let mut event =
                    DeliveryStatusEvent::for_notification(&n, Status::Failed, attempt_no);
                event.provider = Some(provider.clone());
                event.reason = Some(error.code.clone());
                event.error = Some(error.clone());
                let r = AttemptResult {
                    status: Status::Failed,
                    provider: provider.clone(),
                    provider_message_id: None,
                    error: Some(error),
                    duration_ms: millis(elapsed),
                };
                (event, r)
            }
        };
        // The provider has acted: do not let a database blip turn this into a
        // second send. Retry the write here rather than failing the message.
        let mut backoff = Duration::from_millis(50);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match self
                .store
                .finish_attempt(&n.id, attempt, &attempt_result, &event)
                .await
            {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(notification_id = %n.id, error = %e, "recording the attempt failed; retrying");
                    self.metrics
                        .infra_retries
                        .with_label_values(&["database"])
                        .inc();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.publish(&event, Some(&n)).await
    }

    /// A redelivered notification: send nothing; re-publish its last outcome
    /// (same `event_id`) so a crash between the database write and the
    /// publish cannot lose the outcome.
    async fn already_handled(&self, n: &Notification, claim: Claim) -> Result<(), PipelineError> {
        self.metrics
            .duplicates
            .with_label_values(&[n.channel.as_str()])
            .inc();
        if let Claim::Existing {
            last_event: Some(event),
            status,
            ..
        } = claim
        {
            tracing::debug!(notification_id = %n.id, %status, "already handled; re-publishing last outcome");
            self.publisher.publish_outcome(&event).await?;
        }
        Ok(())
    }

    async fn publish(
        &self,
        event: &DeliveryStatusEvent,
        n: Option<&Notification>,
    ) -> Result<(), PipelineError> {
        self.publisher.publish_outcome(event).await?;
        let channel = n.map_or("unknown", |n| n.channel.as_str());
        self.metrics
            .outcomes
            .with_label_values(&[channel, event.status.as_str()])
            .inc();
        Ok(())
    }
}

fn error_info(e: &SendError) -> ErrorInfo {
    ErrorInfo {
        code: e.code().to_string(),
        message: e.message().to_string(),
        retryable: e.is_retryable(),
    }
}

fn millis(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}
