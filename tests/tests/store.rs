//! The state store on SQLite and on PostgreSQL: the same tests against both.

use actors::ports::{DeadLetter, StateStore};
use actors::sync::{Known, SyncState};
use bytes::Bytes;
use engine::adapters::store::SqlStore;
use protocol::{EventType, Origin, UserKey};
use serde_json::json;
use sqlx::Connection;
use tests::env::POSTGRES_ADMIN_URL;

/// A fresh PostgreSQL database for one test; dropped by the caller.
async fn fresh_postgres() -> (String, String) {
    let name = format!("sync_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL)
        .await
        .expect("PostgreSQL must run on 127.0.0.1:5432 (scripts/services.sh starts it)");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create test database");
    (
        name.clone(),
        format!("postgres://postgres@127.0.0.1:5432/{name}"),
    )
}

async fn drop_postgres(name: &str) {
    if let Ok(mut admin) = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
}

fn sample_state() -> SyncState {
    let mut state = SyncState::default();
    let fields = [
        ("id", json!("u1")),
        ("email", json!("a@x")),
        ("name", json!("Ada")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    state
        .record
        .merge("e1", Origin::BetterAuth, EventType::Created, 10, &fields);
    state.payload.known = Known::holds(fields);
    state.payload.last_delivery_ms = Some(99);
    state
}

async fn state_store_contract(store: SqlStore) {
    let key = UserKey::new("u1");
    assert_eq!(store.load_user(&key).await.expect("load"), None);
    let mut state = sample_state();
    store.save_user(&key, &state).await.expect("save");
    assert_eq!(
        store.load_user(&key).await.expect("load"),
        Some(state.clone())
    );
    // Saving again replaces the row.
    state.record.deleted_at = Some(20);
    store.save_user(&key, &state).await.expect("save again");
    assert_eq!(
        store.load_user(&key).await.expect("load"),
        Some(state.clone())
    );
    // A state handed over already encoded (an idle actor's last save) is the same row.
    state.record.deleted_at = Some(30);
    let stored = std::sync::Arc::from(actors::state_codec::encode(&state).expect("encode"));
    store
        .save_user_encoded(&key, &state, &stored)
        .await
        .expect("save encoded");
    assert_eq!(store.load_user(&key).await.expect("load"), Some(state));
    assert_eq!(
        store.load_user(&UserKey::new("other")).await.expect("load"),
        None
    );

    // Dead letters keep their raw bytes exactly, and can be listed and purged.
    let raw = Bytes::from_static(b"\xff\x00not json");
    for i in 0..3 {
        store
            .dead_letter(DeadLetter {
                subject: "user.updated.u1".into(),
                raw: raw.clone(),
                reason: "invalid_json".into(),
                event_id: (i == 0).then(|| "e9".to_string()),
                sink: (i == 1).then(|| "payload".to_string()),
                attempts: i,
                last_error: None,
                received_at_ms: 1_000 + i as i64,
            })
            .await
            .expect("dead letter");
    }
    let rows = store.dead_letters(None).await.expect("list");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].raw, raw.to_vec());
    assert_eq!(rows[0].event_id.as_deref(), Some("e9"));
    assert_eq!(rows[1].sink.as_deref(), Some("payload"));
    assert_eq!(rows[2].attempts, 2);
    assert_eq!(
        store
            .dead_letters(Some(rows[1].id))
            .await
            .expect("one")
            .len(),
        1
    );
    assert_eq!(
        store
            .purge_dead_letters(Some(rows[0].id))
            .await
            .expect("purge one"),
        1
    );
    assert_eq!(store.purge_dead_letters(None).await.expect("purge all"), 2);
    assert!(store.dead_letters(None).await.expect("list").is_empty());
}

#[tokio::test]
async fn sqlite_store_keeps_state_and_dead_letters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/nested/sync.db", dir.path().display());
    let store = SqlStore::connect(&url)
        .await
        .expect("open sqlite (creates folder and file)");
    state_store_contract(store).await;
    // Migrations are idempotent: opening again works and keeps data.
    let again = SqlStore::connect(&url).await.expect("reopen");
    assert!(again.ping().await);
}

