//! The circuit breaker of one target: a pure state machine the delivery actor asks before each
//! attempt and tells each answer.
//!
//! After `failures` answers in a row that say the target is down (no answer, a timeout, a
//! 5xx), it opens: no attempt goes out, so no retry budget is spent and nothing is
//! dead-lettered because of the outage; the user lines wait, their messages kept alive at the
//! source. One probe goes out every `probe_interval` (a probe that fails costs its line no
//! attempt); the first answer that shows the target alive closes it, and the lines resume in
//! order.
//!
//! Invariants (asserted, and property-tested below): while open, at most one probe is in
//! flight; an answer from a live target always leaves it closed.

use std::time::Duration;

/// `[targets.*.breaker]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Answers in a row saying the target is down before it opens; 0 never opens.
    pub failures: u32,
    /// While open, how often one request goes out to see whether the target is back.
    pub probe_interval: Duration,
}

/// What an attempt may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Send,
    /// The one request that tests an open target.
    Probe,
    /// The target is open: ask again after this long.
    Wait(Duration),
}

/// What an answer says of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// It answered (2xx, 3xx, 4xx: whatever it thought of the request, it is there).
    Alive,
    /// No connection, no answer in time, or a 5xx.
    Down,
}

/// A change worth a log line and the `sync_engine_target_open` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Opened,
    Closed,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    settings: BreakerSettings,
    /// Answers in a row that said the target is down.
    down_in_a_row: u32,
    /// While open: when the next probe may go.
    next_probe_ms: Option<i64>,
    probing: bool,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Breaker {
        Breaker {
            settings,
            down_in_a_row: 0,
            next_probe_ms: None,
            probing: false,
        }
    }

    pub fn is_open(&self) -> bool {
        self.next_probe_ms.is_some()
    }

    fn interval_ms(&self) -> i64 {
        i64::try_from(self.settings.probe_interval.as_millis()).unwrap_or(i64::MAX)
    }

    /// Whether an attempt may go out at `now_ms`.
    pub fn admit(&mut self, now_ms: i64) -> Admit {
        let Some(next) = self.next_probe_ms else {
            return Admit::Send;
        };
        if !self.probing && now_ms >= next {
            self.probing = true;
            return Admit::Probe;
        }
        let wait_ms = if self.probing {
            self.interval_ms()
        } else {
            next - now_ms
        };
        Admit::Wait(Duration::from_millis(wait_ms.max(1) as u64))
    }

    /// The answer to an attempt (`probe`: the one [`Admit::Probe`] let through).
    pub fn record(&mut self, health: Health, probe: bool, now_ms: i64) -> Option<Change> {
        if probe {
            assert!(
                self.probing || !self.is_open(),
                "a probe answered that was never sent"
            );
            self.probing = false;
        }
        let change = match health {
            Health::Alive => {
                self.down_in_a_row = 0;
                self.next_probe_ms.take().map(|_| Change::Closed)
            }
            Health::Down => {
                self.down_in_a_row = self.down_in_a_row.saturating_add(1);
                let opens = self.settings.failures > 0
                    && self.down_in_a_row >= self.settings.failures
                    && !self.is_open();
                if opens || (probe && self.is_open()) {
                    self.next_probe_ms = Some(now_ms.saturating_add(self.interval_ms()));
                }
                opens.then_some(Change::Opened)
            }
        };
        if matches!(health, Health::Alive) {
            assert!(!self.is_open(), "a live target leaves the breaker closed");
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings {
            failures: 3,
            probe_interval: Duration::from_secs(5),
        })
    }

    #[test]
    fn opens_after_failures_in_a_row_probes_once_per_interval_and_closes_on_life() {
        let mut b = breaker();
        assert_eq!(b.record(Health::Down, false, 0), None);
        assert_eq!(
            b.record(Health::Alive, false, 1),
            None,
            "a live answer resets"
        );
        assert_eq!(b.record(Health::Down, false, 2), None);
        assert_eq!(b.record(Health::Down, false, 3), None);
        assert_eq!(b.record(Health::Down, false, 4), Some(Change::Opened));
        assert_eq!(b.admit(5), Admit::Wait(Duration::from_millis(4_999)));
        assert_eq!(b.admit(5_004), Admit::Probe);
        assert_eq!(
            b.admit(5_005),
            Admit::Wait(Duration::from_secs(5)),
            "one probe at a time"
        );
        assert_eq!(b.record(Health::Down, true, 6_000), None);
        assert_eq!(b.admit(6_001), Admit::Wait(Duration::from_millis(4_999)));
        assert_eq!(b.admit(11_000), Admit::Probe);
        assert_eq!(b.record(Health::Alive, true, 11_100), Some(Change::Closed));
        assert_eq!(b.admit(11_101), Admit::Send);
    }

    #[test]
    fn zero_failures_never_opens() {
        let mut b = Breaker::new(BreakerSettings {
            failures: 0,
            probe_interval: Duration::from_secs(1),
        });
        for t in 0..100 {
            assert_eq!(b.record(Health::Down, false, t), None);
            assert_eq!(b.admit(t), Admit::Send);
        }
    }

    proptest! {
        /// Whatever the answers: at most one probe while open, nothing but probes while open,
        /// and a live answer always closes it.
        #[test]
        fn at_most_one_probe_and_life_closes(steps in proptest::collection::vec((0u8..3, 0i64..4_000), 1..200)) {
            let mut b = breaker();
            let mut now = 0i64;
            let mut in_flight: Vec<bool> = Vec::new();
            for (action, dt) in steps {
                now += dt;
                match action {
                    0 => match b.admit(now) {
                        Admit::Send => in_flight.push(false),
                        Admit::Probe => {
                            prop_assert!(!in_flight.iter().any(|p| *p), "a second probe");
                            in_flight.push(true);
                        }
                        Admit::Wait(wait) => prop_assert!(b.is_open() && !wait.is_zero()),
                    },
                    answer => {
                        if let Some(probe) = in_flight.pop() {
                            let health = if answer == 1 { Health::Alive } else { Health::Down };
                            b.record(health, probe, now);
                            if health == Health::Alive {
                                prop_assert!(!b.is_open());
                            }
                        }
                    }
                }
            }
        }
    }
}
