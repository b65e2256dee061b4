//! The scenarios: each sets up its own world (stream, engine, receiver), runs, and reports.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;

use crate::config::{ConfigOptions, Setup};
use crate::engine::EngineProcess;
use crate::publisher::{publish_all, publish_at_rate, EventMaker, Workload};
use crate::receiver::{Receiver, Tracker};
use crate::stats::{load_1m, percentile, Report};

/// What every scenario shares.
#[derive(Debug, Clone)]
pub struct Options {
    pub engine: PathBuf,
    pub config: ConfigOptions,
    pub payload_bytes: usize,
    /// Give up when no delivery arrived for this long.
    pub stall: Duration,
    /// Print (and note) the engine's RSS each time this many more events were delivered.
    pub rss_every: Option<usize>,
    /// Record the engine with `perf record -g` into this file while it drains.
    pub perf_out: Option<PathBuf>,
}

/// The raw rates measured beside a drain, in the same run and against the same receiver.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub nats_consume_per_sec: f64,
    pub http_post_per_sec: f64,
    /// A stateless forwarder's rate ([`forward_rate`]): the two limits in one process.
    pub forward_per_sec: f64,
}

/// One scenario's world, from the receiver to the engine.
struct World {
    tracker: Arc<Tracker>,
    receiver: Receiver,
    setup: Setup,
    js: async_nats::jetstream::Context,
    maker: EventMaker,
}

impl World {
    async fn new(options: &Options, workload: &Workload) -> anyhow::Result<World> {
        let js = crate::connect_nats_at(&options.config.nats_url).await?;
        let tracker = Tracker::new(workload.events(), workload.users);
        let receiver = Receiver::start(tracker.clone()).await?;
        let setup = Setup::new(receiver.addr, options.config.clone()).await?;
        setup.ensure_stream(&js).await?;
        let maker = EventMaker::new(&setup.run, workload.users, options.payload_bytes);
        Ok(World {
            tracker,
            receiver,
            setup,
            js,
            maker,
        })
    }
}

