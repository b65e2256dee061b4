//! The root supervisor and the handle the engine (or the simulator) drives it through.
//!
//! Tree: `PipelineActor` supervises one `DeliveryActor` per enabled target, the
//! `RouterActor` (which supervises the `UserActor`s), the `DedupActor`, one `IngestActor`
//! per sink and, when the users mirror is configured, the `MirrorActor`. A failed child is
//! started again with the same arguments and published in its [`Slot`], so the actors that
//! talk to it reach the new one. Messages the dead child held are
//! handed back to the source (see [`crate::ports::Incoming`]), so nothing is lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use protocol::Origin;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::breaker::{Breaker, BreakerSettings};
use crate::dedup::{DedupActor, DedupArgs};
use crate::delivery::{DeliveryActor, DeliveryArgs, UserLanes};
use crate::ingest::{IngestActor, IngestArgs, IngestMsg};
use crate::messages::{DedupMsg, DeliveryMsg, RouterMsg, FLUSH_TIMEOUT_MS};
use crate::mirror::{MirrorActor, MirrorArgs, MirrorMsg};
use crate::ports::{EventSource, MirrorStore, Ports};
use crate::router::{RouterActor, RouterArgs};
use crate::settings::PipelineSettings;
use crate::sink::Sink;
use crate::slot::Slot;
use crate::stats::Stats;

/// Restarts allowed within [`RESTART_WINDOW`] before the supervisor gives up and fails
/// itself: a child that cannot stay up is a fault to surface, not to hide.
pub const RESTARTS_MAX: usize = 50;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

pub struct PipelineArgs {
    pub ports: Ports,
    pub settings: Arc<PipelineSettings>,
    pub sources: Vec<(Sink, Arc<dyn EventSource>)>,
    pub stats: Arc<Stats>,
    /// The PostgreSQL users mirror, when configured: its own consumer and its table.
    pub mirror: Option<MirrorPorts>,
}

/// What the mirror actor reads from and writes to.
#[derive(Clone)]
pub struct MirrorPorts {
    pub source: Arc<dyn EventSource>,
    pub store: Arc<dyn MirrorStore>,
    pub default_organization_id: String,
}

