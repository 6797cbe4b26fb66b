//! SMTP adapter: builds the MIME message for one email notification and sends
//! it through a small pool of relay connections that this module owns.
//!
//! Connections are opened by hand (`TcpStream` with `TCP_NODELAY`, then
//! lettre's [`AsyncSmtpConnection`]) because lettre's own connector leaves
//! Nagle on, which costs ~44 ms per message (see ARCHITECTURE.md, measured
//! facts). Each connection carries one transaction at a time; a semaphore
//! bounds concurrent sends to `pool_size`; idle connections are reused and a
//! broken one is dropped and replaced.
//!
//! Errors are classified for the caller: a 5xx reply to the message
//! transaction is permanent (`smtp_permanent`); 4xx replies (`smtp_transient`),
//! timeouts (`smtp_timeout`) and anything that goes wrong while opening a
//! connection (`smtp_connect`, `smtp_tls`, `smtp_auth`) are retryable, because
//! they are not about the message.

#![allow(deprecated)] // lettre marks `AsyncNetworkStream` deprecated but still needs it for `use_existing_tokio1`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lettre::Address;
use lettre::address::Envelope;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MessageBuilder, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncNetworkStream, AsyncSmtpConnection, AsyncTokioStream, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use secrecy::ExposeSecret;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::{ChannelAdapter, SendError, SendReceipt};
use crate::config::{SmtpSettings, SmtpTls};
use crate::domain::{Channel, Notification};
use crate::render::RenderedContent;

/// Provider name of the built-in adapter (`[smtp]` in herald.toml).
const PROVIDER: &str = "smtp";

/// Idle connections older than this are closed instead of reused: relays
/// drop idle clients after a while (postfix: 300 s) and a stale connection
/// costs a failed command.
const MAX_IDLE: Duration = Duration::from_secs(60);

/// Headers Herald sets itself; `meta.headers` may not override them.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "sender",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "return-path",
];

/// Why an [`SmtpAdapter`] could not be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum SmtpConfigError {
    /// `smtp.default_from` is not a mailbox (`addr` or `Name <addr>`).
    #[error("smtp.default_from is not a valid mailbox: {0}")]
    DefaultFrom(String),
    /// `smtp.hello_name` is empty.
    #[error("smtp.hello_name must not be empty")]
    HelloName,
    /// The TLS client configuration could not be built.
    #[error("smtp tls configuration: {0}")]
    Tls(String),
    /// Only one of `smtp.username` / `smtp.password` is set.
    #[error("smtp.username and smtp.password must be set together")]
    PartialCredentials,
}

/// A registered `smtp` provider's `config` JSON; unset fields take the
/// `[smtp]` values from herald.toml.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpProviderConfig {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub tls: Option<SmtpTls>,
    pub username: Option<String>,
    pub default_from: Option<String>,
    pub pool_size: Option<usize>,
    pub timeout_ms: Option<u64>,
    pub hello_name: Option<String>,
}

/// A registered `smtp` provider's `credentials` JSON.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SmtpProviderCredentials {
    password: Option<secrecy::SecretString>,
}

/// The SMTP channel adapter with its own connection pool. Cheap to share
/// behind an `Arc`; safe to call concurrently. Connects lazily: building it
/// opens no connection (call [`ChannelAdapter::check`] to test the relay).
pub struct SmtpAdapter {
    /// Provider name recorded on attempts: `smtp` for the built-in adapter,
    /// the registered name for one from the provider registry.
    provider: String,
    /// How to open a connection to the relay.
    connector: Connector,
    /// Sender used when a notification has no `meta.from`.
    default_from: Mailbox,
    /// Idle, healthy connections with the time they were last used.
    idle: Mutex<Vec<(Relay, Instant)>>,
    /// One permit per connection: bounds concurrent transactions (and so
    /// open connections) to `pool_size`.
    permits: Semaphore,
    /// Per-command timeout (`timeout_ms`).
    timeout: Duration,
}

impl std::fmt::Debug for SmtpAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hand-written so credentials can never end up in a log line.
        f.debug_struct("SmtpAdapter")
            .field("provider", &self.provider)
            .field("host", &self.connector.host)
            .field("port", &self.connector.port)
            .field("tls", &self.connector.tls)
            .field("auth", &self.connector.credentials.is_some())
            .finish_non_exhaustive()
    }
}

