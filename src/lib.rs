//! geobeat: durable location-heartbeat ingest for very large IoT fleets.
//!
//! # Layout
//! - [`limits`]: every hard bound, with compile-time relationships.
//! - [`record`]: the heartbeat record, its validation and rkyv encoding.
//! - [`route`]: device routing: CRC32C → virtual shard → shard (a table in the data directory).
//! - [`datadir`]: the data directory (meta file, lock, shard directories, layout swaps).
//! - [`reshard`]: `geobeat reshard` / `geobeat migrate`: the offline rewrite into a new layout.
//! - [`log`]: the durable per-shard log (segments, commit, recovery, retention).
//! - [`table`]: the per-shard last-location table.
//! - [`store`]: one shard's log plus table behind a small facade.
//! - [`checkpoint`]: the per-shard last-location checkpoint (last entries retention deleted).
//! - [`flusher`]: drains durable log entries to storage sinks (audit files, PostgreSQL).
//! - [`proto`]: the device ingest protocol (frame decoding, verdicts, acks, abuse guards).
//! - [`auth`]: access tokens (HMAC-signed scopes) and the server secret.
//! - [`config`]: command line and configuration resolution.
//! - [`http`]: pure HTTP request-head parsing and WebSocket upgrade helpers.
//! - [`metrics`]: per-executor probes and the Prometheus exposition.
//! - [`rt`]: the runtime seam (glommio behind a thin layer).
//! - [`server`]: `geobeat serve`: executors, ingest connections, HTTP endpoints.
//! - [`spatial`]: bounding boxes, great-circle distance, the per-shard grid index.
//! - [`fence`]: geofences (polygons, circles), their spatial index and persistence.
//! - [`demo`]: `geobeat demo`'s simulated fleet.
//! - [`logging`]: log output on stderr (text without colours unless a terminal, or JSON lines).
//! - [`preflight`]: start-up checks of the platform (io_uring allowed, locked-memory limit).
//! - [`ratelog`]: rate-limited log lines for events that repeat (refusals, accept failures).
#![deny(missing_docs)]

pub mod auth;
pub mod checkpoint;
pub mod config;
pub mod datadir;
pub mod demo;
pub mod fence;
pub mod flusher;
pub mod http;
pub mod limits;
pub mod log;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod node;
pub mod preflight;
pub mod proto;
pub mod query;
pub mod ratelog;
pub mod record;
pub mod reshard;
pub mod route;
pub mod rt;
pub mod server;
pub mod shard;
pub mod slab;
pub mod spatial;
pub mod store;
pub mod subscribe;
pub mod table;
