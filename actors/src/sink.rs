//! The sinks: where events go, each with its own consumer, order and dedup memory.

use std::fmt;

use protocol::Origin;
use serde::{Deserialize, Serialize};

/// A destination of events. Each sink reads its own durable consumer, so one sink's outage
/// never blocks another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sink {
    /// Payload's webhook receiver; fed by Better Auth's events.
    Payload,
    /// Better Auth's webhook receiver; fed by Payload's events.
    BetterAuth,
}

impl Sink {
    pub const ALL: [Sink; 2] = [Sink::Payload, Sink::BetterAuth];

    pub fn as_str(self) -> &'static str {
        match self {
            Sink::Payload => "payload",
            Sink::BetterAuth => "better-auth",
        }
    }

    /// The application this sink delivers to.
    pub fn side(self) -> Origin {
        match self {
            Sink::Payload => Origin::Payload,
            Sink::BetterAuth => Origin::BetterAuth,
        }
    }

    /// The sink whose consumer reads events of `origin`.
    pub fn fed_by(origin: Origin) -> Sink {
        match origin {
            Origin::BetterAuth => Sink::Payload,
            Origin::Payload => Sink::BetterAuth,
        }
    }

    /// The origin whose events this sink's consumer reads.
    pub fn source(self) -> Origin {
        self.side().other()
    }

    pub fn for_side(side: Origin) -> Sink {
        match side {
            Origin::Payload => Sink::Payload,
            Origin::BetterAuth => Sink::BetterAuth,
        }
    }
}

impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
