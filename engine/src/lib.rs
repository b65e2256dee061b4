//! The `sync-engine` binary's library: configuration, command line, supervision tree and the
//! real adapters (async-nats, redis, reqwest, sqlx) behind the ports of the `actors` crate.
//!
//! Layout:
//! - [`config`]: loading, validation and secret resolution of `config.toml`.
//! - [`cli`]: the command line, one subcommand per module of [`commands`].
//! - [`commands`]: what each subcommand does.
//! - [`telemetry`]: logging setup.

pub mod adapters;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod ingest_http;
pub mod redact;
pub mod runtime;
pub mod server;
pub mod telemetry;
