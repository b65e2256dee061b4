//! `bench <scenario> [options]`: runs one benchmark scenario against the engine binary and
//! prints a Markdown table. See BENCHMARKS.md.

use std::path::PathBuf;
use std::time::Duration;

use bench::config::{Backend, ConfigOptions};
use bench::publisher::Workload;
use bench::scenario::{self, Limits, Options};
use bench::stats::{table, Report};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Scenario {
    /// Publish users × events-per-user first, then start the engine and drain the backlog.
    Drain,
    /// The engine runs; an open-loop publisher at each --rate for --seconds.
    Steady,
    /// A drain where 90 % of the events go to 1 % of the users.
    Skew,
    /// A drain of --events events of one user.
    HotUser,
    /// A drain of one event for each of --users users; RSS sampled every 100k deliveries.
    ManyUsers,
    /// A drain with memory dedup + SQLite, then with Redis dedup + PostgreSQL.
    Backends,
    /// Only the raw limits: NATS consume and HTTP POST rates over --users × --events-per-user.
    Limits,
    /// Several engines (Redis+PostgreSQL, a NATS server of the run's own with the partition
    /// mapping): one unpartitioned engine, then --engines engines on --partitions partitions.
    Cluster,
}

#[derive(Debug, Parser)]
#[command(
    about = "End-to-end benchmark of sync-engine (NATS JetStream → engine → signed webhooks)"
)]
struct Cli {
    scenario: Scenario,
    /// The engine binary (default: sync-engine beside this executable).
    #[arg(long)]
    engine: Option<PathBuf>,
    /// Users (drain 10,000; steady 10,000; skew 10,000; many-users 1,000,000).
    #[arg(long)]
    users: Option<usize>,
    /// Events per user (drain, backends, limits: 20).
    #[arg(long)]
    events_per_user: Option<usize>,
    /// Events in total (skew 200,000; hot-user 10,000).
    #[arg(long)]
    events: Option<usize>,
    /// Open-loop rates in events/s (steady).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,20000")]
    rate: Vec<f64>,
    /// Seconds per rate (steady).
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Approximate size of each event body in bytes.
    #[arg(long, default_value_t = 300)]
    payload_bytes: usize,
    /// Store and dedup backend (drain, steady, skew, hot-user, many-users).
    #[arg(long, value_enum, default_value_t = Backend::Sqlite)]
    backend: Backend,
    /// engine.user_idle_timeout (many-users defaults to 5s).
    #[arg(long)]
    idle_timeout: Option<String>,
    /// targets.*.max_concurrency, also the concurrency of the raw HTTP measurement.
    #[arg(long, default_value_t = 256)]
    max_concurrency: usize,
    /// Give up when nothing was delivered for this many seconds.
    #[arg(long, default_value_t = 60)]
    stall_secs: u64,
    /// Record the engine with `perf record -g` into this file during a drain.
    #[arg(long)]
    perf_out: Option<PathBuf>,
    /// Skip the raw limits after a drain.
    #[arg(long)]
    no_limits: bool,
    /// Engine counts to run (cluster).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    engines: Vec<usize>,
    /// Partitions (cluster).
    #[arg(long, default_value_t = 16)]
    partitions: u32,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli))
}

