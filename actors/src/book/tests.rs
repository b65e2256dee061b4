//! The book's invariants, property-tested: a driver plays the actor and the world (store,
//! targets, timers, crashes) against random inputs, and checks each action against what the
//! world has made durable, never against the book's own counters.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use protocol::signing::{Keyring, SigningScheme};
use protocol::user::{CanonicalFields, Mappings};
use protocol::{EventType, Origin, Secret};
use serde_json::{json, Value};

use super::*;
use crate::messages::DeliveryOutcome;
use crate::settings::{EngineFaults, RetryPolicy, TargetSettings};
use crate::sync::{EventView, Faults, Policy};

fn settings(started_at_ms: i64, coalesce: bool, faults: EngineFaults) -> Arc<PipelineSettings> {
    let keyring = Keyring::parse(
        SigningScheme::StandardWebhooks,
        &Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    )
    .expect("a valid test secret");
    let target = TargetSettings {
        url: "test://target".into(),
        keyring,
        timeout: Duration::from_secs(1),
        max_concurrency: 8,
        coalesce,
        retry: RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: 0.2,
            max_attempts: 3,
        },
        breaker: crate::breaker::BreakerSettings {
            failures: 5,
            probe_interval: Duration::from_secs(2),
        },
    };
    Arc::new(PipelineSettings {
        max_in_flight: 500,
        user_idle_timeout: Duration::from_secs(1),
        idle_cache_bytes: 0,
        ack_wait: Duration::from_secs(30),
        max_message_bytes: 1 << 20,
        max_deliver: None,
        fetch_batch: 32,
        mappings: Mappings::default(),
        policy: Policy {
            clock_skew_ms: 500,
            faults: Faults::default(),
        },
        payload: Some(target.clone()),
        better_auth: Some(target),
        faults,
        started_at_ms,
    })
}

#[derive(Debug, Clone)]
enum Op {
    Event {
        payload: bool,
        kind: u8,
        name: u8,
    },
    /// Finish the save in flight: 0..=3 committed, 4 unavailable, 5 rejected.
    Save(u8),
    /// Answer a side's attempt: 0..=4 accepted, 5 transient, 6 permanent, 7 target open.
    Answer {
        payload: bool,
        outcome: u8,
    },
    /// Fire the n-th pending timer.
    Fire(u8),
    /// Answer the oldest dead letter to store.
    Letter(bool),
    /// Answer the oldest mark.
    Mark(bool),
    /// The engine dies; the next run loads the store (0..=3 fine, 4 unavailable, 5 corrupt),
    /// and an odd byte lets the save in flight commit first.
    Crash(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<bool>(), 0u8..7, 0u8..4)
            .prop_map(|(payload, kind, name)| Op::Event { payload, kind, name }),
        4 => (0u8..6).prop_map(Op::Save),
        4 => (any::<bool>(), 0u8..8).prop_map(|(payload, outcome)| Op::Answer { payload, outcome }),
        2 => any::<u8>().prop_map(Op::Fire),
        1 => (0u8..4).prop_map(|n| Op::Letter(n > 0)),
        2 => (0u8..6).prop_map(|n| Op::Mark(n > 0)),
        1 => any::<u8>().prop_map(Op::Crash),
    ]
}

#[derive(Debug, Clone)]
struct Ev {
    id: String,
    origin: Origin,
    event_type: EventType,
    timestamp_ms: i64,
    fields: CanonicalFields,
}

enum Timer {
    Retry(Origin, u64),
    Store,
}

struct Driver {
    coalesce: bool,
    faults: EngineFaults,
    book: Book<usize>,
    now_ms: i64,
    /// What the store has committed.
    stored: SyncState,
    /// The highest change of this run the store committed.
    durable: u64,
    save: Option<(u64, SyncState)>,
    sends: [Option<Attempt>; 2],
    timers: Vec<(i64, Timer)>,
    letters: VecDeque<Origin>,
    marks: VecDeque<(usize, String)>,
    backlog: VecDeque<usize>,
    events: Vec<Ev>,
    settled: BTreeSet<usize>,
    rejected: BTreeSet<usize>,
    /// Events whose delivery a target accepted, by side (a coalesced delivery covers several).
    accepted: HashSet<(Origin, String)>,
    load_fault: Option<crate::PortError>,
}

