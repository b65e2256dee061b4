//! The wire contract of the sync engine (`PROTOCOL.md`), as pure code.
//!
//! Layout:
//! - [`envelope`]: the event envelope of §1 and its parsing into a typed event or a §4 reason.
//! - [`user`]: the user key, the canonical user and the per-side field mapping.
//! - [`merge`]: the field-level last-writer-wins merge of §5.4, with final deletion.
//! - [`partition`]: the subject token of a user and the partition NATS maps it to.
//! - [`signing`]: Standard Webhooks and `hmac-sha256-hex` signing and verification.
//! - [`delivery`]: the full header set and body of one webhook delivery (§3).
//! - [`secret`]: a string that never prints itself.
//!
//! Architecture Invariant: this crate does no I/O and knows no runtime; everything here is a
//! function of its inputs, so the engine and the simulator share it unchanged.

pub mod delivery;
pub mod envelope;
pub mod merge;
pub mod partition;
pub mod secret;
pub mod signing;
pub mod user;

pub use envelope::{BadEvent, Envelope, EventType, Origin};
pub use merge::{FieldStamp, MergeOutcome, UserRecord};
pub use secret::Secret;
pub use user::{CanonicalUser, FieldMapping, UserKey};
