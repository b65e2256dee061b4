//! In-memory dedup and state stores with injected errors. The state store keeps only what was
//! committed, and outlives engine crashes; the dedup store outlives them too (as Redis would)
//! unless the seed makes it volatile (the memory backend).
//!
//! The state store commits as the engine's does: saves queue at once (a load sees the latest
//! queued one) and one committer writes every save waiting at a tick in one transaction, which
//! fails as a whole. During an outage window every call fails; a batch in flight when it
//! starts may be committed all the same while its savers are told it failed (the connection
//! broke after COMMIT was sent), which a real connection pool does too.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use actors::ports::{BoxFuture, DeadLetter, DedupStore, StateStore};
use actors::sync::SyncState;
use actors::{PortError, Sink};
use protocol::UserKey;

use crate::clock::SimClock;
use crate::rng::SimRng;
use crate::trace::Trace;

/// Shared switch and random stream for injected store errors.
#[derive(Debug)]
pub struct Flaky {
    pub rate: Mutex<f64>,
    pub rng: Mutex<SimRng>,
}

impl Flaky {
    pub fn new(rate: f64, rng: SimRng) -> Self {
        Flaky {
            rate: Mutex::new(rate),
            rng: Mutex::new(rng),
        }
    }

    fn fails(&self) -> bool {
        let rate = self.rate.lock().map(|r| *r).unwrap_or(0.0);
        rate > 0.0 && self.rng.lock().map(|mut r| r.chance(rate)).unwrap_or(false)
    }

    pub fn heal(&self) {
        if let Ok(mut rate) = self.rate.lock() {
            *rate = 0.0;
        }
    }
}

#[derive(Debug)]
pub struct MemDedup {
    ids: Mutex<BTreeMap<(Sink, String), ()>>,
    flaky: Flaky,
}

impl MemDedup {
    pub fn new(flaky: Flaky) -> Self {
        MemDedup {
            ids: Mutex::new(BTreeMap::new()),
            flaky,
        }
    }

    /// The memory backend forgets everything when the engine dies.
    pub fn forget_all(&self) {
        if let Ok(mut ids) = self.ids.lock() {
            ids.clear();
        }
    }

    pub fn heal(&self) {
        self.flaky.heal();
    }
}

impl DedupStore for MemDedup {
    fn seen<'a>(
        &'a self,
        sink: Sink,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<bool>, PortError>> {
        let result = if self.flaky.fails() {
            Err(PortError::unavailable("dedup", "injected error"))
        } else {
            let map = self
                .ids
                .lock()
                .map_err(|_| PortError::unavailable("dedup", "poisoned"));
            map.map(|m| {
                ids.iter()
                    .map(|id| m.contains_key(&(sink, id.clone())))
                    .collect()
            })
        };
        Box::pin(async move { result })
    }

    fn mark<'a>(&'a self, sink: Sink, ids: &'a [String]) -> BoxFuture<'a, Result<(), PortError>> {
        let result = if self.flaky.fails() {
            Err(PortError::unavailable("dedup", "injected error"))
        } else {
            if let Ok(mut m) = self.ids.lock() {
                for id in ids {
                    m.insert((sink, id.clone()), ());
                }
            }
            Ok(())
        };
        Box::pin(async move { result })
    }
}

/// Windows of virtual time in which the store answers nothing but errors.
#[derive(Debug, Clone, Default)]
pub struct Outages(pub Vec<(u64, u64)>);

impl Outages {
    /// Up to two outages of 0.5–8 s within the first `span_ms` of the run.
    pub fn draw(rng: &mut SimRng, span_ms: u64) -> Outages {
        let n = rng.below(3);
        Outages(
            (0..n)
                .map(|_| {
                    let start = rng.below(span_ms.max(1));
                    (start, start + rng.range(500, 8_000))
                })
                .collect(),
        )
    }

    pub fn covers(&self, at_ms: u64) -> bool {
        self.0
            .iter()
            .any(|(start, end)| (*start..*end).contains(&at_ms))
    }
}

