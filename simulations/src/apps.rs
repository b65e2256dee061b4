//! The two applications: stateful, with their own local edits, receivers that apply each
//! delivery blindly (so a delivery can overwrite a newer local edit), faulty answers, and hooks
//! that may echo every applied write back as a new event.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actors::ports::{BoxFuture, HttpRequest, HttpResponse, HttpTransport, TransportError};
use bytes::Bytes;
use protocol::signing::Keyring;
use protocol::{Envelope, EventType, Origin};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::clock::SimClock;
use crate::nats::FakeNats;
use crate::rng::{fnv, SimRng};
use crate::trace::Trace;

/// How an application misbehaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppFaults {
    pub timeout: f64,
    pub server_error: f64,
    pub throttle: f64,
    pub reject: f64,
    pub lost_response: f64,
    pub latency_max_ms: u64,
    pub publish_delay_max_ms: u64,
    /// Echo every applied delivery back as an own event.
    pub echo: bool,
    pub echo_delay_max_ms: u64,
    /// An outage: every request from this virtual time until the next fails to connect.
    pub down_from_ms: u64,
    pub down_until_ms: u64,
}

#[derive(Debug, Clone, Default)]
pub struct AppUser {
    /// In this side's field names.
    pub fields: Map<String, Value>,
    pub deleted: bool,
    /// The body timestamp of the last applied delivery: deliveries never go backwards.
    last_delivery_ts: i64,
}

#[derive(Debug, Default)]
struct AppState {
    users: BTreeMap<String, AppUser>,
    /// webhook-id -> hash of the body first applied under it.
    seen: BTreeMap<String, u64>,
    n_events: u64,
}

/// Problems seen while the run went on.
#[derive(Debug, Default)]
pub struct Violations(pub Mutex<Vec<String>>);

impl Violations {
    pub fn add(&self, what: String) {
        if let Ok(mut v) = self.0.lock() {
            if v.len() < 50 {
                v.push(what);
            }
        }
    }

    pub fn list(&self) -> Vec<String> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

pub struct SimApp {
    pub side: Origin,
    state: Mutex<AppState>,
    faults: Mutex<AppFaults>,
    rng: Mutex<SimRng>,
    keyring: Keyring,
    clock: Arc<SimClock>,
    trace: Arc<Trace>,
    violations: Arc<Violations>,
    publisher: mpsc::UnboundedSender<(String, Bytes, tokio::time::Instant)>,
    /// Publishes not yet in the stream.
    pub publishing: Arc<AtomicU64>,
    /// Deliveries applied (duplicates excluded).
    pub applied: AtomicU64,
}

impl SimApp {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        side: Origin,
        faults: AppFaults,
        rng: SimRng,
        keyring: Keyring,
        nats: Arc<FakeNats>,
        clock: Arc<SimClock>,
        trace: Arc<Trace>,
        violations: Arc<Violations>,
    ) -> Arc<SimApp> {
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, Bytes, tokio::time::Instant)>();
        let publishing = Arc::new(AtomicU64::new(0));
        let in_flight = publishing.clone();
        // One publisher per app: its hooks publish in commit order, each at least its delay
        // after its commit (delays do not add up: a slow publish holds back only those
        // committed before it is out).
        tokio::spawn(async move {
            let mut last = tokio::time::Instant::now();
            while let Some((subject, payload, due)) = rx.recv().await {
                let at = due.max(last);
                tokio::time::sleep_until(at).await;
                last = at;
                nats.publish(&subject, payload);
                in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        });
        Arc::new(SimApp {
            side,
            state: Mutex::new(AppState::default()),
            faults: Mutex::new(faults),
            rng: Mutex::new(rng),
            keyring,
            clock,
            trace,
            violations,
            publisher: tx,
            publishing,
            applied: AtomicU64::new(0),
        })
    }

    pub fn heal(&self) {
        if let Ok(mut f) = self.faults.lock() {
            let echo = f.echo;
            let echo_delay = f.echo_delay_max_ms;
            *f = AppFaults {
                echo,
                echo_delay_max_ms: echo_delay,
                ..AppFaults::default()
            };
        }
    }

    fn faults(&self) -> AppFaults {
        self.faults.lock().map(|f| *f).unwrap_or_default()
    }

    fn draw(&self, f: impl FnOnce(&mut SimRng) -> u64) -> u64 {
        self.rng.lock().map(|mut r| f(&mut r)).unwrap_or(0)
    }

