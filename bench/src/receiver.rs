//! The webhook receiver: verifies every Standard Webhooks signature and records, per event,
//! its arrival time, and per user, the latest delivered `timestamp` and sequence number.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use protocol::signing::{Keyring, SigningScheme};
use protocol::Secret;
use serde::Deserialize;

/// What the harness knows of every event of a run: when it was published and when it arrived,
/// and per user, what was delivered last. Indexes are the event's number in the run and the
/// user's number (the digits of its key `u<n>`/`p<n>`).
pub struct Tracker {
    pub base: Instant,
    /// Nanoseconds after `base` + 1 (0: not yet).
    pub sent: Vec<AtomicU64>,
    pub arrived: Vec<AtomicU64>,
    pub user_last_ts: Vec<AtomicI64>,
    /// The last delivered per-user sequence number + 1 (0: none yet).
    pub user_last_seq: Vec<AtomicU64>,
    pub unique: AtomicU64,
    pub duplicates: AtomicU64,
    pub order_violations: AtomicU64,
    pub unexpected: AtomicU64,
    pub bad_signatures: AtomicU64,
    pub to_payload: AtomicU64,
    pub to_better_auth: AtomicU64,
    /// Requests on `/raw` (the HTTP limit measurement) that verified.
    pub raw: AtomicU64,
}

fn atomics<T: Default>(n: usize) -> Vec<T> {
    std::iter::repeat_with(T::default).take(n).collect()
}

impl Tracker {
    pub fn new(events: usize, users: usize) -> Arc<Tracker> {
        Arc::new(Tracker {
            base: Instant::now(),
            sent: atomics(events),
            arrived: atomics(events),
            user_last_ts: std::iter::repeat_with(|| AtomicI64::new(i64::MIN))
                .take(users)
                .collect(),
            user_last_seq: atomics(users),
            unique: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            order_violations: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            bad_signatures: AtomicU64::new(0),
            to_payload: AtomicU64::new(0),
            to_better_auth: AtomicU64::new(0),
            raw: AtomicU64::new(0),
        })
    }

    /// Now, as stored in `sent`/`arrived`.
    pub fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    pub fn mark_sent(&self, event: usize) {
        if let Some(slot) = self.sent.get(event) {
            slot.store(self.now(), Relaxed);
        }
    }

    /// Publish-to-receive latencies (ns) of the arrived events, sorted; and the first and last
    /// arrival (ns after `base`).
    pub fn latencies(&self) -> (Vec<u64>, Option<(u64, u64)>) {
        let mut out = Vec::with_capacity(self.arrived.len());
        let (mut first, mut last) = (u64::MAX, 0);
        for (sent, arrived) in self.sent.iter().zip(&self.arrived) {
            let (s, a) = (sent.load(Relaxed), arrived.load(Relaxed));
            if a != 0 {
                first = first.min(a);
                last = last.max(a);
                if s != 0 {
                    out.push(a.saturating_sub(s));
                }
            }
        }
        out.sort_unstable();
        (out, (last != 0).then_some((first, last)))
    }
}

#[derive(Clone, Copy)]
enum Target {
    Payload,
    BetterAuth,
}

struct Inner {
    keyring: Keyring,
    tracker: Arc<Tracker>,
}

