//! Topic administration: `herald topics ensure` creates missing topics.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::config::KafkaSettings;

/// Topic administration failures.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("kafka admin: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("creating topic {topic}: {code}")]
    Create {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// Every topic Herald uses: request topics, outcome topic, DLQ topic, and
/// the preferences topic when configured.
pub fn all_topics(settings: &KafkaSettings) -> Vec<String> {
    let mut topics = settings.request_topics.clone();
    topics.push(settings.outcome_topic.clone());
    topics.push(settings.dlq_topic.clone());
    topics.extend(settings.preference_topic.clone());
    topics.sort();
    topics.dedup();
    topics
}

/// Creates each of `topics` that does not exist, with `partitions`
/// partitions and replication factor 1 (override with broker defaults in
/// production by creating topics yourself). Returns the topics created.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    topics: &[String],
    partitions: i32,
) -> Result<Vec<String>, TopicError> {
    let admin: AdminClient<DefaultClientContext> = super::base_config(settings).create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(new.iter(), &opts).await?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(t) => created.push(t),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(TopicError::Create { topic, code }),
        }
    }
    Ok(created)
}
