//! `sync-engine reconcile` against a Better Auth user table (SQLite) and a Payload users table
//! (PostgreSQL, and SQLite) with planted differences: each is reported, `--fix` publishes the
//! events that repair them, and once those are applied the way a receiver would, a second
//! reconcile finds nothing.

use std::process::Output;

use serde_json::Value;
use sqlx::{PgPool, SqlitePool};
use tests::env::{EnvOptions, TestEnv};
use tests::text;
use tests::user_tables::{
    read_stream, sqlite, stream_count, PgDatabase, BETTER_AUTH_SQLITE, PAYLOAD_POSTGRES,
    PAYLOAD_SQLITE,
};

/// Reconcile delivers nothing itself: the targets are never called.
const UNUSED_TARGET: &str = "http://127.0.0.1:9/unused";

/// Better Auth's users: (id, name, email).
const BA_USERS: [(&str, &str, &str); 5] = [
    ("u_same", "Ada Lovelace", "ada@example.com"),
    ("u_missing", "Grace Hopper", "grace@example.com"),
    ("u_name", "Alan Turing", "alan@example.com"),
    ("u_email", "Edsger Dijkstra", "edsger@example.com"),
    ("u_nullname", "", "anon@example.com"),
];

/// Payload's users: (better_auth_user_id, full_name, email). `u_missing` is not there,
/// `u_gone` is no longer in Better Auth, the last one is a Payload-only user (not linked).
const PAYLOAD_USERS: [(Option<&str>, Option<&str>, &str); 6] = [
    (Some("u_same"), Some("Ada Lovelace"), "ada@example.com"),
    (Some("u_name"), Some("Alan M. Turing"), "alan@example.com"),
    (
        Some("u_email"),
        Some("Edsger Dijkstra"),
        "edsger@old.example.com",
    ),
    (Some("u_nullname"), None, "anon@example.com"),
    (Some("u_gone"), Some("Ghost"), "ghost@example.com"),
    (None, Some("Local Editor"), "editor@example.com"),
];

/// Payload's side, in whichever database the test puts it.
enum PayloadDb {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl PayloadDb {
    /// Runs one statement with text parameters (`None` is NULL).
    async fn execute(&self, sql: &str, params: &[Option<&str>]) {
        match self {
            PayloadDb::Sqlite(pool) => {
                let mut query = sqlx::query(sql);
                for p in params {
                    query = query.bind(*p);
                }
                query.execute(pool).await.expect("payload statement");
            }
            PayloadDb::Postgres(pool) => {
                let mut query = sqlx::query(sql);
                for p in params {
                    query = query.bind(*p);
                }
                query.execute(pool).await.expect("payload statement");
            }
        }
    }

    async fn seed(&self) {
        for (ba_id, name, email) in PAYLOAD_USERS {
            self.execute(
                "INSERT INTO users (email, full_name, better_auth_user_id) VALUES ($1, $2, $3)",
                &[Some(email), name, ba_id],
            )
            .await;
        }
    }

