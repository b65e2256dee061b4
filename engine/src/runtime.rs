//! Assembles a running engine from a validated configuration: store, dedup backend, NATS
//! stream and consumers, the actor pipeline and the HTTP endpoints.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actors::ports::{DedupStore, EventSource, HttpTransport, Ports};
use actors::settings::{PipelineSettings, RetryPolicy, TargetSettings};
use actors::stats::{Labelled, Stats};
use actors::sync::{Faults, Policy};
use actors::{MirrorPorts, Pipeline, PipelineArgs, Sink};
use protocol::Origin;

use crate::adapters::clock::{OsEntropy, SystemClock};
use crate::adapters::dedup_memory::MemoryDedup;
use crate::adapters::dedup_redis::RedisDedup;
use crate::adapters::http::ReqwestTransport;
use crate::adapters::lease_pg::Fence;
use crate::adapters::mirror_pg::PgMirror;
use crate::adapters::nats::{self, NatsSource};
use crate::adapters::store::SqlStore;
use crate::cluster::{self, Layout, LeaseClock};
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

/// The pipeline's settings from the configuration, for one of `shares` partitions: each gets
/// its share of `engine.max_in_flight`, `engine.idle_state_cache_mb` and each target's
/// `max_concurrency`, so that the bounds hold for all of one engine's partitions together (and
/// for all engines together, once the partitions are spread).
pub fn pipeline_settings(config: &Config, secrets: &Secrets, shares: u32) -> PipelineSettings {
    let shares = shares.max(1) as usize;
    let target = |side: Origin| -> Option<TargetSettings> {
        let (target, _) = config.targets.side(side);
        let keyring = secrets.target(side)?.clone();
        let mut settings = target_settings(target, keyring);
        settings.max_concurrency = settings.max_concurrency.div_ceil(shares);
        target.enabled.then_some(settings)
    };
    let mut settings = PipelineSettings {
        max_in_flight: config.engine.max_in_flight.div_ceil(shares),
        user_idle_timeout: config.engine.user_idle_timeout,
        idle_cache_bytes: (config.engine.idle_state_cache_mb << 20) / shares,
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
    let live = server::Live::default();
    let figures = Arc::new(cluster::Figures::default());
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
            cluster: figures.clone(),
            ingest_requests,
        },
        ingest,
    )
    .await?;
    let nats_client = nats::connect_until_up(&config.nats, &secrets.nats).await?;
    let _ = nats_slot.set(nats_client.clone());
    let js = async_nats::jetstream::new(nats_client.clone());
    let _ = js_slot.set(js.clone());
    let layout = Layout::of(config.cluster.partitions);
    if let Layout::Partitioned(n) = layout {
        nats::check_mapping(&nats_client, &config.nats, n).await?;
    }

    let sql = SqlStore::connect(&config.store.url).await?;
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
    let _ = backends.set(crate::server::Backends {
        store: sql.clone(),
        redis,
    });
    let mirror = match config.mirror.enabled {
        true => Some(Arc::new(PgMirror::connect(&config.mirror).await?)),
        false => None,
    };
    let settings = Arc::new(pipeline_settings(&config, &secrets, layout.count()));
    let shop = Workshop {
        config: config.clone(),
        js,
        store: sql.clone(),
        dedup,
        http: Arc::new(ReqwestTransport::new(&config.targets)?),
        clock,
        stats,
        settings,
        mirror,
        live,
    };
    tracing::info!(
        message = "Engine running.",
        better_auth_stream = %nats::stream_name(&config.nats, protocol::Origin::BetterAuth),
        payload_stream = %nats::stream_name(&config.nats, protocol::Origin::Payload),
        partitions = config.cluster.partitions,
        listen = %config.http.listen,
        store = %store_kind(&config.store.url),
        dedup = ?config.dedup.backend,
        events_held_at_most = shop.settings.max_in_flight * layout.count() as usize,
    );
    let outcome = if config.store.url.starts_with("sqlite:") {
        run_alone(&shop, &ready, shutdown, config.engine.shutdown_grace).await
    } else {
        ready.store(true, Ordering::Relaxed);
        let leases = cluster::LeaseSettings {
            url: config.store.url.clone(),
            scope: config.nats.stream.clone(),
            member: member_name(&config.cluster.member),
            ttl: config.cluster.lease_ttl,
            layout,
        };
        tracing::info!(message = "Taking leases.", member = %leases.member, lease_ttl = ?leases.ttl);
        cluster::Coordinator::new(&shop, leases, figures)
            .run(shutdown, config.engine.shutdown_grace)
            .await;
        Ok(())
    };
    ready.store(false, Ordering::Relaxed);
    // The user actors are stopped; what they queued without waiting is written before exit.
    sql.flush().await;
    let _ = nats_client.flush().await;
    for server in servers {
        server.abort();
    }
    tracing::info!(message = "Stopped.");
    outcome
}

