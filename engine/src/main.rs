//! `sync-engine`: keeps Better Auth and Payload CMS users in step. See README.md.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = engine::cli::Cli::parse();
    engine::commands::dispatch(cli)
}
