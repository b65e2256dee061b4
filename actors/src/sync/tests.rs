//! Scenarios of PROTOCOL.md §5.4–5.5 on the pure state machine.

use protocol::user::CanonicalFields;
use protocol::{EventType, Origin};
use serde_json::{json, Value};

use super::*;

const BA: Origin = Origin::BetterAuth;
const PL: Origin = Origin::Payload;

fn fields(v: Value) -> CanonicalFields {
    match v {
        Value::Object(m) => m.into_iter().collect(),
        _ => CanonicalFields::new(),
    }
}

fn policy() -> Policy {
    Policy {
        clock_skew_ms: 500,
        faults: Faults::default(),
    }
}

/// A tiny driver: applies an event, queues its sends, and delivers them at once.
struct World {
    state: SyncState,
    now_ms: i64,
}

impl World {
    fn new() -> Self {
        World {
            state: SyncState::default(),
            now_ms: 1_000_000,
        }
    }

    fn event(&mut self, id: &str, origin: Origin, ty: EventType, ts: i64, f: Value) -> Decision {
        let f = fields(f);
        let view = EventView {
            id,
            origin,
            event_type: ty,
            timestamp_ms: ts,
            sequence: 0,
            fields: &f,
        };
        let decision = self.state.on_event(view, &policy(), &|_| None, &|_| false);
        if !decision.replayed {
            for send in &decision.sends {
                self.state
                    .on_queued(id, send, self.now_ms, &"subject".into(), &"{}".into());
            }
        }
        decision
    }

    fn deliver_all(&mut self, decision: &Decision) {
        for send in &decision.sends {
            self.now_ms += 10;
            let event_id = match send.webhook_id.split_once(":resync") {
                Some((event_id, _)) => event_id.to_string(),
                None => send.webhook_id.clone(),
            };
            self.state
                .on_delivered(send.side, &send.state, &[event_id], self.now_ms);
        }
    }

    fn name(&self) -> Value {
        self.state
            .record
            .canonical_fields()
            .get("name")
            .cloned()
            .unwrap_or(Value::Null)
    }
}

fn ids(decision: &Decision) -> Vec<(Origin, String)> {
    decision
        .sends
        .iter()
        .map(|s| (s.side, s.webhook_id.clone()))
        .collect()
}

#[test]
fn a_new_user_goes_to_the_other_side_only() {
    let mut w = World::new();
    let d = w.event(
        "e1",
        BA,
        EventType::Created,
        1,
        json!({"id":"u","email":"a@x","name":"A"}),
    );
    assert_eq!(ids(&d), vec![(PL, "e1".to_string())]);
    assert_eq!(d.sends[0].event_type, EventType::Created);
}

#[test]
fn an_older_concurrent_write_loses_and_its_origin_is_resynced() {
    let mut w = World::new();
    let d1 = w.event(
        "e1",
        BA,
        EventType::Updated,
        2_000,
        json!({"id":"u","email":"a@x","name":"A"}),
    );
    w.deliver_all(&d1);
    // Payload's own edit, older than Better Auth's, arrives later (not an echo: B was never sent).
    let d2 = w.event(
        "e2",
        PL,
        EventType::Updated,
        1_000,
        json!({"id":"u","name":"B"}),
    );
    assert_eq!(w.name(), json!("A"));
    assert_eq!(ids(&d2), vec![(PL, "e2:resync".to_string())]);
    assert_eq!(d2.sends[0].state, w.state.target_state());
}

#[test]
fn different_fields_edited_concurrently_both_survive() {
    let mut w = World::new();
    let d0 = w.event(
        "e0",
        BA,
        EventType::Created,
        1,
        json!({"id":"u","email":"a@x","name":"A"}),
    );
    w.deliver_all(&d0);
    w.event(
        "e1",
        BA,
        EventType::Updated,
        10,
        json!({"id":"u","email":"new@x","name":"A"}),
    );
    w.event(
        "e2",
        PL,
        EventType::Updated,
        11,
        json!({"id":"u","email":"a@x","name":"Z"}),
    );
    // Payload's a@x is the value it already held, not an edit; its name is.
    let canonical = w.state.record.canonical_fields();
    assert_eq!(canonical["name"], json!("Z"));
    assert_eq!(canonical["email"], json!("new@x"));
    // The same field edited on both sides: the later write wins.
    w.event(
        "e3",
        BA,
        EventType::Updated,
        20,
        json!({"id":"u","email":"new@x","name":"B"}),
    );
    w.event(
        "e4",
        PL,
        EventType::Updated,
        21,
        json!({"id":"u","email":"a@x","name":"P"}),
    );
    assert_eq!(w.state.record.canonical_fields()["name"], json!("P"));
}

