//! Group commit for per-user state: one writer task per store turns every save waiting at a
//! moment into one transaction.
//!
//! Each user actor still waits until its own save is durable before it sends or acknowledges
//! anything; what changes is that thousands of users waiting together pay for one commit,
//! one statement round trip and one WAL append instead of one each. Saves of one user reach the
//! writer in the order they were made (one channel, one task), and within a batch only a
//! user's latest state is written: the earlier ones are superseded by it in the same
//! transaction, so no reader can tell the difference.
//!
//! A read waits for every save of its user queued before it ([`StateWriter::pending`] tells
//! whether there is one, [`StateWriter::flush`] waits): a user whose actor stopped with a save
//! still in line, and whose next event starts a new actor at once, gets that state once it is
//! committed, or the older one if the commit failed, never a state that may not be durable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use sqlx::{PgPool, Postgres, QueryBuilder, Sqlite, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use actors::PortError;

use super::clock::now_ms;
use super::lease_pg::Fence;
use super::store::port_error;

/// Rows written by one statement at most: 3 parameters each, far below both databases'
/// parameter limits (SQLite 32,766; PostgreSQL 65,535).
const ROWS_PER_STATEMENT: usize = 500;
/// Saves gathered into one transaction at most, so a huge backlog still commits regularly.
const SAVES_PER_TRANSACTION: usize = 4_000;
/// How long one transaction may take before its outcome counts as unknown: a connection that
/// accepts and never answers must not hold every user's saves for ever. The saves fail and
/// their users try again (an upsert of the latest state is safe to repeat).
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// One user's stored state (`actors::state_codec`), and who waits for it to be durable.
struct Save {
    key: String,
    bytes: Arc<[u8]>,
    /// Its place among all saves, to tell it from a newer save of the same user.
    seq: u64,
    done: oneshot::Sender<Result<(), PortError>>,
}

/// What the writer is asked: a save, or to answer once everything queued before is written.
enum Job {
    Save(Save),
    Flush(oneshot::Sender<()>),
}

/// Saves queued and not yet committed (or failed): the latest per user.
type Pending = Arc<DashMap<String, (u64, Arc<[u8]>)>>;

#[derive(Debug, Clone)]
pub enum Target {
    /// The writer's connection, and the WAL's length as last seen by the checkpointer.
    Sqlite(SqlitePool, WalSize),
    /// With the lease of the partition whose users it saves, when engines share the work.
    Postgres(PgPool, Option<Fence>),
}

/// The SQLite WAL's length in frames, as the background checkpointer last saw it.
#[derive(Debug, Clone, Default)]
pub struct WalSize(Arc<AtomicI64>);

impl WalSize {
    pub fn set(&self, frames: i64) {
        self.0.store(frames, Ordering::Relaxed);
    }

    fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The handle user actors save through; cheap to clone.
#[derive(Debug, Clone)]
pub struct StateWriter {
    /// Unbounded so that a save takes its place in line synchronously; each user actor has
    /// at most one save waiting (and `engine.max_in_flight` bounds the users), so it stays
    /// small.
    queue: mpsc::UnboundedSender<Job>,
    pending: Pending,
    next_seq: Arc<AtomicU64>,
}

impl StateWriter {
    /// Starts the writer task; it ends when the last handle is dropped.
    pub fn start(target: Target) -> StateWriter {
        let (queue, saves) = mpsc::unbounded_channel();
        let pending = Pending::default();
        tokio::spawn(run(target, saves, pending.clone()));
        StateWriter {
            queue,
            pending,
            next_seq: Arc::default(),
        }
    }

    /// Resolves once every save queued before it is written (or failed). Shutdown waits for
    /// it: saves queued without anyone waiting (an idle user's last acceptance) would
    /// otherwise die with the process and repeat a delivery after the restart.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.queue.send(Job::Flush(done)).is_ok() {
            let _ = flushed.await;
        }
    }

    /// The latest state queued for `key` and not yet committed (or failed), if any.
    pub fn pending(&self, key: &str) -> Option<Arc<[u8]>> {
        self.pending.get(key).map(|entry| entry.1.clone())
    }

    /// Queues `bytes` as `key`'s stored state, behind every save queued before; the future
    /// resolves once it is committed.
    pub fn save(
        &self,
        key: &str,
        bytes: impl Into<Arc<[u8]>>,
    ) -> impl std::future::Future<Output = Result<(), PortError>> + Send + 'static {
        let (done, committed) = oneshot::channel();
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let bytes: Arc<[u8]> = bytes.into();
        self.pending.insert(key.to_string(), (seq, bytes.clone()));
        let save = Save {
            key: key.to_string(),
            bytes,
            seq,
            done,
        };
        let queued = self.queue.send(Job::Save(save)).is_ok();
        if !queued {
            self.pending.remove_if(key, |_, (at, _)| *at == seq);
        }
        async move {
            if !queued {
                return Err(PortError::unavailable("store", "the state writer stopped"));
            }
            committed.await.unwrap_or_else(|_| {
                Err(PortError::unavailable(
                    "store",
                    "the state writer stopped before committing",
                ))
            })
        }
    }
}

