//! The per-user sync state machine (PROTOCOL.md §5.4–5.5), pure: no I/O, no clock, no actor.
//!
//! Sync is state-based. Per user the engine keeps the canonical record (merge of every write)
//! and, per side, what that side is known to hold, when the engine last delivered to it, and the
//! states delivered to it whose echo may still come back. After each event every side whose
//! expected state differs from the canonical user is sent the canonical user, so recovery after
//! a crash or a dead letter needs no special path: the next event for the user, or the
//! redelivery of the unacknowledged one, sends whatever is missing.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use protocol::delivery::{webhook_id, RESYNC_SUFFIX};
use protocol::merge::MergeOutcome;
use protocol::user::CanonicalFields;
use protocol::{EventType, Origin, UserRecord};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

/// How many delivered states per side may still be echoed back. Older ones are forgotten;
/// an echo of a forgotten state is taken as a write, which costs one extra delivery, not a loop.
pub const ECHOES_DUE_MAX: usize = 64;

/// What a side holds, as far as the engine knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "fields", rename_all = "snake_case")]
pub enum Known {
    /// Never reported, or possibly overwritten by an engine delivery (§5.5).
    Unknown,
    /// The side deleted the user, or accepted its deletion.
    Deleted,
    /// The side holds these canonical fields (at least). Shared, because the same state sits
    /// in the outbox, in the echoes due and in the delivery queue, and the whole sync state is
    /// copied on every save.
    Holds(Arc<Fields>),
}

impl Known {
    pub fn holds(fields: CanonicalFields) -> Known {
        Known::Holds(Arc::new(Fields::from(fields)))
    }
}

/// Canonical fields that never change once made, written as JSON at most once. The whole
/// sync state is saved after every event, and most of it is such states: up to
/// [`ECHOES_DUE_MAX`] sent to each side, the outbox's, what each side holds. Each is the same
/// from save to save, so its text is kept from its first save on: turning them into JSON
/// again each time was a tenth of the engine's CPU in `bench drain`.
#[derive(Default)]
pub struct Fields {
    fields: CanonicalFields,
    json: OnceLock<Box<RawValue>>,
}

impl From<CanonicalFields> for Fields {
    fn from(fields: CanonicalFields) -> Self {
        Fields {
            fields,
            json: OnceLock::new(),
        }
    }
}

impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.fields.fmt(f)
    }
}

impl Deref for Fields {
    type Target = CanonicalFields;

    fn deref(&self) -> &CanonicalFields {
        &self.fields
    }
}

impl Clone for Fields {
    fn clone(&self) -> Self {
        Fields::from(self.fields.clone())
    }
}

impl PartialEq for Fields {
    fn eq(&self, other: &Self) -> bool {
        self.fields == other.fields
    }
}

impl Eq for Fields {}

/// The same JSON as the map's own, byte for byte: states saved before and after read alike.
/// (Sync states are only ever written as JSON; another format would get the text as a
/// string.)
impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if let Some(json) = self.json.get() {
            return json.serialize(serializer);
        }
        match serde_json::value::to_raw_value(&self.fields) {
            Ok(json) => self.json.get_or_init(|| json).serialize(serializer),
            Err(_) => self.fields.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        CanonicalFields::deserialize(deserializer).map(Fields::from)
    }
}

impl Known {
    /// Equality that treats an absent field and a `null` one alike: receivers store a missing
    /// optional field as null and report it back that way.
    pub fn same_as(&self, other: &Known) -> bool {
        match (self, other) {
            (Known::Holds(a), Known::Holds(b)) => {
                fn present(m: &CanonicalFields) -> impl Iterator<Item = (&String, &Value)> {
                    m.iter().filter(|(_, v)| !v.is_null())
                }
                // Compared in step, without copying either side: this runs for every event.
                present(a).eq(present(b))
            }
            _ => self == other,
        }
    }
}

