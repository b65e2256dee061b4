//! A user's book: the user actor's bookkeeping, pure and synchronous. It keeps the user's
//! lines (deliveries per side, sent one at a time), its held messages (read, not yet settled)
//! and what of its state is durable. Each input (an event, a save's answer, a delivery's
//! answer, a timer) returns the [`Action`]s the actor performs; the actor does the I/O and
//! reports back (TigerBeetle's split of state machine and I/O).
//!
//! Invariants, asserted here and property-tested in `tests.rs`:
//! - A line has at most one send in flight (outside the broken variant `unordered_delivery`).
//! - A send goes out only once the change that decided it is durable, and once every change
//!   that settled what was ahead of it on its line is durable: a stored outbox never owes an
//!   older delivery behind a newer one that went out.
//! - A message is settled (marked, then acknowledged) only once the change that applied it and
//!   every delivery it waited for are durable; a dead-lettered delivery counts once its dead
//!   letter is stored.
//! - A store error never hands a message back: everything stays in hand, in order, and the
//!   store is tried again; a state the store keeps refusing, or cannot decode, poisons the
//!   user, and its messages become dead letters.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::{EventType, Origin};

use crate::ports::DeadLetter;
use crate::settings::PipelineSettings;
use crate::sink::Sink;
use crate::sync::{Known, Send, SyncState, Verdict};

/// Messages one user works on at once; the rest wait in the actor's backlog, unread. A user
/// with thousands of queued events would otherwise save an ever larger outbox per event
/// (quadratic), and its deliveries' answers would wait behind every one of them in the
/// mailbox.
pub const HELD_MAX: usize = 64;

/// Store rejections of a user's state in a row before its events are dead-lettered.
pub const STORE_REJECTIONS_MAX: u32 = 3;

/// Beyond the target's timeout, for a dead run's last requests to land.
pub const RESTORED_MARGIN_MS: i64 = 1_000;

/// What the actor does for its book.
#[derive(Debug)]
pub enum Action<M> {
    /// Save [`Book::sync`] as change `generation`; answer with [`Book::on_saved`].
    Save { generation: u64 },
    /// Send a line's head; answer with [`Book::on_delivered`] quoting its token.
    Send(Attempt),
    /// Call [`Book::on_retry_due`] with `side` and `token` after `delay`.
    Wait {
        side: Origin,
        token: u64,
        delay: Duration,
        why: Wait,
    },
    /// Store the dead letter of `side`'s head; answer with [`Book::on_letter_stored`].
    /// `fresh` on the first try.
    StoreLetter {
        side: Origin,
        letter: DeadLetter,
        fresh: bool,
    },
    /// Mark `event_id` processed for `sink`; if that works, tell [`Book::on_marked`] and
    /// acknowledge the message, else hand it back.
    Settle {
        message: M,
        sink: Sink,
        event_id: String,
        /// The change that applied it (durable by now).
        generation: u64,
    },
    /// Store `letter`, then acknowledge the message (hand it back if the letter cannot be
    /// stored).
    Reject { message: M, letter: DeadLetter },
    /// Hand the message back to the source now.
    Return { message: M },
    /// Keep the held messages alive at the source now (a line started to back off).
    Progress,
    /// Call [`Book::on_retry_store`] after `delay`; no event is applied meanwhile.
    RetryStore {
        delay: Duration,
        failures: u32,
        error: String,
    },
    /// The store cannot keep this user's state: every event of it becomes a dead letter.
    Poisoned { reason: &'static str, error: String },
}

/// Why a line waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// Its head failed attempt `attempt` and is tried again.
    Retry { attempt: u32, error: String },
    /// Its head waits for a restored head's request from the run that died.
    Restored,
    /// The target's circuit breaker is open.
    TargetOpen,
}

/// One attempt at a line's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub side: Origin,
    pub token: u64,
    pub webhook_id: String,
    pub event_type: EventType,
    pub state: Known,
    pub timestamp_ms: i64,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The change that decided it, durable by now.
    pub generation: u64,
}

/// What applying an event did, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub verdict: Verdict,
    /// Applied after a later event of its side (see [`crate::sync::Decision::late`]).
    pub late: bool,
    /// Deliveries it queued.
    pub sends: usize,
}

/// A message as it reaches the book: the handle to settle it, and its text for dead letters.
#[derive(Debug)]
pub struct Arrival<M> {
    pub message: M,
    pub sink: Sink,
    pub subject: String,
    pub raw: Bytes,
}

/// Why a user's events are dead-lettered as they come.
#[derive(Debug, Clone)]
struct Poison {
    reason: &'static str,
    error: String,
}

/// A delivery waiting in a line.
#[derive(Debug)]
struct Pending {
    send: Send,
    /// Held messages (by arrival number) settled when this delivery is.
    waiting: Vec<u64>,
    attempts: u32,
    /// The message that caused it, for the dead letter.
    subject: String,
    raw: Bytes,
    /// The events whose delivery this is (several when coalesced).
    event_ids: Vec<String>,
    /// The change that decided it: it is sent once that change is durable.
    generation: u64,
    /// It failed for good; only its dead letter is left to store.
    letter: Option<DeadLetter>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Busy {
    Idle,
    InFlight(u64),
    Backoff(u64),
}

#[derive(Debug)]
struct Line {
    queue: VecDeque<Pending>,
    busy: Busy,
    /// A line restored from a stored outbox: its head may still be in flight from the run
    /// that died, so nothing behind the head is sent before that request could have landed.
    hold: Option<Hold>,
}

/// The restored head's `webhook-id`, and when the dead run's request of it has surely landed.
#[derive(Debug)]
struct Hold {
    head: String,
    until_ms: i64,
}

impl Line {
    fn new() -> Self {
        Line {
            queue: VecDeque::new(),
            busy: Busy::Idle,
            hold: None,
        }
    }