/// One engine on a store no other engine shares (SQLite): no lease, the whole stream pair.
async fn run_alone(
    shop: &Workshop,
    ready: &AtomicBool,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> anyhow::Result<()> {
    let mut work = shop.start_work(None, None, None).await?;
    ready.store(true, Ordering::Relaxed);
    tokio::select! {
        _ = shutdown => {}
        _ = &mut work.pipeline.handle => {
            // Its supervisor gave up (a part of it failed over and over): exit non-zero, so
            // the service manager restarts the engine, which resumes from the ack floors.
            anyhow::bail!("the actor pipeline stopped: one of its parts kept failing; exiting so that the engine is restarted");
        }
    }
    ready.store(false, Ordering::Relaxed);
    shop.stop_work(work, Some(grace)).await;
    Ok(())
}

/// `cluster.member`, or `<host name>-<process id>`.
fn member_name(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "engine".into());
    format!("{host}-{}", std::process::id())
}

/// What every partition's work shares, and how it is started and stopped.
struct Workshop {
    config: Config,
    js: async_nats::jetstream::Context,
    store: SqlStore,
    dedup: Arc<dyn DedupStore>,
    http: Arc<dyn HttpTransport>,
    clock: Arc<SystemClock>,
    stats: Arc<Stats>,
    /// Each partition's share of the budgets.
    settings: Arc<PipelineSettings>,
    mirror: Option<Arc<PgMirror>>,
    live: server::Live,
}

/// Consumers by durable name.
type Named = Vec<(String, async_nats::jetstream::consumer::PullConsumer)>;

/// One partition's work (or the whole stream pair's): its consumers and its actor pipeline.
struct Work {
    key: i32,
    pipeline: Pipeline,
    store: SqlStore,
}

