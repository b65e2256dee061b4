//! The operator's HTTP endpoints on `[http] listen`: `/healthz`, `/readyz`, `/metrics`.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actors::stats::{Labelled, Stats, LATENCY_BUCKETS_MS};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::adapters::dedup_redis::RedisDedup;
use crate::adapters::store::SqlStore;

/// The backends `/readyz` asks on every call, once they are connected.
#[derive(Debug, Clone)]
pub struct Backends {
    pub store: SqlStore,
    pub redis: Option<RedisDedup>,
}

/// What the endpoints read.
#[derive(Debug, Clone)]
pub struct ServerState {
    pub stats: Arc<Stats>,
    /// Set once the store, the dedup backend and the consumers are ready.
    pub ready: Arc<AtomicBool>,
    /// The NATS connection once made, whose state is checked on every `/readyz`.
    pub nats: Arc<OnceLock<async_nats::Client>>,
    /// Set at startup once connected; pinged on every `/readyz`.
    pub backends: Arc<OnceLock<Backends>>,
    /// What `/metrics` reads live from each running partition's work.
    pub live: Live,
    /// Lease figures (several engines).
    pub cluster: Arc<crate::cluster::Figures>,
    /// Signed HTTP ingest requests by `(origin, result)`.
    pub ingest_requests: Arc<Labelled>,
}

/// How long `/readyz` waits for the backends, asked at once: it answers within a second
/// whatever state they are in.
const PING_TIMEOUT: Duration = Duration::from_millis(500);

pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// How long a client may take to send a request's headers (or to start its next request on
/// a kept-alive connection): an idle or slow client must not hold a connection for ever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `listen` now, so a taken port fails startup naming `key`.
pub async fn bind(listen: SocketAddr, key: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {key} {listen}: {e}"))
}

/// Serves `app` in the background, HTTP/1.1 with [`HEADER_READ_TIMEOUT`] (the ingest reads
/// bodies within its own limit).
pub fn serve(listener: tokio::net::TcpListener, app: Router) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, typically: wait instead of spinning.
                    tracing::warn!(message = "Cannot accept an HTTP connection.", %error);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT);
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = builder.serve_connection(io, service).await;
            });
        }
    })
}

async fn readyz(State(state): State<ServerState>) -> impl IntoResponse {
    let nats_up = state
        .nats
        .get()
        .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected);
    if !state.ready.load(Ordering::Relaxed) || !nats_up {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting, or NATS down\n",
        );
    }
    let Some(backends) = state.backends.get() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: starting\n");
    };
    let store = tokio::time::timeout(PING_TIMEOUT, backends.store.ping());
    let redis = async {
        match &backends.redis {
            Some(redis) => tokio::time::timeout(PING_TIMEOUT, redis.ping())
                .await
                .unwrap_or(false),
            None => true,
        }
    };
    let (store_up, redis_up) = tokio::join!(store, redis);
    if !store_up.unwrap_or(false) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: store down\n");
    }
    if !redis_up {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: redis down\n");
    }
    (StatusCode::OK, "ready\n")
}

async fn metrics(State(state): State<ServerState>) -> impl IntoResponse {
    let mut live = LiveFigures::default();
    for sources in state.live.snapshot() {
        *live.in_flight.get_or_insert(0) += sources.in_flight.get();
        for (name, consumer) in &sources.consumers {
            let mut consumer = consumer.clone();
            // A scrape must not hang on a slow server: what does not answer in time is left out.
            if let Ok(Ok(info)) = tokio::time::timeout(PING_TIMEOUT, consumer.info()).await {
                live.pending
                    .push((name.clone(), info.num_pending, info.num_ack_pending as u64));
            }
        }
    }
    live.cluster = Some(state.cluster.clone());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&state.stats, &state.ingest_requests, &live),
    )
}

/// What a scrape reads from the running engine rather than from counters.
#[derive(Debug, Default)]
pub struct LiveFigures {
    /// Messages read and not yet settled.
    pub in_flight: Option<usize>,
    /// Per consumer: messages not yet delivered to the engine, and delivered but unacked.
    pub pending: Vec<(String, u64, u64)>,
    /// Partitions held and lease changes.
    pub cluster: Option<Arc<crate::cluster::Figures>>,
}

/// Each running partition's parts that a scrape reads, by lease number.
#[derive(Debug, Clone, Default)]
pub struct Live(Arc<std::sync::Mutex<std::collections::BTreeMap<i32, LiveSources>>>);

