//! Property tests of the envelope and the merge rule.

use proptest::prelude::*;
use protocol::envelope::MAX_MESSAGE_BYTES_DEFAULT;
use protocol::user::CanonicalFields;
use protocol::{BadEvent, Envelope, EventType, Origin, UserRecord};
use serde_json::{Map, Value};

fn origin() -> impl Strategy<Value = Origin> {
    prop_oneof![Just(Origin::BetterAuth), Just(Origin::Payload)]
}

fn event_type() -> impl Strategy<Value = EventType> {
    prop_oneof![
        Just(EventType::Created),
        Just(EventType::Updated),
        Just(EventType::Deleted)
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ]
}

fn data() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map("[a-zA-Z]{1,8}", json_leaf(), 0..6)
        .prop_map(|m| m.into_iter().collect())
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        "[A-Za-z0-9_:-]{1,128}",
        origin(),
        event_type(),
        0..i64::MAX,
        data(),
    )
        .prop_map(|(id, origin, event_type, timestamp, data)| Envelope {
            id,
            origin,
            event_type,
            timestamp,
            data,
        })
}

proptest! {
    #[test]
    fn envelope_round_trips(env in envelope()) {
        let bytes = env.to_bytes();
        prop_assert_eq!(Envelope::parse(&bytes, usize::MAX), Ok(env));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        // Every outcome is either an envelope or one of the §4 reasons.
        match Envelope::parse(&bytes, MAX_MESSAGE_BYTES_DEFAULT) {
            Ok(_) => {}
            Err(bad) => {
                let reason = bad.reason();
                let known = matches!(bad, BadEvent::InvalidJson | BadEvent::UnknownType
                    | BadEvent::UnknownOrigin | BadEvent::TooLarge)
                    || reason.starts_with("missing_field:") || reason.starts_with("invalid_field:");
                prop_assert!(known, "unexpected reason {}", reason);
            }
        }
    }

    #[test]
    fn json_shaped_garbage_never_panics(
        id in prop::option::of(json_leaf()), origin in prop::option::of(json_leaf()),
        ty in prop::option::of(json_leaf()), ts in prop::option::of(json_leaf()),
        data in prop::option::of(json_leaf()),
    ) {
        let mut object = Map::new();
        for (name, value) in [("id", id), ("origin", origin), ("type", ty), ("timestamp", ts), ("data", data)] {
            if let Some(value) = value {
                object.insert(name.to_string(), value);
            }
        }
        let bytes = serde_json::to_vec(&Value::Object(object)).unwrap_or_default();
        let _ = Envelope::parse(&bytes, MAX_MESSAGE_BYTES_DEFAULT);
    }
}

/// One origin's write: a few fields out of a small shared set, so that writes collide.
#[derive(Debug, Clone)]
struct Write {
    id: String,
    origin: Origin,
    event_type: EventType,
    ts: i64,
    fields: CanonicalFields,
}

fn writes(origin: Origin, prefix: &'static str) -> impl Strategy<Value = Vec<Write>> {
    prop::collection::vec(
        (
            0i64..4,
            prop::collection::btree_map(
                prop_oneof![Just("name"), Just("email"), Just("image")],
                0i64..5,
                1..3,
            ),
            prop::bool::weighted(0.05),
        ),
        0..12,
    )
    .prop_map(move |steps| {
        // Timestamps of one origin never go backwards: it commits in order.
        let mut ts = 0;
        steps
            .into_iter()
            .enumerate()
            .map(|(i, (dt, fields, delete))| {
                ts += dt;
                Write {
                    id: format!("{prefix}{i}"),
                    origin,
                    event_type: if delete {
                        EventType::Deleted
                    } else {
                        EventType::Updated
                    },
                    ts,
                    fields: fields
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), Value::from(format!("{prefix}{v}"))))
                        .collect(),
                }
            })
            .collect()
    })
}

fn apply(writes: &[Write]) -> UserRecord {
    let mut record = UserRecord::default();
    for w in writes {
        record.merge(&w.id, w.origin, w.event_type, w.ts, &w.fields);
    }
    record
}

/// Interleaves two sequences keeping each one's order; `choices` picks the next source, and
/// `dups` re-inserts earlier writes at arbitrary later places.
fn interleave(a: &[Write], b: &[Write], choices: &[bool], dups: &[(usize, usize)]) -> Vec<Write> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    let mut choice = choices.iter().cycle();
    while i < a.len() || j < b.len() {
        let take_a = j >= b.len() || (i < a.len() && *choice.next().unwrap_or(&true));
        if take_a {
            out.push(a[i].clone());
            i += 1;
        } else {
            out.push(b[j].clone());
            j += 1;
        }
    }
    for &(from, to) in dups {
        if out.is_empty() {
            break;
        }
        let from = from % out.len();
        let to = from + 1 + to % (out.len() - from);
        let copy = out[from].clone();
        out.insert(to.min(out.len()), copy);
    }
    out
}

proptest! {
    #[test]
    fn merge_is_idempotent(ws in writes(Origin::BetterAuth, "b")) {
        let once = apply(&ws);
        let mut twice = once.clone();
        for w in &ws {
            twice.merge(&w.id, w.origin, w.event_type, w.ts, &w.fields);
        }
        prop_assert_eq!(once.canonical(), twice.canonical());
        prop_assert_eq!(once.deleted_at, twice.deleted_at);
    }

    #[test]
    fn any_interleaving_gives_the_same_user(
        ba in writes(Origin::BetterAuth, "b"),
        pl in writes(Origin::Payload, "p"),
        choices1 in prop::collection::vec(any::<bool>(), 1..24),
        choices2 in prop::collection::vec(any::<bool>(), 1..24),
        dups in prop::collection::vec((any::<usize>(), any::<usize>()), 0..6),
    ) {
        let first = apply(&interleave(&ba, &pl, &choices1, &[]));
        let second = apply(&interleave(&ba, &pl, &choices2, &dups));
        prop_assert_eq!(first.is_deleted(), second.is_deleted());
        if !first.is_deleted() {
            prop_assert_eq!(first.canonical(), second.canonical());
        }
    }
}
