//! `sync-engine run`: the engine.

use std::process::ExitCode;

use crate::cli::ConfigArg;

use super::{load_config, runtime};

pub fn run(args: &ConfigArg) -> anyhow::Result<ExitCode> {
    let (config, secrets) = load_config(args)?;
    crate::telemetry::init(&config.log);
    runtime()?.block_on(crate::runtime::run(
        config,
        secrets,
        crate::runtime::shutdown_signal(),
    ))?;
    Ok(ExitCode::SUCCESS)
}
