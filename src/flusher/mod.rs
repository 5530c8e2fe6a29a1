//! The storage flusher: drains every shard's durable log entries to the configured sinks (audit
//! files, PostgreSQL), at least once, never losing data. Each sink runs on its own OS thread
//! (blocking I/O is fine there, and a slow or dead sink never slows another sink or ingest); it
//! learns each shard's durable position from an atomic the shard's executor publishes after every
//! commit, reads the log read-only ([`crate::log::tail::Tail`]), writes batches to its sink, and
//! only after the sink confirmed a batch persists its cursor
//! (`<data-dir>/shard-NNNN/cursors/<sink>.cursor`). Per shard it publishes `consumed`, the
//! smallest cursor over all sinks, which retention must respect (`Log::set_consumed`).
//!
//! It does not append, commit or delete log data, does not decide when to acknowledge (the server
//! uses [`ShardFeed::backlog_bytes`] against its budgets), and does not serve HTTP (the server
//! renders [`FlusherHandle::status`]).
//!
//! Invariants: a cursor never passes data its sink has not made durable (at least once); a
//! replay after any crash rewrites exactly the same rows (idempotent writes: `ON CONFLICT` in
//! PostgreSQL, truncation to the cursor's byte count in audit files), so each heartbeat ends up in
//! each sink exactly once; nothing at or past a shard's durable position is ever read, so a sink
//! never holds a heartbeat that a power loss could take out of the log.

pub mod audit;
pub mod cursor;
mod driver;
pub mod encode;
pub mod postgres;
pub mod report;
pub mod rowdigest;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;

use crate::config::{SinkConfig, SinkKind};
use crate::log::tail::TailError;
use crate::log::LogPos;
use crate::route::ShardId;

/// Name under which the flusher registers as a log consumer (`Log::register_consumer`).
pub const CONSUMER_NAME: &str = "flusher";

/// One shard as the flusher sees it: where its log lives and two positions shared with the
/// executor that owns it. Cheap to clone (the positions are shared).
#[derive(Debug, Clone)]
pub struct ShardFeed {
    /// The shard.
    pub shard: ShardId,
    /// The shard directory (`DataDir::shard_dir`).
    pub dir: PathBuf,
    /// The shard's durable position, published by its executor after every commit (Release).
    pub durable: Arc<AtomicU64>,
    /// The smallest cursor over all sinks, published by the flusher (only moves forward):
    /// retention may delete a segment only if this is past its last entry. `u64::MAX` when no
    /// sink is configured.
    pub consumed: Arc<AtomicU64>,
}

