//! Leases in PostgreSQL: one session of its own per engine holds an advisory lock per
//! partition, and heartbeats. The server itself ends a session that stays silent for
//! most of `lease_ttl` (`idle_session_timeout`), which frees its locks: a dead, paused or cut-off
//! engine loses its partitions without anyone's clock being trusted. Each acquisition bumps the
//! partition's fencing token (`engine_lease`), which every save of that partition checks
//! ([`Fence`]), so a stale holder that wakes up can no longer write.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Postgres, Transaction};

/// The whole, unpartitioned stream pair, as a partition number.
pub const WHOLE: i32 = -1;

/// How long an acquisition waits for the lease row: a save of the previous holder may hold it
/// for share until the server ends that holder's frozen transaction
/// (`store::IDLE_IN_TRANSACTION_MAX`); the acquisition is tried again next round.
const LOCK_WAIT_MAX: Duration = Duration::from_millis(500);

/// SQLSTATE `lock_not_available`: `lock_timeout` ran out.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// PostgreSQL 14 brought `idle_session_timeout`, which the leases rest on.
const SERVER_VERSION_MIN: i32 = 140_000;

/// A partition's lease as a save checks it: the save commits only while `token` is current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub scope: String,
    pub partition: i32,
    pub token: i64,
}

impl Fence {
    /// Locks the lease row for share until the transaction ends, so a new holder's bump waits
    /// for this commit, and refuses to go on once another engine holds the partition.
    pub async fn check(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
        let token: Option<i64> = sqlx::query_scalar(
            "SELECT token FROM engine_lease WHERE scope = $1 AND partition = $2 FOR SHARE",
        )
        .bind(&self.scope)
        .bind(self.partition)
        .fetch_optional(&mut **tx)
        .await?;
        if token == Some(self.token) {
            return Ok(());
        }
        Err(sqlx::Error::Protocol(format!(
            "lease lost: partition {} is held under token {token:?}, not {}",
            self.partition, self.token
        )))
    }
}

/// What a heartbeat learns: the live members, and the partitions some session holds, with
/// the holder's name.
#[derive(Debug, Clone, Default)]
pub struct Roster {
    pub members: BTreeSet<String>,
    pub holders: BTreeMap<i32, String>,
}

/// One engine's lease session.
pub struct PgLeases {
    connection: PgConnection,
    scope: String,
    member: String,
}

