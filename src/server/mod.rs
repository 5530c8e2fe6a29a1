//! `geobeat serve`: the thread-per-core server. This module owns startup and shutdown: it opens the
//! data directory, starts one pinned executor per core (each accepting on the same port through
//! SO_REUSEPORT), wires the cross-executor channel meshes, and turns SIGTERM/SIGINT into an
//! orderly drain. The per-executor machinery is in [`exec`], the device WebSocket protocol in
//! [`ingest`], HTTP endpoints in [`http`], accepting/dispatching sockets in [`listen`], and
//! real-time subscriptions in [`subscribe`] (connections) and [`fanout`] (matching, delivery);
//! both WebSocket connections read through [`ws_read`] and write through [`ws_write`].
//!
//! Ownership: logical shard `k` (fixed for the data directory) lives on executor `k % executors`.
//! A data directory created with 4 shards opens fine on a 2-core machine (two shards per
//! executor) or a 16-core one (some executors own none and only accept and forward).

pub mod exec;
pub mod fanout;
pub mod http;
pub mod ingest;
pub mod listen;
pub mod live;
pub mod msg;
pub mod query;
pub mod subscribe;
pub mod ws_read;
pub mod ws_write;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::auth::Secret;
use crate::config::ServeConfig;
use crate::datadir::DataDir;
use crate::route::ShardId;
use crate::rt;

/// Everything executors share read-only (plus a few process-wide counters that change per
/// connection, never per heartbeat).
pub struct Shared {
    /// The resolved configuration.
    pub cfg: ServeConfig,
    /// The token secret.
    pub secret: Secret,
    /// Logical shard count of the data directory.
    pub shard_count: u32,
    /// Number of executors.
    pub executors: usize,
    /// Executors that finished recovery and accept connections.
    pub executors_ready: AtomicUsize,
    /// Open client connections across all executors (bounded by `connections_max`).
    pub connections_open: AtomicUsize,
    /// Open subscriber connections (bounded by `limits::SUBSCRIBERS_MAX`).
    pub subscribers_open: AtomicUsize,
    /// Device ids named by all `devices` subscriptions (bounded by
    /// `limits::SUB_DEVICES_TOTAL_MAX`; changes per subscribe, never per heartbeat).
    pub sub_devices_total: AtomicUsize,
    /// Set once SIGTERM/SIGINT arrived: stop accepting, drain, exit.
    pub stopping: AtomicBool,
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
}

impl Shared {
    /// The executor that owns logical shard `shard`, and the shard's index among that executor's.
    pub fn owner(&self, shard: ShardId) -> (usize, usize) {
        let k = shard.0 as usize;
        (k % self.executors, k / self.executors)
    }

    /// True once every executor has recovered its shards and is accepting.
    pub fn ready(&self) -> bool {
        self.executors_ready.load(Ordering::Acquire) == self.executors
            && !self.stopping.load(Ordering::Acquire)
    }
}

/// Why `serve` could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory could not be opened or created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        source: crate::datadir::DataDirError,
    },
    /// The token secret could not be loaded or created.
    #[error("secret: {0}")]
    Secret(String),
    /// The geofences file could not be read.
    #[error("geofences: {0}")]
    Fences(crate::fence::FenceError),
    /// The storage sinks could not be started.
    #[error("sinks: {0}")]
    Sinks(String),
    /// A listener could not be bound, an executor failed to start, or a shard failed to open.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the server until SIGTERM/SIGINT (or until `stop` is set) and returns after an orderly
/// drain: every heartbeat already received is made durable and acked before connections close.
pub fn run(cfg: ServeConfig, stop: Option<Arc<AtomicBool>>) -> Result<(), ServeError> {
    let datadir = DataDir::open_or_create(&cfg.data_dir, cfg.shards as u32).map_err(|source| {
        ServeError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        }
    })?;
    let fences =
        Arc::new(crate::fence::FenceRegistry::open(&cfg.data_dir).map_err(ServeError::Fences)?);
    let secret = cfg
        .load_secret()
        .map_err(|e| ServeError::Secret(e.to_string()))?;
    let executors = cfg.shards.max(1);
    let feeds: Vec<crate::flusher::ShardFeed> = (0..datadir.shard_count())
        .map(|k| {
            crate::flusher::ShardFeed::new(
                ShardId(k),
                datadir.shard_dir(ShardId(k)),
                crate::log::LogPos(0),
            )
        })
        .collect();
    let flusher_stop = Arc::new(AtomicBool::new(false));
    let flusher = if cfg.sinks.is_empty() {
        None
    } else {
        let handle = crate::flusher::start(cfg.sinks.clone(), feeds.clone(), flusher_stop.clone())
            .map_err(|e| ServeError::Sinks(e.to_string()))?;
        tracing::info!(sinks = cfg.sinks.len(), "storage flusher started");
        Some(handle)
    };
    let sinks = flusher.as_ref().map(|f| f.status_reader());
    let shared = Arc::new(Shared {
        feeds,
        fences,
        sinks,
        shard_count: datadir.shard_count(),
        executors,
        secret,
        executors_ready: AtomicUsize::new(0),
        connections_open: AtomicUsize::new(0),
        subscribers_open: AtomicUsize::new(0),
        sub_devices_total: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
        executors_drained: AtomicUsize::new(0),
        local_addr: std::sync::OnceLock::new(),
        storage_faults: (0..datadir.shard_count())
            .map(|_| std::sync::OnceLock::new())
            .collect(),
        started: std::time::Instant::now(),
        cfg,
    });
    tracing::info!(
        executors,
        shards = shared.shard_count,
        data_dir = %shared.cfg.data_dir.display(),
        durability = ?shared.cfg.durability,
        "starting geobeat"
    );

    // Bind once up front so a port of 0 resolves to one concrete port every executor shares,
    // and a bad address fails before any executor starts.
    let probe = std::net::TcpListener::bind(shared.cfg.listen)?;
    let addr = probe.local_addr()?;
    drop(probe);
    let _ = shared.local_addr.set(addr);

    let stop_flag = stop.unwrap_or_else(|| Arc::new(AtomicBool::new(false)));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop_flag.clone())?;
    }

    // glommio's MeshBuilder shares an `Rc` between threads (behind an `unsafe impl Send`), so
    // its clones must all be made here, before any executor runs: clones made on executor
    // threads (or here while executors already run) race on the non-atomic count, which freed
    // the builder under a peer and hung startup in mesh joins. Each executor takes its own.
    let meshes = exec::Meshes::new(executors, shared.cfg.mesh_capacity);
    let per_executor: Vec<Option<exec::Meshes>> =
        (0..executors).map(|_| Some(meshes.clone())).collect();
    drop(meshes);
    let per_executor = Arc::new(std::sync::Mutex::new(per_executor));
    let datadir = Arc::new(datadir);
    let results = rt::run_executors(executors, {
        let shared = shared.clone();
        let stop_flag = stop_flag.clone();
        move |index| {
            let meshes = per_executor.lock().unwrap_or_else(|p| p.into_inner())[index]
                .take()
                .expect("each executor starts once");
            exec::executor_main(
                index,
                shared.clone(),
                datadir.clone(),
                meshes,
                stop_flag.clone(),
            )
        }
    })?;
    // The flusher drains what became durable up to the end, then stops; its cursors make the
    // next start resume exactly there.
    flusher_stop.store(true, Ordering::Release);
    if let Some(f) = flusher {
        if let Err(e) = f.join() {
            tracing::error!(error = %e, "storage flusher stopped with an error");
        }
    }
    for r in results {
        r?;
    }
    tracing::info!("geobeat stopped cleanly");
    Ok(())
}
