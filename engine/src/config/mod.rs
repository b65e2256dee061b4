//! The engine's configuration: compiled-in defaults ← the TOML file ← `SYNC_ENGINE__SECTION__KEY`
//! environment overrides.
//!
//! The compiled-in defaults are the repository's own `config.toml`, so the commented file users
//! read is, to the letter, what the engine falls back on. Every struct denies unknown keys, and
//! every error names the key it is about.

pub mod duration;
mod error;
mod files;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use protocol::signing::{Keyring, SigningScheme};
use protocol::user::{FieldMapping, Mappings, ID};
use protocol::{Origin, Secret};
use serde::{Deserialize, Serialize};

pub use error::ConfigError;
pub use files::NatsAuth;

/// The commented default configuration, embedded at build time.
pub const DEFAULTS_TOML: &str = include_str!("../../../config.toml");

/// The prefix of environment overrides; `__` separates the levels.
pub const ENV_PREFIX: &str = "SYNC_ENGINE__";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub engine: EngineConfig,
    pub nats: NatsConfig,
    pub dedup: DedupConfig,
    pub store: StoreConfig,
    pub cluster: ClusterConfig,
    pub targets: TargetsConfig,
    pub mirror: MirrorConfig,
    pub http: HttpConfig,
    pub ingest: IngestConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// How long an idle user's state stays in memory before only the store has it.
    #[serde(with = "duration")]
    pub user_idle_timeout: Duration,
    /// MiB of memory for idle users' states, kept serialized between their events.
    pub idle_state_cache_mb: usize,
    /// Events held in memory across all users before ingestion pauses.
    pub max_in_flight: usize,
    /// How long shutdown waits for in-flight deliveries.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Writes this close to an engine delivery may have been overwritten by it (§5.5).
    #[serde(with = "duration")]
    pub clock_skew: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    pub url: String,
    pub stream: String,
    pub better_auth_subjects: Vec<String>,
    pub payload_subjects: Vec<String>,
    pub durable_prefix: String,
    #[serde(with = "duration")]
    pub ack_wait: Duration,
    /// -1 for unlimited: the engine dead-letters by its own retry policy.
    pub max_deliver: i64,
    pub max_message_bytes: usize,
    /// User name for user/password authentication; the password is in `password_env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The environment variable holding the password of `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// The environment variable holding an authentication token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// A file holding an NKey seed (`SU...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey_seed_file: Option<String>,
    /// A `.creds` file (user JWT and NKey seed), as `nsc` writes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<String>,
    /// Refuse a connection that is not TLS even for a `nats://` URL.
    #[serde(default)]
    pub tls_required: bool,
    /// CA certificates (PEM) to trust instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// This client's certificate chain (PEM), for servers that require mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<String>,
    /// The private key (PEM) of `client_cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<String>,
}

/// PEM files of one TLS client: a private CA to trust, and a certificate for mutual TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TlsFiles<'a> {
    pub ca_file: Option<&'a str>,
    pub client_cert_file: Option<&'a str>,
    pub client_key_file: Option<&'a str>,
}

/// An optional key that is set and not empty (an empty value unsets a default from the
/// environment).
pub fn set(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.trim().is_empty())
}

macro_rules! tls_files {
    ($config:ty) => {
        impl $config {
            pub fn tls_files(&self) -> TlsFiles<'_> {
                TlsFiles {
                    ca_file: set(&self.ca_file),
                    client_cert_file: set(&self.client_cert_file),
                    client_key_file: set(&self.client_key_file),
                }
            }
        }
    };
}
tls_files!(NatsConfig);
tls_files!(TargetConfig);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupBackend {
    Memory,
    Redis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    pub backend: DedupBackend,
    /// `redis://` or `rediss://` (TLS); a user name for Redis ACLs goes in the URL.
    pub redis_url: String,
    /// The environment variable holding the Redis password (instead of one in the URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_password_env: Option<String>,
    /// CA certificates (PEM) for a `rediss://` server with a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_ca_file: Option<String>,
    pub key_prefix: String,
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// How many ids the memory backend holds before it evicts the oldest.
    pub memory_capacity: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://path` or `postgres://...`.
    pub url: String,
}

/// Several engines on one set of streams: partitions and leases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// 0: unpartitioned streams; N: N partitions mapped by the NATS server.
    pub partitions: u32,
    /// How long a silent engine keeps its leases.
    #[serde(with = "duration")]
    pub lease_ttl: Duration,
    /// This engine's name; empty: `<host name>-<process id>`.
    pub member: String,
}