#[test]
fn an_echo_is_not_a_write_even_after_a_later_delivery() {
    let mut w = World::new();
    let d1 = w.event(
        "e1",
        BA,
        EventType::Created,
        1,
        json!({"id":"u","email":"a@x","name":"A"}),
    );
    w.deliver_all(&d1);
    let d2 = w.event(
        "e2",
        BA,
        EventType::Updated,
        2,
        json!({"id":"u","email":"a@x","name":"C"}),
    );
    w.deliver_all(&d2);
    // Payload's hook echoes the first delivery late, with a fresh timestamp.
    let echo = w.event(
        "p1",
        PL,
        EventType::Updated,
        5_000_000,
        json!({"id":"u","email":"a@x","name":"A"}),
    );
    assert_eq!(echo.verdict, Verdict::Echo);
    assert!(echo.sends.is_empty(), "{:?}", echo.sends);
    assert_eq!(w.name(), json!("C"));
    let echo2 = w.event(
        "p2",
        PL,
        EventType::Updated,
        5_000_001,
        json!({"id":"u","email":"a@x","name":"C"}),
    );
    assert_eq!(echo2.verdict, Verdict::Echo);
    assert!(echo2.sends.is_empty());
}

#[test]
fn echo_against_the_last_delivery_only_is_the_broken_variant() {
    let mut w = World::new();
    let d1 = w.event(
        "e1",
        BA,
        EventType::Created,
        1,
        json!({"id":"u","email":"a@x","name":"A"}),
    );
    w.deliver_all(&d1);
    let d2 = w.event(
        "e2",
        BA,
        EventType::Updated,
        2,
        json!({"id":"u","email":"a@x","name":"C"}),
    );
    w.deliver_all(&d2);
    let mut broken = policy();
    broken.faults.echo_last_only = true;
    let f = fields(json!({"id":"u","email":"a@x","name":"A"}));
    let view = EventView {
        id: "p1",
        origin: PL,
        event_type: EventType::Updated,
        timestamp_ms: 5_000_000,
        sequence: 0,
        fields: &f,
    };
    let d = w.state.on_event(view, &broken, &|_| None, &|_| false);
    assert_ne!(d.verdict, Verdict::Echo);
}

#[test]
fn an_edit_overwritten_by_an_in_flight_delivery_is_resent_to_its_side() {
    let mut w = World::new();
    let d0 = w.event(
        "e0",
        BA,
        EventType::Created,
        1,
        json!({"id":"u","email":"a@x","name":"A0"}),
    );
    w.deliver_all(&d0);
    let d1 = w.event(
        "e1",
        BA,
        EventType::Updated,
        1_000_100,
        json!({"id":"u","email":"a@x","name":"A"}),
    );
    // The delivery of A lands at Payload after Payload's own edit B and overwrites it.
    w.now_ms = 1_000_200;
    w.deliver_all(&d1);
    let d2 = w.event(
        "e2",
        PL,
        EventType::Updated,
        1_000_150,
        json!({"id":"u","email":"a@x","name":"B"}),
    );
    assert_eq!(w.name(), json!("B"));
    let mut sent = ids(&d2);
    sent.sort();
    assert_eq!(
        sent,
        vec![(BA, "e2".to_string()), (PL, "e2:resync".to_string())]
    );
    w.deliver_all(&d2);
    // The late echo of A changes nothing.
    let echo = w.event(
        "p9",
        PL,
        EventType::Updated,
        1_000_300,
        json!({"id":"u","email":"a@x","name":"A"}),
    );
    assert_eq!(echo.verdict, Verdict::Echo);
    assert!(echo.sends.is_empty());
}

#[test]
fn a_deletion_undone_by_an_in_flight_delivery_is_sent_again_to_its_side() {
    let mut w = World::new();
    let user = json!({"id":"u","email":"a@x","name":"A0"});
    let d0 = w.event("e0", BA, EventType::Created, 1, user);
    w.deliver_all(&d0);
    let renamed = json!({"id":"u","email":"a@x","name":"A"});
    let d1 = w.event("e1", BA, EventType::Updated, 1_000_100, renamed);
    // The delivery of A lands at Payload after Payload deleted the user: the receiver creates
    // the user again (it creates what an update does not find).
    w.now_ms = 1_000_200;
    w.deliver_all(&d1);
    let d2 = w.event("e2", PL, EventType::Deleted, 1_000_150, json!({"id":"u"}));
    let mut sent = ids(&d2);
    sent.sort();
    assert_eq!(
        sent,
        vec![(BA, "e2".to_string()), (PL, "e2:resync".to_string())]
    );
    assert!(d2.sends.iter().all(|s| s.state == Known::Deleted));
    w.deliver_all(&d2);
    // The echo of that deletion is not sent back again: no loop.
    w.now_ms = 1_000_400;
    let echo = w.event("p9", PL, EventType::Deleted, 1_000_300, json!({"id":"u"}));
    assert!(echo.sends.is_empty());
}