/// Per-side bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideState {
    pub known: Known,
    /// Engine time of the last delivery this side accepted, milliseconds since the epoch.
    pub last_delivery_ms: Option<i64>,
    /// States sent to this side whose echo has not come back, oldest first.
    /// Shared until written, like `held_values`: saves after a delivery do not touch it.
    pub echoes_due: Arc<VecDeque<Known>>,
    /// The values the side itself last reported, per field (never forgotten, unlike `known`).
    #[serde(default)]
    pub reported: Arc<CanonicalFields>,
    /// The commit time of the newest event this side reported.
    #[serde(default)]
    pub reported_ts_ms: i64,
    /// Per field, the values the side is known to have held (as hashes): sent to it (with the
    /// engine time they were queued) or reported by it (with the event's commit time); newest
    /// last, at most [`HELD_VALUES_MAX`] per field. A side's event may carry any of them as a
    /// stale copy: a late echo, a snapshot taken before a newer write, or a replayed old event.
    /// Shared until written, like the record's history: most saves do not touch it.
    #[serde(default)]
    pub held_values: Arc<BTreeMap<String, VecDeque<HeldValue>>>,
    /// The highest stream sequence of this side's events applied. A side's events reach the
    /// engine in stream order unless something handed them back out of order; one that comes
    /// below it, and is no duplicate, is applied late (see [`Decision::late`]).
    #[serde(default)]
    pub applied_sequence: u64,
    /// Engine time until which deliveries to this side wait for a request of a dead engine
    /// run that may still land (a restored line's hold, see `book`); 0 when none.
    #[serde(default)]
    pub hold_until_ms: i64,
}

/// One value a side held: (earliest time, hash of the value, whether it only ever came from
/// the engine's deliveries rather than from the side's own reports).
pub type HeldValue = (i64, u64, bool);

/// How many held values per field and side are remembered for telling stale copies from edits.
pub const HELD_VALUES_MAX: usize = 128;

/// A stable 64-bit hash of a JSON value (FNV-1a of its canonical text), written straight into
/// the hash rather than into a string first.
pub fn value_hash(value: &Value) -> u64 {
    struct Fnv(u64);
    impl std::io::Write for Fnv {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            for b in bytes {
                self.0 ^= u64::from(*b);
                self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
            }
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
    // Writing JSON into a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut hash, value);
    hash.0
}

impl Default for SideState {
    fn default() -> Self {
        SideState {
            known: Known::Unknown,
            last_delivery_ms: None,
            echoes_due: Arc::default(),
            reported: Arc::default(),
            reported_ts_ms: 0,
            held_values: Arc::default(),
            applied_sequence: 0,
            hold_until_ms: 0,
        }
    }
}

/// How many unsettled deliveries a user's stored state remembers. Beyond it the oldest are
/// forgotten: after a crash their events still resync the side (state-based), but under the
/// id of the first redelivered event instead of each their own.
pub const OUTBOX_MAX: usize = 1024;

/// A delivery decided but not yet settled, kept with the state so that a crash between the
/// merge and the delivery re-sends exactly it when its event comes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub event_id: String,
    pub send: Send,
    /// The event's subject and text, so a delivery restored after a crash can still be
    /// dead-lettered in a replayable form before its message comes back.
    /// Shared: the sync state is copied on every save, and one event's text sits in the
    /// entry of each of its deliveries.
    #[serde(default)]
    pub subject: Arc<str>,
    #[serde(default)]
    pub raw: Arc<str>,
}

/// Everything the engine keeps durable about one user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub record: UserRecord,
    pub better_auth: SideState,
    pub payload: SideState,
    /// Deliveries decided and not yet accepted or dead-lettered, oldest first.
    #[serde(default)]
    pub outbox: VecDeque<OutboxEntry>,
    /// How many times the canonical user was sent again for an event already handled; gives
    /// such sends a fresh `webhook-id` (see [`Decision`]).
    #[serde(default)]
    pub resends: u64,
    /// Ids of events applied whose messages are not yet settled, oldest first (at most
    /// [`UNSETTLED_MAX`]). Unlike the record's recent ids they are not pushed out by newer
    /// events, so a message that keeps coming back is recognised however long it takes.
    #[serde(default)]
    pub unsettled: VecDeque<Arc<str>>,
    /// The highest `timestamp` sent for this user: deliveries carry non-decreasing
    /// timestamps, so a receiver can refuse anything older than what it applied, even when a
    /// late, older event moved a field's write time back.
    #[serde(default)]
    pub sent_ts_ms: i64,
}

/// A bound on remembered unsettled ids per user (`engine.max_in_flight` bounds them anyway).
pub const UNSETTLED_MAX: usize = 1024;

/// What an event was, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Merged into the canonical user.
    Merged(MergeOutcome),
    /// The side reported a state the engine delivered to it: not a write.
    Echo,
    /// This event id was applied before.
    Duplicate,
    /// A resync request: the canonical user is sent to the side it names, whatever that side
    /// is believed to hold; nothing is merged.
    Resync,
}

