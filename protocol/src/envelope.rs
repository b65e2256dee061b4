//! The event envelope of PROTOCOL.md §1 and its validation into the reasons of §4.
//!
//! Parsing never panics: any byte string yields either an [`Envelope`] or a [`BadEvent`] whose
//! [`BadEvent::reason`] is the machine-readable code stored with the dead letter.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The default size limit of one message (`nats.max_message_bytes`).
pub const MAX_MESSAGE_BYTES_DEFAULT: usize = 64 * 1024;

/// The longest event id the protocol allows.
pub const EVENT_ID_LEN_MAX: usize = 128;

/// Which application a change comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    BetterAuth,
    Payload,
}

impl Origin {
    pub const ALL: [Origin; 2] = [Origin::BetterAuth, Origin::Payload];

    pub fn as_str(self) -> &'static str {
        match self {
            Origin::BetterAuth => "better-auth",
            Origin::Payload => "payload",
        }
    }

    /// The side a change from `self` is synced to.
    pub fn other(self) -> Origin {
        match self {
            Origin::BetterAuth => Origin::Payload,
            Origin::Payload => Origin::BetterAuth,
        }
    }

    pub fn parse(s: &str) -> Option<Origin> {
        match s {
            "better-auth" => Some(Origin::BetterAuth),
            "payload" => Some(Origin::Payload),
            _ => None,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of event: a change an application reports, or a resync request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "user.created")]
    Created,
    #[serde(rename = "user.updated")]
    Updated,
    #[serde(rename = "user.deleted")]
    Deleted,
    /// Not a change: asks the engine to send its canonical user to the other side than the
    /// request's origin, whatever it believes that side holds (docs/PROTOCOL.md §1, *Resync
    /// requests*). Never delivered as such: the side gets a `user.updated`, or a
    /// `user.deleted`.
    #[serde(rename = "user.resync")]
    Resync,
}

impl EventType {
    pub const ALL: [EventType; 4] = [
        EventType::Created,
        EventType::Updated,
        EventType::Deleted,
        EventType::Resync,
    ];

    /// Its subject token: `created`, `updated`, `deleted` or `resync` (PROTOCOL.md §1).
    pub fn verb(self) -> &'static str {
        self.as_str().trim_start_matches("user.")
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Created => "user.created",
            EventType::Updated => "user.updated",
            EventType::Deleted => "user.deleted",
            EventType::Resync => "user.resync",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        match s {
            "user.created" => Some(EventType::Created),
            "user.updated" => Some(EventType::Updated),
            "user.deleted" => Some(EventType::Deleted),
            "user.resync" => Some(EventType::Resync),
            _ => None,
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message is a bad event (§4). `Display` gives the machine-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BadEvent {
    InvalidJson,
    MissingField(String),
    InvalidField(String),
    UnknownType,
    UnknownOrigin,
    TooLarge,
    /// A user id that is not a usable key: longer than [`crate::user::USER_ID_BYTES_MAX`], or
    /// holding a control character (NUL, CR, LF...).
    InvalidUserId,
}

impl BadEvent {
    /// The reason code stored with the dead letter, e.g. `missing_field:id`.
    pub fn reason(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for BadEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadEvent::InvalidJson => f.write_str("invalid_json"),
            BadEvent::MissingField(name) => write!(f, "missing_field:{name}"),
            BadEvent::InvalidField(name) => write!(f, "invalid_field:{name}"),
            BadEvent::UnknownType => f.write_str("unknown_type"),
            BadEvent::UnknownOrigin => f.write_str("unknown_origin"),
            BadEvent::TooLarge => f.write_str("too_large"),
            BadEvent::InvalidUserId => f.write_str("invalid_user_id"),
        }
    }
}

impl std::error::Error for BadEvent {}

/// One change event, as published by an application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per change; the deduplication key.
    pub id: String,
    pub origin: Origin,
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// Milliseconds since the epoch at which the change committed at its origin.
    pub timestamp: i64,
    /// The user as the origin names its fields; unknown fields are kept.
    pub data: Map<String, Value>,
}

