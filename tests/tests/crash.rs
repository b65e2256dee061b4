//! A SIGKILL in the middle of a load, then a restart: nothing lost, order kept, and duplicates
//! only for what was in flight at the kill.

use std::collections::BTreeSet;
use std::time::Duration;

use protocol::{EventType, Origin};
use serde_json::json;
use tests::env::{now_ms, EnvOptions, TestEnv};
use tests::load::Verdict;
use tests::receiver::Receiver;
use tests::TEST_SECRET;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_then_restart_loses_nothing_and_keeps_order() {
    const USERS: i64 = 500;
    const EVENTS: i64 = 20;
    const TOTAL: usize = (USERS * EVENTS) as usize;
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let mut env = TestEnv::new(
        &payload.url,
        &better_auth.url,
        EnvOptions {
            ack_wait: "3s",
            ..EnvOptions::default()
        },
    )
    .await;
    // Slow the receiver a little so the kill lands mid-load.
    payload.script(|_| {
        std::thread::sleep(Duration::from_micros(300));
        200
    });
    let t0 = now_ms();
    let mut messages = Vec::new();
    for k in 0..EVENTS {
        for u in 0..USERS {
            let id = format!("k-{u}-{k}");
            let body = json!({"id": id, "origin": "better-auth", "type": "user.updated", "timestamp": t0 + k,
                              "data": {"id": format!("u{u}"), "email": format!("u{u}@x"), "seq": k}});
            messages.push((
                env.subject(Origin::BetterAuth, EventType::Updated, &format!("u{u}")),
                id,
                serde_json::to_vec(&body).expect("json"),
            ));
        }
    }
    env.publish_many(messages).await;
    env.start_engine().await;
    payload
        .wait_accepted(Duration::from_secs(120), |r| r.len() >= TOTAL / 3)
        .await;
    let kill_ms = now_ms();
    env.kill_engine();
    // Requests the receiver was still answering when the engine died land just after.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_kill = payload.accepted().len();
    assert!(
        at_kill < TOTAL,
        "the kill must land mid-load (got {at_kill} of {TOTAL} already)"
    );

    let restarted = std::time::Instant::now();
    env.start_engine().await;
    let ready_after = restarted.elapsed();
    let first = payload
        .wait_accepted(Duration::from_secs(60), |r| r.len() > at_kill)
        .await;
    let first_after = first[at_kill..]
        .iter()
        .map(|r| r.at.saturating_duration_since(restarted))
        .min()
        .unwrap_or_default();
    eprintln!(
        "restart: ready after {ready_after:?}, first delivery {first_after:?} after the restart"
    );
    let accepted = payload
        .wait_accepted(Duration::from_secs(180), |r| {
            r.iter()
                .map(|d| d.webhook_id().to_string())
                .collect::<BTreeSet<_>>()
                .len()
                >= TOTAL
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted_final = payload.accepted();
    assert_eq!(
        accepted_final.len(),
        accepted.len(),
        "nothing more arrives once all are in"
    );

    let verdict = Verdict::of(&accepted);
    assert_eq!(verdict.delivered, TOTAL, "every event delivered");
    let duplicates = verdict.repeats;
    eprintln!(
        "killed after {at_kill} deliveries; {duplicates} duplicate deliveries after the restart"
    );
    assert_eq!(verdict.order_violations, 0, "per-user order");
    // In flight at the kill: at most one request per user line (the head), plus what the
    // receiver accepted but the engine had not yet recorded.
    assert!(
        duplicates <= USERS as usize,
        "{duplicates} duplicates is more than one per user"
    );
    // Every repeated delivery was first sent before the kill (its attempt time says so).
    let mut seen = BTreeSet::new();
    for d in &accepted {
        if !seen.insert(d.webhook_id().to_string()) {
            let first = accepted
                .iter()
                .find(|r| r.webhook_id() == d.webhook_id())
                .map(|r| {
                    r.header("x-webhook-timestamp")
                        .parse::<i64>()
                        .unwrap_or(i64::MAX)
                })
                .unwrap_or(i64::MAX);
            assert!(
                first <= kill_ms,
                "{} was delivered twice but was not in flight at the kill",
                d.webhook_id()
            );
        }
    }
    env.cleanup().await;
}
