//! The PostgreSQL users mirror (`[mirror]`): a backend's own `users` table, kept in step with
//! Better Auth's events by the mirror actor.
//!
//! Rules, in the order one change meets them (the README lists them for operators):
//! 1. Deletion is final: a user deleted once (remembered in `<table>_sync_tombstones`, whatever
//!    `on_delete` says) is never written again.
//! 2. Order: a row remembers the `(last_event_at, last_event_id)` of the event that last wrote
//!    it; a change that is not newer changes nothing. Replays are therefore no-ops, and an
//!    older event arriving late never overwrites a newer row.
//! 3. Linking: no row has the `auth_id` yet, but one without an `auth_id` has the email (a user
//!    the backend knew before): that row is linked and updated.
//! 4. Email release: another row holds the email and is inactive: its email is cleared and the
//!    email goes to this user.
//! 5. Remaining conflict: another *active* row holds the email. Better Auth keeps emails unique
//!    at any instant, so the newer event is the truth: if the holder was last written by an
//!    older event (or by none, for an unlinked row), its email is cleared and the email goes to
//!    this user; otherwise this user's row is written without the new email and the conflict is
//!    counted (`sync_engine_mirror_email_conflicts_total`). The sink never stops on it.

use actors::mirror::{MirrorChange, MirrorChangeKind, MirrorOutcome};
use actors::ports::{BoxFuture, MirrorStore};
use actors::PortError;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};

use crate::config::{MirrorConfig, OnDelete};

/// Columns the engine writes; an existing table must have them all.
pub const REQUIRED_COLUMNS: [&str; 11] = [
    "auth_id",
    "email",
    "name",
    "roles",
    "organization_id",
    "active",
    "created_at",
    "updated_at",
    "last_event_id",
    "last_event_at",
    "id",
];

/// Milliseconds since the epoch as a `timestamptz`, exactly (no float rounding).
const TS: &str = "(timestamptz 'epoch' + $1::bigint * interval '1 millisecond')";

#[derive(Debug, Clone)]
pub struct PgMirror {
    pool: PgPool,
    /// The quoted table name, e.g. `"public"."users"`.
    table: String,
    /// The quoted tombstone table name.
    tombstones: String,
    on_delete: OnDelete,
}

fn quote(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{part}\""))
        .collect::<Vec<_>>()
        .join(".")
}

