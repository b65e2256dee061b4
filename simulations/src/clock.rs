//! Virtual time: tokio's paused clock on a `current_thread` runtime, read as epoch milliseconds.

use std::sync::{Arc, Mutex};

use actors::ports::{Clock, Entropy};
use tokio::time::Instant;

use crate::rng::SimRng;

/// The simulated wall clock: a fixed epoch plus virtual time elapsed.
#[derive(Debug)]
pub struct SimClock {
    start: Instant,
    base_ms: i64,
}

impl SimClock {
    pub fn new(base_ms: i64) -> Arc<Self> {
        Arc::new(SimClock {
            start: Instant::now(),
            base_ms,
        })
    }

    /// Virtual milliseconds since the run began.
    pub fn virt_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        self.base_ms + self.virt_ms() as i64
    }
}

/// Retry jitter from the seed.
#[derive(Debug)]
pub struct SimEntropy(pub Mutex<SimRng>);

impl Entropy for SimEntropy {
    fn unit(&self) -> f64 {
        self.0.lock().map(|mut r| r.unit()).unwrap_or(0.5)
    }
}