/// One delivery the state machine asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Send {
    pub side: Origin,
    /// The event id, or `<event id>:resync` when it goes back to the event's origin.
    pub webhook_id: String,
    pub event_type: EventType,
    /// The canonical user (`Holds`) or its deletion (`Deleted`).
    pub state: Known,
    /// The latest write time of the canonical user.
    pub timestamp_ms: i64,
}

/// The outcome of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub sends: Vec<Send>,
    /// The sends come from the stored outbox: queue them, do not record them again.
    pub replayed: bool,
    /// The event was applied after a later event of its side (by stream sequence): whatever
    /// it would have sent in its place may be lost (`sync_engine_late_events_total`).
    pub late: bool,
}

/// Switches that deliberately break the machine, so the simulator can prove it notices.
/// All off in production.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Apply events as they come instead of merging by timestamp.
    pub skip_merge: bool,
    /// Take every event as a write, echoes included.
    pub no_echo_suppression: bool,
    /// Recognise an echo only against the latest delivery.
    pub echo_last_only: bool,
    /// Never send the canonical user back to an event's origin.
    pub no_resync: bool,
    /// Take resync requests in, but send nothing for them.
    pub ignore_resync_requests: bool,
}

/// The rules' parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// `engine.clock_skew`, in milliseconds.
    pub clock_skew_ms: i64,
    pub faults: Faults,
}

/// One validated event, in canonical field names.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    pub id: &'a str,
    pub origin: Origin,
    pub event_type: EventType,
    pub timestamp_ms: i64,
    /// The event's place in its origin's order (stream sequence); 0 when unknown.
    pub sequence: u64,
    pub fields: &'a CanonicalFields,
}

impl SideState {
    /// Remembers `fields` as values this side held at `at_ms`. A value seen before keeps its
    /// first time: the earliest it could have been there is what matters.
    fn remember_held(&mut self, fields: &CanonicalFields, at_ms: i64, sent: bool) {
        for (name, value) in fields {
            let held = Arc::make_mut(&mut self.held_values)
                .entry(name.clone())
                .or_default();
            let hash = value_hash(value);
            if let Some(entry) = held.iter_mut().find(|(_, h, _)| *h == hash) {
                entry.0 = entry.0.min(at_ms);
                entry.2 &= sent;
                continue;
            }
            if held.len() >= HELD_VALUES_MAX {
                held.pop_front();
            }
            held.push_back((at_ms, hash, sent));
        }
    }
}

impl SyncState {
    pub fn side(&self, side: Origin) -> &SideState {
        match side {
            Origin::BetterAuth => &self.better_auth,
            Origin::Payload => &self.payload,
        }
    }

    pub fn side_mut(&mut self, side: Origin) -> &mut SideState {
        match side {
            Origin::BetterAuth => &mut self.better_auth,
            Origin::Payload => &mut self.payload,
        }
    }

    /// The state every side should hold.
    pub fn target_state(&self) -> Known {
        if self.record.is_deleted() {
            Known::Deleted
        } else {
            Known::holds(self.record.canonical_fields())
        }
    }