#[test]
fn deletion_is_final_and_sent_to_whoever_revives_the_user() {
    let mut w = World::new();
    let d0 = w.event(
        "e0",
        BA,
        EventType::Created,
        1,
        json!({"id":"u","email":"a@x"}),
    );
    w.deliver_all(&d0);
    let del = w.event("e1", BA, EventType::Deleted, 2, json!({"id":"u"}));
    assert_eq!(ids(&del), vec![(PL, "e1".to_string())]);
    assert_eq!(del.sends[0].event_type, EventType::Deleted);
    w.deliver_all(&del);
    let revive = w.event(
        "p1",
        PL,
        EventType::Updated,
        99,
        json!({"id":"u","email":"zombie@x"}),
    );
    assert!(w.state.record.is_deleted());
    assert_eq!(ids(&revive), vec![(PL, "p1:resync".to_string())]);
    assert_eq!(revive.sends[0].event_type, EventType::Deleted);
}

#[test]
fn a_side_already_holding_the_canonical_user_is_sent_nothing() {
    let mut w = World::new();
    let d = w.event(
        "e1",
        BA,
        EventType::Created,
        1,
        json!({"id":"u","email":"a@x"}),
    );
    // Payload independently holds the same user already (reported by its own event).
    let _ = d;
    let same = w.event(
        "p1",
        PL,
        EventType::Updated,
        1,
        json!({"id":"u","email":"a@x"}),
    );
    assert!(same.sends.is_empty(), "{:?}", same.sends);
}

#[test]
fn duplicates_do_nothing_twice() {
    let mut w = World::new();
    let d = w.event(
        "e1",
        BA,
        EventType::Created,
        1,
        json!({"id":"u","email":"a@x"}),
    );
    w.deliver_all(&d);
    let again = w.event(
        "e1",
        BA,
        EventType::Created,
        1,
        json!({"id":"u","email":"a@x"}),
    );
    assert_eq!(again.verdict, Verdict::Duplicate);
    assert!(again.sends.is_empty());
}

#[test]
fn a_redelivered_event_after_a_crash_gets_its_own_stored_deliveries() {
    let mut w = World::new();
    // e1 and e2 merged and saved, but their deliveries never happened (crash before them).
    let a = json!({"id":"u","email":"a@x","name":"A"});
    let b = json!({"id":"u","email":"a@x","name":"B"});
    let d1 = w.event("e1", BA, EventType::Created, 1, a.clone());
    let d2 = w.event("e2", BA, EventType::Updated, 2, b.clone());
    let again1 = w.event("e1", BA, EventType::Created, 1, a);
    assert_eq!(again1.verdict, Verdict::Duplicate);
    assert!(again1.replayed);
    assert_eq!(
        again1.sends, d1.sends,
        "the same delivery, with the state it had then"
    );
    let again2 = w.event("e2", BA, EventType::Updated, 2, b);
    assert_eq!(again2.sends, d2.sends);
    w.deliver_all(&again1);
    w.deliver_all(&again2);
    assert!(
        w.state.outbox.is_empty(),
        "settled deliveries are no longer owed"
    );
}

#[test]
fn a_duplicate_with_nothing_stored_resends_what_is_missing() {
    let mut w = World::new();
    let user = json!({"id":"u","email":"a@x"});
    let d = w.event("e1", BA, EventType::Created, 1, user.clone());
    // Its delivery was dead-lettered; a replay of the event comes back as a duplicate.
    let sent = d.sends[0].state.clone();
    w.state.on_dead_lettered(PL, &sent, &["e1".to_string()]);
    assert!(w.state.outbox.is_empty());
    let again = w.event("e1", BA, EventType::Created, 1, user);
    assert_eq!(again.verdict, Verdict::Duplicate);
    assert!(!again.replayed);
    // Under a fresh id: the dead-lettered attempt may have been applied with other content.
    assert_eq!(ids(&again), vec![(PL, "e1:resync-1".to_string())]);
    let _ = d;
}