    pub fn id_field(&self) -> &'static str {
        match self.side {
            Origin::BetterAuth => "id",
            Origin::Payload => "betterAuthUserId",
        }
    }

    /// This side's name of a canonical field.
    pub fn side_name(&self, canonical: &str) -> String {
        match (self.side, canonical) {
            (Origin::Payload, "name") => "fullName".into(),
            (_, "id") => self.id_field().into(),
            (_, other) => other.into(),
        }
    }

    fn subject(&self, ty: EventType, user: &str) -> String {
        let verb = ty.verb();
        match self.side {
            Origin::BetterAuth => format!("user.{verb}.{user}"),
            Origin::Payload => format!("payload.user.{verb}.{user}"),
        }
    }

    /// Publishes an event through this app's hook queue (in order, after a delay).
    fn publish_event(
        &self,
        state: &mut AppState,
        ty: EventType,
        user: &str,
        ts: i64,
        data: Map<String, Value>,
        delay_ms: u64,
    ) -> String {
        state.n_events += 1;
        let prefix = match self.side {
            Origin::BetterAuth => "ba",
            Origin::Payload => "pl",
        };
        let id = format!("{prefix}-{}", state.n_events);
        let envelope = Envelope {
            id: id.clone(),
            origin: self.side,
            event_type: ty,
            timestamp: ts,
            data,
        };
        self.publishing.fetch_add(1, Ordering::SeqCst);
        let _ = self.publisher.send((
            self.subject(ty, user),
            Bytes::from(envelope.to_bytes()),
            tokio::time::Instant::now() + Duration::from_millis(delay_ms),
        ));
        id
    }

    pub fn has_user(&self, user: &str) -> bool {
        self.state
            .lock()
            .map(|s| s.users.get(user).is_some_and(|u| !u.deleted))
            .unwrap_or(false)
    }

    /// A local edit of canonical `fields` (a create when the user is new); returns the commit
    /// time and the event id.
    pub fn edit(&self, user: &str, fields: &[(String, Value)]) -> (i64, String) {
        let delay = self.draw(|r| r.below(self.faults().publish_delay_max_ms + 1));
        let ts = crate::clock_now(&self.clock);
        let Ok(mut state) = self.state.lock() else {
            return (ts, String::new());
        };
        let is_new = !state.users.contains_key(user);
        let id_field = self.id_field();
        let entry = state.users.entry(user.to_string()).or_default();
        entry
            .fields
            .insert(id_field.into(), Value::String(user.into()));
        for (name, value) in fields {
            entry.fields.insert(self.side_name(name), value.clone());
        }
        let snapshot = entry.fields.clone();
        let ty = if is_new {
            EventType::Created
        } else {
            EventType::Updated
        };
        if std::env::var("SIM_DEBUG_USER").ok().as_deref() == Some(user) {
            eprintln!(
                "DBG {} local edit ts={ts} delay={delay} {fields:?}",
                self.side
            );
        }
        let id = self.publish_event(&mut state, ty, user, ts, snapshot, delay);
        self.trace.record(
            self.clock.virt_ms(),
            self.side.as_str(),
            "local_edit",
            format_args!("{user} {id}"),
        );
        (ts, id)
    }

    pub fn delete(&self, user: &str) -> (i64, String) {
        let delay = self.draw(|r| r.below(self.faults().publish_delay_max_ms + 1));
        let ts = crate::clock_now(&self.clock);
        let Ok(mut state) = self.state.lock() else {
            return (ts, String::new());
        };
        if let Some(entry) = state.users.get_mut(user) {
            entry.deleted = true;
        }
        let mut data = Map::new();
        data.insert(self.id_field().into(), Value::String(user.into()));
        let id = self.publish_event(&mut state, EventType::Deleted, user, ts, data, delay);
        self.trace.record(
            self.clock.virt_ms(),
            self.side.as_str(),
            "local_delete",
            format_args!("{user} {id}"),
        );
        (ts, id)
    }

    /// Drift: the user's row is lost behind the engine's back (a hand-made DELETE, a restore
    /// from a backup older than the user), with no event. Whether there was a row to lose.
    pub fn lose(&self, user: &str) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        let lost = state.users.get(user).is_some_and(|u| !u.deleted);
        if lost {
            state.users.remove(user);
            self.trace
                .record(self.clock.virt_ms(), self.side.as_str(), "drift_lose", user);
        }
        lost
    }

    /// Drift: a deleted user's row comes back behind the engine's back (a restore from a backup
    /// older than the deletion), with no event. Whether there was a deleted row to restore.
    pub fn restore(&self, user: &str) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        let Some(entry) = state.users.get_mut(user).filter(|u| u.deleted) else {
            return false;
        };
        entry.deleted = false;
        self.trace.record(
            self.clock.virt_ms(),
            self.side.as_str(),
            "drift_restore",
            user,
        );
        true
    }

    /// Publishes a resync request from this side (as `reconcile --fix` does): the engine is to
    /// send the user to the other side whatever it believes that side holds.
    pub fn request_resync(&self, user: &str) -> String {
        let ts = crate::clock_now(&self.clock);
        let Ok(mut state) = self.state.lock() else {
            return String::new();
        };
        let mut data = Map::new();
        data.insert(self.id_field().into(), Value::String(user.into()));
        let id = self.publish_event(&mut state, EventType::Resync, user, ts, data, 0);
        self.trace.record(
            self.clock.virt_ms(),
            self.side.as_str(),
            "resync_request",
            format_args!("{user} {id}"),
        );
        id
    }

    /// The user in canonical names, `None` when deleted or never seen.
    pub fn canonical(&self, user: &str) -> Option<BTreeMap<String, Value>> {
        let state = self.state.lock().ok()?;
        let entry = state.users.get(user)?;
        if entry.deleted {
            return None;
        }
        let mut out = BTreeMap::new();
        for (name, value) in &entry.fields {
            let canonical = match (self.side, name.as_str()) {
                (Origin::Payload, "fullName") => "name",
                (Origin::Payload, "betterAuthUserId") => "id",
                (_, other) => other,
            };
            if !value.is_null() {
                out.insert(canonical.to_string(), value.clone());
            }
        }
        Some(out)
    }

    pub fn is_deleted_or_absent(&self, user: &str) -> bool {
        self.state
            .lock()
            .map(|s| s.users.get(user).is_none_or(|u| u.deleted))
            .unwrap_or(false)
    }

    /// Applies one delivery as a blind receiver would; the answer's status.
    fn apply(&self, request: &HttpRequest) -> u16 {
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
                .unwrap_or("")
        };
        let now_secs = crate::clock_now(&self.clock).div_euclid(1000);
        if self
            .keyring
            .verify_standard(
                header("webhook-id"),
                header("webhook-timestamp"),
                header("webhook-signature"),
                &request.body,
                now_secs,
                300,
            )
            .is_err()
        {
            self.violations.add(format!(
                "{}: a delivery's signature does not verify",
                self.side
            ));
            return 401;
        }
        let Ok(envelope) = Envelope::parse(&request.body, usize::MAX) else {
            self.violations
                .add(format!("{}: a delivery body is not an envelope", self.side));
            return 400;
        };
        let webhook_id = header("webhook-id").to_string();
        if envelope.id != webhook_id || header("x-webhook-id") != webhook_id {
            self.violations.add(format!(
                "{}: ids differ between headers and body ({webhook_id})",
                self.side
            ));
        }
        if envelope.origin != self.side.other()
            || header("x-webhook-origin") != self.side.other().as_str()
        {
            self.violations
                .add(format!("{}: wrong origin on {webhook_id}", self.side));
        }
        let body_hash = fnv(&request.body[..]);
        let Ok(mut state) = self.state.lock() else {
            return 500;
        };
        if let Some(first) = state.seen.get(&webhook_id) {
            if *first != body_hash {
                // Receivers skip a webhook-id they applied: the engine must never reuse one for
                // different content, or the second would be silently lost.
                self.violations.add(format!(
                    "{}: webhook-id {webhook_id} delivered again with different content",
                    self.side
                ));
            }
            self.trace.record(
                self.clock.virt_ms(),
                self.side.as_str(),
                "duplicate",
                &webhook_id,
            );
            return 200;
        }
        state.seen.insert(webhook_id.clone(), body_hash);
        let user = envelope
            .data
            .get(self.id_field())
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let entry = state.users.entry(user.clone()).or_default();
        if envelope.timestamp < entry.last_delivery_ts {
            self.violations.add(format!(
                "{}: delivery order went backwards for {user} ({webhook_id}: {} after {})",
                self.side, envelope.timestamp, entry.last_delivery_ts
            ));
        }
        entry.last_delivery_ts = entry.last_delivery_ts.max(envelope.timestamp);
        let echo_type;
        match envelope.event_type {
            EventType::Resync => {
                self.violations.add(format!(
                    "{}: a resync request was delivered as such for {user} ({webhook_id})",
                    self.side
                ));
                return 400;
            }
            EventType::Deleted => {
                entry.deleted = true;
                echo_type = EventType::Deleted;
            }
            _ if entry.deleted => {
                // The row is gone here; like the plugins' receivers (`createMissing`), an
                // update creates the user again, with what the delivery carries.
                entry.deleted = false;
                entry.fields = envelope.data.clone();
                self.trace.record(
                    self.clock.virt_ms(),
                    self.side.as_str(),
                    "recreate",
                    &webhook_id,
                );
                echo_type = EventType::Updated;
            }
            _ => {
                for (name, value) in &envelope.data {
                    entry.fields.insert(name.clone(), value.clone());
                }
                echo_type = EventType::Updated;
            }
        }
        self.applied.fetch_add(1, Ordering::SeqCst);
        if std::env::var("SIM_DEBUG_USER").ok().as_deref() == Some(user.as_str()) {
            eprintln!(
                "DBG {} apply {webhook_id} {:?} -> {:?}",
                self.side,
                envelope.data,
                state.users.get(&user).map(|u| &u.fields)
            );
        }
        self.trace.record(
            self.clock.virt_ms(),
            self.side.as_str(),
            "apply",
            format_args!("{webhook_id} {user}"),
        );
        let faults = self.faults();
        if faults.echo {
            let delay = self.draw(|r| r.below(faults.echo_delay_max_ms + 1));
            let data = if echo_type == EventType::Deleted {
                let mut m = Map::new();
                m.insert(self.id_field().into(), Value::String(user.clone()));
                m
            } else {
                state
                    .users
                    .get(&user)
                    .map(|u| u.fields.clone())
                    .unwrap_or_default()
            };
            let ts = crate::clock_now(&self.clock);
            self.publish_event(&mut state, echo_type, &user, ts, data, delay);
        }
        200
    }
}

