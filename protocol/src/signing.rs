//! Webhook signing and verification (PROTOCOL.md §3).
//!
//! Two schemes exist because receivers exist for both: [Standard Webhooks] is the default and
//! what new receivers verify; `hmac-sha256-hex` is the older `x-webhook-signature` some receivers
//! already check. A [`Keyring`] holds every secret that is active for one endpoint, newest first,
//! so that a secret can be rotated without a window in which deliveries fail verification.
//!
//! Everything here is total: any input yields a value or an error, never a panic, because the
//! verifying side runs on bytes and headers chosen by whoever reaches the ingest endpoint.
//!
//! [Standard Webhooks]: https://github.com/standard-webhooks/standard-webhooks

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

/// The prefix Standard Webhooks puts on a base64-encoded secret.
pub const STANDARD_SECRET_PREFIX: &str = "whsec_";

/// The only Standard Webhooks signature version this crate produces or accepts.
const STANDARD_VERSION: &str = "v1";

/// At most this many secrets may be active at once. Every delivery is signed with each of them
/// and the header grows with each, while a rotation needs only two or three.
pub const SECRETS_MAX: usize = 16;

/// The length of an HMAC-SHA256 tag, which is what every signature decodes to.
const TAG_LEN: usize = 32;

/// `v1,` plus 44 base64 characters plus the separating space.
const STANDARD_ENTRY_LEN: usize = 3 + 44 + 1;

/// Decodes base64 with or without trailing `=`: the official libraries accept unpadded secrets,
/// so a secret that works with a receiver must work here too.
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How the requests to one target are signed (the target's `signing` setting).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SigningScheme {
    /// `webhook-signature: v1,<base64>` over `"{id}.{timestamp}.{body}"`, keyed with the
    /// decoded bytes of a `whsec_` secret.
    #[default]
    StandardWebhooks,
    /// Additionally `x-webhook-signature: <hex>` over the body alone, keyed with the secret's
    /// UTF-8 bytes.
    HmacSha256Hex,
}

impl SigningScheme {
    pub const ALL: [SigningScheme; 2] = [
        SigningScheme::StandardWebhooks,
        SigningScheme::HmacSha256Hex,
    ];

    /// The name used in config files and logs, the same as the serde name.
    pub fn as_str(&self) -> &'static str {
        match self {
            SigningScheme::StandardWebhooks => "standard-webhooks",
            SigningScheme::HmacSha256Hex => "hmac-sha256-hex",
        }
    }
}

impl fmt::Display for SigningScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A secret env var that cannot become a [`Keyring`].
///
/// Variants name the offending secret by position, because the value itself must never reach
/// a log line.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SigningError {
    #[error("no signing secret is set")]
    Empty,
    #[error("secret {position} does not start with whsec_")]
    MissingPrefix {
        /// 1-based position of the secret in the whitespace-separated value.
        position: usize,
    },
    #[error("secret {position} is not valid base64 after the whsec_ prefix")]
    InvalidBase64 {
        /// 1-based position of the secret in the whitespace-separated value.
        position: usize,
    },
    #[error("secret {position} decodes to an empty key")]
    EmptyKey {
        /// 1-based position of the secret in the whitespace-separated value.
        position: usize,
    },
    #[error("secret {position} cannot be used as an hmac key")]
    InvalidKey {
        /// 1-based position of the secret in the whitespace-separated value.
        position: usize,
    },
    #[error("{n_secrets} secrets are set but at most {n_max} may be active at once")]
    TooManySecrets { n_secrets: usize, n_max: usize },
}

/// Why a signed request was rejected, kept apart so that a receiver's log tells a missing
/// header from a skewed clock or a replay from a wrong secret.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("a signature header is missing or empty")]
    MissingHeader,
    #[error("the webhook timestamp is not an integer number of seconds")]
    InvalidTimestamp,
    #[error("the webhook timestamp is older than the tolerance allows")]
    TimestampTooOld,
    #[error("the webhook timestamp is further in the future than the tolerance allows")]
    TimestampTooNew,
    #[error("no signature matches any active secret")]
    NoMatchingSignature,
}

