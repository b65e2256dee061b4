//! One fault stays one fault: each service cut (by a TCP relay in front of the real one) while a
//! load drains, with the engine left running or killed at the end of the cut; a target down
//! while the other sink works; poison ids and a corrupt stored state; a graceful stop. Every
//! event must arrive as its own delivery, each user's in order. Figures (recovery times, rates)
//! are printed, never asserted.

use std::time::{Duration, Instant};

use protocol::{EventType, Origin};
use serde_json::json;
use tests::env::{eventually, now_ms, EnvOptions, TestEnv};
use tests::load::{arrival_shape, distinct, rate_after, Load, Verdict};
use tests::receiver::Receiver;
use tests::relay::Relay;
use tests::servers::NatsServer;
use tests::user_tables::PgDatabase;
use tests::TEST_SECRET;

const WAIT: Duration = Duration::from_secs(240);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Nats,
    Redis,
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The relay comes back; the engine was left running.
    Restore,
    /// The engine is killed (SIGKILL) at the end of the cut and started again once it is back.
    Kill,
}

/// Waits until `/readyz` answers `status`; returns how long that took and the slowest answer.
async fn until_ready(env: &TestEnv, status: u16) -> (Duration, Duration) {
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    loop {
        let asked = Instant::now();
        let answer = env.readyz().await;
        slowest = slowest.max(asked.elapsed());
        if answer == Some(status) {
            return (started.elapsed(), slowest);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "/readyz never answered {status} (last: {answer:?}):\n{}",
            env.engine_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A relay in front of `service`, a store database of the test's own, and an engine using Redis
/// dedup and that PostgreSQL store, reaching `service` through the relay. NATS is a monitored
/// server of the test's own (`nats`), so the test can read what it holds for the consumers.
async fn through_relay(
    service: Service,
    db_prefix: &str,
    nats: Option<&NatsServer>,
) -> (Relay, PgDatabase, EnvOptions) {
    let port = match (service, nats) {
        (Service::Nats, Some(nats)) => nats.port,
        (Service::Nats, None) => 4222,
        (Service::Redis, _) => 6379,
        (Service::Postgres, _) => 5432,
    };
    let relay = Relay::start(format!("127.0.0.1:{port}").parse().expect("addr")).await;
    let db = PgDatabase::create(db_prefix).await;
    let options = EnvOptions {
        dedup_redis: true,
        store_url: Some(match service {
            Service::Postgres => format!("postgres://postgres@{}/{}", relay.addr, db.name),
            _ => db.url.clone(),
        }),
        redis_url: (service == Service::Redis).then(|| relay.url("redis")),
        nats_url: (service == Service::Nats).then(|| relay.url("nats")),
        max_attempts: 20,
        ..EnvOptions::default()
    };
    (relay, db, options)
}

/// Prints, every 5 s, what the server holds for each consumer: pending, delivered and not
/// acknowledged, waiting pull requests, redelivered, and the delivered and ack-floor sequences.
async fn probe_consumers(monitor_port: Option<u16>) {
    let Some(port) = monitor_port else { return };
    let url = format!("http://127.0.0.1:{port}/jsz?accounts=true&streams=true&consumers=true");
    let started = Instant::now();
    let http = reqwest::Client::new();
    loop {
        if let Ok(answer) = http.get(&url).send().await {
            let body = answer.bytes().await.unwrap_or_default();
            if let Ok(jsz) = serde_json::from_slice::<serde_json::Value>(&body) {
                for consumer in consumers(&jsz) {
                    println!(
                        "[jsz {:>5.1}s] {} pending {} ack_pending {} waiting {} redelivered {} delivered {} floor {}",
                        started.elapsed().as_secs_f64(),
                        consumer["name"], consumer["num_pending"], consumer["num_ack_pending"],
                        consumer["num_waiting"], consumer["num_redelivered"],
                        consumer["delivered"]["stream_seq"], consumer["ack_floor"]["stream_seq"],
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

fn consumers(jsz: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    for account in jsz["account_details"].as_array().into_iter().flatten() {
        for stream in account["stream_detail"].as_array().into_iter().flatten() {
            all.extend(
                stream["consumer_detail"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
        }
    }
    all
}

/// Cuts `service` for 10 s while a load drains through an engine using Redis dedup and a
/// PostgreSQL store, then checks every event arrived, in order.
async fn cut_while_draining(service: Service, ending: Ending) {
    let load = Load::scaled(200, 20);
    let total = load.total();
    let nats = (service == Service::Nats).then(NatsServer::start_monitored);
    let (relay, db, options) = through_relay(service, "sync_faults", nats.as_ref()).await;
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let mut env = match &nats {
        Some(nats) => {
            let client = async_nats::connect(nats.url())
                .await
                .expect("the test's NATS");
            TestEnv::with_client(&payload.url, &better_auth.url, options, client)
        }
        None => TestEnv::new(&payload.url, &better_auth.url, options).await,
    };
    load.publish(&env).await;
    env.start_engine().await;
    let started = Instant::now();
    payload
        .wait_accepted(WAIT, |r| distinct(r) >= total / 4)
        .await;
    let before_cut = payload.accepted().len();
    let rate_before = before_cut as f64 / started.elapsed().as_secs_f64();

    let cut = Instant::now();
    relay.cut();
    let (noticed, slowest_while_down) = until_ready(&env, 503).await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(cut.elapsed())).await;
    if ending == Ending::Kill {
        env.kill_engine();
    }
    relay.restore();
    let restored = Instant::now();
    let at_restore = payload.accepted().len();
    if ending == Ending::Kill {
        env.start_engine().await;
    }
    let probe = nats
        .as_ref()
        .map(|nats| tokio::spawn(probe_consumers(nats.monitor_port)));
    let (ready_after, _) = until_ready(&env, 200).await;
    let first_after = payload.wait_accepted(WAIT, |r| r.len() > at_restore).await;
    let first_delivery_after = first_after[at_restore..]
        .iter()
        .map(|r| r.at.saturating_duration_since(restored))
        .min()
        .unwrap_or_default();
    load.wait_all(&payload, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = payload.accepted();
    let verdict = Verdict::of(&accepted);
    let rate = rate_after(&accepted, restored, at_restore);
    let shape = arrival_shape(&accepted, restored, at_restore);
    if let Some(probe) = probe {
        probe.abort();
    }
    println!(
        "{service:?} cut 10 s, {ending:?}: {total} events; before the cut {rate_before:.0}/s; \
         /readyz 503 after {noticed:?} (slowest answer {slowest_while_down:?}); 200 {ready_after:?} \
         after the restore; first delivery {first_delivery_after:?} after it; then {rate:.0}/s; \
         {shape}; {verdict:?}"
    );
    assert_eq!(verdict.delivered, total, "every event as its own delivery");
    assert_eq!(verdict.order_violations, 0, "each user's events in order");
    assert!(
        verdict.repeats <= load.users,
        "repeats only of what was in flight: {verdict:?}"
    );
    assert!(
        slowest_while_down < Duration::from_secs(1),
        "/readyz answers within a second while {service:?} is down"
    );
    let log = env.engine_log();
    assert!(
        !log.contains("User actor failed"),
        "a service cut fails no user actor:\n{log}"
    );
    env.cleanup().await;
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_while_draining_loses_nothing() {
    cut_while_draining(Service::Postgres, Ending::Restore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_ending_in_a_kill_loses_nothing() {
    cut_while_draining(Service::Postgres, Ending::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cut_while_draining_loses_nothing() {
    cut_while_draining(Service::Redis, Ending::Restore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cut_ending_in_a_kill_loses_nothing() {
    cut_while_draining(Service::Redis, Ending::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_cut_while_draining_loses_nothing() {
    cut_while_draining(Service::Nats, Ending::Restore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_cut_ending_in_a_kill_loses_nothing() {
    cut_while_draining(Service::Nats, Ending::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_accepts_and_never_answers_stalls_nothing_for_good() {
    for service in [Service::Redis, Service::Postgres] {
        let load = Load::scaled(50, 10);
        let (relay, db, options) = through_relay(service, "sync_hang", None).await;
        let payload = Receiver::start(TEST_SECRET).await;
        let mut env = TestEnv::new(&payload.url, &payload.url, options).await;
        env.start_engine().await;
        relay.blackhole();
        load.publish(&env).await;
        let (_, slowest) = until_ready(&env, 503).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        relay.restore();
        let restored = Instant::now();
        load.wait_all(&payload, WAIT).await;
        let verdict = Verdict::of(&payload.accepted());
        println!(
            "{service:?} hanging 5 s: all {} delivered {:?} after it answered again; slowest /readyz {slowest:?}; {verdict:?}",
            load.total(),
            restored.elapsed()
        );
        assert_eq!(verdict.order_violations, 0);
        assert!(slowest < Duration::from_secs(1));
        env.cleanup().await;
        db.drop_database().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_target_down_never_slows_the_other_sink() {
    // Nothing listens on the Payload target's port.
    let down = format!("http://127.0.0.1:{}/hook", tests::servers::free_port());
    let better_auth = Receiver::start(TEST_SECRET).await;
    let options = EnvOptions {
        max_attempts: 1000,
        retry_initial: "1s",
        retry_max: "5s",
        ..EnvOptions::default()
    };
    let mut env = TestEnv::new(&down, &better_auth.url, options).await;
    let queued = Load::scaled(500, 10);
    queued.publish(&env).await;
    env.start_engine().await;
    // Let the Payload sink fill its budget with events it cannot deliver.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = now_ms();
    let sent = Instant::now();
    for i in 0..100 {
        env.publish(
            &format!("pl-{i}"),
            Origin::Payload,
            EventType::Updated,
            t + i,
            json!({"id": i, "betterAuthUserId": format!("p{i}"), "email": format!("p{i}@x"), "fullName": format!("P {i}")}),
        )
        .await;
    }
    better_auth
        .wait_accepted(Duration::from_secs(60), |r| r.len() >= 100)
        .await;
    println!(
        "Payload target down with {} events queued for it: 100 Payload events reached Better Auth in {:?}",
        queued.total(),
        sent.elapsed()
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_ids_are_dead_lettered_and_the_events_around_them_go_through() {
    let db = PgDatabase::create("sync_poison").await;
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let options = EnvOptions {
        store_url: Some(db.url.clone()),
        ..EnvOptions::default()
    };
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options).await;
    env.start_engine().await;
    let t = now_ms();
    let long = "x".repeat(3000);
    let ids = [
        "u-before",
        "u\u{0}nul",
        long.as_str(),
        "u-cr\r\nlf",
        "u-after",
    ];
    for (i, id) in ids.iter().enumerate() {
        let body = json!({"id": format!("p-{i}"), "origin": "better-auth", "type": "user.created",
            "timestamp": t + i as i64, "data": {"id": id, "email": format!("{i}@x")}});
        // Without a user token, as any publisher may do on unpartitioned streams.
        let subject = format!("t{}.user.created", env.id);
        env.publish_raw(
            &subject,
            &format!("p-{i}"),
            serde_json::to_vec(&body).expect("json"),
        )
        .await;
    }
    let got = payload
        .wait_accepted(Duration::from_secs(30), |r| r.len() >= 2)
        .await;
    // Two users: their deliveries may come in either order.
    let users: std::collections::BTreeSet<String> = got
        .iter()
        .map(|r| {
            r.data("betterAuthUserId")
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(users, ["u-after", "u-before"].map(String::from).into());
    assert_eq!(got.len(), 2, "one delivery each");
    eventually(Duration::from_secs(30), "three dead letters", || {
        env.dead_letters().len() >= 3
    })
    .await;
    let letters = env.dead_letters();
    assert!(
        letters.iter().all(|l| l["reason"] == "invalid_user_id"),
        "{letters:?}"
    );
    assert_eq!(
        env.metric("sync_engine_dead_letters_total{reason=\"invalid_user_id\",sink=\"payload\"}")
            .await,
        3.0
    );
    env.cleanup().await;
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_state_that_cannot_be_decoded_dead_letters_its_events_and_never_loops() {
    let db = PgDatabase::create("sync_corrupt").await;
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let options = EnvOptions {
        store_url: Some(db.url.clone()),
        ..EnvOptions::default()
    };
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options).await;
    env.start_engine().await;
    // The engine made the table; a state that is neither JSON nor LZ4 takes the user's place.
    sqlx::query("INSERT INTO user_state (user_key, state, updated_at) VALUES ('u-corrupt', $1, 0)")
        .bind(b"\x04\x00\x00\x00garbage".as_slice())
        .execute(&db.pool)
        .await
        .expect("plant a corrupt state");
    let t = now_ms();
    for (i, user) in ["u-corrupt", "u-fine", "u-corrupt"].iter().enumerate() {
        env.publish(
            &format!("c-{i}"),
            Origin::BetterAuth,
            EventType::Updated,
            t + i as i64,
            json!({"id": user, "email": format!("{i}@x")}),
        )
        .await;
    }
    payload
        .wait_accepted(Duration::from_secs(30), |r| !r.is_empty())
        .await;
    eventually(
        Duration::from_secs(30),
        "two corrupt_state dead letters",
        || {
            env.dead_letters()
                .iter()
                .filter(|l| l["reason"] == "corrupt_state")
                .count()
                == 2
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let accepted = payload.accepted();
    assert_eq!(accepted.len(), 1, "only u-fine was delivered");
    assert_eq!(accepted[0].data("betterAuthUserId"), "u-fine");
    assert_eq!(env.dead_letters().len(), 2, "no loop: nothing more");
    let log = env.engine_log();
    assert!(log.contains("corrupt_state"), "{log}");
    assert!(!log.contains("User actor failed"), "{log}");
    env.cleanup().await;
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_leaves_nothing_to_send_again() {
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let options = EnvOptions {
        // Long enough that no idle actor saves on its own before the stop.
        user_idle_timeout: "10m",
        ..EnvOptions::default()
    };
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options).await;
    env.start_engine().await;
    let t = now_ms();
    for i in 0..20 {
        env.publish(
            &format!("g-{i}"),
            Origin::BetterAuth,
            EventType::Updated,
            t + i,
            json!({"id": format!("u{}", i % 5), "email": format!("{i}@x")}),
        )
        .await;
    }
    payload
        .wait_accepted(Duration::from_secs(30), |r| r.len() >= 20)
        .await;
    assert!(env.stop_engine(), "SIGTERM exits 0:\n{}", env.engine_log());
    env.start_engine().await;
    env.publish(
        "g-new",
        Origin::BetterAuth,
        EventType::Updated,
        t + 100,
        json!({"id": "u0", "email": "new@x"}),
    )
    .await;
    payload
        .wait_accepted(Duration::from_secs(30), |r| r.len() >= 21)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let accepted = payload.accepted();
    let ids: Vec<&str> = accepted[20..].iter().map(|r| r.webhook_id()).collect();
    assert_eq!(ids, ["g-new"], "exactly one delivery after the restart");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_down_for_a_minute_opens_its_circuit_and_then_gets_everything_in_order() {
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let addr = payload
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/hook")
        .parse()
        .expect("receiver address");
    let relay = Relay::start(addr).await;
    relay.cut();
    let options = EnvOptions {
        // Without the breaker, three failed attempts would dead-letter every event.
        max_attempts: 3,
        payload_toml: "breaker = { failures = 5, probe_interval = \"2s\" }\n".into(),
        ..EnvOptions::default()
    };
    let mut env = TestEnv::new(
        &format!("{}/hook", relay.url("http")),
        &better_auth.url,
        options,
    )
    .await;
    let load = Load::scaled(200, 10);
    load.publish(&env).await;
    env.start_engine().await;
    let open = "sync_engine_target_open{sink=\"payload\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.metric(open).await != 1.0 {
        assert!(Instant::now() < deadline, "the circuit never opened");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        env.dead_letters().is_empty(),
        "nothing dead-lettered for the outage"
    );
    let attempts_while_down = env
        .metric("sync_engine_deliveries_total{sink=\"payload\",status=\"error\"}")
        .await;
    relay.restore();
    let restored = Instant::now();
    load.wait_all(&payload, WAIT).await;
    let took = restored.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let verdict = Verdict::of(&payload.accepted());
    println!(
        "target down 60 s with {} events queued: {attempts_while_down} attempts while down; all delivered {took:?} after it came back; {verdict:?}",
        load.total()
    );
    assert_eq!(verdict.delivered, load.total());
    assert_eq!(verdict.order_violations, 0);
    assert!(env.dead_letters().is_empty());
    assert_eq!(env.metric(open).await, 0.0);
    env.cleanup().await;
}
