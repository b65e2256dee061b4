//! Durations in configuration: `"250ms"`, `"5s"`, `"10m"`, `"48h"`.

use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serializer};

/// Parses a human duration; the error says what a valid one looks like.
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|error| {
        format!("invalid duration {text:?} ({error}): expected a number and a unit, like \"250ms\", \"5s\", \"10m\" or \"48h\"")
    })
}

pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&humantime::format_duration(*value).to_string())
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse("48h"), Ok(Duration::from_secs(48 * 3600)));
        assert!(parse("10 parsecs").is_err());
        assert!(parse("").is_err());
    }
}
