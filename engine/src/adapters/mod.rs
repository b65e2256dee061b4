//! The real implementations of the actors' ports: async-nats, redis, sqlx, reqwest, and the
//! system clock.

pub mod clock;
pub mod dedup_memory;
pub mod dedup_redis;
pub mod errors;
pub mod http;
pub mod lease_pg;
pub mod mirror_pg;
pub mod nats;
pub mod state_writer;
pub mod store;
pub mod user_tables;