impl Driver {
    fn new(coalesce: bool, faults: EngineFaults) -> Self {
        let now_ms = 1_000_000;
        Driver {
            coalesce,
            faults,
            book: Book::new(settings(now_ms, coalesce, faults)),
            now_ms,
            stored: SyncState::default(),
            durable: 0,
            save: None,
            sends: [None, None],
            timers: Vec::new(),
            letters: VecDeque::new(),
            marks: VecDeque::new(),
            backlog: VecDeque::new(),
            events: Vec::new(),
            settled: BTreeSet::new(),
            rejected: BTreeSet::new(),
            accepted: HashSet::new(),
            load_fault: None,
        }
    }

    fn run(&mut self, op: Op) {
        self.now_ms += 7;
        match op {
            Op::Event {
                payload,
                kind,
                name,
            } => self.publish(payload, kind, name),
            Op::Save(outcome) => self.finish_save(outcome),
            Op::Answer { payload, outcome } => self.answer(side(payload), outcome),
            Op::Fire(n) => self.fire(n as usize),
            Op::Letter(ok) => self.letter(ok),
            Op::Mark(ok) => self.mark(ok),
            Op::Crash(how) => self.crash(how),
        }
        self.turn();
    }

    /// Publishes an event and lets the actor take its turn.
    fn event(&mut self, payload: bool, kind: u8, name: u8) {
        self.run(Op::Event {
            payload,
            kind,
            name,
        });
    }

    fn publish(&mut self, payload: bool, kind: u8, name: u8) {
        let n = self.events.len();
        let event_type = match kind {
            0 => EventType::Created,
            5 => EventType::Deleted,
            6 => EventType::Resync,
            _ => EventType::Updated,
        };
        let fields = match json!({"id": "u", "email": "u@x", "name": format!("n{name}")}) {
            Value::Object(map) => map.into_iter().collect(),
            _ => CanonicalFields::new(),
        };
        self.events.push(Ev {
            id: format!("e{n}"),
            origin: side(payload),
            event_type,
            timestamp_ms: self.now_ms,
            fields,
        });
        self.backlog.push_back(n);
    }

    /// What the actor does after every message: apply the backlog, then save.
    fn turn(&mut self) {
        while self.book.accepts_event() {
            let Some(m) = self.backlog.pop_front() else {
                break;
            };
            if self.book.needs_load() {
                if let Some(error) = self.load_fault.take() {
                    self.backlog.push_front(m);
                    let actions = self.book.on_store_error(error, self.now_ms);
                    self.perform(actions);
                    continue;
                }
                self.book.on_loaded(self.stored.clone(), self.now_ms);
            }
            let ev = self.events[m].clone();
            let view = EventView {
                id: &ev.id,
                origin: ev.origin,
                event_type: ev.event_type,
                timestamp_ms: ev.timestamp_ms,
                sequence: m as u64 + 1,
                fields: &ev.fields,
            };
            let arrival = Arrival {
                message: m,
                sink: Sink::fed_by(ev.origin),
                subject: "user.updated".into(),
                raw: bytes::Bytes::from_static(b"{}"),
            };
            let (_, actions) = self.book.on_event(view, arrival, self.now_ms);
            self.perform(actions);
        }
        if let Some(save) = self.book.save_due() {
            self.perform(vec![save]);
        }
    }

