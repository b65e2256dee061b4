//! The lines: sending their heads one at a time, and what each answer does.

use std::time::Duration;

use protocol::Origin;

use super::{Action, Attempt, Book, Busy, Wait};
use crate::messages::DeliveryOutcome;
use crate::ports::DeadLetter;
use crate::sink::Sink;

impl<M> Book<M> {
    /// Sends the head of `side`'s line if nothing of it is in flight or backing off, and the
    /// change that decided it is durable.
    pub(super) fn pump(&mut self, side: Origin, now_ms: i64, actions: &mut Vec<Action<M>>) {
        let token = self.next_token;
        let durable = self.durable;
        if self.settings.faults.unordered_delivery && self.line(side).busy != Busy::Idle {
            return self.send_unordered(side, actions);
        }
        let line = &mut self.lines[super::index(side)];
        if line.busy != Busy::Idle {
            return;
        }
        let Some(head) = line.queue.front() else {
            return;
        };
        if head.generation > durable || head.letter.is_some() {
            return;
        }
        self.next_token += 1;
        if let Some(delay) = line.held_back(now_ms) {
            line.busy = Busy::Backoff(token);
            let why = Wait::Restored;
            actions.push(Action::Wait {
                side,
                token,
                delay,
                why,
            });
            return;
        }
        let Some(head) = line.queue.front_mut() else {
            return;
        };
        assert!(head.generation <= durable, "sent before durable");
        head.attempts += 1;
        line.busy = Busy::InFlight(token);
        actions.push(Action::Send(Attempt {
            side,
            token,
            webhook_id: head.send.webhook_id.clone(),
            event_type: head.send.event_type,
            state: head.send.state.clone(),
            timestamp_ms: head.send.timestamp_ms,
            attempt: head.attempts,
            generation: head.generation,
        }));
    }

    /// The broken variant (see `EngineFaults`): while the head is in flight, the next
    /// delivery not yet attempted goes out regardless.
    fn send_unordered(&mut self, side: Origin, actions: &mut Vec<Action<M>>) {
        let durable = self.durable;
        let line = self.line(side);
        let Some(next) = line
            .queue
            .iter_mut()
            .find(|p| p.attempts == 0 && p.generation <= durable)
        else {
            return;
        };
        next.attempts = 1;
        actions.push(Action::Send(Attempt {
            side,
            token: u64::MAX,
            webhook_id: next.send.webhook_id.clone(),
            event_type: next.send.event_type,
            state: next.send.state.clone(),
            timestamp_ms: next.send.timestamp_ms,
            attempt: 1,
            generation: next.generation,
        }));
    }

    /// A line's backoff is over.
    pub fn on_retry_due(&mut self, side: Origin, token: u64, now_ms: i64) -> Vec<Action<M>> {
        let mut actions = Vec::new();
        let line = self.line(side);
        if line.busy == Busy::Backoff(token) {
            line.busy = Busy::Idle;
            self.pump(side, now_ms, &mut actions);
        }
        actions
    }

    /// The attempt `token` got no answer at all (its delivery actor died, or there was none):
    /// a transient failure.
    pub fn on_attempt_lost(
        &mut self,
        side: Origin,
        token: u64,
        now_ms: i64,
        jitter: impl FnOnce() -> f64,
    ) -> Vec<Action<M>> {
        let outcome = DeliveryOutcome::Transient {
            error: "no answer from the delivery actor".into(),
            retry_after: None,
        };
        self.on_delivered(side, token, outcome, now_ms, jitter)
    }

    /// Whether `token` is the attempt in flight on `side`'s line.
    pub fn in_flight(&self, side: Origin, token: u64) -> bool {
        self.lines[super::index(side)].busy == Busy::InFlight(token)
    }

