//! The ports: the only ways the actors reach the world.
//!
//! Production implements them with async-nats, redis, sqlx and reqwest (`engine/src/adapters`);
//! the simulator implements them with seeded in-memory fakes. Nothing in this crate reads a
//! clock, a random source or a socket except through these traits.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::{Origin, UserKey};
use tokio::sync::OwnedSemaphorePermit;

use crate::error::PortError;
use crate::sink::Sink;
use crate::sync::SyncState;

/// A boxed future, so that the port traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Wall-clock time for the timestamps the protocol carries. Timers use tokio time, which the
/// simulator pauses and advances.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// Randomness for retry jitter.
pub trait Entropy: Send + Sync + 'static {
    /// A uniform value in `[0, 1)`.
    fn unit(&self) -> f64;
}

/// How a message is settled with its source.
pub trait Acker: Send + Sync + 'static {
    /// The effect is durable: never deliver this message again.
    fn ack(&self) -> BoxFuture<'_, Result<(), PortError>>;
    /// Not processed: deliver it again after `delay`.
    fn nak(&self, delay: Duration) -> BoxFuture<'_, Result<(), PortError>>;
    /// Still working on it: do not redeliver yet.
    fn progress(&self) -> BoxFuture<'_, Result<(), PortError>>;
}

/// What a JetStream acknowledgement subject says of its message:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>`, or
/// the newer form with a domain and an account hash before the stream (and maybe a token
/// after), which nats-server 2.9 sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckReply {
    pub delivered: u64,
    pub stream_sequence: u64,
}

impl AckReply {
    pub fn parse(reply: &str) -> Option<AckReply> {
        let tokens: Vec<&str> = reply.split('.').collect();
        if tokens.len() < 2 || tokens[0] != "$JS" || tokens[1] != "ACK" {
            return None;
        }
        let at = match tokens.len() {
            9 => 4,
            // `$JS.ACK.<domain or _>.<account hash>.<stream>...`, with or without a last token.
            n if n >= 11 => 6,
            _ => return None,
        };
        Some(AckReply {
            delivered: tokens[at].parse().ok()?,
            stream_sequence: tokens[at + 1].parse().ok()?,
        })
    }

    /// The reply subject in the form nats-server 2.9 sends (no domain, an account hash, no
    /// last token), for a source that makes its own messages: the simulator's take the same
    /// path through [`AckReply::parse`] as production's.
    pub fn subject(stream: &str, consumer: &str, delivered: u64, stream_sequence: u64) -> String {
        format!(
            "$JS.ACK._.SIMHASH.{stream}.{consumer}.{delivered}.{stream_sequence}.{stream_sequence}.0.0"
        )
    }
}

/// One message from the event source, owned by whichever actor holds it until it is settled.
///
/// If it is dropped unsettled (an actor crashed, or shutdown gave up on it) it is nak'ed at
/// once, so the source redelivers it without waiting for the ack deadline. Its in-flight permit
/// is released with it, whatever happens.
pub struct Incoming {
    pub subject: String,
    pub payload: Bytes,
    /// How many times the source has delivered this message (1 on the first delivery).
    pub delivered: u64,
    /// The message's place in its stream (0 when the source has no order): ties between two
    /// writes of one origin in the same millisecond go to the later one.
    pub sequence: u64,
    acker: Option<Arc<dyn Acker>>,
    settled: Arc<AtomicBool>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("subject", &self.subject)
            .field("bytes", &self.payload.len())
            .field("delivered", &self.delivered)
            .finish()
    }
}

impl Incoming {
    /// A message as JetStream hands it over: its subject, its payload, and the reply subject
    /// its acknowledgement goes to, which carries how often it was delivered and its place in
    /// the stream. The engine and the simulator both make every message here, so the
    /// simulator's messages carry what production's do, read the same way.
    pub fn from_jetstream(
        subject: String,
        payload: Bytes,
        reply: &str,
        acker: Arc<dyn Acker>,
    ) -> Self {
        let meta = AckReply::parse(reply).unwrap_or_else(|| {
            tracing::warn!(message = "A message's reply subject is not JetStream's; counted as its first delivery, with no stream order.", %subject, %reply);
            AckReply {
                delivered: 1,
                stream_sequence: 0,
            }
        });
        Incoming {
            subject,
            payload,
            delivered: meta.delivered.max(1),
            sequence: meta.stream_sequence,
            acker: Some(acker),
            settled: Arc::new(AtomicBool::new(false)),
            _permit: None,
        }
    }