/// A running receiver; dropping it stops the server.
pub struct Receiver {
    pub addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The keyring of [`crate::BENCH_SECRET`].
pub fn keyring() -> anyhow::Result<Keyring> {
    Keyring::parse(
        SigningScheme::StandardWebhooks,
        &Secret::new(crate::BENCH_SECRET),
    )
    .map_err(|e| anyhow::anyhow!("bench secret: {e}"))
}

impl Receiver {
    /// Starts on a free loopback port: `POST /payload`, `POST /better-auth` (engine deliveries)
    /// and `POST /raw` (signed requests of the HTTP limit measurement).
    pub async fn start(tracker: Arc<Tracker>) -> anyhow::Result<Receiver> {
        let inner = Arc::new(Inner {
            keyring: keyring()?,
            tracker,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the receiver")?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route(
                "/payload",
                post(
                    |State(s): State<Arc<Inner>>, h: HeaderMap, b: Bytes| async move {
                        receive(&s, Target::Payload, &h, &b)
                    },
                ),
            )
            .route(
                "/better-auth",
                post(
                    |State(s): State<Arc<Inner>>, h: HeaderMap, b: Bytes| async move {
                        receive(&s, Target::BetterAuth, &h, &b)
                    },
                ),
            )
            .route(
                "/raw",
                post(
                    |State(s): State<Arc<Inner>>, h: HeaderMap, b: Bytes| async move {
                        if verify(&s.keyring, &h, &b) {
                            s.tracker.raw.fetch_add(1, Relaxed);
                            StatusCode::OK
                        } else {
                            s.tracker.bad_signatures.fetch_add(1, Relaxed);
                            StatusCode::UNAUTHORIZED
                        }
                    },
                ),
            )
            .with_state(inner);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Receiver { addr, server })
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn verify(keyring: &Keyring, headers: &HeaderMap, body: &[u8]) -> bool {
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    keyring
        .verify_standard(
            header(headers, "webhook-id"),
            header(headers, "webhook-timestamp"),
            header(headers, "webhook-signature"),
            body,
            now_secs,
            300,
        )
        .is_ok()
}

#[derive(Deserialize)]
struct Body {
    timestamp: i64,
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    id: Option<String>,
    #[serde(rename = "betterAuthUserId")]
    better_auth_user_id: Option<String>,
    name: Option<String>,
    #[serde(rename = "fullName")]
    full_name: Option<String>,
}

/// The number after the last `_` of an event id `e<run>_<n>`; `None` for any other id
/// (e.g. `<id>:resync`).
pub fn event_number(id: &str) -> Option<usize> {
    id.rsplit_once('_')?.1.parse().ok()
}

/// The number of a user key `u<n>` or `p<n>`, or of a name `n<seq>`.
fn number_after_letter(s: &str) -> Option<usize> {
    s.get(1..)?.parse().ok()
}

fn receive(inner: &Inner, target: Target, headers: &HeaderMap, body: &[u8]) -> StatusCode {
    let t = &inner.tracker;
    if !verify(&inner.keyring, headers, body) {
        t.bad_signatures.fetch_add(1, Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    let now = t.now();
    match target {
        Target::Payload => t.to_payload.fetch_add(1, Relaxed),
        Target::BetterAuth => t.to_better_auth.fetch_add(1, Relaxed),
    };
    match event_number(header(headers, "webhook-id")).and_then(|n| t.arrived.get(n)) {
        Some(slot) => {
            if slot.compare_exchange(0, now, Relaxed, Relaxed).is_ok() {
                t.unique.fetch_add(1, Relaxed);
            } else {
                t.duplicates.fetch_add(1, Relaxed);
            }
        }
        None => {
            t.unexpected.fetch_add(1, Relaxed);
        }
    }
    let Ok(body) = serde_json::from_slice::<Body>(body) else {
        t.unexpected.fetch_add(1, Relaxed);
        return StatusCode::OK;
    };
    let (key, name) = match target {
        Target::Payload => (body.data.better_auth_user_id, body.data.full_name),
        Target::BetterAuth => (body.data.id, body.data.name),
    };
    let Some(user) = key
        .as_deref()
        .and_then(number_after_letter)
        .and_then(|u| Some((t.user_last_ts.get(u)?, t.user_last_seq.get(u)?)))
    else {
        t.unexpected.fetch_add(1, Relaxed);
        return StatusCode::OK;
    };
    let (last_ts, last_seq) = user;
    let mut backwards = last_ts.fetch_max(body.timestamp, Relaxed) > body.timestamp;
    if let Some(seq) = name.as_deref().and_then(number_after_letter) {
        let seq = seq as u64 + 1;
        backwards |= last_seq.fetch_max(seq, Relaxed) > seq;
    }
    if backwards {
        t.order_violations.fetch_add(1, Relaxed);
    }
    StatusCode::OK
}

#[cfg(test)]
mod tests {
    use super::{event_number, number_after_letter};

    #[test]
    fn ids_and_keys() {
        assert_eq!(event_number("eabc_42"), Some(42));
        assert_eq!(event_number("eabc_42:resync"), None);
        assert_eq!(number_after_letter("u17"), Some(17));
        assert_eq!(number_after_letter("n0"), Some(0));
        assert_eq!(number_after_letter("x"), None);
    }
}
