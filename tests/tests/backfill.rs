//! `sync-engine backfill` against the real NATS, from a Better Auth user table of 10,000 users
//! in SQLite and in PostgreSQL: every user published exactly once, a second run publishes
//! nothing, an interrupted run resumes without duplicates, and `--dry-run` publishes nothing.

use std::collections::HashSet;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::env::{EnvOptions, TestEnv};
use tests::text;
use tests::user_tables::{
    ba_users, insert_ba_postgres, insert_ba_sqlite, iso, read_stream, sqlite, stream_count, BaUser,
    PgDatabase, BETTER_AUTH_POSTGRES, BETTER_AUTH_SQLITE,
};

const USERS: usize = 10_000;
/// Backfill delivers nothing itself: the targets are never called.
const UNUSED_TARGET: &str = "http://127.0.0.1:9/unused";

/// How the resume scenario stops the first run.
#[derive(Debug, Clone, Copy)]
enum Interruption {
    /// SIGKILL in the middle of a rate-limited run.
    Kill,
    /// `--limit`: a clean stop after that many users.
    Limit(u64),
}

async fn test_env() -> TestEnv {
    TestEnv::new(UNUSED_TARGET, UNUSED_TARGET, EnvOptions::default()).await
}

/// Runs `backfill` to completion; it must succeed. Returns standard output and error.
fn backfill(env: &TestEnv, url: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["backfill", "--from-better-auth", url];
    args.extend_from_slice(extra);
    let output = env
        .command(&args)
        .output()
        .expect("run sync-engine backfill");
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success(),
        "backfill {extra:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    (stdout, stderr)
}

/// A number of the summary (`published: 10000`).
fn summary(stdout: &str, key: &str) -> u64 {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}: ")))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key:?} in the summary:\n{stdout}"))
}

/// The stream holds one `user.created` per user and nothing else, and one envelope carries
/// exactly what the table holds.
async fn assert_published_once(env: &TestEnv, users: &[BaUser]) {
    let messages = read_stream(&env.js, &env.stream_of(protocol::Origin::BetterAuth)).await;
    assert_eq!(messages.len(), USERS, "messages in the stream");
    let mut event_ids = HashSet::new();
    let mut user_ids = HashSet::new();
    for (subject, body) in &messages {
        assert_eq!(body["type"], "user.created", "{body}");
        assert_eq!(body["origin"], "better-auth", "{body}");
        assert!(
            subject.starts_with(&format!("t{}.user.created", env.id)),
            "{subject}"
        );
        event_ids.insert(body["id"].as_str().expect("event id").to_string());
        user_ids.insert(body["data"]["id"].as_str().expect("user id").to_string());
    }
    assert_eq!(event_ids.len(), USERS, "distinct event ids");
    let expected: HashSet<String> = users.iter().map(|u| u.id.clone()).collect();
    assert_eq!(user_ids, expected, "every user, once");

    let find = |id: &str| {
        messages
            .iter()
            .find(|(_, body)| body["data"]["id"] == id)
            .unwrap_or_else(|| panic!("no event for user {id}"))
    };
    // Users 10 and 11: one with dates stored as text and an image, one with integer dates.
    for user in &users[10..12] {
        let (subject, body) = find(&user.id);
        assert_eq!(subject, &format!("t{}.user.created.{}", env.id, user.id));
        assert_eq!(body["id"], format!("backfill-{}", user.id));
        assert_eq!(body["timestamp"], user.updated_at_ms);
        let mut expected = serde_json::json!({
            "id": user.id,
            "email": user.email,
            "name": user.name,
            "emailVerified": user.email_verified,
            "createdAt": iso(user.created_at_ms),
            "updatedAt": iso(user.updated_at_ms),
        });
        if let Some(image) = &user.image {
            expected["image"] = Value::String(image.clone());
        }
        assert_eq!(body["data"], expected, "{body}");
    }
    // An id with dots: hashed event id, and the hashed user token (PROTOCOL.md §1, Partitions).
    let (subject, body) = find(&users[7].id);
    let token = protocol::partition::subject_token(&users[7].id);
    assert!(token.starts_with('h'), "{token}");
    assert_eq!(subject, &format!("t{}.user.created.{token}", env.id));
    let event_id = body["id"].as_str().expect("event id");
    assert!(event_id.starts_with("backfill-sha256:"), "{event_id}");
}