#[tokio::test]
async fn postgres_store_keeps_state_and_dead_letters() {
    let (name, url) = fresh_postgres().await;
    let store = SqlStore::connect(&url).await.expect("open postgres");
    state_store_contract(store).await;
    let again = SqlStore::connect(&url)
        .await
        .expect("reconnect, migrations idempotent");
    assert!(again.ping().await);
    drop(again);
    drop_postgres(&name).await;
}

#[tokio::test]
async fn state_survives_across_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/sync.db", dir.path().display());
    let key = UserKey::new("u1");
    {
        let store = SqlStore::connect(&url).await.expect("open");
        store.save_user(&key, &sample_state()).await.expect("save");
    }
    let store = SqlStore::connect(&url).await.expect("reopen");
    assert_eq!(
        store.load_user(&key).await.expect("load"),
        Some(sample_state())
    );
}

/// Saves started one after the other without waiting are committed in that order (the last
/// one wins), however the writer groups them into transactions, on both stores; and a load
/// sees the latest save queued before it, committed or not.
async fn saves_keep_their_order(store: SqlStore) {
    let keys: Vec<UserKey> = (0..50).map(|i| UserKey::new(format!("u{i}"))).collect();
    let mut pending = Vec::new();
    for version in 1..=20i64 {
        for key in &keys {
            let mut state = sample_state();
            state.sent_ts_ms = version;
            pending.push(store.save_user(key, &state));
        }
    }
    for key in [&keys[0], &keys[49]] {
        let queued = store.load_user(key).await.expect("load").expect("queued");
        assert_eq!(queued.sent_ts_ms, 20, "{key} before its saves are awaited");
    }
    for saved in pending {
        saved.await.expect("save");
    }
    for key in &keys {
        let loaded = store.load_user(key).await.expect("load").expect("saved");
        assert_eq!(loaded.sent_ts_ms, 20, "{key}");
    }
}

#[tokio::test]
async fn sqlite_saves_keep_their_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/sync.db", dir.path().display());
    saves_keep_their_order(SqlStore::connect(&url).await.expect("open")).await;
}

/// A save nobody waits for (an idle user's last acceptance) is written by the time `flush`
/// returns: another connection reads it from the table.
#[tokio::test]
async fn a_flush_writes_the_saves_nobody_waited_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/sync.db", dir.path().display());
    let store = SqlStore::connect(&url).await.expect("open");
    let key = UserKey::new("u-flush");
    let mut state = sample_state();
    state.sent_ts_ms = 42;
    drop(store.save_user(&key, &state));
    store.flush().await;
    let other = SqlStore::connect(&url).await.expect("open again");
    let loaded = other.load_user(&key).await.expect("load").expect("written");
    assert_eq!(loaded.sent_ts_ms, 42);
}

#[tokio::test]
async fn postgres_saves_keep_their_order() {
    let (name, url) = fresh_postgres().await;
    saves_keep_their_order(SqlStore::connect(&url).await.expect("open postgres")).await;
    drop_postgres(&name).await;
}

/// A store that a version keeping states as JSON text wrote (`0001_init.sql` only, one user's
/// state as text, left by `write_as_before`): opening it migrates it, and the state still
/// loads, and loads again once saved in the new form.
async fn json_states_of_an_earlier_version_still_load<F>(url: &str, write_as_before: F)
where
    F: std::future::Future<Output = ()>,
{
    write_as_before.await;
    let state = sample_state();
    let store = SqlStore::connect(url).await.expect("open and migrate");
    let key = UserKey::new("u1");
    assert_eq!(
        store.load_user(&key).await.expect("load"),
        Some(state.clone())
    );
    store.save_user(&key, &state).await.expect("save");
    let again = SqlStore::connect(url).await.expect("reopen");
    assert_eq!(again.load_user(&key).await.expect("load"), Some(state));
}

