//! geobeat: durable location-heartbeat ingest for very large IoT fleets.
//!
//! # Layout
//! - [`limits`]: every hard bound, with compile-time relationships.
//! - [`record`]: the heartbeat record, its validation and rkyv encoding.
//! - [`route`]: device-to-shard hashing (stable, fingerprinted).
//! - [`datadir`]: the data directory (meta file, shard directories).
//! - [`log`]: the durable per-shard log (segments, commit, recovery, retention).
//! - [`table`]: the per-shard last-location table.
//! - [`store`]: one shard's log plus table behind a small facade.
//! - [`rt`]: the runtime seam (glommio behind a thin layer).
#![deny(missing_docs)]

pub mod datadir;
pub mod limits;
pub mod log;
pub mod record;
pub mod route;
pub mod rt;
pub mod store;
pub mod table;
