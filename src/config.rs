//! Layered settings: built-in defaults, then a TOML file (`herald.toml` or the
//! path given by `--config` / `HERALD_CONFIG`), then `HERALD_*` environment
//! variables (`HERALD_KAFKA__BROKERS=127.0.0.1:9092`, nested keys joined by
//! `__`, lists comma-separated). Validated once in [`Settings::load`].
//!
//! Secrets (database URL, SMTP password, webhook signing secret) are
//! [`SecretString`]s: their `Debug` prints `[REDACTED]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// All of Herald's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub database: DatabaseSettings,
    pub http: HttpSettings,
    pub smtp: SmtpSettings,
    pub webhook: WebhookSettings,
    pub templates: TemplateSettings,
    pub pipeline: PipelineSettings,
    pub policy: PolicySettings,
    pub template_store: TemplateStoreSettings,
    pub api: ApiSettings,
    pub providers: ProviderSettings,
    pub routing: RoutingSettings,
    pub receipts: ReceiptSettings,
}

/// Kafka client and topic settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Topics carrying notification requests.
    pub request_topics: Vec<String>,
    /// Topic that receives delivery-status events.
    pub outcome_topic: String,
    /// Topic that receives requests that could not be decoded.
    pub dlq_topic: String,
    /// Consumer group id shared by all Herald instances.
    pub group_id: String,
    /// Static membership id (`group.instance.id`), e.g. the pod name. A
    /// restarted instance with the same id gets its partitions back at once.
    pub group_instance_id: Option<String>,
    /// How many messages of one partition run at once (different keys only:
    /// the same key is always processed in order).
    pub partition_concurrency: usize,
    /// Upper bound of messages in flight over all partitions of this instance.
    pub max_in_flight: usize,
    /// Upper bound of the payload bytes of the messages in flight (a larger
    /// message waits until it is alone). With `max_in_flight`, bounds the
    /// memory a burst of large requests takes.
    pub max_in_flight_bytes: usize,
    /// Partitions used when `herald topics ensure` creates a missing topic.
    pub topic_partitions: i32,
    /// Create missing topics when `serve` starts.
    pub ensure_topics: bool,
    /// How often stored offsets are committed, in milliseconds.
    pub commit_interval_ms: u64,
    /// How long in-flight work (everything already handed to a lane) may
    /// take to finish on revoke and at shutdown; what is left at the deadline
    /// is read again by the partition's next owner.
    pub drain_timeout_ms: u64,
    /// Raw librdkafka properties, applied last (override everything above).
    pub properties: BTreeMap<String, String>,
    /// Topic carrying preference-update events
    /// (`schemas/preference-update.v1.json`); unset: no preference consumer.
    pub preference_topic: Option<String>,
}

/// PostgreSQL settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:port/db`; secret because it may hold a password.
    pub url: SecretString,
    pub max_connections: u32,
    /// Run migrations when `serve` starts.
    pub migrate_on_start: bool,
}

/// The HTTP listener (health, metrics, API).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// `127.0.0.1:8080`; port 0 picks a free port.
    pub bind: String,
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain TCP (local relays, test sinks).
    None,
    /// Plain TCP upgraded with STARTTLS (required: fails if unsupported).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

/// SMTP relay settings for the email channel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    /// Sender used when a request has no `meta.from`.
    pub default_from: String,
    /// Connections kept open to the relay (each sends one message at a time).
    pub pool_size: usize,
    /// Per-command timeout in milliseconds.
    pub timeout_ms: u64,
    /// Name announced in EHLO.
    pub hello_name: String,
}

/// Webhook channel settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// HMAC-SHA256 signing key. `whsec_<base64>` (Standard Webhooks) or raw text.
    pub signing_secret: SecretString,
    /// Whole-request timeout in milliseconds.
    pub timeout_ms: u64,
    /// Allow targets on loopback/private/link-local addresses. Off in
    /// production (SSRF protection); tests turn it on for 127.0.0.1.
    pub allow_private_targets: bool,
    /// Largest response body read (bytes); the rest is discarded.
    pub max_response_bytes: usize,
    /// Most requests in flight to one host (host and port) at once; more
    /// wait for a free one. Also the idle connections kept per host.
    pub max_connections_per_host: usize,
}

