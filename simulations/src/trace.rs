//! The canonical trace of a run: virtual time, sequence, logical component, event kind and ids.
//! Never an `ActorId`, wall time, or the `Debug` of a hash map. Its 64-bit hash is the run's
//! fingerprint: one seed must always give the same hash.

use std::fmt::{self, Write};
use std::sync::Mutex;

use crate::rng::{fnv, mix, Fnv};

#[derive(Debug, Default)]
pub struct Trace {
    inner: Mutex<TraceInner>,
    keep: bool,
}

#[derive(Debug, Default)]
struct TraceInner {
    hash: u64,
    n: u64,
    entries: Vec<String>,
}

impl Trace {
    /// `keep`: hold every entry in memory (for `--trace-out` and determinism diffs).
    pub fn new(keep: bool) -> Self {
        Trace {
            inner: Mutex::new(TraceInner::default()),
            keep,
        }
    }

    /// `detail` is hashed as it is written (no string is built unless entries are kept):
    /// there are several records per simulated message.
    pub fn record(&self, now_ms: u64, component: &str, kind: &str, detail: impl fmt::Display) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let n = inner.n;
        inner.n += 1;
        let mut detail_hash = Fnv::new();
        // Writing into the hash cannot fail.
        let _ = write!(detail_hash, "{detail}");
        let h = fnv(component.as_bytes())
            ^ fnv(kind.as_bytes()).rotate_left(17)
            ^ detail_hash.finish().rotate_left(31);
        inner.hash = mix(inner.hash ^ h ^ now_ms.rotate_left(7) ^ n);
        if self.keep {
            inner.entries.push(format!(
                "{now_ms:>9} {n:>7} {component:<22} {kind:<18} {detail}"
            ));
        }
    }

    pub fn hash(&self) -> u64 {
        self.inner.lock().map(|i| i.hash).unwrap_or(0)
    }

    pub fn len(&self) -> u64 {
        self.inner.lock().map(|i| i.n).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn entries(&self) -> Vec<String> {
        self.inner
            .lock()
            .map(|i| i.entries.clone())
            .unwrap_or_default()
    }
}