/// The active secrets of one target or ingest endpoint (several while rotating), already decoded.
#[derive(Clone)]
pub struct Keyring {
    /// Decides how [`Keyring::parse`] turned the secrets into keys; kept so callers can tell
    /// whether to add `x-webhook-signature`.
    scheme: SigningScheme,
    /// One HMAC already keyed per secret, newest first, so signing clones instead of re-keying
    /// and cannot fail. Never empty: [`Keyring::parse`] refuses an empty value.
    macs: Vec<HmacSha256>,
}

impl fmt::Debug for Keyring {
    /// Shows the count only: key bytes are as sensitive as the secrets they came from.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("scheme", &self.scheme)
            .field("n_keys", &self.macs.len())
            .finish()
    }
}

impl Keyring {
    /// Parses the value of the secret env var: one secret or several separated by whitespace.
    ///
    /// `standard-webhooks`: each must be `whsec_<base64>` and the decoded bytes are the key.
    /// `hmac-sha256-hex`: each secret's UTF-8 bytes are the key. The first secret is the newest;
    /// it alone signs `x-webhook-signature`, whose format has room for one signature only.
    pub fn parse(scheme: SigningScheme, value: &Secret) -> Result<Keyring, SigningError> {
        let n_secrets = value.expose().split_whitespace().count();
        if n_secrets == 0 {
            return Err(SigningError::Empty);
        }
        if n_secrets > SECRETS_MAX {
            return Err(SigningError::TooManySecrets {
                n_secrets,
                n_max: SECRETS_MAX,
            });
        }
        let mut macs = Vec::with_capacity(n_secrets);
        for (index, secret) in value.expose().split_whitespace().enumerate() {
            let position = index + 1;
            let key = match scheme {
                SigningScheme::StandardWebhooks => {
                    let encoded = secret
                        .strip_prefix(STANDARD_SECRET_PREFIX)
                        .ok_or(SigningError::MissingPrefix { position })?;
                    let key = BASE64_LENIENT
                        .decode(encoded)
                        .map_err(|_| SigningError::InvalidBase64 { position })?;
                    if key.is_empty() {
                        return Err(SigningError::EmptyKey { position });
                    }
                    key
                }
                SigningScheme::HmacSha256Hex => secret.as_bytes().to_vec(),
            };
            // HMAC takes keys of any length, so this error cannot occur; it is mapped rather
            // than unwrapped to keep the crate free of panics.
            let mac = HmacSha256::new_from_slice(&key)
                .map_err(|_| SigningError::InvalidKey { position })?;
            macs.push(mac);
        }
        Ok(Keyring { scheme, macs })
    }

    pub fn scheme(&self) -> SigningScheme {
        self.scheme
    }

    pub fn len(&self) -> usize {
        self.macs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.macs.is_empty()
    }

    /// The `webhook-signature` value: one `v1,<base64>` per key, space-separated, so receivers
    /// that hold either the old or the new secret accept the delivery during a rotation.
    pub fn sign_standard(&self, msg_id: &str, timestamp_secs: i64, body: &[u8]) -> String {
        let timestamp = timestamp_secs.to_string();
        let mut header = String::with_capacity(self.macs.len() * STANDARD_ENTRY_LEN);
        for mac in &self.macs {
            if !header.is_empty() {
                header.push(' ');
            }
            header.push_str(STANDARD_VERSION);
            header.push(',');
            STANDARD.encode_string(standard_tag(mac, msg_id, &timestamp, body), &mut header);
        }
        header
    }

    /// The `x-webhook-signature` value, signed with the newest key only because that header
    /// carries a single signature. Receivers mid-rotation should verify with [`Keyring::verify_hex`],
    /// which accepts any key.
    pub fn sign_hex(&self, body: &[u8]) -> String {
        match self.macs.first() {
            Some(mac) => to_hex(&hex_tag(mac, body)),
            // Unreachable: parse refuses an empty keyring. An empty string fails every check.
            None => String::new(),
        }
    }

