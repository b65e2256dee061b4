//! The end-to-end benchmark harness of `sync-engine`: one module per concern.
//!
//! - [`config`]: a generated engine configuration (unique stream, subjects, durable prefix,
//!   store and dedup namespace) in a temporary folder;
//! - [`engine`]: the engine as a child process, with its CPU time, RSS and metrics;
//! - [`publisher`]: workloads and their publication to NATS JetStream (bulk or open-loop);
//! - [`receiver`]: the signature-verifying webhook receiver and what it tracks per event and user;
//! - [`stats`]: percentiles and the result table;
//! - [`scenario`]: the scenarios, each producing a [`stats::Report`].

pub mod config;
pub mod engine;
pub mod publisher;
pub mod receiver;
pub mod scenario;
pub mod stats;

/// The Standard Webhooks secret the harness signs and verifies with; it protects nothing.
pub const BENCH_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// NATS JetStream on loopback.
pub const NATS_URL: &str = "nats://127.0.0.1:4222";
/// Redis on loopback (Redis dedup backend).
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
/// PostgreSQL on loopback: the admin database where per-run databases are created.
pub const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Connects to NATS, failing with a clear message when it is not running.
pub async fn connect_nats() -> anyhow::Result<async_nats::jetstream::Context> {
    connect_nats_at(NATS_URL).await
}

/// [`connect_nats`] to the server at `url`.
pub async fn connect_nats_at(url: &str) -> anyhow::Result<async_nats::jetstream::Context> {
    use anyhow::Context as _;
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(std::time::Duration::from_secs(3))
        .connect(url)
        .await
        .with_context(|| format!("NATS JetStream must run on {url}"))?;
    Ok(async_nats::jetstream::new(client))
}
