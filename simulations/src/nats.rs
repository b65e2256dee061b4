//! A fake NATS JetStream: one stream per origin (as the engine lays them out), each read whole by
//! its sink's durable consumer, at-least-once delivery with redelivery after the ack deadline,
//! duplicate deliveries, reordered redeliveries and lost acks. The messages are kept in one list
//! in publish order; each carries its own origin stream's sequence, which is what the ack subject
//! (and so `Incoming.sequence`) gives, as the real server does.
//!
//! Acks carry the epoch of the engine run that received the message: after a simulated crash,
//! acks and naks of the dead run are ignored, as they would be for a killed process.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actors::ports::{AckReply, Acker, BoxFuture, EventSource, Incoming};
use actors::{PortError, Sink};
use bytes::Bytes;
use tokio::sync::Notify;

use crate::clock::SimClock;
use crate::rng::keyed_unit;
use crate::trace::Trace;

/// Fault rates of the fake server.
#[derive(Debug, Clone, Copy, Default)]
pub struct NatsFaults {
    /// A message is delivered twice in a row.
    pub duplicate: f64,
    /// An ack is lost on the way (the message comes back after its deadline).
    pub ack_loss: f64,
    /// Redeliveries are served out of sequence order.
    pub reorder_redeliveries: bool,
}

#[derive(Debug)]
struct Stored {
    subject: String,
    payload: Bytes,
    /// Its sequence in its origin's stream.
    stream_seq: u64,
}

#[derive(Debug, Default)]
struct Consumer {
    /// Index of the next never-delivered message to look at.
    cursor: usize,
    /// Delivered, not acked: sequence -> (deadline in virtual ms, deliveries so far).
    pending: BTreeMap<u64, (u64, u64)>,
    acked: BTreeSet<u64>,
}

#[derive(Debug)]
struct State {
    messages: Vec<Stored>,
    /// Per sink, how many stored messages it consumes: what `unsettled` counts against, so the
    /// quiescence check does not walk the whole stream each time.
    n_consumed: BTreeMap<Sink, usize>,
    consumers: BTreeMap<Sink, Consumer>,
    epoch: u64,
    faults: NatsFaults,
}

#[derive(Debug)]
pub struct FakeNats {
    state: Mutex<State>,
    published: Notify,
    clock: Arc<SimClock>,
    trace: Arc<Trace>,
    seed: u64,
    ack_wait_ms: u64,
}

/// The stream `sink` reads: its source's.
fn stream_of(sink: Sink) -> &'static str {
    match sink {
        Sink::Payload => "SIM_BETTER_AUTH",
        Sink::BetterAuth => "SIM_PAYLOAD",
    }
}

fn consumes(sink: Sink, subject: &str) -> bool {
    match sink {
        Sink::Payload => subject.starts_with("user."),
        Sink::BetterAuth => subject.starts_with("payload.user."),
    }
}

impl FakeNats {
    pub fn new(
        clock: Arc<SimClock>,
        trace: Arc<Trace>,
        seed: u64,
        ack_wait: Duration,
        faults: NatsFaults,
    ) -> Arc<Self> {
        let consumers = Sink::ALL
            .iter()
            .map(|s| (*s, Consumer::default()))
            .collect();
        Arc::new(FakeNats {
            state: Mutex::new(State {
                messages: Vec::new(),
                n_consumed: BTreeMap::new(),
                consumers,
                epoch: 0,
                faults,
            }),
            published: Notify::new(),
            clock,
            trace,
            seed,
            ack_wait_ms: ack_wait.as_millis() as u64,
        })
    }

    pub fn publish(&self, subject: &str, payload: Bytes) -> u64 {
        let seq = {
            let Ok(mut state) = self.state.lock() else {
                return 0;
            };
            let mut stream_seq = 0;
            for sink in Sink::ALL {
                if consumes(sink, subject) {
                    let n = state.n_consumed.entry(sink).or_default();
                    *n += 1;
                    stream_seq = *n as u64;
                }
            }
            state.messages.push(Stored {
                subject: subject.to_string(),
                payload,
                stream_seq,
            });
            state.messages.len() as u64
        };
        self.trace.record(
            self.clock.virt_ms(),
            "nats",
            "publish",
            format_args!("seq={seq} {subject}"),
        );
        self.published.notify_waiters();
        seq
    }