    /// Verifies Standard Webhooks headers.
    ///
    /// The timestamp is checked before any HMAC is computed so that a replayed request costs
    /// little. The signature is computed over the timestamp header exactly as received: what
    /// the sender signed is what it sent. Entries with another version than `v1` are skipped
    /// so that senders can add newer schemes beside `v1`. Every entry is compared with every
    /// key in constant time, without stopping at the first match, so timing reveals neither
    /// the expected tag nor which key matched.
    pub fn verify_standard(
        &self,
        msg_id: &str,
        timestamp: &str,
        signature_header: &str,
        body: &[u8],
        now_secs: i64,
        tolerance_secs: i64,
    ) -> Result<(), VerifyError> {
        if msg_id.is_empty() || timestamp.is_empty() || signature_header.trim().is_empty() {
            return Err(VerifyError::MissingHeader);
        }
        let timestamp_secs =
            parse_timestamp_secs(timestamp).ok_or(VerifyError::InvalidTimestamp)?;
        // i128 because the difference of two arbitrary i64 values overflows i64.
        let age_secs = i128::from(now_secs) - i128::from(timestamp_secs);
        if age_secs > i128::from(tolerance_secs) {
            return Err(VerifyError::TimestampTooOld);
        }
        if -age_secs > i128::from(tolerance_secs) {
            return Err(VerifyError::TimestampTooNew);
        }

        let expected: Vec<[u8; TAG_LEN]> = self
            .macs
            .iter()
            .map(|mac| standard_tag(mac, msg_id, timestamp, body))
            .collect();
        let mut matched = Choice::from(0);
        for entry in signature_header.split_ascii_whitespace() {
            let Some((version, encoded)) = entry.split_once(',') else {
                continue;
            };
            if version != STANDARD_VERSION {
                continue;
            }
            let Ok(presented) = BASE64_LENIENT.decode(encoded) else {
                continue;
            };
            for tag in &expected {
                matched |= tag.as_slice().ct_eq(presented.as_slice());
            }
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err(VerifyError::NoMatchingSignature)
        }
    }

    /// Verifies an `x-webhook-signature` (hex, either case) against every key, in constant
    /// time, so a receiver keeps accepting the old secret while senders move to the new one.
    pub fn verify_hex(&self, signature_hex: &str, body: &[u8]) -> Result<(), VerifyError> {
        if signature_hex.is_empty() {
            return Err(VerifyError::MissingHeader);
        }
        let presented = from_hex(signature_hex).ok_or(VerifyError::NoMatchingSignature)?;
        let mut matched = Choice::from(0);
        for mac in &self.macs {
            matched |= hex_tag(mac, body).as_slice().ct_eq(presented.as_slice());
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err(VerifyError::NoMatchingSignature)
        }
    }
}

