//! The deterministic simulator of the sync engine.
//!
//! It runs the *same* actors as production (`actors::Pipeline`) on a `current_thread` tokio
//! runtime with paused time, behind fake ports: a fake JetStream ([`nats`]), two stateful
//! applications with faulty receivers and echoing hooks ([`apps`]), in-memory stores with
//! injected errors ([`stores`]), and a virtual clock ([`clock`]). One root seed is split into an
//! independent stream per component ([`rng`]); fault rates are drawn from it too (swarm
//! testing). A run has two phases — chaos, then heal and quiesce — and is checked against an
//! independent oracle ([`oracle`]). Its canonical trace ([`trace`]) hashes to 64 bits: the same
//! seed always gives the same hash.
//!
//! Replay a seed: `sync-engine simulate --seed N`, or `SIM_SEED=N cargo test -p simulations`.

pub mod apps;
pub mod clock;
pub mod nats;
pub mod oracle;
pub mod rng;
pub mod stores;
pub mod trace;
pub mod world;

pub use world::{run, Profile, SimOptions, SimReport, Variant};

/// Epoch milliseconds on the simulated clock.
pub fn clock_now(clock: &clock::SimClock) -> i64 {
    use actors::ports::Clock;
    clock.now_ms()
}
