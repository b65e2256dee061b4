//! The applications' own user tables, made the way Better Auth and Payload make them, for the
//! tests of `backfill` and `reconcile`; a throwaway PostgreSQL database per test; and reading a
//! test's stream back.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{PgPool, SqlitePool};

use crate::env::POSTGRES_ADMIN_URL;

/// Better Auth's user table in SQLite, as its Kysely migration creates it. Dates are declared
/// `date`; SQLite keeps whatever it is given (ISO text or integer milliseconds).
pub const BETTER_AUTH_SQLITE: &str = r#"CREATE TABLE "user" (
    "id" text NOT NULL PRIMARY KEY,
    "name" text NOT NULL,
    "email" text NOT NULL UNIQUE,
    "emailVerified" integer NOT NULL,
    "image" text,
    "createdAt" date NOT NULL,
    "updatedAt" date NOT NULL
)"#;

/// Better Auth's user table in PostgreSQL (`user` is reserved: always quoted).
pub const BETTER_AUTH_POSTGRES: &str = r#"CREATE TABLE "user" (
    "id" text NOT NULL PRIMARY KEY,
    "name" text NOT NULL,
    "email" text NOT NULL UNIQUE,
    "emailVerified" boolean NOT NULL,
    "image" text,
    "createdAt" timestamptz DEFAULT CURRENT_TIMESTAMP NOT NULL,
    "updatedAt" timestamp DEFAULT CURRENT_TIMESTAMP NOT NULL
)"#;

/// Payload's users collection as its PostgreSQL adapter creates it (snake_case columns).
pub const PAYLOAD_POSTGRES: &str = r#"CREATE TABLE "users" (
    "id" serial PRIMARY KEY NOT NULL,
    "email" varchar NOT NULL,
    "full_name" varchar,
    "better_auth_user_id" varchar,
    "updated_at" timestamp(3) with time zone DEFAULT now() NOT NULL,
    "created_at" timestamp(3) with time zone DEFAULT now() NOT NULL
)"#;

/// Payload's users collection as its SQLite adapter creates it.
pub const PAYLOAD_SQLITE: &str = r#"CREATE TABLE `users` (
    `id` integer PRIMARY KEY NOT NULL,
    `email` text NOT NULL,
    `full_name` text,
    `better_auth_user_id` text,
    `updated_at` text DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) NOT NULL,
    `created_at` text DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) NOT NULL
)"#;

/// One Better Auth user as a test writes it.
#[derive(Debug, Clone)]
pub struct BaUser {
    pub id: String,
    pub name: String,
    pub email: String,
    pub email_verified: bool,
    pub image: Option<String>,
    /// Milliseconds since the epoch.
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// `n` users with random ids like Better Auth's (and one with a dot, which cannot be a subject
/// token nor part of an event id).
pub fn ba_users(n: usize) -> Vec<BaUser> {
    (0..n)
        .map(|i| {
            let id = if i == 7 {
                format!("odd.id.{i}")
            } else {
                uuid::Uuid::new_v4().simple().to_string()
            };
            BaUser {
                id,
                name: format!("User {i}"),
                email: format!("user{i}@example.com"),
                email_verified: i % 3 == 0,
                image: (i % 5 == 0).then(|| format!("https://example.com/{i}.png")),
                created_at_ms: 1_700_000_000_000 + i as i64 * 1000,
                updated_at_ms: 1_710_000_000_000 + i as i64 * 1000 + 123,
            }
        })
        .collect()
}

/// Milliseconds as `2024-05-01T12:00:00.123Z`.
pub fn iso(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// A new SQLite database file at `path`.
pub async fn sqlite(path: &std::path::Path) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true);
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("create a SQLite database")
}

