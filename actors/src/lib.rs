//! The sync engine's actors and the pure state machines inside them.
//!
//! Architecture Invariant: actors do no I/O except through the port traits of [`ports`].
