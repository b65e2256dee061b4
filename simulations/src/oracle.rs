//! What the run must end with: the last-writer-wins merge of every local edit, per field, with
//! deletion final, computed independently of the engine.

use std::collections::BTreeMap;

use protocol::Origin;
use serde_json::Value;

#[derive(Debug, Clone)]
struct Stamp {
    value: Value,
    ts: i64,
    origin: Origin,
}

#[derive(Debug, Default, Clone)]
pub struct OracleUser {
    fields: BTreeMap<String, Stamp>,
    pub deleted: bool,
}

/// Every local edit, applied per user in commit order.
#[derive(Debug, Default)]
pub struct Oracle {
    pub users: BTreeMap<String, OracleUser>,
    /// Local edits and deletions: the changes deliveries are bounded by.
    pub changes: u64,
    /// Bad messages published, with the reason each must be dead-lettered with.
    pub bad: Vec<(Vec<u8>, String)>,
}

impl Oracle {
    pub fn edit(&mut self, user: &str, origin: Origin, ts: i64, fields: &[(String, Value)]) {
        self.changes += 1;
        let entry = self.users.entry(user.to_string()).or_default();
        for (name, value) in fields {
            let wins = match entry.fields.get(name) {
                None => true,
                Some(held) if ts != held.ts => ts > held.ts,
                Some(held) => origin == held.origin || origin == Origin::BetterAuth,
            };
            if wins {
                entry.fields.insert(
                    name.clone(),
                    Stamp {
                        value: value.clone(),
                        ts,
                        origin,
                    },
                );
            }
        }
    }

    /// A resync request: no change, but it may cause a delivery.
    pub fn resync_requested(&mut self) {
        self.changes += 1;
    }

    pub fn delete(&mut self, user: &str) {
        self.changes += 1;
        self.users.entry(user.to_string()).or_default().deleted = true;
    }

    /// The expected user in canonical names (with `id`), `None` when deleted.
    pub fn expected(&self, user: &str) -> Option<BTreeMap<String, Value>> {
        let entry = self.users.get(user)?;
        if entry.deleted {
            return None;
        }
        let mut out: BTreeMap<String, Value> = entry
            .fields
            .iter()
            .map(|(k, s)| (k.clone(), s.value.clone()))
            .collect();
        out.insert("id".into(), Value::String(user.into()));
        Some(out)
    }
}