    /// Publishes again a message already in the stream (a publisher's retry under a new
    /// `Nats-Msg-Id`): a duplicate the engine must not deliver twice.
    pub fn republish(&self, pick: u64) {
        let copy = {
            let Ok(state) = self.state.lock() else {
                return;
            };
            if state.messages.is_empty() {
                return;
            }
            let m = &state.messages[(pick % state.messages.len() as u64) as usize];
            (m.subject.clone(), m.payload.clone())
        };
        self.publish(&copy.0, copy.1);
    }

    /// Messages in the stream.
    pub fn len(&self) -> u64 {
        self.state
            .lock()
            .map(|s| s.messages.len() as u64)
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A crash: acks and naks of the current run no longer count.
    /// A new engine run. As the engine does at startup when an earlier run left messages
    /// unacknowledged, each consumer starts again at its ack floor: everything after it comes
    /// again, at once and in stream order (acknowledged ones too).
    pub fn new_epoch(&self) -> u64 {
        match self.state.lock() {
            Ok(mut state) => {
                state.epoch += 1;
                for consumer in state.consumers.values_mut() {
                    if let Some(first) = consumer.pending.keys().next().copied() {
                        consumer.cursor = consumer.cursor.min(first as usize - 1);
                        consumer.pending.clear();
                    }
                }
                state.epoch
            }
            // A poisoned lock means a panic inside the fake itself: the run's verdict shows it.
            Err(_) => u64::MAX,
        }
    }

    pub fn heal(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.faults = NatsFaults::default();
        }
    }

    /// Messages not yet acknowledged by their consumer (pending or never delivered).
    pub fn unsettled(&self) -> usize {
        let Ok(state) = self.state.lock() else {
            return usize::MAX;
        };
        // A consumer is only ever handed, and so only acks, the messages its sink consumes.
        state
            .consumers
            .iter()
            .map(|(sink, consumer)| {
                let n = state.n_consumed.get(sink).copied().unwrap_or(0);
                n.saturating_sub(consumer.acked.len())
            })
            .sum()
    }

    pub fn source(self: &Arc<Self>, sink: Sink, epoch: u64) -> Arc<FakeSource> {
        Arc::new(FakeSource {
            nats: self.clone(),
            sink,
            epoch,
        })
    }

    /// What is ready for `sink` now, marked delivered; or the time to look again.
    fn take(
        self: &Arc<Self>,
        sink: Sink,
        epoch: u64,
        max: usize,
    ) -> Result<Vec<Incoming>, Option<u64>> {
        let now = self.clock.virt_ms();
        let mut state = self.state.lock().map_err(|_| None)?;
        if state.epoch != epoch {
            return Err(None);
        }
        let faults = state.faults;
        let seed = self.seed;
        let State {
            messages,
            consumers,
            ..
        } = &mut *state;
        let Some(consumer) = consumers.get_mut(&sink) else {
            return Err(None);
        };
        // Redeliveries first, as JetStream does.
        let mut ready: Vec<u64> = consumer
            .pending
            .iter()
            .filter(|(_, (deadline, _))| *deadline <= now)
            .map(|(seq, _)| *seq)
            .collect();
        if faults.reorder_redeliveries && ready.len() > 1 {
            ready.sort_by_key(|seq| (keyed_unit(seed, &[*seq, now, 7]) * 1e9) as u64);
        }
        while ready.len() < max && consumer.cursor < messages.len() {
            let seq = consumer.cursor as u64 + 1;
            consumer.cursor += 1;
            if consumes(sink, &messages[seq as usize - 1].subject) {
                ready.push(seq);
            }
        }
        ready.truncate(max);
        if ready.is_empty() {
            let next = consumer.pending.values().map(|(d, _)| *d).min();
            return Err(next);
        }
        let mut out = Vec::with_capacity(ready.len());
        for seq in ready {
            let entry = consumer.pending.entry(seq).or_insert((0, 0));
            entry.0 = now + self.ack_wait_ms;
            entry.1 += 1;
            let delivered = entry.1;
            let stored = &messages[seq as usize - 1];
            let copies = if keyed_unit(seed, &[seq, delivered, 11]) < faults.duplicate {
                2
            } else {
                1
            };
            for _ in 0..copies {
                out.push(Incoming::from_jetstream(
                    stored.subject.clone(),
                    stored.payload.clone(),
                    &AckReply::subject(
                        stream_of(sink),
                        sink.as_str(),
                        delivered,
                        stored.stream_seq,
                    ),
                    Arc::new(FakeAcker {
                        nats: self.clone(),
                        sink,
                        seq,
                        epoch,
                    }),
                ));
            }
            self.trace.record(
                now,
                "nats",
                "deliver",
                format_args!("{sink} seq={seq} n={delivered} copies={copies}"),
            );
        }
        Ok(out)
    }

