//! Concurrent edits, echoes, overwrites and deletions (PROTOCOL.md §5.4–5.5) end to end, with
//! stand-in applications that apply deliveries blindly.

use protocol::{EventType, Origin};
use serde_json::json;
use tests::app::{settle, App};
use tests::env::{now_ms, EnvOptions, TestEnv};
use tests::receiver::Receiver;
use tests::TEST_SECRET;

const BA: Origin = Origin::BetterAuth;
const PL: Origin = Origin::Payload;

struct World {
    env: TestEnv,
    payload_rx: Receiver,
    better_auth_rx: Receiver,
    payload: App,
    better_auth: App,
}

impl World {
    async fn new(echo: bool) -> World {
        let payload_rx = Receiver::start(TEST_SECRET).await;
        let better_auth_rx = Receiver::start(TEST_SECRET).await;
        let mut env =
            TestEnv::new(&payload_rx.url, &better_auth_rx.url, EnvOptions::default()).await;
        env.start_engine().await;
        World {
            env,
            payload_rx,
            better_auth_rx,
            payload: App::new(PL, echo),
            better_auth: App::new(BA, echo),
        }
    }

    async fn settle(&mut self) -> usize {
        settle(
            &self.env,
            (&mut self.payload, &self.payload_rx),
            (&mut self.better_auth, &self.better_auth_rx),
            700,
        )
        .await
    }

    /// Both apps hold the same user, field by field.
    fn assert_converged(&self, user: &str) {
        assert_eq!(
            self.payload.is_deleted(user),
            self.better_auth.is_deleted(user),
            "deleted on one side only"
        );
        if self.payload.is_deleted(user) {
            return;
        }
        assert_eq!(
            self.payload.field(user, "email"),
            self.better_auth.field(user, "email"),
            "email"
        );
        assert_eq!(
            self.payload.field(user, "fullName"),
            self.better_auth.field(user, "name"),
            "name"
        );
    }