    fn perform(&mut self, actions: Vec<Action<usize>>) {
        for action in actions {
            match action {
                Action::Save { generation } => {
                    assert!(self.save.is_none(), "two saves at once");
                    let state = self.book.sync().cloned().expect("a loaded state to save");
                    self.save = Some((generation, state));
                }
                Action::Send(attempt) => self.sent(attempt),
                Action::Wait {
                    side, token, delay, ..
                } => self.arm(delay, Timer::Retry(side, token)),
                Action::StoreLetter { side, .. } => self.letters.push_back(side),
                Action::Settle {
                    message,
                    event_id,
                    generation,
                    ..
                } => self.settling(message, event_id, generation),
                Action::Reject { message, .. } => {
                    assert!(!self.settled.contains(&message), "rejected after settled");
                    self.rejected.insert(message);
                }
                Action::Return { message } => self.backlog.push_back(message),
                Action::Progress | Action::Poisoned { .. } => {}
                Action::RetryStore { delay, .. } => self.arm(delay, Timer::Store),
            }
        }
    }

    fn arm(&mut self, delay: Duration, timer: Timer) {
        let due = self.now_ms + delay.as_millis() as i64;
        self.timers.push((due, timer));
    }

    /// One send in flight per line, and only what the store holds as owed first on its line.
    fn sent(&mut self, attempt: Attempt) {
        let at = index(attempt.side);
        assert!(self.sends[at].is_none(), "two sends in flight on one line");
        if attempt.token == u64::MAX {
            // The broken variant's extra send: nothing answers it.
            return;
        }
        assert!(attempt.generation <= self.durable, "sent before durable");
        let head = self.book.lines[at]
            .queue
            .front()
            .expect("a sent head is in its line");
        let owed: Vec<_> = self
            .stored
            .outbox
            .iter()
            .filter(|entry| entry.send.side == attempt.side)
            .collect();
        let place = owed
            .iter()
            .position(|entry| entry.send.webhook_id == attempt.webhook_id);
        let Some(place) = place else {
            panic!("sent {} before the store owed it", attempt.webhook_id);
        };
        for entry in &owed[..place] {
            assert!(
                head.event_ids.contains(&entry.event_id),
                "{} sent while the store still owes {} ahead of it",
                attempt.webhook_id,
                entry.send.webhook_id
            );
        }
        self.sends[at] = Some(attempt);
    }

    /// Settled only once the store holds the event applied, and every delivery of it the
    /// store still owes was accepted.
    fn settling(&mut self, message: usize, event_id: String, generation: u64) {
        assert!(generation <= self.durable, "settled before durable");
        let applied = self.stored.record.has_seen(&event_id)
            || self.stored.unsettled.iter().any(|id| **id == *event_id);
        assert!(applied, "{event_id} settled before the store held it");
        for entry in &self.stored.outbox {
            if entry.event_id == event_id {
                let side = entry.send.side;
                assert!(
                    self.accepted.contains(&(side, event_id.clone())),
                    "{event_id} settled while the store owes {}",
                    entry.send.webhook_id
                );
            }
        }
        assert!(!self.rejected.contains(&message), "settled after rejected");
        self.marks.push_back((message, event_id));
    }

    fn finish_save(&mut self, outcome: u8) {
        let Some((generation, state)) = self.save.take() else {
            return;
        };
        let result = match outcome {
            0..=3 => {
                self.stored = state;
                self.durable = self.durable.max(generation);
                Ok(())
            }
            4 => Err(crate::PortError::unavailable("store", "cut")),
            _ => Err(crate::PortError::rejected("store", "too long")),
        };
        let actions = self.book.on_saved(generation, result, self.now_ms);
        self.perform(actions);
    }

    fn answer(&mut self, side: Origin, outcome: u8) {
        let Some(attempt) = self.sends[index(side)].take() else {
            return;
        };
        let outcome = match outcome {
            0..=4 => {
                self.accept(side);
                DeliveryOutcome::Accepted { at_ms: self.now_ms }
            }
            5 => DeliveryOutcome::Transient {
                error: "503".into(),
                retry_after: None,
            },
            6 => DeliveryOutcome::Permanent {
                error: "400".into(),
            },
            _ => DeliveryOutcome::TargetOpen {
                wait: Duration::from_secs(5),
            },
        };
        let actions = self
            .book
            .on_delivered(side, attempt.token, outcome, self.now_ms, || 0.5);
        self.perform(actions);
    }

