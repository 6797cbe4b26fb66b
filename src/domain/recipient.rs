//! Recipient addresses, parsed once at the edge.

use serde::{Deserialize, Serialize};

/// A syntactically valid email address (RFC 5321 limits: 254 octets total,
/// 64 octets local part), stored as given.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EmailAddress(String);

/// A phone number in E.164 form: `+` then 8 to 15 digits, first digit not 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PhoneNumber(String);

/// An absolute `http` or `https` URL with a host and no credentials: the
/// text as given and its parse (kept, so a send does not parse it again).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WebhookUrl(String, url::Url);

/// Why an address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AddressError(pub String);

impl EmailAddress {
    /// Parses an email address; the error says why it is not one (without echoing it).
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        recipient_impl::parse_email(s).map(EmailAddress)
    }
    /// The value as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl PhoneNumber {
    /// Parses an E.164 phone number; the error says why it is not one (without echoing it).
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        recipient_impl::parse_phone(s).map(PhoneNumber)
    }
    /// The value as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl WebhookUrl {
    /// Parses a webhook url; the error says why it is not one (without echoing it).
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        recipient_impl::parse_url(s).map(|u| WebhookUrl(s.to_string(), u))
    }
    /// The value as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The parsed URL (what a request is sent to).
    pub fn url(&self) -> &url::Url {
        &self.1
    }
}

macro_rules! string_newtype_impls {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = AddressError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                <$t>::parse(&s)
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_newtype_impls!(EmailAddress);
string_newtype_impls!(PhoneNumber);
string_newtype_impls!(WebhookUrl);

/// One recipient. Which address is required depends on the channel
/// (email → `email`, sms → `phone`, webhook → `url`, push → `device_tokens`,
/// in_app → `user_id`); the decoder enforces that.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recipient {
    /// The producer's user id: preferences, frequency caps, in-app inbox.
    pub user_id: Option<String>,
    /// Address for the email channel.
    pub email: Option<EmailAddress>,
    /// Address for the sms channel.
    pub phone: Option<PhoneNumber>,
    /// Address for the webhook channel.
    pub url: Option<WebhookUrl>,
    /// Addresses for the push channel (one notification goes to all).
    #[serde(default)]
    pub device_tokens: Vec<String>,
    /// Preferred locale (`pt-BR`) for template resolution.
    pub locale: Option<String>,
    /// IANA time zone (`Europe/Berlin`) for quiet hours.
    pub timezone: Option<String>,
}

mod recipient_impl {
    use super::AddressError;

    pub(super) fn parse_email(s: &str) -> Result<String, AddressError> {
        let err = |m: &str| Err(AddressError(format!("invalid email address: {m}")));
        if s.len() > 254 {
            return err("longer than 254 characters");
        }
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return err("contains whitespace or control characters");
        }
        let Some((local, domain)) = s.rsplit_once('@') else {
            return err("missing '@'");
        };
        if local.is_empty() || local.len() > 64 {
            return err("local part empty or longer than 64 characters");
        }
        if local.contains('@')
            || local.starts_with('.')
            || local.ends_with('.')
            || local.contains("..")
        {
            return err("malformed local part");
        }
        if local.chars().any(|c| "()<>,;:\\\"[]".contains(c)) {
            return err("local part contains special characters");
        }
        if domain.is_empty() || domain.len() > 253 {
            return err("domain empty or too long");
        }
        for label in domain.split('.') {
            if label.is_empty() || label.len() > 63 {
                return err("malformed domain");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return err("malformed domain label");
            }
            if !label.chars().all(|c| c.is_alphanumeric() || c == '-') {
                return err("domain contains invalid characters");
            }
        }
        Ok(s.to_string())
    }

    pub(super) fn parse_phone(s: &str) -> Result<String, AddressError> {
        let digits = s.strip_prefix('+').ok_or_else(|| {
            AddressError("invalid phone number: E.164 form starts with '+'".into())
        })?;
        if !(8..=15).contains(&digits.len())
            || !digits.chars().all(|c| c.is_ascii_digit())
            || digits.starts_with('0')
        {
            return Err(AddressError(
                "invalid phone number: E.164 needs 8 to 15 digits after '+', not starting with 0"
                    .into(),
            ));
        }
        Ok(s.to_string())
    }

    pub(super) fn parse_url(s: &str) -> Result<url::Url, AddressError> {
        let err = |m: &str| Err(AddressError(format!("invalid url: {m}")));
        if s.len() > 2048 {
            return err("longer than 2048 characters");
        }
        let u = match url::Url::parse(s) {
            Ok(u) => u,
            Err(e) => return Err(AddressError(format!("invalid url: {e}"))),
        };
        if u.scheme() != "http" && u.scheme() != "https" {
            return err("scheme must be http or https");
        }
        if u.host_str().is_none_or(str::is_empty) {
            return err("missing host");
        }
        if !u.username().is_empty() || u.password().is_some() {
            return err("credentials in the url are not allowed");
        }
        Ok(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert!(EmailAddress::parse("a@example.com").is_ok());
        assert!(EmailAddress::parse("first.last+tag@sub.example.co").is_ok());
        for bad in [
            "",
            "a",
            "@x.com",
            "a@",
            "a@@b.com",
            "a b@x.com",
            "a@x..com",
            "a@-x.com",
            "a\r\n@x.com",
            ".a@x.com",
        ] {
            assert!(
                EmailAddress::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
        let long = format!("{}@x.com", "a".repeat(65));
        assert!(EmailAddress::parse(&long).is_err());
    }

    #[test]
    fn phones() {
        assert!(PhoneNumber::parse("+14155550123").is_ok());
        for bad in [
            "14155550123",
            "+0123456789",
            "+1234",
            "+1415555012a",
            "+1234567890123456",
        ] {
            assert!(
                PhoneNumber::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn urls() {
        assert!(WebhookUrl::parse("https://hooks.example.com/x?y=1").is_ok());
        assert!(WebhookUrl::parse("http://127.0.0.1:8080/hook").is_ok());
        for bad in [
            "ftp://x.com",
            "not a url",
            "https://user:pw@x.com/",
            "mailto:a@b.c",
        ] {
            assert!(
                WebhookUrl::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}