/// Everything needed to open and prepare one connection.
struct Connector {
    /// Relay host name (also the TLS server name).
    host: String,
    /// Relay port.
    port: u16,
    /// How the connection is secured.
    tls: SmtpTls,
    /// TLS client parameters, built once (`None` for [`SmtpTls::None`]).
    tls_parameters: Option<TlsParameters>,
    /// Name announced in EHLO.
    hello: ClientId,
    /// AUTH credentials when both username and password are configured.
    credentials: Option<Credentials>,
    /// Per-step timeout while connecting.
    timeout: Duration,
}

impl SmtpAdapter {
    /// Builds the adapter from settings. Connects lazily: no connection is
    /// opened here.
    pub fn new(settings: &SmtpSettings) -> Result<Self, SmtpConfigError> {
        let default_from = Mailbox::from_str(settings.default_from.trim())
            .map_err(|e| SmtpConfigError::DefaultFrom(e.to_string()))?;
        if settings.hello_name.trim().is_empty() {
            return Err(SmtpConfigError::HelloName);
        }
        let tls_parameters = match settings.tls {
            SmtpTls::None => None,
            SmtpTls::Starttls | SmtpTls::Tls => Some(
                TlsParameters::new(settings.host.clone())
                    .map_err(|e| SmtpConfigError::Tls(e.to_string()))?,
            ),
        };
        let credentials = match (&settings.username, &settings.password) {
            (Some(user), Some(password)) => Some(Credentials::new(
                user.clone(),
                password.expose_secret().to_string(),
            )),
            (None, None) => None,
            _ => return Err(SmtpConfigError::PartialCredentials),
        };
        let timeout = Duration::from_millis(settings.timeout_ms.max(1));
        Ok(SmtpAdapter {
            provider: PROVIDER.to_string(),
            connector: Connector {
                host: settings.host.clone(),
                port: settings.port,
                tls: settings.tls,
                tls_parameters,
                hello: ClientId::Domain(settings.hello_name.trim().to_string()),
                credentials,
                timeout,
            },
            default_from,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(settings.pool_size.max(1)),
            timeout,
        })
    }

    /// Builds the adapter of a registered `smtp` provider. Every `config`
    /// field defaults to `[smtp]` in herald.toml; `credentials` holds the
    /// password. The relay login (username and password) is taken from
    /// herald.toml only when the row names neither and points at the same
    /// relay, so a row naming another host never receives that password.
    pub fn from_spec(
        provider: &crate::routing::ProviderSpec,
        ctx: &super::AdapterContext,
    ) -> Result<Self, super::AdapterConfigError> {
        let config: SmtpProviderConfig = super::spec::config(provider)?;
        let credentials: SmtpProviderCredentials = super::spec::credentials(provider)?;
        let base = &ctx.settings.smtp;
        let same_relay = config.host.as_ref().is_none_or(|h| *h == base.host)
            && config.port.is_none_or(|p| p == base.port);
        let (username, password) = match (config.username, credentials.password) {
            (None, None) if same_relay => (base.username.clone(), base.password.clone()),
            pair => pair,
        };
        let settings = SmtpSettings {
            host: config.host.unwrap_or_else(|| base.host.clone()),
            port: config.port.unwrap_or(base.port),
            tls: config.tls.unwrap_or(base.tls),
            username,
            password,
            default_from: config
                .default_from
                .unwrap_or_else(|| base.default_from.clone()),
            pool_size: config.pool_size.unwrap_or(base.pool_size),
            timeout_ms: config.timeout_ms.unwrap_or(base.timeout_ms),
            hello_name: config.hello_name.unwrap_or_else(|| base.hello_name.clone()),
        };
        if settings.host.trim().is_empty() {
            return Err(super::spec::invalid(
                provider,
                "config.host must not be empty",
            ));
        }
        let mut adapter = SmtpAdapter::new(&settings).map_err(|e| {
            let message = match e {
                SmtpConfigError::DefaultFrom(m) => {
                    format!("config.default_from is not a valid mailbox: {m}")
                }
                SmtpConfigError::HelloName => "config.hello_name must not be empty".into(),
                SmtpConfigError::Tls(m) => format!("config.tls: {m}"),
                SmtpConfigError::PartialCredentials => {
                    "config.username and credentials.password must be set together".into()
                }
            };
            super::spec::invalid(provider, message)
        })?;
        adapter.provider = provider.name.clone();
        Ok(adapter)
    }