    /// Whether the head must wait for a restored head's stale request: if so, for how long.
    fn held_back(&mut self, now_ms: i64) -> Option<Duration> {
        let hold = self.hold.as_ref()?;
        let head = self.queue.front()?;
        if head.send.webhook_id == hold.head {
            return None;
        }
        if now_ms >= hold.until_ms {
            self.hold = None;
            return None;
        }
        Some(Duration::from_millis(
            u64::try_from(hold.until_ms - now_ms).unwrap_or(0),
        ))
    }
}

/// A message held until its effect is durable.
#[derive(Debug)]
struct Held<M> {
    message: M,
    sink: Sink,
    event_id: String,
    subject: String,
    raw: Bytes,
    /// Deliveries not yet settled.
    waiting_on: u32,
    /// A delivery it waited for was dead-lettered.
    dead_lettered: bool,
    /// The change that applied it: it is settled once that change is durable.
    generation: u64,
}

/// Held messages by arrival number, oldest first. Numbers only grow, so a queue searched by
/// bisection serves: a map would allocate a 1.8 KB node for the first message of each of
/// thousands of actors.
#[derive(Debug)]
struct HeldMessages<M>(VecDeque<(u64, Held<M>)>);

impl<M> HeldMessages<M> {
    fn insert(&mut self, seq: u64, held: Held<M>) {
        assert!(self.0.back().is_none_or(|(last, _)| *last < seq));
        self.0.push_back((seq, held));
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut Held<M>> {
        let at = self.0.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        self.0.get_mut(at).map(|(_, held)| held)
    }

    fn remove(&mut self, seq: u64) -> Option<Held<M>> {
        let at = self.0.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        let held = self.0.remove(at).map(|(_, held)| held);
        if self.0.is_empty() {
            // Idle actors keep nothing of their busiest moment.
            self.0 = VecDeque::new();
        }
        held
    }
}

/// The wait before the store is tried again after `failures` failures in a row.
pub fn store_retry_delay(failures: u32) -> Duration {
    const FIRST: Duration = Duration::from_millis(100);
    const LAST: Duration = Duration::from_secs(2);
    FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(LAST)
}

/// One user's bookkeeping; `M` is the handle that settles a message (the actor's `Incoming`).
#[derive(Debug)]
pub struct Book<M> {
    settings: Arc<PipelineSettings>,
    /// Loaded before the first event; `None` again once poisoned.
    sync: Option<SyncState>,
    /// Better Auth's line, then Payload's.
    lines: [Line; 2],
    held: HeldMessages<M>,
    /// The state changed (a delivery was accepted, with nothing behind it on its line) since
    /// it was last saved. Losing that change in a crash costs one repeated delivery under the
    /// same `webhook-id`, the newest of its line, never an event, so it is saved with the next
    /// change, or when the actor stops.
    dirty: bool,
    /// Every applied event is a new change of the state; nothing it decided is sent or settled
    /// before a save covering it is durable. Saves run one at a time per user, each covering
    /// every change made so far, so a burst of events costs a few saves, not one each.
    changes: u64,
    /// The latest change known durable.
    durable: u64,
    /// The change the save in flight covers.
    saving: Option<u64>,
    next_seq: u64,
    next_token: u64,
    /// Store calls failed in a row; while a retry is due, no event is applied.
    store_failures: u32,
    store_waiting: bool,
    poison: Option<Poison>,
}

fn index(side: Origin) -> usize {
    match side {
        Origin::BetterAuth => 0,
        Origin::Payload => 1,
    }
}

mod delivering;
mod events;
mod storing;
#[cfg(test)]
mod tests;

impl<M> Book<M> {
    pub fn new(settings: Arc<PipelineSettings>) -> Self {
        Book {
            settings,
            sync: None,
            lines: [Line::new(), Line::new()],
            held: HeldMessages(VecDeque::new()),
            dirty: false,
            changes: 0,
            durable: 0,
            saving: None,
            next_seq: 0,
            next_token: 0,
            store_failures: 0,
            store_waiting: false,
            poison: None,
        }
    }

    /// The state to save or park; `None` before the first load, or once poisoned.
    pub fn sync(&self) -> Option<&SyncState> {
        self.sync.as_ref()
    }

    /// The stored state must be loaded before the next event is applied.
    pub fn needs_load(&self) -> bool {
        self.sync.is_none() && self.poison.is_none()
    }

    /// Whether the next event of the backlog may be applied now.
    pub fn accepts_event(&self) -> bool {
        self.held.0.len() < HELD_MAX && !self.store_waiting
    }

    /// Nothing held, saving or queued.
    pub fn is_idle(&self) -> bool {
        self.held.0.is_empty()
            && self.saving.is_none()
            && self.lines.iter().all(|line| line.queue.is_empty())
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The messages held, to keep them alive at the source.
    pub fn held_messages(&self) -> impl Iterator<Item = &M> {
        self.held.0.iter().map(|(_, held)| &held.message)
    }

    /// The `webhook-id` of the head of `side`'s line, for logs.
    pub fn head_id(&self, side: Origin) -> Option<&str> {
        let head = self.lines[index(side)].queue.front()?;
        Some(&head.send.webhook_id)
    }

    fn line(&mut self, side: Origin) -> &mut Line {
        &mut self.lines[index(side)]
    }
}