#[test]
fn full_snapshots_of_different_fields_edited_concurrently_both_survive() {
    let mut w = World::new();
    let d0 = w.event(
        "e0",
        BA,
        EventType::Created,
        1_000,
        json!({"id":"u","email":"a@x","name":"N"}),
    );
    w.deliver_all(&d0);
    // Payload reported the same user, so both sides are known to hold {a@x, N}.
    let p0 = w.event(
        "p0",
        PL,
        EventType::Updated,
        1_001,
        json!({"id":"u","email":"a@x","name":"N"}),
    );
    assert!(p0.sends.is_empty() || p0.verdict == Verdict::Echo);
    // Concurrently: Better Auth changes the email, Payload the name; each publishes its whole user.
    w.now_ms = 10;
    let b = w.event(
        "b1",
        BA,
        EventType::Updated,
        5_000_000,
        json!({"id":"u","email":"b@x","name":"N"}),
    );
    let p = w.event(
        "p1",
        PL,
        EventType::Updated,
        5_000_001,
        json!({"id":"u","email":"a@x","name":"M"}),
    );
    let canonical = w.state.record.canonical_fields();
    assert_eq!(canonical["email"], json!("b@x"));
    assert_eq!(canonical["name"], json!("M"));
    let _ = (b, p);
}

#[test]
fn a_stale_copy_from_before_a_delivery_landed_is_not_a_write() {
    let mut w = World::new();
    let d0 = w.event(
        "e0",
        BA,
        EventType::Created,
        1_000,
        json!({"id":"u","email":"a@x","name":"N"}),
    );
    w.deliver_all(&d0);
    let d1 = w.event(
        "e1",
        BA,
        EventType::Updated,
        1_000_000,
        json!({"id":"u","email":"b@x","name":"N"}),
    );
    w.now_ms = 1_000_100;
    w.deliver_all(&d1);
    // Payload's name edit was written just before the new email landed: it still carries a@x.
    let p = w.event(
        "p1",
        PL,
        EventType::Updated,
        1_000_050,
        json!({"id":"u","email":"a@x","name":"M"}),
    );
    let canonical = w.state.record.canonical_fields();
    assert_eq!(
        canonical["email"],
        json!("b@x"),
        "a@x is a stale copy, not an edit"
    );
    assert_eq!(canonical["name"], json!("M"));
    // Payload may have been overwritten, so it is sent the merged user again.
    assert!(p
        .sends
        .iter()
        .any(|s| s.side == PL && s.webhook_id == "p1:resync"));
}

#[test]
fn same_millisecond_writes_of_one_origin_keep_their_stream_order_when_reordered() {
    let mut state = SyncState::default();
    let policy = policy();
    let apply = |state: &mut SyncState, id: &str, seq: u64, image: &str| {
        let f = fields(json!({"id":"u","email":"a@x","image":image}));
        let view = EventView {
            id,
            origin: BA,
            event_type: EventType::Updated,
            timestamp_ms: 100,
            sequence: seq,
            fields: &f,
        };
        state.on_event(view, &policy, &|_| None, &|_| false);
    };
    // Published as seq 7 then 8 in the same millisecond; a redelivery brings 8 first.
    apply(&mut state, "b8", 8, "second");
    apply(&mut state, "b7", 7, "first");
    assert_eq!(state.record.canonical_fields()["image"], json!("second"));
}

#[test]
fn a_dead_lettered_delivery_is_no_echo_due() {
    // Found by the simulator (seed 587, 400 events): a Better Auth edit made while a delivery
    // to it was in flight is resynced; that resync is rejected and dead-lettered; replaying
    // the dead letter brings the edit back. It must not pass for the echo of the rejected
    // resync, or Better Auth is taken to hold what it never got, and keeps the old state.
    let mut w = World::new();
    let d = w.event(
        "p1",
        PL,
        EventType::Created,
        1,
        json!({"id":"u","email":"a@x","name":"P"}),
    );
    w.deliver_all(&d);
    let delivered_at = w.now_ms;
    let edit = json!({"id":"u","email":"b@x","name":"B"});
    let d = w.event(
        "b1",
        BA,
        EventType::Updated,
        delivered_at + 100,
        edit.clone(),
    );
    assert_eq!(
        ids(&d),
        vec![(BA, "b1:resync".to_string()), (PL, "b1".to_string())]
    );
    let resync = d
        .sends
        .iter()
        .find(|s| s.side == BA)
        .expect("resync")
        .clone();
    w.state
        .on_dead_lettered(BA, &resync.state, &["b1".to_string()]);
    // The replay: the same snapshot under a new event id.
    let again = w.event(
        "b1:replay-1",
        BA,
        EventType::Updated,
        delivered_at + 100,
        edit,
    );
    assert_ne!(again.verdict, Verdict::Echo);
    assert!(
        again.sends.iter().any(|s| s.side == BA),
        "Better Auth is sent the canonical user again: {:?}",
        ids(&again)
    );
}