/// `cluster.lease_ttl`'s bounds: shorter than 2 s, a garbage collection or a slow commit would
/// cost the leases; longer than 5 min, a dead engine's users would wait that long.
pub const LEASE_TTL_MIN: Duration = Duration::from_secs(2);
pub const LEASE_TTL_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsConfig {
    pub payload: TargetConfig,
    pub better_auth: TargetConfig,
}

impl TargetsConfig {
    /// The target of a side, and its configuration key.
    pub fn side(&self, side: Origin) -> (&TargetConfig, &'static str) {
        match side {
            Origin::Payload => (&self.payload, "targets.payload"),
            Origin::BetterAuth => (&self.better_auth, "targets.better_auth"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub enabled: bool,
    pub url: String,
    pub signing: SigningScheme,
    /// The environment variable holding the secret(s), space-separated while rotating.
    pub secret_env: String,
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub max_concurrency: usize,
    pub coalesce: bool,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
    /// CA certificates (PEM) to trust instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// This client's certificate chain (PEM), for servers that require mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<String>,
    /// The private key (PEM) of `client_cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<String>,
    /// canonical field -> this side's field name.
    pub fields: BTreeMap<String, String>,
    /// This side's bookkeeping fields that are never synced.
    pub local_fields: BTreeSet<String>,
}

impl TargetConfig {
    pub fn mapping(&self) -> FieldMapping {
        FieldMapping {
            fields: self.fields.clone(),
            local: self.local_fields.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(with = "duration")]
    pub initial: Duration,
    #[serde(with = "duration")]
    pub max: Duration,
    pub multiplier: f64,
    pub jitter: f64,
    pub max_attempts: u32,
}

/// `[targets.*.breaker]`: when a target counts as down, and how often it is tried while it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Answers in a row saying the target is down (no connection, timeout, 5xx) before the
    /// circuit opens; 0 never opens it.
    pub failures: u32,
    /// While open, one delivery goes out this often to see whether the target is back.
    #[serde(with = "duration")]
    pub probe_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    Deactivate,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    pub enabled: bool,
    pub url: String,
    pub table: String,
    pub default_organization_id: String,
    pub on_delete: OnDelete,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub enabled: bool,
    /// An address of its own for the ingest endpoints; without it they share `http.listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    pub signing: SigningScheme,
    pub better_auth_secret_env: String,
    pub payload_secret_env: String,
    #[serde(with = "duration")]
    pub tolerance: Duration,
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter: `info`, or `sync_engine=debug,info`.
    pub level: String,
}

/// The secrets a validated configuration resolved from the environment.
#[derive(Debug, Clone)]
pub struct Secrets {
    pub payload: Option<Keyring>,
    pub better_auth: Option<Keyring>,
    pub ingest_better_auth: Option<Keyring>,
    pub ingest_payload: Option<Keyring>,
    /// How the engine authenticates to NATS.
    pub nats: NatsAuth,
    /// The Redis password from `dedup.redis_password_env`.
    pub redis_password: Option<Secret>,
}

impl Secrets {
    pub fn target(&self, side: Origin) -> Option<&Keyring> {
        match side {
            Origin::Payload => self.payload.as_ref(),
            Origin::BetterAuth => self.better_auth.as_ref(),
        }
    }
}

impl Config {
    /// The compiled-in defaults alone.
    pub fn defaults() -> Result<Config, ConfigError> {
        Self::extract(Figment::from(Toml::string(DEFAULTS_TOML)), "defaults")
    }

    /// Defaults ← `path` (when given and present) ← environment overrides from `env`.
    ///
    /// `env` is the process environment in production; tests pass their own.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Self::merged(None, env);
        };
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error: error.to_string(),
        })?;
        Self::merged(Some((&text, &path.display().to_string())), env)
    }

    /// Defaults ← `text`, a configuration file's contents read from `source` ← environment
    /// overrides from `env`.
    pub fn parse(
        text: &str,
        source: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Self::merged(Some((text, source)), env)
    }

    fn merged(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULTS_TOML));
        let mut source = "defaults".to_string();
        if let Some((text, path)) = file {
            figment = figment.merge(Toml::string(text));
            source = path.to_string();
        }
        let overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        if !overrides.is_empty() {
            figment = figment.merge(env_provider(overrides));
            source.push_str(" and SYNC_ENGINE__ environment overrides");
        }
        Self::extract(figment, &source)
    }

    fn extract(figment: Figment, source: &str) -> Result<Config, ConfigError> {
        figment
            .extract::<Config>()
            .map_err(|error| ConfigError::from_figment(error, source))
    }

    /// Cross-field rules and secret resolution. `lookup` reads an environment variable.
    pub fn validate(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Secrets, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_string(),
            message,
        };
        if self.engine.max_in_flight == 0 {
            return Err(invalid("engine.max_in_flight", "must be at least 1".into()));
        }
        if self.engine.idle_state_cache_mb > 1 << 20 {
            return Err(invalid(
                "engine.idle_state_cache_mb",
                "must be at most 1048576 (1 TiB); 0 turns the cache off".into(),
            ));
        }
        if self.engine.user_idle_timeout.is_zero() {
            return Err(invalid(
                "engine.user_idle_timeout",
                "must be longer than 0s".into(),
            ));
        }
        if !self.nats.url.starts_with("nats://") && !self.nats.url.starts_with("tls://") {
            return Err(invalid(
                "nats.url",
                format!(
                    "{:?} is not a nats:// or tls:// URL",
                    crate::redact::url(&self.nats.url)
                ),
            ));
        }
        files::check_tls("nats.", self.nats.tls_files())?;
        let nats_auth = self.nats.auth(&lookup)?;
        if self.nats.stream.is_empty()
            || !self
                .nats
                .stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                "nats.stream",
                "must be a non-empty name of letters, digits, `_` and `-`".into(),
            ));
        }
        for (key, subjects) in self.nats.subjects_by_key() {
            if subjects.is_empty() || subjects.iter().any(|s| s.trim().is_empty()) {
                return Err(invalid(
                    key,
                    "must list at least one non-empty subject".into(),
                ));
            }
        }
        if self.nats.durable_prefix.is_empty()
            || self.nats.durable_prefix.contains(['.', ' ', '*', '>'])
        {
            return Err(invalid(
                "nats.durable_prefix",
                "must be non-empty and hold no `.`, space, `*` or `>`".into(),
            ));
        }
        if self.nats.max_deliver == 0 || self.nats.max_deliver < -1 {
            return Err(invalid(
                "nats.max_deliver",
                "must be -1 (unlimited) or at least 1".into(),
            ));
        }
        if self.nats.max_message_bytes == 0 {
            return Err(invalid(
                "nats.max_message_bytes",
                "must be at least 1".into(),
            ));
        }
        let mut redis_password = None;
        if self.dedup.backend == DedupBackend::Redis {
            self.validate_redis()?;
            redis_password = self.dedup.redis_password(&lookup)?;
        }
        if self.dedup.ttl.is_zero() {
            return Err(invalid("dedup.ttl", "must be longer than 0s".into()));
        }
        if self.dedup.memory_capacity == 0 {
            return Err(invalid(
                "dedup.memory_capacity",
                "must be at least 1".into(),
            ));
        }
        if !self.store.url.starts_with("sqlite:") {
            if !is_postgres_url(&self.store.url) {
                return Err(invalid(
                    "store.url",
                    format!(
                        "{:?} is neither sqlite://PATH nor postgres://...",
                        crate::redact::url(&self.store.url)
                    ),
                ));
            }
            validate_postgres_url("store.url", &self.store.url)?;
        }
        self.validate_cluster()?;
        let mut secrets = Secrets {
            payload: None,
            better_auth: None,
            ingest_better_auth: None,
            ingest_payload: None,
            nats: nats_auth,
            redis_password,
        };
        for side in Origin::ALL {
            let (target, key) = self.targets.side(side);
            validate_target(target, key)?;
            if target.enabled {
                let keyring = resolve_keyring(
                    &format!("{key}.secret_env"),
                    &target.secret_env,
                    target.signing,
                    &lookup,
                )?;
                match side {
                    Origin::Payload => secrets.payload = Some(keyring),
                    Origin::BetterAuth => secrets.better_auth = Some(keyring),
                }
            }
        }
        if self.mirror.enabled {
            if !is_postgres_url(&self.mirror.url) {
                return Err(invalid("mirror.url", "must be a postgres:// URL".into()));
            }
            validate_postgres_url("mirror.url", &self.mirror.url)?;
            if !is_sql_identifier(&self.mirror.table) {
                return Err(invalid(
                    "mirror.table",
                    "must be a plain SQL identifier (letters, digits, `_`, optionally schema.table)".into(),
                ));
            }
        }
        if self.ingest.enabled {
            if self.ingest.listen == Some(self.http.listen) {
                return Err(invalid(
                    "ingest.listen",
                    "must differ from http.listen (leave it out to share that address)".into(),
                ));
            }
            if self.ingest.max_body_bytes == 0 {
                return Err(invalid(
                    "ingest.max_body_bytes",
                    "must be at least 1".into(),
                ));
            }
            secrets.ingest_better_auth = Some(resolve_keyring(
                "ingest.better_auth_secret_env",
                &self.ingest.better_auth_secret_env,
                self.ingest.signing,
                &lookup,
            )?);
            secrets.ingest_payload = Some(resolve_keyring(
                "ingest.payload_secret_env",
                &self.ingest.payload_secret_env,
                self.ingest.signing,
                &lookup,
            )?);
        }
        if !is_log_filter(&self.log.level) {
            return Err(invalid(
                "log.level",
                format!(
                    "{:?} is not a level or tracing filter (error, warn, info, debug, trace)",
                    self.log.level
                ),
            ));
        }
        Ok(secrets)
    }

    /// Both sides' field mappings.
    pub fn mappings(&self) -> Mappings {
        Mappings {
            better_auth: self.targets.better_auth.mapping(),
            payload: self.targets.payload.mapping(),
        }
    }

    /// The effective configuration as TOML. It holds no secret: only the names of the
    /// variables that hold them.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        for url in [
            &mut shown.nats.url,
            &mut shown.dedup.redis_url,
            &mut shown.store.url,
            &mut shown.mirror.url,
            &mut shown.targets.payload.url,
            &mut shown.targets.better_auth.url,
        ] {
            *url = crate::redact::url(url);
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|error| format!("# cannot render: {error}\n"))
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_string(),
            message,
        };
        let cluster = &self.cluster;
        if cluster.lease_ttl < LEASE_TTL_MIN || cluster.lease_ttl > LEASE_TTL_MAX {
            return Err(invalid(
                "cluster.lease_ttl",
                format!("must be between {LEASE_TTL_MIN:?} and {LEASE_TTL_MAX:?}"),
            ));
        }
        if cluster.member.len() > 128 || cluster.member.chars().any(char::is_control) {
            return Err(invalid(
                "cluster.member",
                "must be at most 128 characters, none of them control characters".into(),
            ));
        }
        if cluster.partitions == 0 {
            return Ok(());
        }
        if cluster.partitions > protocol::partition::PARTITIONS_MAX {
            return Err(invalid(
                "cluster.partitions",
                format!(
                    "must be at most {} (0: unpartitioned)",
                    protocol::partition::PARTITIONS_MAX
                ),
            ));
        }
        if !is_postgres_url(&self.store.url) {
            return Err(invalid(
                "cluster.partitions",
                "partitions need a postgres:// store.url, shared by the engines (it holds their leases and the users' states)".into(),
            ));
        }
        for (key, subjects) in self.nats.subjects_by_key() {
            if partition_prefix(subjects).is_none() {
                return Err(invalid(
                    key,
                    format!("with cluster.partitions, must be one subject ending in \".>\" (like \"user.>\"), not {subjects:?}"),
                ));
            }
        }
        Ok(())
    }

    fn validate_redis(&self) -> Result<(), ConfigError> {
        let url = &self.dedup.redis_url;
        let tls = url.starts_with("rediss://");
        if !tls && !url.starts_with("redis://") {
            return Err(ConfigError::Invalid {
                key: "dedup.redis_url".into(),
                message: "must be a redis:// or rediss:// (TLS) URL".into(),
            });
        }
        if let Some(path) = set(&self.dedup.redis_ca_file) {
            if !tls {
                return Err(ConfigError::Invalid {
                    key: "dedup.redis_ca_file".into(),
                    message: "needs a rediss:// dedup.redis_url".into(),
                });
            }
            files::certificates("dedup.redis_ca_file", path)?;
        }
        Ok(())
    }
}

