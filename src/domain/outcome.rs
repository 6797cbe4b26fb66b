//! Delivery-status events: what Herald publishes on the outcome topic.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::request::Channel;

/// Status of a notification. `Accepted` and `Sending` are internal (stored,
/// never published); every other value is published as an outcome event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Accepted,
    Sending,
    Sent,
    Delivered,
    Failed,
    Rejected,
    Suppressed,
    Deferred,
    Scheduled,
    Throttled,
    Retrying,
    Expired,
    Bounced,
    /// Cancelled before it was sent (final).
    Cancelled,
}

impl Status {
    /// Every status, internal ones included, in lifecycle order.
    pub const ALL: [Status; 14] = [
        Status::Accepted,
        Status::Scheduled,
        Status::Deferred,
        Status::Throttled,
        Status::Retrying,
        Status::Sending,
        Status::Sent,
        Status::Delivered,
        Status::Failed,
        Status::Rejected,
        Status::Suppressed,
        Status::Expired,
        Status::Bounced,
        Status::Cancelled,
    ];

    /// False for the internal `accepted` and `sending`, which are stored but
    /// never published as outcome events.
    pub fn is_published(&self) -> bool {
        !matches!(self, Status::Accepted | Status::Sending)
    }

    /// The wire and database spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Sending => "sending",
            Status::Sent => "sent",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
            Status::Rejected => "rejected",
            Status::Suppressed => "suppressed",
            Status::Deferred => "deferred",
            Status::Scheduled => "scheduled",
            Status::Throttled => "throttled",
            Status::Retrying => "retrying",
            Status::Expired => "expired",
            Status::Bounced => "bounced",
            Status::Cancelled => "cancelled",
        }
    }

    /// Parses the database spelling.
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "accepted" => Status::Accepted,
            "sending" => Status::Sending,
            "sent" => Status::Sent,
            "delivered" => Status::Delivered,
            "failed" => Status::Failed,
            "rejected" => Status::Rejected,
            "suppressed" => Status::Suppressed,
            "deferred" => Status::Deferred,
            "scheduled" => Status::Scheduled,
            "throttled" => Status::Throttled,
            "retrying" => Status::Retrying,
            "expired" => Status::Expired,
            "bounced" => Status::Bounced,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }

    /// True when the request's processing is over: nothing more will be sent
    /// (a later delivery receipt may still add `delivered`/`bounced`).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Status::Sent
                | Status::Delivered
                | Status::Failed
                | Status::Rejected
                | Status::Suppressed
                | Status::Expired
                | Status::Bounced
                | Status::Cancelled
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error part of an outcome event. `code` is from a bounded set
/// (`template_error`, `smtp_permanent`, `http_status`, `invalid_json`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

/// One delivery-status event (schema `schemas/delivery-status.v1.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryStatusEvent {
    /// Unique per status change; consumers deduplicate on it (a redelivered
    /// request re-publishes the stored event with the same `event_id`).
    pub event_id: String,
    /// Absent only for a `rejected` request whose id could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_message_id: Option<String>,
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub occurred_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

impl DeliveryStatusEvent {
    /// A new event for `status` with a fresh `event_id`, stamped now.
    pub fn new(status: Status) -> Self {
        DeliveryStatusEvent {
            event_id: uuid::Uuid::new_v4().to_string(),
            notification_id: None,
            request_id: None,
            tenant_id: None,
            channel: None,
            status,
            provider: None,
            provider_message_id: None,
            attempt: 0,
            reason: None,
            error: None,
            next_attempt_at: None,
            occurred_at: Utc::now(),
            correlation_id: None,
        }
    }

    /// The event for a status change of `n`.
    pub fn for_notification(n: &super::Notification, status: Status, attempt: u32) -> Self {
        let mut e = DeliveryStatusEvent::new(status);
        e.notification_id = Some(n.id.clone());
        e.request_id = Some(n.request_id.clone());
        e.tenant_id = n.tenant_id.clone();
        e.channel = Some(n.channel);
        e.attempt = attempt;
        e.correlation_id = n.correlation_id.clone();
        e
    }
}
