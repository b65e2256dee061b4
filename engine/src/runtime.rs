//! Assembles a running engine from a validated configuration: store, dedup backend, NATS
//! stream and consumers, the actor pipeline and the HTTP endpoints.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actors::ports::{DedupStore, EventSource, Ports};
use actors::settings::{PipelineSettings, RetryPolicy, TargetSettings};
use actors::stats::{Labelled, Stats};
use actors::sync::{Faults, Policy};
use actors::{MirrorPorts, Pipeline, PipelineArgs, Sink};
use protocol::Origin;

use crate::adapters::clock::{OsEntropy, SystemClock};
use crate::adapters::dedup_memory::MemoryDedup;
use crate::adapters::dedup_redis::RedisDedup;
use crate::adapters::http::ReqwestTransport;
use crate::adapters::mirror_pg::PgMirror;
use crate::adapters::nats::{self, NatsSource};
use crate::adapters::store::SqlStore;
use crate::config::{Config, DedupBackend, Secrets, TargetConfig};
use crate::ingest_http;
use crate::server::{self, ServerState};

/// `engine.max_in_flight` is a bound: the engine holds no more than the delivery slots can
/// use (and at least one fetch batch).
pub fn effective_in_flight(max_in_flight: usize, delivery_slots: usize) -> usize {
    let useful = (delivery_slots * IN_FLIGHT_PER_DELIVERY_SLOT).max(FETCH_BATCH);
    max_in_flight.min(useful)
}

/// Messages pulled from a consumer at once.
const FETCH_BATCH: usize = 256;

/// Events held per delivery slot (`max_concurrency`, summed over the enabled targets) at most.
/// Enough to keep every slot busy while a batch of saves commits and the next one forms;
/// more only wait in queues, costing memory and, measured, throughput too (`bench drain`
/// and `bench many-users` run faster with 1,000–4,000 held than with 10,000, at less than
/// half the memory). See BENCHMARKS.md.
const IN_FLIGHT_PER_DELIVERY_SLOT: usize = 4;

/// The pipeline's settings from the configuration.
pub fn pipeline_settings(config: &Config, secrets: &Secrets) -> PipelineSettings {
    let target = |side: Origin| -> Option<TargetSettings> {
        let (target, _) = config.targets.side(side);
        let keyring = secrets.target(side)?.clone();
        target.enabled.then(|| target_settings(target, keyring))
    };
    let mut settings = PipelineSettings {
        max_in_flight: config.engine.max_in_flight,
        user_idle_timeout: config.engine.user_idle_timeout,
        idle_cache_bytes: config.engine.idle_state_cache_mb << 20,
        ack_wait: config.nats.ack_wait,
        max_message_bytes: config.nats.max_message_bytes,
        max_deliver: u64::try_from(config.nats.max_deliver).ok(),
        fetch_batch: FETCH_BATCH,
        mappings: config.mappings(),
        policy: Policy {
            clock_skew_ms: config.engine.clock_skew.as_millis() as i64,
            faults: Faults::default(),
        },
        payload: target(Origin::Payload),
        better_auth: target(Origin::BetterAuth),
        faults: actors::settings::EngineFaults::default(),
        started_at_ms: 0,
    };
    settings.max_in_flight = effective_in_flight(settings.max_in_flight, settings.delivery_slots());
    settings
}

fn target_settings(target: &TargetConfig, keyring: protocol::signing::Keyring) -> TargetSettings {
    TargetSettings {
        url: target.url.clone(),
        keyring,
        timeout: target.timeout,
        max_concurrency: target.max_concurrency,
        coalesce: target.coalesce,
        retry: RetryPolicy {
            initial: target.retry.initial,
            max: target.retry.max,
            multiplier: target.retry.multiplier,
            jitter: target.retry.jitter,
            max_attempts: target.retry.max_attempts,
        },
        breaker: actors::breaker::BreakerSettings {
            failures: target.breaker.failures,
            probe_interval: target.breaker.probe_interval,
        },
    }
}

