//! SendGrid adapter: one email notification becomes one v3 Mail Send call
//! (`POST /v3/mail/send`, bearer API key).
//!
//! Owns: the provider's config and credentials, the request body
//! (personalization, sender, content in the order the API demands,
//! `custom_args.notification_id` so event-webhook receipts can be matched),
//! reading the message id from `X-Message-Id`, and the `/v3/scopes` check.
//! Status mapping is the shared one in [`super::http`].

use std::collections::BTreeMap;
use std::str::FromStr;

use async_trait::async_trait;
use lettre::message::Mailbox;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::http::{self, permanent};
use super::{AdapterConfigError, AdapterContext, ChannelAdapter, SendError, SendReceipt, spec};
use crate::domain::{Channel, Notification};
use crate::render::RenderedContent;
use crate::routing::ProviderSpec;

/// Where the API lives when the config does not say.
pub const DEFAULT_BASE_URL: &str = "https://api.sendgrid.com";

/// Headers the API sets itself or refuses in `headers`; `meta.headers` may
/// not carry them.
const RESERVED_HEADERS: &[&str] = &[
    "x-sg-id",
    "x-sg-eid",
    "received",
    "dkim-signature",
    "content-type",
    "content-transfer-encoding",
    "to",
    "from",
    "subject",
    "reply-to",
    "cc",
    "bcc",
];

/// The provider's `config` JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendgridConfig {
    /// API root; default [`DEFAULT_BASE_URL`].
    pub base_url: Option<String>,
    /// Sender, `addr` or `Name <addr>`; default `smtp.default_from`.
    pub from: Option<String>,
    /// Whole-request timeout in milliseconds; default 10 000.
    pub timeout_ms: Option<u64>,
}

/// The provider's `credentials` JSON.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendgridCredentials {
    /// `SG.…` API key with the `mail.send` scope.
    api_key: SecretString,
}

/// The SendGrid email adapter. Cheap to share behind an `Arc`.
pub struct SendgridAdapter {
    /// The registered provider's name, recorded on attempts.
    name: String,
    /// Shared-style API client (see [`http::client`]).
    client: reqwest::Client,
    /// API root without trailing `/`.
    base_url: String,
    /// Sent as `Authorization: Bearer …`.
    api_key: SecretString,
    /// Sender when a notification has no `meta.from`.
    from: Mailbox,
}

impl std::fmt::Debug for SendgridAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendgridAdapter")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

impl SendgridAdapter {
    /// Builds the adapter of a registered `sendgrid` provider.
    pub fn from_spec(
        provider: &ProviderSpec,
        ctx: &AdapterContext,
    ) -> Result<Self, AdapterConfigError> {
        let config: SendgridConfig = spec::config(provider)?;
        let credentials: SendgridCredentials = spec::credentials(provider)?;
        if credentials.api_key.expose_secret().trim().is_empty() {
            return Err(spec::invalid(
                provider,
                "credentials.api_key must not be empty",
            ));
        }
        let base_url = http::base_url(
            "config.base_url",
            config.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL),
        )
        .map_err(|m| spec::invalid(provider, m))?;
        let (field, from) = match &config.from {
            Some(f) => ("config.from", f.as_str()),
            None => ("smtp.default_from", ctx.settings.smtp.default_from.as_str()),
        };
        let from = Mailbox::from_str(from.trim())
            .map_err(|e| spec::invalid(provider, format!("{field}: not a mailbox ({e})")))?;
        let timeout = spec::timeout(provider, config.timeout_ms)?;
        let client = http::client(timeout)
            .map_err(|e| spec::invalid(provider, format!("http client: {e}")))?;
        Ok(SendgridAdapter {
            name: provider.name.clone(),
            client,
            base_url,
            api_key: credentials.api_key,
            from,
        })
    }
}

/// The v3 Mail Send body.
#[derive(Debug, Serialize)]
struct MailSend<'a> {
    personalizations: [Personalization; 1],
    from: EmailObject,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<EmailObject>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    content: Vec<ContentPart<'a>>,
    custom_args: BTreeMap<&'static str, &'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<&'a str, &'a str>,
}

#[derive(Debug, Serialize)]
struct Personalization {
    to: [EmailObject; 1],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    cc: Vec<EmailObject>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    bcc: Vec<EmailObject>,
}

#[derive(Debug, Serialize)]
struct EmailObject {
    email: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

impl EmailObject {
    fn address(email: &str) -> EmailObject {
        EmailObject {
            email: email.to_string(),
            name: None,
        }
    }
}

#[derive(Debug, Serialize)]
struct ContentPart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    value: &'a str,
}

