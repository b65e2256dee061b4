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
