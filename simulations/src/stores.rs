//! In-memory dedup and state stores with injected errors. The state store keeps only what was
//! committed, and outlives engine crashes; the dedup store outlives them too (as Redis would)
//! unless the seed makes it volatile (the memory backend).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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

#[derive(Debug)]
pub struct MemStore {
    users: Mutex<BTreeMap<UserKey, SyncState>>,
    pub dead_letters: Mutex<Vec<DeadLetter>>,
    flaky: Flaky,
    clock: Arc<SimClock>,
    trace: Arc<Trace>,
}

impl MemStore {
    pub fn new(flaky: Flaky, clock: Arc<SimClock>, trace: Arc<Trace>) -> Self {
        MemStore {
            users: Mutex::new(BTreeMap::new()),
            dead_letters: Mutex::new(Vec::new()),
            flaky,
            clock,
            trace,
        }
    }

    pub fn heal(&self) {
        self.flaky.heal();
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

impl StateStore for MemStore {
    fn load_user<'a>(
        &'a self,
        key: &'a UserKey,
    ) -> BoxFuture<'a, Result<Option<SyncState>, PortError>> {
        let result = if self.flaky.fails() {
            Err(PortError::unavailable("store", "injected error"))
        } else {
            // A copy, not the live state: only what was committed survives a crash. (That the
            // state survives its serialization is the real stores' tests' concern.)
            Ok(self.users.lock().ok().and_then(|m| m.get(key).cloned()))
        };
        Box::pin(async move { result })
    }

    fn save_user(
        &self,
        key: &UserKey,
        state: &SyncState,
    ) -> BoxFuture<'static, Result<(), PortError>> {
        let result = if self.flaky.fails() {
            Err(PortError::unavailable("store", "injected error"))
        } else {
            if let Ok(mut m) = self.users.lock() {
                m.insert(key.clone(), state.clone());
            }
            Ok(())
        };
        Box::pin(async move { result })
    }

    fn dead_letter(&self, letter: DeadLetter) -> BoxFuture<'_, Result<(), PortError>> {
        let result = if self.flaky.fails() {
            Err(PortError::unavailable("store", "injected error"))
        } else {
            self.trace.record(
                self.clock.virt_ms(),
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
