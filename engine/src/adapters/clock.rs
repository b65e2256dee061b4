//! The system clock and the operating system's randomness.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use actors::ports::{Clock, Entropy};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// Milliseconds since the Unix epoch by the system clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Jitter only: a fast generator seeded once from the OS is plenty.
#[derive(Debug)]
pub struct OsEntropy(Mutex<SmallRng>);

impl Default for OsEntropy {
    fn default() -> Self {
        OsEntropy(Mutex::new(SmallRng::from_entropy()))
    }
}

impl Entropy for OsEntropy {
    fn unit(&self) -> f64 {
        match self.0.lock() {
            Ok(mut rng) => rng.gen::<f64>(),
            Err(_) => 0.5,
        }
    }
}
