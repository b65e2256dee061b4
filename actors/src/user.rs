//! The user actor: serializes one user's events and performs what its book decides.
//!
//! Every decision (merge, lines, held messages, durability) is made by the user's pure
//! [`Book`](crate::book::Book); this actor loads and saves the state, sends deliveries, keeps
//! timers, and settles messages as the book's actions say. A message is acknowledged only when
//! every delivery it waits for is accepted or dead-lettered, its effect is durable, and its id
//! is marked for its sink (PROTOCOL.md §5.1–5.3).
//!
//! Architecture Invariant: per (user, side) at most one delivery is in flight, and lines are
//! sent in the order the events were applied (asserted and property-tested in the book).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use protocol::{Origin, UserKey};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::time::Instant;

use crate::book::{Action, Applied, Arrival, Attempt, Book, Wait};
pub use crate::messages::UserMsg;
use crate::messages::{DeliveryMsg, DeliveryOutcome, DeliveryRequest, Routed, RouterMsg};
use crate::parked::ParkedState;
use crate::ports::{DeadLetter, Incoming, Ports};
use crate::settings::PipelineSettings;
use crate::sink::Sink;
use crate::slot::Slot;
use crate::stats::Stats;
use crate::sync::{EventView, Verdict};
use protocol::merge::MergeOutcome;

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

/// How long a user actor stays after its last piece of work when the user's events give no
/// better guess (see the user actor's `linger`); its state then waits parked in the router (see
/// [`crate::parked`]).
pub const PARK_AFTER: Duration = Duration::from_millis(100);

/// The longest a user actor lingers, however far apart the user's events.
pub const LINGER_MAX: Duration = Duration::from_secs(5);

pub struct UserState {
    args: UserArgs,
    book: Book<Incoming>,
    /// Events received while the book takes no more, in arrival order.
    backlog: VecDeque<Routed>,
    /// Per side (Better Auth, Payload): the attempt in flight, and when it counts as lost if
    /// nothing answered it.
    deadlines: [Option<(u64, Instant)>; 2],
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
    timers: Timers,
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
    fn is_idle(&self) -> bool {
        self.backlog.is_empty() && self.book.is_idle()
    }

    fn now_ms(&self) -> i64 {
        self.args.ports.clock.now_ms()
    }
}

