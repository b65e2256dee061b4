//! What the pipeline's actors are told at spawn: plain data, built by the engine from
//! `config.toml` or by the simulator from its seed.

use std::time::Duration;

use protocol::signing::Keyring;
use protocol::user::Mappings;
use protocol::Origin;

use crate::sync::Policy;

/// Retry policy of one target (`[targets.*.retry]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// Spread of each delay, as a fraction: 0.2 gives ±20%.
    pub jitter: f64,
    /// Attempts before a delivery is dead-lettered.
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1`, after `attempt` failures (1-based). `unit` is a
    /// uniform draw in `[0, 1)`. A `Retry-After` from the receiver wins, bounded by `max`
    /// so that a receiver cannot park a user's line for longer than the policy allows.
    pub fn delay(&self, attempt: u32, unit: f64, retry_after: Option<Duration>) -> Duration {
        if let Some(wait) = retry_after {
            return wait.min(self.max);
        }
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max.as_secs_f64());
        let spread = 1.0 + self.jitter * (2.0 * unit - 1.0);
        Duration::from_secs_f64((capped * spread).max(0.0))
    }
}

/// One webhook target.
#[derive(Debug, Clone)]
pub struct TargetSettings {
    pub url: String,
    pub keyring: Keyring,
    pub timeout: Duration,
    pub max_concurrency: usize,
    pub coalesce: bool,
    pub retry: RetryPolicy,
}

/// Deliberately broken variants of the pipeline, for the simulator to prove it notices them.
/// No configuration key reaches them: production always runs with the default (all off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineFaults {
    /// (a) Mark an event processed when it arrives, before it is delivered.
    pub mark_before_delivery: bool,
    /// (b) Acknowledge a message as soon as it is read, before its effect is durable.
    pub ack_before_durable: bool,
    /// (c) Send every queued delivery at once instead of one at a time per user and side.
    pub unordered_delivery: bool,
}

/// The pipeline's settings.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub max_in_flight: usize,
    /// How long an idle user's state is kept in memory (its actor stops sooner: see
    /// [`crate::user::PARK_AFTER`]).
    pub user_idle_timeout: Duration,
    /// Bytes of idle users' states kept in memory, serialized, between their events; 0 keeps
    /// none (each user's next event reads its state from the store).
    pub idle_cache_bytes: usize,
    /// The source's ack deadline; held messages get a progress ack well within it.
    pub ack_wait: Duration,
    pub max_message_bytes: usize,
    /// Messages asked of the source at once.
    pub fetch_batch: usize,
    pub mappings: Mappings,
    pub policy: Policy,
    pub payload: Option<TargetSettings>,
    pub better_auth: Option<TargetSettings>,
    /// All off outside the simulator.
    pub faults: EngineFaults,
}

impl PipelineSettings {
    /// The target of a side, when enabled.
    pub fn target(&self, side: Origin) -> Option<&TargetSettings> {
        match side {
            Origin::Payload => self.payload.as_ref(),
            Origin::BetterAuth => self.better_auth.as_ref(),
        }
    }

    /// Deliveries that may be in flight at once: every enabled target's `max_concurrency`.
    pub fn delivery_slots(&self) -> usize {
        Origin::ALL
            .iter()
            .filter_map(|side| self.target(*side))
            .map(|target| target.max_concurrency)
            .sum()
    }

    /// How often held messages are kept alive at the source.
    pub fn progress_interval(&self) -> Duration {
        (self.ack_wait / 3).max(Duration::from_millis(100))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(600),
            multiplier: 2.0,
            jitter: 0.2,
            max_attempts: 12,
        }
    }

    #[test]
    fn exponential_with_cap_and_jitter() {
        let p = policy();
        assert_eq!(p.delay(1, 0.5, None), Duration::from_millis(500));
        assert_eq!(p.delay(2, 0.5, None), Duration::from_secs(1));
        assert_eq!(p.delay(4, 0.5, None), Duration::from_secs(4));
        assert_eq!(p.delay(40, 0.5, None), Duration::from_secs(600));
        assert_eq!(p.delay(1, 0.0, None), Duration::from_millis(400));
        assert!(p.delay(1, 0.999_999, None) <= Duration::from_millis(600));
    }

    #[test]
    fn retry_after_wins_within_max() {
        let p = policy();
        assert_eq!(
            p.delay(1, 0.5, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            p.delay(1, 0.5, Some(Duration::from_secs(7200))),
            Duration::from_secs(600)
        );
    }
}
