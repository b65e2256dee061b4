//! `/metrics` after a known workload: every family parses as Prometheus text, and the counters
//! hold exactly what the workload caused.

use std::collections::BTreeMap;
use std::time::Duration;

use protocol::{EventType, Origin};
use serde_json::json;
use tests::env::{now_ms, EnvOptions, TestEnv};
use tests::receiver::Receiver;
use tests::TEST_SECRET;

const WAIT: Duration = Duration::from_secs(30);

/// Samples by `name{labels}` (labels as rendered), after checking every line's shape: a
/// `# HELP`/`# TYPE` comment, or `name[{k="v",...}] number`, each family typed before use.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut typed = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample: series value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("number in {line}"));
        let name = series.split('{').next().expect("name");
        assert!(name.starts_with("sync_engine_"), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(typed.contains_key(family), "{name} used before its # TYPE");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').expect("label k=v");
                    assert!(
                        !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                        "{line}"
                    );
                }
            }
        }
        samples.insert(series.to_string(), value);
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_a_known_workload() {
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    // Payload answers 500 to its first request, then 200; Better Auth rejects every request
    // with 400 (a permanent error: dead-lettered at once).
    let mut calls = 0;
    payload.script(move |_| {
        calls += 1;
        if calls == 1 {
            500
        } else {
            200
        }
    });
    better_auth.script(|_| 400);
    let mut env = TestEnv::new(&payload.url, &better_auth.url, EnvOptions::default()).await;
    env.start_engine().await;
    let t = now_ms();
    for (i, user) in ["u1", "u2", "u3"].iter().enumerate() {
        env.publish(
            &format!("mx-{i}"),
            Origin::BetterAuth,
            EventType::Created,
            t + i as i64,
            json!({"id": user, "email": format!("{user}@x")}),
        )
        .await;
    }
    // A republished duplicate (same event id, new message id).
    let body = json!({"id": "mx-0", "origin": "better-auth", "type": "user.created", "timestamp": t,
                      "data": {"id": "u1", "email": "u1@x"}});
    env.publish_raw(
        &env.subject(Origin::BetterAuth, EventType::Created, "u1"),
        "mx-0-again",
        body.to_string().into_bytes(),
    )
    .await;
    // A bad message and an unlinked Payload user.
    env.publish_raw(
        &env.subject(Origin::BetterAuth, EventType::Updated, "x"),
        "mx-bad",
        b"not json".to_vec(),
    )
    .await;
    env.publish(
        "mx-unlinked",
        Origin::Payload,
        EventType::Updated,
        t,
        json!({"email": "nobody@x", "fullName": "No One"}),
    )
    .await;
    // A Payload edit of u2, which Better Auth refuses. Committed well after the engine's
    // delivery of u2 to Payload, so it is not one that delivery may have overwritten (which
    // would send u2 back to Payload, §5.5).
    payload.wait_accepted(WAIT, |r| r.len() >= 3).await;
    env.publish(
        "mx-pl",
        Origin::Payload,
        EventType::Updated,
        now_ms() + 5_000,
        json!({"betterAuthUserId": "u2", "email": "u2@x", "fullName": "Two"}),
    )
    .await;

    payload.wait_accepted(WAIT, |r| r.len() >= 3).await;
    tests::env::eventually(WAIT, "the Better Auth dead letter", || {
        env.dead_letters()
            .iter()
            .any(|d| d["reason"] == "delivery_rejected")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = reqwest::get(format!("http://{}/metrics", env.http))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let m = parse(&text);
    let get = |series: &str| -> f64 {
        *m.get(series)
            .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
    };
    assert_eq!(
        get(r#"sync_engine_events_received_total{origin="better-auth"}"#),
        4.0
    );
    assert_eq!(
        get(r#"sync_engine_events_received_total{origin="payload"}"#),
        2.0
    );
    assert_eq!(get("sync_engine_duplicates_total"), 1.0);
    assert_eq!(get("sync_engine_skipped_unlinked_total"), 1.0);
    assert_eq!(
        get(r#"sync_engine_dead_letters_total{reason="invalid_json",sink="payload"}"#),
        1.0
    );
    assert_eq!(
        get(r#"sync_engine_dead_letters_total{reason="delivery_rejected",sink="better-auth"}"#),
        1.0
    );
    assert_eq!(
        get(r#"sync_engine_deliveries_total{sink="payload",status="2xx"}"#),
        3.0
    );
    assert_eq!(
        get(r#"sync_engine_deliveries_total{sink="payload",status="5xx"}"#),
        1.0
    );
    assert_eq!(
        get(r#"sync_engine_deliveries_total{sink="better-auth",status="4xx"}"#),
        1.0
    );
    assert_eq!(
        get(r#"sync_engine_retries_by_sink_total{sink="payload"}"#),
        1.0
    );
    assert_eq!(get("sync_engine_retries_total"), 1.0);
    assert_eq!(
        get(r#"sync_engine_delivery_duration_seconds_count{sink="payload"}"#),
        4.0
    );
    assert_eq!(
        get(r#"sync_engine_delivery_duration_seconds_bucket{sink="payload",le="+Inf"}"#),
        4.0
    );
    assert_eq!(get("sync_engine_events_in_flight"), 0.0);
    let prefix = format!("t{}", env.id);
    assert_eq!(
        get(&format!(
            r#"sync_engine_consumer_pending{{consumer="{prefix}-payload"}}"#
        )),
        0.0
    );
    assert_eq!(
        get(&format!(
            r#"sync_engine_consumer_ack_pending{{consumer="{prefix}-better-auth"}}"#
        )),
        0.0
    );
    // Two users: their actors, or their parked states once the actors went idle.
    assert!(get("sync_engine_users_active") + get("sync_engine_users_parked") >= 2.0);
    // Acked: 3 delivered + the duplicate + the bad message + the unlinked + the dead-lettered.
    assert_eq!(get("sync_engine_acked_total"), 7.0);
    env.cleanup().await;
}
