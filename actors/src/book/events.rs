//! Loading the stored state and applying events.

use std::sync::Arc;

use bytes::Bytes;

use protocol::Origin;

use super::{Action, Applied, Arrival, Book, Held, Hold, Pending, RESTORED_MARGIN_MS};
use crate::ports::DeadLetter;
use crate::sync::{EventView, Send, SyncState, Verdict};

impl<M> Book<M> {
    /// The stored state, loaded before the first event. Deliveries its outbox still owes (the
    /// engine stopped before they settled) go to the head of their lines at once, in their
    /// original order, ahead of anything newer: their events may come back late, after newer
    /// ones, and must not be overtaken.
    pub fn on_loaded(&mut self, loaded: SyncState, now_ms: i64) {
        assert!(self.sync.is_none(), "a user's state is loaded once");
        let owed: Vec<_> = loaded.outbox.iter().cloned().collect();
        self.sync = Some(loaded);
        let restored = !owed.is_empty();
        for entry in owed {
            if self.settings.target(entry.send.side).is_none() {
                continue;
            }
            let line = self.line(entry.send.side);
            match line
                .queue
                .iter_mut()
                .find(|p| p.send.webhook_id == entry.send.webhook_id)
            {
                Some(pending) => pending.event_ids.push(entry.event_id),
                None => line.queue.push_back(Pending {
                    send: entry.send,
                    waiting: Vec::new(),
                    attempts: 0,
                    subject: entry.subject.to_string(),
                    raw: Bytes::copy_from_slice(entry.raw.as_bytes()),
                    event_ids: vec![entry.event_id],
                    // Loaded, hence durable.
                    generation: 0,
                    letter: None,
                }),
            }
        }
        self.hold_restored_lines(restored, now_ms);
    }

    /// Deliveries a user's stored outbox still owes may have been in flight from the engine
    /// run that died: a request already written reaches the receiver after its sender's death,
    /// as late as the target's timeout. Only a line's head is ever in flight, and sending the
    /// head again is harmless (same `webhook-id`, same content), but a newer delivery must not
    /// overtake the dead run's request: so a restored line sends its head at once and what is
    /// behind it only once the target's timeout plus a second has passed since this run
    /// started. The hold's end is kept with the state: should the head be dead-lettered and
    /// the user's actor stop, the dead run's request may still land, and a later load holds
    /// the user's next delivery until then all the same.
    fn hold_restored_lines(&mut self, restored: bool, now_ms: i64) {
        for side in Origin::ALL {
            let Some(target) = self.settings.target(side) else {
                continue;
            };
            let timeout_ms = i64::try_from(target.timeout.as_millis()).unwrap_or(i64::MAX);
            let until_ms = self
                .settings
                .started_at_ms
                .saturating_add(timeout_ms)
                .saturating_add(RESTORED_MARGIN_MS);
            let kept_until_ms = self.sync.as_ref().map_or(0, |s| s.side(side).hold_until_ms);
            let head = self
                .line(side)
                .queue
                .front()
                .map(|p| p.send.webhook_id.clone());
            let hold = match head {
                Some(head) if restored && now_ms < until_ms => {
                    let until_ms = until_ms.max(kept_until_ms);
                    if let Some(sync) = self.sync.as_mut() {
                        sync.side_mut(side).hold_until_ms = until_ms;
                    }
                    // An earlier dead run's request may still land too: then even this
                    // head, which may be the last run's, must not overtake it.
                    let head = if now_ms < kept_until_ms {
                        String::new()
                    } else {
                        head
                    };
                    Hold { head, until_ms }
                }
                // No head is exempt: the one the dead run may have sent is settled.
                _ if now_ms < kept_until_ms => Hold {
                    head: String::new(),
                    until_ms: kept_until_ms,
                },
                _ => continue,
            };
            self.line(side).hold = Some(hold);
        }
    }

