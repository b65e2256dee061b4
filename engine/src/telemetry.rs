//! Logging: pretty for people, JSON for pipelines, filtered by `[log] level`.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG`, when set, wins over the configured level.
pub fn init(log: &LogConfig) {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| log.level.clone());
    let filter = EnvFilter::try_new(with_quiet_clients(&directives))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The NATS client logs every connection event at INFO ("event: client error: nats: IO error",
/// once a second while it reconnects); the engine logs each change itself, naming the server,
/// so the client's own lines show only from WARN on unless the filter names it.
fn with_quiet_clients(directives: &str) -> String {
    if directives.contains("async_nats") {
        directives.to_string()
    } else {
        format!("{directives},async_nats=warn")
    }
}
