//! Several engines as separate processes on the real services: a standby that takes over
//! after a kill, and engines sharing partitions mapped by a NATS server of the test's own,
//! one killed and a fourth started mid-run. Every event must arrive as its own delivery, each
//! user's in order, and no partition may ever have had two owners at once (from the engines'
//! own lease logs). Hand-over times and rates are printed, never asserted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use protocol::partition::{partition_of, subject_token};
use protocol::{EventType, Origin};
use serde_json::json;
use sqlx::Row;
use tests::env::{now_ms, EnvOptions, TestEnv};
use tests::fleet::Fleet;
use tests::load::{distinct, Load, Verdict};
use tests::receiver::{Received, Receiver};
use tests::relay::Relay;
use tests::servers::{partition_mapping, NatsServer};
use tests::user_tables::PgDatabase;
use tests::TEST_SECRET;

const WAIT: Duration = Duration::from_secs(120);

/// One test of several engines at a time: each engine opens up to 21 PostgreSQL connections,
/// and two such tests side by side would exhaust the shared server's 100.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long `total` events may take (a run scaled up by `SYNC_ENGINE_TEST_SCALE` takes longer).
fn patience(total: usize) -> Duration {
    WAIT + Duration::from_millis(3 * total as u64)
}
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
    let _serial = ONE_AT_A_TIME.lock().await;
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

/// The users mirror's table in a partitioned world: each partition's mirror consumer feeds it.
const MIRROR: &str = "mirror_users";