fn limits_lines(name: &str, report: &Report, limits: &Limits) -> String {
    format!(
        "- {name}: raw NATS consume {:.0} msg/s; raw HTTP POST {:.0} req/s; stateless forwarder {:.0} msg/s; engine ÷ raw HTTP = {:.0} %; engine ÷ forwarder = {:.0} %\n",
        limits.nats_consume_per_sec,
        limits.http_post_per_sec,
        limits.forward_per_sec,
        100.0 * report.events_per_sec / limits.http_post_per_sec,
        100.0 * report.events_per_sec / limits.forward_per_sec
    )
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let idle = cli
        .idle_timeout
        .clone()
        .unwrap_or_else(|| match cli.scenario {
            Scenario::ManyUsers => "5s".to_string(),
            _ => "5m".to_string(),
        });
    let options = Options {
        engine: cli
            .engine
            .clone()
            .unwrap_or_else(bench::engine::default_engine_path),
        config: ConfigOptions {
            backend: cli.backend,
            user_idle_timeout: idle,
            max_concurrency: cli.max_concurrency,
            log_level: "warn".to_string(),
            ..ConfigOptions::default()
        },
        payload_bytes: cli.payload_bytes,
        stall: Duration::from_secs(cli.stall_secs),
        rss_every: matches!(cli.scenario, Scenario::ManyUsers).then_some(100_000),
        perf_out: cli.perf_out.clone(),
    };
    eprintln!("engine: {}", options.engine.display());
    let users = |default: usize| cli.users.unwrap_or(default).max(1);
    let per_user = cli.events_per_user.unwrap_or(20).max(1);
    let limits = !cli.no_limits;
    let mut reports = Vec::new();
    let mut extra = String::new();
    match cli.scenario {
        Scenario::Drain => {
            let workload = Workload::interleaved(users(10_000), per_user);
            let (report, lim) = scenario::drain(&options, "drain", &workload, limits).await?;
            if let Some(lim) = lim {
                extra.push_str(&limits_lines("drain", &report, &lim));
            }
            reports.push(report);
        }
        Scenario::Steady => {
            for &rate in &cli.rate {
                reports.push(scenario::steady(&options, users(10_000), rate, cli.seconds).await?);
            }
        }
        Scenario::Skew => {
            let workload = Workload::skewed(users(10_000), cli.events.unwrap_or(200_000));
            reports.push(
                scenario::drain(&options, "skew 90/1", &workload, false)
                    .await?
                    .0,
            );
        }
        Scenario::HotUser => {
            let workload = Workload::interleaved(1, cli.events.unwrap_or(10_000));
            reports.push(
                scenario::drain(&options, "hot-user", &workload, false)
                    .await?
                    .0,
            );
        }
        Scenario::ManyUsers => {
            let workload = Workload::interleaved(users(1_000_000), 1);
            reports.push(
                scenario::drain(&options, "many-users", &workload, false)
                    .await?
                    .0,
            );
        }
        Scenario::Backends => {
            let workload = Workload::interleaved(users(10_000), per_user);
            for (backend, name) in [
                (Backend::Sqlite, "drain memory+SQLite"),
                (Backend::Postgres, "drain Redis+PostgreSQL"),
            ] {
                let mut options = options.clone();
                options.config.backend = backend;
                let (report, lim) = scenario::drain(&options, name, &workload, limits).await?;
                if let Some(lim) = lim {
                    extra.push_str(&limits_lines(name, &report, &lim));
                }
                reports.push(report);
            }
        }
        Scenario::Cluster => {
            let nats = tests::servers::NatsServer::start(&tests::servers::partition_mapping(
                cli.partitions,
            ));
            let workload = Workload::interleaved(users(10_000), per_user);
            let mut runs = vec![(0, 1)];
            runs.extend(cli.engines.iter().map(|k| (cli.partitions, (*k).max(1))));
            for (partitions, engines) in runs {
                let mut options = options.clone();
                options.config.backend = Backend::Postgres;
                options.config.nats_url = nats.url();
                options.config.partitions = partitions;
                let name = match partitions {
                    0 => "1 engine, unpartitioned".to_string(),
                    n => format!("{engines} engine(s), {n} partitions"),
                };
                reports.push(scenario::cluster_drain(&options, &name, &workload, engines).await?);
            }
        }
        Scenario::Limits => {
            let workload = Workload::interleaved(users(10_000), per_user);
            let tracker = bench::receiver::Tracker::new(0, 0);
            let receiver = bench::receiver::Receiver::start(tracker.clone()).await?;
            let js = bench::connect_nats().await?;
            let setup = bench::config::Setup::new(receiver.addr, options.config.clone()).await?;
            setup.ensure_stream(&js).await?;
            let pub_tracker = bench::receiver::Tracker::new(workload.events(), workload.users);
            let mut maker =
                bench::publisher::EventMaker::new(&setup.run, workload.users, cli.payload_bytes);
            let secs =
                bench::publisher::publish_all(&js, &workload, &mut maker, &pub_tracker).await?;
            // The raw figures read Better Auth's stream, which holds half the events.
            let ba_stream = setup.stream_of(protocol::Origin::BetterAuth);
            let ba_events = workload.better_auth_events();
            let nats = scenario::nats_consume_rate(&js, &ba_stream, ba_events).await;
            let http = scenario::http_post_rate(
                receiver.addr,
                &tracker,
                workload.events().min(200_000),
                cli.max_concurrency,
                cli.payload_bytes,
            )
            .await;
            let forward = scenario::forward_rate(
                &js,
                &ba_stream,
                receiver.addr,
                &tracker,
                ba_events.min(200_000),
                cli.max_concurrency,
            )
            .await;
            setup.cleanup(&js).await;
            println!(
                "- publish (JetStream, acks pipelined): {:.0} msg/s\n- raw NATS consume: {:.0} msg/s\n- raw HTTP POST: {:.0} req/s\n- stateless forwarder (consume, sign, POST, ack): {:.0} msg/s",
                workload.events() as f64 / secs,
                nats?,
                http?,
                forward?
            );
            return Ok(());
        }
    }
    print!("{}", table(&reports));
    print!("{extra}");
    let wrong: Vec<&str> = reports
        .iter()
        .filter(|r| !r.correct())
        .map(|r| r.scenario.as_str())
        .collect();
    if !wrong.is_empty() {
        anyhow::bail!("not every event was delivered exactly once in order: {wrong:?}");
    }
    Ok(())
}