/// Writes the store as a version that kept states as JSON text would have: its first
/// migration only, and `sample_state()` as text for user `u1`.
macro_rules! write_as_before {
    ($connection:ty, $url:expr, $schema:expr) => {
        async {
            let mut old = <$connection>::connect($url).await.expect("open as before");
            sqlx::raw_sql($schema)
                .execute(&mut old)
                .await
                .expect("earlier schema");
            let json = serde_json::to_string(&sample_state()).expect("encode");
            sqlx::query(
                "INSERT INTO user_state (user_key, state, updated_at) VALUES ('u1', $1, 1)",
            )
            .bind(json)
            .execute(&mut old)
            .await
            .expect("a JSON state, as text");
            old.close().await.expect("close");
        }
    };
}

#[tokio::test]
async fn sqlite_json_states_of_earlier_versions_still_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/sync.db?mode=rwc", dir.path().display());
    let before = write_as_before!(
        sqlx::SqliteConnection,
        &url,
        include_str!("../../engine/migrations/sqlite/0001_init.sql")
    );
    json_states_of_an_earlier_version_still_load(&url, before).await;
}

#[tokio::test]
async fn postgres_json_states_of_earlier_versions_still_load() {
    let (name, url) = fresh_postgres().await;
    let before = write_as_before!(
        sqlx::PgConnection,
        &url,
        include_str!("../../engine/migrations/postgres/0001_init.sql")
    );
    json_states_of_an_earlier_version_still_load(&url, before).await;
    drop_postgres(&name).await;
}

/// Leases on PostgreSQL: one holder per partition, a member name once, and a save of a holder
/// whose lease passed on is refused by the fencing token, while the new holder's commits.
#[tokio::test]
async fn a_stale_lease_holder_cannot_save() {
    use engine::adapters::lease_pg::PgLeases;
    use std::time::Duration;
    let (name, url) = fresh_postgres().await;
    let store = SqlStore::connect(&url)
        .await
        .expect("open postgres (migrates)");
    let idle = Duration::from_secs(30);
    let mut a = PgLeases::connect(&url, "S", "a", idle).await.expect("a");
    let mut b = PgLeases::connect(&url, "S", "b", idle).await.expect("b");
    let twin = PgLeases::connect(&url, "S", "a", idle).await;
    let refused = twin.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(refused.contains("cluster.member"), "{refused}");

    let fence_a = a.try_acquire(3).await.expect("query").expect("free");
    assert!(
        b.try_acquire(3).await.expect("query").is_none(),
        "held by a"
    );
    let roster = b.heartbeat(&[3, 4]).await.expect("roster");
    assert_eq!(roster.holders.get(&3).map(String::as_str), Some("a"));
    assert!(!roster.holders.contains_key(&4));
    let key = UserKey::new("u1");
    let stale = store.fenced(fence_a.clone()).expect("a postgres store");
    stale
        .save_user(&key, &sample_state())
        .await
        .expect("a holds it");

    a.release(&fence_a).await.expect("release");
    let fence_b = b.try_acquire(3).await.expect("query").expect("free again");
    assert_eq!(fence_b.token, fence_a.token + 1);
    let error = stale
        .save_user(&key, &SyncState::default())
        .await
        .expect_err("a's lease passed on");
    assert!(error.to_string().contains("lease lost"), "{error}");
    let current = store.fenced(fence_b).expect("a postgres store");
    current
        .save_user(&key, &sample_state())
        .await
        .expect("b holds it");
    assert_eq!(
        store.load_user(&key).await.expect("load"),
        Some(sample_state())
    );
    drop((a, b, stale, current, store));
    drop_postgres(&name).await;
}
