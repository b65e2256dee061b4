//! The merge rule of PROTOCOL.md §5.4: field-level last-writer-wins by `timestamp`, with
//! deletion final.
//!
//! Per field the record keeps the timestamp and origin of the write it holds. An incoming write
//! wins a field when it is newer; on a tie `better-auth` beats `payload`, and between two writes
//! of the same origin the later event wins (each origin's own order is its commit order). Event
//! ids already applied are remembered, so a duplicate arriving out of place cannot revert a
//! same-timestamp field; this is what makes the result independent of the interleaving.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::envelope::{EventType, Origin};
use crate::user::{CanonicalFields, CanonicalUser, ID};

/// How many applied event ids a record remembers. Duplicates older than this are caught by
/// the dedup store; this window only has to cover reordering inside one user's backlog.
pub const RECENT_IDS_MAX: usize = 64;

/// The write a field's value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldStamp {
    pub value: Value,
    /// Commit time at the origin, milliseconds since the epoch.
    pub ts: i64,
    pub origin: Origin,
    /// The origin's order of the write (the stream sequence of its event), for ties of one
    /// origin within the same millisecond; 0 when unknown, and then arrival order decides.
    #[serde(default)]
    pub seq: u64,
}

/// The canonical state of one user: fields with their stamps, and the tombstone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Shared until written (see `history`).
    pub fields: Arc<BTreeMap<String, FieldStamp>>,
    /// Set once by the first `user.deleted`; nothing lifts it (Better Auth never reuses ids).
    pub deleted_at: Option<i64>,
    /// Ids of the latest applied events, oldest first, at most [`RECENT_IDS_MAX`].
    /// Shared strings: the record is copied on every save of the user's state.
    pub recent_ids: VecDeque<Arc<str>>,
    /// Per field, the latest writes (winners and losers, in the order they were applied), at
    /// most [`HISTORY_MAX`]: what [`UserRecord::backdate`] re-decides from.
    /// Shared until written: the record is copied on every save of the user's state, and most
    /// saves (after a delivery) do not touch the history.
    #[serde(default)]
    pub history: Arc<BTreeMap<String, Vec<FieldStamp>>>,
}

/// How many writes per field the record keeps for re-deciding a winner.
pub const HISTORY_MAX: usize = 8;

/// What applying one event did to the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOutcome {
    /// At least one canonical field changed value.
    Changed,
    /// Every field lost to a newer write or already held the value.
    Unchanged,
    /// The user was deleted by this event.
    Deleted,
    /// The user was already deleted; the event changes nothing.
    AlreadyDeleted,
    /// This event id was applied before.
    Duplicate,
}

/// Does a write of `(ts, origin)` beat the held stamp? Same-origin ties go to the incoming
/// write because events of one origin are applied in that origin's commit order.
pub fn wins(ts: i64, origin: Origin, held: &FieldStamp) -> bool {
    wins_seq(ts, origin, 0, held)
}

/// [`wins`], where a tie within one origin goes to the write later in that origin's order
/// (`seq`), and to the later arrival when the order is unknown (0) on either side.
pub fn wins_seq(ts: i64, origin: Origin, seq: u64, held: &FieldStamp) -> bool {
    if ts != held.ts {
        return ts > held.ts;
    }
    if origin == held.origin {
        return seq == 0 || held.seq == 0 || seq >= held.seq;
    }
    origin == Origin::BetterAuth
}