fn spawn_backfill(env: &TestEnv, url: &str, extra: &[&str]) -> Child {
    let mut args = vec!["backfill", "--from-better-auth", url];
    args.extend_from_slice(extra);
    env.command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sync-engine backfill")
}

/// Dry run, full run, second run, then an interrupted run on a fresh stream and its resumption.
/// Returns how long the full run of 10,000 users took.
async fn backfill_scenario(url: &str, users: &[BaUser], interruption: Interruption) -> Duration {
    let env = test_env().await;

    let (stdout, _) = backfill(&env, url, &["--dry-run"]);
    assert_eq!(summary(&stdout, "would publish"), USERS as u64, "{stdout}");
    assert_eq!(
        stream_count(&env.js, &env.stream_of(protocol::Origin::BetterAuth)).await,
        0,
        "a dry run publishes nothing"
    );

    let started = Instant::now();
    let (stdout, _) = backfill(&env, url, &[]);
    let full_run = started.elapsed();
    assert_eq!(summary(&stdout, "published"), USERS as u64, "{stdout}");
    assert_eq!(summary(&stdout, "invalid"), 0, "{stdout}");
    assert_published_once(&env, users).await;

    let (stdout, _) = backfill(&env, url, &[]);
    assert_eq!(summary(&stdout, "published"), 0, "{stdout}");
    assert_eq!(
        summary(&stdout, "skipped (already done)"),
        USERS as u64,
        "{stdout}"
    );
    assert_eq!(
        stream_count(&env.js, &env.stream_of(protocol::Origin::BetterAuth)).await,
        USERS as u64,
        "a second run publishes nothing"
    );
    env.cleanup().await;

    // A fresh stream: the checkpoint is per stream, so this starts from the first user.
    let env = test_env().await;
    match interruption {
        Interruption::Kill => {
            let mut child = spawn_backfill(&env, url, &["--rate", "2000/s"]);
            let deadline = Instant::now() + Duration::from_secs(30);
            while stream_count(&env.js, &env.stream_of(protocol::Origin::BetterAuth)).await < 2000 {
                assert!(
                    Instant::now() < deadline,
                    "the rate-limited run did not start"
                );
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("backfill exited early: {status}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            child.kill().expect("kill backfill");
            child.wait().expect("reap backfill");
        }
        Interruption::Limit(limit) => {
            let (stdout, _) = backfill(&env, url, &["--limit", &limit.to_string()]);
            assert_eq!(summary(&stdout, "published"), limit, "{stdout}");
            assert!(stdout.contains("--limit"), "{stdout}");
        }
    }
    let partial = stream_count(&env.js, &env.stream_of(protocol::Origin::BetterAuth)).await;
    assert!(
        partial > 0 && partial < USERS as u64,
        "the interrupted run published {partial}"
    );
    let (stdout, stderr) = backfill(&env, url, &[]);
    assert!(stderr.contains("resuming after user"), "{stderr}");
    assert!(
        summary(&stdout, "skipped (already done)") > 0,
        "the resumed run skipped nothing:\n{stdout}"
    );
    assert_published_once(&env, users).await;
    env.cleanup().await;
    full_run
}

/// A Better Auth SQLite database of [`USERS`] users, in a folder that lives as long as the
/// returned guard: (guard, URL, the users).
async fn sqlite_better_auth() -> (tempfile::TempDir, String, Vec<BaUser>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("auth.db");
    let pool = sqlite(&path).await;
    sqlx::query(BETTER_AUTH_SQLITE)
        .execute(&pool)
        .await
        .expect("create the user table");
    let users = ba_users(USERS);
    insert_ba_sqlite(&pool, &users).await;
    pool.close().await;
    let url = format!("sqlite://{}", path.display());
    (dir, url, users)
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_from_sqlite_publishes_every_user_once_and_resumes() {
    let (_dir, url, users) = sqlite_better_auth().await;
    let full_run = backfill_scenario(&url, &users, Interruption::Kill).await;
    eprintln!("timing: backfill of {USERS} users from SQLite took {full_run:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_from_postgres_publishes_every_user_once_and_resumes() {
    let db = PgDatabase::create("ba_backfill").await;
    sqlx::query(BETTER_AUTH_POSTGRES)
        .execute(&db.pool)
        .await
        .expect("create the user table");
    let users = ba_users(USERS);
    insert_ba_postgres(&db.pool, &users).await;

    let full_run = backfill_scenario(&db.url, &users, Interruption::Limit(3000)).await;
    eprintln!("timing: backfill of {USERS} users from PostgreSQL took {full_run:?}");
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_names_a_missing_column() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("auth.db");
    let pool = sqlite(&path).await;
    sqlx::query(r#"CREATE TABLE "user" ("id" text PRIMARY KEY, "name" text)"#)
        .execute(&pool)
        .await
        .expect("create a table without email");
    pool.close().await;
    let env = test_env().await;
    let output = env
        .command(&[
            "backfill",
            "--from-better-auth",
            &format!("sqlite://{}", path.display()),
        ])
        .output()
        .expect("run backfill");
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("table \"user\" has no column email"),
        "{stderr}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_pages_an_integer_key_in_numeric_order() {
    // Better Auth with numeric ids: as text, "1000" would sort before "999" and a resumed run
    // would skip or repeat users.
    let db = PgDatabase::create("ba_serial").await;
    sqlx::query(
        r#"CREATE TABLE "user" ("id" serial PRIMARY KEY, "name" text NOT NULL, "email" text NOT NULL UNIQUE,
           "emailVerified" boolean NOT NULL, "image" text, "createdAt" timestamptz NOT NULL, "updatedAt" timestamptz NOT NULL)"#,
    )
    .execute(&db.pool)
    .await
    .expect("create the user table");
    sqlx::query(
        r#"INSERT INTO "user" ("name", "email", "emailVerified", "createdAt", "updatedAt")
           SELECT 'User ' || i, 'user' || i || '@example.com', false, now(), now() FROM generate_series(1, 2500) i"#,
    )
    .execute(&db.pool)
    .await
    .expect("insert users");
    let env = test_env().await;
    let (stdout, _) = backfill(&env, &db.url, &["--limit", "1200"]);
    assert_eq!(summary(&stdout, "published"), 1200, "{stdout}");
    let (stdout, stderr) = backfill(&env, &db.url, &[]);
    assert!(stderr.contains("resuming after user \"1200\""), "{stderr}");
    assert_eq!(summary(&stdout, "published"), 1300, "{stdout}");
    let messages = read_stream(&env.js, &env.stream_of(protocol::Origin::BetterAuth)).await;
    let users: HashSet<String> = messages
        .iter()
        .map(|(_, body)| body["data"]["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!((messages.len(), users.len()), (2500, 2500));
    env.cleanup().await;
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfilled_users_are_each_delivered_once_through_the_engine() {
    let (_dir, url, users) = sqlite_better_auth().await;

    let payload = tests::receiver::Receiver::start(tests::TEST_SECRET).await;
    let better_auth = tests::receiver::Receiver::start(tests::TEST_SECRET).await;
    let mut env = TestEnv::new(&payload.url, &better_auth.url, EnvOptions::default()).await;
    env.start_engine().await;
    let (stdout, _) = backfill(&env, &url, &[]);
    assert_eq!(summary(&stdout, "published"), USERS as u64, "{stdout}");
    let delivered = payload
        .wait_accepted(Duration::from_secs(120), |r| r.len() >= USERS)
        .await;
    let ids: HashSet<String> = delivered
        .iter()
        .map(|d| d.webhook_id().to_string())
        .collect();
    assert_eq!(ids.len(), USERS, "each user delivered under its own id");
    let delivered_users: HashSet<String> = delivered
        .iter()
        .map(|d| {
            d.data("betterAuthUserId")
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let expected: HashSet<String> = users.iter().map(|u| u.id.clone()).collect();
    assert_eq!(delivered_users, expected, "every user reached Payload");

    // A second run publishes nothing, so nothing more is delivered.
    let (stdout, _) = backfill(&env, &url, &[]);
    assert_eq!(summary(&stdout, "published"), 0, "{stdout}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(payload.received().len(), USERS, "no delivery twice");
    assert!(
        better_auth.received().is_empty(),
        "nothing went back to Better Auth"
    );
    env.cleanup().await;
}
