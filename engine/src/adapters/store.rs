//! The state store: per-user sync state and dead letters, in SQLite (embedded default) or
//! PostgreSQL, through sqlx. Migrations run at startup.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use actors::ports::{BoxFuture, DeadLetter, StateStore};
use actors::state_codec;
use actors::sync::SyncState;
use actors::PortError;
use bytes::Bytes;
use protocol::UserKey;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::lease_pg::Fence;
use super::state_writer::{StateWriter, Target, WalSize};

/// Runs the same code on whichever pool the store has: the SQL is written once, with `$N`
/// placeholders, which SQLite and PostgreSQL both accept.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

/// Where reads and dead letters go.
#[derive(Debug, Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// How long the server lets a store session sit idle inside a transaction before it ends it.
/// A save's statements follow each other at once; a transaction left open longer belongs to an
/// engine that froze or lost its network, and its row locks (a save holds its partition's
/// lease row for share) must not outlive it: the next holder's token bump waits for them.
pub const IDLE_IN_TRANSACTION_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct SqlStore {
    db: Db,
    /// Per-user states are written through it, many users per transaction.
    writer: StateWriter,
}

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct DeadLetterRow {
    pub id: i64,
    pub subject: String,
    #[serde(skip)]
    pub raw: Vec<u8>,
    pub reason: String,
    pub event_id: Option<String>,
    pub sink: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    /// Milliseconds since the epoch.
    pub received_at: i64,
}

