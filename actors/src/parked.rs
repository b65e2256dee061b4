//! Idle users' states, kept serialized by the router between a user's events.
//!
//! A user actor costs tens of KiB (its task, its mailboxes, its state's maps); kept alive for
//! `user_idle_timeout` after each event, a million users would cost gigabytes. So an idle actor
//! stops soon and hands over its state as the JSON it would store, a few KiB, parked here for
//! `user_idle_timeout` within a byte budget. The user's next event starts a new actor from it
//! without a store read. A parked state is one the store has, committed or queued for its
//! writer (which serves queued saves to readers): dropping it loses nothing but that read.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use protocol::UserKey;
use tokio::time::Instant;

use crate::stats::Stats;

/// A user's state, serialized.
pub type ParkedState = Arc<[u8]>;

struct Entry {
    state: ParkedState,
    /// Its place in the park order.
    order: u64,
    parked_at: Instant,
}

pub struct Parked {
    budget: usize,
    ttl: Duration,
    bytes: usize,
    next_order: u64,
    states: HashMap<UserKey, Entry>,
    /// Oldest first: what expires or is pushed out first.
    by_age: BTreeMap<u64, UserKey>,
    stats: Arc<Stats>,
}

impl Parked {
    pub fn new(budget: usize, ttl: Duration, stats: Arc<Stats>) -> Self {
        Parked {
            budget,
            ttl,
            bytes: 0,
            next_order: 0,
            states: HashMap::new(),
            by_age: BTreeMap::new(),
            stats,
        }
    }

    /// Parks `state` for `key`, pushing out the oldest states past the budget. A state larger
    /// than the whole budget is not kept.
    pub fn park(&mut self, key: UserKey, state: ParkedState, now: Instant) {
        self.take(&key);
        let size = state.len();
        if size > self.budget {
            return;
        }
        while self.bytes + size > self.budget {
            if !self.drop_oldest() {
                break;
            }
        }
        let order = self.next_order;
        self.next_order += 1;
        self.bytes += size;
        self.by_age.insert(order, key.clone());
        self.states.insert(
            key,
            Entry {
                state,
                order,
                parked_at: now,
            },
        );
        self.publish();
    }

    /// Takes the user's parked state, if any.
    pub fn take(&mut self, key: &UserKey) -> Option<ParkedState> {
        let entry = self.states.remove(key)?;
        self.by_age.remove(&entry.order);
        self.bytes -= entry.state.len();
        self.publish();
        Some(entry.state)
    }

    /// Drops the states parked for longer than `user_idle_timeout`.
    pub fn expire(&mut self, now: Instant) {
        let mut dropped = false;
        while let Some(key) = self.by_age.first_key_value().map(|(_, key)| key) {
            let expired = self
                .states
                .get(key)
                .is_none_or(|entry| now.duration_since(entry.parked_at) >= self.ttl);
            if !expired {
                break;
            }
            dropped |= self.drop_oldest();
        }
        if dropped {
            self.publish();
        }
    }

    /// When the oldest parked state expires, if any is parked.
    pub fn next_expiry(&self) -> Option<Instant> {
        let (_, key) = self.by_age.first_key_value()?;
        self.states.get(key).map(|entry| entry.parked_at + self.ttl)
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn drop_oldest(&mut self) -> bool {
        let Some((_, key)) = self.by_age.pop_first() else {
            return false;
        };
        if let Some(entry) = self.states.remove(&key) {
            self.bytes -= entry.state.len();
        }
        true
    }

    fn publish(&self) {
        self.stats
            .users_parked
            .store(self.states.len() as i64, Ordering::Relaxed);
        self.stats
            .parked_bytes
            .store(self.bytes as i64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(n: usize) -> ParkedState {
        vec![b'x'; n].into()
    }

    fn key(k: &str) -> UserKey {
        UserKey::new(k)
    }

    #[test]
    fn takes_what_was_parked_once() {
        let stats = Arc::new(Stats::default());
        let mut parked = Parked::new(1000, Duration::from_secs(60), stats.clone());
        let now = Instant::now();
        parked.park(key("a"), state(10), now);
        assert_eq!(stats.users_parked.load(Ordering::Relaxed), 1);
        assert_eq!(stats.parked_bytes.load(Ordering::Relaxed), 10);
        assert_eq!(parked.take(&key("a")).map(|s| s.len()), Some(10));
        assert!(parked.take(&key("a")).is_none());
        assert_eq!(parked.bytes(), 0);
        assert_eq!(stats.users_parked.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_budget_pushes_out_the_oldest() {
        let mut parked = Parked::new(100, Duration::from_secs(60), Arc::default());
        let now = Instant::now();
        parked.park(key("a"), state(40), now);
        parked.park(key("b"), state(40), now);
        parked.park(key("c"), state(40), now);
        assert!(parked.take(&key("a")).is_none(), "the oldest went");
        assert_eq!(parked.len(), 2);
        assert_eq!(parked.bytes(), 80);
        parked.park(key("d"), state(101), now);
        assert!(parked.take(&key("d")).is_none(), "larger than the budget");
        assert_eq!(parked.len(), 2, "and it pushed nothing out");
    }

    #[test]
    fn parking_again_replaces_the_older_state() {
        let mut parked = Parked::new(100, Duration::from_secs(60), Arc::default());
        let now = Instant::now();
        parked.park(key("a"), state(40), now);
        parked.park(key("a"), state(30), now);
        assert_eq!(parked.len(), 1);
        assert_eq!(parked.bytes(), 30);
        assert_eq!(parked.take(&key("a")).map(|s| s.len()), Some(30));
    }

    #[test]
    fn states_expire_after_the_idle_timeout() {
        let mut parked = Parked::new(1000, Duration::from_secs(5), Arc::default());
        let start = Instant::now();
        parked.park(key("a"), state(10), start);
        parked.park(key("b"), state(10), start + Duration::from_secs(3));
        assert_eq!(parked.next_expiry(), Some(start + Duration::from_secs(5)));
        parked.expire(start + Duration::from_secs(4));
        assert_eq!(parked.len(), 2);
        parked.expire(start + Duration::from_secs(5));
        assert!(parked.take(&key("a")).is_none());
        assert_eq!(parked.len(), 1);
        assert_eq!(parked.next_expiry(), Some(start + Duration::from_secs(8)));
        parked.expire(start + Duration::from_secs(8));
        assert!(parked.is_empty());
        assert_eq!(parked.next_expiry(), None);
        assert_eq!(parked.bytes(), 0);
    }
}
