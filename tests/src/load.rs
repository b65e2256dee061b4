//! A load of many users' events, and what a receiver must have got from it: every event as its
//! own delivery, each user's in order, repeats only of what was in flight.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use protocol::{EventType, Origin};
use serde_json::json;

use crate::env::{now_ms, TestEnv};
use crate::receiver::{Received, Receiver};

/// `users` Better Auth users, `events` updates each (each one changes the user), published
/// round-robin so that every user's events are spread over the whole stream.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub users: usize,
    pub events: usize,
}

impl Load {
    /// The load, scaled by `SYNC_ENGINE_TEST_SCALE` (a factor, default 1) for longer runs by hand.
    pub fn scaled(users: usize, events: usize) -> Load {
        let scale = std::env::var("SYNC_ENGINE_TEST_SCALE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1)
            .max(1);
        Load {
            users: users * scale,
            events,
        }
    }

    pub fn total(&self) -> usize {
        self.users * self.events
    }

    /// Publishes the whole load and waits until JetStream stored it.
    pub async fn publish(&self, env: &TestEnv) {
        let t0 = now_ms();
        let mut messages = Vec::with_capacity(self.total());
        for k in 0..self.events {
            for u in 0..self.users {
                let id = format!("k-{u}-{k}");
                let body = json!({"id": id, "origin": "better-auth", "type": "user.updated",
                    "timestamp": t0 + k as i64,
                    "data": {"id": format!("u{u}"), "email": format!("u{u}@x"), "name": format!("n{k}"), "seq": k}});
                messages.push((
                    env.subject(Origin::BetterAuth, EventType::Updated, &format!("u{u}")),
                    id,
                    serde_json::to_vec(&body).expect("json"),
                ));
            }
        }
        env.publish_many(messages).await;
    }

    /// Waits until every event of the load was accepted under its own id.
    pub async fn wait_all(&self, receiver: &Receiver, timeout: Duration) -> Vec<Received> {
        let total = self.total();
        receiver
            .wait_accepted(timeout, |r| distinct(r) >= total)
            .await
    }
}

/// Distinct webhook ids among `accepted`.
pub fn distinct(accepted: &[Received]) -> usize {
    accepted
        .iter()
        .map(|d| d.webhook_id())
        .collect::<BTreeSet<_>>()
        .len()
}

/// What a receiver got from a [`Load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Distinct webhook ids.
    pub delivered: usize,
    /// Deliveries of an id already delivered.
    pub repeats: usize,
    /// Deliveries whose `seq` is lower than one delivered before to the same user.
    pub order_violations: usize,
}

impl Verdict {
    /// Of deliveries to Payload (users by `betterAuthUserId`).
    pub fn of(accepted: &[Received]) -> Verdict {
        Verdict::by(accepted, "betterAuthUserId")
    }

    /// Of deliveries whose user id is the field `user`.
    pub fn by(accepted: &[Received], user: &str) -> Verdict {
        let delivered = distinct(accepted);
        let mut per_user: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for d in accepted {
            per_user
                .entry(d.data(user).as_str().unwrap_or("").to_string())
                .or_default()
                .push(d.data("seq").as_i64().unwrap_or(-1));
        }
        let mut order_violations = 0;
        for seqs in per_user.values() {
            let mut highest = -1;
            for &seq in seqs {
                if seq < highest {
                    order_violations += 1;
                }
                highest = highest.max(seq);
            }
        }
        Verdict {
            delivered,
            repeats: accepted.len() - delivered,
            order_violations,
        }
    }
}

/// Deliveries per second between `from` (with `already` accepted then) and the last one.
pub fn rate_after(accepted: &[Received], from: Instant, already: usize) -> f64 {
    let last = accepted.iter().map(|r| r.at).max().unwrap_or(from);
    let secs = last.saturating_duration_since(from).as_secs_f64();
    let after = accepted.len().saturating_sub(already) as f64;
    if secs > 0.0 {
        after / secs
    } else {
        0.0
    }
}

/// How long after `from` each share (¼, ½, 9⁄10, 99⁄100, all) of the deliveries that came after
/// it had arrived: the shape of a recovery, where an average would hide a long tail.
pub fn arrival_shape(accepted: &[Received], from: Instant, already: usize) -> String {
    let mut after: Vec<Duration> = accepted[already.min(accepted.len())..]
        .iter()
        .map(|r| r.at.saturating_duration_since(from))
        .collect();
    after.sort();
    let at = |share: f64| {
        let index = ((after.len() as f64 * share).ceil() as usize).saturating_sub(1);
        after.get(index).copied().unwrap_or_default()
    };
    format!(
        "{} after it: 25% by {:.1?}, 50% by {:.1?}, 90% by {:.1?}, 99% by {:.1?}, all by {:.1?}",
        after.len(),
        at(0.25),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    )
}