/// Builds the Mail Send body. Every failure is permanent: the same input
/// always fails the same way.
fn body<'a>(
    notification: &'a Notification,
    content: &'a RenderedContent,
    default_from: &Mailbox,
) -> Result<MailSend<'a>, SendError> {
    let to = notification
        .recipient
        .email
        .as_ref()
        .ok_or_else(|| permanent("no_address", "recipient has no email address"))?;
    let meta = &notification.meta;
    let from = match &meta.from {
        Some(a) => EmailObject::address(a.as_str()),
        None => EmailObject {
            email: default_from.email.to_string(),
            name: default_from.name.clone(),
        },
    };
    // The API refuses a personalization that names an address twice.
    let mut seen = vec![to.as_str().to_ascii_lowercase()];
    let mut unique = |list: &[crate::domain::EmailAddress]| -> Vec<EmailObject> {
        list.iter()
            .filter(|a| {
                let key = a.as_str().to_ascii_lowercase();
                let new = !seen.contains(&key);
                if new {
                    seen.push(key);
                }
                new
            })
            .map(|a| EmailObject::address(a.as_str()))
            .collect()
    };
    let cc = unique(&meta.cc);
    let bcc = unique(&meta.bcc);

    // text/plain must come first, then text/html.
    let mut parts = Vec::new();
    if let Some(text) = &content.text {
        parts.push(ContentPart {
            kind: "text/plain",
            value: text,
        });
    }
    if let Some(html) = &content.html {
        parts.push(ContentPart {
            kind: "text/html",
            value: html,
        });
    }
    if parts.is_empty() {
        return Err(permanent(
            "empty_content",
            "email has neither a text nor an html body",
        ));
    }
    let mut headers = BTreeMap::new();
    for (name, value) in &meta.headers {
        if RESERVED_HEADERS
            .iter()
            .any(|r| r.eq_ignore_ascii_case(name))
        {
            return Err(permanent(
                "invalid_header",
                format!("header {name} is set by the provider"),
            ));
        }
        headers.insert(name.as_str(), value.as_str());
    }
    Ok(MailSend {
        personalizations: [Personalization {
            to: [EmailObject::address(to.as_str())],
            cc,
            bcc,
        }],
        from,
        reply_to: meta
            .reply_to
            .as_ref()
            .map(|a| EmailObject::address(a.as_str())),
        subject: content.subject.as_deref(),
        content: parts,
        custom_args: BTreeMap::from([("notification_id", notification.id.as_str())]),
        headers,
    })
}

/// SendGrid's error body: `{"errors": [{"message", "field", "help"}]}`.
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorItem>,
}

#[derive(Deserialize)]
struct ErrorItem {
    message: Option<String>,
    field: Option<String>,
}

fn error_detail(reply: &http::Reply) -> Option<String> {
    let body: ErrorBody = reply.json()?;
    let parts: Vec<String> = body
        .errors
        .into_iter()
        .filter_map(|e| match (e.field, e.message) {
            (Some(f), Some(m)) => Some(format!("{f}: {m}")),
            (None, Some(m)) => Some(m),
            _ => None,
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[async_trait]
impl ChannelAdapter for SendgridAdapter {
    fn channel(&self) -> Channel {
        Channel::Email
    }

    fn provider(&self) -> &str {
        &self.name
    }

    async fn send(
        &self,
        notification: &Notification,
        content: &RenderedContent,
    ) -> Result<SendReceipt, SendError> {
        let body = body(notification, content, &self.from)?;
        let reply = http::execute(
            self.client
                .post(format!("{}/v3/mail/send", self.base_url))
                .bearer_auth(self.api_key.expose_secret())
                .json(&body),
        )
        .await?;
        reply.check(error_detail(&reply).as_deref())?;
        Ok(SendReceipt {
            provider: self.name.clone(),
            provider_message_id: reply.header("x-message-id").map(str::to_string),
        })
    }

    /// `GET /v3/scopes`: the key works and may send mail.
    async fn check(&self) -> Result<(), SendError> {
        let reply = http::execute(
            self.client
                .get(format!("{}/v3/scopes", self.base_url))
                .bearer_auth(self.api_key.expose_secret()),
        )
        .await?;
        reply.check(error_detail(&reply).as_deref())?;
        #[derive(Deserialize)]
        struct Scopes {
            scopes: Vec<String>,
        }
        match reply.json::<Scopes>() {
            Some(s) if !s.scopes.iter().any(|s| s == "mail.send") => Err(permanent(
                "provider_auth",
                "the API key lacks the mail.send scope",
            )),
            _ => Ok(()),
        }
    }
}
