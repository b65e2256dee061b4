//! `sync-engine`: keeps Better Auth and Payload CMS users in step. See README.md.

use std::process::ExitCode;

use clap::Parser;

/// Per-event work allocates a lot of small, short-lived objects (messages, user states,
/// request bodies); mimalloc serves them markedly faster than the system allocator here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = engine::cli::Cli::parse();
    engine::commands::dispatch(cli)
}