/// Template settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSettings {
    /// Directory holding `<key>/subject.jinja`, `text.jinja`, `html.jinja`
    /// (and `<key>/<locale>/...` variants).
    pub dir: PathBuf,
    /// Locale used when neither the request nor the recipient names one that exists.
    pub default_locale: String,
    /// Fuel for one render (bounds loops); see minijinja's fuel feature.
    pub fuel: u64,
    /// Largest rendered field, in bytes.
    pub max_output_bytes: usize,
}

/// Request pipeline limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Largest accepted request payload in bytes; bigger ones go to the DLQ.
    pub max_request_bytes: usize,
    /// Most notifications being delivered at once by this instance, over
    /// all partitions; a batch request counts once per recipient. More wait
    /// their turn before they are claimed. Bounds the memory and connections
    /// a burst of large batches takes.
    pub max_concurrent_deliveries: usize,
    /// How long a claimed send belongs to its claimer, in milliseconds. Must
    /// exceed the longest send (SMTP/webhook timeouts). After a crash, a
    /// redelivered request waits this long before sending again.
    pub send_lease_ms: u64,
}

/// Recipient policy and the due-work scheduler.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Apply recipient policy: stored preferences, suppression, quiet hours
    /// and frequency caps (false: none of them). A request's own
    /// `scheduled_at` and `expires_at` hold either way.
    pub enabled: bool,
    /// How long cached preferences are trusted when no update event says
    /// otherwise (writes by other processes, e.g. `herald prefs set`).
    pub preference_cache_ttl_ms: u64,
    /// Upper bound of cached preference entries (the cache is cleared when full).
    pub preference_cache_capacity: usize,
    /// Categories that ignore quiet hours (like priority `urgent`).
    pub quiet_hours_bypass_categories: Vec<String>,
    /// Categories dropped (`suppressed`, `frequency_cap`) instead of
    /// throttled when a frequency cap is reached.
    pub frequency_cap_drop_categories: Vec<String>,
    /// Categories sent only to recipients who opted in explicitly.
    pub opt_in_required_categories: Vec<String>,
    /// How long the scheduler sleeps after a claim that found less than a
    /// full batch due, in milliseconds.
    pub scheduler_interval_ms: u64,
    /// Due rows claimed at a time (up to four batches are in flight).
    pub scheduler_batch_size: i64,
    /// How long a claimed due row belongs to its instance before another
    /// may take it (a crashed instance's claims come back after this).
    pub scheduler_lease_ms: u64,
}

/// The PostgreSQL template store (see `crate::templates`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateStoreSettings {
    /// Render stored templates (falling back to the files). Off: files only,
    /// the store is neither loaded nor consulted.
    pub enabled: bool,
    /// How often the in-memory copy of the active templates is reloaded, in
    /// milliseconds. Writes through this instance's API reload it at once;
    /// other instances see a write after at most this long.
    pub refresh_ms: u64,
}

/// The admin/query HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Largest accepted request body, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Default and largest page size of list endpoints.
    pub default_page_size: i64,
    pub max_page_size: i64,
}

/// The provider registry (see `crate::routing`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// Key that encrypts provider credentials at rest: 32 bytes, base64.
    /// Unset: credentials cannot be stored or read (providers without
    /// credentials still work). Generate one with `herald providers keygen`.
    pub encryption_key: Option<SecretString>,
    /// How often the registry is reloaded from PostgreSQL, in milliseconds
    /// (changes made through this instance apply at once).
    pub refresh_ms: u64,
}

/// Selection, rate limits, circuit breakers and retries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSettings {
    /// First retry delay of the exponential and linear strategies, in milliseconds.
    pub retry_base_ms: u64,
    /// Largest retry delay, in milliseconds.
    pub retry_cap_ms: u64,
    /// Retries of the built-in (herald.toml) providers.
    pub builtin_max_retries: u32,
    /// A rate-limit wait longer than this defers the notification as a due
    /// row instead of waiting in its lane, in milliseconds.
    pub max_rate_limit_wait_ms: u64,
    /// Consecutive failures that open a provider's circuit.
    pub breaker_failure_threshold: u32,
    /// How long an open circuit skips its provider before one trial send, in milliseconds.
    pub breaker_cooldown_ms: u64,
}

