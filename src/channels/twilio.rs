//! Twilio adapter: one SMS notification becomes one Messages API call
//! (`POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded,
//! HTTP Basic auth).
//!
//! Owns: the provider's config and credentials (auth token, or an API key
//! pair), the form fields (`To`, `From` / `MessagingServiceSid`, `Body`,
//! `StatusCallback` pointing at Herald's `/webhooks/twilio` when a public
//! base URL is configured), reading the message `sid`, Twilio's error codes
//! (`twilio_21211` for an invalid `To`, …) and the account lookup used as
//! the check. Other statuses follow the shared mapping in [`super::http`].

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::http::{self, permanent};
use super::{AdapterConfigError, AdapterContext, ChannelAdapter, SendError, SendReceipt, spec};
use crate::domain::{Channel, Notification};
use crate::render::RenderedContent;
use crate::routing::ProviderSpec;

/// Where the API lives when the config does not say.
pub const DEFAULT_BASE_URL: &str = "https://api.twilio.com";

/// The provider's `config` JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioConfig {
    /// API root; default [`DEFAULT_BASE_URL`].
    pub base_url: Option<String>,
    /// Sending number (E.164) or alphanumeric sender id.
    pub from: Option<String>,
    /// Messaging Service that picks the sender (`MG…`); one of `from` and
    /// this is required.
    pub messaging_service_sid: Option<String>,
    /// Whole-request timeout in milliseconds; default 10 000.
    pub timeout_ms: Option<u64>,
}

/// The provider's `credentials` JSON: the account SID plus either its auth
/// token or an API key pair.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TwilioCredentials {
    account_sid: String,
    auth_token: Option<SecretString>,
    api_key_sid: Option<String>,
    api_key_secret: Option<SecretString>,
}

/// The Twilio SMS adapter. Cheap to share behind an `Arc`.
pub struct TwilioAdapter {
    /// The registered provider's name, recorded on attempts.
    name: String,
    /// Shared-style API client (see [`http::client`]).
    client: reqwest::Client,
    /// `{base}/2010-04-01/Accounts/{sid}`: `.json` is the account,
    /// `/Messages.json` the messages.
    account_url: String,
    /// Basic-auth user: the account SID or the API key SID.
    user: String,
    /// Basic-auth password: the auth token or the API key secret.
    password: SecretString,
    /// `From` field, when configured.
    from: Option<String>,
    /// `MessagingServiceSid` field, when configured.
    messaging_service_sid: Option<String>,
    /// `StatusCallback` field: Herald's receipt endpoint, when public.
    status_callback: Option<String>,
}

impl std::fmt::Debug for TwilioAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilioAdapter")
            .field("name", &self.name)
            .field("account_url", &self.account_url)
            .field("from", &self.from)
            .field("messaging_service_sid", &self.messaging_service_sid)
            .field("status_callback", &self.status_callback)
            .finish_non_exhaustive()
    }
}