/// Runs the engine until `shutdown` resolves, then drains within `engine.shutdown_grace`.
pub async fn run(
    config: Config,
    secrets: Secrets,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let stats = Arc::new(Stats::default());
    let ready = Arc::new(AtomicBool::new(false));
    let backends = Arc::new(std::sync::OnceLock::new());
    let nats_slot = Arc::new(std::sync::OnceLock::new());
    let js_slot = Arc::new(std::sync::OnceLock::new());
    let live = Arc::new(std::sync::OnceLock::new());
    let ingest_requests = Arc::new(Labelled::default());
    let ingest = match (&secrets.ingest_better_auth, &secrets.ingest_payload) {
        (Some(better_auth), Some(payload)) if config.ingest.enabled => {
            Some(ingest_http::router(ingest_http::IngestState {
                js: js_slot.clone(),
                config: Arc::new(config.clone()),
                mappings: Arc::new(config.mappings()),
                better_auth: better_auth.clone(),
                payload: payload.clone(),
                requests: ingest_requests.clone(),
            }))
        }
        _ => None,
    };
    // The endpoints come first, so `/readyz` answers 503 while NATS cannot be reached yet.
    let servers = start_servers(
        &config,
        ServerState {
            stats: stats.clone(),
            ready: ready.clone(),
            nats: nats_slot.clone(),
            backends: backends.clone(),
            live: live.clone(),
            ingest_requests,
        },
        ingest,
    )
    .await?;
    let nats_client = nats::connect_until_up(&config.nats, &secrets.nats).await?;
    let _ = nats_slot.set(nats_client.clone());
    let _ = js_slot.set(async_nats::jetstream::new(nats_client.clone()));

    let sql = SqlStore::connect(&config.store.url).await?;
    let store = Arc::new(sql.clone());
    let writer = sql.clone();
    let clock = Arc::new(SystemClock);
    let (dedup, redis): (Arc<dyn DedupStore>, Option<RedisDedup>) = match config.dedup.backend {
        DedupBackend::Memory => (
            Arc::new(MemoryDedup::new(
                config.dedup.ttl,
                config.dedup.memory_capacity,
                clock.clone(),
            )),
            None,
        ),
        DedupBackend::Redis => {
            let redis = RedisDedup::connect(&config.dedup, secrets.redis_password.as_ref()).await?;
            (Arc::new(redis.clone()), Some(redis))
        }
    };
    let _ = backends.set(crate::server::Backends { store: sql, redis });
    let js = async_nats::jetstream::new(nats_client.clone());
    let streams = nats::ensure_streams(&js, &config.nats).await?;
    let mut consumers = Vec::new();
    let mut named_consumers = Vec::new();
    for sink in Sink::ALL {
        let consumer =
            nats::ensure_consumer(&streams, &config.nats, sink, config.engine.max_in_flight)
                .await?;
        named_consumers.push((
            nats::consumer_name(&config.nats.durable_prefix, sink),
            consumer.clone(),
        ));
        consumers.push((sink, consumer));
    }
    let mirror = if config.mirror.enabled {
        let table = PgMirror::connect(&config.mirror).await?;
        let consumer =
            nats::ensure_mirror_consumer(&streams, &config.nats, config.engine.max_in_flight)
                .await?;
        named_consumers.push((
            format!("{}-mirror", config.nats.durable_prefix),
            consumer.clone(),
        ));
        Some(MirrorPorts {
            source: Arc::new(NatsSource::new(&consumer, FETCH_BATCH).await?),
            store: Arc::new(table),
            default_organization_id: config.mirror.default_organization_id.clone(),
        })
    } else {
        None
    };
    let mut sources: Vec<(Sink, Arc<dyn EventSource>)> = Vec::new();
    for (sink, consumer) in &consumers {
        sources.push((
            *sink,
            Arc::new(NatsSource::new(consumer, FETCH_BATCH).await?),
        ));
    }
    let settings = Arc::new(pipeline_settings(&config, &secrets));
    let events_held_at_most = settings.max_in_flight;
    let ports = Ports {
        clock,
        entropy: Arc::new(OsEntropy::default()),
        dedup,
        store,
        http: Arc::new(ReqwestTransport::new(&config.targets)?),
        chaos: Arc::new(actors::ports::NoChaos),
    };
    let pipeline = Pipeline::start(PipelineArgs {
        ports,
        settings,
        sources,
        stats,
        mirror,
    })
    .await
    .map_err(|e| anyhow::anyhow!("cannot start the pipeline: {e}"))?;
    let _ = live.set(server::LiveSources {
        in_flight: pipeline.in_flight_gauge(),
        consumers: named_consumers,
    });
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        message = "Engine running.",
        better_auth_stream = %nats::stream_name(&config.nats, protocol::Origin::BetterAuth),
        payload_stream = %nats::stream_name(&config.nats, protocol::Origin::Payload),
        listen = %config.http.listen,
        store = %store_kind(&config.store.url),
        dedup = ?config.dedup.backend,
        events_held_at_most,
    );

    let mut pipeline = pipeline;
    tokio::select! {
        _ = shutdown => {}
        _ = &mut pipeline.handle => {
            // Its supervisor gave up (a part of it failed over and over): exit non-zero, so
            // the service manager restarts the engine, which resumes from the ack floors.
            ready.store(false, Ordering::Relaxed);
            writer.flush().await;
            anyhow::bail!("the actor pipeline stopped: one of its parts kept failing; exiting so that the engine is restarted");
        }
    }
    ready.store(false, Ordering::Relaxed);
    tracing::info!(message = "Shutting down: intake stopped, draining in-flight work.", grace = ?config.engine.shutdown_grace);
    let left = pipeline.shutdown(config.engine.shutdown_grace).await;
    if left > 0 {
        tracing::warn!(
            message = "Shutdown grace over; unfinished messages go back to NATS.",
            n_left = left
        );
    }
    // The user actors are stopped; what they queued without waiting is written before exit.
    writer.flush().await;
    let _ = nats_client.flush().await;
    for server in servers {
        server.abort();
    }
    tracing::info!(message = "Stopped.");
    Ok(())
}

