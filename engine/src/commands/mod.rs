//! One module per subcommand. Each returns an exit code; errors are printed here, once.

mod check_config;
mod sign;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::{Cli, Command, ConfigArg};
use crate::config::{Config, ConfigError, Secrets};

pub fn dispatch(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Run(args) => run_placeholder(&args),
        Command::CheckConfig(args) => check_config::run(&args),
        Command::Sign(args) => sign::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_placeholder(args: &ConfigArg) -> anyhow::Result<ExitCode> {
    let (config, _secrets) = load_config(args)?;
    crate::telemetry::init(&config.log);
    anyhow::bail!("the pipeline is not built yet")
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
