//! The preferences consumer: reads preference-update events
//! (`schemas/preference-update.v1.json`) from `kafka.preference_topic` and
//! upserts them (last write wins by the event's `updated_at`), then drops the
//! key from this instance's preference cache.
//!
//! Group: `{group_id}.preferences`, shared by all instances, so each event is
//! written once; offsets are stored after the write (at least once — a
//! replayed event is a no-op thanks to last-write-wins). Instances that did
//! not consume an event see the change when their cache entry expires
//! (`policy.preference_cache_ttl_ms`). A malformed event is logged, counted
//! (`herald_preference_updates_total{result="invalid"}`) and skipped.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaSettings;
use crate::policy::Policy;
use crate::policy::preferences::decode_update;
use crate::telemetry::Metrics;

/// How long the broker may hold an empty fetch of the preference topic.
const PREFERENCE_FETCH_WAIT_MS: u32 = 500;

/// Creates the consumer for `topic`, subscribed.
pub fn consumer(
    settings: &KafkaSettings,
    topic: &str,
) -> rdkafka::error::KafkaResult<StreamConsumer> {
    // Preference updates are rare and a few hundred milliseconds late is
    // fine; the request consumer's shorter wait here would keep the broker
    // answering empty fetches many times a second for nothing.
    let mut cfg = super::consumer_config(settings, PREFERENCE_FETCH_WAIT_MS);
    cfg.set("group.id", format!("{}.preferences", settings.group_id));
    if let Some(id) = &settings.group_instance_id {
        cfg.set("group.instance.id", format!("{id}.preferences"));
    }
    let c: StreamConsumer = cfg.create()?;
    c.subscribe(&[topic])?;
    Ok(c)
}

/// Consumes until `stop` is cancelled, then commits what was stored.
pub async fn run(
    consumer: StreamConsumer,
    policy: Arc<Policy>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            m = consumer.recv() => m,
        };
        let m = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "preference consumer");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let topic = m.topic().to_string();
        match decode_update(m.payload().unwrap_or_default()) {
            Err(e) => {
                tracing::info!(%topic, partition = m.partition(), offset = m.offset(), error = %e, "preference update skipped");
                metrics
                    .preference_updates
                    .with_label_values(&["invalid"])
                    .inc();
            }
            Ok(record) => {
                // The database must take it before the offset moves on.
                let mut backoff = Duration::from_millis(50);
                loop {
                    match policy.store().upsert(&record).await {
                        Ok(written) => {
                            let result = if written { "applied" } else { "stale" };
                            metrics
                                .preference_updates
                                .with_label_values(&[result])
                                .inc();
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "writing a preference update failed; retrying");
                            metrics.infra_retries.with_label_values(&["database"]).inc();
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                }
                policy.invalidate(&record.tenant_id, &record.user_id, record.channel);
            }
        }
        if let Err(e) = consumer.store_offset_from_message(&m) {
            tracing::warn!(error = %e, "storing a preference offset failed");
        }
    }
    if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        tracing::debug!(error = %e, "committing preference offsets at shutdown");
    }
    consumer.unsubscribe();
}