/// True for a Twilio SID-like identifier (letters and digits only), which
/// is safe to put in a URL path.
fn is_sid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl TwilioAdapter {
    /// Builds the adapter of a registered `twilio` provider.
    pub fn from_spec(
        provider: &ProviderSpec,
        ctx: &AdapterContext,
    ) -> Result<Self, AdapterConfigError> {
        let config: TwilioConfig = spec::config(provider)?;
        let credentials: TwilioCredentials = spec::credentials(provider)?;
        let bad = |m: &str| spec::invalid(provider, m);
        if !is_sid(&credentials.account_sid) {
            return Err(bad(
                "credentials.account_sid must be letters and digits (AC…)",
            ));
        }
        let (user, password) = match (
            credentials.auth_token,
            credentials.api_key_sid,
            credentials.api_key_secret,
        ) {
            (Some(token), None, None) => (credentials.account_sid.clone(), token),
            (None, Some(key), Some(secret)) => {
                if !is_sid(&key) {
                    return Err(bad(
                        "credentials.api_key_sid must be letters and digits (SK…)",
                    ));
                }
                (key, secret)
            }
            _ => {
                return Err(bad(
                    "credentials: give either auth_token or both api_key_sid and api_key_secret",
                ));
            }
        };
        if password.expose_secret().is_empty() {
            return Err(bad("credentials: the auth token / API key secret is empty"));
        }
        let from = config.from.map(|f| f.trim().to_string());
        if from.as_deref().is_some_and(str::is_empty) {
            return Err(bad("config.from must not be empty"));
        }
        if let Some(sid) = &config.messaging_service_sid
            && !is_sid(sid)
        {
            return Err(bad(
                "config.messaging_service_sid must be letters and digits (MG…)",
            ));
        }
        if from.is_none() && config.messaging_service_sid.is_none() {
            return Err(bad("config: set `from` or `messaging_service_sid`"));
        }
        let base_url = http::base_url(
            "config.base_url",
            config.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL),
        )
        .map_err(|m| spec::invalid(provider, m))?;
        let status_callback = ctx
            .settings
            .receipts
            .public_base_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| format!("{}/webhooks/twilio", u.trim_end_matches('/')));
        let timeout = spec::timeout(provider, config.timeout_ms)?;
        let client = http::client(timeout)
            .map_err(|e| spec::invalid(provider, format!("http client: {e}")))?;
        Ok(TwilioAdapter {
            name: provider.name.clone(),
            client,
            account_url: format!("{base_url}/2010-04-01/Accounts/{}", credentials.account_sid),
            user,
            password,
            from,
            messaging_service_sid: config.messaging_service_sid,
            status_callback,
        })
    }

    /// The form fields of one message.
    fn form<'a>(
        &'a self,
        notification: &'a Notification,
        content: &'a RenderedContent,
    ) -> Result<Vec<(&'static str, &'a str)>, SendError> {
        let to = notification
            .recipient
            .phone
            .as_ref()
            .ok_or_else(|| permanent("no_address", "recipient has no phone number"))?;
        let body = content
            .text
            .as_deref()
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| permanent("empty_content", "sms has no text body"))?;
        let mut form = vec![("To", to.as_str())];
        if let Some(from) = &self.from {
            form.push(("From", from));
        }
        if let Some(sid) = &self.messaging_service_sid {
            form.push(("MessagingServiceSid", sid));
        }
        form.push(("Body", body));
        if let Some(url) = &self.status_callback {
            form.push(("StatusCallback", url));
        }
        Ok(form)
    }
}

/// Twilio's error body: `{"code": 21211, "message": "…", "more_info": "…",
/// "status": 400}`.
#[derive(Deserialize)]
struct ErrorBody {
    code: Option<u32>,
    message: Option<String>,
}

/// Maps a non-2xx reply: a 400 that carries a Twilio error code is
/// permanent with code `twilio_<code>`; the rest follows the shared mapping.
fn check_reply(reply: &http::Reply) -> Result<(), SendError> {
    let error: Option<ErrorBody> = reply.json();
    let detail = error.as_ref().and_then(|e| match (e.code, &e.message) {
        (Some(c), Some(m)) => Some(format!("{m} (Twilio error {c})")),
        (None, Some(m)) => Some(m.clone()),
        (Some(c), None) => Some(format!("Twilio error {c}")),
        (None, None) => None,
    });
    if reply.status == reqwest::StatusCode::BAD_REQUEST
        && let Some(code) = error.as_ref().and_then(|e| e.code)
    {
        return Err(permanent(
            &format!("twilio_{code}"),
            reply.describe(detail.as_deref()),
        ));
    }
    reply.check(detail.as_deref())
}

#[async_trait]
impl ChannelAdapter for TwilioAdapter {
    fn channel(&self) -> Channel {
        Channel::Sms
    }

    fn provider(&self) -> &str {
        &self.name
    }

    async fn send(
        &self,
        notification: &Notification,
        content: &RenderedContent,
    ) -> Result<SendReceipt, SendError> {
        let form = self.form(notification, content)?;
        let reply = http::execute(
            self.client
                .post(format!("{}/Messages.json", self.account_url))
                .basic_auth(&self.user, Some(self.password.expose_secret()))
                .form(&form),
        )
        .await?;
        check_reply(&reply)?;
        #[derive(Deserialize)]
        struct Created {
            sid: Option<String>,
        }
        Ok(SendReceipt {
            provider: self.name.clone(),
            provider_message_id: reply.json::<Created>().and_then(|c| c.sid),
        })
    }

    /// `GET /2010-04-01/Accounts/{sid}.json`: the credentials work.
    async fn check(&self) -> Result<(), SendError> {
        let reply = http::execute(
            self.client
                .get(format!("{}.json", self.account_url))
                .basic_auth(&self.user, Some(self.password.expose_secret())),
        )
        .await?;
        check_reply(&reply)
    }
}