    /// Applies one event. `expected(side)` is the state of the last delivery already queued for
    /// that side, if any: a side that will hold the canonical user once its queue drains is
    /// not sent it twice. `queued(event_id)` says whether deliveries of that event are waiting
    /// in memory already.
    ///
    /// A duplicate whose deliveries are in the stored outbox (the engine crashed before they
    /// settled) gets exactly those again, marked [`Decision::replayed`]: they are queued but not
    /// recorded a second time.
    pub fn on_event(
        &mut self,
        event: EventView<'_>,
        policy: &Policy,
        expected: &dyn Fn(Origin) -> Option<Known>,
        queued: &dyn Fn(&str) -> bool,
    ) -> Decision {
        if event.event_type == EventType::Resync {
            return self.on_resync(event, policy, queued);
        }
        // An event older than one its side already reported may have been handled before and
        // forgotten (a republish after the dedup memory was lost): its ids are not safe either.
        let stale = event.timestamp_ms < self.side(event.origin).reported_ts_ms;
        let applied = self.side(event.origin).applied_sequence;
        let verdict = self.classify_and_apply(event, policy);
        let late =
            matches!(verdict, Verdict::Merged(_)) && event.sequence > 0 && event.sequence < applied;
        if verdict != Verdict::Duplicate {
            let side = self.side_mut(event.origin);
            side.applied_sequence = side.applied_sequence.max(event.sequence);
        }
        if verdict == Verdict::Duplicate {
            if let Some(decision) = self.pending_for(event.id, queued) {
                return decision;
            }
        }
        // A duplicate that still finds a side behind (a replayed dead letter, a redelivery
        // after its deliveries settled): its event's ids may already have been applied with
        // older content, and receivers skip ids they applied, so it goes under a fresh one.
        let resend = (verdict == Verdict::Duplicate || stale).then(|| {
            self.resends += 1;
            self.resends
        });
        let mut sends = Vec::new();
        let target = self.target_state();
        let timestamp_ms = self.record.latest_ts().max(self.sent_ts_ms);
        for side in Origin::ALL {
            if policy.faults.no_resync && side == event.origin {
                continue;
            }
            let expected = expected(side).unwrap_or_else(|| self.side(side).known.clone());
            if expected.same_as(&target) {
                continue;
            }
            let resync = side == event.origin;
            let event_type = match (&target, resync) {
                (Known::Deleted, _) => EventType::Deleted,
                (_, true) => EventType::Updated,
                (_, false) if event.event_type == EventType::Deleted => EventType::Updated,
                (_, false) => event.event_type,
            };
            sends.push(Send {
                side,
                webhook_id: match resend {
                    Some(n) => format!("{}{RESYNC_SUFFIX}-{n}", event.id),
                    None => webhook_id(event.id, event.origin, side),
                },
                event_type,
                state: target.clone(),
                timestamp_ms,
            });
        }
        if !sends.is_empty() {
            self.sent_ts_ms = timestamp_ms;
        }
        Decision {
            verdict,
            sends,
            replayed: false,
            late,
        }
    }

    /// For a duplicate: nothing when its deliveries wait in memory already, or those of the
    /// stored outbox (the engine crashed before they settled), marked replayed.
    fn pending_for(&self, event_id: &str, queued: &dyn Fn(&str) -> bool) -> Option<Decision> {
        let decision = |sends: Vec<Send>, replayed| Decision {
            verdict: Verdict::Duplicate,
            sends,
            replayed,
            late: false,
        };
        if queued(event_id) {
            return Some(decision(Vec::new(), false));
        }
        let stored: Vec<Send> = self
            .outbox
            .iter()
            .filter(|e| e.event_id == event_id)
            .map(|e| e.send.clone())
            .collect();
        (!stored.is_empty()).then(|| decision(stored, true))
    }

    /// A resync request from `event.origin`: the other side gets the canonical user, whatever
    /// it is believed to hold, and is no longer believed to hold anything else. A request seen
    /// before sends nothing new (its stored delivery, if it never settled); one for a user the
    /// engine never heard of sends nothing.
    ///
    /// The delivery goes under `<request id>:resync-<n>`, not the request's bare id: a request
    /// republished after its id was forgotten (by the dedup store and the recent ids alike)
    /// would otherwise send other content under an id a receiver already applied.
    fn on_resync(
        &mut self,
        event: EventView<'_>,
        policy: &Policy,
        queued: &dyn Fn(&str) -> bool,
    ) -> Decision {
        let mut decision = Decision {
            verdict: Verdict::Duplicate,
            sends: Vec::new(),
            replayed: false,
            late: false,
        };
        if !self.first_sight(event.id) {
            return self.pending_for(event.id, queued).unwrap_or(decision);
        }
        decision.verdict = Verdict::Resync;
        self.record.remember(event.id);
        let known = self.record.is_deleted() || !self.record.fields.is_empty();
        if !known || policy.faults.ignore_resync_requests {
            return decision;
        }
        let target = self.target_state();
        let timestamp_ms = self.record.latest_ts().max(self.sent_ts_ms);
        let side = event.origin.other();
        self.side_mut(side).known = Known::Unknown;
        self.sent_ts_ms = timestamp_ms;
        self.resends += 1;
        decision.sends.push(Send {
            side,
            webhook_id: format!("{}{RESYNC_SUFFIX}-{}", event.id, self.resends),
            event_type: match target {
                Known::Deleted => EventType::Deleted,
                _ => EventType::Updated,
            },
            state: target,
            timestamp_ms,
        });
        decision
    }

    /// Whether `event_id` is new to this user; if so it is remembered as unsettled.
    fn first_sight(&mut self, event_id: &str) -> bool {
        if self.record.has_seen(event_id) || self.unsettled.iter().any(|id| &**id == event_id) {
            return false;
        }
        if self.unsettled.len() >= UNSETTLED_MAX {
            self.unsettled.pop_front();
        }
        self.unsettled.push_back(event_id.into());
        true
    }

