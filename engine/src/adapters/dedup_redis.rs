//! The Redis dedup store, shared by several engines: one key per id and sink,
//! `<prefix>:<sink>:<id>`, each with its own expiry (never one shared set).

use std::time::Duration;

use actors::ports::{BoxFuture, DedupStore};
use actors::{PortError, Sink};
use redis::aio::ConnectionManager;

#[derive(Clone)]
pub struct RedisDedup {
    connection: ConnectionManager,
    prefix: String,
    ttl_ms: u64,
}

impl std::fmt::Debug for RedisDedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDedup")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisDedup {
    pub async fn connect(url: &str, prefix: &str, ttl: Duration) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("dedup.redis_url is not a Redis URL: {e}"))?;
        let connection = ConnectionManager::new(client)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to Redis for deduplication: {e}"))?;
        Ok(RedisDedup {
            connection,
            prefix: prefix.to_string(),
            ttl_ms: ttl.as_millis().max(1) as u64,
        })
    }

    fn key(&self, sink: Sink, id: &str) -> String {
        format!("{}:{}:{id}", self.prefix, sink.as_str())
    }

    /// Answers when Redis does (readiness).
    pub async fn ping(&self) -> bool {
        let mut connection = self.connection.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .is_ok()
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
            let mut pipe = redis::pipe();
            for id in ids {
                pipe.cmd("SET")
                    .arg(self.key(sink, id))
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.ttl_ms)
                    .ignore();
            }
            let mut connection = self.connection.clone();
            pipe.query_async::<()>(&mut connection)
                .await
                .map_err(|e| PortError::unavailable("redis", e))
        })
    }
}