    /// Takes a reusable idle connection, closing the ones idle for too long.
    fn take_idle(&self) -> Option<Relay> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((relay, since)) = idle.pop() {
            if !relay.conn.has_broken() && since.elapsed() < MAX_IDLE {
                return Some(relay);
            }
        }
        None
    }

    /// Returns a healthy connection to the pool.
    fn put_back(&self, relay: Relay) {
        if relay.conn.has_broken() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.push((relay, Instant::now()));
    }

    /// Runs one SMTP transaction on `relay` with a timeout on every command.
    /// When the relay offers PIPELINING (RFC 2920), MAIL, every RCPT and DATA
    /// go out in one write and their replies are read after it: two round
    /// trips per message instead of three plus one per recipient.
    async fn transact(
        &self,
        relay: &mut Relay,
        envelope: &Envelope,
        email: &[u8],
    ) -> Result<Response, TxError> {
        let conn = &mut relay.conn;
        let mut params = Vec::new();
        let non_ascii_addresses = envelope
            .from()
            .into_iter()
            .chain(envelope.to())
            .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
        if non_ascii_addresses {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                return Err(TxError::Unsupported(
                    "address is not ASCII and the relay does not offer SMTPUTF8",
                ));
            }
            params.push(MailParameter::SmtpUtfEight);
        }
        if !email.is_ascii() {
            if !conn.server_info().supports_feature(Extension::EightBitMime) {
                return Err(TxError::Unsupported(
                    "message is not ASCII and the relay does not offer 8BITMIME",
                ));
            }
            params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let t = self.timeout;
        let mail = Mail::new(envelope.from().cloned(), params);
        if relay.pipelining {
            let group = Pipelined {
                mail,
                rcpts: envelope
                    .to()
                    .iter()
                    .map(|a| Rcpt::new(a.clone(), vec![]))
                    .collect(),
            };
            // The reply to MAIL, then one per RCPT and one to DATA: all are
            // read, whatever they say, so the session stays in step.
            let mut failed = match step(t, Stage::MailFrom, conn.command(&group)).await {
                Ok(_) => None,
                // No reply at all, or 421 (a stale connection, a timeout):
                // give up on this session as the one-at-a-time path does.
                Err(e) if !e.is_reply() || e.is_stale_connection() => return Err(e),
                Err(e) => Some(e),
            };
            for _ in &group.rcpts {
                let reply = step(t, Stage::Later, conn.read_response()).await;
                keep_first_refusal(reply, &mut failed)?;
            }
            let data = step(t, Stage::Later, conn.read_response()).await;
            let data_accepted = data.is_ok();
            keep_first_refusal(data, &mut failed)?;
            if let Some(e) = failed {
                // DATA was accepted although MAIL or a RCPT was refused: the
                // relay now reads message text, and the only way out that
                // delivers nothing is to drop the connection.
                return Err(if data_accepted {
                    TxError::Abandoned(Box::new(e))
                } else {
                    e
                });
            }
        } else {
            step(t, Stage::MailFrom, conn.command(mail)).await?;
            for rcpt in envelope.to() {
                step(
                    t,
                    Stage::Later,
                    conn.command(Rcpt::new(rcpt.clone(), vec![])),
                )
                .await?;
            }
            step(t, Stage::Later, conn.command(Data)).await?;
        }
        step(t, Stage::Later, conn.message(email)).await
    }

    /// After a negative reply the connection is still in sync: reset it and
    /// keep it, or drop it if the reset fails.
    async fn reset_and_keep(&self, mut relay: Relay) {
        let ok = matches!(
            tokio::time::timeout(self.timeout, relay.conn.command("RSET\r\n")).await,
            Ok(Ok(_))
        );
        if ok {
            self.put_back(relay);
        }
    }
}

/// Which part of the transaction failed: a reused connection that fails on
/// its first command was most likely closed by the relay while idle, and
/// the message can safely go out on a fresh connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    MailFrom,
    Later,
}

