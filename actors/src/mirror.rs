//! The mirror actor: keeps a PostgreSQL users table (a backend's own) in step with Better
//! Auth's events, through its own durable consumer.
//!
//! It is a sink of its own: its consumer reads Better Auth's subjects in stream order, so one
//! user's changes arrive in order, and an outage of the mirror database never holds back the
//! webhook sinks. Each message is applied and only then acknowledged. The table itself makes
//! the writes idempotent and ordered: a row remembers the `(timestamp, event id)` of the event
//! that last wrote it, and an event that is not newer changes nothing, so a replay, a
//! redelivery or an older event that arrives late is a no-op (see [`MirrorStore`]).

use std::sync::Arc;
use std::time::Duration;

use protocol::user::Event;
use protocol::{EventType, Origin};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::Value;

use crate::ports::{EventSource, Incoming, MirrorStore, Ports};
use crate::settings::PipelineSettings;
use crate::stats::Stats;

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

#[derive(Debug)]
pub enum MirrorMsg {
    /// Read and apply the next batch.
    Poll,
    /// Stop reading (shutdown).
    Pause,
}

pub struct MirrorArgs {
    pub source: Arc<dyn EventSource>,
    pub store: Arc<dyn MirrorStore>,
    pub ports: Ports,
    pub settings: Arc<PipelineSettings>,
    pub stats: Arc<Stats>,
    pub default_organization_id: String,
}

pub struct MirrorState {
    args: MirrorArgs,
    paused: bool,
}

#[derive(Debug, Default)]
pub struct MirrorActor;

/// How long one read waits for messages.
const POLL_WAIT: Duration = Duration::from_secs(1);
/// Pause after a failed read or write, so a down database is not hammered.
const RETRY_DELAY: Duration = Duration::from_millis(500);

impl Actor for MirrorActor {
    type Msg = MirrorMsg;
    type State = MirrorState;
    type Arguments = MirrorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MirrorMsg>,
        args: MirrorArgs,
    ) -> Result<MirrorState, ActorProcessingErr> {
        myself.cast(MirrorMsg::Poll)?;
        Ok(MirrorState {
            args,
            paused: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<MirrorMsg>,
        message: MirrorMsg,
        state: &mut MirrorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MirrorMsg::Pause => state.paused = true,
            MirrorMsg::Poll if state.paused => {}
            MirrorMsg::Poll => {
                let args = &state.args;
                let batch = match args
                    .source
                    .next_batch(args.settings.fetch_batch, POLL_WAIT)
                    .await
                {
                    Ok(batch) => batch,
                    Err(error) => {
                        tracing::warn!(message = "Reading the mirror consumer failed; retrying.", %error);
                        myself.send_after(RETRY_DELAY, || MirrorMsg::Poll);
                        return Ok(());
                    }
                };
                let mut batch = batch.into_iter();
                for incoming in batch.by_ref() {
                    if let Err(error) = apply_one(args, incoming).await {
                        // The rest of the batch goes back unsettled with it (dropping a
                        // message naks it), to come again once the database answers.
                        tracing::warn!(message = "Mirror write failed; retrying.", %error);
                        break;
                    }
                }
                let n_returned = batch.count();
                if n_returned > 0 {
                    tracing::debug!(message = "Mirror batch handed back.", n_returned);
                }
                myself.send_after(
                    if n_returned > 0 {
                        RETRY_DELAY
                    } else {
                        Duration::ZERO
                    },
                    || MirrorMsg::Poll,
                );
            }
        }
        Ok(())
    }
}

/// Applies one message and settles it. An error means it was handed back unsettled.
async fn apply_one(args: &MirrorArgs, incoming: Incoming) -> Result<(), crate::PortError> {
    let stats = &args.stats;
    let event = match Event::parse(
        &incoming.payload,
        args.settings.max_message_bytes,
        &args.settings.mappings,
    ) {
        Ok(event) => event,
        Err(bad) => {
            // The same message reaches the Payload sink's ingestion, which stores it as the
            // dead letter (one per message, so a replay republishes it once).
            tracing::debug!(message = "Bad event skipped by the mirror.", subject = %incoming.subject, reason = %bad.reason());
            Stats::add(&stats.acked);
            incoming.ack().await;
            return Ok(());
        }
    };
    let change = (event.envelope.origin == Origin::BetterAuth)
        .then(|| MirrorChange::from_event(&event, &args.default_organization_id))
        .flatten();
    let Some(change) = change else {
        // Not Better Auth's user (a Payload event on Better Auth's subjects): not mirrored.
        Stats::add(&stats.skipped_unlinked);
        incoming.ack().await;
        return Ok(());
    };
    match args.store.apply(&change).await? {
        MirrorOutcome::Applied => Stats::add(&stats.mirror_applied),
        MirrorOutcome::Stale => Stats::add(&stats.mirror_stale),
        MirrorOutcome::AppliedWithoutEmail => {
            Stats::add(&stats.mirror_applied);
            Stats::add(&stats.mirror_email_conflicts);
            tracing::warn!(message = "Mirror row written without its email: a newer row holds it.", user = %change.auth_id, event_id = %change.event_id);
        }
    }
    Stats::add(&stats.acked);
    incoming.ack().await;
    Ok(())
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
