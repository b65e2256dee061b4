//! A generated engine configuration: everything unique to one run, in a temporary folder.

use protocol::Origin;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use sqlx::Connection as _;

use crate::{NATS_URL, POSTGRES_ADMIN_URL, REDIS_URL};

/// Where the engine keeps dedup ids and sync state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Memory dedup, SQLite store in the run's temp folder.
    Sqlite,
    /// Redis dedup (unique key prefix), PostgreSQL store (a database created for the run).
    Postgres,
}

/// Knobs of the generated configuration.
#[derive(Debug, Clone)]
pub struct ConfigOptions {
    pub backend: Backend,
    pub user_idle_timeout: String,
    pub max_concurrency: usize,
    pub log_level: String,
    /// The NATS server (a server of the run's own for partitions: it needs the mapping).
    pub nats_url: String,
    /// `cluster.partitions` (0: unpartitioned).
    pub partitions: u32,
}

impl Default for ConfigOptions {
    fn default() -> Self {
        ConfigOptions {
            backend: Backend::Sqlite,
            user_idle_timeout: "5m".to_string(),
            max_concurrency: 256,
            log_level: "warn".to_string(),
            nats_url: NATS_URL.to_string(),
            partitions: 0,
        }
    }
}

/// One run's engine world.
pub struct Setup {
    /// Unique token of the run (subjects, consumers, ids, key prefix).
    pub run: String,
    pub stream: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub http: SocketAddr,
    pub options: ConfigOptions,
    postgres_db: Option<String>,
}

/// Environment variables holding the targets' secrets.
pub const PAYLOAD_SECRET_ENV: &str = "BENCH_PAYLOAD_SECRET";
pub const BETTER_AUTH_SECRET_ENV: &str = "BENCH_BETTER_AUTH_SECRET";

impl Setup {
    /// Writes the configuration; the targets are `<receiver>/payload` and `<receiver>/better-auth`.
    pub async fn new(receiver: SocketAddr, options: ConfigOptions) -> anyhow::Result<Setup> {
        let run = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let stream = format!("BENCH_{run}");
        let dir = tempfile::tempdir().context("temp dir")?;
        let http = free_port()?;
        let (store_url, postgres_db) = match options.backend {
            Backend::Sqlite => (format!("sqlite://{}/sync.db", dir.path().display()), None),
            Backend::Postgres => {
                let name = format!("bench_{run}");
                let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL)
                    .await
                    .with_context(|| format!("PostgreSQL must run at {POSTGRES_ADMIN_URL}"))?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .context("create the run's database")?;
                (
                    format!("postgres://postgres@127.0.0.1:5432/{name}"),
                    Some(name),
                )
            }
        };
        let dedup = match options.backend {
            Backend::Sqlite => "memory",
            Backend::Postgres => "redis",
        };
        let config = format!(
            r#"[engine]
user_idle_timeout = "{idle}"
shutdown_grace = "5s"
[nats]
url = "{nats_url}"
stream = "{stream}"
better_auth_subjects = ["b{run}.user.>"]
payload_subjects = ["b{run}.payload.user.>"]
durable_prefix = "b{run}"
[dedup]
backend = "{dedup}"
redis_url = "{REDIS_URL}"
key_prefix = "b{run}:done"
ttl = "15m"
[store]
url = "{store_url}"
[targets.payload]
url = "http://{receiver}/payload"
secret_env = "{PAYLOAD_SECRET_ENV}"
max_concurrency = {conc}
[targets.better_auth]
url = "http://{receiver}/better-auth"
secret_env = "{BETTER_AUTH_SECRET_ENV}"
max_concurrency = {conc}
[http]
listen = "{http}"
{cluster}[log]
format = "json"
level = "{level}"
"#,
            nats_url = options.nats_url,
            // Left out unpartitioned, so an engine from before [cluster] runs the same file.
            cluster = match options.partitions {
                0 => String::new(),
                n => format!("[cluster]\npartitions = {n}\n"),
            },
            idle = options.user_idle_timeout,
            conc = options.max_concurrency,
            level = options.log_level,
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).context("write the engine config")?;
        Ok(Setup {
            run,
            stream,
            dir,
            config_path,
            http,
            options,
            postgres_db,
        })
    }

    /// The subjects `origin` publishes on in this run.
    pub fn subjects(&self, origin: Origin) -> Vec<String> {
        match origin {
            Origin::BetterAuth => vec![format!("b{}.user.>", self.run)],
            Origin::Payload => vec![format!("b{}.payload.user.>", self.run)],
        }
    }

    /// The run's stream of `origin`'s events, named as the engine names it.
    pub fn stream_of(&self, origin: Origin) -> String {
        engine::adapters::nats::stream_name_for(&self.stream, origin)
    }

    /// Creates the streams the way the engine would (each partition's, when partitioned), so
    /// events can be published before it runs.
    pub async fn ensure_stream(&self, js: &async_nats::jetstream::Context) -> anyhow::Result<()> {
        let config = engine::config::Config::load(Some(&self.config_path), Vec::new())
            .map_err(|e| anyhow::anyhow!("the run's configuration: {e}"))?;
        engine::adapters::nats::ensure_layout_streams(js, &config).await
    }

    /// Deletes the streams (and their consumers) and the run's PostgreSQL database.
    pub async fn cleanup(&self, js: &async_nats::jetstream::Context) {
        let parts: Vec<Option<u32>> = match self.options.partitions {
            0 => vec![None],
            n => (0..n).map(Some).collect(),
        };
        for origin in Origin::ALL {
            for part in &parts {
                let name = format!(
                    "{}{}",
                    self.stream_of(origin),
                    part.map(|p| format!("_P{p}")).unwrap_or_default()
                );
                let _ = js.delete_stream(name).await;
            }
        }
        if let Some(name) = &self.postgres_db {
            if let Ok(mut admin) = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await;
            }
        }
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(listener.local_addr()?)
}
