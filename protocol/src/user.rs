//! The user key, the canonical user and the per-side field mapping (PROTOCOL.md §1).
//!
//! Each side names its fields its own way (`name` in Better Auth, `fullName` in Payload); the
//! engine merges and compares users in one canonical vocabulary and translates at the edges.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::envelope::{BadEvent, Envelope, EventType, Origin};

/// The canonical name of the user key field.
pub const ID: &str = "id";
/// The canonical name of the email field, required on Better Auth writes.
pub const EMAIL: &str = "email";
/// The canonical name of the display name field.
pub const NAME: &str = "name";

/// The Better Auth user id: the key of all ordering, deduplication and sync state.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserKey(String);

impl UserKey {
    pub fn new(key: impl Into<String>) -> Self {
        UserKey(key.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user in canonical field names. Always holds `id`.
pub type CanonicalFields = BTreeMap<String, Value>;

/// The canonical user the engine sends to a side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanonicalUser {
    pub fields: CanonicalFields,
}

/// How one side names the canonical fields, and which of its fields never leave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldMapping {
    /// canonical name -> this side's name. Must map `id`.
    pub fields: BTreeMap<String, String>,
    /// This side's own bookkeeping fields (`createdAt`, `updatedAt`): they change on every
    /// write, so syncing them would make every echo look like a new edit.
    pub local: BTreeSet<String>,
}

impl FieldMapping {
    /// Better Auth's default: canonical names are Better Auth's names.
    pub fn better_auth_default() -> Self {
        Self::new([(ID, "id"), (EMAIL, "email"), ("name", "name")])
    }

    /// Payload's default: `betterAuthUserId`, `email`, `fullName`.
    pub fn payload_default() -> Self {
        Self::new([
            (ID, "betterAuthUserId"),
            (EMAIL, "email"),
            ("name", "fullName"),
        ])
    }

    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        FieldMapping {
            fields: pairs
                .into_iter()
                .map(|(c, s)| (c.to_string(), s.to_string()))
                .collect(),
            local: ["createdAt", "updatedAt"]
                .into_iter()
                .map(String::from)
                .collect(),
        }
    }

    pub fn for_default(origin: Origin) -> Self {
        match origin {
            Origin::BetterAuth => Self::better_auth_default(),
            Origin::Payload => Self::payload_default(),
        }
    }

    /// This side's name of the user key.
    pub fn id_field(&self) -> &str {
        self.fields.get(ID).map(String::as_str).unwrap_or(ID)
    }

    fn side_name<'a>(&'a self, canonical: &'a str) -> &'a str {
        self.fields
            .get(canonical)
            .map(String::as_str)
            .unwrap_or(canonical)
    }

    /// Translates a side's `data` into canonical names. Unmapped fields pass through under their
    /// own name unless that name is taken by the mapping (Payload's own document `id` must not
    /// pose as the canonical `id`) or is one of this side's local fields.
    pub fn to_canonical(&self, data: &Map<String, Value>) -> CanonicalFields {
        let mut out = CanonicalFields::new();
        for (canonical, side) in &self.fields {
            if let Some(value) = data.get(side) {
                out.insert(canonical.clone(), value.clone());
            }
        }
        for (name, value) in data {
            let taken = self.fields.contains_key(name) || self.fields.values().any(|s| s == name);
            if !taken && !self.local.contains(name) {
                out.insert(name.clone(), value.clone());
            }
        }
        out
    }

    /// Translates canonical fields into this side's names.
    pub fn from_canonical(&self, fields: &CanonicalFields) -> Map<String, Value> {
        fields
            .iter()
            .map(|(name, value)| (self.side_name(name).to_string(), value.clone()))
            .collect()
    }

    /// The user key of an event from this side. `Ok(None)` for a Payload user that is not linked
    /// to Better Auth (no or null `betterAuthUserId`): such events are skipped, not bad.
    pub fn user_key(&self, envelope: &Envelope) -> Result<Option<UserKey>, BadEvent> {
        let field = self.id_field();
        match envelope.data.get(field) {
            None | Some(Value::Null) => match envelope.origin {
                Origin::Payload => Ok(None),
                Origin::BetterAuth => Err(BadEvent::MissingField(format!("data.{field}"))),
            },
            Some(Value::String(key)) if !key.is_empty() => {
                if !is_valid_user_id(key) {
                    return Err(BadEvent::InvalidUserId);
                }
                Ok(Some(UserKey::new(key.clone())))
            }
            Some(_) => Err(BadEvent::InvalidField(format!("data.{field}"))),
        }
    }

    /// Checks the side-specific MUST fields of `data` beyond the key: Better Auth's created and
    /// updated events carry a string email (a deletion or a resync request needs only the key).
    pub fn validate_data(&self, envelope: &Envelope) -> Result<(), BadEvent> {
        let carries_user = matches!(envelope.event_type, EventType::Created | EventType::Updated);
        if envelope.origin != Origin::BetterAuth || !carries_user {
            return Ok(());
        }
        let field = self.side_name(EMAIL);
        match envelope.data.get(field) {
            None | Some(Value::Null) => Err(BadEvent::MissingField(format!("data.{field}"))),
            Some(Value::String(_)) => Ok(()),
            Some(_) => Err(BadEvent::InvalidField(format!("data.{field}"))),
        }
    }
}