    /// Ties one unit of `engine.max_in_flight` to this message's lifetime.
    pub fn with_permit(mut self, permit: OwnedSemaphorePermit) -> Self {
        self._permit = Some(permit);
        self
    }

    /// Acknowledges and consumes the message. An ack that fails is logged: the effect is
    /// durable already, and a redelivery will be recognised as a duplicate.
    pub async fn ack(mut self) {
        self.settled.store(true, Ordering::Relaxed);
        if let Some(acker) = self.acker.take() {
            if let Err(error) = acker.ack().await {
                tracing::warn!(message = "Ack failed; the message may be redelivered.", %error);
            }
        }
    }

    /// Acknowledges now but keeps the message in hand: only the broken variant
    /// `ack_before_durable` of the simulator does this.
    pub async fn ack_early(&self) {
        self.settled.store(true, Ordering::Relaxed);
        if let Some(acker) = &self.acker {
            let _ = acker.ack().await;
        }
    }

    /// Asks for redelivery after `delay` and consumes the message.
    pub async fn nak(mut self, delay: Duration) {
        self.settled.store(true, Ordering::Relaxed);
        if let Some(acker) = self.acker.take() {
            if let Err(error) = acker.nak(delay).await {
                tracing::warn!(message = "Nak failed; the message comes back after ack_wait.", %error);
            }
        }
    }

    /// Extends the ack deadline.
    pub async fn progress(&self) {
        if let Some(acker) = &self.acker {
            if let Err(error) = acker.progress().await {
                tracing::debug!(message = "Progress ack failed.", %error);
            }
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.settled.load(Ordering::Relaxed) {
            return;
        }
        if let Some(acker) = self.acker.take() {
            // Dropped unsettled: hand it back now rather than after the ack deadline.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = acker.nak(Duration::ZERO).await;
                });
            }
        }
    }
}

/// Where messages come from: one durable consumer per sink.
pub trait EventSource: Send + Sync + 'static {
    /// Up to `max` messages; waits until at least one is available or `wait` has passed.
    fn next_batch(
        &self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Incoming>, PortError>>;
}

/// Remembers which event ids a sink has accepted.
pub trait DedupStore: Send + Sync + 'static {
    /// For each id, whether `sink` already accepted it. One round trip for the whole batch.
    fn seen<'a>(
        &'a self,
        sink: Sink,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<bool>, PortError>>;
    /// Records that `sink` accepted these ids.
    fn mark<'a>(&'a self, sink: Sink, ids: &'a [String]) -> BoxFuture<'a, Result<(), PortError>>;
}

/// A message that could not be processed or delivered, kept for people to inspect and replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub subject: String,
    /// The message as it arrived, byte for byte.
    pub raw: Bytes,
    /// A §4 reason, or `delivery_failed` / `delivery_rejected` for deliveries.
    pub reason: String,
    pub event_id: Option<String>,
    /// The sink whose delivery failed, if it was a delivery.
    pub sink: Option<String>,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub received_at_ms: i64,
}

/// Durable engine state: per-user sync state and dead letters.
pub trait StateStore: Send + Sync + 'static {
    fn load_user<'a>(
        &'a self,
        key: &'a UserKey,
    ) -> BoxFuture<'a, Result<Option<SyncState>, PortError>>;
    /// Saves `key`'s state. The save takes its place in line when this is called: saves of
    /// one user are committed in the order they were called, so a caller may start the next
    /// before the last one finished. The future resolves once the state is durable; dropping
    /// it does not withdraw the save. A load waits for every save of its key called before it:
    /// it returns what is durable, the latest of them or, if its commit failed, what was before.
    fn save_user(
        &self,
        key: &UserKey,
        state: &SyncState,
    ) -> BoxFuture<'static, Result<(), PortError>>;
    /// [`save_user`](Self::save_user), for a caller that holds the state in its stored form
    /// ([`crate::state_codec`]) already: a store that keeps that form takes it instead of
    /// encoding the state again.
    fn save_user_encoded(
        &self,
        key: &UserKey,
        state: &SyncState,
        _stored: &Arc<[u8]>,
    ) -> BoxFuture<'static, Result<(), PortError>> {
        self.save_user(key, state)
    }
    fn dead_letter(&self, letter: DeadLetter) -> BoxFuture<'_, Result<(), PortError>>;
}