/// Every Better Auth user of [`both_ways`] reached the mirror with its last name, whichever
/// engines held its partition on the way.
async fn assert_mirrored(world: &World, users: usize, last: usize) {
    let sql = format!(
        "select count(*) as n, count(*) filter (where name = 'n{last}') as last from {MIRROR}"
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let row = sqlx::query(&sql)
            .fetch_one(&world.db.pool)
            .await
            .expect("read the mirror");
        let (n, at_last): (i64, i64) = (row.get("n"), row.get("last"));
        if n == users as i64 && at_last == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "mirror: {at_last} of {n} rows at n{last}, {users} users"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A partitioned world: a NATS server of the test's own with the mapping, a store database (the
/// mirror's too) and both receivers.
struct World {
    _nats: NatsServer,
    db: PgDatabase,
    payload: Receiver,
    better_auth: Receiver,
    env: TestEnv,
}

impl World {
    /// Stops the engines, then removes the streams and the database.
    async fn finish(self, fleet: Fleet) {
        drop(fleet);
        self.env.cleanup().await;
        self.db.drop_database().await;
    }
}

async fn partitioned_world(prefix: &str) -> World {
    let nats = NatsServer::start(&partition_mapping(PARTITIONS));
    let client = async_nats::connect(nats.url()).await.expect("test NATS");
    let db = PgDatabase::create(prefix).await;
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let mirror = format!(
        "[mirror]\nenabled = true\nurl = \"{}\"\ntable = \"{MIRROR}\"\ndefault_organization_id = \"org\"\n",
        db.url
    );
    let mut opts = options(&db.url, &format!("partitions = {PARTITIONS}\n{mirror}"));
    opts.nats_url = Some(nats.url());
    let env = TestEnv::with_client(&payload.url, &better_auth.url, opts, client);
    World {
        _nats: nats,
        db,
        payload,
        better_auth,
        env,
    }
}

/// Waits until the engines `live` hold every partition, each ⌊N/k⌋ or ⌈N/k⌉; returns them.
async fn balanced(fleet: &Fleet, live: &[usize]) -> Vec<f64> {
    let k = live.len() as u32;
    let (low, high) = (f64::from(PARTITIONS / k), f64::from(PARTITIONS.div_ceil(k)));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut owned = Vec::new();
        for i in live {
            owned.push(fleet.metric(*i, "sync_engine_partitions_owned").await);
        }
        let whole = owned.iter().sum::<f64>() == f64::from(PARTITIONS);
        if whole && owned.iter().all(|o| *o == low || *o == high) {
            return owned;
        }
        assert!(
            Instant::now() < deadline,
            "never balanced {owned:?}:\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every event of [`both_ways`] delivered, each user's in order, on both sides.
fn check_both_ways(
    to_payload: &[Received],
    to_better_auth: &[Received],
    total: usize,
) -> (Verdict, Verdict) {
    let verdicts = (
        Verdict::by(to_payload, "betterAuthUserId"),
        Verdict::by(to_better_auth, "id"),
    );
    for (side, verdict) in [("payload", &verdicts.0), ("better-auth", &verdicts.1)] {
        assert_eq!(verdict.delivered, total, "{side}: {verdict:?}");
        assert_eq!(verdict.order_violations, 0, "{side}: {verdict:?}");
    }
    verdicts
}

/// Per partition of `parts`: the last delivery before `cut` to the first after, either side.
fn handovers(
    to_payload: &[Received],
    to_better_auth: &[Received],
    parts: &[u32],
    cut: Instant,
) -> Vec<Duration> {
    let mut gaps: Vec<Duration> = parts
        .iter()
        .filter_map(|p| {
            let of = |r: &Received| partition(r) == *p;
            let a = gap(to_payload, cut, of);
            let b = gap(to_better_auth, cut, of);
            a.into_iter().chain(b).min()
        })
        .collect();
    gaps.sort();
    gaps
}

/// The partitions engine `index` holds now, from its log.
fn held_by(fleet: &Fleet, index: usize) -> Vec<u32> {
    fleet
        .holdings()
        .iter()
        .filter(|h| h.member == fleet.engines[index].member && h.to.is_none())
        .filter_map(|h| h.partition.parse().ok())
        .collect()
}

/// Both receivers once every event of [`both_ways`] arrived; the engines' lease and warning
/// lines if that never happens.
async fn all_delivered(
    world: &World,
    fleet: &Fleet,
    total: usize,
) -> (Vec<Received>, Vec<Received>) {
    let deadline = Instant::now() + patience(total);
    loop {
        let to_payload = world.payload.accepted();
        let to_better_auth = world.better_auth.accepted();
        if distinct(&to_payload) >= total && distinct(&to_better_auth) >= total {
            return (to_payload, to_better_auth);
        }
        if Instant::now() > deadline {
            let lines: Vec<&str> = Vec::new();
            let logs = fleet.logs();
            let notable: Vec<&str> = logs
                .lines()
                .filter(|l| {
                    l.starts_with("---")
                        || l.contains("WARN")
                        || l.contains("ERROR")
                        || l.contains("Lease")
                })
                .chain(lines)
                .collect();
            panic!(
                "{} of {total} to Payload, {} to Better Auth:\n{}",
                distinct(&to_payload),
                distinct(&to_better_auth),
                notable.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_share_partitions_and_hand_them_over_in_order() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let world = partitioned_world("sync_cluster").await;
    let env = &world.env;
    let mut fleet = Fleet::default();
    for member in ["a", "b", "c"] {
        fleet.start(env, member).await;
    }
    let owned = balanced(&fleet, &[0, 1, 2]).await;

    let users = Load::scaled(500, 10).users;
    let total = users * 10;
    let started = Instant::now();
    env.publish_to_existing(both_ways(env, users, 10)).await;
    world
        .payload
        .wait_accepted(patience(total), |r| distinct(r) >= total / 3)
        .await;
    let victim = (0..3)
        .max_by(|x, y| owned[*x].total_cmp(&owned[*y]))
        .unwrap_or(0);
    let victim_parts = held_by(&fleet, victim);
    fleet.kill(victim);
    let killed = Instant::now();
    fleet.start(env, "d").await;

    let (to_payload, to_better_auth) = all_delivered(&world, &fleet, total).await;
    let elapsed = started.elapsed();
    let verdicts = check_both_ways(&to_payload, &to_better_auth, total);
    assert_mirrored(&world, users, 9).await;
    let holdings = fleet.assert_one_owner_at_a_time();
    let mut spans: BTreeMap<&str, usize> = BTreeMap::new();
    for h in &holdings {
        *spans.entry(&h.member).or_default() += 1;
    }
    let live: Vec<usize> = (0..fleet.engines.len()).filter(|i| *i != victim).collect();
    let end = balanced(&fleet, &live).await;
    let gaps = handovers(&to_payload, &to_better_auth, &victim_parts, killed);
    println!(
        "3 engines {owned:?}, {PARTITIONS} partitions, {} events both ways in {elapsed:.1?} \
         ({:.0}/s); killed {} holding {victim_parts:?}; hand-over per partition (last delivery \
         before the kill to the first after): {gaps:?}; holdings per engine {spans:?}; at the \
         end {end:?}; repeats {} and {}",
        2 * total,
        (2 * total) as f64 / elapsed.as_secs_f64(),
        fleet.engines[victim].member,
        verdicts.0.repeats,
        verdicts.1.repeats,
    );
    world.finish(fleet).await;
}

/// One engine is cut from PostgreSQL (its relay swallows every byte, the harder case: the server
/// learns nothing until its own idle timer ends the session) while its partitions have work. It
/// must stop working on them before another engine can take them, and the others must finish
/// them in order; once PostgreSQL is back it rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_cut_from_postgres_stops_before_its_partitions_move() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let world = partitioned_world("sync_pgcut").await;
    let env = &world.env;
    let relay = Relay::start("127.0.0.1:5432".parse().expect("address")).await;
    let through_relay = format!("postgres://postgres@{}/{}", relay.addr, world.db.name);
    let mut fleet = Fleet::default();
    fleet.start(env, "a").await;
    fleet.start(env, "b").await;
    let c = fleet
        .start_with(env, "c", &[("SYNC_ENGINE__STORE__URL", &through_relay)])
        .await;
    balanced(&fleet, &[0, 1, 2]).await;

    let users = Load::scaled(500, 10).users;
    let total = users * 10;
    env.publish_to_existing(both_ways(env, users, 10)).await;
    world
        .payload
        .wait_accepted(patience(total), |r| distinct(r) >= total / 3)
        .await;
    let cut_parts = held_by(&fleet, c);
    relay.blackhole();
    let cut = Instant::now();
    let cut_wall = SystemTime::now();
    let (to_payload, to_better_auth) = all_delivered(&world, &fleet, total).await;
    let verdicts = check_both_ways(&to_payload, &to_better_auth, total);
    let holdings = fleet.assert_one_owner_at_a_time();
    let since_cut = |at: SystemTime| at.duration_since(cut_wall).ok();
    let stopped = holdings
        .iter()
        .filter(|h| h.member == "c")
        .filter_map(|h| since_cut(h.to?))
        .max();
    let taken = holdings
        .iter()
        .filter(|h| h.member != "c")
        .filter(|h| {
            h.partition
                .parse()
                .is_ok_and(|p: u32| cut_parts.contains(&p))
        })
        .filter_map(|h| since_cut(h.from))
        .max();
    assert!(
        stopped.is_some() && taken.is_some(),
        "c stopped and its partitions moved:\n{}",
        fleet.logs()
    );
    let gaps = handovers(&to_payload, &to_better_auth, &cut_parts, cut);
    relay.restore();
    let rejoined = balanced(&fleet, &[0, 1, 2]).await;
    println!(
        "PostgreSQL black-holed for c holding {cut_parts:?}: c stopped its work {stopped:?} after \
         the cut, the last of its partitions was taken {taken:?} after it; delivery gaps per \
         partition {gaps:?}; repeats {} and {}; after the restore {rejoined:?}",
        verdicts.0.repeats, verdicts.1.repeats,
    );
    world.finish(fleet).await;
}

/// A partitioned engine refuses to start against a server that does not map its subjects to
/// the same partitions, and says what the server's configuration needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_same_mapping_is_refused_at_startup() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let db = PgDatabase::create("sync_mapping").await;
    let eight = NatsServer::start(&partition_mapping(8));
    for (server, what) in [(None, "no mapping"), (Some(&eight), "8 partitions")] {
        let payload = Receiver::start(TEST_SECRET).await;
        let better_auth = Receiver::start(TEST_SECRET).await;
        let mut opts = options(&db.url, &format!("partitions = {PARTITIONS}\n"));
        opts.nats_url = server.map(NatsServer::url);
        let url = opts
            .nats_url
            .clone()
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
        let client = async_nats::connect(url).await.expect("NATS");
        let mut env = TestEnv::with_client(&payload.url, &better_auth.url, opts, client);
        env.spawn_engine();
        let status = env.wait_engine_exit(Duration::from_secs(30));
        let log = env.engine_log();
        let status = status.unwrap_or_else(|| panic!("{what}: the engine runs on:\n{log}"));
        assert!(!status.success(), "{what}");
        assert!(
            log.contains("partition(16,3)") || log.contains("partition(16,2)"),
            "{what}: the fix is named:\n{log}"
        );
        let error = log
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or_default();
        println!("{what}: {error}");
    }
    db.drop_database().await;
}