impl Live {
    pub fn insert(&self, key: i32, sources: LiveSources) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(key, sources);
        }
    }

    pub fn remove(&self, key: i32) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(&key);
        }
    }

    fn snapshot(&self) -> Vec<LiveSources> {
        self.0
            .lock()
            .map(|map| map.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// One running partition's parts that a scrape reads.
#[derive(Debug, Clone)]
pub struct LiveSources {
    pub in_flight: actors::pipeline::InFlight,
    pub consumers: Vec<(String, async_nats::jetstream::consumer::PullConsumer)>,
}

/// One metric family: its HELP and TYPE lines, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP sync_engine_{name} {help}");
        let _ = writeln!(out, "# TYPE sync_engine_{name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "sync_engine_{name}");
        if !labels.is_empty() {
            let rendered: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", rendered.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text format (0.0.4) of everything the engine counts. The README's metrics table
/// lists each family.
pub fn render_metrics(stats: &Stats, ingest: &Labelled, live: &LiveFigures) -> String {
    let mut out = String::new();
    let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    {
        let mut f = Family::new(
            &mut out,
            "events_received_total",
            "counter",
            "Valid events read from NATS, by origin.",
        );
        f.sample(
            "events_received_total",
            &[("origin", "better-auth")],
            count(&stats.received_better_auth),
        );
        f.sample(
            "events_received_total",
            &[("origin", "payload")],
            count(&stats.received_payload),
        );
    }
    let plain: [(&str, &std::sync::atomic::AtomicU64, &str); 12] = [
        (
            "duplicates_total",
            &stats.duplicates,
            "Events skipped because their id was already processed for the sink.",
        ),
        (
            "no_ops_total",
            &stats.no_ops,
            "Events whose merge changed nothing and sent nothing.",
        ),
        (
            "stale_total",
            &stats.stale,
            "Events that lost every field to a newer write.",
        ),
        (
            "echoes_total",
            &stats.echoes,
            "Events recognised as echoes of the engine's own deliveries.",
        ),
        (
            "resync_requests_total",
            &stats.resync_requests,
            "Resync requests handled: each sends the canonical user to a side, whatever it holds.",
        ),
        (
            "late_events_total",
            &stats.late,
            "Events applied after a later event of their side (stream order broken); expected 0.",
        ),
        (
            "skipped_unlinked_total",
            &stats.skipped_unlinked,
            "Events of users not linked to Better Auth (Payload users without betterAuthUserId).",
        ),
        (
            "acked_total",
            &stats.acked,
            "Messages acknowledged on NATS.",
        ),
        (
            "retries_total",
            &stats.retries,
            "Delivery attempts that failed and were scheduled again.",
        ),
        (
            "mirror_applied_total",
            &stats.mirror_applied,
            "Better Auth events written to the PostgreSQL users mirror.",
        ),
        (
            "mirror_stale_total",
            &stats.mirror_stale,
            "Mirror events not newer than the row (replays, late older events): no change.",
        ),
        (
            "mirror_email_conflicts_total",
            &stats.mirror_email_conflicts,
            "Mirror rows written without their email because a newer active row holds it.",
        ),
    ];
    for (name, counter, help) in plain {
        Family::new(&mut out, name, "counter", help).sample(name, &[], count(counter));
    }
    {
        let mut f = Family::new(
            &mut out,
            "retries_by_sink_total",
            "counter",
            "Delivery retries scheduled, by sink.",
        );
        for (labels, value) in stats.retries_by_sink.snapshot() {
            f.sample("retries_by_sink_total", &[("sink", &labels[0])], value);
        }
    }
    {
        let mut f = Family::new(
            &mut out,
            "dead_letters_total",
            "counter",
            "Dead letters stored, by reason and sink.",
        );
        for (labels, value) in stats.dead_letters.snapshot() {
            f.sample(
                "dead_letters_total",
                &[("reason", &labels[0]), ("sink", &labels[1])],
                value,
            );
        }
    }
    {
        let mut f = Family::new(
            &mut out,
            "deliveries_total",
            "counter",
            "Webhook delivery attempts by sink and answer: 2xx, 4xx, 5xx, error (no answer).",
        );
        for (labels, value) in stats.deliveries.snapshot() {
            f.sample(
                "deliveries_total",
                &[("sink", &labels[0]), ("status", &labels[1])],
                value,
            );
        }
    }
    {
        let name = "delivery_duration_seconds";
        let mut f = Family::new(
            &mut out,
            name,
            "histogram",
            "Time from sending a webhook request to its answer, by sink.",
        );
        for (sink, histogram) in stats.delivery_latency.snapshot() {
            let mut cumulative = 0;
            for (bound_ms, n) in LATENCY_BUCKETS_MS.iter().zip(histogram.buckets) {
                cumulative += n;
                let le = format!("{}", *bound_ms as f64 / 1000.0);
                f.sample(
                    &format!("{name}_bucket"),
                    &[("sink", &sink), ("le", &le)],
                    cumulative,
                );
            }
            f.sample(
                &format!("{name}_bucket"),
                &[("sink", &sink), ("le", "+Inf")],
                histogram.count,
            );
            f.sample(
                &format!("{name}_sum"),
                &[("sink", &sink)],
                histogram.sum_ms as f64 / 1000.0,
            );
            f.sample(
                &format!("{name}_count"),
                &[("sink", &sink)],
                histogram.count,
            );
        }
    }
    Family::new(
        &mut out,
        "users_active",
        "gauge",
        "Per-user actors alive (an idle one stops within 100 ms to 5 s; its state may stay parked).",
    )
    .sample(
        "users_active",
        &[],
        stats.users_active.load(Ordering::Relaxed),
    );
    Family::new(
        &mut out,
        "users_parked",
        "gauge",
        "Idle users whose state is kept in memory, serialized, for engine.user_idle_timeout.",
    )
    .sample(
        "users_parked",
        &[],
        stats.users_parked.load(Ordering::Relaxed),
    );
    Family::new(
        &mut out,
        "parked_state_bytes",
        "gauge",
        "Bytes of the parked users' states (bounded by engine.idle_state_cache_mb).",
    )
    .sample(
        "parked_state_bytes",
        &[],
        stats.parked_bytes.load(Ordering::Relaxed),
    );
    {
        let mut f = Family::new(
            &mut out,
            "target_open",
            "gauge",
            "1 while a target's circuit breaker is open (it counts as down: deliveries wait), else 0.",
        );
        f.sample(
            "target_open",
            &[("sink", "payload")],
            stats.payload_open.load(Ordering::Relaxed),
        );
        f.sample(
            "target_open",
            &[("sink", "better-auth")],
            stats.better_auth_open.load(Ordering::Relaxed),
        );
    }
    if let Some(in_flight) = live.in_flight {
        Family::new(
            &mut out,
            "events_in_flight",
            "gauge",
            "Messages read from NATS and not yet settled (bounded by engine.max_in_flight).",
        )
        .sample("events_in_flight", &[], in_flight);
    }
    if !live.pending.is_empty() {
        let mut f = Family::new(
            &mut out,
            "consumer_pending",
            "gauge",
            "Per durable consumer: messages NATS has not yet handed to the engine.",
        );
        for (consumer, pending, _) in &live.pending {
            f.sample("consumer_pending", &[("consumer", consumer)], pending);
        }
        let mut f = Family::new(
            &mut out,
            "consumer_ack_pending",
            "gauge",
            "Per durable consumer: messages handed to the engine and not yet acknowledged.",
        );
        for (consumer, _, ack_pending) in &live.pending {
            f.sample(
                "consumer_ack_pending",
                &[("consumer", consumer)],
                ack_pending,
            );
        }
    }
    if let Some(cluster) = &live.cluster {
        Family::new(
            &mut out,
            "partitions_owned",
            "gauge",
            "Leases this engine holds: partitions, or 1 for the whole unpartitioned streams (0 for a standby).",
        )
        .sample("partitions_owned", &[], cluster.owned.load(Ordering::Relaxed));
        let mut f = Family::new(
            &mut out,
            "lease_changes_total",
            "counter",
            "Leases acquired, released (handed on when rebalancing or stopping) and lost (the lease session failed).",
        );
        for (change, value) in [
            ("acquired", &cluster.acquired),
            ("released", &cluster.released),
            ("lost", &cluster.lost),
        ] {
            f.sample(
                "lease_changes_total",
                &[("change", change)],
                value.load(Ordering::Relaxed),
            );
        }
    }
    {
        let mut f = Family::new(
            &mut out,
            "ingest_requests_total",
            "counter",
            "Signed HTTP ingest requests by endpoint origin and result (accepted, unauthorized, invalid, too_large, unavailable, wrong_origin).",
        );
        for (labels, value) in ingest.snapshot() {
            f.sample(
                "ingest_requests_total",
                &[("origin", &labels[0]), ("result", &labels[1])],
                value,
            );
        }
    }
    out
}