/// The PostgreSQL users mirror's table.
///
/// `apply` MUST be idempotent and ordered by `(at_ms, event_id)`: a change not newer than
/// the one that last wrote the row (or the user's deletion) changes nothing and answers
/// [`MirrorOutcome::Stale`](crate::mirror_change::MirrorOutcome::Stale).
pub trait MirrorStore: Send + Sync + 'static {
    fn apply<'a>(
        &'a self,
        change: &'a crate::mirror_change::MirrorChange,
    ) -> BoxFuture<'a, Result<crate::mirror_change::MirrorOutcome, PortError>>;
}

/// One HTTP request of a delivery.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// The side whose target this goes to: each target has its own client (TLS, pool).
    pub side: Origin,
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
    pub timeout: Duration,
}

/// What the receiver answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// `Retry-After`, when the receiver sent one (seconds or an HTTP date).
    pub retry_after: Option<Duration>,
    /// `Location`, when the receiver sent one (a redirect, which is never followed).
    pub location: Option<String>,
    /// The first KiB of the body, for dead letters.
    pub body_prefix: String,
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("timed out")]
    Timeout,
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Other(String),
}

/// Sends delivery requests.
pub trait HttpTransport: Send + Sync + 'static {
    fn post(&self, request: HttpRequest) -> BoxFuture<'_, Result<HttpResponse, TransportError>>;
}

/// Fault injection into the actors themselves. Production uses [`NoChaos`]; the simulator
/// makes handlers panic to prove that supervision loses nothing.
pub trait Chaos: Send + Sync + 'static {
    /// Whether the handler at `site` should panic now.
    fn panic_at(&self, site: &'static str) -> bool;
}

/// No injected faults.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoChaos;

impl Chaos for NoChaos {
    fn panic_at(&self, _site: &'static str) -> bool {
        false
    }
}

/// Panics when the chaos port says so: an injected fault, never a real one.
pub fn maybe_panic(chaos: &dyn Chaos, site: &'static str) {
    if chaos.panic_at(site) {
        panic!("injected fault in the {site} actor");
    }
}

/// Everything an engine instance reaches the world through.
#[derive(Clone)]
pub struct Ports {
    pub clock: Arc<dyn Clock>,
    pub entropy: Arc<dyn Entropy>,
    pub dedup: Arc<dyn DedupStore>,
    pub store: Arc<dyn StateStore>,
    pub http: Arc<dyn HttpTransport>,
    pub chaos: Arc<dyn Chaos>,
}

impl fmt::Debug for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ports")
    }
}

#[cfg(test)]
mod ack_reply_tests {
    use super::AckReply;

    #[test]
    fn both_forms_of_the_ack_subject() {
        assert_eq!(
            AckReply::parse("$JS.ACK.USER_SYNC.user-sync-payload.3.1042.17.1761560000000000000.5"),
            Some(AckReply {
                delivered: 3,
                stream_sequence: 1042
            })
        );
        assert_eq!(
            AckReply::parse("$JS.ACK.hub.ACCHASH.USER_SYNC.c.2.77.9.1761560000000000000.0.xyz"),
            Some(AckReply {
                delivered: 2,
                stream_sequence: 77
            })
        );
        assert_eq!(
            AckReply::parse("$JS.ACK._.ACCHASH.USER_SYNC.c.5.78.9.1761560000000000000.0"),
            Some(AckReply {
                delivered: 5,
                stream_sequence: 78
            })
        );
        assert_eq!(AckReply::parse("_INBOX.abc"), None);
        assert_eq!(AckReply::parse("$JS.ACK.S.C.x.1.1.0.0"), None);
        let made = AckReply::subject("SIM", "payload", 4, 9);
        assert_eq!(
            AckReply::parse(&made),
            Some(AckReply {
                delivered: 4,
                stream_sequence: 9
            })
        );
    }
}