/// The top level of a message as sent: each member absent, `null` (both `None`) or any value,
/// so that [`Envelope::parse`] can name exactly what is wrong.
#[derive(Deserialize)]
struct RawEnvelope {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    origin: Option<Value>,
    #[serde(default, rename = "type")]
    kind: Option<Value>,
    #[serde(default)]
    timestamp: Option<Value>,
    #[serde(default)]
    data: Option<Value>,
}

impl Envelope {
    /// Validates `bytes` against §1. Checks run in a fixed order (size, JSON, then `id`,
    /// `origin`, `type`, `timestamp`, `data`) so one message always gets the same reason.
    pub fn parse(bytes: &[u8], max_bytes: usize) -> Result<Envelope, BadEvent> {
        if bytes.len() > max_bytes {
            return Err(BadEvent::TooLarge);
        }
        // Straight into the five known members (others are ignored), without building a map
        // of the whole object first: this runs for every message. A derived struct would also
        // take a JSON array, which is not an envelope.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(BadEvent::InvalidJson);
        }
        let object: RawEnvelope =
            serde_json::from_slice(bytes).map_err(|_| BadEvent::InvalidJson)?;

        let id = match object.id {
            None => return Err(BadEvent::MissingField("id".into())),
            Some(Value::String(id)) if is_valid_event_id(&id) => id,
            Some(_) => return Err(BadEvent::InvalidField("id".into())),
        };
        let origin = match object.origin {
            None => return Err(BadEvent::MissingField("origin".into())),
            Some(Value::String(s)) => Origin::parse(&s).ok_or(BadEvent::UnknownOrigin)?,
            Some(_) => return Err(BadEvent::InvalidField("origin".into())),
        };
        let event_type = match object.kind {
            None => return Err(BadEvent::MissingField("type".into())),
            Some(Value::String(s)) => EventType::parse(&s).ok_or(BadEvent::UnknownType)?,
            Some(_) => return Err(BadEvent::InvalidField("type".into())),
        };
        let timestamp = match object.timestamp {
            None => return Err(BadEvent::MissingField("timestamp".into())),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(ms) if ms >= 0 => ms,
                _ => return Err(BadEvent::InvalidField("timestamp".into())),
            },
            Some(_) => return Err(BadEvent::InvalidField("timestamp".into())),
        };
        let data = match object.data {
            None => return Err(BadEvent::MissingField("data".into())),
            Some(Value::Object(data)) => data,
            Some(_) => return Err(BadEvent::InvalidField("data".into())),
        };
        Ok(Envelope {
            id,
            origin,
            event_type,
            timestamp,
            data,
        })
    }

    /// The canonical JSON encoding, as the engine publishes and delivers it.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing a struct of strings, integers and JSON values cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The id a replayed dead letter is published under: a new event id, so that neither the
/// dedup memory nor a receiver's idempotency skips it, and so that every delivery it causes
/// gets an id no earlier attempt used. Stays within [`EVENT_ID_LEN_MAX`].
pub fn replay_id(id: &str, replay: u64) -> String {
    let suffix = format!(":replay-{replay}");
    let keep = EVENT_ID_LEN_MAX.saturating_sub(suffix.len()).min(id.len());
    format!("{}{suffix}", &id[..keep])
}

/// `raw` with its top-level `id` replaced, when it is a JSON object with a string id;
/// `None` otherwise (a bad message is replayed byte for byte).
pub fn with_id(raw: &[u8], id: &str) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(raw).ok()?;
    let object = value.as_object_mut()?;
    if !object.get("id")?.is_string() {
        return None;
    }
    object.insert("id".into(), Value::String(id.to_string()));
    serde_json::to_vec(&value).ok()
}

