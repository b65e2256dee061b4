//! The PostgreSQL users mirror against the real PostgreSQL and NATS: each test has its own
//! table in the `test` database, dropped at the end.

use std::time::{Duration, Instant};

use protocol::{EventType, Origin};
use serde_json::json;
use sqlx::postgres::PgPool;
use sqlx::Row;
use tests::env::{now_ms, EnvOptions, TestEnv, POSTGRES_ADMIN_URL};
use tests::receiver::Receiver;
use tests::TEST_SECRET;

const BA: Origin = Origin::BetterAuth;
const WAIT: Duration = Duration::from_secs(30);

struct Mirror {
    env: TestEnv,
    pool: PgPool,
    table: String,
    _payload: Receiver,
    _better_auth: Receiver,
}

async fn pool() -> PgPool {
    PgPool::connect(POSTGRES_ADMIN_URL)
        .await
        .expect("PostgreSQL must run on 127.0.0.1:5432 (scripts/services.sh starts it)")
}

/// A world whose engine mirrors into a fresh table; `before` runs SQL first (with `{t}` for the
/// table name), to plant rows or a table of another shape.
async fn mirror(on_delete: &str, before: &[&str]) -> Mirror {
    let table = format!("m_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let pool = pool().await;
    for sql in before {
        sqlx::query(&sql.replace("{t}", &table))
            .execute(&pool)
            .await
            .expect("setup SQL");
    }
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let options = EnvOptions {
        extra_toml: format!(
            "[mirror]\nenabled = true\nurl = \"{POSTGRES_ADMIN_URL}\"\ntable = \"{table}\"\ndefault_organization_id = \"org_default\"\non_delete = \"{on_delete}\"\n"
        ),
        ..EnvOptions::default()
    };
    let env = TestEnv::new(&payload.url, &better_auth.url, options).await;
    Mirror {
        env,
        pool,
        table,
        _payload: payload,
        _better_auth: better_auth,
    }
}

/// The table the way the engine would create it, for tests that plant rows first.
const CREATE: &str = "create table {t} (id bigserial primary key, auth_id text unique, \
     email text unique, name text, roles text[] not null default '{}', organization_id text, \
     active boolean not null default true, created_at timestamptz not null default now(), \
     updated_at timestamptz not null default now(), last_event_id text, last_event_at timestamptz)";

impl Mirror {
    /// Waits until the mirror has handled `n` events in all (written or found stale).
    async fn wait_handled(&self, n: f64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let handled = self.env.metric("sync_engine_mirror_applied_total").await
                + self.env.metric("sync_engine_mirror_stale_total").await;
            if handled >= n {
                assert_eq!(handled, n, "more events handled than published");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mirror handled {handled} of {n} events:\n{}",
                self.env.engine_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every row as text, ordered: what must not change on a replay.
    async fn snapshot(&self) -> Vec<String> {
        let sql = format!(
            "select row_to_json(t)::text as row from {} t order by id",
            self.table
        );
        sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await
            .expect("read table")
            .iter()
            .map(|r| r.get::<String, _>("row"))
            .collect()
    }

    async fn row(&self, auth_id: &str) -> Option<sqlx::postgres::PgRow> {
        sqlx::query(&format!(
            "select email, name, roles, organization_id, active, last_event_id, id from {} where auth_id = $1",
            self.table
        ))
        .bind(auth_id)
        .fetch_optional(&self.pool)
        .await
        .expect("read row")
    }

    async fn cleanup(self) {
        let _ = sqlx::query(&format!(
            "drop table if exists {t}; drop table if exists {t}_sync_tombstones",
            t = self.table
        ))
        .execute(&self.pool)
        .await;
        self.env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_updated_deleted_become_an_upsert_and_a_deactivation() {
    let mut m = mirror("deactivate", &[]).await;
    m.env.start_engine().await;
    let t = now_ms();
    m.env
        .publish(
            "m-c1",
            BA,
            EventType::Created,
            t,
            json!({"id": "u1", "email": "ada@example.com", "name": "Ada", "role": "admin,editor",
                   "createdAt": "2024-03-01T12:00:00.000Z"}),
        )
        .await;
    m.env
        .publish(
            "m-c2",
            BA,
            EventType::Created,
            t,
            json!({"id": "u2", "email": "bob@example.com", "name": "Bob", "roles": ["viewer"],
                   "organizationId": "org_7"}),
        )
        .await;
    m.wait_handled(2.0).await;
    let row = m.row("u1").await.expect("u1 mirrored");
    assert_eq!(row.get::<String, _>("email"), "ada@example.com");
    assert_eq!(row.get::<String, _>("name"), "Ada");
    assert_eq!(row.get::<Vec<String>, _>("roles"), vec!["admin", "editor"]);
    assert_eq!(row.get::<String, _>("organization_id"), "org_default");
    assert!(row.get::<bool, _>("active"));
    let created: i64 = sqlx::query_scalar(&format!(
        "select (extract(epoch from created_at) * 1000)::bigint from {} where auth_id = 'u1'",
        m.table
    ))
    .fetch_one(&m.pool)
    .await
    .expect("created_at");
    assert_eq!(
        created, 1_709_294_400_000,
        "created_at is Better Auth's createdAt"
    );
    let row = m.row("u2").await.expect("u2 mirrored");
    assert_eq!(row.get::<Vec<String>, _>("roles"), vec!["viewer"]);
    assert_eq!(row.get::<String, _>("organization_id"), "org_7");

    m.env
        .publish(
            "m-u1",
            BA,
            EventType::Updated,
            t + 10,
            json!({"id": "u1", "email": "ada@lovelace.org", "name": "Ada King", "role": "admin"}),
        )
        .await;
    m.env
        .publish("m-d1", BA, EventType::Deleted, t + 20, json!({"id": "u1"}))
        .await;
    // After the deletion, a late update (as a replayed old event would be) changes nothing.
    m.env
        .publish(
            "m-u1-late",
            BA,
            EventType::Updated,
            t + 30,
            json!({"id": "u1", "email": "ada@lovelace.org", "name": "Back?"}),
        )
        .await;
    m.wait_handled(5.0).await;
    let row = m.row("u1").await.expect("u1 kept, deactivated");
    assert_eq!(row.get::<String, _>("email"), "ada@lovelace.org");
    assert_eq!(row.get::<String, _>("name"), "Ada King");
    assert_eq!(row.get::<Vec<String>, _>("roles"), vec!["admin"]);
    assert!(!row.get::<bool, _>("active"), "deactivated");
    assert_eq!(row.get::<String, _>("last_event_id"), "m-d1");
    assert_eq!(m.env.metric("sync_engine_mirror_stale_total").await, 1.0);
    m.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_delete_delete_removes_the_row_for_good() {
    let mut m = mirror("delete", &[]).await;
    m.env.start_engine().await;
    let t = now_ms();
    m.env
        .publish(
            "d-c",
            BA,
            EventType::Created,
            t,
            json!({"id": "u1", "email": "a@x"}),
        )
        .await;
    m.env
        .publish("d-d", BA, EventType::Deleted, t + 1, json!({"id": "u1"}))
        .await;
    m.env
        .publish(
            "d-u",
            BA,
            EventType::Updated,
            t + 2,
            json!({"id": "u1", "email": "a@x"}),
        )
        .await;
    m.wait_handled(3.0).await;
    assert!(m.row("u1").await.is_none(), "deleted, and not brought back");
    m.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_known_by_email_is_linked_and_an_inactive_holder_releases_its_email() {
    let mut m = mirror(
        "deactivate",
        &[
            CREATE,
            "insert into {t} (email, name) values ('link@x', 'Known before')",
            "insert into {t} (auth_id, email, name, active) values ('gone', 'reuse@x', 'Old', false)",
        ],
    )
    .await;
    let linked_id: i64 = sqlx::query_scalar(&format!(
        "select id from {} where email = 'link@x'",
        m.table
    ))
    .fetch_one(&m.pool)
    .await
    .expect("planted row");
    m.env.start_engine().await;
    let t = now_ms();
    m.env
        .publish(
            "l-1",
            BA,
            EventType::Created,
            t,
            json!({"id": "u-link", "email": "link@x", "name": "Linked"}),
        )
        .await;
    m.env
        .publish(
            "l-2",
            BA,
            EventType::Created,
            t,
            json!({"id": "u-new", "email": "reuse@x", "name": "New owner"}),
        )
        .await;
    m.wait_handled(2.0).await;
    let row = m.row("u-link").await.expect("linked");
    assert_eq!(
        row.get::<i64, _>("id"),
        linked_id,
        "the existing row, not a new one"
    );
    assert_eq!(row.get::<String, _>("name"), "Linked");
    let row = m.row("u-new").await.expect("new user");
    assert_eq!(row.get::<String, _>("email"), "reuse@x");
    let old = m.row("gone").await.expect("inactive row kept");
    assert_eq!(
        old.get::<Option<String>, _>("email"),
        None,
        "email released"
    );
    assert_eq!(
        m.env
            .metric("sync_engine_mirror_email_conflicts_total")
            .await,
        0.0
    );
    m.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_held_by_a_newer_active_row_is_not_taken_and_the_sink_goes_on() {
    let mut m = mirror("deactivate", &[]).await;
    m.env.start_engine().await;
    let t = now_ms();
    m.env
        .publish(
            "c-1",
            BA,
            EventType::Created,
            t + 100,
            json!({"id": "u1", "email": "same@x"}),
        )
        .await;
    // An older event of another user claims the same email (redelivered late, say).
    m.env
        .publish(
            "c-2",
            BA,
            EventType::Created,
            t,
            json!({"id": "u2", "email": "same@x", "name": "Two"}),
        )
        .await;
    m.env
        .publish(
            "c-3",
            BA,
            EventType::Created,
            t + 200,
            json!({"id": "u3", "email": "three@x"}),
        )
        .await;
    m.wait_handled(3.0).await;
    assert_eq!(
        m.row("u1").await.expect("u1").get::<String, _>("email"),
        "same@x"
    );
    let two = m.row("u2").await.expect("u2 written anyway");
    assert_eq!(two.get::<Option<String>, _>("email"), None);
    assert_eq!(two.get::<String, _>("name"), "Two");
    assert!(m.row("u3").await.is_some(), "the sink went on");
    assert_eq!(
        m.env
            .metric("sync_engine_mirror_email_conflicts_total")
            .await,
        1.0
    );
    // The newer claim wins: u2 now has a newer event with that email, u1 had the older one.
    m.env
        .publish(
            "c-4",
            BA,
            EventType::Updated,
            t + 300,
            json!({"id": "u2", "email": "same@x"}),
        )
        .await;
    m.wait_handled(4.0).await;
    assert_eq!(
        m.row("u2").await.expect("u2").get::<String, _>("email"),
        "same@x"
    );
    assert_eq!(
        m.row("u1")
            .await
            .expect("u1")
            .get::<Option<String>, _>("email"),
        None
    );
    m.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_same_events_leaves_the_table_unchanged_and_older_events_are_ignored() {
    let mut m = mirror("deactivate", &[]).await;
    m.env.start_engine().await;
    let t = now_ms();
    let events = [
        (
            "r-1",
            EventType::Created,
            t,
            json!({"id": "u1", "email": "a@x", "name": "A1"}),
        ),
        (
            "r-2",
            EventType::Updated,
            t + 2000,
            json!({"id": "u1", "email": "a@x", "name": "A3"}),
        ),
        // Older than r-2: must not overwrite it.
        (
            "r-3",
            EventType::Updated,
            t + 1000,
            json!({"id": "u1", "email": "a@x", "name": "A2"}),
        ),
        (
            "r-4",
            EventType::Created,
            t,
            json!({"id": "u2", "email": "b@x", "name": "B"}),
        ),
        ("r-5", EventType::Deleted, t + 10, json!({"id": "u2"})),
    ];
    for (id, ty, ts, data) in &events {
        m.env.publish(id, BA, *ty, *ts, data.clone()).await;
    }
    m.wait_handled(5.0).await;
    assert_eq!(
        m.row("u1").await.expect("u1").get::<String, _>("name"),
        "A3"
    );
    assert_eq!(
        m.env.metric("sync_engine_mirror_stale_total").await,
        1.0,
        "r-3"
    );
    let before = m.snapshot().await;

    // The same events again, as a replay publishes them (new message ids, same event ids).
    for (id, ty, ts, data) in &events {
        let body = json!({"id": id, "origin": "better-auth", "type": ty.as_str(), "timestamp": ts, "data": data});
        let subject = m.env.subject(BA, *ty, data["id"].as_str().unwrap_or("x"));
        m.env
            .publish_raw(
                &subject,
                &format!("{id}-again"),
                body.to_string().into_bytes(),
            )
            .await;
    }
    m.wait_handled(10.0).await;
    assert_eq!(m.snapshot().await, before, "a replay changes nothing");
    m.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_table_without_the_needed_columns_stops_startup_with_their_names() {
    let m = mirror(
        "deactivate",
        &["create table {t} (id bigserial primary key, email text, name text)"],
    )
    .await;
    let mut child = m
        .env
        .command(&["run"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start engine");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the engine should have refused to start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let output = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!status.success());
    assert!(
        stderr.contains("lacks the column(s) auth_id, roles, organization_id, active, created_at, updated_at, last_event_id, last_event_at"),
        "{stderr}"
    );
    assert!(stderr.contains(&m.table), "{stderr}");
    m.cleanup().await;
}