/// HMAC over `"{msg_id}.{timestamp}.{body}"`, fed in pieces so the body is never copied.
fn standard_tag(mac: &HmacSha256, msg_id: &str, timestamp: &str, body: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = mac.clone();
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

fn hex_tag(mac: &HmacSha256, body: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = mac.clone();
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Accepts an optional `-` and ASCII digits only, because `i64::from_str` would also accept a
/// leading `+`, which no sender writes and which would let two headers mean the same second.
fn parse_timestamp_secs(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

/// Decodes exactly one tag's worth of hex; anything else cannot match, so it is `None`.
fn from_hex(hex: &str) -> Option<[u8; TAG_LEN]> {
    let bytes = hex.as_bytes();
    if bytes.len() != TAG_LEN * 2 {
        return None;
    }
    let mut tag = [0u8; TAG_LEN];
    for (byte, pair) in tag.iter_mut().zip(bytes.chunks_exact(2)) {
        *byte = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
    }
    Some(tag)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOX: &[u8] = b"The quick brown fox jumps over the lazy dog";
    const FOX_HEX: &str = "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8";

    fn keyring(scheme: SigningScheme, value: &str) -> Keyring {
        Keyring::parse(scheme, &Secret::new(value)).expect("test secrets are valid")
    }

    #[test]
    fn hex_matches_the_known_hmac_sha256_vector() {
        let keys = keyring(SigningScheme::HmacSha256Hex, "key");
        assert_eq!(keys.sign_hex(FOX), FOX_HEX);
        assert_eq!(keys.verify_hex(FOX_HEX, FOX), Ok(()));
        assert_eq!(keys.verify_hex(&FOX_HEX.to_uppercase(), FOX), Ok(()));
    }

    #[test]
    fn hex_rejects_what_does_not_match() {
        let keys = keyring(SigningScheme::HmacSha256Hex, "key");
        let flipped = format!("0{}", &FOX_HEX[1..]);
        let cases: [(&str, &[u8], VerifyError); 7] = [
            ("", FOX, VerifyError::MissingHeader),
            (&flipped, FOX, VerifyError::NoMatchingSignature),
            (
                FOX_HEX,
                b"The quick brown fox jumps over the lazy cog",
                VerifyError::NoMatchingSignature,
            ),
            (&FOX_HEX[..62], FOX, VerifyError::NoMatchingSignature),
            ("zz", FOX, VerifyError::NoMatchingSignature),
            ("é", FOX, VerifyError::NoMatchingSignature),
            (
                &format!("{}gg", &FOX_HEX[..62]),
                FOX,
                VerifyError::NoMatchingSignature,
            ),
        ];
        for (signature, body, error) in cases {
            assert_eq!(
                keys.verify_hex(signature, body),
                Err(error),
                "{signature:?}"
            );
        }
    }

    #[test]
    fn hex_signs_with_the_newest_key_and_verifies_with_any() {
        let keys = keyring(SigningScheme::HmacSha256Hex, "key  older-key\n");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.sign_hex(FOX), FOX_HEX);
        let older = keyring(SigningScheme::HmacSha256Hex, "older-key").sign_hex(FOX);
        assert_ne!(older, FOX_HEX);
        assert_eq!(keys.verify_hex(&older, FOX), Ok(()));
        assert_eq!(
            keyring(SigningScheme::HmacSha256Hex, "other").verify_hex(&older, FOX),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn hex_keys_are_the_utf8_bytes_even_when_they_look_like_standard_secrets() {
        let hex = keyring(SigningScheme::HmacSha256Hex, "whsec_a2V5");
        let standard = keyring(SigningScheme::StandardWebhooks, "whsec_a2V5");
        // "a2V5" is base64 for "key": only the standard scheme decodes it.
        assert_eq!(standard.sign_hex(FOX), FOX_HEX);
        assert_ne!(hex.sign_hex(FOX), FOX_HEX);
    }

    #[test]
    fn parse_rejects_bad_values_by_position() {
        let cases = [
            (SigningScheme::StandardWebhooks, "", SigningError::Empty),
            (
                SigningScheme::StandardWebhooks,
                " \t\n ",
                SigningError::Empty,
            ),
            (SigningScheme::HmacSha256Hex, "  ", SigningError::Empty),
            (
                SigningScheme::StandardWebhooks,
                "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                SigningError::MissingPrefix { position: 1 },
            ),
            (
                SigningScheme::StandardWebhooks,
                "whsec_a2V5 WHSEC_a2V5",
                SigningError::MissingPrefix { position: 2 },
            ),
            (
                SigningScheme::StandardWebhooks,
                "whsec_not*base64",
                SigningError::InvalidBase64 { position: 1 },
            ),
            (
                SigningScheme::StandardWebhooks,
                "whsec_a2V5 whsec_a",
                SigningError::InvalidBase64 { position: 2 },
            ),
            (
                SigningScheme::StandardWebhooks,
                "whsec_",
                SigningError::EmptyKey { position: 1 },
            ),
            (
                SigningScheme::StandardWebhooks,
                "whsec_a2V5 whsec_==",
                SigningError::InvalidBase64 { position: 2 },
            ),
        ];
        for (scheme, value, error) in cases {
            assert_eq!(
                Keyring::parse(scheme, &Secret::new(value)).map(|k| k.len()),
                Err(error),
                "{value:?}"
            );
        }
        let many = vec!["k"; SECRETS_MAX + 1].join(" ");
        assert_eq!(
            Keyring::parse(SigningScheme::HmacSha256Hex, &Secret::new(many)).map(|k| k.len()),
            Err(SigningError::TooManySecrets {
                n_secrets: SECRETS_MAX + 1,
                n_max: SECRETS_MAX
            })
        );
        let most = vec!["k"; SECRETS_MAX].join(" ");
        assert_eq!(
            keyring(SigningScheme::HmacSha256Hex, &most).len(),
            SECRETS_MAX
        );
    }

    #[test]
    fn parse_accepts_padded_and_unpadded_base64() {
        // 25 bytes need one '=' of padding; official libraries accept either form.
        let padded = keyring(
            SigningScheme::StandardWebhooks,
            "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGA==",
        );
        let unpadded = keyring(
            SigningScheme::StandardWebhooks,
            "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGA",
        );
        assert_eq!(padded.sign_hex(FOX), unpadded.sign_hex(FOX));
        assert_eq!(padded.scheme(), SigningScheme::StandardWebhooks);
        assert!(!padded.is_empty());
    }

    #[test]
    fn errors_and_debug_never_show_the_secret() {
        let value = "whsec_c3VwZXItc2VjcmV0LWtleQ== whsec_bm90LXNlY3JldC1hdC1hbGw*";
        let error = Keyring::parse(SigningScheme::StandardWebhooks, &Secret::new(value))
            .expect_err("the second secret is not base64");
        for shown in [error.to_string(), format!("{error:?}")] {
            assert!(
                !shown.contains("c3Vw") && !shown.contains("bm90"),
                "{shown}"
            );
        }
        for (scheme, value, needles) in [
            (
                SigningScheme::StandardWebhooks,
                "whsec_c3VwZXItc2VjcmV0LWtleQ== whsec_a2V5",
                ["c3Vw", "a2V5", "super"],
            ),
            (
                SigningScheme::HmacSha256Hex,
                "super-secret-key",
                ["super", "secret", "-key"],
            ),
        ] {
            let keys = keyring(scheme, value);
            let shown = format!("{keys:?} {keys:#?}");
            for needle in needles {
                assert!(!shown.contains(needle), "{needle} in {shown}");
            }
            assert!(
                shown.contains(&format!("n_keys: {}", keys.len())),
                "{shown}"
            );
        }
    }

    #[test]
    fn errors_are_lowercase_without_trailing_period() {
        let errors: Vec<String> = [
            SigningError::Empty,
            SigningError::MissingPrefix { position: 1 },
            SigningError::InvalidBase64 { position: 1 },
            SigningError::EmptyKey { position: 1 },
            SigningError::InvalidKey { position: 1 },
            SigningError::TooManySecrets {
                n_secrets: 17,
                n_max: 16,
            },
        ]
        .iter()
        .map(ToString::to_string)
        .chain(
            [
                VerifyError::MissingHeader,
                VerifyError::InvalidTimestamp,
                VerifyError::TimestampTooOld,
                VerifyError::TimestampTooNew,
                VerifyError::NoMatchingSignature,
            ]
            .iter()
            .map(ToString::to_string),
        )
        .collect();
        for message in errors {
            assert!(!message.ends_with('.'), "{message}");
            assert_eq!(message, message.to_lowercase(), "{message}");
        }
    }

    #[test]
    fn scheme_names_match_serde() {
        for scheme in SigningScheme::ALL {
            let json = serde_json::to_string(&scheme).expect("a unit variant always serializes");
            assert_eq!(json, format!("\"{}\"", scheme.as_str()));
            assert_eq!(scheme.to_string(), scheme.as_str());
            let back: SigningScheme = serde_json::from_str(&json).expect("own output parses");
            assert_eq!(back, scheme);
        }
        assert_eq!(SigningScheme::default(), SigningScheme::StandardWebhooks);
        assert!(serde_json::from_str::<SigningScheme>("\"standard_webhooks\"").is_err());
    }

    #[test]
    fn timestamps_must_be_plain_integers() {
        let keys = keyring(SigningScheme::StandardWebhooks, "whsec_a2V5");
        let signature = keys.sign_standard("msg", 1_700_000_000, b"{}");
        assert_eq!(
            keys.verify_standard("msg", "1700000000", &signature, b"{}", 1_700_000_000, 300),
            Ok(())
        );
        for timestamp in [
            "+1700000000",
            " 1700000000",
            "1700000000 ",
            "1700000000.0",
            "-",
            "1e9",
            "٣",
            "99999999999999999999",
        ] {
            assert_eq!(
                keys.verify_standard("msg", timestamp, &signature, b"{}", 1_700_000_000, 300),
                Err(VerifyError::InvalidTimestamp),
                "{timestamp:?}"
            );
        }
    }

    #[test]
    fn missing_headers_are_reported_before_anything_else() {
        let keys = keyring(SigningScheme::StandardWebhooks, "whsec_a2V5");
        let signature = keys.sign_standard("msg", 10, b"");
        for (msg_id, timestamp, header) in [
            ("", "10", signature.as_str()),
            ("msg", "", &signature),
            ("msg", "10", ""),
            ("msg", "10", "  "),
        ] {
            assert_eq!(
                keys.verify_standard(msg_id, timestamp, header, b"", 10, 300),
                Err(VerifyError::MissingHeader)
            );
        }
    }

    #[test]
    fn tolerance_is_inclusive_and_extreme_values_do_not_overflow() {
        let keys = keyring(SigningScheme::StandardWebhooks, "whsec_a2V5");
        let check = |timestamp_secs: i64, now_secs: i64, tolerance_secs: i64| {
            let signature = keys.sign_standard("msg", timestamp_secs, b"");
            keys.verify_standard(
                "msg",
                &timestamp_secs.to_string(),
                &signature,
                b"",
                now_secs,
                tolerance_secs,
            )
        };
        assert_eq!(check(1000, 1300, 300), Ok(()));
        assert_eq!(check(1000, 700, 300), Ok(()));
        assert_eq!(check(1000, 1301, 300), Err(VerifyError::TimestampTooOld));
        assert_eq!(check(1000, 699, 300), Err(VerifyError::TimestampTooNew));
        assert_eq!(
            check(i64::MIN, i64::MAX, i64::MAX),
            Err(VerifyError::TimestampTooOld)
        );
        assert_eq!(
            check(i64::MAX, i64::MIN, i64::MAX),
            Err(VerifyError::TimestampTooNew)
        );
        assert_eq!(check(i64::MAX, i64::MAX, 0), Ok(()));
        assert_eq!(
            check(i64::MIN, i64::MIN, i64::MIN),
            Err(VerifyError::TimestampTooOld)
        );
        assert_eq!(check(0, 0, -1), Err(VerifyError::TimestampTooOld));
    }

    #[test]
    fn foreign_versions_and_garbage_entries_are_skipped() {
        let keys = keyring(SigningScheme::StandardWebhooks, "whsec_a2V5");
        let valid = keys.sign_standard("msg", 10, b"body");
        let (_, tag) = valid.split_once(',').expect("a v1 signature has a comma");
        let verify = |header: &str| keys.verify_standard("msg", "10", header, b"body", 10, 300);
        assert_eq!(
            verify(&format!("v2,{tag} nocomma v1,*** ,, v1, {valid}")),
            Ok(())
        );
        assert_eq!(
            verify(&format!("v2,{tag}")),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            verify(&format!("V1,{tag}")),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(verify(tag), Err(VerifyError::NoMatchingSignature));
        assert_eq!(verify(&format!("v1,{}", tag.trim_end_matches('='))), Ok(()));
        assert_eq!(
            verify(&format!("v1,{}", &tag[..20])),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn sign_standard_has_one_entry_per_key_newest_first() {
        let both = keyring(SigningScheme::StandardWebhooks, "whsec_bmV3 whsec_b2xk");
        let newest =
            keyring(SigningScheme::StandardWebhooks, "whsec_bmV3").sign_standard("id", 5, b"x");
        let oldest =
            keyring(SigningScheme::StandardWebhooks, "whsec_b2xk").sign_standard("id", 5, b"x");
        assert_eq!(
            both.sign_standard("id", 5, b"x"),
            format!("{newest} {oldest}")
        );
    }
}
