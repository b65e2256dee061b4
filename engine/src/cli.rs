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
    /// no-resync.
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
    /// The change.
    #[arg(long = "type", value_parser = ["user.created", "user.updated", "user.deleted"])]
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