    fn classify_and_apply(&mut self, event: EventView<'_>, policy: &Policy) -> Verdict {
        if !self.first_sight(event.id) {
            return Verdict::Duplicate;
        }
        if event.event_type != EventType::Deleted
            && !self.record.is_deleted()
            && !policy.faults.no_echo_suppression
            && self.take_echo(event.origin, event.fields, policy.faults.echo_last_only)
        {
            self.record.remember(event.id);
            // A late echo (redelivered after newer events of its side) still tells that its
            // side held these values at its commit time: a write first seen in a newer
            // snapshot moves back, or a later edit of the other side would lose to it.
            let applied = self.side(event.origin).applied_sequence;
            if event.sequence > 0 && event.sequence < applied {
                self.record
                    .backdate(event.origin, event.timestamp_ms, event.fields);
            }
            return Verdict::Echo;
        }
        let skew = policy.clock_skew_ms;
        let in_window = self
            .side(event.origin)
            .last_delivery_ms
            .is_some_and(|at| event.timestamp_ms <= at.saturating_add(skew));
        let outcome = if policy.faults.skip_merge {
            self.apply_blindly(event)
        } else {
            let written = self.written_fields(event, skew, policy.faults.echo_last_only);
            let outcome = self.record.merge_seq(
                event.id,
                event.origin,
                event.event_type,
                event.timestamp_ms,
                event.sequence,
                &written,
            );
            let backdated = self
                .record
                .backdate(event.origin, event.timestamp_ms, event.fields);
            match outcome {
                MergeOutcome::Unchanged if backdated => MergeOutcome::Changed,
                other => other,
            }
        };
        let side = self.side_mut(event.origin);
        side.remember_held(event.fields, event.timestamp_ms, false);
        if event.timestamp_ms >= side.reported_ts_ms {
            Arc::make_mut(&mut side.reported)
                .extend(event.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
            side.reported_ts_ms = event.timestamp_ms;
        }
        let was_deleted = matches!(side.known, Known::Deleted);
        side.known = match (event.event_type, &side.known) {
            (EventType::Deleted, _) => Known::Deleted,
            (_, Known::Holds(held)) => {
                let mut held = CanonicalFields::clone(held);
                held.extend(event.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                Known::holds(held)
            }
            (_, _) => Known::holds(event.fields.clone()),
        };
        // A delivery may have landed after this write and replaced it: what the side holds
        // now is not what it reported. A deletion too, unless the side was already known to
        // hold none: receivers create a user an update does not find, so a live state
        // delivered after the side's deletion brings the user back.
        let replaced = match event.event_type {
            EventType::Deleted => !was_deleted,
            _ => true,
        };
        if in_window && replaced {
            side.known = Known::Unknown;
        }
        Verdict::Merged(outcome)
    }

    /// The fields an event actually wrote. Applications publish the whole user, not what
    /// changed, so a field counts as written only if its value is none the side may already
    /// have held: not what it last reported, not what it is known to hold, and not any state
    /// the engine sent it before the write (within the clock skew). Counting such stale copies
    /// as writes would let them overwrite newer edits made on the other side.
    ///
    /// `only_reported` is the broken variant `echo_last_only`: delivered values count as held
    /// only through the last delivery (`known`), the way an engine that remembers only its
    /// last delivery would see them.
    fn written_fields(
        &self,
        event: EventView<'_>,
        skew_ms: i64,
        only_reported: bool,
    ) -> CanonicalFields {
        if event.event_type == EventType::Created {
            return event.fields.clone();
        }
        let side = self.side(event.origin);
        let held = |name: &str, value: &Value| {
            let same = |v: Option<&Value>| v.unwrap_or(&Value::Null) == value;
            let known = match &side.known {
                Known::Holds(fields) => same(fields.get(name)),
                _ => false,
            };
            known
                || (side.reported.contains_key(name) && same(side.reported.get(name)))
                || side.held_values.get(name).is_some_and(|held| {
                    let hash = value_hash(value);
                    let before = event.timestamp_ms.saturating_add(skew_ms);
                    held.iter().any(|(at, h, sent)| {
                        *h == hash && *at <= before && !(only_reported && *sent)
                    })
                })
        };
        event
            .fields
            .iter()
            .filter(|(name, value)| !held(name, value))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect()
    }

    /// Whether `fields` from `side` report a state the engine sent it; consumes that echo. The
    /// echo of the latest state sent also tells what the side holds now.
    fn take_echo(&mut self, side: Origin, fields: &CanonicalFields, last_only: bool) -> bool {
        let side_state = self.side_mut(side);
        let due = &side_state.echoes_due;
        let matches = |state: &Known| match state {
            Known::Holds(sent) => fields
                .iter()
                .all(|(k, v)| sent.get(k).unwrap_or(&Value::Null) == v),
            _ => false,
        };
        let found = if last_only {
            due.back().is_some_and(matches).then(|| due.len() - 1)
        } else {
            due.iter().position(matches)
        };
        match found {
            Some(index) => {
                let latest = index + 1 == due.len();
                if let Some(state) = Arc::make_mut(&mut side_state.echoes_due).remove(index) {
                    if latest {
                        side_state.known = state;
                    }
                }
                true
            }
            None => false,
        }
    }

    /// The broken variant of the merge: the last event to arrive wins every field it carries.
    fn apply_blindly(&mut self, event: EventView<'_>) -> MergeOutcome {
        let record = &mut self.record;
        record.remember(event.id);
        if record.is_deleted() {
            return MergeOutcome::AlreadyDeleted;
        }
        if event.event_type == EventType::Deleted {
            record.deleted_at = Some(event.timestamp_ms);
            return MergeOutcome::Deleted;
        }
        for (name, value) in event.fields {
            Arc::make_mut(&mut record.fields).insert(
                name.clone(),
                protocol::FieldStamp {
                    value: value.clone(),
                    ts: event.timestamp_ms,
                    origin: event.origin,
                    seq: event.sequence,
                },
            );
        }
        MergeOutcome::Changed
    }

    /// `send`, decided for `event_id` (from `subject`, text `raw`) at engine time `now_ms`, was
    /// queued: it is remembered until it settles, and its echo (or stale copies of it) may
    /// come back from now on.
    pub fn on_queued(
        &mut self,
        event_id: &str,
        send: &Send,
        now_ms: i64,
        subject: &Arc<str>,
        raw: &Arc<str>,
    ) {
        let side = self.side_mut(send.side);
        let due = Arc::make_mut(&mut side.echoes_due);
        if due.len() >= ECHOES_DUE_MAX {
            due.pop_front();
        }
        due.push_back(send.state.clone());
        if let Known::Holds(fields) = &send.state {
            side.remember_held(fields, now_ms, true);
        }
        if self.outbox.len() >= OUTBOX_MAX {
            self.outbox.pop_front();
        }
        self.outbox.push_back(OutboxEntry {
            event_id: event_id.to_string(),
            send: send.clone(),
            subject: subject.clone(),
            raw: raw.clone(),
        });
    }

    /// The message of `event_id` was settled (acknowledged): its id no longer needs keeping
    /// beyond the record's recent ids. Saved with the next change of the state.
    pub fn on_settled(&mut self, event_id: &str) {
        if let Some(index) = self.unsettled.iter().position(|id| &**id == event_id) {
            self.unsettled.remove(index);
        }
    }

    /// A delivery to `side` covering `event_ids` settled; it is no longer owed.
    fn settle(&mut self, side: Origin, event_ids: &[String]) {
        self.outbox
            .retain(|e| e.send.side != side || !event_ids.contains(&e.event_id));
    }

    /// `side` accepted a delivery of `state`, covering `event_ids`, at engine time `now_ms`.
    pub fn on_delivered(&mut self, side: Origin, state: &Known, event_ids: &[String], now_ms: i64) {
        self.settle(side, event_ids);
        let side = self.side_mut(side);
        side.known = state.clone();
        side.last_delivery_ms = Some(now_ms);
    }

    /// A delivery to `side` of `state`, covering `event_ids`, was dead-lettered: what the side
    /// holds is unchanged, and the delivery is no longer owed (a replay of the dead letter
    /// decides anew). Its state is no longer an echo due: an event of that side carrying it
    /// would otherwise pass for the echo of a write that never happened, and the side would be
    /// taken to hold what it was never given. (Had an attempt been applied with its answer
    /// lost, its values are still among the side's held values, so its echo is no write.)
    pub fn on_dead_lettered(&mut self, side: Origin, state: &Known, event_ids: &[String]) {
        self.settle(side, event_ids);
        let due = &mut self.side_mut(side).echoes_due;
        if let Some(index) = due.iter().rposition(|sent| sent == state) {
            Arc::make_mut(due).remove(index);
        }
    }
}

#[cfg(test)]
mod tests;
