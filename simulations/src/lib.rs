//! The deterministic simulator of the sync engine (see ARCHITECTURE.md). It drives the same
//! actors as production through fake ports under a seeded, virtual-time world.
