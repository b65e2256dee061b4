//! The router: hands each event to its user's actor, spawning it on demand, and supervises the
//! user actors.
//!
//! Architecture Invariant: at most one live user actor per user key, so one user's events are
//! applied one at a time, in arrival order.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use protocol::UserKey;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

pub use crate::messages::RouterMsg;
use crate::messages::{DeliveryMsg, UserMsg, FLUSH_TIMEOUT_MS};
use crate::parked::Parked;
use crate::ports::Ports;
use crate::settings::PipelineSettings;
use crate::slot::Slot;
use crate::stats::Stats;
use crate::user::{UserActor, UserArgs};

pub struct RouterArgs {
    pub ports: Ports,
    pub settings: Arc<PipelineSettings>,
    pub payload: Slot<DeliveryMsg>,
    pub better_auth: Slot<DeliveryMsg>,
    pub router: Slot<RouterMsg>,
    pub stats: Arc<Stats>,
}

struct UserEntry {
    actor: ActorRef<UserMsg>,
    /// Events sent to it; compared with what it received before letting it stop.
    sent: u64,
}

pub struct RouterState {
    args: RouterArgs,
    users: BTreeMap<UserKey, UserEntry>,
    keys: HashMap<ActorId, UserKey>,
    /// Users whose actor just failed: their events go back to the source until then, so that
    /// the ones the dead actor held (handed back first) and the newer ones already on their
    /// way come again together, in stream order, instead of the newer ones overtaking.
    quarantine: BTreeMap<UserKey, Instant>,
    /// Idle users' states, without their actors.
    parked: Parked,
    /// An [`RouterMsg::ExpireParked`] is on its way.
    expiry_armed: bool,
}

/// How long a user's events are handed back after its actor failed.
pub const QUARANTINE: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
pub struct RouterActor;

impl Actor for RouterActor {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<RouterMsg>,
        args: RouterArgs,
    ) -> Result<RouterState, ActorProcessingErr> {
        let parked = Parked::new(
            args.settings.idle_cache_bytes,
            args.settings.user_idle_timeout,
            args.stats.clone(),
        );
        Ok(RouterState {
            args,
            users: BTreeMap::new(),
            keys: HashMap::new(),
            quarantine: BTreeMap::new(),
            parked,
            expiry_armed: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<RouterMsg>,
        message: RouterMsg,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RouterMsg::Route(routed) => {
                let Some(key) = routed.event.key.clone() else {
                    return Ok(());
                };
                if let Some(until) = state.quarantine.get(&key).copied() {
                    let now = Instant::now();
                    if now < until {
                        routed.incoming.nak(until - now).await;
                        return Ok(());
                    }
                    state.quarantine.remove(&key);
                }
                if !state.users.contains_key(&key) {
                    let args = UserArgs {
                        parked: state.parked.take(&key),
                        key: key.clone(),
                        ports: state.args.ports.clone(),
                        settings: state.args.settings.clone(),
                        payload: state.args.payload.clone(),
                        better_auth: state.args.better_auth.clone(),
                        router: state.args.router.clone(),
                        stats: state.args.stats.clone(),
                    };
                    let (actor, _) =
                        Actor::spawn_linked(None, UserActor, args, myself.get_cell()).await?;
                    state.keys.insert(actor.get_id(), key.clone());
                    state
                        .users
                        .insert(key.clone(), UserEntry { actor, sent: 0 });
                    state
                        .args
                        .stats
                        .users_active
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if let Some(entry) = state.users.get_mut(&key) {
                    entry.sent += 1;
                    // A send to an actor that just died drops the message, which hands it
                    // back to the source.
                    let _ = entry.actor.cast(UserMsg::Event(routed));
                }
            }
            RouterMsg::Idle {
                key,
                actor,
                received,
                parked,
            } => {
                let idle = state
                    .users
                    .get(&key)
                    .is_some_and(|e| e.actor.get_id() == actor && e.sent == received);
                if idle {
                    let now = Instant::now();
                    if let Some(parked) = parked {
                        state.parked.park(key.clone(), parked, now);
                        arm_expiry(&myself, state, now);
                    }
                    if let Some(entry) = state.users.remove(&key) {
                        state.keys.remove(&entry.actor.get_id());
                        state
                            .args
                            .stats
                            .users_active
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        entry.actor.stop(Some("idle".into()));
                    }
                }
            }
            RouterMsg::ExpireParked => {
                state.expiry_armed = false;
                let now = Instant::now();
                state.parked.expire(now);
                arm_expiry(&myself, state, now);
            }
            RouterMsg::GetActiveUsers(reply) => {
                let _ = reply.send(state.users.len());
            }
            RouterMsg::Flush(reply) => {
                let actors: Vec<ActorRef<UserMsg>> =
                    state.users.values().map(|e| e.actor.clone()).collect();
                tokio::spawn(async move {
                    let saves = actors.iter().map(|actor| async move {
                        ractor::call_t!(actor, UserMsg::Flush, FLUSH_TIMEOUT_MS)
                    });
                    let results = futures::future::join_all(saves).await;
                    let saved = results.iter().filter(|r| matches!(r, Ok(true))).count();
                    let _ = reply.send(saved);
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<RouterMsg>,
        event: SupervisionEvent,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match &event {
            SupervisionEvent::ActorFailed(cell, error) => (cell, Some(error.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            _ => return Ok(()),
        };
        if let Some(key) = state.keys.remove(&cell.get_id()) {
            if let Some(error) = failure {
                // Its unsettled messages were handed back to the source when it died; the
                // next one for this user starts a fresh actor from the stored state.
                tracing::error!(message = "User actor failed; it restarts on the user's next event.", user = %key, %error);
                state
                    .quarantine
                    .insert(key.clone(), Instant::now() + QUARANTINE);
            }
            let current = state.users.get(&key).map(|e| e.actor.get_id());
            if current == Some(cell.get_id()) {
                state.users.remove(&key);
                state
                    .args
                    .stats
                    .users_active
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// Schedules the next expiry of parked states while any are parked, so that they (and the
/// gauges) go on time even when no event comes.
fn arm_expiry(myself: &ActorRef<RouterMsg>, state: &mut RouterState, now: Instant) {
    if state.expiry_armed {
        return;
    }
    if let Some(due) = state.parked.next_expiry() {
        state.expiry_armed = true;
        myself.send_after(due.saturating_duration_since(now), || {
            RouterMsg::ExpireParked
        });
    }
}