    /// Applies a Better Auth event to Payload's table the way Payload's webhook receiver would
    /// (`name` lands in `full_name`, the Better Auth id in `better_auth_user_id`).
    async fn apply(&self, envelope: &Value) {
        let data = &envelope["data"];
        let id = data["id"].as_str();
        let email = data["email"].as_str();
        let name = data["name"].as_str();
        match envelope["type"].as_str() {
            Some("user.created") => {
                self.execute(
                    "INSERT INTO users (email, full_name, better_auth_user_id) VALUES ($1, $2, $3)",
                    &[email, name, id],
                )
                .await
            }
            Some("user.updated") => {
                self.execute(
                    "UPDATE users SET email = $1, full_name = $2 WHERE better_auth_user_id = $3",
                    &[email, name, id],
                )
                .await
            }
            Some("user.deleted") => {
                self.execute("DELETE FROM users WHERE better_auth_user_id = $1", &[id])
                    .await
            }
            // Asks the engine to send its user to Payload: with no engine here, the change
            // published before it already carried that user.
            Some("user.resync") => {}
            other => panic!("unexpected event type {other:?}"),
        }
    }
}

async fn better_auth_sqlite(dir: &std::path::Path) -> String {
    let path = dir.join("auth.db");
    let pool = sqlite(&path).await;
    sqlx::query(BETTER_AUTH_SQLITE)
        .execute(&pool)
        .await
        .expect("create the user table");
    for (i, (id, name, email)) in BA_USERS.iter().enumerate() {
        sqlx::query(
            r#"INSERT INTO "user" ("id", "name", "email", "emailVerified", "image", "createdAt", "updatedAt") VALUES ($1, $2, $3, 1, NULL, $4, $5)"#,
        )
        .bind(id)
        .bind(name)
        .bind(email)
        .bind("2024-05-01T12:00:00.000Z")
        .bind(1_714_564_800_000_i64 + i as i64)
        .execute(&pool)
        .await
        .expect("insert user");
    }
    pool.close().await;
    format!("sqlite://{}", path.display())
}

/// Payload's users table in SQLite, seeded with `PAYLOAD_USERS`.
async fn payload_sqlite(dir: &std::path::Path) -> (SqlitePool, std::path::PathBuf) {
    let path = dir.join("payload.db");
    let pool = sqlite(&path).await;
    sqlx::query(PAYLOAD_SQLITE)
        .execute(&pool)
        .await
        .expect("create the users table");
    PayloadDb::Sqlite(pool.clone()).seed().await;
    (pool, path)
}

fn reconcile(env: &TestEnv, ba_url: &str, payload_url: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "reconcile",
        "--better-auth",
        ba_url,
        "--payload",
        payload_url,
    ];
    args.extend_from_slice(extra);
    env.command(&args)
        .output()
        .expect("run sync-engine reconcile")
}

fn json_report(output: &Output) -> Value {
    let (stdout, stderr) = text(output);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("--json printed no JSON object ({e}):\n{stdout}\n{stderr}"))
}