/// How long a commit takes: saves arriving meanwhile wait for the next one.
const COMMIT_TICK: Duration = Duration::from_millis(2);

/// The chance that a batch failing at an outage's edge was committed anyway.
const UNKNOWN_OUTCOME: f64 = 0.3;

/// A save waiting for the committer.
struct QueuedSave {
    key: UserKey,
    state: SyncState,
    seq: u64,
    epoch: u64,
    done: oneshot::Sender<Result<(), PortError>>,
}

#[derive(Debug)]
struct Shared {
    users: Mutex<BTreeMap<UserKey, SyncState>>,
    /// Saves queued and not yet committed (or failed): the latest per user, with its place.
    pending: Mutex<BTreeMap<UserKey, (u64, SyncState)>>,
    flaky: Flaky,
    outages: Outages,
    clock: Arc<SimClock>,
    trace: Arc<Trace>,
    /// The engine run whose saves are queued; a crash drops the dead run's queue.
    epoch: AtomicU64,
    /// Users whose stored state is planted bad (see [`Planted`]).
    planted: Mutex<BTreeMap<UserKey, Planted>>,
}

/// A user's state the store cannot serve, planted by the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planted {
    /// Its stored bytes do not decode: every load fails for good.
    Corrupt,
    /// The database refuses its rows (a value no column or index takes): every save of it
    /// fails for good, while the rest of its batch commits.
    Refused,
}

impl Shared {
    fn fails(&self) -> bool {
        self.outages.covers(self.clock.virt_ms()) || self.flaky.fails()
    }

    fn planted(&self, key: &UserKey) -> Option<Planted> {
        self.planted.lock().ok()?.get(key).copied()
    }
}

#[derive(Debug)]
pub struct MemStore {
    shared: Arc<Shared>,
    pub dead_letters: Mutex<Vec<DeadLetter>>,
    queue: mpsc::UnboundedSender<QueuedSave>,
    next_seq: AtomicU64,
}

impl std::fmt::Debug for QueuedSave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuedSave")
            .field("key", &self.key)
            .finish()
    }
}

impl MemStore {
    /// Starts the committer on the current runtime.
    pub fn new(
        flaky: Flaky,
        outages: Outages,
        commit_rng: SimRng,
        clock: Arc<SimClock>,
        trace: Arc<Trace>,
    ) -> Self {
        let shared = Arc::new(Shared {
            users: Mutex::new(BTreeMap::new()),
            pending: Mutex::new(BTreeMap::new()),
            flaky,
            outages,
            clock,
            trace,
            epoch: AtomicU64::new(0),
            planted: Mutex::new(BTreeMap::new()),
        });
        let (queue, saves) = mpsc::unbounded_channel();
        tokio::spawn(commit(shared.clone(), saves, commit_rng));
        MemStore {
            shared,
            dead_letters: Mutex::new(Vec::new()),
            queue,
            next_seq: AtomicU64::new(0),
        }
    }

    /// Makes `key`'s stored state bad from now on.
    pub fn plant(&self, key: UserKey, planted: Planted) {
        if let Ok(mut map) = self.shared.planted.lock() {
            map.insert(key, planted);
        }
    }

    pub fn heal(&self) {
        self.shared.flaky.heal();
    }

    /// The engine died: what it had queued and not committed dies with it.
    pub fn crash(&self) {
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.clear();
        }
    }

    pub fn take_dead_letters(&self, filter: impl Fn(&DeadLetter) -> bool) -> Vec<DeadLetter> {
        let Ok(mut letters) = self.dead_letters.lock() else {
            return Vec::new();
        };
        let (taken, kept): (Vec<_>, Vec<_>) = letters.drain(..).partition(|l| filter(l));
        *letters = kept;
        taken
    }
}