/// A failed transaction.
#[derive(Debug)]
enum TxError {
    /// lettre reported an error (negative reply, I/O, parse).
    Smtp(Stage, lettre::transport::smtp::Error),
    /// A command did not complete within the timeout.
    Timeout,
    /// The message needs an extension the relay does not offer.
    Unsupported(&'static str),
    /// A refusal after which the session cannot be reset (pipelined DATA
    /// was accepted): the connection must be dropped.
    Abandoned(Box<TxError>),
}

impl TxError {
    /// True when a fresh connection may succeed where this one failed.
    fn is_stale_connection(&self) -> bool {
        match self {
            // No reply at all, or 421 "closing channel" (postfix says that
            // when it times an idle client out).
            TxError::Smtp(Stage::MailFrom, e) => {
                !(e.is_transient() || e.is_permanent())
                    || e.status().is_some_and(|c| c.to_string() == "421")
            }
            _ => false,
        }
    }

    /// True when the relay answered with a reply code (the session is intact).
    fn is_reply(&self) -> bool {
        matches!(self, TxError::Smtp(_, e) if e.is_transient() || e.is_permanent())
    }

    fn into_send_error(self) -> SendError {
        match self {
            TxError::Smtp(_, e) => classify_transaction_error(&e),
            TxError::Timeout => retryable("smtp_timeout", "SMTP command timed out".into()),
            TxError::Unsupported(m) => permanent("smtp_unsupported", m.into()),
            TxError::Abandoned(e) => e.into_send_error(),
        }
    }
}

/// Records the first refusal among pipelined replies; fails at once when a
/// reply did not come (the session is gone).
fn keep_first_refusal(
    reply: Result<Response, TxError>,
    failed: &mut Option<TxError>,
) -> Result<(), TxError> {
    match reply {
        Ok(_) => Ok(()),
        Err(e) if !e.is_reply() => Err(e),
        Err(e) => {
            failed.get_or_insert(e);
            Ok(())
        }
    }
}

/// Whether an EHLO reply lists the PIPELINING keyword (RFC 2920).
fn offers_pipelining(ehlo: &Response) -> bool {
    ehlo.message().any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|k| k.eq_ignore_ascii_case("PIPELINING"))
    })
}

/// MAIL, every RCPT and DATA as one write (PIPELINING).
struct Pipelined {
    mail: Mail,
    rcpts: Vec<Rcpt>,
}

impl std::fmt::Display for Pipelined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.mail)?;
        for rcpt in &self.rcpts {
            write!(f, "{rcpt}")?;
        }
        write!(f, "{Data}")
    }
}

/// A relay connection and whether the relay offered PIPELINING.
struct Relay {
    conn: AsyncSmtpConnection,
    pipelining: bool,
}

/// Awaits one SMTP command with a timeout.
async fn step<F>(timeout: Duration, stage: Stage, fut: F) -> Result<Response, TxError>
where
    F: Future<Output = Result<Response, lettre::transport::smtp::Error>>,
{
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(TxError::Smtp(stage, e)),
        Err(_) => Err(TxError::Timeout),
    }
}

/// Maps an error in the message transaction to the caller's decision.
fn classify_transaction_error(e: &lettre::transport::smtp::Error) -> SendError {
    if e.is_permanent() {
        permanent("smtp_permanent", e.to_string())
    } else if e.is_transient() {
        retryable("smtp_transient", e.to_string())
    } else if e.is_timeout() {
        retryable("smtp_timeout", e.to_string())
    } else {
        retryable("smtp_connect", e.to_string())
    }
}

/// Maps an error while opening a connection: never the message's fault.
fn classify_connect_error(code: &str, e: &lettre::transport::smtp::Error) -> SendError {
    if e.is_timeout() {
        retryable("smtp_timeout", e.to_string())
    } else {
        retryable(code, e.to_string())
    }
}

fn permanent(code: &str, message: String) -> SendError {
    SendError::Permanent {
        code: code.to_string(),
        message,
    }
}

fn retryable(code: &str, message: String) -> SendError {
    SendError::Retryable {
        code: code.to_string(),
        message,
        retry_after: None,
    }
}

async fn with_timeout<T, F>(timeout: Duration, what: &str, fut: F) -> Result<T, SendError>
where
    F: Future<Output = Result<T, SendError>>,
{
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| retryable("smtp_timeout", format!("{what} timed out")))?
}

