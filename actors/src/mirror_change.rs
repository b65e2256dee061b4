//! What one Better Auth event asks of the mirror table: decided here, pure, and written by the
//! [`MirrorStore`](crate::ports::MirrorStore) port.

use protocol::user::Event;
use protocol::EventType;
use serde_json::Value;

/// One change to the mirror table, decided from one Better Auth event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorChange {
    pub auth_id: String,
    pub event_id: String,
    /// The event's commit time, milliseconds since the epoch: what orders writes of one row.
    pub at_ms: i64,
    pub kind: MirrorChangeKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorChangeKind {
    /// `user.created` / `user.updated`: insert or update the row.
    Upsert {
        email: Option<String>,
        name: Option<String>,
        roles: Vec<String>,
        organization_id: String,
        /// Better Auth's `createdAt`, when the event carries it.
        created_at_ms: Option<i64>,
    },
    /// `user.deleted`: deactivate or delete, as `mirror.on_delete` says.
    Delete,
}

/// What applying a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorOutcome {
    Applied,
    /// The row was written by a newer (or the same) event: nothing changed.
    Stale,
    /// Applied, but without the email: another active row holds it with a newer event.
    AppliedWithoutEmail,
}

impl MirrorChange {
    /// The change a Better Auth event asks for. Roles come from `roles` (an array) or `role` (a
    /// string, comma-separated); the organization from `organizationId`, else the default.
    pub fn from_event(event: &Event, default_organization_id: &str) -> Option<MirrorChange> {
        let key = event.key.as_ref()?;
        let data = &event.envelope.data;
        let text = |name: &str| match data.get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let kind = match event.envelope.event_type {
            // A resync request changes no user.
            EventType::Resync => return None,
            EventType::Deleted => MirrorChangeKind::Delete,
            EventType::Created | EventType::Updated => MirrorChangeKind::Upsert {
                email: event
                    .fields
                    .get(protocol::user::EMAIL)
                    .and_then(Value::as_str)
                    .map(str::to_string),
                name: event
                    .fields
                    .get(protocol::user::NAME)
                    .and_then(Value::as_str)
                    .map(str::to_string),
                roles: roles(data),
                organization_id: text("organizationId")
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| default_organization_id.to_string()),
                created_at_ms: data.get("createdAt").and_then(time_ms),
            },
        };
        Some(MirrorChange {
            auth_id: key.as_str().to_string(),
            event_id: event.envelope.id.clone(),
            at_ms: event.envelope.timestamp,
            kind,
        })
    }
}

fn roles(data: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut roles: Vec<String> = match (data.get("roles"), data.get("role")) {
        (Some(Value::Array(items)), _) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        (Some(Value::String(s)), _) | (None | Some(Value::Null), Some(Value::String(s))) => {
            s.split(',').map(|r| r.trim().to_string()).collect()
        }
        _ => Vec::new(),
    };
    roles.retain(|r| !r.is_empty());
    roles.dedup();
    roles
}

/// A date as Better Auth sends it: ISO 8601 text (as its JSON serialisation gives) or
/// milliseconds since the epoch.
fn time_ms(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => parse_rfc3339_ms(s),
        _ => None,
    }
}

/// RFC 3339 in UTC (`2024-03-01T12:00:00.250Z`, what JavaScript's `toISOString` gives) to
/// milliseconds since the epoch.
fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let at = humantime::parse_rfc3339_weak(s.trim_end_matches(['Z', 'z'])).ok()?;
    let since = at.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::user::Mappings;
    use serde_json::json;

    fn event(data: Value, event_type: &str) -> Event {
        let text = json!({
            "id": "e1", "origin": "better-auth", "type": event_type,
            "timestamp": 1_700_000_000_000_i64, "data": data,
        })
        .to_string();
        Event::parse(text.as_bytes(), 65536, &Mappings::default()).expect("valid event")
    }

    fn upsert(change: MirrorChange) -> (Option<String>, Vec<String>, String, Option<i64>) {
        match change.kind {
            MirrorChangeKind::Upsert {
                email,
                roles,
                organization_id,
                created_at_ms,
                ..
            } => (email, roles, organization_id, created_at_ms),
            MirrorChangeKind::Delete => panic!("expected an upsert"),
        }
    }

    #[test]
    fn roles_come_from_a_comma_separated_role_or_an_array() {
        let cases = [
            (json!({"role": "admin, editor"}), vec!["admin", "editor"]),
            (json!({"role": "user"}), vec!["user"]),
            (json!({"roles": ["a", "b"]}), vec!["a", "b"]),
            (json!({"roles": ["a"], "role": "ignored"}), vec!["a"]),
            (json!({"role": ""}), vec![]),
            (json!({}), vec![]),
        ];
        for (extra, expected) in cases {
            let mut data = json!({"id": "u1", "email": "a@x"});
            for (k, v) in extra.as_object().expect("object") {
                data[k] = v.clone();
            }
            let change = MirrorChange::from_event(&event(data.clone(), "user.updated"), "org")
                .expect("change");
            assert_eq!(upsert(change).1, expected, "{data}");
        }
    }

    #[test]
    fn organization_defaults_and_created_at_parses() {
        let data = json!({"id": "u1", "email": "a@x", "createdAt": "2024-03-01T12:00:00.250Z"});
        let (email, _, org, created) = upsert(
            MirrorChange::from_event(&event(data, "user.created"), "org_default").expect("c"),
        );
        assert_eq!(email.as_deref(), Some("a@x"));
        assert_eq!(org, "org_default");
        assert_eq!(created, Some(1_709_294_400_250));
        let data = json!({"id": "u1", "email": "a@x", "organizationId": "org_7"});
        let (_, _, org, _) = upsert(
            MirrorChange::from_event(&event(data, "user.created"), "org_default").expect("c"),
        );
        assert_eq!(org, "org_7");
    }

    #[test]
    fn a_deletion_is_a_delete() {
        let change = MirrorChange::from_event(&event(json!({"id": "u9"}), "user.deleted"), "o")
            .expect("change");
        assert_eq!(change.kind, MirrorChangeKind::Delete);
        assert_eq!(change.auth_id, "u9");
        assert_eq!(change.at_ms, 1_700_000_000_000);
    }

    #[test]
    fn iso_dates_as_javascript_writes_them() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T00:00:00.500Z"),
            Some(951_782_400_500)
        );
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }
}