impl Workshop {
    async fn start_work(
        &self,
        part: Option<u32>,
        fence: Option<Fence>,
        clock: Option<LeaseClock>,
    ) -> anyhow::Result<Work> {
        let (sources, mirror, named) = self.sources(part, fence.as_ref()).await?;
        let store = match &fence {
            Some(fence) => self
                .store
                .fenced(fence.clone())
                .unwrap_or_else(|| self.store.clone()),
            None => self.store.clone(),
        };
        let http: Arc<dyn HttpTransport> = match clock {
            Some(clock) => Arc::new(cluster::LeasedTransport {
                inner: self.http.clone(),
                clock,
            }),
            None => self.http.clone(),
        };
        let ports = Ports {
            clock: self.clock.clone(),
            entropy: Arc::new(OsEntropy::default()),
            dedup: self.dedup.clone(),
            store: Arc::new(store.clone()),
            http,
            chaos: Arc::new(actors::ports::NoChaos),
        };
        let pipeline = Pipeline::start(PipelineArgs {
            ports,
            settings: self.settings.clone(),
            sources,
            stats: self.stats.clone(),
            mirror,
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the pipeline: {e}"))?;
        let key = fence
            .as_ref()
            .map_or(crate::adapters::lease_pg::WHOLE, |f| f.partition);
        let in_flight = pipeline.in_flight_gauge();
        let consumers = named;
        self.live.insert(
            key,
            server::LiveSources {
                in_flight,
                consumers,
            },
        );
        Ok(Work {
            key,
            pipeline,
            store,
        })
    }

    /// Partition `part`'s streams, and a source on each of its consumers (the mirror's too),
    /// with the consumers by name for `/metrics`.
    async fn sources(
        &self,
        part: Option<u32>,
        fence: Option<&Fence>,
    ) -> anyhow::Result<(
        Vec<(Sink, Arc<dyn EventSource>)>,
        Option<MirrorPorts>,
        Named,
    )> {
        let nats = &self.config.nats;
        let streams = nats::ensure_part_streams(&self.js, nats, part).await?;
        let held_max = self.config.engine.max_in_flight;
        let mut named = Vec::new();
        let mut sources: Vec<(Sink, Arc<dyn EventSource>)> = Vec::new();
        for sink in Sink::ALL {
            let base = nats::part_consumer_name(&nats.durable_prefix, sink.as_str(), part);
            let stream = streams.of(sink.source());
            let consumer = self.consumer(stream, &base, fence, held_max).await?;
            sources.push((
                sink,
                Arc::new(NatsSource::new(&consumer, FETCH_BATCH).await?),
            ));
            named.push((consumer.cached_info().name.clone(), consumer));
        }
        let Some(table) = &self.mirror else {
            return Ok((sources, None, named));
        };
        let base = nats::part_consumer_name(&nats.durable_prefix, "mirror", part);
        let stream = streams.of(protocol::Origin::BetterAuth);
        let consumer = self.consumer(stream, &base, fence, held_max).await?;
        let mirror = MirrorPorts {
            source: Arc::new(NatsSource::new(&consumer, FETCH_BATCH).await?),
            store: table.clone(),
            default_organization_id: self.config.mirror.default_organization_id.clone(),
        };
        named.push((consumer.cached_info().name.clone(), consumer));
        Ok((sources, Some(mirror), named))
    }

    /// The consumer `base`: taken over under a lease, or found (and recovered) when alone.
    async fn consumer(
        &self,
        stream: &async_nats::jetstream::stream::Stream,
        base: &str,
        fence: Option<&Fence>,
        held_max: usize,
    ) -> anyhow::Result<async_nats::jetstream::consumer::PullConsumer> {
        let nats = &self.config.nats;
        match fence {
            Some(fence) => {
                nats::take_over_consumer(stream, nats, base, fence.token, held_max).await
            }
            None => nats::ensure_named_consumer(stream, nats, base.to_string(), held_max).await,
        }
    }

    async fn stop_work(&self, work: Work, grace: Option<Duration>) {
        self.live.remove(work.key);
        match grace {
            Some(grace) => {
                let left = work.pipeline.shutdown(grace).await;
                if left > 0 {
                    tracing::warn!(
                        message = "Grace over; unfinished messages go back to NATS.",
                        n_left = left
                    );
                }
            }
            // Killed because its lease is gone: nothing waits for its last saves, which
            // commit under its fence or fail.
            None => return work.pipeline.kill().await,
        }
        // What the stopped actors queued without waiting is written before the lease passes on.
        if tokio::time::timeout(grace.unwrap_or_default(), work.store.flush())
            .await
            .is_err()
        {
            tracing::warn!(message = "The last saves of a stopped partition did not commit within the grace; its unacknowledged messages go to its next holder.");
        }
    }
}

impl cluster::Works for &Workshop {
    type Work = Work;

    async fn start(
        &self,
        part: Option<u32>,
        fence: Fence,
        clock: LeaseClock,
    ) -> anyhow::Result<Work> {
        self.start_work(part, Some(fence), Some(clock)).await
    }

    async fn stop(&self, work: Work, grace: Option<Duration>) {
        self.stop_work(work, grace).await
    }

    fn failed(&self, work: &Work) -> bool {
        work.pipeline.handle.is_finished()
    }
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
    use super::{effective_in_flight, pipeline_settings};
    use crate::config::Config;
    use protocol::Origin;

    #[test]
    fn each_partition_gets_its_share_of_the_budgets() {
        let config = Config::load(None, Vec::new()).expect("the defaults");
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string();
        let secrets = config
            .validate(|name| name.ends_with("_SECRET").then(|| secret.clone()))
            .expect("valid");
        let whole = pipeline_settings(&config, &secrets, 1);
        let part = pipeline_settings(&config, &secrets, 16);
        assert_eq!(part.idle_cache_bytes, whole.idle_cache_bytes / 16);
        let concurrency = |s: &actors::settings::PipelineSettings| {
            s.target(Origin::Payload).map(|t| t.max_concurrency)
        };
        assert_eq!(concurrency(&part), Some(16), "256 over 16 partitions");
        assert_eq!(concurrency(&whole), Some(256));
        assert_eq!(part.max_in_flight, 256, "at least one fetch batch each");
    }

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
