//! The sync engine's actors and the pure state machines inside them.
//!
//! Layout:
//! - [`ports`]: the traits through which actors reach the world (clock, entropy, event source,
//!   dedup store, state store, HTTP transport).
//! - [`sync`]: the per-user sync state machine, pure.
//! - [`book`]: the user actor's bookkeeping (lines, held messages, durability), pure.
//! - [`pipeline`]: the root supervisor and the handle to start and stop it.
//! - [`ingest`], [`dedup`], [`router`], [`user`], [`delivery`]: the actors, in the order an
//!   event passes them.
//! - [`mirror`]: the PostgreSQL users mirror, a sink with its own consumer; [`mirror_change`]:
//!   what each event asks of it.
//! - [`messages`]: what the actors send each other.
//! - [`parked`]: idle users' states, kept serialized by the router between their events.
//! - [`state_codec`]: the stored and parked form of a user's state.
//! - [`settings`], [`sink`], [`slot`], [`stats`], [`error`]: what they share.
//!
//! Architecture Invariant: actors do no I/O except through the port traits of [`ports`], and
//! read no wall clock or random source except through the `Clock` and `Entropy` ports.

pub mod book;
pub mod breaker;
pub mod dedup;
pub mod delivery;
pub mod error;
pub mod ingest;
pub mod messages;
pub mod mirror;
pub mod mirror_change;
pub mod parked;
pub mod pipeline;
pub mod ports;
pub mod router;
pub mod settings;
pub mod sink;
pub mod slot;
pub mod state_codec;
pub mod stats;
pub mod sync;
pub mod user;

pub use error::PortError;
pub use pipeline::{MirrorPorts, Pipeline, PipelineArgs};
pub use sink::Sink;
