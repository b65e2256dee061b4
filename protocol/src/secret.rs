//! A string that never prints itself.
//!
//! Signing secrets travel from the environment through config structs that are logged with
//! `{:?}`, serialized for diagnostics and carried in error contexts. Wrapping them in [`Secret`]
//! makes every one of those paths print [`REDACTED`] instead, so leaking the value takes a
//! deliberate call to [`Secret::expose`].

use std::fmt;

use serde::{Serialize, Serializer};

/// What a [`Secret`] prints, serializes as and shows in debug output.
pub const REDACTED: &str = "[redacted]";

/// A secret string whose `Debug` and `Display` print `[redacted]`.
///
/// The derived `PartialEq` is not constant-time; it exists so that configs holding a secret can
/// be compared in tests, never to check a secret presented by a peer.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The one way to reach the value, named so that every use stands out in review.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Serializes as `"[redacted]"` so that dumping a config (for `--print-config` or a diagnostic
/// endpoint) shows that a secret is set without showing what it is.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUE: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn formatting_never_shows_the_value() {
        let secret = Secret::new(VALUE);
        for shown in [
            format!("{secret:?}"),
            format!("{secret:#?}"),
            format!("{secret}"),
            format!("{:?}", Some(&secret)),
            format!("{:?}", vec![secret.clone()]),
        ] {
            assert!(!shown.contains("MfKQ"), "secret leaked: {shown}");
            assert!(shown.contains(REDACTED), "{shown}");
        }
        assert_eq!(format!("{secret:?}"), REDACTED);
        assert_eq!(secret.to_string(), REDACTED);
    }

    #[test]
    fn serializes_as_redacted() {
        let json = serde_json::to_string(&Secret::new(VALUE)).expect("a string always serializes");
        assert_eq!(json, "\"[redacted]\"");
    }

    #[test]
    fn expose_returns_the_value() {
        let secret = Secret::new(String::from(VALUE));
        assert_eq!(secret.expose(), VALUE);
        assert_eq!(secret, Secret::new(VALUE));
        assert_ne!(secret, Secret::new("other"));
    }
}