impl SqlStore {
    /// Opens the store named by `store.url` and brings its schema up to date.
    pub async fn connect(url: &str) -> anyhow::Result<SqlStore> {
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| anyhow::anyhow!("store.url is not a usable SQLite URL: {e}"))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // WAL with NORMAL: a crash loses no committed transaction, only an fsync
                // of the last ones on power loss; the unacked messages come back anyway.
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10));
            if let Some(parent) = Path::new(options.get_filename()).parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        anyhow::anyhow!(
                            "cannot create the folder {} for the SQLite store: {e}",
                            parent.display()
                        )
                    })?;
                }
            }
            // A local file does not go stale: no test query before each use. One writer
            // connection (the state writer's, or a dead letter's) at a time is all SQLite
            // allows anyway; the others serve reads.
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .test_before_acquire(false)
                .connect_with(options.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot open the SQLite store: {e}"))?;
            sqlx::migrate!("migrations/sqlite")
                .run(&pool)
                .await
                .map_err(|e| anyhow::anyhow!("cannot migrate the SQLite store: {e}"))?;
            // The state writer's own connection: SQLite has one writer at a time anyway. A
            // larger page cache (16 MiB: the tree's inner pages and the users being synced)
            // spares reading pages back for every upsert; a statement journal in memory spares
            // a temporary file per multi-row upsert. It does not checkpoint the WAL after
            // every few MiB: a checkpoint (with its fsync) in the committing connection stalls
            // every user waiting for the next commit. Another connection copies the WAL back
            // meanwhile, and the writer finishes the job every 16 MiB (`state_writer.rs`).
            let writer = SqlitePoolOptions::new()
                .max_connections(1)
                .test_before_acquire(false)
                .connect_with(
                    options
                        .pragma("cache_size", "-16384")
                        .pragma("temp_store", "memory")
                        .pragma("wal_autocheckpoint", "0")
                        // After a burst, the WAL file shrinks back to this once restarted.
                        .pragma("journal_size_limit", "67108864"),
                )
                .await
                .map_err(|e| anyhow::anyhow!("cannot open the SQLite store: {e}"))?;
            let wal = WalSize::default();
            tokio::spawn(checkpoint_wal(pool.clone(), wal.clone()));
            Ok(SqlStore::new(
                Db::Sqlite(pool),
                StateWriter::start(Target::Sqlite(writer, wal)),
            ))
        } else {
            let options = sqlx::postgres::PgConnectOptions::from_str(url)
                .map_err(|e| anyhow::anyhow!("store.url is not a usable PostgreSQL URL: {e}"))?
                .options([(
                    "idle_in_transaction_session_timeout",
                    IDLE_IN_TRANSACTION_MAX.as_millis().to_string(),
                )]);
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "store.url: cannot connect to the PostgreSQL store at {}: {}",
                        crate::redact::url(url),
                        super::errors::describe(&e)
                    )
                })?;
            sqlx::migrate!("migrations/postgres")
                .run(&pool)
                .await
                .map_err(|e| anyhow::anyhow!("cannot migrate the PostgreSQL store: {e}"))?;
            let writer = StateWriter::start(Target::Postgres(pool.clone(), None));
            Ok(SqlStore::new(Db::Postgres(pool), writer))
        }
    }

    fn new(db: Db, writer: StateWriter) -> SqlStore {
        SqlStore { db, writer }
    }

    /// The same PostgreSQL store for the users of one leased partition: its saves commit only
    /// while `fence` is the partition's current lease. `None` for a SQLite store.
    pub fn fenced(&self, fence: Fence) -> Option<SqlStore> {
        let Db::Postgres(pool) = &self.db else {
            return None;
        };
        let writer = StateWriter::start(Target::Postgres(pool.clone(), Some(fence)));
        Some(SqlStore::new(self.db.clone(), writer))
    }

    /// Waits until every save queued so far is written.
    pub async fn flush(&self) {
        self.writer.flush().await;
    }

    pub async fn ping(&self) -> bool {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.is_ok())
    }

    pub async fn load(&self, key: &UserKey) -> Result<Option<SyncState>, sqlx::Error> {
        const SQL: &str = "SELECT state FROM user_state WHERE user_key = $1";
        fn decode(bytes: &[u8]) -> Result<Option<SyncState>, sqlx::Error> {
            state_codec::decode(bytes)
                .map(Some)
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))
        }
        // A queued save of this user is waited for: what a load returns is durable, never a
        // state whose commit may still fail (a next actor would send what it owes at once).
        if self.writer.pending(key.as_str()).is_some() {
            self.writer.flush().await;
        }
        let stored: Option<Vec<u8>> = on_pool!(self, pool => {
            sqlx::query_scalar(SQL).bind(key.as_str()).fetch_optional(pool).await?
        });
        stored.as_deref().map_or(Ok(None), decode)
    }

    /// Queues the state for the writer now; the future resolves once it is committed
    /// (together with other users' saves).
    pub fn save(
        &self,
        key: &UserKey,
        state: &SyncState,
    ) -> impl std::future::Future<Output = Result<(), PortError>> + Send + 'static {
        let queued = state_codec::encode(state)
            .map_err(|e| PortError::rejected("store", format!("cannot encode state: {e}")))
            .map(|bytes| self.writer.save(key.as_str(), bytes));
        async move {
            match queued {
                Ok(committed) => committed.await,
                Err(error) => Err(error),
            }
        }
    }

    /// [`SqlStore::save`] of a state already in its stored form.
    pub fn save_encoded(
        &self,
        key: &UserKey,
        stored: &Arc<[u8]>,
    ) -> impl std::future::Future<Output = Result<(), PortError>> + Send + 'static {
        self.writer.save(key.as_str(), stored.clone())
    }

    pub async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<i64, sqlx::Error> {
        const SQL: &str = "INSERT INTO dead_letters \
                           (subject, raw, reason, event_id, sink, attempts, last_error, received_at) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id";
        let attempts = letter.attempts.min(i32::MAX as u32) as i32;
        let id: i64 = on_pool!(self, pool => {
            sqlx::query_scalar(SQL)
                .bind(&letter.subject)
                .bind(letter.raw.as_ref())
                .bind(&letter.reason)
                .bind(&letter.event_id)
                .bind(&letter.sink)
                .bind(attempts)
                .bind(&letter.last_error)
                .bind(letter.received_at_ms)
                .fetch_one(pool)
                .await?
        });
        Ok(id)
    }

    /// Dead letters, oldest first; only `id` when given.
    pub async fn dead_letters(&self, id: Option<i64>) -> Result<Vec<DeadLetterRow>, sqlx::Error> {
        const SQL: &str = "SELECT id, subject, raw, reason, event_id, sink, attempts, last_error, received_at \
                           FROM dead_letters WHERE CAST($1 AS BIGINT) IS NULL OR id = $1 ORDER BY id";
        let rows = on_pool!(self, pool => sqlx::query_as(SQL).bind(id).fetch_all(pool).await?);
        Ok(rows)
    }

    /// Deletes one dead letter, or all; returns how many went.
    pub async fn purge_dead_letters(&self, id: Option<i64>) -> Result<u64, sqlx::Error> {
        const SQL: &str = "DELETE FROM dead_letters WHERE CAST($1 AS BIGINT) IS NULL OR id = $1";
        let done =
            on_pool!(self, pool => sqlx::query(SQL).bind(id).execute(pool).await?.rows_affected());
        Ok(done)
    }
}