impl Connector {
    /// Opens a connection: TCP (no Nagle), optional implicit TLS, greeting +
    /// EHLO, optional STARTTLS, optional AUTH.
    async fn connect(&self) -> Result<Relay, SendError> {
        let t = self.timeout;
        let tcp = with_timeout(t, "SMTP connect", async {
            TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| {
                    retryable(
                        "smtp_connect",
                        format!("connect to {}:{}: {e}", self.host, self.port),
                    )
                })
        })
        .await?;
        tcp.set_nodelay(true)
            .map_err(|e| retryable("smtp_connect", format!("set TCP_NODELAY: {e}")))?;

        let stream: Box<dyn AsyncTokioStream> = match (&self.tls, &self.tls_parameters) {
            (SmtpTls::Tls, Some(params)) => {
                let mut net = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
                with_timeout(t, "TLS handshake", async {
                    net.upgrade_tls(params.clone())
                        .await
                        .map_err(|e| classify_connect_error("smtp_tls", &e))
                })
                .await?;
                Box::new(FuturesIo(net))
            }
            _ => Box::new(tcp),
        };

        let mut conn = with_timeout(t, "SMTP greeting and EHLO", async {
            AsyncSmtpConnection::connect_with_transport(stream, &self.hello)
                .await
                .map_err(|e| classify_connect_error("smtp_connect", &e))
        })
        .await?;

        if let (SmtpTls::Starttls, Some(params)) = (&self.tls, &self.tls_parameters) {
            if !conn.can_starttls() {
                conn.abort().await;
                return Err(retryable(
                    "smtp_tls",
                    "STARTTLS is required but the relay does not offer it".into(),
                ));
            }
            with_timeout(t, "STARTTLS", async {
                conn.starttls(params.clone(), &self.hello)
                    .await
                    .map_err(|e| classify_connect_error("smtp_tls", &e))
            })
            .await?;
        }

        if let Some(credentials) = &self.credentials {
            with_timeout(t, "SMTP AUTH", async {
                conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                    .await
                    .map_err(|e| classify_connect_error("smtp_auth", &e))
            })
            .await?;
        }
        // lettre keeps only the EHLO keywords it uses itself, so ask again
        // for PIPELINING (one round trip per new connection).
        let ehlo = with_timeout(t, "SMTP EHLO", async {
            conn.command(Ehlo::new(self.hello.clone()))
                .await
                .map_err(|e| classify_connect_error("smtp_connect", &e))
        })
        .await?;
        let pipelining = offers_pipelining(&ehlo);
        Ok(Relay { conn, pipelining })
    }
}

#[async_trait]
impl ChannelAdapter for SmtpAdapter {
    fn channel(&self) -> Channel {
        Channel::Email
    }

    fn provider(&self) -> &str {
        &self.provider
    }

    async fn send(
        &self,
        notification: &Notification,
        content: &RenderedContent,
    ) -> Result<SendReceipt, SendError> {
        let built = build_message(notification, content, &self.default_from)?;
        let envelope = built.message.envelope().clone();
        let email = built.message.formatted();

        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| retryable("smtp_connect", "SMTP adapter is shut down".into()))?;

        let (mut relay, reused) = match self.take_idle() {
            Some(r) => (r, true),
            None => (self.connector.connect().await?, false),
        };
        let mut result = self.transact(&mut relay, &envelope, &email).await;
        if reused && matches!(&result, Err(e) if e.is_stale_connection()) {
            tracing::debug!("idle SMTP connection was closed by the relay; reconnecting");
            relay = self.connector.connect().await?;
            result = self.transact(&mut relay, &envelope, &email).await;
        }
        match result {
            Ok(response) => {
                self.put_back(relay);
                Ok(SendReceipt {
                    provider: self.provider.clone(),
                    provider_message_id: Some(queue_id(&response).unwrap_or(built.message_id)),
                })
            }
            Err(e) => {
                if e.is_reply() && !relay.conn.has_broken() {
                    self.reset_and_keep(relay).await;
                }
                Err(e.into_send_error())
            }
        }
    }

    async fn check(&self) -> Result<(), SendError> {
        let mut relay = self.connector.connect().await?;
        let _ = tokio::time::timeout(self.timeout, relay.conn.quit()).await;
        Ok(())
    }
}

