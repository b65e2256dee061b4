//! The sync pipeline against the real NATS JetStream, Redis, SQLite/PostgreSQL and HTTP
//! receivers on loopback. Each test has its own stream, subjects, consumers, dedup prefix and
//! store, so tests run in parallel without seeing each other.

use std::collections::BTreeMap;
use std::time::Duration;

use protocol::{EventType, Origin};
use serde_json::json;
use tests::env::{now_ms, EnvOptions, TestEnv};
use tests::receiver::Receiver;
use tests::TEST_SECRET;

const BA: Origin = Origin::BetterAuth;
const PL: Origin = Origin::Payload;
const WAIT: Duration = Duration::from_secs(30);

async fn world(options: EnvOptions) -> (Receiver, Receiver, TestEnv) {
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let env = TestEnv::new(&payload.url, &better_auth.url, options).await;
    (payload, better_auth, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_are_delivered_signed_with_every_header() {
    let (payload, better_auth, mut env) = world(EnvOptions::default()).await;
    env.start_engine().await;
    let t = now_ms();
    env.publish(
        "evt-ba-1",
        BA,
        EventType::Created,
        t,
        json!({"id": "u1", "email": "ada@example.com", "name": "Ada"}),
    )
    .await;
    env.publish(
        "evt-pl-1",
        PL,
        EventType::Updated,
        t + 1,
        json!({"id": 77, "betterAuthUserId": "u2", "email": "bob@example.com", "fullName": "Bob"}),
    )
    .await;
    let to_payload = payload.wait_accepted(WAIT, |r| !r.is_empty()).await;
    let to_better_auth = better_auth.wait_accepted(WAIT, |r| !r.is_empty()).await;

    let d = &to_payload[0];
    assert!(d.verified);
    assert_eq!(d.webhook_id(), "evt-ba-1");
    assert_eq!(d.header("x-webhook-id"), "evt-ba-1");
    assert_eq!(d.header("content-type"), "application/json");
    assert_eq!(d.header("x-webhook-origin"), "better-auth");
    assert_eq!(d.header("x-webhook-event"), "user.created");
    let secs: i64 = d.header("webhook-timestamp").parse().expect("seconds");
    let ms: i64 = d
        .header("x-webhook-timestamp")
        .parse()
        .expect("milliseconds");
    assert_eq!(secs, ms / 1000);
    assert!(d.header("webhook-signature").starts_with("v1,"));
    assert_eq!(d.body["id"], "evt-ba-1");
    assert_eq!(d.body["origin"], "better-auth");
    assert_eq!(d.body["type"], "user.created");
    assert_eq!(d.data("betterAuthUserId"), "u1");
    assert_eq!(d.data("fullName"), "Ada");
    assert_eq!(d.data("email"), "ada@example.com");

    let d = &to_better_auth[0];
    assert!(d.verified);
    assert_eq!(d.webhook_id(), "evt-pl-1");
    assert_eq!(d.header("x-webhook-origin"), "payload");
    assert_eq!(d.header("x-webhook-event"), "user.updated");
    assert_eq!(d.data("id"), "u2");
    assert_eq!(d.data("name"), "Bob");
    // Payload's own document id is not the user's id and never leaves Payload.
    assert!(d.body["data"].get("betterAuthUserId").is_none());
    assert_eq!(
        d.body["data"].as_object().map(|o| o.len()),
        Some(3),
        "{}",
        d.body
    );

    // Nothing else went anywhere: no echo to the origin, no duplicate.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(payload.received().len(), 1);
    assert_eq!(better_auth.received().len(), 1);
    assert!(env.stop_engine(), "engine exits 0 on SIGTERM");
    // Every message came with JetStream's ack subject, read for its sequence and delivery count.
    assert!(
        !env.engine_log().contains("not JetStream's"),
        "{}",
        env.engine_log()
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_on_the_first_attempt_still_delivers_exactly_once() {
    let (payload, _better_auth, mut env) = world(EnvOptions::default()).await;
    let mut calls = 0;
    payload.script(move |_| {
        calls += 1;
        if calls == 1 {
            500
        } else {
            200
        }
    });
    env.start_engine().await;
    env.publish(
        "evt-500",
        BA,
        EventType::Created,
        now_ms(),
        json!({"id": "u1", "email": "a@x"}),
    )
    .await;
    payload.wait_accepted(WAIT, |r| !r.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let all = payload.received();
    assert_eq!(all.len(), 2, "one failed attempt, one success");
    assert_eq!(all[0].status, 500);
    assert_eq!(payload.accepted().len(), 1);
    assert!(all.iter().all(|r| r.webhook_id() == "evt-500"));
    assert!(env.dead_letters().is_empty());
    env.cleanup().await;
}

async fn same_id_twice_is_delivered_once(dedup_redis: bool) {
    let (payload, _better_auth, mut env) = world(EnvOptions {
        dedup_redis,
        ..EnvOptions::default()
    })
    .await;
    env.start_engine().await;
    let t = now_ms();
    let body = json!({"id": "dup-1", "origin": "better-auth", "type": "user.created", "timestamp": t,
                      "data": {"id": "u1", "email": "a@x"}});
    let subject = env.subject(BA, EventType::Created, "u1");
    let bytes = serde_json::to_vec(&body).expect("json");
    env.publish_raw(&subject, "nats-id-a", bytes.clone()).await;
    payload.wait_accepted(WAIT, |r| !r.is_empty()).await;
    // The same event republished later, under another Nats-Msg-Id so JetStream keeps it.
    env.publish_raw(&subject, "nats-id-b", bytes).await;
    // A later event proves the duplicate was consumed before it.
    env.publish(
        "after-dup",
        BA,
        EventType::Updated,
        t + 5,
        json!({"id": "u1", "email": "b@x"}),
    )
    .await;
    let accepted = payload
        .wait_accepted(WAIT, |r| r.iter().any(|d| d.webhook_id() == "after-dup"))
        .await;
    let ids: Vec<&str> = accepted.iter().map(|r| r.webhook_id()).collect();
    assert_eq!(ids, vec!["dup-1", "after-dup"]);
    assert_eq!(env.metric("sync_engine_duplicates_total").await, 1.0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_event_id_twice_is_delivered_once_with_memory_dedup() {
    same_id_twice_is_delivered_once(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_event_id_twice_is_delivered_once_with_redis_dedup() {
    same_id_twice_is_delivered_once(true).await;
}

/// Per user, the `seq` values a receiver accepted, in arrival order.
fn sequences(accepted: &[tests::receiver::Received], id_field: &str) -> BTreeMap<String, Vec<i64>> {
    let mut per_user: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in accepted {
        let user = r.data(id_field).as_str().unwrap_or_default().to_string();
        let seq = r.data("seq").as_i64().unwrap_or(-1);
        per_user.entry(user).or_default().push(seq);
    }
    per_user
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_users_twenty_interleaved_events_each_arrive_in_order() {
    const USERS: i64 = 1000;
    const EVENTS: i64 = 20;
    let (payload, _better_auth, mut env) = world(EnvOptions::default()).await;
    env.start_engine().await;
    let t0 = now_ms();
    let mut messages = Vec::new();
    for k in 0..EVENTS {
        for u in 0..USERS {
            let id = format!("e-{u}-{k}");
            let body = json!({"id": id, "origin": "better-auth", "type": "user.updated", "timestamp": t0 + k,
                              "data": {"id": format!("u{u}"), "email": format!("u{u}@x"), "seq": k}});
            messages.push((
                env.subject(BA, EventType::Updated, &format!("u{u}")),
                id,
                serde_json::to_vec(&body).expect("json"),
            ));
        }
    }
    env.publish_many(messages).await;
    let total = (USERS * EVENTS) as usize;
    let accepted = payload
        .wait_accepted(Duration::from_secs(180), |r| r.len() >= total)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(payload.accepted().len(), total, "no duplicates");
    let per_user = sequences(&accepted, "betterAuthUserId");
    assert_eq!(per_user.len(), USERS as usize);
    let violations: usize = per_user
        .values()
        .map(|seqs| seqs.windows(2).filter(|w| w[1] <= w[0]).count())
        .sum();
    assert_eq!(violations, 0, "per-user order violations");
    for seqs in per_user.values() {
        assert_eq!(seqs, &(0..EVENTS).collect::<Vec<_>>());
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_dead_letters_at_once() {
    let (payload, _better_auth, mut env) = world(EnvOptions::default()).await;
    payload.script(|_| 400);
    env.start_engine().await;
    env.publish(
        "evt-400",
        BA,
        EventType::Created,
        now_ms(),
        json!({"id": "u1", "email": "a@x"}),
    )
    .await;
    tests::env::eventually(WAIT, "a dead letter", || !env.dead_letters().is_empty()).await;
    let letters = env.dead_letters();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter["reason"], "delivery_rejected");
    assert_eq!(letter["event_id"], "evt-400");
    assert_eq!(letter["sink"], "payload");
    assert_eq!(letter["attempts"], 1);
    assert!(
        letter["last_error"].as_str().unwrap_or("").contains("400"),
        "{letter}"
    );
    assert_eq!(
        payload.received().len(),
        1,
        "a permanent answer is never retried"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_past_the_retry_budget_dead_letters_and_replay_delivers() {
    let (payload, _better_auth, mut env) = world(EnvOptions {
        max_attempts: 4,
        ..EnvOptions::default()
    })
    .await;
    payload.script(|_| 503);
    env.start_engine().await;
    env.publish(
        "evt-down",
        BA,
        EventType::Created,
        now_ms(),
        json!({"id": "u1", "email": "a@x", "name": "A"}),
    )
    .await;
    tests::env::eventually(WAIT, "a dead letter", || !env.dead_letters().is_empty()).await;
    let letters = env.dead_letters();
    assert_eq!(letters[0]["reason"], "delivery_failed");
    assert_eq!(letters[0]["attempts"], 4);
    assert_eq!(letters[0]["sink"], "payload");
    assert_eq!(
        letters[0]["subject"],
        env.subject(BA, EventType::Created, "u1")
    );
    assert_eq!(
        payload.received().len(),
        4,
        "max_attempts attempts, then no more"
    );

    // The receiver comes back; replaying delivers the event once.
    payload.script(|_| 200);
    let id = letters[0]["id"].to_string();
    let output = env
        .command(&["dlq", "replay", &id])
        .output()
        .expect("dlq replay");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let accepted = payload.wait_accepted(WAIT, |r| !r.is_empty()).await;
    // A fresh id: an attempt that was dead-lettered may have been applied with older content.
    assert_eq!(accepted[0].webhook_id(), format!("evt-down:replay-{id}"));
    assert_eq!(accepted[0].data("fullName"), "A");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(payload.accepted().len(), 1);
    assert!(
        env.dead_letters().is_empty(),
        "a replayed dead letter is removed"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_down_does_not_delay_better_auth() {
    let (payload, better_auth, mut env) = world(EnvOptions {
        max_attempts: 50,
        retry_initial: "200ms",
        retry_max: "1s",
        ..EnvOptions::default()
    })
    .await;
    payload.script(|_| 503);
    env.start_engine().await;
    let t = now_ms();
    for u in 0..20 {
        env.publish(
            &format!("ba-{u}"),
            BA,
            EventType::Created,
            t,
            json!({"id": format!("u{u}"), "email": "a@x"}),
        )
        .await;
    }
    for u in 0..20 {
        env.publish(
            &format!("pl-{u}"),
            PL,
            EventType::Updated,
            t,
            json!({"betterAuthUserId": format!("v{u}"), "email": "b@x"}),
        )
        .await;
    }
    let started = std::time::Instant::now();
    // Better Auth gets all of its deliveries while Payload still refuses every request: its
    // line never waited for Payload's (no timing involved).
    better_auth.wait_accepted(WAIT, |r| r.len() >= 20).await;
    assert!(payload.accepted().is_empty());
    // Informational only (no timing assertion): how long Better Auth's deliveries took.
    eprintln!(
        "better-auth received 20 deliveries {:?} after publishing",
        started.elapsed()
    );
    // Payload recovers and gets its backlog.
    payload.script(|_| 200);
    payload.wait_accepted(WAIT, |r| r.len() >= 20).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_dead_lettered_with_its_reason_while_good_events_flow() {
    let (payload, _better_auth, mut env) = world(EnvOptions::default()).await;
    env.start_engine().await;
    let subject = env.subject(BA, EventType::Updated, "u1");
    let t = now_ms();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("invalid_json", b"{not json".to_vec()),
        ("missing_field:id", serde_json::to_vec(&json!({"origin":"better-auth","type":"user.updated","timestamp":t,"data":{"id":"u1","email":"a@x"}})).expect("json")),
        ("invalid_field:timestamp", serde_json::to_vec(&json!({"id":"b3","origin":"better-auth","type":"user.updated","timestamp":"yesterday","data":{"id":"u1","email":"a@x"}})).expect("json")),
        ("unknown_type", serde_json::to_vec(&json!({"id":"b4","origin":"better-auth","type":"user.renamed","timestamp":t,"data":{"id":"u1"}})).expect("json")),
        ("unknown_origin", serde_json::to_vec(&json!({"id":"b5","origin":"auth0","type":"user.updated","timestamp":t,"data":{"id":"u1"}})).expect("json")),
        ("too_large", {
            let big = "x".repeat(70_000);
            serde_json::to_vec(&json!({"id":"b6","origin":"better-auth","type":"user.updated","timestamp":t,"data":{"id":"u1","email":"a@x","bio":big}})).expect("json")
        }),
        ("missing_field:data.email", serde_json::to_vec(&json!({"id":"b7","origin":"better-auth","type":"user.created","timestamp":t,"data":{"id":"u1"}})).expect("json")),
    ];
    for (i, (_, body)) in bad.iter().enumerate() {
        env.publish_raw(&subject, &format!("bad-{i}"), body.clone())
            .await;
        env.publish(
            &format!("good-{i}"),
            BA,
            EventType::Updated,
            t + i as i64,
            json!({"id": "u1", "email": format!("v{i}@x")}),
        )
        .await;
    }
    let mut expected: Vec<&str> = bad.iter().map(|(reason, _)| *reason).collect();
    expected.sort();
    tests::env::eventually(WAIT, "all dead letters", || {
        env.dead_letters().len() >= bad.len()
    })
    .await;
    let letters = env.dead_letters();
    let mut reasons: Vec<String> = letters
        .iter()
        .map(|l| l["reason"].as_str().unwrap_or("").to_string())
        .collect();
    reasons.sort();
    assert_eq!(reasons, expected);
    assert!(letters.iter().all(|l| l["subject"] == subject.as_str()));
    let raw = letters
        .iter()
        .find(|l| l["reason"] == "invalid_json")
        .map(|l| l["raw"].clone());
    assert_eq!(raw, Some(json!("{not json")), "the raw bytes are kept");
    // The good events between them kept flowing.
    payload.wait_accepted(WAIT, |r| r.len() >= bad.len()).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dedup_and_postgres_store_run_the_pipeline() {
    let name = format!("sync_pipe_{}", uuid::Uuid::new_v4().simple());
    {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(tests::env::POSTGRES_ADMIN_URL)
            .await
            .expect("PostgreSQL must run on 127.0.0.1:5432");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create database");
    }
    let (payload, better_auth, mut env) = world(EnvOptions {
        dedup_redis: true,
        store_url: Some(format!("postgres://postgres@127.0.0.1:5432/{name}")),
        ..EnvOptions::default()
    })
    .await;
    env.start_engine().await;
    let t = now_ms();
    for u in 0..50 {
        env.publish(
            &format!("pg-{u}"),
            BA,
            EventType::Created,
            t,
            json!({"id": format!("u{u}"), "email": "a@x"}),
        )
        .await;
        env.publish(
            &format!("pp-{u}"),
            PL,
            EventType::Updated,
            t + 1,
            json!({"betterAuthUserId": format!("u{u}"), "fullName": format!("P{u}")}),
        )
        .await;
    }
    // Every user reached both sides (a user may also get a resync, so count users, not requests).
    let users = |r: &[tests::receiver::Received], field: &str| {
        r.iter()
            .filter_map(|d| d.data(field).as_str().map(String::from))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    payload
        .wait_accepted(WAIT, |r| users(r, "betterAuthUserId") >= 50)
        .await;
    better_auth
        .wait_accepted(WAIT, |r| users(r, "id") >= 50)
        .await;
    // The state lives in PostgreSQL: one row per user.
    {
        use sqlx::Connection;
        let mut conn =
            sqlx::PgConnection::connect(&format!("postgres://postgres@127.0.0.1:5432/{name}"))
                .await
                .expect("connect");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM user_state")
            .fetch_one(&mut conn)
            .await
            .expect("count");
        assert_eq!(rows, 50);
    }
    // And the processed ids in Redis, one key per id and sink, each with its own expiry.
    let client = redis::Client::open(tests::env::REDIS_URL).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must run on 127.0.0.1:6379");
    let key = format!("t{}:done:payload:pg-0", env.id);
    let mut ttl: i64 = -2;
    for _ in 0..200 {
        ttl = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("pttl");
        if ttl != -2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ttl > 0, "{key} has its own expiry (PTTL {ttl})");
    env.cleanup().await;
    use sqlx::Connection;
    if let Ok(mut admin) = sqlx::PgConnection::connect(tests::env::POSTGRES_ADMIN_URL).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_user_actors_are_reaped_and_come_back_with_their_state() {
    let (payload, _better_auth, mut env) = world(EnvOptions {
        user_idle_timeout: "300ms",
        ..EnvOptions::default()
    })
    .await;
    env.start_engine().await;
    let t = now_ms();
    for u in 0..10 {
        env.publish(
            &format!("i-{u}"),
            BA,
            EventType::Created,
            t,
            json!({"id": format!("u{u}"), "email": "a@x", "name": "A"}),
        )
        .await;
    }
    payload.wait_accepted(WAIT, |r| r.len() >= 10).await;
    // Actors stop within 250 ms of going idle and leave their states parked; parked states
    // go after the idle timeout, so the next event reads the store.
    let in_memory = || async {
        (
            env.metric("sync_engine_users_active").await,
            env.metric("sync_engine_users_parked").await,
        )
    };
    let mut held = in_memory().await;
    let deadline = std::time::Instant::now() + WAIT;
    while held != (0.0, 0.0) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = in_memory().await;
    }
    assert_eq!(
        held,
        (0.0, 0.0),
        "idle users leave memory (actors, parked states)"
    );
    // The reaped user's state comes back from the store: an older write still loses.
    env.publish(
        "i-old",
        PL,
        EventType::Updated,
        t - 1_000,
        json!({"betterAuthUserId": "u0", "fullName": "Old"}),
    )
    .await;
    let accepted = payload.wait_accepted(WAIT, |r| r.len() >= 11).await;
    let resync = accepted.last().expect("a resync");
    assert_eq!(resync.webhook_id(), "i-old:resync");
    assert_eq!(resync.data("fullName"), "A");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_command_sends_a_well_formed_event_through() {
    let (payload, _better_auth, mut env) = world(EnvOptions::default()).await;
    env.start_engine().await;
    let output = env
        .command(&[
            "publish",
            "--origin",
            "better-auth",
            "--type",
            "user.created",
            "--user",
            "u_123",
            "--email",
            "ada@example.com",
            "--name",
            "Ada Lovelace",
        ])
        .output()
        .expect("run publish");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        stdout.contains(&format!("t{}.user.created.u_123", env.id)),
        "{stdout}"
    );
    let accepted = payload.wait_accepted(WAIT, |r| !r.is_empty()).await;
    assert_eq!(accepted[0].data("fullName"), "Ada Lovelace");
    assert_eq!(accepted[0].data("betterAuthUserId"), "u_123");
    // A Better Auth write without an email would be a dead letter: publish refuses it.
    let refused = env
        .command(&[
            "publish",
            "--origin",
            "better-auth",
            "--type",
            "user.updated",
            "--user",
            "u_1",
        ])
        .output()
        .expect("run publish");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("missing_field:data.email"));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_stream_with_conflicting_subjects_is_a_clear_startup_error() {
    let (_payload, _better_auth, env) = world(EnvOptions::default()).await;
    // Someone created Better Auth's stream with other subjects.
    let stream = env.stream_of(BA);
    env.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("t{}.other.>", env.id)],
            ..Default::default()
        })
        .await
        .expect("create conflicting stream");
    let output = env.command(&["run"]).output().expect("run engine");
    assert!(!output.status.success(), "the engine must refuse to start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&stream) && stderr.contains("must capture exactly"),
        "{stderr}"
    );
    env.cleanup().await;
}

/// Before each application had its stream, one stream named `nats.stream` held both: the
/// engine cannot make the new streams beside it, and says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_the_earlier_layout_is_a_clear_startup_error() {
    let (_payload, _better_auth, env) = world(EnvOptions::default()).await;
    env.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: env.stream.clone(),
            subjects: vec![
                format!("t{}.user.>", env.id),
                format!("t{}.payload.user.>", env.id),
            ],
            ..Default::default()
        })
        .await
        .expect("create the earlier layout's stream");
    let output = env.command(&["run"]).output().expect("run engine");
    assert!(!output.status.success(), "the engine must refuse to start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&env.stream) && stderr.contains("earlier layout"),
        "{stderr}"
    );
    let _ = env.js.delete_stream(&env.stream).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_endpoints_answer() {
    let (_payload, _better_auth, mut env) = world(EnvOptions {
        dedup_redis: true,
        ..EnvOptions::default()
    })
    .await;
    env.start_engine().await;
    let get = |path: &str| {
        let url = format!("http://{}{path}", env.http);
        async move { reqwest::get(url).await.expect("endpoint answers") }
    };
    assert_eq!(get("/healthz").await.status(), 200);
    let ready = get("/readyz").await;
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.text().await.expect("body"), "ready\n");
    let metrics = get("/metrics").await.text().await.expect("metrics");
    assert!(metrics.contains("sync_engine_users_active"), "{metrics}");
    assert!(env.stop_engine(), "exits 0 on SIGTERM");
    env.cleanup().await;
}

/// The delivery count and stream sequence the engine reads from a message come from the real
/// server's ack subject, in the form this nats-server sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_jetstream_ack_subjects_give_the_delivery_count_and_stream_sequence() {
    use futures::StreamExt;
    let env = TestEnv::new(
        "http://127.0.0.1:9/p",
        "http://127.0.0.1:9/b",
        EnvOptions::default(),
    )
    .await;
    env.publish(
        "seq-1",
        BA,
        EventType::Created,
        now_ms(),
        json!({"id": "u1", "email": "a@x"}),
    )
    .await;
    let stream = env.js.get_stream(env.stream_of(BA)).await.expect("stream");
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(format!("t{}-probe", env.id)),
            ack_wait: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("fetch");
    let message = messages.next().await.expect("a message").expect("no error");
    let info = message.info().expect("info").stream_sequence;
    let reply = message
        .reply
        .as_ref()
        .map(|r| r.to_string())
        .unwrap_or_default();
    assert_eq!(
        actors::ports::AckReply::parse(&reply),
        Some(actors::ports::AckReply {
            delivered: 1,
            stream_sequence: info
        }),
        "{reply}"
    );
    env.cleanup().await;
}
