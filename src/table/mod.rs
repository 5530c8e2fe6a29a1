//! Per-shard in-memory indexes rebuilt from the log at open. Today that is the last-location
//! table ([`last_location`]); it owns no I/O and no durability (the log is the source of truth).
//!
//! Invariant: every table here can be rebuilt exactly by replaying the shard log in order.

pub mod last_location;

pub use last_location::{LastLocation, LastLocationTable, Observation, Slot, TableError};