/// The committer: every save waiting at a tick, one transaction; it fails as a whole.
async fn commit(
    shared: Arc<Shared>,
    mut saves: mpsc::UnboundedReceiver<QueuedSave>,
    mut rng: SimRng,
) {
    let mut batch = Vec::new();
    while saves.recv_many(&mut batch, usize::MAX).await > 0 {
        tokio::time::sleep(COMMIT_TICK).await;
        let epoch = shared.epoch.load(Ordering::SeqCst);
        batch.retain(|save| save.epoch == epoch);
        let failed = shared.fails();
        let applied = !failed || rng.chance(UNKNOWN_OUTCOME);
        shared.trace.record(
            shared.clock.virt_ms(),
            "store",
            "commit",
            format_args!("saves={} failed={failed} applied={applied}", batch.len()),
        );
        for save in batch.drain(..) {
            if let Ok(mut pending) = shared.pending.lock() {
                if pending
                    .get(&save.key)
                    .is_some_and(|(seq, _)| *seq == save.seq)
                {
                    pending.remove(&save.key);
                }
            }
            // The engine's writer retries a refused batch user by user: only the refused
            // user's save fails.
            let refused = shared.planted(&save.key) == Some(Planted::Refused);
            if applied && !refused {
                if let Ok(mut users) = shared.users.lock() {
                    users.insert(save.key, save.state);
                }
            }
            let result = if failed {
                Err(PortError::unavailable("store", "injected error"))
            } else if refused {
                Err(PortError::rejected(
                    "store",
                    "planted: a value no column takes",
                ))
            } else {
                Ok(())
            };
            let _ = save.done.send(result);
        }
    }
}

impl StateStore for MemStore {
    fn load_user<'a>(
        &'a self,
        key: &'a UserKey,
    ) -> BoxFuture<'a, Result<Option<SyncState>, PortError>> {
        Box::pin(async move {
            // A queued save of this user is waited for, as the engine's store does: what a
            // load returns is durable, never a state whose commit may still fail.
            while self
                .shared
                .pending
                .lock()
                .map(|p| p.contains_key(key))
                .unwrap_or(false)
            {
                tokio::time::sleep(COMMIT_TICK).await;
            }
            if self.shared.fails() {
                return Err(PortError::unavailable("store", "injected error"));
            }
            if self.shared.planted(key) == Some(Planted::Corrupt) {
                return Err(PortError::corrupt("store", "planted: undecodable bytes"));
            }
            // A copy, not the live state: only what was committed survives a crash. (That the
            // state survives its serialization is the real stores' tests' concern.)
            Ok(self
                .shared
                .users
                .lock()
                .ok()
                .and_then(|m| m.get(key).cloned()))
        })
    }

    fn save_user(
        &self,
        key: &UserKey,
        state: &SyncState,
    ) -> BoxFuture<'static, Result<(), PortError>> {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.insert(key.clone(), (seq, state.clone()));
        }
        let (done, committed) = oneshot::channel();
        let queued = self
            .queue
            .send(QueuedSave {
                key: key.clone(),
                state: state.clone(),
                seq,
                epoch: self.shared.epoch.load(Ordering::SeqCst),
                done,
            })
            .is_ok();
        Box::pin(async move {
            if !queued {
                return Err(PortError::unavailable("store", "the committer stopped"));
            }
            committed.await.unwrap_or_else(|_| {
                Err(PortError::unavailable(
                    "store",
                    "the engine died before the commit",
                ))
            })
        })
    }

    fn dead_letter(&self, letter: DeadLetter) -> BoxFuture<'_, Result<(), PortError>> {
        let result = if self.shared.fails() {
            Err(PortError::unavailable("store", "injected error"))
        } else {
            self.shared.trace.record(
                self.shared.clock.virt_ms(),
                "store",
                "dead_letter",
                format_args!("{} {} {:?}", letter.reason, letter.subject, letter.event_id),
            );
            if let Ok(mut letters) = self.dead_letters.lock() {
                letters.push(letter);
            }
            Ok(())
        };
        Box::pin(async move { result })
    }
}