/// Which way a request goes wrong.
enum Fault {
    None,
    Timeout { applied: bool },
    ServerError,
    Throttle(u64),
    Reject,
    LostResponse,
}

/// The engine's HTTP transport in the simulation: requests reach the apps in memory. Each
/// engine run gets its own, so requests of a crashed run never start.
pub struct SimTransport {
    pub payload: Arc<SimApp>,
    pub better_auth: Arc<SimApp>,
    pub epoch: u64,
    pub current_epoch: Arc<AtomicU64>,
}

impl HttpTransport for SimTransport {
    fn post(&self, request: HttpRequest) -> BoxFuture<'_, Result<HttpResponse, TransportError>> {
        Box::pin(async move {
            if self.current_epoch.load(Ordering::SeqCst) != self.epoch {
                return Err(TransportError::Connect("the engine run is gone".into()));
            }
            let app = if request.url.ends_with("payload") {
                &self.payload
            } else {
                &self.better_auth
            };
            let faults = app.faults();
            let now = app.clock.virt_ms();
            if (faults.down_from_ms..faults.down_until_ms).contains(&now) {
                return Err(TransportError::Connect(
                    "connection refused (outage)".into(),
                ));
            }
            let (fault, latency) = {
                let Ok(mut rng) = app.rng.lock() else {
                    return Err(TransportError::Other("rng".into()));
                };
                let latency = rng.below(faults.latency_max_ms + 1);
                let roll = rng.unit();
                let mut edge = faults.timeout;
                let fault = if roll < edge {
                    Fault::Timeout {
                        applied: rng.chance(0.5),
                    }
                } else if roll < {
                    edge += faults.server_error;
                    edge
                } {
                    Fault::ServerError
                } else if roll < {
                    edge += faults.throttle;
                    edge
                } {
                    Fault::Throttle(rng.below(3))
                } else if roll < {
                    edge += faults.reject;
                    edge
                } {
                    Fault::Reject
                } else if roll < {
                    edge += faults.lost_response;
                    edge
                } {
                    Fault::LostResponse
                } else {
                    Fault::None
                };
                (fault, latency)
            };
            let answer = |status: u16, retry_after: Option<Duration>| HttpResponse {
                status,
                retry_after,
                location: None,
                body_prefix: String::new(),
            };
            match fault {
                Fault::Timeout { applied } => {
                    tokio::time::sleep(request.timeout).await;
                    if applied {
                        app.apply(&request);
                    }
                    Err(TransportError::Timeout)
                }
                Fault::ServerError => Ok(answer(503, None)),
                Fault::Throttle(secs) => Ok(answer(429, Some(Duration::from_secs(secs)))),
                Fault::Reject => Ok(answer(400, None)),
                Fault::LostResponse => {
                    tokio::time::sleep(Duration::from_millis(latency)).await;
                    app.apply(&request);
                    Err(TransportError::Connect(
                        "connection reset after the write".into(),
                    ))
                }
                Fault::None => {
                    tokio::time::sleep(Duration::from_millis(latency)).await;
                    let status = app.apply(&request);
                    Ok(answer(status, None))
                }
            }
        })
    }
}