fn ids(report: &Value, array: &str, field: &str) -> Vec<String> {
    let mut ids: Vec<String> = report[array]
        .as_array()
        .unwrap_or_else(|| panic!("no array {array} in {report}"))
        .iter()
        .map(|entry| entry[field].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    ids
}

/// Report, fix, apply, report again.
async fn reconcile_scenario(ba_url: &str, payload_url: &str, payload: &PayloadDb) {
    let env = TestEnv::new(UNUSED_TARGET, UNUSED_TARGET, EnvOptions::default()).await;

    let output = reconcile(&env, ba_url, payload_url, &["--json"]);
    assert_eq!(output.status.code(), Some(1), "{:?}", text(&output));
    let report = json_report(&output);
    assert_eq!(report["in_sync"], false);
    assert_eq!(ids(&report, "missing", "id"), ["u_missing"]);
    assert_eq!(ids(&report, "extra", "better_auth_user_id"), ["u_gone"]);
    assert_eq!(ids(&report, "differing", "id"), ["u_email", "u_name"]);
    assert_eq!(report["unlinked_payload_users"], 1);
    for entry in report["differing"].as_array().expect("differing") {
        let differences = entry["differences"].as_array().expect("differences");
        assert_eq!(differences.len(), 1, "{entry}");
        let expected = match entry["id"].as_str() {
            Some("u_name") => ("name", "Alan Turing", "Alan M. Turing"),
            _ => ("email", "edsger@example.com", "edsger@old.example.com"),
        };
        assert_eq!(differences[0]["field"], expected.0, "{entry}");
        assert_eq!(differences[0]["better_auth"], expected.1, "{entry}");
        assert_eq!(differences[0]["payload"], expected.2, "{entry}");
    }
    assert_eq!(
        stream_count(&env.js, &env.stream_of(protocol::Origin::BetterAuth)).await,
        0,
        "without --fix nothing is published"
    );

    // The table form reports the same.
    let output = reconcile(&env, ba_url, payload_url, &[]);
    let (stdout, _) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("1 missing, 1 extra, 2 differing"),
        "{stdout}"
    );

    let output = reconcile(&env, ba_url, payload_url, &["--fix", "--json"]);
    assert_eq!(output.status.code(), Some(1), "{:?}", text(&output));
    let report = json_report(&output);
    assert_eq!(
        report["fixes"].as_array().map(Vec::len),
        Some(4),
        "{report}"
    );
    assert_eq!(
        report["not_fixed"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );

    let started = tests::env::now_ms();
    let messages = read_stream(&env.js, &env.stream_of(protocol::Origin::BetterAuth)).await;
    let mut published: Vec<(String, String)> = messages
        .iter()
        .map(|(_, body)| {
            assert_eq!(body["origin"], "better-auth", "{body}");
            let id = body["id"].as_str().expect("event id");
            assert!(id.starts_with("reconcile-"), "{id}");
            assert!(protocol::envelope::is_valid_event_id(id), "{id}");
            let ts = body["timestamp"].as_i64().expect("timestamp");
            let user = body["data"]["id"].as_str().unwrap_or_default();
            match BA_USERS.iter().position(|(id, _, _)| *id == user) {
                // A repair carries the time its row committed, so a newer edit still wins.
                Some(i) if body["type"] != "user.resync" => {
                    assert_eq!(
                        ts,
                        1_714_564_800_000 + i as i64,
                        "the row's updatedAt: {body}"
                    )
                }
                _ => assert!(
                    (started - 60_000..=started).contains(&ts),
                    "stamped now: {body}"
                ),
            }
            (
                body["type"].as_str().unwrap_or_default().to_string(),
                user.to_string(),
            )
        })
        .collect();
    // Each user's change comes first, then its resync request.
    for (i, (event_type, user)) in published.iter().enumerate() {
        if event_type == "user.resync" {
            assert!(i > 0 && published[i - 1].1 == *user, "{published:?}");
        }
    }
    published.sort();
    let expected = [
        ("user.created", "u_missing"),
        ("user.deleted", "u_gone"),
        ("user.resync", "u_email"),
        ("user.resync", "u_gone"),
        ("user.resync", "u_missing"),
        ("user.resync", "u_name"),
        ("user.updated", "u_email"),
        ("user.updated", "u_name"),
    ]
    .map(|(t, u)| (t.to_string(), u.to_string()));
    assert_eq!(published, expected);
    // A repair carries the whole Better Auth user.
    let (_, created) = messages
        .iter()
        .find(|(_, body)| body["type"] == "user.created")
        .expect("the created event");
    assert_eq!(created["data"]["email"], "grace@example.com");
    assert_eq!(created["data"]["name"], "Grace Hopper");
    assert_eq!(created["data"]["emailVerified"], true);

    for (_, envelope) in &messages {
        payload.apply(envelope).await;
    }
    let output = reconcile(&env, ba_url, payload_url, &["--json"]);
    let report = json_report(&output);
    assert_eq!(output.status.code(), Some(0), "{report}");
    assert_eq!(report["in_sync"], true, "{report}");

    let output = reconcile(&env, ba_url, payload_url, &[]);
    let (stdout, _) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("in sync"), "{stdout}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_sqlite_better_auth_with_postgres_payload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ba_url = better_auth_sqlite(dir.path()).await;
    let db = PgDatabase::create("payload_reconcile").await;
    sqlx::query(PAYLOAD_POSTGRES)
        .execute(&db.pool)
        .await
        .expect("create the users table");
    let payload = PayloadDb::Postgres(db.pool.clone());
    payload.seed().await;

    reconcile_scenario(&ba_url, &db.url, &payload).await;
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_sqlite_better_auth_with_sqlite_payload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ba_url = better_auth_sqlite(dir.path()).await;
    let (pool, path) = payload_sqlite(dir.path()).await;
    let payload = PayloadDb::Sqlite(pool.clone());

    reconcile_scenario(&ba_url, &format!("sqlite://{}", path.display()), &payload).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_exits_2_and_names_the_problem_on_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ba_url = better_auth_sqlite(dir.path()).await;
    let path = dir.path().join("payload.db");
    let pool = sqlite(&path).await;
    sqlx::query("CREATE TABLE users (id integer PRIMARY KEY, email text)")
        .execute(&pool)
        .await
        .expect("create a users table without full_name");
    pool.close().await;
    let env = TestEnv::new(UNUSED_TARGET, UNUSED_TARGET, EnvOptions::default()).await;
    let payload_url = format!("sqlite://{}", path.display());

    let output = reconcile(&env, &ba_url, &payload_url, &[]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("table \"users\" has no column better_auth_user_id"),
        "{stderr}"
    );

    let output = reconcile(&env, &ba_url, &payload_url, &["--payload-table", "members"]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("table \"members\" does not exist"),
        "{stderr}"
    );
    env.cleanup().await;
}

/// Reads a child's stdout lines on a thread of their own.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("piped stdout");
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if send.send(line).is_err() {
                return;
            }
        }
    });
    receive
}

