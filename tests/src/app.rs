//! A stand-in application behind a test receiver: it applies every accepted delivery blindly
//! (as real receivers do) and can echo each applied write back as its own event, as an app
//! whose hooks ignore `x-webhook-origin` would.

use std::collections::BTreeMap;

use protocol::{EventType, Origin};
use serde_json::{Map, Value};

use crate::env::{now_ms, TestEnv};
use crate::receiver::Receiver;

pub struct App {
    pub side: Origin,
    pub echo: bool,
    /// Users by Better Auth id, in this side's field names; `None` once deleted.
    pub users: BTreeMap<String, Option<Map<String, Value>>>,
    applied: usize,
    n_echoes: usize,
}

impl App {
    pub fn new(side: Origin, echo: bool) -> App {
        App {
            side,
            echo,
            users: BTreeMap::new(),
            applied: 0,
            n_echoes: 0,
        }
    }

    fn id_field(&self) -> &'static str {
        match self.side {
            Origin::BetterAuth => "id",
            Origin::Payload => "betterAuthUserId",
        }
    }

    /// A local edit: stores it and publishes it with commit time `ts`.
    pub async fn edit(
        &mut self,
        env: &TestEnv,
        event_id: &str,
        user: &str,
        ty: EventType,
        ts: i64,
        fields: Value,
    ) {
        let mut data = match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        data.insert(self.id_field().into(), Value::String(user.into()));
        if ty == EventType::Deleted {
            self.users.insert(user.into(), None);
        } else {
            let entry = self
                .users
                .entry(user.into())
                .or_insert_with(|| Some(Map::new()));
            if let Some(stored) = entry {
                stored.extend(data.clone());
            }
        }
        let published = match ty {
            EventType::Deleted => {
                let mut only_id = Map::new();
                only_id.insert(self.id_field().into(), Value::String(user.into()));
                only_id
            }
            _ => self.users.get(user).cloned().flatten().unwrap_or(data),
        };
        env.publish(event_id, self.side, ty, ts, Value::Object(published))
            .await;
    }

    /// Applies the deliveries accepted since the last call; echoes them when asked. Returns
    /// how many were applied.
    pub async fn apply(&mut self, receiver: &Receiver, env: &TestEnv) -> usize {
        let accepted = receiver.accepted();
        let new: Vec<_> = accepted[self.applied.min(accepted.len())..].to_vec();
        self.applied = accepted.len();
        for delivery in &new {
            let data = delivery.body["data"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let user = data
                .get(self.id_field())
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let ty = EventType::parse(delivery.body["type"].as_str().unwrap_or(""))
                .unwrap_or(EventType::Updated);
            match ty {
                EventType::Deleted => {
                    self.users.insert(user.clone(), None);
                }
                _ => {
                    let entry = self
                        .users
                        .entry(user.clone())
                        .or_insert_with(|| Some(Map::new()));
                    match entry {
                        Some(stored) => stored.extend(data.clone()),
                        // A deleted user stays deleted in the app too.
                        None => continue,
                    }
                }
            }
            if self.echo {
                self.n_echoes += 1;
                let id = format!(
                    "echo-{}-{}-{}",
                    self.side.as_str(),
                    self.n_echoes,
                    uuid::Uuid::new_v4().simple()
                );
                let body = match ty {
                    EventType::Deleted => {
                        let mut m = Map::new();
                        m.insert(self.id_field().into(), Value::String(user.clone()));
                        m
                    }
                    _ => self.users.get(&user).cloned().flatten().unwrap_or_default(),
                };
                env.publish(&id, self.side, ty, now_ms(), Value::Object(body))
                    .await;
            }
        }
        new.len()
    }

    /// A field of a user, `None` when the user is deleted or unknown.
    pub fn field(&self, user: &str, field: &str) -> Option<Value> {
        self.users
            .get(user)
            .cloned()
            .flatten()
            .and_then(|m| m.get(field).cloned())
    }

    pub fn is_deleted(&self, user: &str) -> bool {
        matches!(self.users.get(user), Some(None))
    }
}

/// Lets both apps apply deliveries (and echo) until nothing new arrives for `quiet_ms`.
/// Returns the number of deliveries applied in all. Fails if traffic never stops.
pub async fn settle(
    env: &TestEnv,
    payload: (&mut App, &Receiver),
    better_auth: (&mut App, &Receiver),
    quiet_ms: u64,
) -> usize {
    let (pa, pr) = payload;
    let (ba, br) = better_auth;
    let mut total = 0;
    let mut quiet_since = std::time::Instant::now();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n = pa.apply(pr, env).await + ba.apply(br, env).await;
        total += n;
        if n > 0 {
            quiet_since = std::time::Instant::now();
        }
        if quiet_since.elapsed().as_millis() as u64 >= quiet_ms {
            return total;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "traffic did not stop within 60s ({total} deliveries): a sync loop?"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
