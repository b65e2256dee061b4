//! Workloads (which user each event is for) and their publication to NATS JetStream.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::context::PublishAckFuture;

use crate::receiver::Tracker;

/// The users of a run and, in publication order, the user of each event. User `n` is
/// `u<n>` publishing from Better Auth when `n` is even, `p<n>` publishing from Payload when
/// odd, so no user has writes on both sides (the engine then never sends a `:resync`).
#[derive(Debug, Clone)]
pub struct Workload {
    pub users: usize,
    pub order: Vec<u32>,
}

impl Workload {
    /// `users` × `per_user` events, interleaved: every user's first event, then every second…
    pub fn interleaved(users: usize, per_user: usize) -> Workload {
        let order = (0..per_user)
            .flat_map(|_| 0..users as u32)
            .collect::<Vec<_>>();
        Workload { users, order }
    }

    /// `events` events of which 90 % go to the first 1 % of `users` (at least one user).
    pub fn skewed(users: usize, events: usize) -> Workload {
        let hot = (users / 100).max(1);
        let cold = users.saturating_sub(hot).max(1);
        let (mut h, mut c) = (0usize, 0usize);
        let order = (0..events)
            .map(|k| {
                if k % 10 != 0 || users <= hot {
                    h += 1;
                    ((h - 1) % hot) as u32
                } else {
                    c += 1;
                    (hot + (c - 1) % cold) as u32
                }
            })
            .collect();
        Workload { users, order }
    }

    pub fn events(&self) -> usize {
        self.order.len()
    }

    /// How many of the events are Better Auth's (even users; see [`EventMaker::make`]).
    pub fn better_auth_events(&self) -> usize {
        self.order.iter().filter(|u| *u % 2 == 0).count()
    }
}

/// Turns event numbers into subjects and bodies, keeping per user a sequence number (carried
/// as the name `n<seq>`) and a strictly increasing `timestamp`.
pub struct EventMaker {
    run: String,
    next_seq: Vec<u32>,
    last_ts: Vec<i64>,
    padding: String,
}

impl EventMaker {
    /// `payload_bytes`: the approximate body size; the rest is a constant `bio` field.
    pub fn new(run: &str, users: usize, payload_bytes: usize) -> EventMaker {
        EventMaker {
            run: run.to_string(),
            next_seq: vec![0; users],
            last_ts: vec![i64::MIN; users],
            padding: "x".repeat(payload_bytes.saturating_sub(170)),
        }
    }

    /// Event number `k` for user `user`: (subject, event id, body).
    pub fn make(&mut self, k: usize, user: u32) -> (String, String, Vec<u8>) {
        let u = user as usize;
        let seq = self.next_seq[u];
        self.next_seq[u] += 1;
        let ts = now_ms().max(self.last_ts[u].saturating_add(1));
        self.last_ts[u] = ts;
        let id = format!("e{}_{k}", self.run);
        let verb = if seq == 0 { "created" } else { "updated" };
        let run = &self.run;
        let pad = &self.padding;
        let (subject, body) = if u % 2 == 0 {
            (
                format!("b{run}.user.{verb}.u{u}"),
                format!(
                    r#"{{"id":"{id}","origin":"better-auth","type":"user.{verb}","timestamp":{ts},"data":{{"id":"u{u}","email":"u{u}@bench.test","name":"n{seq}","bio":"{pad}"}}}}"#
                ),
            )
        } else {
            (
                format!("b{run}.payload.user.{verb}.p{u}"),
                format!(
                    r#"{{"id":"{id}","origin":"payload","type":"user.{verb}","timestamp":{ts},"data":{{"betterAuthUserId":"p{u}","email":"p{u}@bench.test","fullName":"n{seq}","bio":"{pad}"}}}}"#
                ),
            )
        };
        (subject, id, body.into_bytes())
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn publish_one(
    js: &async_nats::jetstream::Context,
    subject: String,
    id: &str,
    body: Vec<u8>,
) -> anyhow::Result<PublishAckFuture> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    js.publish_with_headers(subject, headers, body.into())
        .await
        .context("publish to JetStream")
}

/// Publishes the whole workload as fast as JetStream stores it (at most `window`
/// acknowledgements outstanding); returns the seconds it took.
pub async fn publish_all(
    js: &async_nats::jetstream::Context,
    workload: &Workload,
    maker: &mut EventMaker,
    tracker: &Tracker,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let window = 4096;
    let mut acks = VecDeque::with_capacity(window);
    for (k, &user) in workload.order.iter().enumerate() {
        let (subject, id, body) = maker.make(k, user);
        tracker.mark_sent(k);
        acks.push_back(publish_one(js, subject, &id, body).await?);
        if acks.len() >= window {
            if let Some(ack) = acks.pop_front() {
                ack.await.context("JetStream stored the message")?;
            }
        }
    }
    for ack in acks {
        ack.await.context("JetStream stored the message")?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Open-loop publication at `rate` events/s: event `k` is due at `k / rate` s after the start,
/// whatever the engine does. Returns the largest lag behind schedule, in ms.
pub async fn publish_at_rate(
    js: &async_nats::jetstream::Context,
    workload: &Workload,
    maker: &mut EventMaker,
    tracker: Arc<Tracker>,
    rate: f64,
) -> anyhow::Result<f64> {
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<PublishAckFuture>();
    let acker = tokio::spawn(async move {
        let mut failed = 0u64;
        while let Some(ack) = ack_rx.recv().await {
            if ack.await.is_err() {
                failed += 1;
            }
        }
        failed
    });
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let total = workload.events();
    let mut k = 0;
    let mut max_lag = 0f64;
    while k < total {
        ticker.tick().await;
        let elapsed = start.elapsed().as_secs_f64();
        let due = ((elapsed * rate) as usize + 1).min(total);
        if k < due {
            max_lag = max_lag.max((elapsed - k as f64 / rate) * 1000.0);
        }
        while k < due {
            let (subject, id, body) = maker.make(k, workload.order[k]);
            tracker.mark_sent(k);
            let ack = publish_one(js, subject, &id, body).await?;
            let _ = ack_tx.send(ack);
            k += 1;
        }
    }
    drop(ack_tx);
    let failed = acker.await.context("ack task")?;
    anyhow::ensure!(failed == 0, "{failed} publications were not stored");
    Ok(max_lag)
}