/// The longest user id, in bytes: ids are keys in the store's index and tokens of NATS
/// subjects, and every real id system stays far below it.
pub const USER_ID_BYTES_MAX: usize = 256;

/// Whether `id` can be a user key: at most [`USER_ID_BYTES_MAX`] bytes of UTF-8 (a JSON string
/// always is) with no control character, so that it is storable in any database and can never
/// break a header, a log line or a subject on the wire.
pub fn is_valid_user_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= USER_ID_BYTES_MAX && !id.chars().any(char::is_control)
}

/// Both sides' mappings, looked up by origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mappings {
    pub better_auth: FieldMapping,
    pub payload: FieldMapping,
}

impl Default for Mappings {
    fn default() -> Self {
        Mappings {
            better_auth: FieldMapping::better_auth_default(),
            payload: FieldMapping::payload_default(),
        }
    }
}

impl Mappings {
    pub fn side(&self, origin: Origin) -> &FieldMapping {
        match origin {
            Origin::BetterAuth => &self.better_auth,
            Origin::Payload => &self.payload,
        }
    }
}

/// A validated event: its envelope, its user key (none for unlinked Payload users) and its
/// fields in canonical names.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub envelope: Envelope,
    pub key: Option<UserKey>,
    pub fields: CanonicalFields,
}

impl Event {
    /// Parses and validates one message: the envelope (§1), then the origin's user key and
    /// required fields.
    pub fn parse(bytes: &[u8], max_bytes: usize, mappings: &Mappings) -> Result<Event, BadEvent> {
        let envelope = Envelope::parse(bytes, max_bytes)?;
        let mapping = mappings.side(envelope.origin);
        let key = mapping.user_key(&envelope)?;
        mapping.validate_data(&envelope)?;
        let fields = mapping.to_canonical(&envelope.data);
        Ok(Event {
            envelope,
            key,
            fields,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn payload_fields_map_to_canonical_and_back() {
        let mapping = FieldMapping::payload_default();
        let side = data(json!({
            "id": 42, "betterAuthUserId": "u1", "email": "a@b.c", "fullName": "Ada",
            "plan": "pro", "updatedAt": "2026-01-01T00:00:00Z"
        }));
        let canonical = mapping.to_canonical(&side);
        assert_eq!(
            Value::Object(canonical.clone().into_iter().collect()),
            json!({"id": "u1", "email": "a@b.c", "name": "Ada", "plan": "pro"})
        );
        let back = mapping.from_canonical(&canonical);
        assert_eq!(
            Value::Object(back),
            json!({"betterAuthUserId": "u1", "email": "a@b.c", "fullName": "Ada", "plan": "pro"})
        );
    }

    #[test]
    fn user_key_rules() {
        let mappings = Mappings::default();
        let parse = |s: &str| Event::parse(s.as_bytes(), 65536, &mappings);
        let unlinked = parse(
            r#"{"id":"e","origin":"payload","type":"user.updated","timestamp":1,"data":{"email":"x@y"}}"#,
        );
        assert_eq!(unlinked.map(|e| e.key), Ok(None));
        let no_id = parse(
            r#"{"id":"e","origin":"better-auth","type":"user.updated","timestamp":1,"data":{"email":"x@y"}}"#,
        );
        assert_eq!(no_id, Err(BadEvent::MissingField("data.id".into())));
        let no_email = parse(
            r#"{"id":"e","origin":"better-auth","type":"user.created","timestamp":1,"data":{"id":"u"}}"#,
        );
        assert_eq!(no_email, Err(BadEvent::MissingField("data.email".into())));
        let delete = parse(
            r#"{"id":"e","origin":"better-auth","type":"user.deleted","timestamp":1,"data":{"id":"u"}}"#,
        );
        assert_eq!(delete.map(|e| e.key), Ok(Some(UserKey::new("u"))));
        let bad_key = parse(
            r#"{"id":"e","origin":"payload","type":"user.updated","timestamp":1,"data":{"betterAuthUserId":5}}"#,
        );
        assert_eq!(
            bad_key,
            Err(BadEvent::InvalidField("data.betterAuthUserId".into()))
        );
    }

    #[test]
    fn user_ids_that_cannot_be_keys_are_bad_events() {
        let mappings = Mappings::default();
        let event = |id: &str| {
            let body = json!({"id": "e", "origin": "better-auth", "type": "user.updated",
                "timestamp": 1, "data": {"id": id, "email": "x@y"}});
            Event::parse(body.to_string().as_bytes(), 65536, &mappings).map(|e| e.key)
        };
        for bad in [
            "a\u{0}b",
            "line\r\nbreak",
            "tab\there",
            &"x".repeat(USER_ID_BYTES_MAX + 1),
        ] {
            assert_eq!(event(bad), Err(BadEvent::InvalidUserId), "{bad:?}");
        }
        assert_eq!(BadEvent::InvalidUserId.reason(), "invalid_user_id");
        let longest = "é".repeat(USER_ID_BYTES_MAX / 2);
        assert_eq!(event(&longest), Ok(Some(UserKey::new(longest.clone()))));
        assert_eq!(event("u_123:ok-id"), Ok(Some(UserKey::new("u_123:ok-id"))));
    }
}
