//! One module per subcommand. Each returns an exit code; errors are printed here, once.

mod backfill;
mod check_config;
mod dlq;
pub mod publish;
mod reconcile;
mod reconcile_schedule;
mod run;
mod sign;
mod simulate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::{Cli, Command, ConfigArg};
use crate::config::{Config, ConfigError, Secrets};

pub fn dispatch(cli: Cli) -> ExitCode {
    // Every TLS connection (HTTP targets, NATS, Redis, PostgreSQL) uses rustls with ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
        Command::CheckConfig(args) => check_config::run(&args),
        Command::Sign(args) => sign::run(&args),
        Command::Publish(args) => publish::run(&args),
        Command::Dlq(args) => dlq::run(&args),
        Command::Simulate(args) => simulate::run(&args),
        Command::Backfill(args) => backfill::run(&args),
        Command::Reconcile(args) => reconcile::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", crate::redact::text(&format!("{error:#}")));
            ExitCode::FAILURE
        }
    }
}

/// A multi-threaded runtime for the commands that do I/O.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

/// The file to read: the one given, else `./config.toml` when present, else none (defaults).
pub fn config_path(args: &ConfigArg) -> Option<PathBuf> {
    match &args.config {
        Some(path) => Some(path.clone()),
        None => {
            let default = Path::new(ConfigArg::DEFAULT_PATH);
            default.exists().then(|| default.to_path_buf())
        }
    }
}

/// Loads and validates the configuration from the file and the process environment.
pub fn load_config(args: &ConfigArg) -> Result<(Config, Secrets), ConfigError> {
    let config = Config::load(config_path(args).as_deref(), std::env::vars())?;
    let secrets = config.validate(|name| std::env::var(name).ok())?;
    Ok((config, secrets))
}