/// Delivery receipts (`POST /webhooks/{provider}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptSettings {
    /// The URL providers reach Herald's HTTP listener at
    /// (`https://herald.example.com`); status callback URLs are built from it.
    /// Unset: no callback URL is sent to providers.
    pub public_base_url: Option<String>,
    /// SendGrid Event Webhook verification key (base64 DER ECDSA P-256
    /// public key). Unset: `/webhooks/sendgrid` answers 503.
    pub sendgrid_verification_key: Option<String>,
    /// Twilio auth token that signs status callbacks (`X-Twilio-Signature`).
    /// Unset: `/webhooks/twilio` answers 503.
    pub twilio_auth_token: Option<SecretString>,
    /// Secret of the generic signed receipt endpoint (Standard Webhooks,
    /// `whsec_<base64>` or raw text). Unset: `/webhooks/generic` answers 503.
    pub signing_secret: Option<SecretString>,
    /// Largest accepted timestamp skew of signed receipts, in seconds.
    pub max_skew_secs: u64,
}

/// Errors loading settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {0}")]
    Invalid(String),
}

const DEFAULTS: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
request_topics = ["herald.requests"]
outcome_topic = "herald.outcomes"
dlq_topic = "herald.dlq"
group_id = "herald"
partition_concurrency = 256
max_in_flight = 8192
max_in_flight_bytes = 16777216
topic_partitions = 4
ensure_topics = false
commit_interval_ms = 5000
drain_timeout_ms = 10000
[kafka.properties]

[database]
url = "postgres://postgres@127.0.0.1:5432/herald"
max_connections = 8
migrate_on_start = true

[http]
bind = "127.0.0.1:8080"

[smtp]
host = "127.0.0.1"
port = 2525
tls = "none"
default_from = "Herald <herald@localhost>"
pool_size = 16
timeout_ms = 10000
hello_name = "herald.localhost"

[webhook]
signing_secret = "change-me"
timeout_ms = 5000
allow_private_targets = false
max_response_bytes = 65536
max_connections_per_host = 128

[templates]
dir = "templates"
default_locale = "en"
fuel = 50000
max_output_bytes = 1048576

[pipeline]
max_request_bytes = 1048576
max_concurrent_deliveries = 2048
send_lease_ms = 30000

[policy]
enabled = true
preference_cache_ttl_ms = 5000
preference_cache_capacity = 100000
quiet_hours_bypass_categories = ["security", "transactional"]
frequency_cap_drop_categories = ["marketing"]
opt_in_required_categories = ["marketing"]
scheduler_interval_ms = 250
scheduler_batch_size = 100
scheduler_lease_ms = 60000

[template_store]
enabled = true
refresh_ms = 5000

[api]
max_body_bytes = 1048576
default_page_size = 50
max_page_size = 500

[providers]
refresh_ms = 5000

[routing]
retry_base_ms = 1000
retry_cap_ms = 3600000
builtin_max_retries = 5
max_rate_limit_wait_ms = 2000
breaker_failure_threshold = 5
breaker_cooldown_ms = 30000

[receipts]
max_skew_secs = 300
"#;