/// How often the WAL is copied back into the database file (the state writer does not).
const WAL_CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Checkpoints the SQLite WAL beside the state writer, until the store is closed, and tells
/// the writer how long the WAL has grown. `PASSIVE` never waits for the writer or for
/// readers, so commits go on meanwhile.
async fn checkpoint_wal(pool: sqlx::SqlitePool, wal: WalSize) {
    let mut ticks = tokio::time::interval(WAL_CHECKPOINT_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !pool.is_closed() {
        ticks.tick().await;
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&pool)
            .await
        {
            Ok((_busy, frames, _copied)) => wal.set(frames),
            Err(error) => tracing::debug!(message = "WAL checkpoint failed; retrying.", %error),
        }
    }
}

/// The store's answer as the actors see it: data the database refuses (a bad value, a row
/// too large: SQLSTATE classes 22, 23 and 54) is rejected for good, a row that does not
/// decode is corrupt, anything else (the connection, the pool, a timeout) is unavailable
/// for now.
pub fn port_error(error: sqlx::Error) -> PortError {
    let text = crate::adapters::errors::describe(&error);
    match &error {
        sqlx::Error::Database(db) if is_data_error(db.code().as_deref()) => {
            PortError::rejected("store", text)
        }
        sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => {
            PortError::corrupt("store", text)
        }
        _ => PortError::unavailable("store", text),
    }
}

/// SQLSTATE classes of refused data; SQLite's "too big" (18) and "mismatch" (20) too.
fn is_data_error(code: Option<&str>) -> bool {
    code.is_some_and(|code| {
        ["22", "23", "54"]
            .iter()
            .any(|class| code.starts_with(class))
            || code == "18"
            || code == "20"
    })
}

/// How long a read or a dead letter may take: a connection that never answers fails the call
/// (it is tried again) instead of holding its user for ever.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

async fn within<T>(
    call: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, PortError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result.map_err(port_error),
        Err(_) => Err(PortError::unavailable("store", "no answer in time")),
    }
}

impl StateStore for SqlStore {
    fn load_user<'a>(
        &'a self,
        key: &'a UserKey,
    ) -> BoxFuture<'a, Result<Option<SyncState>, PortError>> {
        Box::pin(within(self.load(key)))
    }

    fn save_user(
        &self,
        key: &UserKey,
        state: &SyncState,
    ) -> BoxFuture<'static, Result<(), PortError>> {
        Box::pin(self.save(key, state))
    }

    fn save_user_encoded(
        &self,
        key: &UserKey,
        _state: &SyncState,
        stored: &Arc<[u8]>,
    ) -> BoxFuture<'static, Result<(), PortError>> {
        Box::pin(self.save_encoded(key, stored))
    }

    fn dead_letter(&self, letter: DeadLetter) -> BoxFuture<'_, Result<(), PortError>> {
        Box::pin(async move { within(self.add_dead_letter(&letter)).await.map(|_| ()) })
    }
}

/// A dead letter's raw bytes for replay.
pub fn raw_bytes(row: &DeadLetterRow) -> Bytes {
    Bytes::from(row.raw.clone())
}
