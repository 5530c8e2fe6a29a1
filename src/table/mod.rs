//! Per-shard in-memory indexes rebuilt from the log at open: the last-location table
//! ([`last_location`]) and, inside it, each sequenced device's exactly-once state
//! ([`device_seq`]); it owns no I/O and no durability (the log is the source of truth).
//!
//! Invariant: every table here can be rebuilt exactly by replaying the shard log in order.

pub mod device_seq;
pub mod last_location;

pub use device_seq::{DeviceAudit, Verdict};
pub use last_location::{LastLocation, LastLocationTable, Observation, Slot, TableError};
