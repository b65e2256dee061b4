//! The command line. Each subcommand's `--help` is its reference.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Keeps Better Auth and Payload CMS users in step through NATS JetStream and signed webhooks.
#[derive(Debug, Parser)]
#[command(name = "sync-engine", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the engine: consume events from NATS and deliver signed webhooks.
    Run(ConfigArg),
    /// Validate the configuration and print it (secrets redacted); exit 0 if usable, 1 if not.
    CheckConfig(ConfigArg),
    /// Print the headers a delivery of FILE would carry, for debugging a receiver.
    Sign(SignArgs),
    /// Publish one well-formed event to the stream (a manual test event).
    Publish(PublishArgs),
    /// List, replay or purge dead letters.
    Dlq(DlqArgs),
    /// Run the deterministic simulation: the real actors against a seeded world of faults.
    Simulate(SimulateArgs),
    /// Publish a `user.created` event for every user already in Better Auth's user table
    /// (once: deterministic event ids and a checkpoint make a second run a no-op).
    Backfill(BackfillArgs),
    /// Compare Better Auth's user table with Payload's users table; exit 0 when in sync, 1 when
    /// they differ, 2 on error. With `--fix`, publish the events that bring Payload in line.
    Reconcile(ReconcileArgs),
}

#[derive(Debug, Clone, Args)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Better Auth's database: `sqlite://path/to/auth.db` or `postgres://user@host/db`.
    #[arg(long, value_name = "URL")]
    pub from_better_auth: String,
    /// Better Auth's user table (`schema.table` in PostgreSQL for one outside the search path).
    #[arg(long, default_value = "user")]
    pub table: String,
    /// At most this many publishes per second, e.g. `500` or `500/s`.
    #[arg(long, value_name = "N/s", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Read and check every user, publish nothing, report what would be published.
    #[arg(long)]
    pub dry_run: bool,
    /// Stop after publishing this many users (the checkpoint is kept: the next run goes on).
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Forget the checkpoint and start from the first user (the events keep their ids, so the
    /// engine still skips the ones it remembers).
    #[arg(long)]
    pub restart: bool,
    /// Publishes awaiting JetStream's acknowledgement at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub in_flight: u32,
}

/// `500`, `500/s` or `2.5/s`: publishes per second, more than zero.
fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches("/s");
    match number.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a rate: expected publishes per second such as 500 or 500/s"
        )),
    }
}

#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Better Auth's database: `sqlite://…` or `postgres://…`.
    #[arg(long, value_name = "URL")]
    pub better_auth: String,
    /// Payload's database: `sqlite://…` or `postgres://…`.
    #[arg(long, value_name = "URL")]
    pub payload: String,
    /// Better Auth's user table.
    #[arg(long, default_value = "user")]
    pub ba_table: String,
    /// Payload's users table (columns in snake_case, as Payload's SQL adapters name them).
    #[arg(long, default_value = "users")]
    pub payload_table: String,
    /// Publish the events that bring Payload in line with Better Auth: `user.created` for
    /// missing users, `user.updated` for differing ones, `user.deleted` for extra ones, each
    /// followed by a resync request (`user.resync`).
    #[arg(long)]
    pub fix: bool,
    /// One JSON object with the arrays `missing`, `extra` and `differing` (and `fixes`); with
    /// `--every`, one such object per line and pass.
    #[arg(long)]
    pub json: bool,
    /// Run a pass every DURATION (e.g. `1h`, `15m`) until stopped (SIGTERM or Ctrl-C), serving
    /// the passes' metrics on `--listen`; exits 0 when stopped.
    #[arg(long, value_name = "DURATION", value_parser = parse_every)]
    pub every: Option<std::time::Duration>,
    /// With `--every`: where `/metrics` (Prometheus text) is served.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9466")]
    pub listen: std::net::SocketAddr,
}

/// A pause between scheduled passes: a duration such as `1h` or `30s`, at least one second.
fn parse_every(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(every) if every >= std::time::Duration::from_secs(1) => Ok(every),
        Ok(_) => Err(format!("{text:?} is too short: at least 1s between passes")),
        Err(error) => Err(format!(
            "{text:?} is not a duration such as 1h or 15m: {error}"
        )),
    }
}

#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Run this one seed.
    #[arg(long, conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// Run this many consecutive seeds.
    #[arg(long)]
    pub seeds: Option<u64>,
    /// The first seed of `--seeds`.
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Workload actions per seed (local edits, deletions, duplicates, bad messages).
    #[arg(long, default_value_t = 200)]
    pub events: u64,
    /// `swarm` (fault rates drawn from the seed), `calm` (no faults) or `storm` (all faults at
    /// their maximum).
    #[arg(long, default_value = "swarm")]
    pub profile: String,
    /// Run every seed twice and compare the trace hashes; on a difference, show the first
    /// differing trace entry.
    #[arg(long)]
    pub check_determinism: bool,
    /// Write the canonical trace of the seed to FILE (with `--seed`).
    #[arg(long, value_name = "FILE", requires = "seed")]
    pub trace_out: Option<PathBuf>,
    /// A deliberately broken engine, to see the simulator catch it: mark-before-delivery,
    /// ack-before-durable, unordered, skip-merge, no-echo-suppression, echo-last-only,
    /// no-resync, fail-on-store-error, ignore-resync-requests.
    #[arg(long, default_value = "correct", hide = true)]
    pub variant: String,
    /// Seeds run at once, each on its own thread (default: one per core). The verdicts and the
    /// hashes do not depend on it.
    #[arg(long)]
    pub jobs: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Which application the event claims to come from.
    #[arg(long, value_parser = ["better-auth", "payload"])]
    pub origin: String,
    /// The change, or `user.resync`: a resync request, which asks the engine to send its user
    /// to the other side than `--origin`, whatever it believes that side holds.
    #[arg(long = "type", value_parser = ["user.created", "user.updated", "user.deleted", "user.resync"])]
    pub event_type: String,
    /// The Better Auth user id.
    #[arg(long)]
    pub user: String,
    #[arg(long)]
    pub email: Option<String>,
    #[arg(long)]
    pub name: Option<String>,
    /// The event id; a new UUID when left out.
    #[arg(long)]
    pub id: Option<String>,
    /// The commit time in milliseconds since the epoch; now when left out.
    #[arg(long)]
    pub timestamp: Option<i64>,
}

#[derive(Debug, Clone, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Publish dead letters again to their original subject, then remove them.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// The dead letter's id (from `dlq list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters without replaying them.
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArg {
    /// The configuration file. A missing ./config.toml falls back to the built-in defaults;
    /// a path given explicitly must exist.
    #[arg(long, short, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    pub const DEFAULT_PATH: &'static str = "config.toml";
}

#[derive(Debug, Clone, Args)]
pub struct SignArgs {
    /// The environment variable holding the secret(s), e.g. PAYLOAD_WEBHOOK_SECRET.
    #[arg(long, value_name = "VAR")]
    pub secret_env: String,
    /// The delivery id (webhook-id).
    #[arg(long, value_name = "ID")]
    pub id: String,
    /// The delivery time in seconds since the epoch; now when left out.
    #[arg(long, value_name = "SECS")]
    pub timestamp: Option<i64>,
    /// Signing scheme of the receiver.
    #[arg(long, value_name = "SCHEME", default_value = "standard-webhooks")]
    pub signing: String,
    /// The body to sign, byte for byte (`-` for standard input).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}