/// The operator's endpoints on `http.listen`, and the ingest on `ingest.listen` when it has an
/// address of its own (so `/metrics` can stay on loopback while the ingest faces the apps).
async fn start_servers(
    config: &Config,
    state: ServerState,
    ingest: Option<axum::Router>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut app = server::router(state);
    let mut servers = Vec::new();
    match (ingest, config.ingest.listen) {
        (Some(ingest), Some(listen)) => {
            let listener = server::bind(listen, "ingest.listen").await?;
            servers.push(server::serve(listener, ingest));
        }
        (Some(ingest), None) => app = app.merge(ingest),
        (None, _) => {}
    }
    let listener = server::bind(config.http.listen, "http.listen").await?;
    servers.push(server::serve(listener, app));
    Ok(servers)
}

fn store_kind(url: &str) -> &'static str {
    if url.starts_with("sqlite:") {
        "sqlite"
    } else {
        "postgres"
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::effective_in_flight;

    #[test]
    fn held_events_follow_the_delivery_slots_within_the_configured_bound() {
        // Defaults: two targets of 256 slots; 10,000 configured.
        assert_eq!(effective_in_flight(10_000, 512), 2_048);
        assert_eq!(
            effective_in_flight(1_000, 512),
            1_000,
            "a lower bound stays"
        );
        assert_eq!(
            effective_in_flight(10_000, 0),
            256,
            "at least one fetch batch"
        );
        assert_eq!(effective_in_flight(100, 0), 100);
    }
}