/// Writes `users` into Better Auth's SQLite table; dates alternate between ISO text and
/// integer milliseconds, as different Better Auth versions and drivers store them.
pub async fn insert_ba_sqlite(pool: &SqlitePool, users: &[BaUser]) {
    let mut tx = pool.begin().await.expect("begin");
    for (i, user) in users.iter().enumerate() {
        let query = sqlx::query(
            r#"INSERT INTO "user" ("id", "name", "email", "emailVerified", "image", "createdAt", "updatedAt") VALUES ($1, $2, $3, $4, $5, $6, $7)"#,
        )
        .bind(&user.id)
        .bind(&user.name)
        .bind(&user.email)
        .bind(user.email_verified)
        .bind(&user.image);
        let query = if i % 2 == 0 {
            query
                .bind(iso(user.created_at_ms))
                .bind(iso(user.updated_at_ms))
        } else {
            query
                .bind(user.created_at_ms.to_string())
                .bind(user.updated_at_ms)
        };
        query.execute(&mut *tx).await.expect("insert user");
    }
    tx.commit().await.expect("commit");
}

/// Writes `users` into Better Auth's PostgreSQL table, in one statement.
pub async fn insert_ba_postgres(pool: &PgPool, users: &[BaUser]) {
    let column = |f: &dyn Fn(&BaUser) -> String| users.iter().map(f).collect::<Vec<String>>();
    sqlx::query(
        r#"INSERT INTO "user" ("id", "name", "email", "emailVerified", "image", "createdAt", "updatedAt")
           SELECT id, name, email, verified::boolean, image, created::timestamptz, (updated::timestamptz AT TIME ZONE 'UTC')
           FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
             AS t(id, name, email, verified, image, created, updated)"#,
    )
    .bind(column(&|u| u.id.clone()))
    .bind(column(&|u| u.name.clone()))
    .bind(column(&|u| u.email.clone()))
    .bind(column(&|u| u.email_verified.to_string()))
    .bind(
        users
            .iter()
            .map(|u| u.image.clone())
            .collect::<Vec<Option<String>>>(),
    )
    .bind(column(&|u| iso(u.created_at_ms)))
    .bind(column(&|u| iso(u.updated_at_ms)))
    .execute(pool)
    .await
    .expect("insert users");
}

/// A PostgreSQL database of one test, dropped by [`PgDatabase::drop_database`].
pub struct PgDatabase {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl PgDatabase {
    /// Creates `<prefix>_<random>`. Fails loudly when PostgreSQL is not there.
    pub async fn create(prefix: &str) -> PgDatabase {
        let admin = admin().await;
        let name = format!(
            "{prefix}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin)
            .await
            .expect("create the test database");
        admin.close().await;
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .expect("connect to the test database");
        PgDatabase { name, url, pool }
    }

    pub async fn drop_database(self) {
        self.pool.close().await;
        let admin = admin().await;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&admin)
        .await
        .expect("drop the test database");
        admin.close().await;
    }
}

async fn admin() -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .connect(POSTGRES_ADMIN_URL)
        .await
        .expect("PostgreSQL must run on 127.0.0.1:5432 with trust auth and a database `test` (scripts/services.sh starts it)")
}

/// Every message of `stream` as (subject, parsed body), in stream order; empty when the stream
/// does not exist.
pub async fn read_stream(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Vec<(String, Value)> {
    let Ok(mut stream) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let count = stream.info().await.expect("stream info").state.messages as usize;
    if count == 0 {
        return Vec::new();
    }
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("ordered consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the stream's messages within 10s")
            .expect("a message")
            .expect("a readable message");
        let body: Value = serde_json::from_slice(&message.payload).expect("a JSON envelope");
        out.push((message.subject.to_string(), body));
    }
    out
}

/// How many messages `stream` holds (0 when it does not exist).
pub async fn stream_count(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut stream) => stream.info().await.expect("stream info").state.messages,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn iso_dates() {
        assert_eq!(super::iso(1_714_564_800_123), "2024-05-01T12:00:00.123Z");
        assert_eq!(super::iso(0), "1970-01-01T00:00:00.000Z");
    }
}