impl ShardFeed {
    /// A feed for `shard` whose log is durable up to `durable` (after `ShardStore::open`,
    /// `store.durable()`; `LogPos(0)` means "not known yet": sinks wait for the first
    /// `publish_durable`).
    pub fn new(shard: ShardId, dir: impl Into<PathBuf>, durable: LogPos) -> ShardFeed {
        ShardFeed {
            shard,
            dir: dir.into(),
            durable: Arc::new(AtomicU64::new(durable.0)),
            consumed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Publishes the shard's durable position (call after each commit). Never moves it back.
    pub fn publish_durable(&self, pos: LogPos) {
        self.durable.fetch_max(pos.0, Ordering::Release);
    }

    /// The durable position last published.
    pub fn durable(&self) -> LogPos {
        LogPos(self.durable.load(Ordering::Acquire))
    }

    /// The position every sink has consumed up to.
    pub fn consumed(&self) -> LogPos {
        LogPos(self.consumed.load(Ordering::Acquire))
    }

    /// Durable log bytes not yet consumed by every sink (0 without sinks).
    pub fn backlog_bytes(&self) -> u64 {
        self.durable().0.saturating_sub(self.consumed().0)
    }
}

/// Errors of the flusher and its sinks.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// A file-system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// File or directory concerned.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A cursor file is unreadable.
    #[error("cursor {}: {reason}", path.display())]
    Cursor {
        /// The cursor file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An audit directory does not agree with its cursor.
    #[error("audit {}: {reason}", path.display())]
    Audit {
        /// The file or directory concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// PostgreSQL refused or the connection failed (shown with the server's own message).
    #[error("postgres sink {sink}: {op}: {}", pg_error_text(source))]
    Postgres {
        /// The sink.
        sink: String,
        /// What was being done.
        op: &'static str,
        /// The client's error.
        source: ::postgres::Error,
    },
    /// Reading a shard log failed.
    #[error(transparent)]
    Tail(#[from] TailError),
    /// The flusher cannot start as configured.
    #[error("flusher: {0}")]
    Config(String),
    /// A sink thread panicked.
    #[error("flusher: sink {0} thread panicked")]
    Panicked(String),
}

impl FlushError {
    /// A [`FlushError::Io`]: `op` on `path` failed with `source`.
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> FlushError {
        FlushError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A PostgreSQL client error as an operator needs it: for an error the server sent, its severity,
/// SQLSTATE code, message, detail and hint (`FATAL 3D000: database "x" does not exist`); for
/// anything else the client's words followed by each cause (`error connecting to server:
/// Connection refused (os error 111)`). The client's own `Display` of a server error is only
/// "db error".
pub fn pg_error_text(e: &::postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" (detail: {detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" (hint: {hint})"));
        }
        return text;
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// A sink whose last attempt to reach it failed (for `/readyz`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailingSink {
    /// Sink name.
    pub sink: String,
    /// Sink kind.
    pub kind: &'static str,
    /// Shards whose last attempt failed.
    pub shards: Vec<u32>,
    /// Most consecutive failures over those shards.
    pub failures: u32,
}

/// One sink's progress on one shard (for `/v1/sinks` and metrics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SinkStatus {
    /// Sink name.
    pub name: String,
    /// Sink kind (`audit`, `postgres`).
    pub kind: &'static str,
    /// Shard.
    pub shard: u32,
    /// Durable cursor: everything before it is in the sink.
    pub cursor: u64,
    /// The shard's durable position when last looked at.
    pub durable: u64,
    /// `durable - cursor`: log bytes the sink still has to take.
    pub lag_bytes: u64,
    /// Heartbeats confirmed by the sink since the flusher started.
    pub rows_total: u64,
    /// Log bytes skipped because retention deleted them before this sink read them.
    pub skipped_bytes: u64,
    /// Consecutive failed attempts (0 when the last one worked).
    pub failures: u32,
    /// Failed attempts since the flusher started (a counter, for metrics).
    pub errors_total: u64,
    /// The last error, if the last attempt failed (or a gap was skipped).
    pub last_error: Option<String>,
    /// When the last error happened, ms since the Unix epoch.
    pub last_error_ms: Option<i64>,
    /// When the sink last confirmed a batch (or found nothing to do), ms since the Unix epoch.
    pub last_ok_ms: Option<i64>,
}

/// What the flusher threads share with the handle: status rows and per-sink cursors.
#[derive(Debug)]
pub(crate) struct Board {
    /// One row per (sink, shard): index `sink * shards + lane`.
    pub status: Mutex<Vec<SinkStatus>>,
    /// Durable cursor per (sink, shard), same indexing.
    pub cursors: Vec<AtomicU64>,
    /// Number of sinks.
    pub sinks: usize,
    /// Number of shards (lanes per sink).
    pub shards: usize,
}

impl Board {
    /// Publishes sink `sink`'s new cursor for lane `lane` and raises the lane's `consumed` to
    /// the smallest cursor over all sinks. Each value read is at most the true cursor (cursors
    /// only grow), so the published minimum never exceeds the true one.
    pub fn advance(&self, sink: usize, lane: usize, cursor: u64, feed: &ShardFeed) {
        self.cursors[sink * self.shards + lane].fetch_max(cursor, Ordering::AcqRel);
        let min = (0..self.sinks)
            .map(|s| self.cursors[s * self.shards + lane].load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX);
        feed.consumed.fetch_max(min, Ordering::AcqRel);
    }

    /// Runs `f` on the status row of (sink, lane).
    pub fn with_status(&self, sink: usize, lane: usize, f: impl FnOnce(&mut SinkStatus)) {
        let mut rows = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut rows[sink * self.shards + lane]);
    }
}

/// The running flusher.
pub struct FlusherHandle {
    threads: Vec<(String, JoinHandle<()>)>,
    status: StatusReader,
}

/// A cheap, cloneable, thread-safe view of the flusher's status (for HTTP handlers and metrics
/// on any thread), valid after the flusher stopped too.
#[derive(Debug, Clone)]
pub struct StatusReader {
    board: Arc<Board>,
    feeds: Vec<ShardFeed>,
}

impl StatusReader {
    /// Every sink's progress on every shard, sink by sink in configuration order, shards in feed
    /// order. `durable` and `lag_bytes` use the shard's latest durable position, so a stalled
    /// sink's lag keeps growing here.
    pub fn status(&self) -> Vec<SinkStatus> {
        let mut rows = self
            .board
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for row in rows.iter_mut() {
            if let Some(feed) = self.feeds.iter().find(|f| f.shard.0 == row.shard) {
                row.durable = row.durable.max(feed.durable().0);
                row.lag_bytes = row.durable.saturating_sub(row.cursor);
            }
        }
        rows
    }

    /// The feeds (to read `backlog_bytes` per shard).
    pub fn feeds(&self) -> &[ShardFeed] {
        &self.feeds
    }

    /// Sinks whose last attempt failed on some shard (the start-up check, which fails every
    /// shard, or a batch), in configuration order; empty when all are well.
    pub fn failing(&self) -> Vec<FailingSink> {
        let rows = self.board.status.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<FailingSink> = Vec::new();
        for r in rows.iter().filter(|r| r.failures > 0) {
            match out.iter_mut().find(|f| f.sink == r.name) {
                Some(f) => {
                    f.shards.push(r.shard);
                    f.failures = f.failures.max(r.failures);
                }
                None => out.push(FailingSink {
                    sink: r.name.clone(),
                    kind: r.kind,
                    shards: vec![r.shard],
                    failures: r.failures,
                }),
            }
        }
        out
    }
}

impl std::fmt::Debug for FlusherHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlusherHandle")
            .field(
                "sinks",
                &self.threads.iter().map(|t| &t.0).collect::<Vec<_>>(),
            )
            .field("shards", &self.status.feeds.len())
            .finish()
    }
}

impl FlusherHandle {
    /// See [`StatusReader::status`].
    pub fn status(&self) -> Vec<SinkStatus> {
        self.status.status()
    }

