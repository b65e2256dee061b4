//! The Redis dedup store, shared by several engines: one key per id and sink,
//! `<prefix>:<sink>:<id>`, each with its own expiry (never one shared set).
//!
//! Marks are group-committed: every user actor marks its own message's id once the message
//! is done, thousands a second, so one task sends every mark waiting at a moment as one
//! pipeline instead of one round trip each.

use actors::ports::{BoxFuture, DedupStore};
use actors::{PortError, Sink};
use protocol::Secret;
use redis::aio::ConnectionManager;
use redis::IntoConnectionInfo;

use crate::config::{set, DedupConfig};
use crate::redact;
use tokio::sync::{mpsc, oneshot};

/// Marks sent by one pipeline at most, so a huge backlog still goes out in steps.
const MARKS_PER_PIPELINE: usize = 4_096;

#[derive(Clone)]
pub struct RedisDedup {
    connection: ConnectionManager,
    prefix: String,
    marks: mpsc::UnboundedSender<Mark>,
}

/// Keys to set, and who waits for them.
struct Mark {
    keys: Vec<String>,
    done: oneshot::Sender<Result<(), String>>,
}

impl std::fmt::Debug for RedisDedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDedup")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisDedup {
    /// Connects to `dedup.redis_url` (`rediss://` for TLS, with `redis_ca_file` for a private
    /// CA) with the password of `redis_password_env` when one is named.
    pub async fn connect(config: &DedupConfig, password: Option<&Secret>) -> anyhow::Result<Self> {
        let client = client(config, password)?;
        let connection = ConnectionManager::new(client).await.map_err(|e| {
            anyhow::anyhow!(
                "dedup.redis_url: cannot connect to Redis at {}: {}",
                redact::url(&config.redis_url),
                redact::text(&e.to_string())
            )
        })?;
        let (marks, waiting) = mpsc::unbounded_channel();
        let ttl_ms = u64::try_from(config.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        tokio::spawn(write_marks(connection.clone(), ttl_ms, waiting));
        Ok(RedisDedup {
            connection,
            prefix: config.key_prefix.clone(),
            marks,
        })
    }

    fn key(&self, sink: Sink, id: &str) -> String {
        format!("{}:{}:{id}", self.prefix, sink.as_str())
    }

    /// Answers when Redis does and marks can be written (readiness).
    pub async fn ping(&self) -> bool {
        if self.marks.is_closed() {
            return false;
        }
        let mut connection = self.connection.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .is_ok()
    }
}

/// The client of the configuration: its URL, the password from the environment, and TLS
/// trusting `redis_ca_file` alone when it is set (else the system's roots).
fn client(config: &DedupConfig, password: Option<&Secret>) -> anyhow::Result<redis::Client> {
    let invalid = |e: redis::RedisError| {
        anyhow::anyhow!(
            "dedup.redis_url is not a usable Redis URL: {}",
            redact::text(&e.to_string())
        )
    };
    let mut info = config
        .redis_url
        .as_str()
        .into_connection_info()
        .map_err(invalid)?;
    if let Some(password) = password {
        info.redis.password = Some(password.expose().to_string());
    }
    match set(&config.redis_ca_file) {
        Some(path) => {
            let root_cert = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("dedup.redis_ca_file: cannot read {path}: {e}"))?;
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            redis::Client::build_with_tls(info, certificates).map_err(invalid)
        }
        None => redis::Client::open(info).map_err(invalid),
    }
}

impl DedupStore for RedisDedup {
    fn seen<'a>(
        &'a self,
        sink: Sink,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<bool>, PortError>> {
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut pipe = redis::pipe();
            for id in ids {
                pipe.exists(self.key(sink, id));
            }
            let mut connection = self.connection.clone();
            pipe.query_async::<Vec<bool>>(&mut connection)
                .await
                .map_err(|e| PortError::unavailable("redis", e))
        })
    }

    fn mark<'a>(&'a self, sink: Sink, ids: &'a [String]) -> BoxFuture<'a, Result<(), PortError>> {
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(());
            }
            let (done, written) = oneshot::channel();
            let keys = ids.iter().map(|id| self.key(sink, id)).collect();
            self.marks
                .send(Mark { keys, done })
                .map_err(|_| PortError::unavailable("redis", "the mark writer stopped"))?;
            written
                .await
                .unwrap_or_else(|_| Err("the mark writer stopped".into()))
                .map_err(|e| PortError::unavailable("redis", e))
        })
    }
}

/// Sets the keys of every mark waiting, one pipeline at a time, until the last handle is
/// dropped. A failed pipeline fails every mark in it (their messages are handed back).
async fn write_marks(
    mut connection: ConnectionManager,
    ttl_ms: u64,
    mut waiting: mpsc::UnboundedReceiver<Mark>,
) {
    let mut batch = Vec::new();
    while waiting.recv_many(&mut batch, MARKS_PER_PIPELINE).await > 0 {
        let mut pipe = redis::pipe();
        for key in batch.iter().flat_map(|mark| &mark.keys) {
            pipe.cmd("SET")
                .arg(key)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms)
                .ignore();
        }
        let result = pipe
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| e.to_string());
        for mark in batch.drain(..) {
            let _ = mark.done.send(result.clone());
        }
    }
}
