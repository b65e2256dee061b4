//! The user actor: serializes one user's events and owns that user's delivery lines.
//!
//! Each event is merged by the pure state machine ([`crate::sync`]), the new state is saved,
//! and the deliveries it asks for join the user's line for each side. A line sends its head,
//! retries it with the target's backoff, and dead-letters it after `max_attempts`; other users'
//! lines never wait for it. A message is acknowledged only when every delivery it waits for is
//! accepted or dead-lettered and its id is marked for its sink (PROTOCOL.md §5.1–5.3).
//!
//! Architecture Invariant: per (user, side) at most one delivery is in flight, and lines are
//! sent in the order the events were applied.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::merge::MergeOutcome;
use protocol::{Origin, UserKey};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::time::Instant;

use crate::delivery::{DeliveryMsg, DeliveryOutcome, DeliveryRequest};
use crate::ingest::Routed;
use crate::parked::ParkedState;
use crate::ports::{DeadLetter, Incoming, Ports};
use crate::router::RouterMsg;
use crate::settings::PipelineSettings;
use crate::sink::Sink;
use crate::slot::Slot;
use crate::stats::Stats;
use crate::sync::{EventView, Send, SyncState, Verdict};

#[derive(Debug)]
pub enum UserMsg {
    Event(Routed),
    /// A delivery attempt finished.
    Delivered {
        side: Origin,
        token: u64,
        outcome: DeliveryOutcome,
    },
    /// A line's backoff is over.
    RetryDue {
        side: Origin,
        token: u64,
    },
    /// Safety net: an attempt got no answer at all (its delivery actor died).
    AttemptLost {
        side: Origin,
        token: u64,
    },
    /// Time to look for attempts past their deadline (one timer per actor, not per attempt).
    Watchdog,
    /// The save of the state as of change `generation` finished.
    Saved {
        generation: u64,
        result: Result<(), crate::PortError>,
    },
    /// Keep held messages alive at the source.
    KeepAlive,
    /// Check whether the actor has been idle long enough to stop (see [`linger`]).
    IdleCheck,
    /// Save what only accepted deliveries changed, now (shutdown); answers whether it saved.
    Flush(ractor::RpcReplyPort<bool>),
    /// The store failed; time to try the load or save again, or a dead letter that could not
    /// be stored.
    RetryStore,
}

pub struct UserArgs {
    pub key: UserKey,
    /// The user's state as its previous actor left it, if the router still had it.
    pub parked: Option<ParkedState>,
    pub ports: Ports,
    pub settings: Arc<PipelineSettings>,
    pub payload: Slot<DeliveryMsg>,
    pub better_auth: Slot<DeliveryMsg>,
    pub router: Slot<RouterMsg>,
    pub stats: Arc<Stats>,
}

/// A delivery waiting in a line.
struct Pending {
    send: Send,
    /// Held messages that are settled when this delivery is.
    waiting: Vec<u64>,
    attempts: u32,
    /// The message that caused it, for the dead letter.
    subject: String,
    raw: Bytes,
    /// The events whose delivery this is (several when coalesced).
    event_ids: Vec<String>,
    /// The change of the state that decided it: it is sent once that change is durable.
    generation: u64,
    /// It failed for good; only its dead letter is left to store (the store was down).
    letter: Option<DeadLetter>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Busy {
    Idle,
    InFlight(u64),
    Backoff(u64),
}

struct Line {
    queue: VecDeque<Pending>,
    busy: Busy,
    /// When the attempt in flight counts as lost if nothing answered it.
    deadline: Instant,
    /// A line restored from a stored outbox: its head may still be in flight from the run
    /// that died, so nothing behind the head is sent before that request could have landed.
    hold: Option<Hold>,
}

/// The restored head's `webhook-id`, and when the dead run's request of it has surely landed.
struct Hold {
    head: String,
    until_ms: i64,
}

impl Line {
    fn new() -> Self {
        Line {
            queue: VecDeque::new(),
            busy: Busy::Idle,
            deadline: Instant::now(),
            hold: None,
        }
    }
}

/// How long a user actor stays after its last piece of work when the user's events give no
/// better guess (see [`linger`]); its state then waits parked in the router (see
/// [`crate::parked`]).
pub const PARK_AFTER: Duration = Duration::from_millis(100);

/// The longest a user actor lingers, however far apart the user's events.
pub const LINGER_MAX: Duration = Duration::from_secs(5);

/// Messages one user actor works on at once; the rest wait in its backlog, unread. A user
/// with thousands of queued events would otherwise save an ever larger outbox per event
/// (quadratic), and its deliveries' answers would wait behind every one of them in the
/// mailbox.
pub const HELD_MAX: usize = 64;

/// A message this actor holds until its effect is durable.
struct Held {
    incoming: Incoming,
    sink: Sink,
    event_id: String,
    /// Deliveries not yet settled.
    waiting_on: u32,
    /// A delivery it waited for was dead-lettered (kept for logs; a replay of the dead letter
    /// is published under a new event id, so this id may count as processed).
    dead_lettered: bool,
    /// The change of the state that applied it: it is settled once that change is durable.
    generation: u64,
}

/// Held messages by arrival number, oldest first. Numbers only grow, so a queue searched by
/// bisection serves: a map would allocate a 1.8 KB node for the first message of each of
/// thousands of actors.
#[derive(Default)]
struct HeldMessages(VecDeque<(u64, Held)>);

impl HeldMessages {
    fn insert(&mut self, seq: u64, held: Held) {
        debug_assert!(self.0.back().is_none_or(|(last, _)| *last < seq));
        self.0.push_back((seq, held));
    }