    /// Applies one event (the state is loaded). Its message is held until its effect is
    /// durable; a poisoned user's message is a dead letter at once.
    pub fn on_event(
        &mut self,
        view: EventView<'_>,
        arrival: Arrival<M>,
        now_ms: i64,
    ) -> (Option<Applied>, Vec<Action<M>>) {
        if let Some(poison) = &self.poison {
            let letter = letter_of(
                &arrival.subject,
                &arrival.raw,
                view.id,
                arrival.sink,
                poison,
                now_ms,
            );
            let message = arrival.message;
            return (None, vec![Action::Reject { message, letter }]);
        }
        let already_queued = self.lines.iter().any(|line| {
            line.queue
                .iter()
                .any(|p| p.event_ids.iter().any(|id| id == view.id))
        });
        let tails = [0, 1].map(|i| self.lines[i].queue.back().map(|p| p.send.state.clone()));
        let policy = self.settings.policy;
        let Some(sync) = self.sync.as_mut() else {
            return (
                None,
                vec![Action::Return {
                    message: arrival.message,
                }],
            );
        };
        let expected = |side: Origin| tails[super::index(side)].clone();
        let decision = sync.on_event(view, &policy, &expected, &|_| already_queued);
        let settings = self.settings.clone();
        let sends: Vec<Send> = decision
            .sends
            .into_iter()
            .filter(|s| settings.target(s.side).is_some())
            .collect();
        if !decision.replayed {
            // Envelopes were parsed from UTF-8 JSON, so the text is the message byte for byte.
            let raw: Arc<str> = String::from_utf8_lossy(&arrival.raw).into();
            let subject: Arc<str> = arrival.subject.as_str().into();
            for send in &sends {
                sync.on_queued(view.id, send, now_ms, &subject, &raw);
            }
        }
        let applied = Applied {
            verdict: decision.verdict,
            late: decision.late,
            sends: sends.len(),
        };
        let seq = self.hold(view.id, arrival);
        self.queue_sends(seq, view.id, sends);
        if decision.verdict == Verdict::Duplicate && already_queued {
            self.attach_to_queued(seq, view.id);
        }
        let mut actions = Vec::new();
        for side in Origin::ALL {
            self.pump(side, now_ms, &mut actions);
        }
        (Some(applied), actions)
    }

    /// Holds the message as a new change of the state: nothing it decided is sent or settled
    /// before that change is durable.
    fn hold(&mut self, event_id: &str, arrival: Arrival<M>) -> u64 {
        self.changes += 1;
        let seq = self.next_seq;
        self.next_seq += 1;
        let held = Held {
            message: arrival.message,
            sink: arrival.sink,
            event_id: event_id.to_string(),
            subject: arrival.subject,
            raw: arrival.raw,
            waiting_on: 0,
            dead_lettered: false,
            generation: self.changes,
        };
        self.held.insert(seq, held);
        seq
    }

    /// The subject and text of held message `seq`, for the deliveries it causes.
    fn held_text(&mut self, seq: u64) -> Option<(String, Bytes)> {
        let held = self.held.get_mut(seq)?;
        Some((held.subject.clone(), held.raw.clone()))
    }

    fn queue_sends(&mut self, seq: u64, event_id: &str, sends: Vec<Send>) {
        let generation = self.changes;
        let Some((subject, raw)) = self.held_text(seq) else {
            return;
        };
        let n_sends = sends.len();
        for send in sends {
            let side = send.side;
            let coalesce = self.settings.target(side).is_some_and(|t| t.coalesce);
            let line = self.line(side);
            // The head may be in flight; only a waiting tail can absorb a newer state.
            let absorbable = line.queue.len() >= 2;
            match line.queue.back_mut() {
                Some(tail) if coalesce && absorbable => {
                    tail.send = send;
                    tail.waiting.push(seq);
                    tail.event_ids.push(event_id.to_string());
                    tail.generation = generation;
                }
                _ => line.queue.push_back(Pending {
                    send,
                    waiting: vec![seq],
                    attempts: 0,
                    subject: subject.clone(),
                    raw: raw.clone(),
                    event_ids: vec![event_id.to_string()],
                    generation,
                    letter: None,
                }),
            }
        }
        if let Some(held) = self.held.get_mut(seq) {
            held.waiting_on += n_sends as u32;
        }
    }

    /// A duplicate whose deliveries are queued already (restored from the outbox, or the
    /// original still in flight) settles with them.
    fn attach_to_queued(&mut self, seq: u64, event_id: &str) {
        let Some((subject, raw)) = self.held_text(seq) else {
            return;
        };
        let mut n_attached = 0;
        for line in &mut self.lines {
            for pending in line.queue.iter_mut() {
                if pending.event_ids.iter().any(|id| id == event_id) {
                    pending.waiting.push(seq);
                    if pending.raw.is_empty() {
                        pending.subject = subject.clone();
                        pending.raw = raw.clone();
                    }
                    n_attached += 1;
                }
            }
        }
        if let Some(held) = self.held.get_mut(seq) {
            held.waiting_on += n_attached;
        }
    }

    /// The held message's id was marked processed: its id no longer needs keeping beyond the
    /// record's recent ids.
    pub fn on_marked(&mut self, event_id: &str) {
        if let Some(sync) = self.sync.as_mut() {
            sync.on_settled(event_id);
        }
    }
}

pub(super) fn letter_of(
    subject: &str,
    raw: &Bytes,
    event_id: &str,
    sink: crate::sink::Sink,
    poison: &super::Poison,
    now_ms: i64,
) -> DeadLetter {
    DeadLetter {
        subject: subject.to_string(),
        raw: raw.clone(),
        reason: poison.reason.to_string(),
        event_id: Some(event_id.to_string()),
        sink: Some(sink.as_str().to_string()),
        attempts: 0,
        last_error: Some(poison.error.clone()),
        received_at_ms: now_ms,
    }
}