impl UserRecord {
    pub fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }

    pub fn has_seen(&self, event_id: &str) -> bool {
        self.recent_ids.iter().any(|id| &**id == event_id)
    }

    /// Records an applied (or recognised) event id, forgetting the oldest beyond the bound.
    pub fn remember(&mut self, event_id: &str) {
        if self.recent_ids.len() >= RECENT_IDS_MAX {
            self.recent_ids.pop_front();
        }
        self.recent_ids.push_back(event_id.into());
    }

    /// Applies one event's fields (canonical names) to the record.
    pub fn merge(
        &mut self,
        event_id: &str,
        origin: Origin,
        event_type: EventType,
        ts: i64,
        fields: &CanonicalFields,
    ) -> MergeOutcome {
        self.merge_seq(event_id, origin, event_type, ts, 0, fields)
    }

    /// [`UserRecord::merge`] of a write whose place in its origin's order is `seq`.
    pub fn merge_seq(
        &mut self,
        event_id: &str,
        origin: Origin,
        event_type: EventType,
        ts: i64,
        seq: u64,
        fields: &CanonicalFields,
    ) -> MergeOutcome {
        if self.has_seen(event_id) {
            return MergeOutcome::Duplicate;
        }
        self.remember(event_id);
        if self.is_deleted() {
            return MergeOutcome::AlreadyDeleted;
        }
        if event_type == EventType::Deleted {
            self.deleted_at = Some(ts);
            // The id stays so that a deletion delivered to a side still names the user.
            if let Some(id) = fields.get(ID) {
                Arc::make_mut(&mut self.fields)
                    .entry(ID.to_string())
                    .or_insert(FieldStamp {
                        value: id.clone(),
                        ts,
                        origin,
                        seq,
                    });
            }
            return MergeOutcome::Deleted;
        }
        let mut changed = false;
        for (name, value) in fields {
            let write = FieldStamp {
                value: value.clone(),
                ts,
                origin,
                seq,
            };
            self.remember_write(name, write.clone());
            match self.fields.get(name) {
                Some(held) if !wins_seq(ts, origin, seq, held) => {}
                Some(held) => {
                    changed |= held.value != *value;
                    Arc::make_mut(&mut self.fields).insert(name.clone(), write);
                }
                None => {
                    changed = true;
                    Arc::make_mut(&mut self.fields).insert(name.clone(), write);
                }
            }
        }
        if changed {
            MergeOutcome::Changed
        } else {
            MergeOutcome::Unchanged
        }
    }

    fn remember_write(&mut self, name: &str, write: FieldStamp) {
        let winner_ts = self.fields.get(name).map(|w| (w.ts, w.origin));
        let history = Arc::make_mut(&mut self.history)
            .entry(name.to_string())
            .or_default();
        history.push(write);
        if history.len() > HISTORY_MAX {
            // Forget the oldest write that is not the current winner.
            let oldest = history
                .iter()
                .enumerate()
                .filter(|(_, w)| Some((w.ts, w.origin)) != winner_ts)
                .min_by_key(|(_, w)| w.ts)
                .map(|(i, _)| i);
            if let Some(index) = oldest {
                history.remove(index);
            }
        }
    }

    /// An event of `origin` committed at `ts` reports `reported`: every value in it existed on
    /// that side at `ts` already. A write of `origin` with the same value that was stamped
    /// later (it was first seen in a snapshot processed before this older one, after a
    /// redelivery reordered them) is moved back to `ts`, and the field's winner re-decided.
    /// Returns whether the canonical user changed.
    pub fn backdate(&mut self, origin: Origin, ts: i64, reported: &CanonicalFields) -> bool {
        if self.is_deleted() {
            return false;
        }
        let mut changed = false;
        for (name, value) in reported {
            let stale = |w: &FieldStamp| w.origin == origin && w.value == *value && w.ts > ts;
            // Looked at before written, so that the shared history is copied only when it moves.
            if !self
                .history
                .get(name)
                .is_some_and(|history| history.iter().any(stale))
            {
                continue;
            }
            let Some(history) = Arc::make_mut(&mut self.history).get_mut(name) else {
                continue;
            };
            let mut moved = false;
            for write in history.iter_mut() {
                if write.origin == origin && write.value == *value && write.ts > ts {
                    write.ts = ts;
                    moved = true;
                }
            }
            if !moved {
                continue;
            }
            let mut winner: Option<&FieldStamp> = None;
            for write in history.iter() {
                if winner.is_none_or(|held| wins_seq(write.ts, write.origin, write.seq, held)) {
                    winner = Some(write);
                }
            }
            if let Some(winner) = winner.cloned() {
                let before = self.fields.get(name).map(|w| w.value.clone());
                changed |= before.as_ref() != Some(&winner.value);
                Arc::make_mut(&mut self.fields).insert(name.clone(), winner);
            }
        }
        changed
    }

    /// The canonical user: each field's winning value.
    pub fn canonical(&self) -> CanonicalUser {
        CanonicalUser {
            fields: self.canonical_fields(),
        }
    }

    pub fn canonical_fields(&self) -> CanonicalFields {
        self.fields
            .iter()
            .map(|(name, stamp)| (name.clone(), stamp.value.clone()))
            .collect()
    }

    /// The latest write time held by any field, or the deletion time.
    pub fn latest_ts(&self) -> i64 {
        let fields = self.fields.values().map(|s| s.ts).max().unwrap_or(0);
        fields.max(self.deleted_at.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> CanonicalFields {
        match v {
            Value::Object(m) => m.into_iter().collect(),
            _ => CanonicalFields::new(),
        }
    }

    #[test]
    fn newer_write_wins_per_field() {
        let mut r = UserRecord::default();
        let ba = Origin::BetterAuth;
        let pl = Origin::Payload;
        let up = EventType::Updated;
        r.merge("e1", ba, up, 2, &fields(json!({"id":"u","name":"A"})));
        assert_eq!(
            r.merge("e2", pl, up, 1, &fields(json!({"id":"u","name":"B"}))),
            MergeOutcome::Unchanged
        );
        assert_eq!(r.canonical_fields()["name"], json!("A"));
        // Different fields edited concurrently both survive.
        r.merge("e3", pl, up, 1, &fields(json!({"id":"u","email":"p@x"})));
        assert_eq!(r.canonical_fields()["email"], json!("p@x"));
        assert_eq!(r.canonical_fields()["name"], json!("A"));
    }

    #[test]
    fn ties_go_to_better_auth_and_same_origin_to_the_later_event() {
        let mut r = UserRecord::default();
        let up = EventType::Updated;
        r.merge("p1", Origin::Payload, up, 5, &fields(json!({"name":"P"})));
        r.merge(
            "b1",
            Origin::BetterAuth,
            up,
            5,
            &fields(json!({"name":"B"})),
        );
        assert_eq!(r.canonical_fields()["name"], json!("B"));
        r.merge("p2", Origin::Payload, up, 5, &fields(json!({"name":"P2"})));
        assert_eq!(r.canonical_fields()["name"], json!("B"));
        r.merge(
            "b2",
            Origin::BetterAuth,
            up,
            5,
            &fields(json!({"name":"B2"})),
        );
        assert_eq!(r.canonical_fields()["name"], json!("B2"));
    }

    #[test]
    fn a_late_older_snapshot_backdates_a_value_first_seen_later() {
        let mut r = UserRecord::default();
        let up = EventType::Updated;
        // Better Auth's snapshot at t=20 is processed first; it carries the image Better Auth
        // really wrote at t=5 (that event comes later, reordered by a redelivery).
        r.merge(
            "b20",
            Origin::BetterAuth,
            up,
            20,
            &fields(json!({"image":"old"})),
        );
        // Payload's concurrent edit at t=20 loses the tie to the misdated write.
        r.merge(
            "p20",
            Origin::Payload,
            up,
            20,
            &fields(json!({"image":"new"})),
        );
        assert_eq!(r.canonical_fields()["image"], json!("old"));
        // The older event arrives: "old" existed at t=5, so Payload's t=20 edit wins.
        assert!(r.backdate(Origin::BetterAuth, 5, &fields(json!({"image":"old"}))));
        assert_eq!(r.canonical_fields()["image"], json!("new"));
    }

    #[test]
    fn deletion_is_final() {
        let mut r = UserRecord::default();
        r.merge(
            "e1",
            Origin::BetterAuth,
            EventType::Created,
            1,
            &fields(json!({"id":"u"})),
        );
        assert_eq!(
            r.merge(
                "e2",
                Origin::BetterAuth,
                EventType::Deleted,
                2,
                &fields(json!({"id":"u"}))
            ),
            MergeOutcome::Deleted
        );
        assert_eq!(
            r.merge(
                "e3",
                Origin::Payload,
                EventType::Updated,
                99,
                &fields(json!({"name":"X"}))
            ),
            MergeOutcome::AlreadyDeleted
        );
        assert!(r.is_deleted());
        assert_eq!(
            r.merge(
                "e3",
                Origin::Payload,
                EventType::Updated,
                99,
                &fields(json!({}))
            ),
            MergeOutcome::Duplicate
        );
    }
}