/// Waits until `expected` distinct events arrived or nothing arrived for `options.stall`;
/// samples the engine's RSS every `options.rss_every` deliveries.
async fn wait_delivered(
    options: &Options,
    tracker: &Tracker,
    engine: &EngineProcess,
    expected: usize,
    notes: &mut Vec<String>,
) {
    let mut last = 0u64;
    let mut last_progress = Instant::now();
    let mut next_sample = options.rss_every.unwrap_or(usize::MAX);
    let mut samples = Vec::new();
    loop {
        let now = tracker.unique.load(Relaxed);
        while now as usize >= next_sample {
            let rss = engine.rss_mb();
            eprintln!("  delivered {next_sample}: engine RSS {rss:.0} MB");
            samples.push(format!("{}k: {rss:.0}", next_sample / 1000));
            next_sample = next_sample.saturating_add(options.rss_every.unwrap_or(usize::MAX));
        }
        if now as usize >= expected {
            break;
        }
        if now != last {
            last = now;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > options.stall {
            notes.push(format!(
                "STALLED: {} of {expected} delivered, none for {:?}",
                now, options.stall
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !samples.is_empty() {
        notes.push(format!(
            "engine RSS MB at delivered: {}",
            samples.join(", ")
        ));
    }
}

/// What was measured when a scenario's measurement began.
struct Start {
    engine_cpu: f64,
    load: f64,
    /// Busy seconds of the machine and of this process.
    machine: (f64, f64),
}

/// Busy seconds of the machine and of this process, to subtract at the end.
fn machine_now() -> (f64, f64) {
    let tck = crate::engine::clock_ticks();
    (
        crate::stats::machine_busy_secs(tck),
        crate::stats::process_cpu_secs("self", tck),
    )
}

/// Fills in the delivery side of a report from the tracker and the engine.
async fn finish(
    name: &str,
    tracker: &Tracker,
    engine: &mut EngineProcess,
    events: usize,
    start: Start,
    notes: Vec<String>,
) -> Report {
    let Start {
        engine_cpu: cpu_before,
        load: load_before,
        machine: machine_before,
    } = start;
    let tck = engine.clk_tck();
    let others_cpu_secs = (crate::stats::machine_busy_secs(tck) - machine_before.0)
        - (crate::stats::process_cpu_secs("self", tck) - machine_before.1)
        - (engine.cpu_seconds() - cpu_before);
    // Deliveries after the last expected one (duplicates, resyncs) would come within moments.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dead_letters = engine
        .metric_sum("sync_engine_dead_letters_total")
        .await
        .map_or(u64::MAX, |v| v as u64);
    let engine_cpu_secs = engine.cpu_seconds() - cpu_before;
    let peak_rss_mb = engine.peak_rss_mb();
    let (latencies, span) = tracker.latencies();
    let delivered = tracker.unique.load(Relaxed) as usize;
    let seconds = span.map_or(0.0, |(a, b)| (b - a) as f64 / 1e9);
    let q = |q: f64| percentile(&latencies, q).map(|ns| ns as f64 / 1e6);
    let mut notes = notes;
    if !engine.stop() {
        notes.push("engine did not exit 0 on SIGTERM".to_string());
    }
    if let Some(summary) = log_summary(&engine.log()) {
        notes.push(summary);
    }
    Report {
        scenario: name.to_string(),
        events,
        delivered,
        seconds,
        events_per_sec: if seconds > 0.0 {
            delivered.saturating_sub(1) as f64 / seconds
        } else {
            0.0
        },
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        max_ms: q(1.0),
        engine_cpu_secs,
        peak_rss_mb,
        duplicates: tracker.duplicates.load(Relaxed),
        order_violations: tracker.order_violations.load(Relaxed),
        dead_letters,
        unexpected: tracker.unexpected.load(Relaxed),
        bad_signatures: tracker.bad_signatures.load(Relaxed),
        to_payload: tracker.to_payload.load(Relaxed),
        to_better_auth: tracker.to_better_auth.load(Relaxed),
        load_before,
        load_after: load_1m(),
        others_cpu_secs,
        notes,
    }
}

/// The engine's warn/error log lines (JSON), counted by level, target and message; the top 3.
fn log_summary(log: &str) -> Option<String> {
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    let mut total = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        total += 1;
        let key = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => format!(
                "{} {}: {}",
                v["level"].as_str().unwrap_or("?"),
                v["target"].as_str().unwrap_or("?"),
                v["message"].as_str().unwrap_or("?")
            ),
            Err(_) => line.chars().take(160).collect(),
        };
        *counts.entry(key).or_default() += 1;
    }
    if total == 0 {
        return None;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    let top: Vec<String> = counts
        .iter()
        .take(3)
        .map(|(k, n)| format!("{n}× {k}"))
        .collect();
    Some(format!(
        "engine logged {total} warn/error line(s): {}",
        top.join("; ")
    ))
}

/// Publishes the whole workload, then starts the engine and waits until it delivered all of
/// it; events/s is from the first to the last delivery. With `limits`, afterwards measures the
/// raw NATS consume rate on the same stream and the raw HTTP POST rate against the same
/// receiver.
pub async fn drain(
    options: &Options,
    name: &str,
    workload: &Workload,
    limits: bool,
) -> anyhow::Result<(Report, Option<Limits>)> {
    in_world(options, workload, async |world| {
        drain_in(options, name, workload, limits, world).await
    })
    .await
}

/// Publishes the whole workload into the world's streams; the seconds it took.
async fn publish_workload(
    name: &str,
    workload: &Workload,
    world: &mut World,
) -> anyhow::Result<f64> {
    let events = workload.events();
    eprintln!(
        "{name}: publishing {events} events for {} users",
        workload.users
    );
    publish_all(&world.js, workload, &mut world.maker, &world.tracker).await
}

/// Runs `run` in a fresh world, and cleans the world up whatever it returns.
async fn in_world<T>(
    options: &Options,
    workload: &Workload,
    run: impl AsyncFnOnce(&mut World) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut world = World::new(options, workload).await?;
    let result = run(&mut world).await;
    world.setup.cleanup(&world.js).await;
    result
}

async fn drain_in(
    options: &Options,
    name: &str,
    workload: &Workload,
    limits: bool,
    world: &mut World,
) -> anyhow::Result<(Report, Option<Limits>)> {
    let events = workload.events();
    let publish_secs = publish_workload(name, workload, world).await?;
    let mut notes = vec![format!(
        "published in {publish_secs:.1} s ({:.0}/s) before the engine started; latency includes the wait in the backlog",
        events as f64 / publish_secs
    )];
    let load_before = load_1m();
    let machine_before = machine_now();
    eprintln!("{name}: starting the engine (load {load_before:.2})");
    let mut engine = EngineProcess::start(&options.engine, &world.setup).await?;
    eprintln!("{name}: engine pid {}", engine.pid);
    let perf = match &options.perf_out {
        Some(out) => Some(
            std::process::Command::new("perf")
                .args(["record", "-g", "-F", "499", "-o"])
                .arg(out)
                .args(["-p", &engine.pid.to_string()])
                .stdout(std::process::Stdio::null())
                .spawn()
                .context("spawn perf record")?,
        ),
        None => None,
    };
    wait_delivered(options, &world.tracker, &engine, events, &mut notes).await;
    if let Some(mut perf) = perf {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
    }
    let report = finish(
        name,
        &world.tracker,
        &mut engine,
        events,
        Start {
            engine_cpu: 0.0,
            load: load_before,
            machine: machine_before,
        },
        notes,
    )
    .await;
    let limits = if limits {
        eprintln!("{name}: measuring the raw limits");
        // The raw figures read Better Auth's stream, which holds half the events.
        let ba_stream = world.setup.stream_of(protocol::Origin::BetterAuth);
        let ba_events = workload.better_auth_events();
        let nats = nats_consume_rate(&world.js, &ba_stream, ba_events).await?;
        let http = http_post_rate(
            world.receiver.addr,
            &world.tracker,
            events.min(200_000),
            options.config.max_concurrency,
            options.payload_bytes,
        )
        .await?;
        // The drain's own figures stand without it: a failed forwarder reads NaN.
        let forward = forward_rate(
            &world.js,
            &ba_stream,
            world.receiver.addr,
            &world.tracker,
            ba_events.min(200_000),
            options.config.max_concurrency,
        )
        .await
        .unwrap_or_else(|error| {
            eprintln!("{name}: the stateless forwarder failed: {error:#}");
            f64::NAN
        });
        Some(Limits {
            nats_consume_per_sec: nats,
            http_post_per_sec: http,
            forward_per_sec: forward,
        })
    } else {
        None
    };
    Ok((report, limits))
}

/// `engines` engines as separate processes share the work (they hold leases in the run's
/// PostgreSQL store); once they hold every partition between them, the whole workload is
/// published at once and drained. events/s is from the first to the last delivery; CPU and
/// RSS are the first engine's, the others' CPU is in the notes.
pub async fn cluster_drain(
    options: &Options,
    name: &str,
    workload: &Workload,
    engines: usize,
) -> anyhow::Result<Report> {
    in_world(options, workload, async |world| {
        cluster_drain_in(options, name, workload, engines, world).await
    })
    .await
}

async fn cluster_drain_in(
    options: &Options,
    name: &str,
    workload: &Workload,
    engines: usize,
    world: &mut World,
) -> anyhow::Result<Report> {
    let events = workload.events();
    let mut first = EngineProcess::start_member(&options.engine, &world.setup, Some(0)).await?;
    let mut others = Vec::new();
    for n in 1..engines {
        others.push(EngineProcess::start_member(&options.engine, &world.setup, Some(n)).await?);
    }
    let leases = options.config.partitions.max(1) as f64;
    let balanced = Instant::now() + Duration::from_secs(60);
    loop {
        let mut owned = vec![first.metric_sum("sync_engine_partitions_owned").await?];
        for engine in &others {
            owned.push(engine.metric_sum("sync_engine_partitions_owned").await?);
        }
        let share = (leases / engines as f64).floor();
        if owned.iter().sum::<f64>() == leases && owned.iter().all(|o| *o >= share) {
            eprintln!("{name}: {engines} engine(s) hold {owned:?}");
            break;
        }
        anyhow::ensure!(
            Instant::now() < balanced,
            "{name}: never balanced: {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let load_before = load_1m();
    let machine_before = machine_now();
    let first_cpu = first.cpu_seconds();
    let others_cpu: Vec<f64> = others.iter().map(EngineProcess::cpu_seconds).collect();
    let publish_secs = publish_workload(name, workload, world).await?;
    let mut notes = vec![format!(
        "{engines} engine(s) on {} partition(s), sharing this machine's cores; published in {publish_secs:.1} s ({:.0}/s) while they ran",
        options.config.partitions,
        events as f64 / publish_secs
    )];
    wait_delivered(options, &world.tracker, &first, events, &mut notes).await;
    let spent: Vec<String> = others
        .iter()
        .zip(others_cpu)
        .map(|(engine, before)| format!("{:.1}", engine.cpu_seconds() - before))
        .collect();
    if !spent.is_empty() {
        notes.push(format!("the other engines' CPU s: {}", spent.join(", ")));
    }
    for engine in &mut others {
        engine.stop();
    }
    let start = Start {
        engine_cpu: first_cpu,
        load: load_before,
        machine: machine_before,
    };
    Ok(finish(name, &world.tracker, &mut first, events, start, notes).await)
}

/// The engine runs first; events are published open-loop at `rate`/s for `seconds` s over
/// `users` users (round robin).
pub async fn steady(
    options: &Options,
    users: usize,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<Report> {
    let events = ((rate * seconds) as usize).max(1);
    let workload = Workload {
        users,
        order: (0..events).map(|k| (k % users.max(1)) as u32).collect(),
    };
    let mut world = World::new(options, &workload).await?;
    let result = async {
        let load_before = load_1m();
        let machine_before = machine_now();
        let name = format!("steady {rate:.0}/s");
        eprintln!("{name}: {events} events over {seconds} s (load {load_before:.2})");
        let mut engine = EngineProcess::start(&options.engine, &world.setup).await?;
        let cpu_before = engine.cpu_seconds();
        let max_lag = publish_at_rate(
            &world.js,
            &workload,
            &mut world.maker,
            world.tracker.clone(),
            rate,
        )
        .await?;
        let mut notes = vec![format!(
            "open loop over {users} users; publisher's largest lag behind schedule {max_lag:.1} ms"
        )];
        wait_delivered(options, &world.tracker, &engine, events, &mut notes).await;
        Ok(finish(
            &name,
            &world.tracker,
            &mut engine,
            events,
            Start {
                engine_cpu: cpu_before,
                load: load_before,
                machine: machine_before,
            },
            notes,
        )
        .await)
    }
    .await;
    world.setup.cleanup(&world.js).await;
    result
}

/// A pull consumer on `stream` (fetch batches of 256, like the engine, and ack each message,
/// no other work): messages/s over `count` messages.
pub async fn nats_consume_rate(
    js: &async_nats::jetstream::Context,
    stream: &str,
    count: usize,
) -> anyhow::Result<f64> {
    let mut messages = pull_from_start(js, stream, "bench-raw", None).await?;
    let start = Instant::now();
    let mut n = 0;
    while n < count {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .context("raw consumer: no message for 10 s")?;
        let Some(message) = next else { break };
        let message = message.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
        message
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// `count` signed POSTs (keep-alive, `concurrency` in flight, signed at send time as the
/// engine does) to the receiver's `/raw`: requests/s.
pub async fn http_post_rate(
    receiver: std::net::SocketAddr,
    tracker: &Tracker,
    count: usize,
    concurrency: usize,
    payload_bytes: usize,
) -> anyhow::Result<f64> {
    let (client, keyring, url) = raw_target(receiver, concurrency)?;
    let pad = "x".repeat(payload_bytes.saturating_sub(170));
    let before = tracker.raw.load(Relaxed);
    let start = Instant::now();
    let failures = futures::stream::iter(0..count)
        .map(|k| {
            let client = client.clone();
            let keyring = keyring.clone();
            let url = url.clone();
            let id = format!("raw_{k}");
            let body = format!(
                r#"{{"id":"{id}","origin":"better-auth","type":"user.updated","timestamp":{},"data":{{"betterAuthUserId":"u{k}","email":"u{k}@bench.test","fullName":"n0","bio":"{pad}"}}}}"#,
                crate::publisher::now_ms()
            );
            async move {
                post_signed(&client, &keyring, &url, &id, body)
                    .await
                    .is_ok_and(|status| status.is_success())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .filter(|ok| futures::future::ready(!ok))
        .count()
        .await;
    verified_rate(
        "raw POSTs",
        failures,
        tracker.raw.load(Relaxed) - before,
        count,
        start,
    )
}

/// A stateless forwarder, the floor under any engine on this machine: a durable pull consumer
/// on `stream` (batches of 256, like the engine), each message's body signed as a webhook at
/// send time and POSTed to the receiver's `/raw` (keep-alive, `concurrency` in flight), and
/// acknowledged once answered 2xx. No dedup, no state, no per-user order, nothing saved:
/// messages/s over `count` messages.
pub async fn forward_rate(
    js: &async_nats::jetstream::Context,
    stream: &str,
    receiver: std::net::SocketAddr,
    tracker: &Tracker,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let (client, keyring, url) = raw_target(receiver, concurrency)?;
    let max_ack_pending = i64::try_from(concurrency * 4).unwrap_or(i64::MAX);
    let messages = pull_from_start(js, stream, "bench-forward", Some(max_ack_pending)).await?;
    let before = tracker.raw.load(Relaxed);
    let start = Instant::now();
    let forwarded = messages.take(count).enumerate().map(|(k, message)| {
        let client = client.clone();
        let keyring = keyring.clone();
        let url = url.clone();
        async move {
            let message = message.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
            let id = format!("fwd_{k}");
            let status = post_signed(&client, &keyring, &url, &id, message.payload.clone())
                .await
                .context("forward POST")?;
            anyhow::ensure!(status.is_success(), "forward POST: {status}");
            message.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))
        }
    });
    let failures = tokio::time::timeout(
        Duration::from_secs(120),
        forwarded
            .buffer_unordered(concurrency.max(1))
            .filter(|result| futures::future::ready(result.is_err()))
            .count(),
    )
    .await
    .context("forwarder: not done in 120 s")?;
    verified_rate(
        "forwarded messages",
        failures,
        tracker.raw.load(Relaxed) - before,
        count,
        start,
    )
}

/// A durable pull consumer on `stream` from its first message, read in batches of 256 like
/// the engine's.
async fn pull_from_start(
    js: &async_nats::jetstream::Context,
    stream: &str,
    durable: &str,
    max_ack_pending: Option<i64>,
) -> anyhow::Result<async_nats::jetstream::consumer::pull::Stream> {
    use async_nats::jetstream::consumer::pull;
    let stream = js
        .get_stream(stream)
        .await
        .map_err(|e| anyhow::anyhow!("get stream: {e}"))?;
    let mut config = pull::Config {
        durable_name: Some(durable.to_string()),
        ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
        ..Default::default()
    };
    if let Some(max) = max_ack_pending {
        config.max_ack_pending = max;
    }
    let consumer = stream
        .create_consumer(config)
        .await
        .map_err(|e| anyhow::anyhow!("create consumer: {e}"))?;
    consumer
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("pull: {e}"))
}

/// The receiver's `/raw`, with a keep-alive client for `concurrency` requests and the bench's
/// signing keys.
fn raw_target(
    receiver: std::net::SocketAddr,
    concurrency: usize,
) -> anyhow::Result<(reqwest::Client, Arc<protocol::signing::Keyring>, String)> {
    let keyring = Arc::new(crate::receiver::keyring()?);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .context("HTTP client")?;
    Ok((client, keyring, format!("http://{receiver}/raw")))
}

/// POSTs `body` as webhook `id`, signed now, as the engine signs at send time.
async fn post_signed(
    client: &reqwest::Client,
    keyring: &protocol::signing::Keyring,
    url: &str,
    id: &str,
    body: impl Into<reqwest::Body> + AsRef<[u8]>,
) -> Result<reqwest::StatusCode, reqwest::Error> {
    let ts = crate::publisher::now_ms() / 1000;
    let signature = keyring.sign_standard(id, ts, body.as_ref());
    let answer = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await?;
    Ok(answer.status())
}

/// `count` per second since `start`, provided none of them failed and the receiver verified
/// every one (`received`).
fn verified_rate(
    what: &str,
    failures: usize,
    received: u64,
    count: usize,
    start: Instant,
) -> anyhow::Result<f64> {
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(failures == 0, "{failures} {what} failed");
    anyhow::ensure!(
        received as usize == count,
        "receiver verified {received} of {count} {what}"
    );
    Ok(count as f64 / secs)
}