fn index(side: Origin) -> usize {
    match side {
        Origin::BetterAuth => 0,
        Origin::Payload => 1,
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
        let book = Book::new(args.settings.clone());
        Ok(UserState {
            args,
            book,
            backlog: VecDeque::new(),
            deadlines: [None, None],
            received: 0,
            last_activity: Instant::now(),
            last_event: None,
            gap: None,
            idle_armed: false,
            keepalive_armed: false,
            watchdog_armed: false,
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
        if state.book.is_dirty() {
            if let Err(error) = Box::pin(flush(state)).await {
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
    let now_ms = state.now_ms();
    let actions = match message {
        UserMsg::Event(routed) => {
            on_arrival(state, routed);
            Vec::new()
        }
        UserMsg::Delivered {
            side,
            token,
            outcome,
        } => on_delivered(state, side, token, outcome),
        UserMsg::RetryDue { side, token } => state.book.on_retry_due(side, token, now_ms),
        UserMsg::AttemptLost { side, token } => attempt_lost(state, side, token),
        UserMsg::Saved { generation, result } => {
            fail_on_store_error(state, &result)?;
            state.book.on_saved(generation, result, now_ms)
        }
        UserMsg::RetryStore => state.book.on_retry_store(),
        UserMsg::Watchdog => {
            state.watchdog_armed = false;
            let lost = watchdog(state);
            arm_watchdog(&myself, state);
            lost
        }
        UserMsg::KeepAlive => {
            state.keepalive_armed = false;
            keep_alive(state).await;
            Vec::new()
        }
        UserMsg::Flush(reply) => {
            let saved = state.book.flush_due();
            if saved {
                if let Err(error) = flush(state).await {
                    tracing::warn!(message = "Saving a user's state at shutdown failed; its last deliveries may be repeated.", user = %state.args.key, %error);
                }
            }
            let _ = reply.send(saved);
            return Ok(());
        }
        UserMsg::IdleCheck => {
            state.idle_armed = false;
            idle_check(&myself, state);
            return Ok(());
        }
    };
    perform(&myself, state, actions).await?;
    apply_backlog(&myself, state).await?;
    if let Some(save) = state.book.save_due() {
        perform(&myself, state, vec![save]).await?;
    }
    arm_keepalive(&myself, state);
    if state.is_idle() && !state.idle_armed {
        state.idle_armed = true;
        let linger = linger(state);
        after(&myself, state, linger, || UserMsg::IdleCheck);
    }
    Ok(())
}

fn on_arrival(state: &mut UserState, routed: Routed) {
    state.received += 1;
    let now = Instant::now();
    if let Some(previous) = state.last_event {
        state.gap = Some(now.saturating_duration_since(previous));
    }
    state.last_event = Some(now);
    state.backlog.push_back(routed);
}

/// Applies the backlog's events while the book takes them, loading the state first.
async fn apply_backlog(
    myself: &ActorRef<UserMsg>,
    state: &mut UserState,
) -> Result<(), ActorProcessingErr> {
    while state.book.accepts_event() {
        let Some(routed) = state.backlog.pop_front() else {
            break;
        };
        if state.book.needs_load() {
            if let Err(error) = load(state).await {
                state.backlog.push_front(routed);
                let result = Err(error);
                fail_on_store_error(state, &result)?;
                let Err(error) = result else { continue };
                let actions = state.book.on_store_error(error, state.now_ms());
                perform(myself, state, actions).await?;
                continue;
            }
        }
        let actions = on_event(state, routed).await;
        perform(myself, state, actions).await?;
    }
    Ok(())
}

/// The broken variant (see `EngineFaults`): a store error fails the actor, which hands its
/// messages back.
fn fail_on_store_error(
    state: &UserState,
    result: &Result<(), crate::PortError>,
) -> Result<(), ActorProcessingErr> {
    match result {
        Err(error) if state.args.settings.faults.fail_on_store_error => {
            Err(error.to_string().into())
        }
        _ => Ok(()),
    }
}

/// Loads the user's state: the router's parked copy if it parses, else the store's.
async fn load(state: &mut UserState) -> Result<(), crate::PortError> {
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
    if state.gap.is_none() {
        // A new actor has no earlier event of its own to measure from: the user's last
        // accepted delivery, as its state has it (parked or stored), stands in for its last
        // event, so a user whose events keep coming is not taken for a one-off each time its
        // actor restarts.
        let last = [&loaded.better_auth, &loaded.payload]
            .iter()
            .filter_map(|side| side.last_delivery_ms)
            .max();
        if let Some(last) = last {
            let since = state.now_ms().saturating_sub(last);
            state.gap = u64::try_from(since).ok().map(Duration::from_millis);
        }
    }
    let now_ms = state.now_ms();
    state.book.on_loaded(loaded, now_ms);
    Ok(())
}

async fn on_event(state: &mut UserState, routed: Routed) -> Vec<Action<Incoming>> {
    let Routed {
        sink,
        event,
        incoming,
    } = routed;
    if state.args.settings.faults.mark_before_delivery {
        let ids = [event.envelope.id.clone()];
        let _ = state.args.ports.dedup.mark(sink, &ids).await;
    }
    let envelope = &event.envelope;
    let view = EventView {
        id: &envelope.id,
        origin: envelope.origin,
        event_type: envelope.event_type,
        timestamp_ms: envelope.timestamp,
        sequence: incoming.sequence,
        fields: &event.fields,
    };
    let sequence = incoming.sequence;
    let arrival = Arrival {
        subject: incoming.subject.clone(),
        raw: incoming.payload.clone(),
        message: incoming,
        sink,
    };
    let now_ms = state.now_ms();
    let (applied, actions) = state.book.on_event(view, arrival, now_ms);
    if let Some(applied) = applied {
        count_applied(state, &applied, &envelope.id, sequence, sink);
        tracing::trace!(event_id = %envelope.id, ts = envelope.timestamp, fields = ?event.fields, "Event detail.");
    }
    actions
}

fn count_applied(state: &UserState, applied: &Applied, event_id: &str, sequence: u64, sink: Sink) {
    tracing::debug!(
        message = "Event applied.",
        event_id,
        user = %state.args.key,
        %sink,
        verdict = ?applied.verdict,
        n_sends = applied.sends,
    );
    let stats = &state.args.stats;
    if applied.late {
        Stats::add(&stats.late);
        tracing::warn!(message = "Event applied after a later event of its side.", event_id, user = %state.args.key, sequence);
    }
    match applied.verdict {
        Verdict::Echo => Stats::add(&stats.echoes),
        Verdict::Duplicate => Stats::add(&stats.duplicates),
        Verdict::Merged(MergeOutcome::Unchanged) if applied.sends == 0 => Stats::add(&stats.stale),
        Verdict::Merged(_) if applied.sends == 0 => Stats::add(&stats.no_ops),
        Verdict::Merged(_) => {}
        Verdict::Resync => Stats::add(&stats.resync_requests),
    }
}

fn on_delivered(
    state: &mut UserState,
    side: Origin,
    token: u64,
    outcome: DeliveryOutcome,
) -> Vec<Action<Incoming>> {
    if state.book.in_flight(side, token) {
        state.deadlines[index(side)] = None;
        if matches!(outcome, DeliveryOutcome::Accepted { .. }) {
            tracing::debug!(message = "Delivered.", webhook_id = state.book.head_id(side).unwrap_or_default(), user = %state.args.key, sink = %Sink::for_side(side));
        }
    }
    let now_ms = state.now_ms();
    let entropy = state.args.ports.entropy.clone();
    state
        .book
        .on_delivered(side, token, outcome, now_ms, || entropy.unit())
}

fn attempt_lost(state: &mut UserState, side: Origin, token: u64) -> Vec<Action<Incoming>> {
    if state.book.in_flight(side, token) {
        state.deadlines[index(side)] = None;
    }
    let now_ms = state.now_ms();
    let entropy = state.args.ports.entropy.clone();
    state
        .book
        .on_attempt_lost(side, token, now_ms, || entropy.unit())
}

/// The attempts past their deadline count as lost.
fn watchdog(state: &mut UserState) -> Vec<Action<Incoming>> {
    let now = Instant::now();
    let mut actions = Vec::new();
    for side in Origin::ALL {
        if let Some((token, deadline)) = state.deadlines[index(side)] {
            if deadline <= now {
                actions.extend(attempt_lost(state, side, token));
            }
        }
    }
    actions
}

async fn keep_alive(state: &UserState) {
    for message in state.book.held_messages() {
        message.progress().await;
    }
    for routed in &state.backlog {
        routed.incoming.progress().await;
    }
}

/// An idle actor that lingered long enough queues its last save and asks the router to stop
/// it, handing over its state to park.
fn idle_check(myself: &ActorRef<UserMsg>, state: &mut UserState) {
    if !state.is_idle() {
        return;
    }
    let linger = linger(state);
    let idle_for = state.last_activity.elapsed();
    if idle_for < linger {
        state.idle_armed = true;
        after(myself, state, linger - idle_for, || UserMsg::IdleCheck);
        return;
    }
    // One encoding serves both the last save and the parked copy.
    let parking = state.args.settings.idle_cache_bytes > 0;
    let dirty = state.book.is_dirty();
    let stored = if dirty || parking {
        encode(state)
    } else {
        None
    };
    if dirty {
        // Queued, not awaited: the store serves it to readers from the queue (a next actor
        // loads it), and losing it in a crash repeats one delivery, as with any lazily saved
        // acceptance. Waiting for the commit would keep thousands of idle actors alive for
        // nothing.
        if let Some(sync) = state.book.sync() {
            let store = &state.args.ports.store;
            drop(match &stored {
                Some(bytes) => store.save_user_encoded(&state.args.key, sync, bytes),
                None => store.save_user(&state.args.key, sync),
            });
        }
        state.book.on_parked();
    }
    // The router stops this actor unless events are on their way to it.
    state.args.router.cast(RouterMsg::Idle {
        key: state.args.key.clone(),
        actor: myself.get_id(),
        received: state.received,
        parked: stored.filter(|_| parking),
    });
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
    let sync = state.book.sync()?;
    match crate::state_codec::encode(sync) {
        Ok(bytes) => Some(bytes.into()),
        Err(error) => {
            tracing::warn!(message = "Could not encode an idle user's state; it is saved the usual way and not parked.", user = %state.args.key, %error);
            None
        }
    }
}

/// Saves the whole state and waits for it (shutdown, or a stop).
async fn flush(state: &mut UserState) -> Result<(), ActorProcessingErr> {
    if let Some(sync) = state.book.sync() {
        state
            .args
            .ports
            .store
            .save_user(&state.args.key, sync)
            .await?;
    }
    state.book.on_flushed();
    Ok(())
}

/// Performs the book's actions, and those its answers lead to, in order.
async fn perform(
    myself: &ActorRef<UserMsg>,
    state: &mut UserState,
    actions: Vec<Action<Incoming>>,
) -> Result<(), ActorProcessingErr> {
    let mut queue: VecDeque<_> = actions.into();
    while let Some(action) = queue.pop_front() {
        let now_ms = state.now_ms();
        match action {
            Action::Save { generation } => {
                if let Some(result) = start_save(myself, state, generation) {
                    fail_on_store_error(state, &result)?;
                    queue.extend(state.book.on_saved(generation, result, now_ms));
                }
            }
            Action::Send(attempt) => send(myself, state, attempt),
            Action::Wait {
                side,
                token,
                delay,
                why,
            } => {
                if let Wait::Retry { attempt, error } = &why {
                    count_retry(state, side, *attempt, delay, error);
                }
                after(myself, state, delay, move || UserMsg::RetryDue {
                    side,
                    token,
                });
            }
            Action::StoreLetter {
                side,
                letter,
                fresh,
            } => {
                let result = store_letter(state, letter, fresh).await;
                queue.extend(state.book.on_letter_stored(side, result, now_ms));
            }
            Action::Settle {
                message,
                sink,
                event_id,
                ..
            } => settle(state, message, sink, event_id).await,
            Action::Reject { message, letter } => reject(state, message, letter).await,
            Action::Return { message } => message.nak(MARK_RETRY_DELAY).await,
            Action::Progress => {
                for message in state.book.held_messages() {
                    message.progress().await;
                }
            }
            Action::RetryStore {
                delay,
                failures,
                error,
            } => {
                if failures == 1 || failures % 10 == 0 {
                    tracing::warn!(message = "Store call failed; the user's events wait in order and it is tried again.", user = %state.args.key, failures, retry_in_ms = delay.as_millis() as u64, %error);
                }
                after(myself, state, delay, || UserMsg::RetryStore);
            }
            Action::Poisoned { reason, error } => {
                tracing::error!(message = "The store cannot keep this user's state; its events are dead-lettered.", user = %state.args.key, reason, %error);
            }
        }
    }
    Ok(())
}

/// Starts the save of change `generation`; its answer comes back as [`UserMsg::Saved`], or at
/// once from a store that commits at once (the simulator's), with no round trip through the
/// mailbox.
fn start_save(
    myself: &ActorRef<UserMsg>,
    state: &mut UserState,
    generation: u64,
) -> Option<Result<(), crate::PortError>> {
    let sync = state.book.sync()?;
    let mut saved = state.args.ports.store.save_user(&state.args.key, sync);
    if let Some(result) = futures::FutureExt::now_or_never(&mut saved) {
        return Some(result);
    }
    let myself = myself.clone();
    tokio::spawn(async move {
        let result = saved.await;
        let _ = myself.cast(UserMsg::Saved { generation, result });
    });
    None
}

fn send(myself: &ActorRef<UserMsg>, state: &mut UserState, attempt: Attempt) {
    let side = attempt.side;
    let token = attempt.token;
    let request = DeliveryRequest {
        key: state.args.key.clone(),
        side,
        webhook_id: attempt.webhook_id,
        event_type: attempt.event_type,
        state: attempt.state,
        timestamp_ms: attempt.timestamp_ms,
        attempt: attempt.attempt,
        token,
        reply: myself.clone(),
    };
    let slot = match side {
        Origin::BetterAuth => &state.args.better_auth,
        Origin::Payload => &state.args.payload,
    };
    if !slot.cast(DeliveryMsg::Deliver(request)) {
        // No delivery actor right now (restarting): count it as a failed attempt.
        let _ = myself.cast(UserMsg::AttemptLost { side, token });
        return;
    }
    if token == u64::MAX {
        // The broken variant's extra sends have no line to answer.
        return;
    }
    let timeout = state
        .args
        .settings
        .target(side)
        .map_or(Duration::from_secs(10), |t| t.timeout);
    // Generous: the transport's own timeout normally answers first.
    let deadline = Instant::now() + timeout * 2 + Duration::from_secs(5);
    state.deadlines[index(side)] = Some((token, deadline));
    arm_watchdog(myself, state);
}

fn count_retry(state: &UserState, side: Origin, attempt: u32, delay: Duration, error: &str) {
    let stats = &state.args.stats;
    let sink = Sink::for_side(side);
    Stats::add(&stats.retries);
    stats.retries_by_sink.add(&[sink.as_str()]);
    tracing::warn!(message = "Delivery failed; retrying.", webhook_id = state.book.head_id(side).unwrap_or_default(), user = %state.args.key, %sink, attempt, retry_in_ms = delay.as_millis() as u64, %error);
}

/// Stores a line's dead letter; counts it once stored.
async fn store_letter(
    state: &UserState,
    letter: DeadLetter,
    fresh: bool,
) -> Result<(), crate::PortError> {
    let reason = letter.reason.clone();
    let sink = letter.sink.clone().unwrap_or_default();
    if fresh {
        tracing::error!(message = "Delivery dead-lettered.", webhook_id = letter.event_id.as_deref().unwrap_or_default(), user = %state.args.key, %sink, attempt = letter.attempts, error = letter.last_error.as_deref().unwrap_or_default());
    }
    let result = state.args.ports.store.dead_letter(letter).await;
    match &result {
        Ok(()) => state
            .args
            .stats
            .dead_letters
            .add(&[reason.as_str(), sink.as_str()]),
        Err(error) => {
            tracing::warn!(message = "Storing a dead letter failed; the line waits and it is tried again.", user = %state.args.key, %error);
        }
    }
    result
}

/// Marks the message's id for its sink, then acknowledges it.
async fn settle(state: &mut UserState, message: Incoming, sink: Sink, event_id: String) {
    let ids = [event_id];
    if let Err(error) = state.args.ports.dedup.mark(sink, &ids).await {
        // Not marked is not done: without the mark, a late republish of this id would be
        // applied again. It comes back, finds its effect already there, and tries again.
        tracing::warn!(message = "Marking the event processed failed; it will be redelivered.", event_id = %ids[0], %error);
        message.nak(MARK_RETRY_DELAY).await;
        return;
    }
    state.book.on_marked(&ids[0]);
    Stats::add(&state.args.stats.acked);
    message.ack().await;
}

/// Stores the dead letter, then acknowledges the message; if the dead letter cannot be
/// stored, the message goes back to the source.
async fn reject(state: &UserState, message: Incoming, letter: DeadLetter) {
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
            message.ack().await;
        }
        Err(error) => {
            tracing::warn!(message = "Storing a dead letter failed; the message comes back.", user = %state.args.key, %error);
            message.nak(MARK_RETRY_DELAY).await;
        }
    }
}

/// How long a message whose id could not be marked waits before it comes back.
const MARK_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Arms the one timer that finds attempts past their deadline, if any attempt is in flight.
fn arm_watchdog(myself: &ActorRef<UserMsg>, state: &mut UserState) {
    if state.watchdog_armed {
        return;
    }
    let earliest = Origin::ALL
        .into_iter()
        .filter_map(|side| {
            let (token, deadline) = state.deadlines[index(side)]?;
            state.book.in_flight(side, token).then_some(deadline)
        })
        .min();
    if let Some(deadline) = earliest {
        state.watchdog_armed = true;
        let wait = deadline.saturating_duration_since(Instant::now());
        after(myself, state, wait, || UserMsg::Watchdog);
    }
}

fn arm_keepalive(myself: &ActorRef<UserMsg>, state: &mut UserState) {
    let holding = state.book.held_messages().next().is_some() || !state.backlog.is_empty();
    if holding && !state.keepalive_armed {
        state.keepalive_armed = true;
        let interval = state.args.settings.progress_interval();
        after(myself, state, interval, || UserMsg::KeepAlive);
    }
}
