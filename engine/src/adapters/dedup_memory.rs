//! The in-memory dedup store: one engine's memory of processed ids.
//!
//! Each id expires on its own, `ttl` after it was marked; beyond `capacity` ids the oldest are
//! forgotten first. Both bounds keep memory flat however long the engine runs. Since every id
//! lives for the same `ttl`, insertion order is expiry order, so one FIFO serves both.
//!
//! Ids are kept as 128-bit fingerprints (SHA-256 of sink and id, truncated), not as strings:
//! a million ids cost about 60 MB instead of 300. Two ids sharing a fingerprint is a 2^-128
//! chance per pair, far below the odds of the hardware corrupting the string itself.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actors::ports::{BoxFuture, Clock, DedupStore};
use actors::{PortError, Sink};
use dashmap::DashMap;
use sha2::{Digest, Sha256};

/// A processed id, for one sink.
type Fingerprint = [u64; 2];

/// Ids the tables are sized for at start at most (about 80 MB of address space).
const PRESIZE_MAX: usize = 1 << 20;

pub struct MemoryDedup {
    ids: DashMap<Fingerprint, i64>,
    order: Mutex<VecDeque<(Fingerprint, i64)>>,
    ttl_ms: i64,
    capacity: usize,
    clock: Arc<dyn Clock>,
}

impl MemoryDedup {
    pub fn new(ttl: Duration, capacity: usize, clock: Arc<dyn Clock>) -> Self {
        // Sized for the bound up front (pages are touched only as ids arrive): growing a table
        // of a million ids doubles it at once, old and new side by side, and that moment was
        // the engine's peak memory in `bench many-users`.
        let presized = capacity.clamp(1, PRESIZE_MAX);
        MemoryDedup {
            ids: DashMap::with_capacity(presized),
            order: Mutex::new(VecDeque::with_capacity(presized)),
            ttl_ms: ttl.as_millis().min(i64::MAX as u128) as i64,
            capacity: capacity.max(1),
            clock,
        }
    }

    fn key(sink: Sink, id: &str) -> Fingerprint {
        let digest = Sha256::new()
            .chain_update(sink.as_str())
            .chain_update([0])
            .chain_update(id)
            .finalize();
        let word = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&digest[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        [word(0), word(8)]
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn evict(&self, now_ms: i64, order: &mut VecDeque<(Fingerprint, i64)>) {
        while let Some((key, expires)) = order.front() {
            if *expires > now_ms && order.len() <= self.capacity {
                break;
            }
            // Only remove the map entry if it is this one (a re-mark keeps its newer expiry).
            self.ids.remove_if(key, |_, at| at == expires);
            order.pop_front();
        }
    }
}

impl DedupStore for MemoryDedup {
    fn seen<'a>(
        &'a self,
        sink: Sink,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<bool>, PortError>> {
        Box::pin(async move {
            let now = self.clock.now_ms();
            Ok(ids
                .iter()
                .map(|id| {
                    self.ids
                        .get(&Self::key(sink, id))
                        .is_some_and(|expires| *expires > now)
                })
                .collect())
        })
    }

    fn mark<'a>(&'a self, sink: Sink, ids: &'a [String]) -> BoxFuture<'a, Result<(), PortError>> {
        Box::pin(async move {
            let now = self.clock.now_ms();
            let expires = now.saturating_add(self.ttl_ms);
            let mut order = self
                .order
                .lock()
                .map_err(|_| PortError::unavailable("memory dedup", "lock poisoned"))?;
            for id in ids {
                let key = Self::key(sink, id);
                self.ids.insert(key, expires);
                order.push_back((key, expires));
            }
            self.evict(now, &mut order);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    struct FakeClock(AtomicI64);
    impl Clock for FakeClock {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn ids_expire_each_on_its_own_and_per_sink() {
        let clock = Arc::new(FakeClock(AtomicI64::new(0)));
        let dedup = MemoryDedup::new(Duration::from_millis(100), 10, clock.clone());
        dedup.mark(Sink::Payload, &ids(&["a"])).await.expect("mark");
        clock.0.store(50, Ordering::Relaxed);
        dedup.mark(Sink::Payload, &ids(&["b"])).await.expect("mark");
        let seen = dedup
            .seen(Sink::Payload, &ids(&["a", "b", "c"]))
            .await
            .expect("seen");
        assert_eq!(seen, vec![true, true, false]);
        assert_eq!(
            dedup
                .seen(Sink::BetterAuth, &ids(&["a"]))
                .await
                .expect("seen"),
            vec![false]
        );
        clock.0.store(120, Ordering::Relaxed);
        let seen = dedup
            .seen(Sink::Payload, &ids(&["a", "b"]))
            .await
            .expect("seen");
        assert_eq!(seen, vec![false, true]);
    }

    #[tokio::test]
    async fn capacity_is_a_hard_bound() {
        let clock = Arc::new(FakeClock(AtomicI64::new(0)));
        let dedup = MemoryDedup::new(Duration::from_secs(3600), 3, clock);
        for i in 0..10 {
            dedup
                .mark(Sink::Payload, &[format!("e{i}")])
                .await
                .expect("mark");
        }
        assert_eq!(dedup.len(), 3);
        let seen = dedup
            .seen(Sink::Payload, &ids(&["e0", "e9"]))
            .await
            .expect("seen");
        assert_eq!(seen, vec![false, true]);
    }
}
