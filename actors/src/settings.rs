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
    /// uniform draw in `[0, 1)`. A receiver's `Retry-After` can lengthen the wait, never
    /// shorten it below the backoff (`Retry-After: 0` would spend every attempt at once), and
    /// never past `max` (a receiver cannot park a user's line for longer than the policy allows).
    pub fn delay(&self, attempt: u32, unit: f64, retry_after: Option<Duration>) -> Duration {
        let backoff = self.backoff(attempt, unit);
        match retry_after {
            Some(wait) => wait.max(backoff).min(self.max.max(backoff)),
            None => backoff,
        }
    }

    fn backoff(&self, attempt: u32, unit: f64) -> Duration {
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
    pub breaker: crate::breaker::BreakerSettings,
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
    /// (h) Fail the user's actor when the store fails, handing its messages back to the source
    /// (JetStream redelivers them in its own order): the engine before it kept them in order.
    pub fail_on_store_error: bool,
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
    /// The source gives a message up after this many deliveries (`nats.max_deliver`; `None`:
    /// never). Its last delivery is dead-lettered rather than left to be dropped.
    pub max_deliver: Option<u64>,
    /// Messages asked of the source at once.
    pub fetch_batch: usize,
    pub mappings: Mappings,
    pub policy: Policy,
    pub payload: Option<TargetSettings>,
    pub better_auth: Option<TargetSettings>,
    /// All off outside the simulator.
    pub faults: EngineFaults,
    /// When this run of the pipeline started (set by [`crate::Pipeline::start`]): a delivery a
    /// dead run may still have had in flight is not sent again before that run's request
    /// could have landed (see the user actor's restored lines).
    pub started_at_ms: i64,
}

impl PipelineSettings {
    /// The target of a side, when enabled.
    pub fn target(&self, side: Origin) -> Option<&TargetSettings> {
        match side {
            Origin::Payload => self.payload.as_ref(),
            Origin::BetterAuth => self.better_auth.as_ref(),
        }
    }

    /// The messages `sink` may hold unsettled: its share of `max_in_flight`, in proportion to
    /// its target's delivery slots, and at least one fetch batch. Each sink has a budget of its
    /// own, so a target that is down holds only its own sink's events, never the other's.
    pub fn sink_in_flight(&self, sink: crate::sink::Sink) -> usize {
        let slots = self.delivery_slots();
        let own = self.target(sink.side()).map_or(0, |t| t.max_concurrency);
        let share = self
            .max_in_flight
            .saturating_mul(own)
            .checked_div(slots)
            .unwrap_or(self.max_in_flight);
        share.max(self.fetch_batch.min(self.max_in_flight)).max(1)
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
    fn retry_after_lengthens_within_max_and_never_shortens_the_backoff() {
        let p = policy();
        assert_eq!(
            p.delay(1, 0.5, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            p.delay(1, 0.5, Some(Duration::from_secs(7200))),
            Duration::from_secs(600)
        );
        // Retry-After: 0, or shorter than the backoff: the backoff's delay.
        assert_eq!(
            p.delay(1, 0.5, Some(Duration::ZERO)),
            Duration::from_millis(500)
        );
        assert_eq!(
            p.delay(4, 0.5, Some(Duration::from_secs(1))),
            Duration::from_secs(4)
        );
    }

    proptest::proptest! {
        #[test]
        fn any_retry_after_stays_between_the_backoff_and_max(
            attempt in 1u32..40,
            unit in 0.0f64..1.0,
            wait_ms in 0u64..10_000_000,
        ) {
            let p = policy();
            let backoff = p.delay(attempt, unit, None);
            let delay = p.delay(attempt, unit, Some(Duration::from_millis(wait_ms)));
            proptest::prop_assert!(delay >= backoff);
            proptest::prop_assert!(delay <= p.max.max(backoff));
        }
    }
}
