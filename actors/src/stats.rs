//! Counters of what the pipeline did, read by the metrics endpoint and by tests.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Monotonic counters (gauges are marked). Relaxed atomics: they are statistics, not
        /// synchronisation.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// Gauge: user actors alive.
            pub users_active: AtomicI64,
        }

        impl Stats {
            /// `(name, value)` of every counter, in declaration order.
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
    /// Payload events of users not linked to Better Auth.
    skipped_unlinked,
    /// Bad messages dead-lettered.
    dead_letters_bad_input,
    /// Deliveries dead-lettered.
    dead_letters_delivery,
    /// Deliveries accepted by Payload.
    delivered_payload,
    /// Deliveries accepted by Better Auth.
    delivered_better_auth,
    /// Delivery attempts that failed and were retried.
    retries,
    /// Messages acknowledged.
    acked,
}

impl Stats {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
