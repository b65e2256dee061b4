//! Durability: saves, settling what they made durable, dead letters, and the store's failures.

use protocol::Origin;

use super::{events::letter_of, Action, Book, Busy, Poison, STORE_REJECTIONS_MAX};

impl<M> Book<M> {
    /// Starts saving every change not yet durable, unless a save is in flight (the next one
    /// starts when it is done, covering everything changed meanwhile) or the store is to be
    /// tried again later. A change that gates nothing (an accepted delivery) waits for the next
    /// event's save, or for the actor to stop.
    pub fn save_due(&mut self) -> Option<Action<M>> {
        if self.store_waiting || self.saving.is_some() || self.changes <= self.durable {
            return None;
        }
        self.sync.as_ref()?;
        let generation = self.changes;
        self.saving = Some(generation);
        self.dirty = false;
        Some(Action::Save { generation })
    }

    /// The save of change `generation` finished.
    pub fn on_saved(
        &mut self,
        generation: u64,
        result: Result<(), crate::PortError>,
        now_ms: i64,
    ) -> Vec<Action<M>> {
        if self.saving == Some(generation) {
            self.saving = None;
        }
        match result {
            Ok(()) => {
                self.store_failures = 0;
                self.on_durable(generation, now_ms)
            }
            // Kept, not handed back: handing messages back lets the user's later events
            // overtake them (JetStream redelivers in its own order).
            Err(error) => self.on_store_error(error, now_ms),
        }
    }

    /// Change `generation` is durable: what waited for it is settled, and may be sent.
    fn on_durable(&mut self, generation: u64, now_ms: i64) -> Vec<Action<M>> {
        assert!(generation <= self.changes, "a save beyond the changes made");
        self.durable = self.durable.max(generation);
        let mut actions = Vec::new();
        self.settle_durable(&mut actions);
        for side in Origin::ALL {
            self.pump(side, now_ms, &mut actions);
        }
        actions
    }

    /// A load or save failed. Everything stays in hand (held messages kept alive at the
    /// source, newer events waiting behind) and the store is tried again after a backoff, so
    /// the user's events are still applied in order once it answers. A state the store
    /// refuses again and again, or cannot decode, poisons the user.
    pub fn on_store_error(&mut self, error: crate::PortError, now_ms: i64) -> Vec<Action<M>> {
        self.store_failures += 1;
        self.dirty = true;
        let reason = match &error {
            crate::PortError::Corrupt { .. } => Some("corrupt_state"),
            crate::PortError::Rejected { .. } if self.store_failures >= STORE_REJECTIONS_MAX => {
                Some("store_rejected")
            }
            _ => None,
        };
        let error = error.to_string();
        match reason {
            Some(reason) => self.poison(Poison { reason, error }, now_ms),
            None => self.retry_store(error).into_iter().collect(),
        }
    }

    fn retry_store(&mut self, error: String) -> Option<Action<M>> {
        if self.store_waiting {
            return None;
        }
        self.store_waiting = true;
        Some(Action::RetryStore {
            delay: super::store_retry_delay(self.store_failures),
            failures: self.store_failures,
            error,
        })
    }

    /// Dead-letters everything held and stops the lines: what was not durable cannot be sent,
    /// and nothing of this user can be made durable.
    fn poison(&mut self, poison: Poison, now_ms: i64) -> Vec<Action<M>> {
        let mut actions = vec![Action::Poisoned {
            reason: poison.reason,
            error: poison.error.clone(),
        }];
        self.sync = None;
        self.saving = None;
        self.dirty = false;
        self.durable = self.changes;
        self.store_waiting = false;
        for line in &mut self.lines {
            line.queue.clear();
            line.busy = Busy::Idle;
            line.hold = None;
        }
        let held = std::mem::take(&mut self.held.0);
        for (_, held) in held {
            let letter = letter_of(
                &held.subject,
                &held.raw,
                &held.event_id,
                held.sink,
                &poison,
                now_ms,
            );
            let message = held.message;
            actions.push(Action::Reject { message, letter });
        }
        self.poison = Some(poison);
        actions
    }

