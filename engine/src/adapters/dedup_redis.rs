//! The Redis dedup store, shared by several engines: one key per id and sink,
//! `<prefix>:<sink>:<id>`, each with its own expiry (never one shared set).
//!
//! Marks are group-committed: every user actor marks its own message's id once the message
//! is done, thousands a second, so one task sends every mark waiting at a moment as one
//! pipeline instead of one round trip each.
//!
//! Every call has a time limit, and a connection that breaks or stops answering is dropped:
//! the next call opens a new one. A Redis outage costs retries, never a stall.

use actors::ports::{BoxFuture, DedupStore};
use actors::{PortError, Sink};
use protocol::Secret;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisError};

use crate::config::{set, DedupConfig};
use crate::redact;
use tokio::sync::{mpsc, oneshot};

/// How long one call to Redis (a connect, a command, a pipeline) may take.
pub const REDIS_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Marks sent by one pipeline at most, so a huge backlog still goes out in steps.
const MARKS_PER_PIPELINE: usize = 4_096;

/// The connection in use, opened again after it failed.
struct Link {
    client: redis::Client,
    /// A plain mutex: held only to clone or swap the handle, never across an await.
    connection: std::sync::Mutex<Option<MultiplexedConnection>>,
}

impl Link {
    async fn connect(client: &redis::Client) -> Result<MultiplexedConnection, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(REDIS_CALL_TIMEOUT)
            .set_response_timeout(REDIS_CALL_TIMEOUT);
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The open connection, or a new one.
    async fn get(&self) -> Result<MultiplexedConnection, PortError> {
        if let Some(open) = self.slot().as_ref() {
            return Ok(open.clone());
        }
        let opened = tokio::time::timeout(REDIS_CALL_TIMEOUT, Self::connect(&self.client))
            .await
            .map_err(|_| PortError::unavailable("redis", "connect timed out"))?
            .map_err(|e| PortError::unavailable("redis", redact::text(&e.to_string())))?;
        *self.slot() = Some(opened.clone());
        Ok(opened)
    }

    /// Runs `call` on the connection within [`REDIS_CALL_TIMEOUT`]; a failure that is not
    /// Redis' own answer drops the connection, so the next call opens another.
    async fn run<T, F>(&self, call: impl FnOnce(MultiplexedConnection) -> F) -> Result<T, PortError>
    where
        F: std::future::Future<Output = Result<T, RedisError>>,
    {
        let connection = self.get().await?;
        let result = tokio::time::timeout(REDIS_CALL_TIMEOUT, call(connection)).await;
        let error = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) if is_answer(&error) => {
                return Err(PortError::unavailable(
                    "redis",
                    redact::text(&error.to_string()),
                ))
            }
            Ok(Err(error)) => redact::text(&error.to_string()),
            Err(_) => "no answer in time".to_string(),
        };
        *self.slot() = None;
        Err(PortError::unavailable("redis", error))
    }
}

/// An error Redis answered with (the connection is fine), rather than a broken connection.
fn is_answer(error: &RedisError) -> bool {
    !(error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_unrecoverable_error())
}

#[derive(Clone)]
pub struct RedisDedup {
    link: std::sync::Arc<Link>,
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
        let connection = tokio::time::timeout(REDIS_CALL_TIMEOUT * 5, Link::connect(&client))
            .await
            .map_err(|_| anyhow::anyhow!("no answer in time"))
            .and_then(|opened| opened.map_err(|e| anyhow::anyhow!("{e}")))
            .map_err(|e| {
                anyhow::anyhow!(
                    "dedup.redis_url: cannot connect to Redis at {}: {}",
                    redact::url(&config.redis_url),
                    redact::text(&e.to_string())
                )
            })?;
        let link = std::sync::Arc::new(Link {
            client,
            connection: std::sync::Mutex::new(Some(connection)),
        });
        let (marks, waiting) = mpsc::unbounded_channel();
        let ttl_ms = u64::try_from(config.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        tokio::spawn(write_marks(link.clone(), ttl_ms, waiting));
        Ok(RedisDedup {
            link,
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
        self.link
            .run(|mut connection| async move {
                redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
            })
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
            self.link
                .run(|mut connection| async move {
                    pipe.query_async::<Vec<bool>>(&mut connection).await
                })
                .await
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
    link: std::sync::Arc<Link>,
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
        let result = link
            .run(|mut connection| async move { pipe.query_async::<()>(&mut connection).await })
            .await
            .map_err(|e| e.to_string());
        for mark in batch.drain(..) {
            let _ = mark.done.send(result.clone());
        }
    }
}