impl World {
    /// User `u` created by `origin` (as A) and delivered to the other side.
    fn known_user(origin: Origin) -> World {
        let mut w = World::new();
        let user = json!({"id":"u","email":"a@x","name":"A"});
        let d = w.event("e1", origin, EventType::Created, 1_000, user);
        w.deliver_all(&d);
        w
    }

    fn resync(&mut self, id: &str, origin: Origin) -> Decision {
        self.event(id, origin, EventType::Resync, 5_000, json!({"id":"u"}))
    }
}

#[test]
fn a_resync_request_sends_the_canonical_user_to_a_side_believed_in_step() {
    let mut w = World::known_user(BA);
    // Payload is known to hold A: an ordinary repeat of Better Auth's state sends nothing.
    let same = json!({"id":"u","email":"a@x","name":"A"});
    let again = w.event("e2", BA, EventType::Updated, 2_000, same);
    assert!(again.sends.is_empty());
    let d = w.resync("r1", BA);
    assert_eq!(d.verdict, Verdict::Resync);
    assert_eq!(
        ids(&d),
        vec![(PL, "r1:resync-1".to_string())],
        "under a fresh id"
    );
    assert_eq!(d.sends[0].event_type, EventType::Updated);
    assert_eq!(d.sends[0].state, w.state.target_state());
    assert_eq!(w.name(), json!("A"), "nothing merged");
    assert_eq!(
        w.state.payload.known,
        Known::Unknown,
        "until it is delivered"
    );
    w.deliver_all(&d);
    let twice = w.resync("r1", BA);
    assert_eq!(twice.verdict, Verdict::Duplicate);
    assert!(
        twice.sends.is_empty(),
        "a request seen before sends nothing new"
    );
}

#[test]
fn a_resync_request_whose_id_was_forgotten_never_reuses_a_webhook_id() {
    let mut w = World::known_user(BA);
    let first = w.resync("r1", BA);
    w.deliver_all(&first);
    let renamed = json!({"id":"u","email":"a@x","name":"B"});
    let d = w.event("e2", BA, EventType::Updated, 3_000, renamed);
    w.deliver_all(&d);
    // The request is republished after every memory of its id is gone.
    w.state.record.recent_ids.clear();
    w.state.unsettled.clear();
    let again = w.resync("r1", BA);
    assert_eq!(again.verdict, Verdict::Resync);
    assert_ne!(
        again.sends[0].state, first.sends[0].state,
        "other content now"
    );
    assert_ne!(again.sends[0].webhook_id, first.sends[0].webhook_id);
}

#[test]
fn a_resync_request_from_payload_goes_to_better_auth_and_a_deleted_user_goes_as_deleted() {
    let mut w = World::known_user(PL);
    let d = w.event("e2", PL, EventType::Deleted, 2_000, json!({"id":"u"}));
    w.deliver_all(&d);
    let d = w.resync("r1", PL);
    assert_eq!(ids(&d), vec![(BA, "r1:resync-1".to_string())]);
    assert_eq!(d.sends[0].event_type, EventType::Deleted);
    assert_eq!(d.sends[0].state, Known::Deleted);
}

#[test]
fn a_resync_request_for_an_unknown_user_sends_nothing() {
    let mut w = World::new();
    let d = w.resync("r1", BA);
    assert_eq!(d.verdict, Verdict::Resync);
    assert!(d.sends.is_empty());
    // The user's first event after it is an ordinary creation.
    let user = json!({"id":"u","email":"a@x"});
    let d = w.event("e1", BA, EventType::Created, 6_000, user);
    assert_eq!(ids(&d), vec![(PL, "e1".to_string())]);
}

#[test]
fn a_resync_request_whose_delivery_never_settled_is_replayed_after_a_crash() {
    let mut w = World::known_user(BA);
    let first = w.resync("r1", BA);
    // The engine dies before the delivery settles; the request comes back.
    let again = w.resync("r1", BA);
    assert!(again.replayed);
    assert_eq!(again.sends, first.sends);
}