/// The queue id from a `250 2.0.0 Ok: queued as 4Xyz` reply, when present.
fn queue_id(response: &Response) -> Option<String> {
    response.message().find_map(|line| {
        let (_, rest) = line.split_once("queued as ")?;
        let id: String = rest
            .trim()
            .chars()
            .take_while(|c| !c.is_whitespace())
            .filter(|c| c.is_ascii_graphic())
            .take(128)
            .collect();
        (!id.is_empty()).then_some(id)
    })
}

/// A message ready to send plus the Message-ID it carries.
#[derive(Debug)]
struct BuiltMessage {
    message: lettre::Message,
    message_id: String,
}

/// Builds the MIME message for `notification`. Every failure is permanent:
/// the same input always fails the same way.
fn build_message(
    notification: &Notification,
    content: &RenderedContent,
    default_from: &Mailbox,
) -> Result<BuiltMessage, SendError> {
    let to = notification
        .recipient
        .email
        .as_ref()
        .ok_or_else(|| permanent("no_address", "recipient has no email address".into()))?;
    let meta = &notification.meta;

    let from = match &meta.from {
        Some(a) => mailbox(a.as_str())?,
        None => default_from.clone(),
    };
    let message_id = message_id(&notification.id);
    let to = mailbox(to.as_str())?;
    // The envelope lettre would derive from the headers (From; To, Cc, Bcc),
    // given directly: deriving it parses those headers back (Sender, which
    // would take precedence, is reserved).
    let sender = from.email.clone();
    let mut recipients = vec![to.email.clone()];
    let mut builder: MessageBuilder = lettre::Message::builder()
        .from(from)
        .to(to)
        .message_id(Some(message_id.clone()));
    if let Some(reply_to) = &meta.reply_to {
        builder = builder.reply_to(mailbox(reply_to.as_str())?);
    }
    for cc in &meta.cc {
        let cc = mailbox(cc.as_str())?;
        recipients.push(cc.email.clone());
        builder = builder.cc(cc);
    }
    for bcc in &meta.bcc {
        let bcc = mailbox(bcc.as_str())?;
        recipients.push(bcc.email.clone());
        builder = builder.bcc(bcc);
    }
    let envelope = Envelope::new(Some(sender), recipients)
        .map_err(|e| permanent("invalid_message", e.to_string()))?;
    builder = builder.envelope(envelope);
    if let Some(subject) = &content.subject {
        builder = builder.subject(one_line(subject));
    }
    for (name, value) in &meta.headers {
        builder = builder.raw_header(extra_header(name, value)?);
    }

    let message = match (&content.text, &content.html) {
        (Some(text), Some(html)) => builder.multipart(MultiPart::alternative_plain_html(
            text.clone(),
            html.clone(),
        )),
        (Some(text), None) => builder.singlepart(SinglePart::plain(text.clone())),
        (None, Some(html)) => builder.singlepart(SinglePart::html(html.clone())),
        (None, None) => {
            return Err(permanent(
                "empty_content",
                "email has neither a text nor an html body".into(),
            ));
        }
    }
    .map_err(|e| permanent("invalid_message", e.to_string()))?;
    Ok(BuiltMessage {
        message,
        message_id,
    })
}

/// Parses an already validated address into a lettre mailbox.
fn mailbox(address: &str) -> Result<Mailbox, SendError> {
    let address = Address::from_str(address)
        .map_err(|e| permanent("invalid_address", format!("address not accepted: {e}")))?;
    Ok(Mailbox::new(None, address))
}

/// `<{id}@herald>` with every byte outside `[A-Za-z0-9_-]` written as `=XX`,
/// so distinct notification ids give distinct, always valid Message-IDs.
fn message_id(notification_id: &str) -> String {
    let mut left = String::with_capacity(notification_id.len());
    for b in notification_id.bytes().take(200) {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            left.push(char::from(b));
        } else {
            left.push_str(&format!("={b:02X}"));
        }
    }
    if left.is_empty() {
        left = uuid::Uuid::new_v4().simple().to_string();
    }
    format!("<{left}@herald>")
}

/// Collapses line breaks (a rendered subject may contain them) to spaces.
fn one_line(s: &str) -> String {
    s.replace("\r\n", " ").replace(['\r', '\n'], " ")
}