    fn settle(&self, sink: Sink, seq: u64, epoch: u64, action: Settle) {
        let now = self.clock.virt_ms();
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if state.epoch != epoch {
            return;
        }
        let lose = keyed_unit(self.seed, &[seq, now, sink as u64, 13]) < state.faults.ack_loss;
        let ack_wait = self.ack_wait_ms;
        let Some(consumer) = state.consumers.get_mut(&sink) else {
            return;
        };
        match action {
            Settle::Ack if lose => {}
            Settle::Ack => {
                if consumer.pending.remove(&seq).is_some() || !consumer.acked.contains(&seq) {
                    consumer.acked.insert(seq);
                }
            }
            Settle::Nak(delay) => {
                if let Some(entry) = consumer.pending.get_mut(&seq) {
                    entry.0 = now + delay;
                }
            }
            Settle::Progress => {
                if let Some(entry) = consumer.pending.get_mut(&seq) {
                    entry.0 = now + ack_wait;
                }
            }
        }
        drop(state);
        if matches!(action, Settle::Nak(_)) {
            self.published.notify_waiters();
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack,
    Nak(u64),
    Progress,
}

/// Settles one delivered message.
struct FakeAcker {
    nats: Arc<FakeNats>,
    sink: Sink,
    seq: u64,
    epoch: u64,
}

impl Acker for FakeAcker {
    fn ack(&self) -> BoxFuture<'_, Result<(), PortError>> {
        self.nats
            .settle(self.sink, self.seq, self.epoch, Settle::Ack);
        Box::pin(async { Ok(()) })
    }

    fn nak(&self, delay: Duration) -> BoxFuture<'_, Result<(), PortError>> {
        self.nats.settle(
            self.sink,
            self.seq,
            self.epoch,
            Settle::Nak(delay.as_millis() as u64),
        );
        Box::pin(async { Ok(()) })
    }

    fn progress(&self) -> BoxFuture<'_, Result<(), PortError>> {
        self.nats
            .settle(self.sink, self.seq, self.epoch, Settle::Progress);
        Box::pin(async { Ok(()) })
    }
}

/// One sink's consumer, as the engine run of `epoch` sees it.
pub struct FakeSource {
    nats: Arc<FakeNats>,
    sink: Sink,
    epoch: u64,
}

impl EventSource for FakeSource {
    fn next_batch(
        &self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Incoming>, PortError>> {
        Box::pin(async move {
            let until = self.nats.clock.virt_ms() + wait.as_millis() as u64;
            loop {
                let notified = self.nats.published.notified();
                match self.nats.take(self.sink, self.epoch, max) {
                    Ok(batch) => return Ok(batch),
                    Err(next_deadline) => {
                        let now = self.nats.clock.virt_ms();
                        if now >= until {
                            return Ok(Vec::new());
                        }
                        let wake = next_deadline.unwrap_or(until).min(until).max(now + 1);
                        tokio::select! {
                            biased;
                            _ = notified => {}
                            _ = tokio::time::sleep(Duration::from_millis(wake - now)) => {}
                        }
                    }
                }
            }
        })
    }
}