impl PgLeases {
    /// Opens the lease session and takes this member's own lock. Silent for `idle_timeout`,
    /// the server closes the session, and every lock it holds is free.
    pub async fn connect(
        url: &str,
        scope: &str,
        member: &str,
        idle_timeout: Duration,
    ) -> Result<PgLeases, sqlx::Error> {
        let options = PgConnectOptions::from_str(url)?
            .application_name(&format!("sync-engine lease {member}"))
            .options([
                ("idle_session_timeout", idle_timeout.as_millis().to_string()),
                // A bump that waits for a row lock gives up rather than hold the session.
                ("lock_timeout", LOCK_WAIT_MAX.as_millis().to_string()),
                // A session whose client went away ends even in the middle of a statement.
                ("client_connection_check_interval", "1000".to_string()),
            ]);
        let mut connection = PgConnection::connect_with(&options).await?;
        let version: String = sqlx::query_scalar("SHOW server_version_num")
            .fetch_one(&mut connection)
            .await?;
        if version.parse::<i32>().unwrap_or(0) < SERVER_VERSION_MIN {
            return Err(sqlx::Error::Protocol(format!(
                "leases need PostgreSQL 14 or later (idle_session_timeout); this server is {version}"
            )));
        }
        let alone: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_lock(hashtext($1 || '#member'), hashtext($2))",
        )
        .bind(scope)
        .bind(member)
        .fetch_one(&mut connection)
        .await?;
        if !alone {
            return Err(sqlx::Error::Protocol(format!(
                "cluster.member: another live engine is named {member:?}; each engine needs a name of its own"
            )));
        }
        // The name, for the others' rosters; whether it is alive is its lock, not this row.
        sqlx::query(
            "INSERT INTO engine_member (scope, member, seen_at) VALUES ($1, $2, now()) \
             ON CONFLICT (scope, member) DO UPDATE SET seen_at = now()",
        )
        .bind(scope)
        .bind(member)
        .execute(&mut connection)
        .await?;
        Ok(PgLeases {
            connection,
            scope: scope.to_string(),
            member: member.to_string(),
        })
    }

    /// Reads the roster; the query itself keeps the session from going idle. Liveness is read
    /// from the locks themselves: an engine is a member while its session holds its member
    /// lock, and a partition is held while some session holds its lock, so a killed engine
    /// (its session closed with its socket) is gone at once, not after a timeout.
    pub async fn heartbeat(&mut self, partitions: &[i32]) -> Result<Roster, sqlx::Error> {
        let members: Vec<String> = sqlx::query_scalar(
            "SELECT m.member FROM engine_member m WHERE m.scope = $1 AND EXISTS ( \
               SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted \
               AND l.classid = hashtext($1 || '#member')::oid \
               AND l.objid = hashtext(m.member)::oid AND l.objsubid = 2)",
        )
        .bind(&self.scope)
        .fetch_all(&mut self.connection)
        .await?;
        let held: Vec<(i32, Option<String>)> = sqlx::query_as(
            "SELECT p, (SELECT holder FROM engine_lease e WHERE e.scope = $1 AND e.partition = p) \
             FROM unnest($2::int[]) AS p WHERE EXISTS ( \
               SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted \
               AND l.classid = hashtext($1)::oid AND l.objid = p::oid AND l.objsubid = 2)",
        )
        .bind(&self.scope)
        .bind(partitions)
        .fetch_all(&mut self.connection)
        .await?;
        Ok(Roster {
            members: members.into_iter().collect(),
            holders: held
                .into_iter()
                .map(|(p, holder)| (p, holder.unwrap_or_default()))
                .collect(),
        })
    }

    /// Takes `partition`'s lock if it is free, and then its next fencing token.
    pub async fn try_acquire(&mut self, partition: i32) -> Result<Option<Fence>, sqlx::Error> {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1), $2)")
            .bind(&self.scope)
            .bind(partition)
            .fetch_one(&mut self.connection)
            .await?;
        if !locked {
            return Ok(None);
        }
        let bumped: Result<i64, sqlx::Error> = sqlx::query_scalar(
            "INSERT INTO engine_lease (scope, partition, token, holder, acquired_at) \
             VALUES ($1, $2, 1, $3, now()) ON CONFLICT (scope, partition) DO UPDATE \
             SET token = engine_lease.token + 1, holder = excluded.holder, acquired_at = now() \
             RETURNING token",
        )
        .bind(&self.scope)
        .bind(partition)
        .bind(&self.member)
        .fetch_one(&mut self.connection)
        .await;
        let token = match bumped {
            Ok(token) => token,
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some(LOCK_NOT_AVAILABLE) => {
                self.unlock(partition).await?;
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        Ok(Some(Fence {
            scope: self.scope.clone(),
            partition,
            token,
        }))
    }

    /// Gives `fence`'s partition up (its work already stopped). Its row keeps the last
    /// holder's name: a roster lists only partitions whose lock is held.
    pub async fn release(&mut self, fence: &Fence) -> Result<(), sqlx::Error> {
        self.unlock(fence.partition).await
    }

    async fn unlock(&mut self, partition: i32) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_advisory_unlock(hashtext($1), $2)")
            .bind(&self.scope)
            .bind(partition)
            .execute(&mut self.connection)
            .await?;
        Ok(())
    }

    /// Leaves the roster and ends the session (every lock with it).
    pub async fn leave(mut self) {
        let _ = sqlx::query("DELETE FROM engine_member WHERE scope = $1 AND member = $2")
            .bind(&self.scope)
            .bind(&self.member)
            .execute(&mut self.connection)
            .await;
        let _ = self.connection.close().await;
    }
}