/// Validates and builds one extra header from `meta.headers`. Refuses CR/LF
/// and other control characters (header injection), names that are not RFC
/// 5322 field names, and headers Herald sets itself.
fn extra_header(name: &str, value: &str) -> Result<HeaderValue, SendError> {
    let invalid = |m: String| permanent("invalid_header", m);
    let name_ok = !name.is_empty()
        && name.len() <= 76
        && name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
    if !name_ok {
        return Err(invalid(format!("invalid header name {name:?}")));
    }
    if RESERVED_HEADERS
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
    {
        return Err(invalid(format!("header {name} is set by Herald")));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(invalid(format!(
            "header {name} contains CR, LF or another control character"
        )));
    }
    let header_name = HeaderName::new_from_ascii(name.to_string())
        .map_err(|e| invalid(format!("{name}: {e}")))?;
    Ok(HeaderValue::new(header_name, value.to_string()))
}

/// Adapts lettre's TLS-capable stream (futures-io traits) to the tokio
/// traits `connect_with_transport` takes, so implicit TLS runs over our own
/// `TCP_NODELAY` socket.
#[derive(Debug)]
struct FuturesIo(AsyncNetworkStream);

impl AsyncRead for FuturesIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let dst = buf.initialize_unfilled();
        match futures::io::AsyncRead::poll_read(Pin::new(&mut self.0), cx, dst) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for FuturesIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        futures::io::AsyncWrite::poll_write(Pin::new(&mut self.0), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        futures::io::AsyncWrite::poll_flush(Pin::new(&mut self.0), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        futures::io::AsyncWrite::poll_close(Pin::new(&mut self.0), cx)
    }
}