impl NatsConfig {
    /// Each application's subjects, with their key.
    fn subjects_by_key(&self) -> [(&'static str, &Vec<String>); 2] {
        [
            ("nats.better_auth_subjects", &self.better_auth_subjects),
            ("nats.payload_subjects", &self.payload_subjects),
        ]
    }
}

/// The subject prefix a partitioned origin publishes under: `user` for `["user.>"]`.
pub fn partition_prefix(subjects: &[String]) -> Option<&str> {
    match subjects {
        [only] => only
            .strip_suffix(".>")
            .filter(|prefix| !prefix.is_empty() && !prefix.contains(['*', '>', ' '])),
        _ => None,
    }
}

fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The URL parses as libpq's (`sslmode`, `sslrootcert`, ...), and the files it names are there.
fn validate_postgres_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        key: key.to_string(),
        message,
    };
    let parsed =
        reqwest::Url::parse(url).map_err(|error| invalid(format!("not a valid URL: {error}")))?;
    for (name, value) in parsed.query_pairs() {
        match name.as_ref() {
            "sslrootcert" => {
                files::certificates(&format!("{key} (sslrootcert)"), &value)?;
            }
            "sslcert" => {
                files::certificates(&format!("{key} (sslcert)"), &value)?;
            }
            "sslkey" => files::private_key(&format!("{key} (sslkey)"), &value)?,
            _ => {}
        }
    }
    <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(url)
        .map(|_| ())
        .map_err(|error| invalid(crate::redact::text(&error.to_string())))
}

