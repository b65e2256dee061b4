//! The operator's HTTP endpoints on `[http] listen`: `/healthz`, `/readyz`, `/metrics`.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actors::stats::Stats;
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
    /// The NATS connection, whose state is checked on every `/readyz`.
    pub nats: Option<async_nats::Client>,
    /// Set at startup once connected; pinged on every `/readyz`.
    pub backends: Arc<OnceLock<Backends>>,
}

/// How long `/readyz` waits for a backend to answer.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Binds the listener now (so a taken port fails startup) and serves in the background.
pub async fn serve(
    listen: SocketAddr,
    state: ServerState,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on http.listen {listen}: {e}"))?;
    let app = router(state);
    Ok(tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(message = "HTTP server stopped.", %error);
        }
    }))
}

async fn readyz(State(state): State<ServerState>) -> impl IntoResponse {
    let nats_up = state
        .nats
        .as_ref()
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
    let store_up = tokio::time::timeout(PING_TIMEOUT, backends.store.ping())
        .await
        .unwrap_or(false);
    if !store_up {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: store down\n");
    }
    if let Some(redis) = &backends.redis {
        let redis_up = tokio::time::timeout(PING_TIMEOUT, redis.ping())
            .await
            .unwrap_or(false);
        if !redis_up {
            return (StatusCode::SERVICE_UNAVAILABLE, "not ready: redis down\n");
        }
    }
    (StatusCode::OK, "ready\n")
}

async fn metrics(State(state): State<ServerState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&state.stats),
    )
}

/// Prometheus text format of the pipeline's counters.
pub fn render_metrics(stats: &Stats) -> String {
    let mut out = String::new();
    for (name, value) in stats.counters() {
        let _ = writeln!(out, "# TYPE sync_engine_{name}_total counter");
        let _ = writeln!(out, "sync_engine_{name}_total {value}");
    }
    let _ = writeln!(out, "# TYPE sync_engine_users_active gauge");
    let _ = writeln!(
        out,
        "sync_engine_users_active {}",
        stats.users_active.load(Ordering::Relaxed)
    );
    out
}