    /// The head of `side`'s line is accepted: every event it covers is delivered.
    fn accept(&mut self, side: Origin) {
        if let Some(head) = self.book.lines[index(side)].queue.front() {
            for event_id in &head.event_ids {
                self.accepted.insert((side, event_id.clone()));
            }
        }
    }

    fn fire(&mut self, n: usize) {
        if self.timers.is_empty() {
            return;
        }
        let (due, timer) = self.timers.remove(n % self.timers.len());
        self.now_ms = self.now_ms.max(due);
        let actions = match timer {
            Timer::Retry(side, token) => self.book.on_retry_due(side, token, self.now_ms),
            Timer::Store => self.book.on_retry_store(),
        };
        self.perform(actions);
    }

    fn letter(&mut self, ok: bool) {
        let Some(side) = self.letters.pop_front() else {
            return;
        };
        let result = if ok {
            Ok(())
        } else {
            Err(crate::PortError::unavailable("store", "cut"))
        };
        let actions = self.book.on_letter_stored(side, result, self.now_ms);
        self.perform(actions);
    }

    fn mark(&mut self, ok: bool) {
        let Some((message, event_id)) = self.marks.pop_front() else {
            return;
        };
        if ok {
            self.book.on_marked(&event_id);
            self.settled.insert(message);
        } else {
            self.backlog.push_back(message);
        }
    }

    /// The engine dies: everything in memory is gone, the unsettled messages come back in
    /// stream order, and a new run loads the store.
    fn crash(&mut self, how: u8) {
        if let Some((_, state)) = self.save.take() {
            if how % 2 == 1 {
                self.stored = state;
            }
        }
        self.restart_actor(self.now_ms);
        let pending: BTreeSet<usize> = (0..self.events.len())
            .filter(|m| !self.settled.contains(m) && !self.rejected.contains(m))
            .collect();
        self.backlog = pending.into_iter().collect();
        self.load_fault = match how / 2 % 8 {
            4 => Some(crate::PortError::unavailable("store", "cut")),
            5 => Some(crate::PortError::corrupt("store", "bad bytes")),
            _ => None,
        };
    }

    /// A new actor of the run that started at `started_ms`, with nothing in hand: after a
    /// crash, or after the user's actor stopped idle (its state saved).
    fn restart_actor(&mut self, started_ms: i64) {
        self.book = Book::new(settings(started_ms, self.coalesce, self.faults));
        self.durable = 0;
        self.sends = [None, None];
        self.timers.clear();
        self.letters.clear();
        self.marks.clear();
    }

    /// Everything answers and every timer fires until nothing is left to do.
    fn drain(&mut self) {
        for _ in 0..100_000 {
            if self.save.is_some() {
                self.finish_save(0);
            } else if let Some(at) = self.sends.iter().position(Option::is_some) {
                self.answer(if at == 0 { BA } else { PL }, 0);
            } else if !self.letters.is_empty() {
                self.letter(true);
            } else if !self.marks.is_empty() {
                self.mark(true);
            } else if !self.timers.is_empty() {
                let earliest = (0..self.timers.len())
                    .min_by_key(|&i| self.timers[i].0)
                    .unwrap_or(0);
                self.fire(earliest);
            } else {
                return;
            }
            self.turn();
        }
        panic!("the book never settled");
    }
}

const BA: Origin = Origin::BetterAuth;
const PL: Origin = Origin::Payload;

fn side(payload: bool) -> Origin {
    if payload {
        PL
    } else {
        BA
    }
}

