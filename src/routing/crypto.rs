//! Provider credentials at rest: AES-256-GCM with the key from
//! `[providers] encryption_key` (32 bytes, base64).
//!
//! A stored value is `nonce (12 bytes) || ciphertext || tag (16 bytes)`, with
//! a fresh random nonce per encryption and the provider's name as associated
//! data: a ciphertext copied onto another provider's row does not decrypt.
//! Errors never carry plaintext or key material.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::config::ProviderSettings;

/// Length of the key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of the random nonce stored in front of the ciphertext.
pub const NONCE_LEN: usize = 12;
/// Length of the authentication tag at the end.
pub const TAG_LEN: usize = 16;

/// Why credentials could not be encrypted or decrypted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// No key is configured, so credentials can be neither stored nor read.
    #[error(
        "providers.encryption_key is not set: credentials cannot be stored or read \
         (generate a key with `herald providers keygen`)"
    )]
    MissingKey,
    /// The configured key is not base64 of exactly 32 bytes.
    #[error("providers.encryption_key is invalid: {0}")]
    BadKey(String),
    /// Wrong key, a value that was altered, or one that belongs to another
    /// provider (the name is bound to it).
    #[error(
        "credentials could not be decrypted (encrypted with another key, altered, \
         or copied from another provider)"
    )]
    Decrypt,
    /// The cipher refused to encrypt (only on absurd input sizes).
    #[error("credentials could not be encrypted")]
    Encrypt,
}

/// Encrypts and decrypts provider credentials. Holds the key (or knows it
/// has none). `Debug` shows only the key id.
#[derive(Clone)]
pub struct Cipher {
    key: Option<Key>,
}

#[derive(Clone)]
struct Key {
    aead: Aes256Gcm,
    /// First 8 hex digits of SHA-256 of the key: which key encrypted a value.
    id: String,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cipher")
            .field("key_id", &self.key_id())
            .finish()
    }
}

/// An encrypted value and the id of the key that encrypted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// `nonce || ciphertext || tag`.
    pub bytes: Vec<u8>,
    pub key_id: String,
}

impl Cipher {
    /// The cipher of `[providers]`: with the configured key, or without one
    /// when `encryption_key` is unset. A key that is not base64 of 32 bytes
    /// is an error.
    pub fn from_settings(settings: &ProviderSettings) -> Result<Cipher, CryptoError> {
        match &settings.encryption_key {
            Some(k) => Cipher::from_base64(k.expose_secret()),
            None => Ok(Cipher::without_key()),
        }
    }

    /// A cipher without a key: encrypting and decrypting fail with
    /// [`CryptoError::MissingKey`].
    pub fn without_key() -> Cipher {
        Cipher { key: None }
    }

    /// A cipher with the key given as base64 (standard or URL-safe alphabet,
    /// padding optional, surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<Cipher, CryptoError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(CryptoError::BadKey("it is empty".into()));
        }
        let engines = [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        let bytes = engines
            .iter()
            .find_map(|e| e.decode(text).ok())
            .ok_or_else(|| CryptoError::BadKey("it is not base64".into()))?;
        Cipher::from_bytes(&bytes)
    }

    /// A cipher with a raw 32-byte key.
    pub fn from_bytes(key: &[u8]) -> Result<Cipher, CryptoError> {
        if key.len() != KEY_LEN {
            return Err(CryptoError::BadKey(format!(
                "it decodes to {} bytes; it must be {KEY_LEN} (base64 of 32 random bytes, \
                 see `herald providers keygen`)",
                key.len()
            )));
        }
        let aead = Aes256Gcm::new_from_slice(key)
            .map_err(|_| CryptoError::BadKey(format!("it must be {KEY_LEN} bytes")))?;
        let digest = Sha256::digest(key);
        let id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Cipher {
            key: Some(Key { aead, id }),
        })
    }

    /// Whether a key is configured.
    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    /// The id of the configured key (first 8 hex digits of its SHA-256).
    pub fn key_id(&self) -> Option<&str> {
        self.key.as_ref().map(|k| k.id.as_str())
    }

    /// Encrypts `plaintext` for the provider called `name`.
    pub fn encrypt(&self, name: &str, plaintext: &[u8]) -> Result<Sealed, CryptoError> {
        let key = self.key.as_ref().ok_or(CryptoError::MissingKey)?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = key
            .aead
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Encrypt)?;
        let mut bytes = Vec::with_capacity(NONCE_LEN + sealed.len());
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&sealed);
        Ok(Sealed {
            bytes,
            key_id: key.id.clone(),
        })
    }

    /// Decrypts a value [`encrypt`](Self::encrypt)ed for `name`.
    pub fn decrypt(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let key = self.key.as_ref().ok_or(CryptoError::MissingKey)?;
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        key.aead
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Decrypt)
    }

    /// Encrypts credential text (a JSON object) for `name`.
    pub fn seal_text(&self, name: &str, text: &SecretString) -> Result<Sealed, CryptoError> {
        self.encrypt(name, text.expose_secret().as_bytes())
    }

    /// Decrypts credential text for `name`. A value that is not UTF-8 is a
    /// decryption failure (it was not written by [`seal_text`](Self::seal_text)).
    pub fn open_text(&self, name: &str, sealed: &[u8]) -> Result<SecretString, CryptoError> {
        let bytes = self.decrypt(name, sealed)?;
        String::from_utf8(bytes)
            .map(SecretString::from)
            .map_err(|_| CryptoError::Decrypt)
    }
}