    /// A cloneable view of the status for other threads.
    pub fn status_reader(&self) -> StatusReader {
        self.status.clone()
    }

    /// The feeds (to read `backlog_bytes` per shard).
    pub fn feeds(&self) -> &[ShardFeed] {
        &self.status.feeds
    }

    /// Waits for every sink thread to finish (they stop once the stop flag is set, after
    /// completing the batch in hand).
    pub fn join(self) -> Result<(), FlushError> {
        let mut result = Ok(());
        for (name, t) in self.threads {
            if t.join().is_err() && result.is_ok() {
                result = Err(FlushError::Panicked(name));
            }
        }
        result
    }
}

/// Starts the flusher: loads every sink's cursors (publishing each feed's `consumed` before
/// returning, so retention is safe at once), then spawns one thread per sink. With no sinks no
/// thread is started and every feed's `consumed` is `u64::MAX`. Fails on an unreadable cursor
/// file or a duplicate sink name or shard; sink connection problems are not errors here: each
/// sink thread first connects and validates its sink (`Sink::check`, bounded by the connect
/// timeout), logging the server's message and marking every status row of the sink as failing
/// until it succeeds (see [`StatusReader::failing`]); ingest never waits for it.
pub fn start(
    sinks: Vec<SinkConfig>,
    feeds: Vec<ShardFeed>,
    stop: Arc<AtomicBool>,
) -> Result<FlusherHandle, FlushError> {
    for (i, s) in sinks.iter().enumerate() {
        if sinks[..i].iter().any(|o| o.name == s.name) {
            return Err(FlushError::Config(format!("two sinks named {:?}", s.name)));
        }
        if !crate::config::valid_sink_name(&s.name) {
            return Err(FlushError::Config(format!("bad sink name {:?}", s.name)));
        }
    }
    for (i, f) in feeds.iter().enumerate() {
        if feeds[..i].iter().any(|o| o.shard == f.shard) {
            return Err(FlushError::Config(format!("shard {} fed twice", f.shard)));
        }
    }
    let shards = feeds.len();
    if sinks.is_empty() {
        for f in &feeds {
            f.consumed.store(u64::MAX, Ordering::Release);
        }
    }
    let mut status = Vec::with_capacity(sinks.len() * shards);
    let mut lanes_per_sink = Vec::with_capacity(sinks.len());
    for s in &sinks {
        let mut lanes = Vec::with_capacity(shards);
        for f in &feeds {
            let lane = driver::Lane::load(f.clone(), &s.name)?;
            status.push(SinkStatus {
                name: s.name.clone(),
                kind: s.kind.name(),
                shard: f.shard.0,
                cursor: lane.cursor.pos,
                durable: f.durable().0,
                lag_bytes: f.durable().0.saturating_sub(lane.cursor.pos),
                rows_total: 0,
                skipped_bytes: 0,
                failures: 0,
                errors_total: 0,
                last_error: None,
                last_error_ms: None,
                last_ok_ms: None,
            });
            lanes.push(lane);
        }
        lanes_per_sink.push(lanes);
    }
    let board = Arc::new(Board {
        status: Mutex::new(status),
        cursors: lanes_per_sink
            .iter()
            .flat_map(|lanes| lanes.iter().map(|l| AtomicU64::new(l.cursor.pos)))
            .collect(),
        sinks: sinks.len(),
        shards,
    });
    // Publish the persisted minimum before any thread runs.
    for (lane, f) in feeds.iter().enumerate() {
        if !sinks.is_empty() {
            board.advance(0, lane, 0, f);
        }
    }
    let mut threads = Vec::with_capacity(sinks.len());
    for (index, (cfg, lanes)) in sinks.into_iter().zip(lanes_per_sink).enumerate() {
        let sink: Box<dyn driver::Sink> = match &cfg.kind {
            SinkKind::Audit {
                dir,
                compress,
                rotate,
            } => Box::new(audit::AuditSink::new(
                &cfg.name,
                dir.clone(),
                *compress,
                *rotate,
            )),
            SinkKind::Postgres { url, schema } => {
                Box::new(postgres::PgSink::new(&cfg.name, url, schema)?)
            }
        };
        let name = cfg.name.clone();
        let board = board.clone();
        let stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("sink-{name}"))
            .spawn(move || driver::run(index, cfg, sink, lanes, board, stop))
            .map_err(|e| FlushError::Io {
                op: "spawn sink thread",
                path: PathBuf::new(),
                source: e,
            })?;
        threads.push((name, thread));
    }
    Ok(FlusherHandle {
        threads,
        status: StatusReader { board, feeds },
    })
}

/// Milliseconds since the Unix epoch (the one wall clock, `rt`'s).
pub(crate) use crate::rt::now_ms;
