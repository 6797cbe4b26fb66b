//! A parsed notification request and the notifications it expands into.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::recipient::{EmailAddress, Recipient};

/// The delivery channel of a notification. Lowercase on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email,
    Sms,
    Push,
    Webhook,
    InApp,
}

impl Channel {
    /// The wire and database spelling (`email`, `in_app`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Push => "push",
            Channel::Webhook => "webhook",
            Channel::InApp => "in_app",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<Channel> {
        Some(match s {
            "email" => Channel::Email,
            "sms" => Channel::Sms,
            "push" => Channel::Push,
            "webhook" => Channel::Webhook,
            "in_app" => Channel::InApp,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Delivery priority; `urgent` bypasses quiet hours and is claimed first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Urgent,
}

impl Priority {
    /// The wire and database spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Urgent => "urgent",
        }
    }
}

/// A reference to a stored template plus the data it is rendered with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRef {
    /// Template key, e.g. `welcome` (directory `templates/welcome/`).
    pub key: String,
    /// Preferred locale (`pt-BR`); falls back to the recipient's locale, then the default.
    pub locale: Option<String>,
    /// The render context, a JSON object.
    pub data: serde_json::Map<String, serde_json::Value>,
}

/// Content given inline by the producer. Each field is itself a minijinja template.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InlineContent {
    pub subject: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
}

/// Where a notification's content comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    Template(TemplateRef),
    Inline(InlineContent),
}

/// Envelope details for email (and headers for webhooks).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Sender; the configured default sender when absent.
    pub from: Option<EmailAddress>,
    pub reply_to: Option<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    pub bcc: Vec<EmailAddress>,
    /// Extra headers. Names are RFC 5322 field names, values contain no CR/LF
    /// (checked at decode time).
    pub headers: BTreeMap<String, String>,
}

/// A valid request as the producer sent it: one or more recipients.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationRequest {
    /// Producer's id: the idempotency key of the whole request.
    pub id: String,
    pub tenant_id: Option<String>,
    pub app_id: Option<String>,
    pub channel: Channel,
    /// One entry for `recipient`, several for `recipients` (a batch).
    pub recipients: Vec<Recipient>,
    pub content: Content,
    pub priority: Priority,
    pub category: Option<String>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub meta: Meta,
    pub correlation_id: Option<String>,
    /// True when the request used the batch form (`recipients`), which decides
    /// how notification ids are derived.
    pub is_batch: bool,
}

/// The notifications of one request, made one at a time
/// ([`NotificationRequest::into_notifications`]).
#[derive(Debug)]
pub struct Notifications {
    /// The request without its recipients.
    request: NotificationRequest,
    recipients: std::vec::IntoIter<Recipient>,
    /// Index of the next recipient in the request.
    index: usize,
}

impl Iterator for Notifications {
    type Item = Notification;

    fn next(&mut self) -> Option<Notification> {
        let recipient = self.recipients.next()?;
        let index = self.index;
        self.index += 1;
        // The last notification (the only one of a single request) takes the
        // request's fields; the others get copies.
        let last = self.recipients.len() == 0;
        let r = &mut self.request;
        let id = r.notification_id(index);
        let content = if last {
            std::mem::replace(&mut r.content, Content::Inline(InlineContent::default()))
        } else {
            r.content.clone()
        };
        Some(Notification {
            id,
            request_id: take_or_clone(&mut r.id, last),
            tenant_id: take_or_clone(&mut r.tenant_id, last),
            app_id: take_or_clone(&mut r.app_id, last),
            channel: r.channel,
            recipient,
            content,
            priority: r.priority,
            category: take_or_clone(&mut r.category, last),
            scheduled_at: r.scheduled_at,
            expires_at: r.expires_at,
            meta: take_or_clone(&mut r.meta, last),
            correlation_id: take_or_clone(&mut r.correlation_id, last),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.recipients.size_hint()
    }
}

impl ExactSizeIterator for Notifications {}

fn take_or_clone<T: Clone + Default>(value: &mut T, take: bool) -> T {
    if take {
        std::mem::take(value)
    } else {
        value.clone()
    }
}

/// One notification: a request addressed to exactly one recipient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// `request.id` for a single-recipient request; `"{request.id}:{index}"`
    /// (index from 0) for each recipient of a batch.
    pub id: String,
    pub request_id: String,
    pub tenant_id: Option<String>,
    pub app_id: Option<String>,
    pub channel: Channel,
    pub recipient: Recipient,
    pub content: Content,
    pub priority: Priority,
    pub category: Option<String>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub meta: Meta,
    pub correlation_id: Option<String>,
}

impl NotificationRequest {
    /// The id of the notification for the recipient at `index`.
    pub fn notification_id(&self, index: usize) -> String {
        if self.is_batch {
            format!("{}:{}", self.id, index)
        } else {
            self.id.clone()
        }
    }

    /// Expands the request into one notification per recipient, lazily:
    /// each notification carries its own copy of the content and meta, so a
    /// batch is expanded as its notifications are sent, never all at once
    /// (1,000 recipients of 1 MB of content would otherwise be 1 GB).
    pub fn into_notifications(mut self) -> Notifications {
        let recipients = std::mem::take(&mut self.recipients).into_iter();
        Notifications {
            request: self,
            recipients,
            index: 0,
        }
    }
}
