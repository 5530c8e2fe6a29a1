//! geobeat: durable location-heartbeat ingest for very large IoT fleets.
//!
//! # Layout
//! The modules from the top floor down: each uses only modules listed after it (tests/layers.rs
//! keeps this true, and keeps the files of the server layers' directories free of circles).
//! - [`server`]: `geobeat serve`: startup, the executors' long-lived tasks and mesh receive
//!   loops, shutdown (the only place that spawns them).
//! - [`net`]: the network edge: accept and route requests, the connection kinds (ingest,
//!   subscribe), WebSocket halves, HTTP resources, the one auth guard.
//! - [`shard`]: one executor's shard core: stores, appends, group commit, retention, the ack
//!   ledger, the meshes. Knows nothing of sockets.
//! - [`subscribe`]: subscription interest, event fan-out and delivery queues, JSON rendering.
//! - [`query`]: history and area queries over one shard store.
//! - [`audit`]: `geobeat audit reconcile`: per device counts across the shard logs and the sinks.
//! - [`backup`]: `geobeat backup` / `geobeat restore`: a consistent copy of a live data directory.
//! - [`reshard`]: `geobeat reshard` / `geobeat migrate`: the offline rewrite into a new layout.
//! - [`demo`]: `geobeat demo`'s simulated fleet.
//! - [`cluster`]: `geobeat cluster status`: nodes, units and streams of a cluster from NATS, and
//!   HAProxy's unit map from the live placement.
//! - [`node`]: process-wide server state (configuration, secret, routing, counters, feeds).
//! - [`metrics`]: per-executor probes and the Prometheus exposition.
//! - [`replicate`]: `--durability replicated`: NATS JetStream streams, subjects, batches, the
//!   NATS clients (the shard's replication loop drives them).
//! - [`flusher`]: drains durable log entries to storage sinks (audit files, PostgreSQL).
//! - [`store`]: one shard's log plus table behind a small facade.
//! - [`checkpoint`]: the per-shard last-location checkpoint (last entries retention deleted).
//! - [`table`]: the per-shard last-location table.
//! - [`log`]: the durable per-shard log (segments, commit, recovery, retention).
//! - [`http`]: pure HTTP request-head parsing and WebSocket upgrade helpers.
//! - [`proto`]: the device ingest protocol (frame decoding, verdicts, acks, abuse guards).
//! - [`fence`]: geofences (polygons, circles), their spatial index and persistence.
//! - [`tokens`]: `geobeat token`: minting, revoking and listing revocations from the command
//!   line.
//! - [`revoke`]: the revocation list (per subject, a not-before time) in the data directory,
//!   and the copy a running server enforces.
//! - [`logging`]: log output on stderr (text without colours unless a terminal, or JSON lines).
//! - [`config`]: command line and configuration resolution.
//! - [`datadir`]: the data directory (meta file, lock, shard directories, layout swaps).
//! - [`auth`]: access tokens (HMAC-signed scopes) and the server secret.
//! - [`route`]: device routing: CRC32C → virtual shard → shard (a table in the data directory).
//! - [`record`]: the heartbeat record, its validation and rkyv encoding.
//! - [`preflight`]: start-up checks of the platform (io_uring allowed, locked-memory limit).
//! - [`rt`]: the runtime seam (glommio behind a thin layer), the wall clock, stop handles.
//! - [`spatial`]: bounding boxes, great-circle distance, the per-shard grid index.
//! - [`slab`]: the generational slab behind every connection table.
//! - [`client`]: `geobeat query`: a command-line client of a running server (HTTP API, events).
//! - [`ratelog`]: rate-limited log lines for events that repeat (refusals, accept failures).
//! - [`limits`]: every hard bound, with compile-time relationships.
#![deny(missing_docs)]

pub mod audit;
pub mod auth;
pub mod backup;
pub mod checkpoint;
pub mod client;
pub mod cluster;
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
pub mod replicate;
pub mod reshard;
pub mod revoke;
pub mod route;
pub mod rt;
pub mod server;
pub mod shard;
pub mod slab;
pub mod spatial;
pub mod store;
pub mod subscribe;
pub mod table;
pub mod tokens;