fn validate_target(target: &TargetConfig, key: &str) -> Result<(), ConfigError> {
    let invalid = |field: &str, message: String| ConfigError::Invalid {
        key: format!("{key}.{field}"),
        message,
    };
    if !target.url.starts_with("http://") && !target.url.starts_with("https://") {
        return Err(invalid(
            "url",
            format!(
                "{:?} is not an http:// or https:// URL",
                crate::redact::url(&target.url)
            ),
        ));
    }
    if reqwest::Url::parse(&target.url).is_err() {
        return Err(invalid(
            "url",
            format!("{:?} is not a valid URL", crate::redact::url(&target.url)),
        ));
    }
    let tls = target.tls_files();
    if !target.url.starts_with("https://") && tls != TlsFiles::default() {
        return Err(invalid(
            "ca_file",
            "TLS files need an https:// url (client_cert_file and client_key_file too)".into(),
        ));
    }
    files::check_tls(&format!("{key}."), tls)?;
    if target.timeout.is_zero() {
        return Err(invalid("timeout", "must be longer than 0s".into()));
    }
    if target.max_concurrency == 0 {
        return Err(invalid("max_concurrency", "must be at least 1".into()));
    }
    let retry = &target.retry;
    if retry.initial.is_zero() {
        return Err(invalid("retry.initial", "must be longer than 0s".into()));
    }
    if retry.max < retry.initial {
        return Err(invalid(
            "retry.max",
            "must not be shorter than retry.initial".into(),
        ));
    }
    if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
        return Err(invalid(
            "retry.multiplier",
            "must be a finite number of at least 1.0".into(),
        ));
    }
    if !(0.0..=1.0).contains(&retry.jitter) {
        return Err(invalid(
            "retry.jitter",
            "must be between 0.0 and 1.0".into(),
        ));
    }
    if retry.max_attempts == 0 {
        return Err(invalid("retry.max_attempts", "must be at least 1".into()));
    }
    if target.breaker.probe_interval.is_zero() {
        return Err(invalid(
            "breaker.probe_interval",
            "must be longer than 0s".into(),
        ));
    }
    if !target.fields.contains_key(ID) {
        return Err(invalid(
            "fields",
            "must map the canonical `id` field".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    for (canonical, side) in &target.fields {
        if side.is_empty() || !seen.insert(side) {
            return Err(invalid(
                &format!("fields.{canonical}"),
                format!("{side:?} is empty or mapped twice"),
            ));
        }
    }
    Ok(())
}

fn resolve_keyring(
    key: &str,
    var: &str,
    scheme: SigningScheme,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<Keyring, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        key: key.to_string(),
        message,
    };
    if var.is_empty() {
        return Err(invalid("must name an environment variable".into()));
    }
    let value = lookup(var)
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| invalid(format!("environment variable {var} is not set")))?;
    Keyring::parse(scheme, &Secret::new(value)).map_err(|error| {
        invalid(format!(
            "the secret in {var} is not usable for {}: {error}",
            scheme.as_str()
        ))
    })
}

/// A level, or `target=level` directives: a bare word that is not a level is almost always a
/// typo, although `tracing` would read it as a target name.
fn is_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    tracing_subscriber::EnvFilter::try_new(filter).is_ok()
        && filter.split(',').all(|directive| {
            let level = directive.rsplit('=').next().unwrap_or_default().trim();
            LEVELS.contains(&level.to_ascii_lowercase().as_str())
        })
}

fn is_sql_identifier(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit())
        })
}

/// `SYNC_ENGINE__TARGETS__PAYLOAD__URL=...` → `targets.payload.url`. Values are read as TOML
/// values where they parse (numbers, booleans, arrays, quoted strings) and as plain strings
/// otherwise. Built by hand rather than with figment's `Env` so that tests can pass their own
/// environment instead of mutating the process's.
fn env_provider(vars: Vec<(String, String)>) -> Serialized<toml::Table> {
    let mut root = toml::Table::new();
    for (name, raw) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(|part| part.to_lowercase())
            .collect();
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        insert_path(&mut root, &path, value);
    }
    Serialized::defaults(root)
}

fn insert_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests;