/// A new random key, base64 (standard alphabet), for
/// `[providers] encryption_key`: what `herald providers keygen` prints.
pub fn generate_key() -> String {
    let mut key = [0u8; KEY_LEN];
    rand::rng().fill_bytes(&mut key);
    base64::engine::general_purpose::STANDARD.encode(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> Cipher {
        Cipher::from_base64(&generate_key()).unwrap()
    }

    #[test]
    fn round_trip() {
        let c = cipher();
        let secret = br#"{"api_key":"SG.very-secret"}"#;
        let sealed = c.encrypt("sendgrid-main", secret).unwrap();
        assert_eq!(sealed.bytes.len(), NONCE_LEN + secret.len() + TAG_LEN);
        assert_eq!(sealed.key_id, c.key_id().unwrap());
        assert!(
            !sealed
                .bytes
                .windows(secret.len())
                .any(|w| w == secret.as_slice())
        );
        assert_eq!(c.decrypt("sendgrid-main", &sealed.bytes).unwrap(), secret);
        let text = c
            .open_text(
                "sendgrid-main",
                &c.seal_text("sendgrid-main", &SecretString::from("{}"))
                    .unwrap()
                    .bytes,
            )
            .unwrap();
        assert_eq!(text.expose_secret(), "{}");
    }

    #[test]
    fn every_encryption_uses_a_new_nonce() {
        let c = cipher();
        let a = c.encrypt("p", b"same").unwrap();
        let b = c.encrypt("p", b"same").unwrap();
        assert_ne!(a.bytes[..NONCE_LEN], b.bytes[..NONCE_LEN]);
        assert_ne!(a.bytes, b.bytes);
    }

    #[test]
    fn wrong_key_fails() {
        let sealed = cipher().encrypt("p", b"secret").unwrap();
        assert_eq!(
            cipher().decrypt("p", &sealed.bytes),
            Err(CryptoError::Decrypt)
        );
    }

    #[test]
    fn tampering_fails() {
        let c = cipher();
        let sealed = c.encrypt("p", b"secret").unwrap().bytes;
        for i in [0, NONCE_LEN, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert_eq!(c.decrypt("p", &bad), Err(CryptoError::Decrypt), "byte {i}");
        }
        assert_eq!(
            c.decrypt("p", &sealed[..sealed.len() - 1]),
            Err(CryptoError::Decrypt)
        );
        assert_eq!(c.decrypt("p", &sealed[..5]), Err(CryptoError::Decrypt));
        assert_eq!(c.decrypt("p", &[]), Err(CryptoError::Decrypt));
    }

    #[test]
    fn the_name_is_bound_to_the_ciphertext() {
        let c = cipher();
        let sealed = c.encrypt("twilio-a", b"token").unwrap();
        assert_eq!(
            c.decrypt("twilio-b", &sealed.bytes),
            Err(CryptoError::Decrypt)
        );
        assert_eq!(c.decrypt("twilio-a", &sealed.bytes).unwrap(), b"token");
    }

    #[test]
    fn key_parsing() {
        let key = generate_key();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&key)
                .unwrap()
                .len(),
            KEY_LEN
        );
        let c = Cipher::from_base64(&format!("  {key}\n")).unwrap();
        // URL-safe and unpadded spellings of the same key are the same key.
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&key)
            .unwrap();
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        let same = Cipher::from_base64(&url).unwrap();
        assert_eq!(same.key_id(), c.key_id());
        let sealed = c.encrypt("p", b"x").unwrap();
        assert_eq!(same.decrypt("p", &sealed.bytes).unwrap(), b"x");
        // The key id is the first 8 hex digits of SHA-256 of the raw key.
        let digest = Sha256::digest(&raw);
        let want: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(c.key_id(), Some(want.as_str()));

        for (bad, says) in [
            ("", "empty"),
            ("not base64!!", "not base64"),
            ("c2hvcnQ=", "decodes to 5 bytes"),
        ] {
            match Cipher::from_base64(bad) {
                Err(CryptoError::BadKey(m)) => assert!(m.contains(says), "{bad:?}: {m}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let long = base64::engine::general_purpose::STANDARD.encode([7u8; 33]);
        assert!(matches!(
            Cipher::from_base64(&long),
            Err(CryptoError::BadKey(_))
        ));
    }

    #[test]
    fn without_a_key_nothing_is_encrypted_or_decrypted() {
        let c = Cipher::without_key();
        assert!(!c.has_key());
        assert_eq!(c.encrypt("p", b"x"), Err(CryptoError::MissingKey));
        assert_eq!(c.decrypt("p", &[0; 40]), Err(CryptoError::MissingKey));
        let settings = ProviderSettings {
            encryption_key: None,
            refresh_ms: 1000,
        };
        assert!(!Cipher::from_settings(&settings).unwrap().has_key());
        let settings = ProviderSettings {
            encryption_key: Some(SecretString::from("c2hvcnQ=")),
            refresh_ms: 1000,
        };
        assert!(Cipher::from_settings(&settings).is_err());
    }

    #[test]
    fn errors_and_debug_carry_no_secrets() {
        let key = generate_key();
        let c = Cipher::from_base64(&key).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains(&key), "{debug}");
        assert!(debug.contains(c.key_id().unwrap()));
        let sealed = c.encrypt("p", b"hunter2").unwrap();
        let err = cipher().decrypt("p", &sealed.bytes).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
        let short = base64::engine::general_purpose::STANDARD.encode(b"hunter2-key");
        let err = Cipher::from_base64(&short).unwrap_err().to_string();
        assert!(!err.contains(&short) && !err.contains("hunter2"), "{err}");
    }
}
