//! geobeat: durable location-heartbeat ingest for very large IoT fleets.
//!
//! # Layout
//! - [`limits`]: every hard bound, with compile-time relationships.
//! - [`record`]: the heartbeat record, its validation and rkyv encoding.
//! - [`route`]: device-to-shard hashing (stable, fingerprinted).
//! - [`rt`]: the runtime seam (glommio behind a thin layer).
#![deny(missing_docs)]

pub mod limits;
pub mod record;
pub mod route;
pub mod rt;
