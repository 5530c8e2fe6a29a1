//! Process-wide state of a running server ([`Shared`]): the resolved configuration, the secret,
//! the routing table, the counters every executor updates per connection (never per heartbeat),
//! the sinks' feeds and the geofences; and [`ExecutorId`], which names an executor. It owns who
//! owns a shard (`Shared::owner`) and readiness; it does not start anything (`server`) and holds
//! no executor-local state (`shard`, `net`).
//!
//! Invariant: built once before the executors start and shared read-only through an `Arc`; its
//! mutable parts are atomics or set-once cells.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::auth::Secret;
use crate::config::ServeConfig;
use crate::route::ShardId;

/// Names one executor (one core): its index among the server's executors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExecutorId(pub usize);

impl std::fmt::Display for ExecutorId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Everything executors share read-only (plus a few process-wide counters that change per
/// connection, never per heartbeat).
pub struct Shared {
    /// The resolved configuration.
    pub cfg: ServeConfig,
    /// The token secret.
    pub secret: Secret,
    /// The revocation list in force (reloaded from the data directory when it changes).
    pub revocations: crate::revoke::Registry,
    /// Logical shard count of the data directory.
    pub shard_count: u32,
    /// The data directory's routing table (device → virtual shard → shard).
    pub router: crate::route::Router,
    /// Number of executors.
    pub executors: usize,
    /// Executors that finished recovery and accept connections.
    pub executors_ready: AtomicUsize,
    /// Open client connections across all executors (bounded by `connections_max`).
    pub connections_open: AtomicUsize,
    /// Of those, the sockets that are not an authenticated WebSocket connection (yet): plain
    /// HTTP and heads still being read. Bounded by `connections_max` minus the reserved share
    /// (`limits::CONN_RESERVED_SHARE_DIVISOR`).
    pub connections_http: AtomicUsize,
    /// Open subscriber connections (bounded by `limits::SUBSCRIBERS_MAX`).
    pub subscribers_open: AtomicUsize,
    /// Device ids named by all `devices` subscriptions (bounded by
    /// `limits::SUB_DEVICES_TOTAL_MAX`; changes per subscribe, never per heartbeat).
    pub sub_devices_total: AtomicUsize,
    /// Set once SIGTERM/SIGINT arrived: stop accepting, drain, exit (each executor's
    /// [`crate::rt::Stop`] shares it).
    pub stopping: Arc<AtomicBool>,
    /// Executors whose connections have all closed during shutdown.
    pub executors_drained: AtomicUsize,
    /// When the server started.
    pub started: std::time::Instant,
    /// Per logical shard: the durable position executors publish and the position every sink
    /// has consumed, shared with the storage flusher.
    pub feeds: Vec<crate::flusher::ShardFeed>,
    /// The storage flusher's progress, when sinks are configured.
    pub sinks: Option<crate::flusher::StatusReader>,
    /// The geofences (persisted in the data directory), shared by every executor.
    pub fences: Arc<crate::fence::FenceRegistry>,
    /// The address actually bound (differs from the configured one when the port was 0).
    pub local_addr: std::sync::OnceLock<SocketAddr>,
    /// Per logical shard: why its log stopped accepting (a failed sync, its directory removed),
    /// set once by the owning executor; a poisoned log stays so until the process restarts.
    /// `/readyz` reports these.
    pub storage_faults: Vec<std::sync::OnceLock<String>>,
    /// `--durability replicated`: the streams' naming and each shard's replicated position.
    pub replication: Option<Arc<crate::replicate::Plan>>,
}

impl Shared {
    /// The executor that owns logical shard `shard`, and the shard's index among that executor's.
    pub fn owner(&self, shard: ShardId) -> (ExecutorId, usize) {
        let k = shard.0 as usize;
        (ExecutorId(k % self.executors), k / self.executors)
    }

    /// True once every executor has recovered its shards and is accepting.
    pub fn ready(&self) -> bool {
        self.executors_ready.load(Ordering::Acquire) == self.executors
            && !self.stopping.load(Ordering::Acquire)
    }
}
