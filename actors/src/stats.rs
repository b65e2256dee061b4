//! Counters of what the pipeline did, read by the metrics endpoint and by tests.
//!
//! Plain counters are atomics; the few labelled series ([`Labelled`]) and the latency
//! histograms ([`Histograms`]) sit behind a mutex held for one insertion. Label values come
//! from closed sets (sinks, status classes, §4 reasons), so the series stay few.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Monotonic counters (gauges are marked). Relaxed atomics: they are statistics, not
        /// synchronisation.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// Gauge: user actors alive.
            pub users_active: AtomicI64,
            /// Gauge: idle users whose state is kept in memory without an actor.
            pub users_parked: AtomicI64,
            /// Gauge: the bytes of those states.
            pub parked_bytes: AtomicI64,
            /// Gauges: whether each target's circuit breaker is open (1) or closed (0).
            pub payload_open: AtomicI64,
            pub better_auth_open: AtomicI64,
            /// Dead letters by `(reason, sink)`; `sink` is `none` for bad input.
            pub dead_letters: Labelled,
            /// Delivery attempts by `(sink, class)`: `2xx`, `4xx`, `5xx` (also other non-2xx
            /// answers) or `error` (no answer: timeout, connection).
            pub deliveries: Labelled,
            /// Retries scheduled, by `(sink)`.
            pub retries_by_sink: Labelled,
            /// Time from sending a delivery request to its answer, by sink.
            pub delivery_latency: Histograms,
        }

        impl Stats {
            /// `(name, value)` of every plain counter, in declaration order.
            pub fn counters(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Valid events received from Better Auth.
    received_better_auth,
    /// Valid events received from Payload.
    received_payload,
    /// Events skipped because the sink already accepted their id.
    duplicates,
    /// Events whose merge changed nothing and sent nothing.
    no_ops,
    /// Events that lost every field to a newer write.
    stale,
    /// Events recognised as echoes of the engine's own deliveries.
    echoes,
    /// Resync requests handled (each sends the canonical user to a side, if the user is known).
    resync_requests,
    /// Events applied after a later event of their side (stream order broken upstream of the
    /// user's actor): what they would have sent in order may be lost. Expected to stay 0.
    late,
    /// Payload events of users not linked to Better Auth.
    skipped_unlinked,
    /// Delivery attempts that failed and were retried.
    retries,
    /// Messages acknowledged.
    acked,
    /// Better Auth events written to the PostgreSQL users mirror.
    mirror_applied,
    /// Mirror events older than the row they would change (or replays of it): no change.
    mirror_stale,
    /// Mirror writes whose email another active row held with a newer event: written without
    /// the email (see the README's mirror rules).
    mirror_email_conflicts,
}

impl Stats {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A counter per combination of label values.
#[derive(Debug, Default)]
pub struct Labelled(Mutex<BTreeMap<Vec<String>, u64>>);

impl Labelled {
    pub fn add(&self, labels: &[&str]) {
        let Ok(mut series) = self.0.lock() else {
            return;
        };
        // Found without building a key: this runs for every delivery attempt.
        let same = |k: &Vec<String>| k.iter().map(String::as_str).eq(labels.iter().copied());
        if let Some((_, n)) = series.iter_mut().find(|(k, _)| same(k)) {
            *n += 1;
            return;
        }
        series.insert(labels.iter().map(|l| (*l).to_string()).collect(), 1);
    }

    /// Every series with its value, ordered by label values.
    pub fn snapshot(&self) -> Vec<(Vec<String>, u64)> {
        self.0
            .lock()
            .map(|series| series.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    /// The value of one series (0 when it never counted).
    pub fn get(&self, labels: &[&str]) -> u64 {
        self.0
            .lock()
            .ok()
            .and_then(|series| {
                series
                    .iter()
                    .find(|(k, _)| k.iter().map(String::as_str).eq(labels.iter().copied()))
                    .map(|(_, v)| *v)
            })
            .unwrap_or(0)
    }
}

/// Upper bounds of the latency buckets, in milliseconds (Prometheus' usual spread).
pub const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000];

/// One histogram: cumulative-ready bucket counts, their sum and count.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Histogram {
    /// Per bucket of [`LATENCY_BUCKETS_MS`], observations at most its bound (not cumulative).
    pub buckets: [u64; LATENCY_BUCKETS_MS.len()],
    pub sum_ms: u64,
    pub count: u64,
}

/// Latency histograms by one label (the sink).
#[derive(Debug, Default)]
pub struct Histograms(Mutex<BTreeMap<String, Histogram>>);

impl Histograms {
    pub fn observe(&self, label: &str, ms: u64) {
        let Ok(mut all) = self.0.lock() else {
            return;
        };
        if !all.contains_key(label) {
            all.insert(label.to_string(), Histogram::default());
        }
        let Some(histogram) = all.get_mut(label) else {
            return;
        };
        if let Some(index) = LATENCY_BUCKETS_MS.iter().position(|bound| ms <= *bound) {
            histogram.buckets[index] += 1;
        }
        histogram.sum_ms += ms;
        histogram.count += 1;
    }

    pub fn snapshot(&self) -> Vec<(String, Histogram)> {
        self.0
            .lock()
            .map(|all| all.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_series_count_apart() {
        let series = Labelled::default();
        series.add(&["payload", "2xx"]);
        series.add(&["payload", "2xx"]);
        series.add(&["payload", "5xx"]);
        assert_eq!(series.get(&["payload", "2xx"]), 2);
        assert_eq!(series.get(&["payload", "5xx"]), 1);
        assert_eq!(series.get(&["better-auth", "2xx"]), 0);
        assert_eq!(series.snapshot().len(), 2);
    }

    #[test]
    fn histogram_puts_each_observation_in_its_first_bucket() {
        let h = Histograms::default();
        for ms in [0, 1, 3, 10_000, 20_000] {
            h.observe("payload", ms);
        }
        let (_, histogram) = &h.snapshot()[0];
        assert_eq!(histogram.count, 5);
        assert_eq!(histogram.sum_ms, 30_004);
        assert_eq!(histogram.buckets[0], 2, "0 and 1 ms are in the 1 ms bucket");
        assert_eq!(histogram.buckets[2], 1, "3 ms is in the 5 ms bucket");
        assert_eq!(histogram.buckets[11], 1, "10 s is in the last bucket");
        assert_eq!(
            histogram.buckets.iter().sum::<u64>(),
            4,
            "20 s is only in +Inf"
        );
    }
}