impl Settings {
    /// Loads defaults, then `path` (or `herald.toml` if it exists), then `HERALD_*`.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        match path {
            Some(p) => {
                builder = builder.add_source(config::File::from(p).required(true));
            }
            None => {
                builder =
                    builder.add_source(config::File::with_name("herald.toml").required(false));
            }
        }
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            // Only `HERALD_SECTION__KEY` names are settings; other HERALD_*
            // variables (HERALD_CONFIG, HERALD_LOG_FORMAT, the scripts' own
            // HERALD_HOME, HERALD_PG_PORT, ...) are not.
            .filter(|(k, _)| {
                k.strip_prefix("HERALD_")
                    .is_some_and(|rest| rest.contains("__"))
            })
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("HERALD")
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("kafka.request_topics")
                .with_list_parse_key("policy.quiet_hours_bypass_categories")
                .with_list_parse_key("policy.frequency_cap_drop_categories")
                .with_list_parse_key("policy.opt_in_required_categories")
                .try_parsing(true)
                .source(Some(env)),
        );
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        // librdkafka property names use dots; environment keys cannot, so
        // `HERALD_KAFKA__PROPERTIES__LINGER_MS` means `linger.ms`.
        settings.kafka.properties = std::mem::take(&mut settings.kafka.properties)
            .into_iter()
            .map(|(k, v)| (k.replace('_', "."), v))
            .collect();
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.kafka.request_topics.is_empty() {
            return bad("kafka.request_topics must name at least one topic");
        }
        if self.kafka.partition_concurrency == 0
            || self.kafka.max_in_flight == 0
            || self.kafka.max_in_flight_bytes == 0
        {
            return bad(
                "kafka.partition_concurrency, kafka.max_in_flight and kafka.max_in_flight_bytes must be at least 1",
            );
        }
        if self.kafka.topic_partitions < 1 {
            return bad("kafka.topic_partitions must be at least 1");
        }
        if self.policy.scheduler_batch_size < 1 || self.policy.scheduler_interval_ms == 0 {
            return bad(
                "policy.scheduler_batch_size and policy.scheduler_interval_ms must be at least 1",
            );
        }
        if self.template_store.refresh_ms == 0 {
            return bad("template_store.refresh_ms must be at least 1");
        }
        if self.api.default_page_size < 1 || self.api.max_page_size < self.api.default_page_size {
            return bad("api.default_page_size must be at least 1 and at most api.max_page_size");
        }
        if self.providers.refresh_ms == 0 {
            return bad("providers.refresh_ms must be at least 1");
        }
        if self.routing.retry_base_ms == 0 || self.routing.retry_cap_ms < self.routing.retry_base_ms
        {
            return bad(
                "routing.retry_base_ms must be at least 1 and at most routing.retry_cap_ms",
            );
        }
        if self.routing.breaker_failure_threshold == 0 {
            return bad("routing.breaker_failure_threshold must be at least 1");
        }
        if self.pipeline.max_concurrent_deliveries == 0 {
            return bad("pipeline.max_concurrent_deliveries must be at least 1");
        }
        if self.smtp.pool_size == 0 {
            return bad("smtp.pool_size must be at least 1");
        }
        if self.webhook.max_connections_per_host == 0 {
            return bad("webhook.max_connections_per_host must be at least 1");
        }
        if self.webhook.signing_secret.expose_secret().is_empty() {
            return bad("webhook.signing_secret must not be empty");
        }
        if crate::domain::EmailAddress::parse(strip_display_name(&self.smtp.default_from)).is_err()
        {
            return bad("smtp.default_from must be an email address, optionally `Name <addr>`");
        }
        Ok(())
    }
}

/// `Name <a@b>` → `a@b`; anything else unchanged.
pub fn strip_display_name(s: &str) -> &str {
    match (s.rfind('<'), s.rfind('>')) {
        (Some(a), Some(b)) if a < b => &s[a + 1..b],
        _ => s.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_env_overrides() {
        let env = vec![
            (
                "HERALD_KAFKA__BROKERS".to_string(),
                "127.0.0.1:1".to_string(),
            ),
            (
                "HERALD_KAFKA__REQUEST_TOPICS".to_string(),
                "a,b".to_string(),
            ),
            (
                "HERALD_KAFKA__PARTITION_CONCURRENCY".to_string(),
                "3".to_string(),
            ),
            ("HERALD_SMTP__TLS".to_string(), "starttls".to_string()),
            ("HERALD_SMTP__PASSWORD".to_string(), "hunter2".to_string()),
            (
                "HERALD_KAFKA__PROPERTIES__FETCH_WAIT_MAX_MS".to_string(),
                "7".to_string(),
            ),
        ];
        let s = Settings::load_with_env(None, env).expect("settings");
        assert_eq!(s.kafka.brokers, "127.0.0.1:1");
        assert_eq!(s.kafka.request_topics, vec!["a", "b"]);
        assert_eq!(s.kafka.partition_concurrency, 3);
        assert_eq!(s.smtp.tls, SmtpTls::Starttls);
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("hunter2"), "secret printed: {dbg}");
        assert_eq!(
            s.kafka
                .properties
                .get("fetch.wait.max.ms")
                .map(String::as_str),
            Some("7")
        );
    }

    #[test]
    fn the_example_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("herald.example.toml");
        let s = Settings::load_with_env(Some(&path), Vec::new()).expect("herald.example.toml");
        assert_eq!(s.routing.breaker_failure_threshold, 5);
        assert!(s.providers.encryption_key.is_none());
    }

    #[test]
    fn invalid_values_are_named() {
        let env = vec![(
            "HERALD_KAFKA__PARTITION_CONCURRENCY".to_string(),
            "0".to_string(),
        )];
        let e = Settings::load_with_env(None, env).expect_err("must fail");
        assert!(e.to_string().contains("partition_concurrency"), "{e}");
    }
}