impl AsyncTokioStream for FuturesIo {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.peer_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Content, EmailAddress, InlineContent, Meta, Priority, Recipient};

    fn notification(meta: Meta) -> Notification {
        Notification {
            id: "req-1:0".into(),
            request_id: "req-1".into(),
            tenant_id: None,
            app_id: None,
            channel: Channel::Email,
            recipient: Recipient {
                email: Some(EmailAddress::parse("to@example.com").unwrap()),
                ..Default::default()
            },
            content: Content::Inline(InlineContent::default()),
            priority: Priority::Normal,
            category: None,
            scheduled_at: None,
            expires_at: None,
            meta,
            correlation_id: None,
        }
    }

    fn content() -> RenderedContent {
        RenderedContent {
            subject: Some("Hello\r\nBcc: evil@example.com".into()),
            text: Some("text body".into()),
            html: Some("<p>html body</p>".into()),
            data: serde_json::Value::Null,
        }
    }

    fn from() -> Mailbox {
        "Herald <herald@localhost>".parse().unwrap()
    }

    #[test]
    fn pipelining_is_read_from_the_ehlo_reply() {
        let ehlo = |text: &str| text.parse::<Response>().unwrap();
        assert!(offers_pipelining(&ehlo(
            "250-relay.example\r\n250-SIZE 10240000\r\n250-pipelining\r\n250 8BITMIME\r\n"
        )));
        assert!(!offers_pipelining(&ehlo(
            "250-relay.example\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n"
        )));
        // Only the keyword counts, not a host name that contains it.
        assert!(!offers_pipelining(&ehlo(
            "250 PIPELINING-relay.example\r\n"
        )));
    }

    #[test]
    fn a_pipelined_group_is_mail_then_every_rcpt_then_data() {
        let addr = |s: &str| s.parse::<Address>().unwrap();
        let group = Pipelined {
            mail: Mail::new(Some(addr("from@example.com")), vec![]),
            rcpts: ["a@example.com", "b@example.com"]
                .into_iter()
                .map(|a| Rcpt::new(addr(a), vec![]))
                .collect(),
        };
        assert_eq!(
            group.to_string(),
            "MAIL FROM:<from@example.com>\r\nRCPT TO:<a@example.com>\r\n\
             RCPT TO:<b@example.com>\r\nDATA\r\n"
        );
    }

    #[test]
    fn message_ids_are_valid_and_distinct() {
        assert_eq!(message_id("abc-1_2"), "<abc-1_2@herald>");
        assert_eq!(message_id("req:0"), "<req=3A0@herald>");
        assert_ne!(message_id("a.b"), message_id("a=2Eb"));
        assert_ne!(message_id("a:1"), message_id("a.1"));
        assert!(message_id("").starts_with('<'));
        let weird = message_id("x>\r\n<y@z");
        assert!(!weird.contains(['\r', '\n']));
        assert_eq!(weird.matches('<').count(), 1);
    }

    #[test]
    fn builds_alternative_message_without_bcc_header() {
        let meta = Meta {
            reply_to: Some(EmailAddress::parse("reply@example.com").unwrap()),
            cc: vec![EmailAddress::parse("cc@example.com").unwrap()],
            bcc: vec![EmailAddress::parse("hidden@example.com").unwrap()],
            headers: [("X-Campaign".to_string(), "spring".to_string())].into(),
            ..Default::default()
        };
        let built = build_message(&notification(meta), &content(), &from()).unwrap();
        let text = String::from_utf8(built.message.formatted()).unwrap();
        assert!(text.contains("multipart/alternative"), "{text}");
        assert!(text.contains("X-Campaign: spring\r\n"));
        assert!(text.contains("Reply-To: reply@example.com\r\n"));
        assert!(text.contains("Cc: cc@example.com\r\n"));
        assert!(
            !text
                .lines()
                .any(|l| l.to_ascii_lowercase().starts_with("bcc:")),
            "{text}"
        );
        assert!(text.contains("Subject: Hello Bcc: evil@example.com\r\n"));
        let rcpts: Vec<String> = built
            .message
            .envelope()
            .to()
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(
            rcpts,
            ["to@example.com", "cc@example.com", "hidden@example.com"]
        );
        let sender = built.message.envelope().from().map(|a| a.to_string());
        assert_eq!(sender.as_deref(), Some("herald@localhost"));
        assert_eq!(built.message_id, "<req-1=3A0@herald>");
    }

    #[test]
    fn refuses_header_injection_and_reserved_headers() {
        for (name, value) in [
            ("X-Ok", "a\r\nBcc: evil@example.com"),
            ("X-Ok", "a\nb"),
            ("X-Ok", "a\rb"),
            ("X-Ok", "nul\0"),
            ("Bad Name", "v"),
            ("Bad:Name", "v"),
            ("", "v"),
            ("Bcc", "evil@example.com"),
            ("content-type", "text/plain"),
        ] {
            let meta = Meta {
                headers: [(name.to_string(), value.to_string())].into(),
                ..Default::default()
            };
            let err = build_message(&notification(meta), &content(), &from()).unwrap_err();
            assert_eq!(err.code(), "invalid_header", "{name:?}: {value:?}");
            assert!(!err.is_retryable());
        }
    }

    #[test]
    fn missing_address_and_empty_content_are_permanent() {
        let mut n = notification(Meta::default());
        n.recipient.email = None;
        let err = build_message(&n, &content(), &from()).unwrap_err();
        assert_eq!(err.code(), "no_address");
        let n = notification(Meta::default());
        let err = build_message(&n, &RenderedContent::default(), &from()).unwrap_err();
        assert_eq!(err.code(), "empty_content");
    }

    #[test]
    fn single_part_when_only_one_body() {
        let n = notification(Meta::default());
        let c = RenderedContent {
            html: Some("<b>hi</b>".into()),
            ..Default::default()
        };
        let text =
            String::from_utf8(build_message(&n, &c, &from()).unwrap().message.formatted()).unwrap();
        assert!(text.contains("Content-Type: text/html"), "{text}");
        assert!(!text.contains("multipart"));
    }

    #[test]
    fn queue_id_is_taken_from_reply() {
        use lettre::transport::smtp::response::{Category, Code, Detail, Severity};
        let code = Code::new(
            Severity::PositiveCompletion,
            Category::MailSystem,
            Detail::Zero,
        );
        let r = Response::new(code, vec!["2.0.0 Ok: queued as 4XyZ12".into()]);
        assert_eq!(queue_id(&r).as_deref(), Some("4XyZ12"));
        let r = Response::new(code, vec!["2.0.0 Ok".into()]);
        assert_eq!(queue_id(&r), None);
    }

    #[test]
    fn config_errors() {
        let mut s = crate::config::Settings::load_with_env(None, Vec::new())
            .unwrap()
            .smtp;
        assert!(SmtpAdapter::new(&s).is_ok());
        s.username = Some("u".into());
        assert!(matches!(
            SmtpAdapter::new(&s),
            Err(SmtpConfigError::PartialCredentials)
        ));
        s.username = None;
        s.default_from = "not an address".into();
        assert!(matches!(
            SmtpAdapter::new(&s),
            Err(SmtpConfigError::DefaultFrom(_))
        ));
    }
}
