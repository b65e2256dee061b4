//! Several engines as separate processes on the real services: a standby that takes over
//! after a kill, and engines sharing partitions mapped by a NATS server of the test's own,
//! one killed and a fourth started mid-run. Every event must arrive as its own delivery, each
//! user's in order, and no partition may ever have had two owners at once (from the engines'
//! own lease logs). Hand-over times and rates are printed, never asserted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use protocol::partition::{partition_of, subject_token};
use protocol::{EventType, Origin};
use serde_json::json;
use tests::env::{now_ms, EnvOptions, TestEnv};
use tests::fleet::Fleet;
use tests::load::{distinct, Load, Verdict};
use tests::receiver::{Received, Receiver};
use tests::servers::NatsServer;
use tests::user_tables::PgDatabase;
use tests::TEST_SECRET;

const WAIT: Duration = Duration::from_secs(300);
const PARTITIONS: u32 = 16;

fn options(store_url: &str, cluster: &str) -> EnvOptions {
    EnvOptions {
        store_url: Some(store_url.to_string()),
        extra_toml: format!("[cluster]\nlease_ttl = \"4s\"\n{cluster}"),
        ..EnvOptions::default()
    }
}

/// The last delivery before `cut` and the first after it, among `accepted` (that match).
fn gap(accepted: &[Received], cut: Instant, of: impl Fn(&Received) -> bool) -> Option<Duration> {
    let before = accepted
        .iter()
        .filter(|r| of(r) && r.at <= cut)
        .map(|r| r.at)
        .max()?;
    let after = accepted
        .iter()
        .filter(|r| of(r) && r.at > cut)
        .map(|r| r.at)
        .min()?;
    Some(after.duration_since(before))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_waits_and_takes_over_after_a_kill() {
    let db = PgDatabase::create("sync_standby").await;
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let env = TestEnv::new(&payload.url, &better_auth.url, options(&db.url, "")).await;
    let mut fleet = Fleet::default();
    let a = fleet.start(&env, "a").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.metric(a, "sync_engine_partitions_owned").await != 1.0 {
        assert!(
            Instant::now() < deadline,
            "a never took the lease:\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = fleet.start(&env, "b").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fleet.metric(b, "sync_engine_partitions_owned").await,
        0.0,
        "b waits"
    );

    let load = Load::scaled(300, 10);
    load.publish(&env).await;
    payload
        .wait_accepted(WAIT, |r| distinct(r) >= load.total() / 3)
        .await;
    fleet.kill(a);
    let killed = Instant::now();
    let accepted = load.wait_all(&payload, WAIT).await;
    let verdict = Verdict::of(&accepted);
    assert_eq!(verdict.delivered, load.total(), "{verdict:?}");
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
    assert_eq!(fleet.metric(b, "sync_engine_partitions_owned").await, 1.0);
    let holdings = fleet.assert_one_owner_at_a_time();
    assert!(
        holdings.iter().any(|h| h.member == "b"),
        "b took the lease over:\n{}",
        fleet.logs()
    );
    println!(
        "standby: {} events; a killed with {} accepted; hand-over (last delivery before the kill to the first after): {:?}; repeats {}",
        load.total(),
        accepted.iter().filter(|r| r.at <= killed).count(),
        gap(&accepted, killed, |_| true),
        verdict.repeats
    );
    drop(fleet);
    env.cleanup().await;
    db.drop_database().await;
}

/// The server's mapping for the test's subjects (`t<id>.user.…`, `t<id>.payload.user.…`):
/// the same partition function as the engine's, on the user token.
fn mapping() -> String {
    format!(
        "mappings = {{\n  \"*.user.*.*\": \"{{{{wildcard(1)}}}}.user.{{{{wildcard(2)}}}}.{{{{wildcard(3)}}}}.{{{{partition({PARTITIONS},3)}}}}\"\n  \
         \"*.payload.user.*.*\": \"{{{{wildcard(1)}}}}.payload.user.{{{{wildcard(2)}}}}.{{{{wildcard(3)}}}}.{{{{partition({PARTITIONS},3)}}}}\"\n}}\n"
    )
}

/// `users` users per direction, `events` changes each: Better Auth's `a<u>` and Payload's
/// `p<u>`, published round by round.
fn both_ways(env: &TestEnv, users: usize, events: usize) -> Vec<(String, String, Vec<u8>)> {
    let t0 = now_ms();
    let mut messages = Vec::new();
    for k in 0..events {
        for u in 0..users {
            for origin in Origin::ALL {
                let (user, data) = match origin {
                    Origin::BetterAuth => (
                        format!("a{u}"),
                        json!({"id": format!("a{u}"), "email": format!("a{u}@x"), "name": format!("n{k}"), "seq": k}),
                    ),
                    Origin::Payload => (
                        format!("p{u}"),
                        json!({"betterAuthUserId": format!("p{u}"), "fullName": format!("n{k}"), "seq": k}),
                    ),
                };
                let id = format!("{user}-{k}");
                let body = json!({"id": id, "origin": origin.as_str(), "type": "user.updated",
                    "timestamp": t0 + k as i64, "data": data});
                let subject = env.subject(origin, EventType::Updated, &user);
                messages.push((subject, id, serde_json::to_vec(&body).expect("json")));
            }
        }
    }
    messages
}

fn partition(r: &Received) -> u32 {
    let user = r.data("betterAuthUserId");
    let user = user
        .as_str()
        .or_else(|| r.body["data"]["id"].as_str())
        .unwrap_or("");
    partition_of(&subject_token(user), PARTITIONS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_share_partitions_and_hand_them_over_in_order() {
    let nats = NatsServer::start(&mapping());
    let client = async_nats::connect(nats.url()).await.expect("test NATS");
    let db = PgDatabase::create("sync_cluster").await;
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let mut opts = options(&db.url, &format!("partitions = {PARTITIONS}\n"));
    opts.nats_url = Some(nats.url());
    let env = TestEnv::with_client(&payload.url, &better_auth.url, opts, client);
    let mut fleet = Fleet::default();
    for member in ["a", "b", "c"] {
        fleet.start(&env, member).await;
    }
    let balanced = Instant::now() + Duration::from_secs(30);
    loop {
        let mut owned = Vec::new();
        for i in 0..3 {
            owned.push(fleet.metric(i, "sync_engine_partitions_owned").await);
        }
        if owned.iter().sum::<f64>() == f64::from(PARTITIONS) && owned.iter().all(|o| *o >= 5.0) {
            println!("3 engines balanced: {owned:?}");
            break;
        }
        assert!(
            Instant::now() < balanced,
            "never balanced {owned:?}:\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let users = Load::scaled(500, 10).users;
    let events = 10;
    let total = users * events;
    let started = Instant::now();
    env.publish_to_existing(both_ways(&env, users, events))
        .await;
    payload
        .wait_accepted(WAIT, |r| distinct(r) >= total / 3)
        .await;
    let mut owned = Vec::new();
    for i in 0..3 {
        owned.push(fleet.metric(i, "sync_engine_partitions_owned").await);
    }
    let victim = (0..3)
        .max_by(|x, y| owned[*x].total_cmp(&owned[*y]))
        .unwrap_or(0);
    let victim_parts: Vec<u32> = fleet
        .holdings()
        .iter()
        .filter(|h| h.member == fleet.engines[victim].member && h.to.is_none())
        .filter_map(|h| h.partition.parse().ok())
        .collect();
    fleet.kill(victim);
    let killed = Instant::now();
    fleet.start(&env, "d").await;

    let to_payload = payload.wait_accepted(WAIT, |r| distinct(r) >= total).await;
    let to_better_auth = better_auth
        .wait_accepted(WAIT, |r| distinct(r) >= total)
        .await;
    let elapsed = started.elapsed();
    for (side, accepted, user) in [
        ("payload", &to_payload, "betterAuthUserId"),
        ("better-auth", &to_better_auth, "id"),
    ] {
        let verdict = Verdict::by(accepted, user);
        assert_eq!(verdict.delivered, total, "{side}: {verdict:?}");
        assert_eq!(verdict.order_violations, 0, "{side}: {verdict:?}");
        println!("{side}: {verdict:?}");
    }
    let holdings = fleet.assert_one_owner_at_a_time();
    let mut changes: BTreeMap<&str, usize> = BTreeMap::new();
    for h in &holdings {
        *changes.entry(&h.member).or_default() += 1;
    }
    let mut end = Vec::new();
    for i in 0..fleet.engines.len() {
        if i != victim {
            end.push(fleet.metric(i, "sync_engine_partitions_owned").await);
        }
    }
    assert_eq!(end.iter().sum::<f64>(), f64::from(PARTITIONS), "{end:?}");
    assert!(end.iter().all(|o| *o == 5.0 || *o == 6.0), "{end:?}");
    let mut handovers: Vec<Duration> = victim_parts
        .iter()
        .filter_map(|p| {
            let of = |r: &Received| partition(r) == *p;
            let a = gap(&to_payload, killed, of);
            let b = gap(&to_better_auth, killed, of);
            a.into_iter().chain(b).min()
        })
        .collect();
    handovers.sort();
    println!(
        "3 engines, {PARTITIONS} partitions, {} events both ways in {elapsed:.1?} ({:.0}/s); \
         killed {} holding {:?}; hand-over per partition (last delivery before the kill to the \
         first after): {handovers:?}; holdings per engine {changes:?}; at the end {end:?}",
        2 * total,
        (2 * total) as f64 / elapsed.as_secs_f64(),
        fleet.engines[victim].member,
        victim_parts,
    );
    drop(fleet);
    env.cleanup().await;
    db.drop_database().await;
}