/// `A-Za-z0-9_:-`, 1 to 128 characters: no `.`, because Standard Webhooks signs
/// `{id}.{timestamp}.{body}` and a dot in the id would make that ambiguous.
pub fn is_valid_event_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= EVENT_ID_LEN_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(json: &str) -> String {
        match Envelope::parse(json.as_bytes(), MAX_MESSAGE_BYTES_DEFAULT) {
            Ok(_) => "ok".into(),
            Err(bad) => bad.reason(),
        }
    }

    #[test]
    fn reasons_of_section_4() {
        let good = r#"{"id":"e1","origin":"better-auth","type":"user.updated","timestamp":1,"data":{"id":"u1","email":"a@b.c"}}"#;
        let cases = [
            (good, "ok"),
            ("not json", "invalid_json"),
            ("[1,2]", "invalid_json"),
            ("\u{0}", "invalid_json"),
            (
                r#"{"origin":"payload","type":"user.created","timestamp":1,"data":{}}"#,
                "missing_field:id",
            ),
            (
                r#"{"id":"a.b","origin":"payload","type":"user.created","timestamp":1,"data":{}}"#,
                "invalid_field:id",
            ),
            (
                r#"{"id":"","origin":"payload","type":"user.created","timestamp":1,"data":{}}"#,
                "invalid_field:id",
            ),
            (
                r#"{"id":7,"origin":"payload","type":"user.created","timestamp":1,"data":{}}"#,
                "invalid_field:id",
            ),
            (
                r#"{"id":"e","type":"user.created","timestamp":1,"data":{}}"#,
                "missing_field:origin",
            ),
            (
                r#"{"id":"e","origin":"auth0","type":"user.created","timestamp":1,"data":{}}"#,
                "unknown_origin",
            ),
            (
                r#"{"id":"e","origin":3,"type":"user.created","timestamp":1,"data":{}}"#,
                "invalid_field:origin",
            ),
            (
                r#"{"id":"e","origin":"payload","timestamp":1,"data":{}}"#,
                "missing_field:type",
            ),
            (
                r#"{"id":"e","origin":"payload","type":"user.renamed","timestamp":1,"data":{}}"#,
                "unknown_type",
            ),
            (
                r#"{"id":"e","origin":"payload","type":"user.created","data":{}}"#,
                "missing_field:timestamp",
            ),
            (
                r#"{"id":"e","origin":"payload","type":"user.created","timestamp":"1","data":{}}"#,
                "invalid_field:timestamp",
            ),
            (
                r#"{"id":"e","origin":"payload","type":"user.created","timestamp":1.5,"data":{}}"#,
                "invalid_field:timestamp",
            ),
            (
                r#"{"id":"e","origin":"payload","type":"user.created","timestamp":-1,"data":{}}"#,
                "invalid_field:timestamp",
            ),
            (
                r#"{"id":"e","origin":"payload","type":"user.created","timestamp":1}"#,
                "missing_field:data",
            ),
            (
                r#"{"id":"e","origin":"payload","type":"user.created","timestamp":1,"data":[]}"#,
                "invalid_field:data",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(reason(input), expected, "input: {input}");
        }
    }

    #[test]
    fn too_large_is_checked_before_anything_else() {
        let body = vec![b'x'; 100];
        assert_eq!(Envelope::parse(&body, 99), Err(BadEvent::TooLarge));
        assert_eq!(Envelope::parse(&body, 100), Err(BadEvent::InvalidJson));
    }

    #[test]
    fn unknown_data_fields_are_kept() {
        let json = r#"{"id":"e1","origin":"payload","type":"user.updated","timestamp":5,"data":{"betterAuthUserId":"u1","plan":"pro"}}"#;
        let env = Envelope::parse(json.as_bytes(), 1024).expect("valid");
        assert_eq!(env.data.get("plan"), Some(&Value::String("pro".into())));
    }

    #[test]
    fn replays_get_a_new_valid_id() {
        assert_eq!(replay_id("evt1", 7), "evt1:replay-7");
        let long = "a".repeat(128);
        let id = replay_id(&long, 12);
        assert!(is_valid_event_id(&id) && id.ends_with(":replay-12"));
        let raw =
            br#"{"id":"e1","origin":"payload","type":"user.updated","timestamp":1,"data":{}}"#;
        let replayed = with_id(raw, "e1:replay-1").expect("an envelope");
        let env = Envelope::parse(&replayed, 1024).expect("still valid");
        assert_eq!(env.id, "e1:replay-1");
        assert_eq!(with_id(b"{not json", "x"), None);
    }

    #[test]
    fn event_id_charset() {
        assert!(is_valid_event_id("9f1c2a4e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"));
        assert!(is_valid_event_id("evt_1:resync"));
        assert!(!is_valid_event_id("has space"));
        assert!(!is_valid_event_id(&"a".repeat(129)));
        assert!(is_valid_event_id(&"a".repeat(128)));
    }
}