impl PgMirror {
    /// Connects, creates the table if it is missing, and checks an existing one has every
    /// column the mirror writes.
    pub async fn connect(config: &MirrorConfig) -> anyhow::Result<PgMirror> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(&config.url)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "mirror.url: cannot connect to the mirror database at {}: {}",
                    crate::redact::url(&config.url),
                    super::errors::describe(&e)
                )
            })?;
        let mirror = PgMirror {
            pool,
            table: quote(&config.table),
            tombstones: quote(&format!("{}_sync_tombstones", config.table)),
            on_delete: config.on_delete,
        };
        mirror.prepare(&config.table).await?;
        Ok(mirror)
    }

    async fn prepare(&self, table_name: &str) -> anyhow::Result<()> {
        let (schema, name) = match table_name.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, table_name),
        };
        let columns: Vec<String> = sqlx::query_scalar(
            "select column_name::text from information_schema.columns \
             where table_name = $1 and table_schema = coalesce($2, current_schema())",
        )
        .bind(name)
        .bind(schema)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| anyhow::anyhow!("mirror: cannot read the columns of {table_name}: {e}"))?;
        if columns.is_empty() {
            let ddl = format!(
                "create table if not exists {t} (
                    id bigserial primary key,
                    auth_id text unique,
                    email text unique,
                    name text,
                    roles text[] not null default '{{}}',
                    organization_id text,
                    active boolean not null default true,
                    created_at timestamptz not null default now(),
                    updated_at timestamptz not null default now(),
                    last_event_id text,
                    last_event_at timestamptz
                )",
                t = self.table
            );
            sqlx::query(&ddl)
                .execute(&self.pool)
                .await
                .map_err(|e| anyhow::anyhow!("mirror: cannot create table {table_name}: {e}"))?;
            tracing::info!(message = "Mirror table created.", table = %table_name);
        } else {
            let missing: Vec<&str> = REQUIRED_COLUMNS
                .iter()
                .copied()
                .filter(|c| !columns.iter().any(|have| have == c))
                .collect();
            if !missing.is_empty() {
                anyhow::bail!(
                    "mirror.table {table_name:?} exists but lacks the column(s) {}; add them (see the README's mirror section) or point mirror.table at another table",
                    missing.join(", ")
                );
            }
        }
        let ddl = format!(
            "create table if not exists {} (auth_id text primary key, event_id text not null, deleted_at timestamptz not null default now())",
            self.tombstones
        );
        sqlx::query(&ddl).execute(&self.pool).await.map_err(|e| {
            anyhow::anyhow!("mirror: cannot create the tombstone table of {table_name}: {e}")
        })?;
        Ok(())
    }

    pub async fn ping(&self) -> bool {
        sqlx::query("select 1").execute(&self.pool).await.is_ok()
    }

    async fn apply_change(&self, change: &MirrorChange) -> Result<MirrorOutcome, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let tombstoned: Option<String> = sqlx::query_scalar(&format!(
            "select event_id from {} where auth_id = $1",
            self.tombstones
        ))
        .bind(&change.auth_id)
        .fetch_optional(&mut *tx)
        .await?;
        if tombstoned.is_some() {
            return Ok(MirrorOutcome::Stale);
        }
        let row = sqlx::query(&format!(
            "select id, (last_event_at, coalesce(last_event_id, '')) >= ({TS}, $2::text) as newer \
             from {} where auth_id = $3 for update",
            self.table
        ))
        .bind(change.at_ms)
        .bind(&change.event_id)
        .bind(&change.auth_id)
        .fetch_optional(&mut *tx)
        .await?;
        let existing: Option<i64> = match &row {
            Some(row) => {
                let newer: Option<bool> = row.try_get("newer")?;
                if newer == Some(true) {
                    return Ok(MirrorOutcome::Stale);
                }
                Some(row.try_get("id")?)
            }
            None => None,
        };
        let outcome = match &change.kind {
            MirrorChangeKind::Delete => {
                self.delete(&mut tx, change, existing).await?;
                MirrorOutcome::Applied
            }
            MirrorChangeKind::Upsert { .. } => self.upsert(&mut tx, change, existing).await?,
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn delete(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        change: &MirrorChange,
        existing: Option<i64>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "insert into {} (auth_id, event_id) values ($1, $2) on conflict do nothing",
            self.tombstones
        ))
        .bind(&change.auth_id)
        .bind(&change.event_id)
        .execute(&mut **tx)
        .await?;
        let Some(id) = existing else {
            return Ok(());
        };
        match self.on_delete {
            OnDelete::Delete => {
                sqlx::query(&format!("delete from {} where id = $1", self.table))
                    .bind(id)
                    .execute(&mut **tx)
                    .await?;
            }
            OnDelete::Deactivate => {
                sqlx::query(&format!(
                    "update {} set active = false, updated_at = now(), last_event_at = {TS}, \
                     last_event_id = $2 where id = $3",
                    self.table
                ))
                .bind(change.at_ms)
                .bind(&change.event_id)
                .bind(id)
                .execute(&mut **tx)
                .await?;
            }
        }
        Ok(())
    }

    async fn upsert(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        change: &MirrorChange,
        mut existing: Option<i64>,
    ) -> Result<MirrorOutcome, sqlx::Error> {
        let MirrorChangeKind::Upsert {
            email,
            name,
            roles,
            organization_id,
            created_at_ms,
        } = &change.kind
        else {
            return Ok(MirrorOutcome::Stale);
        };
        let mut take_email = email.is_some();
        if let Some(email) = email {
            // Who else holds this email, and how recently they were written.
            let holder = sqlx::query(&format!(
                "select id, auth_id, active, \
                 coalesce(last_event_at < {TS}, true) as older \
                 from {} where email = $2 and id is distinct from $3 for update",
                self.table
            ))
            .bind(change.at_ms)
            .bind(email)
            .bind(existing)
            .fetch_optional(&mut **tx)
            .await?;
            if let Some(holder) = holder {
                let holder_id: i64 = holder.try_get("id")?;
                let holder_auth: Option<String> = holder.try_get("auth_id")?;
                let active: bool = holder.try_get("active")?;
                let older: bool = holder.try_get("older")?;
                if existing.is_none() && holder_auth.is_none() {
                    // Rule 3: a user the backend knew before; link it.
                    existing = Some(holder_id);
                } else if !active || older {
                    // Rules 4 and 5: the email moves to this user.
                    sqlx::query(&format!(
                        "update {} set email = null, updated_at = now() where id = $1",
                        self.table
                    ))
                    .bind(holder_id)
                    .execute(&mut **tx)
                    .await?;
                } else {
                    take_email = false;
                }
            }
        }
        let email = if take_email { email.clone() } else { None };
        match existing {
            Some(id) => {
                sqlx::query(&format!(
                    "update {} set auth_id = $3, email = case when $4 then $5 else email end, \
                     name = $6, roles = $7, organization_id = $8, active = true, \
                     updated_at = now(), last_event_at = {TS}, last_event_id = $2 \
                     where id = $9",
                    self.table
                ))
                .bind(change.at_ms)
                .bind(&change.event_id)
                .bind(&change.auth_id)
                .bind(take_email)
                .bind(&email)
                .bind(name)
                .bind(roles)
                .bind(organization_id)
                .bind(id)
                .execute(&mut **tx)
                .await?;
            }
            None => {
                sqlx::query(&format!(
                    "insert into {} (auth_id, email, name, roles, organization_id, active, \
                     created_at, updated_at, last_event_at, last_event_id) \
                     values ($3, $4, $5, $6, $7, true, \
                     coalesce(timestamptz 'epoch' + $8::bigint * interval '1 millisecond', now()), \
                     now(), {TS}, $2)",
                    self.table
                ))
                .bind(change.at_ms)
                .bind(&change.event_id)
                .bind(&change.auth_id)
                .bind(&email)
                .bind(name)
                .bind(roles)
                .bind(organization_id)
                .bind(created_at_ms)
                .execute(&mut **tx)
                .await?;
            }
        }
        Ok(if change_has_email(change) && !take_email {
            MirrorOutcome::AppliedWithoutEmail
        } else {
            MirrorOutcome::Applied
        })
    }
}

fn change_has_email(change: &MirrorChange) -> bool {
    matches!(
        &change.kind,
        MirrorChangeKind::Upsert { email: Some(_), .. }
    )
}

impl MirrorStore for PgMirror {
    fn apply<'a>(
        &'a self,
        change: &'a MirrorChange,
    ) -> BoxFuture<'a, Result<MirrorOutcome, PortError>> {
        Box::pin(async move {
            self.apply_change(change)
                .await
                .map_err(|e| PortError::unavailable("mirror", e))
        })
    }
}
