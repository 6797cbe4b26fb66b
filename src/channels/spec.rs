//! A registered provider's `config` and `credentials` JSON, parsed into the
//! typed settings of its adapter. Errors name the field
//! (`config.timeout_ms: invalid type: …`) and never show a credential value:
//! for `credentials` only missing and unknown field *names* are reported.

use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;

use super::AdapterConfigError;
use crate::routing::ProviderSpec;

/// The error for `spec` with `message` (which must not contain secrets).
pub(crate) fn invalid(spec: &ProviderSpec, message: impl Into<String>) -> AdapterConfigError {
    AdapterConfigError::Provider {
        name: spec.name.clone(),
        message: message.into(),
    }
}

/// An HTTP adapter's `timeout_ms`, checked (`> 0`); default
/// [`super::http::DEFAULT_TIMEOUT_MS`].
pub(crate) fn timeout(
    spec: &ProviderSpec,
    timeout_ms: Option<u64>,
) -> Result<std::time::Duration, AdapterConfigError> {
    match timeout_ms {
        Some(0) => Err(invalid(spec, "config.timeout_ms must be > 0")),
        Some(ms) => Ok(std::time::Duration::from_millis(ms)),
        None => Ok(std::time::Duration::from_millis(
            super::http::DEFAULT_TIMEOUT_MS,
        )),
    }
}

/// Parses `spec.config` (`null` counts as `{}`).
pub(crate) fn config<T: DeserializeOwned>(spec: &ProviderSpec) -> Result<T, AdapterConfigError> {
    let value = match &spec.config {
        serde_json::Value::Null => serde_json::Value::Object(Default::default()),
        v => v.clone(),
    };
    if !value.is_object() {
        return Err(invalid(spec, "config must be a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            "config".to_string()
        } else {
            format!("config.{path}")
        };
        invalid(spec, format!("{at}: {}", e.inner()))
    })
}

/// Parses `spec.credentials`. Error messages carry field names only.
pub(crate) fn credentials<T: DeserializeOwned>(
    spec: &ProviderSpec,
) -> Result<T, AdapterConfigError> {
    let text = spec.credentials.expose_secret();
    let value: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Object(Default::default())
    } else {
        // serde_json's syntax errors give a position, never the input.
        serde_json::from_str(text).map_err(|e| {
            invalid(
                spec,
                format!(
                    "credentials: not valid JSON (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            )
        })?
    };
    if !value.is_object() {
        return Err(invalid(spec, "credentials must be a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        // "missing field `x`" / "unknown field `x`, expected one of …" name
        // fields only; anything else (invalid type/value) may quote the value.
        let names_only = inner.starts_with("missing field") || inner.starts_with("unknown field");
        let at = if path == "." {
            "credentials".to_string()
        } else {
            format!("credentials.{path}")
        };
        if names_only {
            invalid(spec, format!("{at}: {inner}"))
        } else {
            invalid(
                spec,
                format!("{at}: invalid value (not shown; credentials are secret)"),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{ProviderType, RetryStrategy};

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        timeout_ms: Option<u64>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Creds {
        api_key: secrecy::SecretString,
        port: Option<u16>,
    }

    fn spec(config: serde_json::Value, credentials: &str) -> ProviderSpec {
        ProviderSpec {
            name: "p".into(),
            provider_type: ProviderType::Sendgrid,
            channel: crate::domain::Channel::Email,
            config,
            credentials: credentials.into(),
            priority: 0,
            is_default: false,
            active: true,
            retry_strategy: RetryStrategy::Exponential,
            max_retries: 3,
            rate_limit_per_second: None,
            rate_limit_per_minute: None,
            tenant_id: None,
        }
    }

    fn msg(e: AdapterConfigError) -> String {
        e.to_string()
    }

    #[test]
    fn config_errors_name_the_field() {
        let s = spec(serde_json::json!({"timeout_ms": "fast"}), "{}");
        let e = msg(config::<Cfg>(&s).unwrap_err());
        assert!(
            e.starts_with("provider p: config.timeout_ms: invalid type"),
            "{e}"
        );
        let s = spec(serde_json::json!({"timeout": 1}), "{}");
        let e = msg(config::<Cfg>(&s).unwrap_err());
        assert!(e.contains("unknown field `timeout`"), "{e}");
        let s = spec(serde_json::json!([1]), "{}");
        assert!(msg(config::<Cfg>(&s).unwrap_err()).contains("JSON object"));
        assert!(config::<Cfg>(&spec(serde_json::Value::Null, "{}")).is_ok());
    }

    #[test]
    fn credential_errors_never_show_values() {
        let secret = "SG.very-secret-value";
        for creds in [
            format!(r#"{{"api_key": 12345, "x": "{secret}"}}"#),
            format!(r#"{{"api_key": "{secret}", "port": "{secret}"}}"#),
            format!(r#"{{"api_key": ["{secret}"]}}"#),
            format!(r#"{{"api_key": "{secret}""#),
            format!(r#""{secret}""#),
        ] {
            let e = msg(credentials::<Creds>(&spec(serde_json::json!({}), &creds))
                .err()
                .unwrap());
            assert!(!e.contains("very-secret"), "{e}");
            assert!(!e.contains("12345"), "{e}");
            assert!(e.starts_with("provider p: credentials"), "{e}");
        }
        let e = msg(credentials::<Creds>(&spec(
            serde_json::json!({}),
            r#"{"api_key": "k", "port": "x"}"#,
        ))
        .err()
        .unwrap());
        assert!(e.contains("credentials.port: invalid value"), "{e}");
        let e = msg(credentials::<Creds>(&spec(serde_json::json!({}), "{}"))
            .err()
            .unwrap());
        assert!(e.contains("missing field `api_key`"), "{e}");
    }
}
