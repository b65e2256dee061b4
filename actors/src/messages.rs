//! The messages the actors exchange, in one place that every actor imports and that imports
//! no actor: an actor's module never imports another actor's module for its messages, so the
//! modules form no cycle.

use std::time::Duration;

use protocol::user::Event;
use protocol::{EventType, Origin, UserKey};
use ractor::{ActorId, ActorRef};

use crate::parked::ParkedState;
use crate::ports::Incoming;
use crate::sink::Sink;
use crate::sync::Known;

/// A validated message on its way to its user's actor.
#[derive(Debug)]
pub struct Routed {
    /// The sink whose consumer read it: the dedup namespace of its id.
    pub sink: Sink,
    pub event: Event,
    pub incoming: Incoming,
}

#[derive(Debug)]
pub enum DedupMsg {
    Check(Vec<Routed>),
}

#[derive(Debug)]
pub enum RouterMsg {
    Route(Routed),
    /// A user actor has had nothing to do for a while after `received` events; `parked` is its
    /// state, serialized, to keep for the user's next event. `actor` is the sender: an actor
    /// may report idle twice, and the second report must not stop (or park over) the actor
    /// that took over the key meanwhile.
    Idle {
        key: UserKey,
        actor: ActorId,
        received: u64,
        parked: Option<ParkedState>,
    },
    /// Time to drop the parked states older than `user_idle_timeout`.
    ExpireParked,
    /// Query: how many user actors are alive.
    GetActiveUsers(ractor::RpcReplyPort<usize>),
    /// Every live user actor saves what it has not (shutdown); answers how many saved.
    Flush(ractor::RpcReplyPort<usize>),
}

#[derive(Debug)]
pub enum UserMsg {
    Event(Routed),
    /// A delivery attempt finished.
    Delivered {
        side: Origin,
        token: u64,
        outcome: DeliveryOutcome,
    },
    /// A line's wait is over.
    RetryDue {
        side: Origin,
        token: u64,
    },
    /// Safety net: an attempt got no answer at all (its delivery actor died).
    AttemptLost {
        side: Origin,
        token: u64,
    },
    /// Time to look for attempts past their deadline (one timer per actor, not per attempt).
    Watchdog,
    /// The save of the state as of change `generation` finished.
    Saved {
        generation: u64,
        result: Result<(), crate::PortError>,
    },
    /// Keep held messages alive at the source.
    KeepAlive,
    /// Check whether the actor has been idle long enough to stop (see [`linger`]).
    IdleCheck,
    /// Save what only accepted deliveries changed, now (shutdown); answers whether it saved.
    Flush(ractor::RpcReplyPort<bool>),
    /// The store may be tried again (a load, a save or a dead letter failed).
    RetryStore,
}

#[derive(Debug)]
pub struct DeliveryRequest {
    pub key: UserKey,
    pub side: Origin,
    pub webhook_id: String,
    pub event_type: EventType,
    pub state: Known,
    pub timestamp_ms: i64,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Identifies this attempt to the line that sent it.
    pub token: u64,
    pub reply: ActorRef<UserMsg>,
}

#[derive(Debug)]
pub enum DeliveryMsg {
    Deliver(DeliveryRequest),
}

/// How one attempt ended (PROTOCOL.md §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// 2xx, at this engine time.
    Accepted { at_ms: i64 },
    /// 408, 425, 429, 5xx, no connection, timeout: try again later.
    Transient {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Any other 4xx, or a 3xx: dead-letter at once.
    Permanent { error: String },
    /// Not attempted: the target's circuit breaker is open. Ask again after `wait`; it
    /// costs no attempt.
    TargetOpen { wait: Duration },
}

/// How long shutdown waits for the users' last saves.
pub const FLUSH_TIMEOUT_MS: u64 = 10_000;