    /// A user both sides hold, created in Better Auth.
    async fn create(&mut self, user: &str, t: i64) {
        self.better_auth
            .edit(
                &self.env,
                &format!("create-{user}"),
                user,
                EventType::Created,
                t,
                json!({"email": "a@x", "name": "N"}),
            )
            .await;
        self.settle().await;
        self.assert_converged(user);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_payload_edit_arriving_later_loses_on_both_sides() {
    let mut w = World::new(false).await;
    let t = now_ms();
    w.create("u1", t).await;
    w.better_auth
        .edit(
            &w.env,
            "ba-A",
            "u1",
            EventType::Updated,
            t + 2_000,
            json!({"name": "A"}),
        )
        .await;
    w.settle().await;
    // Payload's edit was made earlier (t+1000) but arrives now.
    w.payload
        .edit(
            &w.env,
            "pl-B",
            "u1",
            EventType::Updated,
            t + 1_000,
            json!({"fullName": "B"}),
        )
        .await;
    w.settle().await;
    assert_eq!(w.better_auth.field("u1", "name"), Some(json!("A")));
    assert_eq!(w.payload.field("u1", "fullName"), Some(json!("A")));
    assert!(
        w.payload_rx
            .accepted()
            .iter()
            .any(|d| d.webhook_id() == "pl-B:resync"),
        "Payload is re-sent the winning value"
    );
    assert!(
        w.better_auth_rx.accepted().is_empty(),
        "Better Auth already holds the winner"
    );
    w.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_fields_edited_concurrently_survive_on_both_sides() {
    let mut w = World::new(false).await;
    let t = now_ms();
    w.create("u1", t).await;
    // Both edit at about the same moment, each one field, and each publishes its whole user;
    // Payload's event is processed after Better Auth's change already reached it.
    let edited_at = now_ms();
    w.better_auth
        .edit(
            &w.env,
            "ba-email",
            "u1",
            EventType::Updated,
            edited_at,
            json!({"email": "b@x"}),
        )
        .await;
    w.payload
        .edit(
            &w.env,
            "pl-name",
            "u1",
            EventType::Updated,
            edited_at + 1,
            json!({"fullName": "M"}),
        )
        .await;
    w.settle().await;
    let trail = |rx: &Receiver| {
        rx.accepted()
            .iter()
            .map(|d| format!("{} {}", d.webhook_id(), d.body["data"]))
            .collect::<Vec<_>>()
    };
    eprintln!(
        "to better-auth: {:#?}\nto payload: {:#?}",
        trail(&w.better_auth_rx),
        trail(&w.payload_rx)
    );
    assert_eq!(w.better_auth.field("u1", "email"), Some(json!("b@x")));
    assert_eq!(w.better_auth.field("u1", "name"), Some(json!("M")));
    w.assert_converged("u1");
    w.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_is_not_propagated_even_after_a_later_delivery() {
    let mut w = World::new(false).await;
    let t = now_ms();
    w.create("u1", t).await;
    w.better_auth
        .edit(
            &w.env,
            "ba-A",
            "u1",
            EventType::Updated,
            t + 100,
            json!({"name": "A"}),
        )
        .await;
    w.settle().await;
    w.better_auth
        .edit(
            &w.env,
            "ba-C",
            "u1",
            EventType::Updated,
            t + 200,
            json!({"name": "C"}),
        )
        .await;
    w.settle().await;
    let before = w.better_auth_rx.received().len();
    // Payload's hook reports the first delivery only now, after the second one landed.
    w.env
        .publish(
            "late-echo",
            PL,
            EventType::Updated,
            now_ms(),
            json!({"betterAuthUserId": "u1", "email": "a@x", "fullName": "A"}),
        )
        .await;
    // And the echo of the second.
    w.env
        .publish(
            "echo-C",
            PL,
            EventType::Updated,
            now_ms(),
            json!({"betterAuthUserId": "u1", "email": "a@x", "fullName": "C"}),
        )
        .await;
    w.settle().await;
    assert_eq!(
        w.better_auth_rx.received().len(),
        before,
        "echoes go nowhere"
    );
    assert_eq!(w.better_auth.field("u1", "name"), Some(json!("C")));
    assert_eq!(w.payload.field("u1", "fullName"), Some(json!("C")));
    assert!(w.env.metric("sync_engine_echoes_total").await >= 2.0);
    w.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_edit_overwritten_by_an_in_flight_delivery_ends_on_both_sides() {
    let mut w = World::new(false).await;
    let t = now_ms();
    w.create("u1", t).await;
    let a_at = now_ms();
    w.better_auth
        .edit(
            &w.env,
            "ba-A",
            "u1",
            EventType::Updated,
            a_at,
            json!({"name": "A"}),
        )
        .await;
    w.settle().await;
    // Payload's editor saved B after A was written in Better Auth but before the delivery of A
    // landed and overwrote it; the event of that edit is published only now.
    w.payload
        .edit(
            &w.env,
            "pl-B",
            "u1",
            EventType::Updated,
            a_at + 1,
            json!({"fullName": "B"}),
        )
        .await;
    w.settle().await;
    assert_eq!(w.better_auth.field("u1", "name"), Some(json!("B")));
    assert_eq!(w.payload.field("u1", "fullName"), Some(json!("B")));
    w.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_update_brings_a_deleted_user_back() {
    let mut w = World::new(false).await;
    let t = now_ms();
    w.create("u1", t).await;
    w.better_auth
        .edit(
            &w.env,
            "ba-del",
            "u1",
            EventType::Deleted,
            t + 100,
            json!({}),
        )
        .await;
    w.settle().await;
    assert!(w.payload.is_deleted("u1"));
    // Payload still had a pending edit of the user; it must not resurrect it.
    w.payload
        .edit(
            &w.env,
            "pl-zombie",
            "u1",
            EventType::Updated,
            t + 5_000,
            json!({"fullName": "Zombie"}),
        )
        .await;
    w.settle().await;
    assert!(
        w.payload.is_deleted("u1"),
        "Payload is sent the deletion again"
    );
    assert!(w.better_auth.is_deleted("u1"));
    let resent = w.payload_rx.accepted();
    assert_eq!(
        resent.last().map(|d| d.webhook_id().to_string()),
        Some("pl-zombie:resync".into())
    );
    assert_eq!(
        resent.last().map(|d| d.body["type"].clone()),
        Some(json!("user.deleted"))
    );
    assert!(w.better_auth_rx.accepted().is_empty());
    w.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_that_echo_everything_converge_and_go_quiet() {
    let mut w = World::new(true).await;
    let t = now_ms();
    for u in 0..5 {
        w.better_auth
            .edit(
                &w.env,
                &format!("c{u}"),
                &format!("u{u}"),
                EventType::Created,
                t,
                json!({"email": format!("u{u}@x"), "name": "N"}),
            )
            .await;
    }
    w.settle().await;
    for u in 0..5 {
        let user = format!("u{u}");
        w.better_auth
            .edit(
                &w.env,
                &format!("b{u}"),
                &user,
                EventType::Updated,
                now_ms(),
                json!({"name": format!("B{u}")}),
            )
            .await;
        w.payload
            .edit(
                &w.env,
                &format!("p{u}"),
                &user,
                EventType::Updated,
                now_ms(),
                json!({"email": format!("p{u}@x")}),
            )
            .await;
    }
    w.better_auth
        .edit(
            &w.env,
            "del-u4",
            "u4",
            EventType::Deleted,
            now_ms(),
            json!({}),
        )
        .await;
    let deliveries = w.settle().await;
    for u in 0..5 {
        w.assert_converged(&format!("u{u}"));
    }
    assert!(w.payload.is_deleted("u4") && w.better_auth.is_deleted("u4"));
    // Bounded: a handful of deliveries per change, never a loop (settle fails on a loop).
    assert!(deliveries <= 40, "{deliveries} deliveries for 11 changes");
    w.env.cleanup().await;
}