    /// The attempt `token` on `side`'s line was answered. `jitter` draws the retry's spread.
    pub fn on_delivered(
        &mut self,
        side: Origin,
        token: u64,
        outcome: DeliveryOutcome,
        now_ms: i64,
        jitter: impl FnOnce() -> f64,
    ) -> Vec<Action<M>> {
        let mut actions = Vec::new();
        if !self.in_flight(side, token) || self.settings.target(side).is_none() {
            return actions;
        }
        match outcome {
            DeliveryOutcome::Accepted { at_ms } => self.accepted(side, at_ms, now_ms, &mut actions),
            DeliveryOutcome::Transient { error, retry_after } => {
                let max_attempts = self.max_attempts(side);
                let attempts = self.head_attempts(side);
                if attempts < max_attempts {
                    let retry = &self.settings.target(side).map(|t| t.retry.clone());
                    let delay = retry
                        .as_ref()
                        .map_or(Duration::ZERO, |r| r.delay(attempts, jitter(), retry_after));
                    self.line(side).busy = Busy::Backoff(token);
                    let why = Wait::Retry {
                        attempt: attempts,
                        error,
                    };
                    actions.push(Action::Wait {
                        side,
                        token,
                        delay,
                        why,
                    });
                    actions.push(Action::Progress);
                } else {
                    self.failed(side, "delivery_failed", error, now_ms, &mut actions);
                }
            }
            DeliveryOutcome::Permanent { error } => {
                self.failed(side, "delivery_rejected", error, now_ms, &mut actions);
            }
            DeliveryOutcome::TargetOpen { wait } => {
                // Not attempted: the line waits for the target, spending nothing.
                let line = self.line(side);
                if let Some(head) = line.queue.front_mut() {
                    head.attempts = head.attempts.saturating_sub(1);
                }
                line.busy = Busy::Backoff(token);
                let why = Wait::TargetOpen;
                actions.push(Action::Wait {
                    side,
                    token,
                    delay: wait,
                    why,
                });
            }
        }
        actions
    }

    fn max_attempts(&self, side: Origin) -> u32 {
        self.settings
            .target(side)
            .map_or(1, |t| t.retry.max_attempts)
    }

    fn head_attempts(&self, side: Origin) -> u32 {
        self.lines[super::index(side)]
            .queue
            .front()
            .map_or(0, |head| head.attempts)
    }

    fn accepted(&mut self, side: Origin, at_ms: i64, now_ms: i64, actions: &mut Vec<Action<M>>) {
        let Some(done) = self.line(side).queue.pop_front() else {
            return;
        };
        self.line(side).busy = Busy::Idle;
        if let Some(sync) = self.sync.as_mut() {
            sync.on_delivered(side, &done.send.state, &done.event_ids, at_ms);
        }
        if self.line(side).queue.is_empty() {
            self.dirty = true;
        } else {
            // The line's next send waits until this acceptance is durable: after a crash, a
            // stored outbox that still owed this older state would send it again after the
            // newer one, out of order.
            self.changes += 1;
            let generation = self.changes;
            if let Some(next) = self.line(side).queue.front_mut() {
                next.generation = next.generation.max(generation);
            }
        }
        self.release(&done.waiting, true, actions);
        self.pump(side, now_ms, actions);
    }

    /// The head of `side`'s line failed for good: its dead letter is stored first.
    fn failed(
        &mut self,
        side: Origin,
        reason: &str,
        error: String,
        now_ms: i64,
        actions: &mut Vec<Action<M>>,
    ) {
        let line = self.line(side);
        line.busy = Busy::Idle;
        let Some(failed) = line.queue.front_mut() else {
            return;
        };
        let letter = DeadLetter {
            subject: failed.subject.clone(),
            raw: failed.raw.clone(),
            reason: reason.into(),
            event_id: failed.event_ids.first().cloned(),
            sink: Some(Sink::for_side(side).as_str().to_string()),
            attempts: failed.attempts,
            last_error: Some(error),
            received_at_ms: now_ms,
        };
        failed.letter = Some(letter.clone());
        actions.push(Action::StoreLetter {
            side,
            letter,
            fresh: true,
        });
    }
}
