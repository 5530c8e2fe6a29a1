//! Per-shard in-memory indexes rebuilt from the log at open: the last-location table
//! ([`last_location`]) and, inside it, each sequenced device's exactly-once state
//! ([`device_seq`]); and, on a cluster node, the shard's cluster-wide [`view`] of the devices
//! other nodes write. It owns no I/O and no durability (the log is the source of truth; the
//! streams are the view's).
//!
//! Invariant: every table here but the view can be rebuilt exactly by replaying the shard log
//! in order; the view is rebuilt by following the streams (it never enters the log).

pub mod device_seq;
pub mod last_location;
pub mod view;

pub use device_seq::{DeviceAudit, Verdict};
pub use last_location::{LastLocation, LastLocationTable, Observation, Slot, TableError};