#[derive(Debug)]
pub enum PipelineMsg {
    /// Stop reading new messages (shutdown).
    Pause,
    /// How many user actors are alive.
    GetActiveUsers(ractor::RpcReplyPort<usize>),
    /// Save every user's state that only accepted deliveries changed (shutdown): answers how
    /// many were saved.
    Flush(ractor::RpcReplyPort<usize>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Child {
    Delivery(Origin),
    Router,
    Dedup,
    Ingest(Sink),
    Mirror,
}

pub struct PipelineState {
    args: PipelineArgs,
    budgets: Budgets,
    payload: Slot<DeliveryMsg>,
    better_auth: Slot<DeliveryMsg>,
    router: Slot<RouterMsg>,
    dedup: Slot<DedupMsg>,
    ingest: BTreeMap<Sink, ActorRef<IngestMsg>>,
    mirror: Option<ActorRef<MirrorMsg>>,
    children: BTreeMap<ActorId, Child>,
    restarts: Vec<Instant>,
    paused: bool,
    payload_lanes: Arc<UserLanes>,
    better_auth_lanes: Arc<UserLanes>,
    /// Each target's breaker, kept here so that it outlives its delivery actor.
    payload_breaker: Arc<std::sync::Mutex<Breaker>>,
    better_auth_breaker: Arc<std::sync::Mutex<Breaker>>,
}

#[derive(Debug, Default)]
pub struct PipelineActor;

impl PipelineActor {
    async fn spawn_child(
        myself: &ActorRef<PipelineMsg>,
        state: &mut PipelineState,
        child: Child,
    ) -> Result<(), ActorProcessingErr> {
        let cell: ActorCell = myself.get_cell();
        let ports = state.args.ports.clone();
        let settings = state.args.settings.clone();
        let stats = state.args.stats.clone();
        let id = match child {
            Child::Delivery(side) => {
                let args = DeliveryArgs {
                    side,
                    ports,
                    stats,
                    settings,
                    lanes: match side {
                        Origin::Payload => state.payload_lanes.clone(),
                        Origin::BetterAuth => state.better_auth_lanes.clone(),
                    },
                    breaker: match side {
                        Origin::Payload => state.payload_breaker.clone(),
                        Origin::BetterAuth => state.better_auth_breaker.clone(),
                    },
                };
                let (actor, _) = Actor::spawn_linked(None, DeliveryActor, args, cell).await?;
                let id = actor.get_id();
                match side {
                    Origin::Payload => state.payload.set(actor),
                    Origin::BetterAuth => state.better_auth.set(actor),
                }
                id
            }
            Child::Router => {
                let args = RouterArgs {
                    ports,
                    settings,
                    payload: state.payload.clone(),
                    better_auth: state.better_auth.clone(),
                    router: state.router.clone(),
                    stats,
                };
                let (actor, _) = Actor::spawn_linked(None, RouterActor, args, cell).await?;
                let id = actor.get_id();
                state.router.set(actor);
                id
            }
            Child::Dedup => {
                let args = DedupArgs {
                    ports,
                    router: state.router.clone(),
                    stats,
                };
                let (actor, _) = Actor::spawn_linked(None, DedupActor, args, cell).await?;
                let id = actor.get_id();
                state.dedup.set(actor);
                id
            }
            Child::Ingest(sink) => {
                let Some(source) = state
                    .args
                    .sources
                    .iter()
                    .find(|(s, _)| *s == sink)
                    .map(|(_, source)| source.clone())
                else {
                    return Ok(());
                };
                let args = IngestArgs {
                    sink,
                    source,
                    permits: state.budgets.of(sink),
                    dedup: state.dedup.clone(),
                    ports,
                    settings,
                    stats,
                };
                let (actor, _) = Actor::spawn_linked(None, IngestActor, args, cell).await?;
                if state.paused {
                    let _ = actor.cast(IngestMsg::Pause);
                }
                let id = actor.get_id();
                state.ingest.insert(sink, actor);
                id
            }
            Child::Mirror => {
                let Some(mirror) = state.args.mirror.clone() else {
                    return Ok(());
                };
                let args = MirrorArgs {
                    source: mirror.source,
                    store: mirror.store,
                    ports,
                    settings,
                    stats,
                    default_organization_id: mirror.default_organization_id,
                };
                let (actor, _) = Actor::spawn_linked(None, MirrorActor, args, cell).await?;
                if state.paused {
                    let _ = actor.cast(MirrorMsg::Pause);
                }
                let id = actor.get_id();
                state.mirror = Some(actor);
                id
            }
        };
        state.children.insert(id, child);
        Ok(())
    }
}

impl Actor for PipelineActor {
    type Msg = PipelineMsg;
    type State = PipelineState;
    type Arguments = (PipelineArgs, Budgets);

    async fn pre_start(
        &self,
        myself: ActorRef<PipelineMsg>,
        (args, budgets): (PipelineArgs, Budgets),
    ) -> Result<PipelineState, ActorProcessingErr> {
        let payload_breaker = breaker(&args.settings, Origin::Payload);
        let better_auth_breaker = breaker(&args.settings, Origin::BetterAuth);
        let mut state = PipelineState {
            args,
            budgets,
            payload: Slot::default(),
            better_auth: Slot::default(),
            router: Slot::default(),
            dedup: Slot::default(),
            ingest: BTreeMap::new(),
            mirror: None,
            children: BTreeMap::new(),
            restarts: Vec::new(),
            paused: false,
            payload_lanes: Arc::default(),
            better_auth_lanes: Arc::default(),
            payload_breaker,
            better_auth_breaker,
        };
        // Downstream first, so nothing is read before there is somewhere to send it.
        for side in Origin::ALL {
            if state.args.settings.target(side).is_some() {
                Self::spawn_child(&myself, &mut state, Child::Delivery(side)).await?;
            }
        }
        Self::spawn_child(&myself, &mut state, Child::Router).await?;
        Self::spawn_child(&myself, &mut state, Child::Dedup).await?;
        let sinks: Vec<Sink> = state.args.sources.iter().map(|(s, _)| *s).collect();
        for sink in sinks {
            Self::spawn_child(&myself, &mut state, Child::Ingest(sink)).await?;
        }
        if state.args.mirror.is_some() {
            Self::spawn_child(&myself, &mut state, Child::Mirror).await?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<PipelineMsg>,
        message: PipelineMsg,
        state: &mut PipelineState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PipelineMsg::Pause => {
                state.paused = true;
                for actor in state.ingest.values() {
                    let _ = actor.cast(IngestMsg::Pause);
                }
                if let Some(mirror) = &state.mirror {
                    let _ = mirror.cast(MirrorMsg::Pause);
                }
            }
            PipelineMsg::GetActiveUsers(reply) => {
                let count = match state.router.get() {
                    Some(router) => {
                        ractor::call_t!(router, RouterMsg::GetActiveUsers, 5_000).unwrap_or(0)
                    }
                    None => 0,
                };
                let _ = reply.send(count);
            }
            PipelineMsg::Flush(reply) => {
                let Some(router) = state.router.get() else {
                    let _ = reply.send(0);
                    return Ok(());
                };
                // Answered from a task: the saves take a commit, and supervision events must
                // not wait behind them.
                tokio::spawn(async move {
                    let saved = ractor::call_t!(router, RouterMsg::Flush, FLUSH_TIMEOUT_MS);
                    let _ = reply.send(saved.unwrap_or(0));
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<PipelineMsg>,
        event: SupervisionEvent,
        state: &mut PipelineState,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisionEvent::ActorFailed(cell, error) = event else {
            return Ok(());
        };
        let Some(child) = state.children.remove(&cell.get_id()) else {
            return Ok(());
        };
        tracing::error!(message = "Pipeline actor failed; restarting it.", child = ?child, %error);
        let now = Instant::now();
        state
            .restarts
            .retain(|at| now.duration_since(*at) < RESTART_WINDOW);
        state.restarts.push(now);
        if state.restarts.len() > RESTARTS_MAX {
            return Err(format!(
                "more than {RESTARTS_MAX} actor restarts within {RESTART_WINDOW:?}; last: {child:?}: {error}"
            )
            .into());
        }
        Self::spawn_child(&myself, state, child).await
    }
}

/// A target's breaker, closed (one that never opens for a disabled target).
fn breaker(settings: &PipelineSettings, side: Origin) -> Arc<std::sync::Mutex<Breaker>> {
    let breaker = settings.target(side).map_or(
        BreakerSettings {
            failures: 0,
            probe_interval: Duration::from_secs(1),
        },
        |target| target.breaker,
    );
    Arc::new(std::sync::Mutex::new(Breaker::new(breaker)))
}

/// Each sink's in-flight budget: a unit per message read and not yet settled, released with
/// the message (see [`crate::ports::Incoming::with_permit`]).
#[derive(Debug, Clone)]
pub struct Budgets(Vec<(Sink, Arc<Semaphore>, usize)>);

impl Budgets {
    pub fn new(settings: &PipelineSettings) -> Budgets {
        Budgets(
            Sink::ALL
                .into_iter()
                .map(|sink| {
                    let size = settings.sink_in_flight(sink);
                    (sink, Arc::new(Semaphore::new(size)), size)
                })
                .collect(),
        )
    }

    /// The budget of `sink`.
    pub fn of(&self, sink: Sink) -> Arc<Semaphore> {
        self.0
            .iter()
            .find(|(s, _, _)| *s == sink)
            .map(|(_, permits, _)| permits.clone())
            .unwrap_or_else(|| Arc::new(Semaphore::new(1)))
    }

    /// Messages held unsettled, over every sink.
    fn in_use(&self) -> usize {
        self.0
            .iter()
            .map(|(_, permits, size)| size.saturating_sub(permits.available_permits()))
            .sum()
    }
}

/// Reads how many messages the pipeline holds unsettled.
#[derive(Debug, Clone)]
pub struct InFlight(Budgets);

impl InFlight {
    pub fn get(&self) -> usize {
        self.0.in_use()
    }
}

/// A running pipeline.
#[derive(Debug)]
pub struct Pipeline {
    pub root: ActorRef<PipelineMsg>,
    pub handle: tokio::task::JoinHandle<()>,
    pub stats: Arc<Stats>,
    budgets: Budgets,
}

impl Pipeline {
    pub async fn start(mut args: PipelineArgs) -> Result<Pipeline, ractor::SpawnErr> {
        let mut settings = (*args.settings).clone();
        settings.started_at_ms = args.ports.clock.now_ms();
        args.settings = Arc::new(settings);
        let budgets = Budgets::new(&args.settings);
        let stats = args.stats.clone();
        let (root, handle) = Actor::spawn(None, PipelineActor, (args, budgets.clone())).await?;
        Ok(Pipeline {
            root,
            handle,
            stats,
            budgets,
        })
    }

    /// Messages read but not yet settled.
    pub fn in_flight(&self) -> usize {
        self.budgets.in_use()
    }

    /// A handle that reads [`Pipeline::in_flight`] from elsewhere (the metrics endpoint).
    pub fn in_flight_gauge(&self) -> InFlight {
        InFlight(self.budgets.clone())
    }

    /// Stops intake, waits up to `grace` for held messages to settle, then stops every actor;
    /// what is still unsettled is handed back to the source.
    pub async fn shutdown(self, grace: Duration) -> usize {
        let _ = self.root.cast(PipelineMsg::Pause);
        let deadline = Instant::now() + grace;
        while self.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.in_flight();
        // Stopping an actor skips its children's `post_stop`: what only accepted deliveries
        // changed is saved now, or a restart would repeat those deliveries.
        let saved = ractor::call_t!(self.root, PipelineMsg::Flush, FLUSH_TIMEOUT_MS).unwrap_or(0);
        tracing::debug!(
            message = "Users' states saved for shutdown.",
            n_saved = saved
        );
        self.root.stop(Some("shutdown".into()));
        let _ = self.handle.await;
        left
    }

    /// Stops every actor at once, as a crash would: nothing is settled on the way out.
    pub async fn kill(self) {
        self.root.kill();
        let _ = self.handle.await;
    }
}