/// The next pass's JSON report from a scheduled reconcile (it prints one object per line).
fn next_report(lines: &std::sync::mpsc::Receiver<String>) -> Value {
    let line = lines
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("a pass's report within 30 s");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON report ({e}): {line}"))
}

async fn metric(port: u16, line_start: &str) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("the scheduled reconcile's /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in:\n{text}"))
}

/// `reconcile --every 1s --fix`: each pass finds what differs and publishes its repair; once
/// the repairs are applied the next pass is clean; a drift planted while it runs is found and
/// repaired by the next pass; the figures are on its `/metrics`; SIGTERM stops it with 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_reconcile_finds_and_fixes_a_drift_planted_while_it_runs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ba_url = better_auth_sqlite(dir.path()).await;
    let (pool, path) = payload_sqlite(dir.path()).await;
    let payload = PayloadDb::Sqlite(pool.clone());
    let payload_url = format!("sqlite://{}", path.display());
    let env = TestEnv::new(UNUSED_TARGET, UNUSED_TARGET, EnvOptions::default()).await;
    let port = tests::servers::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = env
        .command(&[
            "reconcile",
            "--better-auth",
            &ba_url,
            "--payload",
            &payload_url,
            "--fix",
            "--json",
            "--every",
            "1s",
            "--listen",
            &listen,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start a scheduled reconcile");
    let lines = lines_of(&mut child);
    let stream = env.stream_of(protocol::Origin::BetterAuth);

    let first = next_report(&lines);
    assert_eq!(first["fixes"].as_array().map(Vec::len), Some(4), "{first}");
    for (_, envelope) in read_stream(&env.js, &stream).await {
        payload.apply(&envelope).await;
    }
    let clean = loop {
        let report = next_report(&lines);
        if report["in_sync"] == true {
            break report;
        }
    };
    assert_eq!(clean["fixes"].as_array().map(Vec::len), Some(0), "{clean}");
    assert_eq!(metric(port, "sync_engine_reconcile_fixes_total").await, 4.0);
    assert_eq!(
        metric(
            port,
            "sync_engine_reconcile_last_differences{kind=\"missing\"}"
        )
        .await,
        0.0
    );

    // Someone deletes a Payload row by hand while the scheduler runs.
    payload
        .execute(
            "DELETE FROM users WHERE better_auth_user_id = $1",
            &[Some("u_same")],
        )
        .await;
    let found = loop {
        let report = next_report(&lines);
        if report["in_sync"] == false {
            break report;
        }
    };
    assert_eq!(ids(&found, "missing", "id"), ["u_same"]);
    assert_eq!(found["fixes"][0]["type"], "user.created", "{found}");
    assert_eq!(found["fixes"][0]["user"], "u_same", "{found}");
    assert_eq!(metric(port, "sync_engine_reconcile_fixes_total").await, 5.0);
    assert!(metric(port, "sync_engine_reconcile_runs_total").await >= 3.0);
    assert_eq!(
        metric(port, "sync_engine_reconcile_failures_total").await,
        0.0
    );

    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    let status = child.wait().expect("the scheduler exits");
    assert_eq!(status.code(), Some(0), "stopped by SIGTERM, it exits 0");
    pool.close().await;
    env.cleanup().await;
}