    /// The store may be tried again: dead letters due are stored first, then the actor goes
    /// on applying events (and [`Book::save_due`] saves what is not yet durable).
    pub fn on_retry_store(&mut self) -> Vec<Action<M>> {
        self.store_waiting = false;
        let mut actions = Vec::new();
        for side in Origin::ALL {
            let letter = self.lines[super::index(side)]
                .queue
                .front()
                .and_then(|head| head.letter.clone());
            if let Some(letter) = letter {
                let fresh = false;
                actions.push(Action::StoreLetter {
                    side,
                    letter,
                    fresh,
                });
            }
        }
        actions
    }

    /// The dead letter of `side`'s head was stored, or not. Stored, the head leaves its line,
    /// and what waited for it settles once the state without it is durable; not stored, the
    /// line waits (nothing behind it may overtake it) and it is tried again.
    pub fn on_letter_stored(
        &mut self,
        side: Origin,
        result: Result<(), crate::PortError>,
        now_ms: i64,
    ) -> Vec<Action<M>> {
        let mut actions = Vec::new();
        let line = self.line(side);
        if line.queue.front().is_none_or(|head| head.letter.is_none()) {
            return actions;
        }
        if let Err(error) = result {
            self.store_failures += 1;
            actions.extend(self.retry_store(error.to_string()));
            return actions;
        }
        let Some(failed) = line.queue.pop_front() else {
            return actions;
        };
        if let Some(sync) = self.sync.as_mut() {
            sync.on_dead_lettered(side, &failed.send.state, &failed.event_ids);
        }
        // Nothing that waited for it settles, and nothing behind it is sent, before the state
        // without it is durable: a crash in between would send it again after newer ones.
        self.changes += 1;
        let generation = self.changes;
        for seq in &failed.waiting {
            if let Some(held) = self.held.get_mut(*seq) {
                held.generation = held.generation.max(generation);
            }
        }
        if let Some(next) = self.line(side).queue.front_mut() {
            next.generation = next.generation.max(generation);
        }
        self.release(&failed.waiting, false, &mut actions);
        self.pump(side, now_ms, &mut actions);
        actions
    }

    /// One delivery the held messages `waiting` waited for is settled: `accepted`, or
    /// dead-lettered.
    pub(super) fn release(
        &mut self,
        waiting: &[u64],
        accepted: bool,
        actions: &mut Vec<Action<M>>,
    ) {
        for seq in waiting {
            if let Some(held) = self.held.get_mut(*seq) {
                held.dead_lettered |= !accepted;
                held.waiting_on = held.waiting_on.saturating_sub(1);
            }
        }
        self.settle_durable(actions);
    }

    /// Settles the held messages whose deliveries are all settled and whose change is
    /// durable.
    fn settle_durable(&mut self, actions: &mut Vec<Action<M>>) {
        let durable = self.durable;
        let ready: Vec<u64> = self
            .held
            .0
            .iter()
            .filter(|(_, held)| held.waiting_on == 0 && held.generation <= durable)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in ready {
            let Some(held) = self.held.remove(seq) else {
                continue;
            };
            assert!(held.generation <= self.durable, "settled before durable");
            actions.push(Action::Settle {
                message: held.message,
                sink: held.sink,
                event_id: held.event_id,
                generation: held.generation,
            });
        }
    }

    /// Whether the state must be saved before the actor goes (shutdown, or a stop): only
    /// accepted deliveries changed it since the last save.
    pub fn flush_due(&self) -> bool {
        self.dirty && self.saving.is_none() && self.sync.is_some()
    }

    /// The actor saved the whole state itself and waited for it (shutdown, or a stop).
    pub fn on_flushed(&mut self) {
        self.dirty = false;
        self.durable = self.changes;
    }

    /// The actor queued the last save of an idle user (not awaited: the store serves it to
    /// readers from its queue).
    pub fn on_parked(&mut self) {
        self.dirty = false;
    }
}