/// The writer finishes a checkpoint itself (between two transactions, so that the WAL starts
/// over) once the WAL is this long (16 MiB of 4 KiB pages), or this long after the last one.
/// Every save waiting for the next commit waits for it, and the longer the WAL the longer the
/// wait (`bench steady --rate 5000`, slowest 1 % of deliveries: 100 ms at 256 MiB, 37 ms at
/// 64 MiB, 21–23 ms at 16 MiB, 14 ms with no such checkpoint at all, which lets the WAL grow
/// without bound under a steady load). `bench drain` is as fast at 16 MiB as at 64 MiB.
const OWN_CHECKPOINT_FRAMES: i64 = 4_096;
const OWN_CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

async fn run(target: Target, mut jobs: mpsc::UnboundedReceiver<Job>, pending: Pending) {
    let mut received = Vec::new();
    let mut batch = Vec::new();
    let mut flushes = Vec::new();
    let mut checkpointed = tokio::time::Instant::now();
    while jobs.recv_many(&mut received, SAVES_PER_TRANSACTION).await > 0 {
        for job in received.drain(..) {
            match job {
                Job::Save(save) => batch.push(save),
                Job::Flush(done) => flushes.push(done),
            }
        }
        let results = write_batch(&target, &batch).await;
        if let Target::Sqlite(pool, wal) = &target {
            // Other connections copy the WAL back meanwhile, but only a checkpoint with no
            // write going on can finish it, so that the next transaction starts the WAL
            // over instead of growing it; most pages are copied already, so it is short.
            if wal.get() >= OWN_CHECKPOINT_FRAMES || checkpointed.elapsed() >= OWN_CHECKPOINT_EVERY
            {
                checkpointed = tokio::time::Instant::now();
                wal.set(0);
                if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(pool)
                    .await
                {
                    tracing::debug!(message = "WAL checkpoint failed.", %error);
                }
            }
        }
        for (save, result) in batch.drain(..).zip(results) {
            // Committed, readers find it in the table; failed, its saver fails and nobody
            // may read it.
            pending.remove_if(&save.key, |_, (at, _)| *at == save.seq);
            let _ = save.done.send(result);
        }
        // Every save received before a flush is in this batch or an earlier one.
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Each save's outcome. The batch is one transaction; when the database refuses its data, each
/// save is written alone, so that a row it cannot take (a key too long for its index) fails
/// only its own user, never the others in the batch.
async fn write_batch(target: &Target, batch: &[Save]) -> Vec<Result<(), PortError>> {
    if batch.is_empty() {
        return Vec::new();
    }
    let error = match tokio::time::timeout(TRANSACTION_TIMEOUT, write(target, batch)).await {
        Ok(Ok(())) => return vec![Ok(()); batch.len()],
        Ok(Err(error)) => port_error(error),
        Err(_) => PortError::unavailable("store", "no answer within the transaction timeout"),
    };
    if error.is_retryable() || batch.len() == 1 {
        tracing::warn!(message = "Saving user states failed.", saves = batch.len(), %error);
        return vec![Err(error); batch.len()];
    }
    let mut results = Vec::with_capacity(batch.len());
    for save in batch {
        let result = write(target, std::slice::from_ref(save))
            .await
            .map_err(port_error);
        if let Err(error) = &result {
            tracing::warn!(message = "Saving a user's state failed.", user = %save.key, %error);
        }
        results.push(result);
    }
    results
}

/// The latest state of each user in `batch`, in one transaction.
async fn write(target: &Target, batch: &[Save]) -> Result<(), sqlx::Error> {
    let mut latest: HashMap<&str, &[u8]> = HashMap::with_capacity(batch.len());
    for save in batch {
        latest.insert(&save.key, &save.bytes);
    }
    let rows: Vec<(&str, &[u8])> = latest.into_iter().collect();
    let now = now_ms();
    const INSERT: &str = "INSERT INTO user_state (user_key, state, updated_at) ";
    const UPSERT: &str = " ON CONFLICT (user_key) DO UPDATE \
                          SET state = excluded.state, updated_at = excluded.updated_at";
    // The same statements on either database; only the builder's type differs.
    macro_rules! upsert_all {
        ($tx:expr, $db:ty) => {{
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::<$db>::new(INSERT);
                query.push_values(chunk, |mut row, (key, bytes)| {
                    row.push_bind(*key).push_bind(*bytes).push_bind(now);
                });
                query.push(UPSERT);
                query.build().persistent(false).execute(&mut *$tx).await?;
            }
        }};
    }
    match target {
        Target::Sqlite(pool, _) => {
            let mut tx = pool.begin().await?;
            upsert_all!(tx, Sqlite);
            tx.commit().await
        }
        Target::Postgres(pool, fence) => {
            let mut tx = pool.begin().await?;
            if let Some(fence) = fence {
                fence.check(&mut tx).await?;
            }
            upsert_all!(tx, Postgres);
            tx.commit().await
        }
    }
}