fn check(ops: Vec<Op>, coalesce: bool) {
    let mut driver = Driver::new(coalesce, EngineFaults::default());
    for op in ops {
        driver.run(op);
    }
    driver.drain();
    assert!(driver.book.is_idle(), "idle after the drain");
    assert!(driver.backlog.is_empty(), "nothing left unread");
    for m in 0..driver.events.len() {
        assert!(
            driver.settled.contains(&m) || driver.rejected.contains(&m),
            "message {m} neither settled nor dead-lettered"
        );
    }
    if driver.rejected.is_empty() {
        owes_only_what_was_accepted(&driver);
    }
}

/// At rest, the store owes nothing a target has not accepted. A crash can lose the save that
/// cleared an accepted delivery after its message settled; the next load sends it again under
/// the same webhook-id (a duplicate, never a loss). A loaded, clean book owes nothing at all.
fn owes_only_what_was_accepted(driver: &Driver) {
    for entry in &driver.stored.outbox {
        assert!(
            driver
                .accepted
                .contains(&(entry.send.side, entry.event_id.clone())),
            "at rest, the store owes {} which no target accepted",
            entry.send.webhook_id
        );
    }
    if !driver.book.needs_load() && !driver.book.is_dirty() {
        assert!(driver.stored.outbox.is_empty(), "a clean book owes nothing");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn lines_send_one_at_a_time_and_only_what_is_durable(
        ops in prop::collection::vec(op(), 1..160),
        coalesce in any::<bool>(),
    ) {
        check(ops, coalesce);
    }
}

/// The broken variant that sends a line's next delivery while its head is in flight is caught
/// by the driver's check.
#[test]
#[should_panic(expected = "two sends in flight on one line")]
fn the_unordered_variant_is_caught() {
    let faults = EngineFaults {
        unordered_delivery: true,
        ..EngineFaults::default()
    };
    let mut driver = Driver::new(false, faults);
    for name in 0..3 {
        driver.event(false, 1, name);
        driver.run(Op::Save(0));
    }
}

/// A store that keeps refusing a user's state poisons it: its held and later messages become
/// dead letters, and nothing is settled.
#[test]
fn a_refused_state_poisons_the_user() {
    let mut driver = Driver::new(false, EngineFaults::default());
    driver.event(false, 0, 1);
    for _ in 0..STORE_REJECTIONS_MAX {
        driver.run(Op::Save(5));
        driver.run(Op::Fire(0));
    }
    driver.event(true, 1, 2);
    assert_eq!(driver.rejected, BTreeSet::from([0, 1]));
    assert!(driver.settled.is_empty());
    assert!(driver.book.is_idle());
}

/// A restored line sends its head at once, and what is behind it only after the dead run's
/// request could have landed.
#[test]
fn a_restored_line_holds_back_behind_its_head() {
    let mut driver = Driver::new(false, EngineFaults::default());
    for name in 0..2 {
        driver.event(false, 1, name);
    }
    driver.run(Op::Save(0));
    assert!(driver.sends[index(PL)].is_some());
    driver.run(Op::Crash(0));
    let restarted_ms = driver.now_ms;
    driver.event(false, 1, 3);
    let head = driver.sends[index(PL)]
        .take()
        .expect("the restored head goes at once");
    assert_eq!(head.webhook_id, "e0");
    driver.accept(PL);
    let actions = driver.book.on_delivered(
        PL,
        head.token,
        DeliveryOutcome::Accepted { at_ms: 0 },
        driver.now_ms,
        || 0.5,
    );
    driver.perform(actions);
    // The save in flight, then the one covering the acceptance.
    driver.run(Op::Save(0));
    driver.run(Op::Save(0));
    assert_held(&driver, restarted_ms, "the next waits for the hold");
    driver.run(Op::Fire(0));
    let next = driver.sends[index(PL)]
        .as_ref()
        .expect("sent once the hold is over");
    assert_eq!(next.webhook_id, "e1");
}

/// A restored head that is dead-lettered leaves the dead run's request of it possibly still on
/// its way: the user's next delivery waits for it even when the user's actor stopped and its
/// state was loaded again in between (the hold is kept with the state).
#[test]
fn a_hold_outlives_its_actor() {
    let mut driver = Driver::new(false, EngineFaults::default());
    driver.event(false, 1, 0);
    driver.run(Op::Save(0));
    assert!(
        driver.sends[index(PL)].is_some(),
        "e0 in flight when the run dies"
    );
    driver.run(Op::Crash(0));
    let restarted_ms = driver.now_ms;
    driver.run(Op::Mark(true));
    let head = driver.sends[index(PL)].as_ref().expect("the restored head");
    assert_eq!(head.webhook_id, "e0");
    driver.answer(PL, 6);
    driver.run(Op::Letter(true));
    for _ in 0..4 {
        driver.run(Op::Save(0));
        driver.run(Op::Mark(true));
    }
    assert!(driver.book.is_idle(), "e0 dead-lettered and settled");
    assert!(!driver.book.is_dirty());
    // The actor stops idle; a new event loads the user again within the hold.
    driver.restart_actor(restarted_ms);
    driver.event(false, 1, 1);
    driver.run(Op::Save(0));
    assert_held(
        &driver,
        restarted_ms,
        "e1 waits for the dead run's request of e0",
    );
}

/// Nothing goes to Payload before the hold of the run started at `restarted_ms` is over (the
/// target's timeout, 1 s, plus the margin).
fn assert_held(driver: &Driver, restarted_ms: i64, why: &str) {
    assert!(driver.sends[index(PL)].is_none(), "{why}");
    let (due, _) = driver.timers.first().expect("a timer for the hold");
    assert_eq!(*due, restarted_ms + 1_000 + RESTORED_MARGIN_MS, "{why}");
}

/// Two runs die in a row: the head restored by the third may be the second's request, but the
/// first's may still be on its way as well, so even that head waits.
#[test]
fn a_hold_of_an_earlier_run_holds_the_next_runs_restored_head_too() {
    let mut driver = Driver::new(false, EngineFaults::default());
    driver.event(false, 1, 0);
    driver.run(Op::Save(0));
    driver.run(Op::Crash(0));
    driver.run(Op::Mark(true));
    driver.answer(PL, 6);
    driver.run(Op::Letter(true));
    driver.event(false, 1, 1);
    for _ in 0..4 {
        driver.run(Op::Save(0));
        driver.run(Op::Mark(true));
    }
    assert!(
        driver.sends[index(PL)].is_none(),
        "e1 held in the second run"
    );
    driver.now_ms += 500;
    driver.run(Op::Crash(1));
    driver.run(Op::Mark(true));
    assert!(
        driver.sends[index(PL)].is_none(),
        "e1, restored in the third run, waits for the first run's request of e0"
    );
}

/// The save that clears an accepted delivery dies with the run after its message settled: the
/// store still owes it, so the user's next load sends it again under the same webhook-id (the
/// receiver's duplicate), ahead of the new event.
#[test]
fn a_delivery_whose_clearing_save_died_is_sent_again_under_its_id() {
    let mut driver = Driver::new(false, EngineFaults::default());
    driver.event(false, 0, 0);
    driver.run(Op::Save(0));
    driver.run(Op::Answer {
        payload: true,
        outcome: 0,
    });
    driver.run(Op::Mark(true));
    driver.run(Op::Crash(0));
    assert_eq!(driver.stored.outbox.len(), 1, "the clearing save died");
    driver.event(false, 1, 1);
    let again = driver.sends[index(PL)].as_ref().expect("the restored head");
    assert_eq!(again.webhook_id, "e0");
    driver.drain();
    assert!(driver.accepted.contains(&(PL, "e1".to_string())));
    owes_only_what_was_accepted(&driver);
    let state = driver.book.sync().expect("loaded");
    assert!(state.outbox.is_empty(), "nothing owed at rest");
}