    fn get_mut(&mut self, seq: &u64) -> Option<&mut Held> {
        let at = self.0.binary_search_by_key(seq, |(s, _)| *s).ok()?;
        self.0.get_mut(at).map(|(_, held)| held)
    }

    fn remove(&mut self, seq: &u64) -> Option<Held> {
        let at = self.0.binary_search_by_key(seq, |(s, _)| *s).ok()?;
        let held = self.0.remove(at).map(|(_, held)| held);
        if self.0.is_empty() {
            // Idle actors keep nothing of their busiest moment.
            self.0 = VecDeque::new();
        }
        held
    }

    fn iter(&self) -> impl Iterator<Item = (&u64, &Held)> {
        self.0.iter().map(|(seq, held)| (seq, held))
    }

    fn values(&self) -> impl Iterator<Item = &Held> {
        self.0.iter().map(|(_, held)| held)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub struct UserState {
    args: UserArgs,
    /// Loaded from the store on the first event.
    sync: Option<SyncState>,
    better_auth: Line,
    payload: Line,
    held: HeldMessages,
    /// Events received while [`HELD_MAX`] were held, in arrival order.
    backlog: VecDeque<Routed>,
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
    /// Events received, reported to the router when idle.
    received: u64,
    last_activity: Instant,
    /// When the latest event arrived, and how long before it the one before it did (for a
    /// new actor: since the user's last accepted delivery, as its state has it).
    last_event: Option<Instant>,
    gap: Option<Duration>,
    idle_armed: bool,
    keepalive_armed: bool,
    watchdog_armed: bool,
    /// Store calls failed in a row; while a retry is armed, no event is applied.
    store_failures: u32,
    store_retry_armed: bool,
    /// The store cannot load or keep this user's state: every event of it is dead-lettered.
    poisoned: Option<Poison>,
    timers: Timers,
}

/// Why a user's events are dead-lettered as they come.
#[derive(Debug, Clone)]
struct Poison {
    reason: &'static str,
    error: String,
}

/// Store rejections of a user's state in a row before its events are dead-lettered.
pub const STORE_REJECTIONS_MAX: u32 = 3;

/// The wait before the store is tried again after `failures` failures in a row.
fn store_retry_delay(failures: u32) -> Duration {
    const FIRST: Duration = Duration::from_millis(100);
    const LAST: Duration = Duration::from_secs(2);
    FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(LAST)
}

/// The actor's pending timers. Each holds a reference to the actor, and with it the actor's
/// mailbox: they are cancelled when the actor goes, or stopped actors would stay allocated
/// until their last timer fired (a watchdog fires 25 s after the last attempt).
#[derive(Default)]
struct Timers(Vec<ractor::concurrency::JoinHandle<Result<(), ractor::MessagingErr<UserMsg>>>>);

impl Drop for Timers {
    fn drop(&mut self) {
        for timer in &self.0 {
            timer.abort();
        }
    }
}

/// Sends `message` to the actor after `delay`.
fn after(
    myself: &ActorRef<UserMsg>,
    state: &mut UserState,
    delay: Duration,
    message: impl FnOnce() -> UserMsg + std::marker::Send + 'static,
) {
    state.timers.0.retain(|timer| !timer.is_finished());
    state.timers.0.push(myself.send_after(delay, message));
}

impl UserState {
    fn line(&mut self, side: Origin) -> &mut Line {
        match side {
            Origin::BetterAuth => &mut self.better_auth,
            Origin::Payload => &mut self.payload,
        }
    }

    fn is_idle(&self) -> bool {
        self.held.is_empty()
            && self.backlog.is_empty()
            && self.saving.is_none()
            && self.better_auth.queue.is_empty()
            && self.payload.queue.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct UserActor;

impl Actor for UserActor {
    type Msg = UserMsg;
    type State = UserState;
    type Arguments = UserArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<UserMsg>,
        args: UserArgs,
    ) -> Result<UserState, ActorProcessingErr> {
        // The stored state is loaded on the first event, not here: spawning must not wait
        // for the store, or the router would.
        Ok(UserState {
            args,
            sync: None,
            better_auth: Line::new(),
            payload: Line::new(),
            held: HeldMessages::default(),
            backlog: VecDeque::new(),
            dirty: false,
            changes: 0,
            durable: 0,
            saving: None,
            next_seq: 0,
            next_token: 0,
            received: 0,
            last_activity: Instant::now(),
            last_event: None,
            gap: None,
            idle_armed: false,
            keepalive_armed: false,
            watchdog_armed: false,
            store_failures: 0,
            store_retry_armed: false,
            poisoned: None,
            timers: Timers::default(),
        })
    }

    /// A stop (idle, or shutdown) saves what only accepted deliveries changed, so a restart
    /// does not repeat them.
    async fn post_stop(
        &self,
        _myself: ActorRef<UserMsg>,
        state: &mut UserState,
    ) -> Result<(), ActorProcessingErr> {
        if state.dirty {
            if let Err(error) = Box::pin(save(state)).await {
                tracing::warn!(message = "Saving a stopping user's state failed; its last deliveries may be repeated.", user = %state.args.key, %error);
            }
        }
        Ok(())
    }

    /// The work is boxed: the actor's task future holds what `handle` awaits, and unboxed it
    /// would carry every path's largest state in each of thousands of actors.
    async fn handle(
        &self,
        myself: ActorRef<UserMsg>,
        message: UserMsg,
        state: &mut UserState,
    ) -> Result<(), ActorProcessingErr> {
        Box::pin(handle_message(myself, message, state)).await
    }
}

async fn handle_message(
    myself: ActorRef<UserMsg>,
    message: UserMsg,
    state: &mut UserState,
) -> Result<(), ActorProcessingErr> {
    if !matches!(
        message,
        UserMsg::IdleCheck | UserMsg::KeepAlive | UserMsg::Flush(_)
    ) {
        state.last_activity = Instant::now();
    }
    crate::ports::maybe_panic(state.args.ports.chaos.as_ref(), "user");
    match message {
        UserMsg::Event(routed) => {
            state.received += 1;
            let now = Instant::now();
            if let Some(previous) = state.last_event {
                state.gap = Some(now.saturating_duration_since(previous));
            }
            state.last_event = Some(now);
            state.backlog.push_back(routed);
        }
        UserMsg::Delivered {
            side,
            token,
            outcome,
        } => on_delivered(&myself, state, side, token, outcome).await?,
        UserMsg::RetryDue { side, token } => {
            let line = state.line(side);
            if line.busy == Busy::Backoff(token) {
                line.busy = Busy::Idle;
                pump(&myself, state, side);
            }
        }
        UserMsg::AttemptLost { side, token } => {
            attempt_lost(&myself, state, side, token).await?;
        }
        UserMsg::Saved { generation, result } => {
            if state.saving == Some(generation) {
                state.saving = None;
            }
            match result {
                Ok(()) => {
                    state.store_failures = 0;
                    on_durable(&myself, state, generation).await;
                }
                // Kept, not handed back: handing messages back lets the user's later events
                // overtake them (JetStream redelivers in its own order).
                Err(error) => store_failed(&myself, state, error).await?,
            }
        }
        UserMsg::RetryStore => {
            state.store_retry_armed = false;
            for side in Origin::ALL {
                store_letter_due(&myself, state, side).await;
            }
        }
        UserMsg::Watchdog => {
            state.watchdog_armed = false;
            let now = Instant::now();
            for side in Origin::ALL {
                let line = state.line(side);
                if let Busy::InFlight(token) = line.busy {
                    if line.deadline <= now {
                        attempt_lost(&myself, state, side, token).await?;
                    }
                }
            }
            arm_watchdog(&myself, state);
        }
        UserMsg::KeepAlive => {
            state.keepalive_armed = false;
            if !state.held.is_empty() || !state.backlog.is_empty() {
                for held in state.held.values() {
                    held.incoming.progress().await;
                }
                for routed in &state.backlog {
                    routed.incoming.progress().await;
                }
                arm_keepalive(&myself, state);
            }
        }
        UserMsg::Flush(reply) => {
            let saved = state.dirty && state.saving.is_none();
            if saved {
                if let Err(error) = save(state).await {
                    tracing::warn!(message = "Saving a user's state at shutdown failed; its last deliveries may be repeated.", user = %state.args.key, %error);
                }
            }
            let _ = reply.send(saved);
            return Ok(());
        }
        UserMsg::IdleCheck => {
            state.idle_armed = false;
            if state.is_idle() {
                let linger = linger(state);
                let idle_for = state.last_activity.elapsed();
                if idle_for >= linger {
                    // One encoding serves both the last save and the parked copy.
                    let parking = state.args.settings.idle_cache_bytes > 0;
                    let stored = if state.dirty || parking {
                        encode(state)
                    } else {
                        None
                    };
                    if state.dirty {
                        // Queued, not awaited: the store serves it to readers from the queue
                        // (a next actor loads it), and losing it in a crash repeats one
                        // delivery, as with any lazily saved acceptance. Waiting for the
                        // commit would keep thousands of idle actors alive for nothing.
                        if let Some(sync) = &state.sync {
                            let store = &state.args.ports.store;
                            drop(match &stored {
                                Some(bytes) => {
                                    store.save_user_encoded(&state.args.key, sync, bytes)
                                }
                                None => store.save_user(&state.args.key, sync),
                            });
                        }
                        state.dirty = false;
                    }
                    // The router stops this actor unless events are on their way to it.
                    state.args.router.cast(RouterMsg::Idle {
                        key: state.args.key.clone(),
                        actor: myself.get_id(),
                        received: state.received,
                        parked: stored.filter(|_| parking),
                    });
                } else {
                    state.idle_armed = true;
                    after(&myself, state, linger - idle_for, || UserMsg::IdleCheck);
                }
            }
            return Ok(());
        }
    }
    while state.held.len() < HELD_MAX && !state.store_retry_armed {
        let Some(routed) = state.backlog.pop_front() else {
            break;
        };
        if let Some(poison) = state.poisoned.clone() {
            dead_letter_event(state, routed, &poison).await;
            continue;
        }
        if let Err(error) = ensure_loaded(state).await {
            state.backlog.push_front(routed);
            store_failed(&myself, state, error).await?;
            continue;
        }
        on_event(&myself, state, routed).await?;
    }
    if !state.store_retry_armed {
        start_save(&myself, state).await?;
    }
    if !state.backlog.is_empty() {
        arm_keepalive(&myself, state);
    }
    if state.is_idle() && !state.idle_armed {
        state.idle_armed = true;
        let linger = linger(state);
        after(&myself, state, linger, || UserMsg::IdleCheck);
    }
    Ok(())
}

/// How long an idle actor waits before it stops: twice the gap between the user's last two
/// events, within [`PARK_AFTER`]..[`LINGER_MAX`], and never past `user_idle_timeout`. A user
/// whose events keep coming keeps its actor (stopping and restarting it per event would cost
/// a serialization and a parse each time); a user seen once parks within [`PARK_AFTER`], so a
/// million one-off users do not keep a million actors.
fn linger(state: &UserState) -> Duration {
    let guess = state
        .gap
        .map_or(PARK_AFTER, |gap| (gap * 2).clamp(PARK_AFTER, LINGER_MAX));
    guess.min(state.args.settings.user_idle_timeout)
}

/// The state in its stored form, for the last save and the router's parked copy (nothing is
/// being saved when the actor is idle, so the store has this state, committed or queued, and
/// losing the parked copy costs only a store read).
fn encode(state: &UserState) -> Option<ParkedState> {
    let sync = state.sync.as_ref()?;
    match crate::state_codec::encode(sync) {
        Ok(bytes) => Some(bytes.into()),
        Err(error) => {
            tracing::warn!(message = "Could not encode an idle user's state; it is saved the usual way and not parked.", user = %state.args.key, %error);
            None
        }
    }
}

/// Loads the stored state on first use. Deliveries the stored outbox still owes (the engine
/// stopped before they settled) go to the head of their lines at once, in their original
/// order, ahead of anything newer: their events may come back late, after newer ones, and
/// must not be overtaken.
async fn ensure_loaded(state: &mut UserState) -> Result<(), crate::PortError> {
    if state.sync.is_none() {
        let parked = state.args.parked.take().and_then(|parked| {
            crate::state_codec::decode(&parked)
                .inspect_err(|error| {
                    tracing::warn!(message = "A parked state did not parse; reading the store instead.", user = %state.args.key, %error);
                })
                .ok()
        });
        let loaded = match parked {
            Some(parked) => parked,
            None => state
                .args
                .ports
                .store
                .load_user(&state.args.key)
                .await?
                .unwrap_or_default(),
        };
        let owed: Vec<_> = loaded.outbox.iter().cloned().collect();
        if state.gap.is_none() {
            // A new actor has no earlier event of its own to measure from: the user's last
            // accepted delivery, as its state has it (parked or stored), stands in for its
            // last event, so a user whose events keep coming is not taken for a one-off each
            // time its actor restarts.
            let last = [&loaded.better_auth, &loaded.payload]
                .iter()
                .filter_map(|side| side.last_delivery_ms)
                .max();
            if let Some(last) = last {
                let since = state.args.ports.clock.now_ms().saturating_sub(last);
                state.gap = u64::try_from(since).ok().map(Duration::from_millis);
            }
        }
        state.sync = Some(loaded);
        let restored = !owed.is_empty();
        for entry in owed {
            if state.args.settings.target(entry.send.side).is_none() {
                continue;
            }
            let line = state.line(entry.send.side);
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
        if restored {
            hold_restored_lines(state);
        }
    }
    Ok(())
}

/// Deliveries a user's stored outbox still owes may have been in flight from the engine run
/// that died: a request already written reaches the receiver after its sender's death, as late
/// as the target's timeout. Only a line's head is ever in flight, and sending the head again
/// is harmless (same `webhook-id`, same content), but a newer delivery must not overtake the
/// dead run's request: so a restored line sends its head at once and what is behind it only
/// once the target's timeout plus a second has passed since this run started.
fn hold_restored_lines(state: &mut UserState) {
    let now_ms = state.args.ports.clock.now_ms();
    for side in Origin::ALL {
        let Some(target) = state.args.settings.target(side) else {
            continue;
        };
        let timeout_ms = i64::try_from(target.timeout.as_millis()).unwrap_or(i64::MAX);
        let until_ms = state
            .args
            .settings
            .started_at_ms
            .saturating_add(timeout_ms)
            .saturating_add(RESTORED_MARGIN_MS);
        let line = state.line(side);
        if now_ms >= until_ms {
            continue;
        }
        if let Some(head) = line.queue.front() {
            line.hold = Some(Hold {
                head: head.send.webhook_id.clone(),
                until_ms,
            });
        }
    }
}

/// Whether the line's head must wait for a restored head's stale request: if so, the line
/// backs off until then and this says how long.
fn held_back(line: &mut Line, now_ms: i64) -> Option<Duration> {
    let hold = line.hold.as_ref()?;
    let head = line.queue.front()?;
    if head.send.webhook_id == hold.head {
        return None;
    }
    if now_ms >= hold.until_ms {
        line.hold = None;
        return None;
    }
    Some(Duration::from_millis((hold.until_ms - now_ms) as u64))
}

/// Beyond the target's timeout, for a dead run's last requests to land.
const RESTORED_MARGIN_MS: i64 = 1_000;

async fn on_event(
    myself: &ActorRef<UserMsg>,
    state: &mut UserState,
    routed: Routed,
) -> Result<(), ActorProcessingErr> {
    let Routed {
        sink,
        event,
        incoming,
    } = routed;
    if state.args.settings.faults.mark_before_delivery {
        let ids = [event.envelope.id.clone()];
        let _ = state.args.ports.dedup.mark(sink, &ids).await;
    }
    let policy = state.args.settings.policy;
    let seq = state.next_seq;
    state.next_seq += 1;
    let tails = [
        state.better_auth.queue.back().map(|p| p.send.state.clone()),
        state.payload.queue.back().map(|p| p.send.state.clone()),
    ];
    let already_queued = [&state.better_auth, &state.payload].iter().any(|line| {
        line.queue
            .iter()
            .any(|p| p.event_ids.contains(&event.envelope.id))
    });
    let Some(sync) = state.sync.as_mut() else {
        return Ok(());
    };
    let envelope = &event.envelope;
    let view = EventView {
        id: &envelope.id,
        origin: envelope.origin,
        event_type: envelope.event_type,
        timestamp_ms: envelope.timestamp,
        sequence: incoming.sequence,
        fields: &event.fields,
    };
    let expected = |side: Origin| match side {
        Origin::BetterAuth => tails[0].clone(),
        Origin::Payload => tails[1].clone(),
    };
    let queued = |_: &str| already_queued;
    let decision = sync.on_event(view, &policy, &expected, &queued);
    let settings = state.args.settings.clone();
    let sends: Vec<Send> = decision
        .sends
        .into_iter()
        .filter(|s| settings.target(s.side).is_some())
        .collect();
    if !decision.replayed {
        let now_ms = state.args.ports.clock.now_ms();
        // Envelopes were parsed from UTF-8 JSON, so the text is the message byte for byte.
        let raw: Arc<str> = String::from_utf8_lossy(&incoming.payload).into();
        let subject: Arc<str> = incoming.subject.as_str().into();
        for send in &sends {
            sync.on_queued(&envelope.id, send, now_ms, &subject, &raw);
        }
    }
    tracing::debug!(
        message = "Event applied.",
        event_id = %envelope.id,
        user = %state.args.key,
        %sink,
        verdict = ?decision.verdict,
        n_sends = sends.len(),
    );
    tracing::trace!(event_id = %envelope.id, ts = envelope.timestamp, fields = ?event.fields, sends = ?sends, "Event detail.");
    let stats = &state.args.stats;
    if decision.late {
        Stats::add(&stats.late);
        tracing::warn!(message = "Event applied after a later event of its side.", event_id = %envelope.id, user = %state.args.key, sequence = incoming.sequence);
    }
    match decision.verdict {
        Verdict::Echo => Stats::add(&stats.echoes),
        Verdict::Duplicate => Stats::add(&stats.duplicates),
        Verdict::Merged(MergeOutcome::Unchanged) if sends.is_empty() => Stats::add(&stats.stale),
        Verdict::Merged(_) if sends.is_empty() => Stats::add(&stats.no_ops),
        Verdict::Merged(_) => {}
    }
    // Nothing it decided is sent or acknowledged before this change is durable.
    state.changes += 1;
    let generation = state.changes;

    let event_id = envelope.id.clone();
    let subject = incoming.subject.clone();
    let raw = incoming.payload.clone();
    state.held.insert(
        seq,
        Held {
            incoming,
            sink,
            event_id: event_id.clone(),
            waiting_on: 0,
            dead_lettered: false,
            generation,
        },
    );
    for send in sends {
        let side = send.side;
        let coalesce = settings.target(side).is_some_and(|t| t.coalesce);
        let line = state.line(side);
        // The head may be in flight; only a waiting tail can absorb a newer state.
        let absorbable = line.queue.len() >= 2;
        match line.queue.back_mut() {
            Some(tail) if coalesce && absorbable => {
                tail.send = send;
                tail.waiting.push(seq);
                tail.event_ids.push(event_id.clone());
                tail.generation = generation;
            }
            _ => line.queue.push_back(Pending {
                send,
                waiting: vec![seq],
                attempts: 0,
                subject: subject.clone(),
                raw: raw.clone(),
                event_ids: vec![event_id.clone()],
                generation,
                letter: None,
            }),
        }
        if let Some(held) = state.held.get_mut(&seq) {
            held.waiting_on += 1;
        }
    }
    if decision.verdict == Verdict::Duplicate && already_queued {
        // Its deliveries are queued already (restored from the outbox, or the original is
        // still in flight): it settles with them.
        let mut n_attached = 0;
        for side in Origin::ALL {
            for pending in state.line(side).queue.iter_mut() {
                if pending.event_ids.contains(&event_id) {
                    pending.waiting.push(seq);
                    if pending.raw.is_empty() {
                        pending.subject = subject.clone();
                        pending.raw = raw.clone();
                    }
                    n_attached += 1;
                }
            }
        }
        if let Some(held) = state.held.get_mut(&seq) {
            held.waiting_on += n_attached;
        }
    }
    for side in Origin::ALL {
        pump(myself, state, side);
    }
    arm_keepalive(myself, state);
    Ok(())
}

/// Makes the user's state durable and waits for it; an error fails the actor, which hands its
/// messages back.
async fn save(state: &mut UserState) -> Result<(), ActorProcessingErr> {
    if let Some(sync) = &state.sync {
        state
            .args
            .ports
            .store
            .save_user(&state.args.key, sync)
            .await?;
    }
    state.dirty = false;
    state.durable = state.changes;
    Ok(())
}

/// Starts saving every change not yet durable, unless a save is in flight (the next one
/// starts when it is done, covering everything changed meanwhile). A change that gates
/// nothing (an accepted delivery) waits for the next event's save, or for the actor to stop.
/// The answer comes back as [`UserMsg::Saved`].
async fn start_save(
    myself: &ActorRef<UserMsg>,
    state: &mut UserState,
) -> Result<(), ActorProcessingErr> {
    if state.saving.is_some() || state.changes <= state.durable {
        return Ok(());
    }
    let Some(sync) = &state.sync else {
        return Ok(());
    };
    let generation = state.changes;
    let mut saved = state.args.ports.store.save_user(&state.args.key, sync);
    state.dirty = false;
    // A store that commits at once (the simulator's) needs no round trip through the mailbox.
    if let Some(result) = futures::FutureExt::now_or_never(&mut saved) {
        match result {
            Ok(()) => {
                state.store_failures = 0;
                on_durable(myself, state, generation).await;
            }
            Err(error) => store_failed(myself, state, error).await?,
        }
        return Ok(());
    }
    state.saving = Some(generation);
    let myself = myself.clone();
    tokio::spawn(async move {
        let result = saved.await;
        let _ = myself.cast(UserMsg::Saved { generation, result });
    });
    Ok(())
}

/// A load or save failed. Everything stays in hand (held messages kept alive at the source,
/// newer events waiting behind) and the store is tried again after a backoff, so the
/// user's events are still applied in order once it answers. A state the store refuses again
/// and again, or cannot decode, poisons the user: its events become dead letters.
async fn store_failed(
    myself: &ActorRef<UserMsg>,
    state: &mut UserState,
    error: crate::PortError,
) -> Result<(), ActorProcessingErr> {
    if state.args.settings.faults.fail_on_store_error {
        // The broken variant (see `EngineFaults`).
        return Err(error.into());
    }
    state.store_failures += 1;
    state.dirty = true;
    let poison = match &error {
        crate::PortError::Corrupt { .. } => Some("corrupt_state"),
        crate::PortError::Rejected { .. } if state.store_failures >= STORE_REJECTIONS_MAX => {
            Some("store_rejected")
        }
        _ => None,
    };
    if let Some(reason) = poison {
        tracing::error!(message = "The store cannot keep this user's state; its events are dead-lettered.", user = %state.args.key, reason, %error);
        let poison = Poison {
            reason,
            error: error.to_string(),
        };
        poison_user(state, poison).await;
        return Ok(());
    }
    let delay = store_retry_delay(state.store_failures);
    if state.store_failures == 1 || state.store_failures % 10 == 0 {
        tracing::warn!(message = "Store call failed; the user's events wait in order and it is tried again.", user = %state.args.key, failures = state.store_failures, retry_in_ms = delay.as_millis() as u64, %error);
    }
    arm_store_retry(myself, state, delay);
    arm_keepalive(myself, state);
    Ok(())
}

fn arm_store_retry(myself: &ActorRef<UserMsg>, state: &mut UserState, delay: Duration) {
    if !state.store_retry_armed {
        state.store_retry_armed = true;
        after(myself, state, delay, || UserMsg::RetryStore);
    }
}

/// Dead-letters everything the user's actor holds and stops its lines: what was not durable
/// cannot be sent, and nothing of this user can be made durable.
async fn poison_user(state: &mut UserState, poison: Poison) {
    state.poisoned = Some(poison.clone());
    state.sync = None;
    state.saving = None;
    state.dirty = false;
    state.durable = state.changes;
    for side in Origin::ALL {
        let line = state.line(side);
        line.queue.clear();
        line.busy = Busy::Idle;
    }
    let held: Vec<Held> = std::mem::take(&mut state.held)
        .0
        .into_iter()
        .map(|(_, held)| held)
        .collect();
    for held in held {
        let letter = letter_for(state, &held.incoming, &held.event_id, held.sink, &poison);
        settle_as_dead_letter(state, held.incoming, letter).await;
    }
}

/// An event of a poisoned user: a dead letter at once.
async fn dead_letter_event(state: &mut UserState, routed: Routed, poison: &Poison) {
    let letter = letter_for(
        state,
        &routed.incoming,
        &routed.event.envelope.id,
        routed.sink,
        poison,
    );
    settle_as_dead_letter(state, routed.incoming, letter).await;
}

fn letter_for(
    state: &UserState,
    incoming: &Incoming,
    event_id: &str,
    sink: Sink,
    poison: &Poison,
) -> DeadLetter {
    DeadLetter {
        subject: incoming.subject.clone(),
        raw: incoming.payload.clone(),
        reason: poison.reason.to_string(),
        event_id: Some(event_id.to_string()),
        sink: Some(sink.as_str().to_string()),
        attempts: 0,
        last_error: Some(poison.error.clone()),
        received_at_ms: state.args.ports.clock.now_ms(),
    }
}

/// Stores the dead letter, then acknowledges the message; if the dead letter cannot be
/// stored, the message goes back to the source.
async fn settle_as_dead_letter(state: &mut UserState, incoming: Incoming, letter: DeadLetter) {
    let reason = letter.reason.clone();
    let sink = letter.sink.clone().unwrap_or_default();
    match state.args.ports.store.dead_letter(letter).await {
        Ok(()) => {
            state
                .args
                .stats
                .dead_letters
                .add(&[reason.as_str(), sink.as_str()]);
            Stats::add(&state.args.stats.acked);
            incoming.ack().await;
        }
        Err(error) => {
            tracing::warn!(message = "Storing a dead letter failed; the message comes back.", user = %state.args.key, %error);
            incoming.nak(MARK_RETRY_DELAY).await;
        }
    }
}

/// Change `generation` is durable: what waited for it is settled, and may be sent.
async fn on_durable(myself: &ActorRef<UserMsg>, state: &mut UserState, generation: u64) {
    state.durable = state.durable.max(generation);
    settle_durable(state).await;
    for side in Origin::ALL {
        pump(myself, state, side);
    }
}

/// Settles the held messages whose deliveries are all settled and whose change is durable.
async fn settle_durable(state: &mut UserState) {
    let ready: Vec<u64> = state
        .held
        .iter()
        .filter(|(_, held)| held.waiting_on == 0 && held.generation <= state.durable)
        .map(|(seq, _)| *seq)
        .collect();
    for seq in ready {
        finalize(state, seq).await;
    }
}

/// An attempt got no answer (its delivery actor died): a transient failure.
async fn attempt_lost(
    myself: &ActorRef<UserMsg>,
    state: &mut UserState,
    side: Origin,
    token: u64,
) -> Result<(), ActorProcessingErr> {
    if state.line(side).busy == Busy::InFlight(token) {
        let outcome = DeliveryOutcome::Transient {
            error: "no answer from the delivery actor".into(),
            retry_after: None,
        };
        on_delivered(myself, state, side, token, outcome).await?;
    }
    Ok(())
}

/// Arms the one timer that finds attempts past their deadline, if any attempt is in flight.
fn arm_watchdog(myself: &ActorRef<UserMsg>, state: &mut UserState) {
    if state.watchdog_armed {
        return;
    }
    let earliest = Origin::ALL
        .into_iter()
        .filter_map(|side| {
            let line = state.line(side);
            matches!(line.busy, Busy::InFlight(_)).then_some(line.deadline)
        })
        .min();
    if let Some(deadline) = earliest {
        state.watchdog_armed = true;
        let wait = deadline.saturating_duration_since(Instant::now());
        after(myself, state, wait, || UserMsg::Watchdog);
    }
}

/// Sends the head of a line if nothing of it is in flight or backing off.
fn pump(myself: &ActorRef<UserMsg>, state: &mut UserState, side: Origin) {
    let token = state.next_token;
    let key = state.args.key.clone();
    let slot = match side {
        Origin::BetterAuth => state.args.better_auth.clone(),
        Origin::Payload => state.args.payload.clone(),
    };
    let timeout = state
        .args
        .settings
        .target(side)
        .map(|t| t.timeout)
        .unwrap_or(Duration::from_secs(10));
    let unordered = state.args.settings.faults.unordered_delivery;
    let durable = state.durable;
    let now_ms = state.args.ports.clock.now_ms();
    let line = state.line(side);
    if unordered && line.busy != Busy::Idle {
        // The broken variant: send the next one regardless (see `EngineFaults`).
        if let Some(next) = line
            .queue
            .iter_mut()
            .find(|p| p.attempts == 0 && p.generation <= durable)
        {
            next.attempts = 1;
            let request = DeliveryRequest {
                key,
                side,
                webhook_id: next.send.webhook_id.clone(),
                event_type: next.send.event_type,
                state: next.send.state.clone(),
                timestamp_ms: next.send.timestamp_ms,
                attempt: 1,
                token: u64::MAX,
                reply: myself.clone(),
            };
            slot.cast(DeliveryMsg::Deliver(request));
        }
        return;
    }
    if line.busy != Busy::Idle {
        return;
    }
    let Some(head) = line.queue.front_mut() else {
        return;
    };
    if head.generation > durable || head.letter.is_some() {
        return;
    }
    if let Some(wait) = held_back(line, now_ms) {
        line.busy = Busy::Backoff(token);
        state.next_token += 1;
        after(myself, state, wait, move || UserMsg::RetryDue {
            side,
            token,
        });
        return;
    }
    let Some(head) = line.queue.front_mut() else {
        return;
    };
    head.attempts += 1;
    let request = DeliveryRequest {
        key,
        side,
        webhook_id: head.send.webhook_id.clone(),
        event_type: head.send.event_type,
        state: head.send.state.clone(),
        timestamp_ms: head.send.timestamp_ms,
        attempt: head.attempts,
        token,
        reply: myself.clone(),
    };
    line.busy = Busy::InFlight(token);
    // Generous: the transport's own timeout normally answers first.
    line.deadline = Instant::now() + timeout * 2 + Duration::from_secs(5);
    state.next_token += 1;
    if !slot.cast(DeliveryMsg::Deliver(request)) {
        // No delivery actor right now (restarting): count it as a failed attempt.
        let _ = myself.cast(UserMsg::AttemptLost { side, token });
        return;
    }
    arm_watchdog(myself, state);
}

async fn on_delivered(
    myself: &ActorRef<UserMsg>,
    state: &mut UserState,
    side: Origin,
    token: u64,
    outcome: DeliveryOutcome,
) -> Result<(), ActorProcessingErr> {
    if state.line(side).busy != Busy::InFlight(token) {
        return Ok(());
    }
    let settings = state.args.settings.clone();
    let Some(target) = settings.target(side) else {
        return Ok(());
    };
    let stats = state.args.stats.clone();
    let sink = Sink::for_side(side);
    let (error, permanent, retry_after) = match outcome {
        DeliveryOutcome::Accepted { at_ms } => {
            let Some(done) = state.line(side).queue.pop_front() else {
                return Ok(());
            };
            state.line(side).busy = Busy::Idle;
            if let Some(sync) = state.sync.as_mut() {
                sync.on_delivered(side, &done.send.state, &done.event_ids, at_ms);
            }
            if state.line(side).queue.is_empty() {
                state.dirty = true;
            } else {
                // The line's next send waits until this acceptance is durable: after a crash,
                // a stored outbox that still owed this older state would send it again after
                // the newer one, out of order.
                state.changes += 1;
                let generation = state.changes;
                if let Some(next) = state.line(side).queue.front_mut() {
                    next.generation = next.generation.max(generation);
                }
            }
            tracing::debug!(message = "Delivered.", webhook_id = %done.send.webhook_id, user = %state.args.key, %sink, attempt = done.attempts);
            release(state, &done.waiting, true).await;
            pump(myself, state, side);
            return Ok(());
        }
        DeliveryOutcome::Transient { error, retry_after } => (error, false, retry_after),
        DeliveryOutcome::Permanent { error } => (error, true, None),
        DeliveryOutcome::TargetOpen { wait } => {
            // Not attempted: the line waits for the target, spending nothing.
            let line = state.line(side);
            if let Some(head) = line.queue.front_mut() {
                head.attempts = head.attempts.saturating_sub(1);
            }
            line.busy = Busy::Backoff(token);
            after(myself, state, wait, move || UserMsg::RetryDue {
                side,
                token,
            });
            arm_keepalive(myself, state);
            return Ok(());
        }
    };
    let Some((attempts, head_id)) = state
        .line(side)
        .queue
        .front()
        .map(|head| (head.attempts, head.send.webhook_id.clone()))
    else {
        return Ok(());
    };
    if !permanent && attempts < target.retry.max_attempts {
        Stats::add(&stats.retries);
        stats.retries_by_sink.add(&[sink.as_str()]);
        let delay = target
            .retry
            .delay(attempts, state.args.ports.entropy.unit(), retry_after);
        tracing::warn!(message = "Delivery failed; retrying.", webhook_id = %head_id, user = %state.args.key, %sink, attempt = attempts, retry_in_ms = delay.as_millis() as u64, %error);
        state.line(side).busy = Busy::Backoff(token);
        after(myself, state, delay, move || UserMsg::RetryDue {
            side,
            token,
        });
        for held in state.held.values() {
            held.incoming.progress().await;
        }
        return Ok(());
    }
    let now_ms = state.args.ports.clock.now_ms();
    let Some(failed) = state.line(side).queue.front_mut() else {
        return Ok(());
    };
    failed.letter = Some(DeadLetter {
        subject: failed.subject.clone(),
        raw: failed.raw.clone(),
        reason: if permanent {
            "delivery_rejected".into()
        } else {
            "delivery_failed".into()
        },
        event_id: failed.event_ids.first().cloned(),
        sink: Some(sink.as_str().to_string()),
        attempts,
        last_error: Some(error.clone()),
        received_at_ms: now_ms,
    });
    tracing::error!(message = "Delivery dead-lettered.", webhook_id = %head_id, user = %state.args.key, %sink, attempt = attempts, %error);
    state.line(side).busy = Busy::Idle;
    store_letter_due(myself, state, side).await;
    Ok(())
}

/// The head of `side`'s line failed for good: its dead letter is stored, then what waited for
/// it settles once that change of the state is durable. While the store cannot take the dead
/// letter, the line waits (nothing behind it may overtake it) and it is tried again.
async fn store_letter_due(myself: &ActorRef<UserMsg>, state: &mut UserState, side: Origin) {
    let Some(letter) = state
        .line(side)
        .queue
        .front()
        .and_then(|head| head.letter.clone())
    else {
        return;
    };
    let reason = letter.reason.clone();
    if let Err(error) = state.args.ports.store.dead_letter(letter).await {
        state.store_failures += 1;
        let delay = store_retry_delay(state.store_failures);
        tracing::warn!(message = "Storing a dead letter failed; the line waits and it is tried again.", user = %state.args.key, retry_in_ms = delay.as_millis() as u64, %error);
        arm_store_retry(myself, state, delay);
        arm_keepalive(myself, state);
        return;
    }
    let Some(failed) = state.line(side).queue.pop_front() else {
        return;
    };
    let sink = Sink::for_side(side);
    state
        .args
        .stats
        .dead_letters
        .add(&[reason.as_str(), sink.as_str()]);
    if let Some(sync) = state.sync.as_mut() {
        sync.on_dead_lettered(side, &failed.send.state, &failed.event_ids);
    }
    // Nothing that waited for it settles, and nothing behind it is sent, before the state
    // without it is durable: a crash in between would send it again after newer ones.
    state.changes += 1;
    let generation = state.changes;
    for seq in &failed.waiting {
        if let Some(held) = state.held.get_mut(seq) {
            held.generation = held.generation.max(generation);
        }
    }
    if let Some(next) = state.line(side).queue.front_mut() {
        next.generation = next.generation.max(generation);
    }
    release(state, &failed.waiting, false).await;
    pump(myself, state, side);
}

/// One delivery the held messages waited for is settled: `accepted`, or dead-lettered.
async fn release(state: &mut UserState, waiting: &[u64], accepted: bool) {
    for seq in waiting {
        if let Some(held) = state.held.get_mut(seq) {
            held.dead_lettered |= !accepted;
            held.waiting_on = held.waiting_on.saturating_sub(1);
        }
    }
    settle_durable(state).await;
}

/// Marks the message's id for its sink, then acknowledges it.
async fn finalize(state: &mut UserState, seq: u64) {
    let Some(held) = state.held.remove(&seq) else {
        return;
    };
    let ids = [held.event_id.clone()];
    if let Err(error) = state.args.ports.dedup.mark(held.sink, &ids).await {
        // Not marked is not done: without the mark, a late republish of this id would be
        // applied again. It comes back, finds its effect already there, and tries again.
        tracing::warn!(message = "Marking the event processed failed; it will be redelivered.", event_id = %held.event_id, %error);
        held.incoming.nak(MARK_RETRY_DELAY).await;
        return;
    }
    if let Some(sync) = state.sync.as_mut() {
        sync.on_settled(&held.event_id);
    }
    Stats::add(&state.args.stats.acked);
    held.incoming.ack().await;
}

/// How long a message whose id could not be marked waits before it comes back.
const MARK_RETRY_DELAY: Duration = Duration::from_secs(1);

fn arm_keepalive(myself: &ActorRef<UserMsg>, state: &mut UserState) {
    if (!state.held.is_empty() || !state.backlog.is_empty()) && !state.keepalive_armed {
        state.keepalive_armed = true;
        let interval = state.args.settings.progress_interval();
        after(myself, state, interval, || UserMsg::KeepAlive);
    }
}
