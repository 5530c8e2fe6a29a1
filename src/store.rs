//! One shard's storage facade: its log plus its last-location table, kept consistent. Opening
//! replays the log into the table (last locations and chain heads); appending links the new entry
//! to the device's previous one and updates the table. It holds no globals or thread-locals, so a
//! thread may own several stores. It does not decide when to commit or acknowledge (the server's
//! commit loop drives `commit_begin`/`commit_end` with a `GroupPolicy` and a `Durability`).
//!
//! Retention never loses a last location: before segments below a position B are deleted, the
//! last entry of every device that lies below B is written to the shard's last-location
//! checkpoint (`checkpoint`), and reads of a last record fall back to it. Opening loads the
//! checkpoint into the table, then replays only the log at and after B.
//!
//! Invariant: the table always equals the checkpoint's records followed by a replay of the log
//! from the checkpoint's covered position B (every appended entry is in the table, nothing else
//! is): a heartbeat the table could not take is refused before the log is written. No segment
//! below a durable checkpoint's B is ever needed, and none at or above it is ever deleted.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::checkpoint::{self, Builder, Checkpoint, Record};

use crate::limits::DEDUPE_DEVICE_TIME_ENTRIES_MAX;
use crate::limits::{SEGMENT_BYTES_DEFAULT, SEGMENT_HEADER_BYTES, TABLE_POS_MAX};
use crate::log::chain::{sidecar_path, ChainThread};
use crate::log::{
    self, Chain, Commit, Entry, Log, LogConfig, LogPos, LogStats, RecoveryReport, SyncJob,
    WriteMode,
};
use crate::record::{DeviceSeq, Heartbeat};
use crate::route::ShardId;
use crate::spatial::Grid;
use crate::table::{
    DeviceAudit, LastLocation, LastLocationTable, Observation, TableError, Verdict,
};

/// Where and how to open one shard's store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The shard directory (e.g. `DataDir::shard_dir`).
    pub dir: PathBuf,
    /// The shard.
    pub shard: ShardId,
    /// Size of new segment files (see `LogConfig::segment_bytes`).
    pub segment_bytes: u64,
    /// Devices to reserve table room for up front (0 to grow on demand).
    pub expected_devices: usize,
    /// How entries are written to segment files (see `LogConfig::write_mode`).
    pub write_mode: WriteMode,
}

impl StoreConfig {
    /// Defaults for everything but the directory and shard.
    pub fn new(dir: impl Into<PathBuf>, shard: ShardId) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            shard,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            expected_devices: 0,
            write_mode: WriteMode::default(),
        }
    }
}

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log failed or refused.
    #[error(transparent)]
    Log(#[from] log::Error),
    /// The last-location checkpoint could not be written, or was refused at open.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// The checkpoint covers log positions the shard's segments do not reach: segment files
    /// were removed by something else than retention.
    #[error("shard {shard}: last-location checkpoint {} covers the log up to {covered}, but the log's segments {what}; segment files were removed outside retention: restore them", path.display())]
    CheckpointGap {
        /// Shard concerned.
        shard: ShardId,
        /// The checkpoint file.
        path: PathBuf,
        /// Its covered position.
        covered: LogPos,
        /// What is wrong with the segments.
        what: String,
    },
    /// The table refused a new device (nothing was written).
    #[error("shard {shard}: {source}")]
    Table {
        /// Shard concerned.
        shard: ShardId,
        /// Why.
        source: TableError,
    },
}

/// How an append is deduplicated (issue 18). Decided per connection by the protocol layer; the
/// decision itself is made by the store of the shard that owns the device, so two connections
/// of one device cannot both store the same heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dedupe {
    /// Stored as sent (at least once: the pre-issue-18 behaviour).
    #[default]
    Off,
    /// The item's `seq` is a device-scoped sequence number in this epoch: stored at most once.
    Seq(u32),
    /// Like `Seq`, but the group's items (one device's, in order) carry the device-scoped
    /// sequence numbers `first`, `first + 1`, ... (an MQTT PUBLISH with a `seq` User Property,
    /// whose item seqs are the connection's own).
    SeqFrom {
        /// The epoch.
        epoch: u32,
        /// The sequence number of the group's first item.
        first: u64,
    },
    /// No sequence numbers: a heartbeat with the same device timestamp as one of the device's
    /// last `limits::DEDUPE_DEVICE_TIME_ENTRIES_MAX` stored entries is a duplicate.
    DeviceTime,
}

/// What [`ShardStore::append_dedupe`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Stored.
    Stored(Appended),
    /// Not stored again: a duplicate of what is (or will be, once this position is durable)
    /// in the log. Acknowledge it once `durable() > pos`.
    Duplicate(LogPos),
}

/// What one append did, beyond its position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Appended {
    /// The entry's position.
    pub pos: LogPos,
    /// The device's last location `(lat, lon)` before this append (`None`: never seen).
    pub prev_last: Option<(f64, f64)>,
    /// Whether this heartbeat became the device's last location (false for a late one).
    pub became_last: bool,
}

impl Appended {
    /// This append's outcome as subscriptions see it when the device's last location was the
    /// cluster view's `view_prev` (see [`ShardStore::view_before`]): transitions start there,
    /// and the heartbeat is the device's last only if it is not older than that.
    pub fn with_view(mut self, view_prev: Option<(f64, f64, i64, i64)>, hb: &Heartbeat) -> Self {
        if let Some((lat, lon, ts, rcv)) = view_prev {
            self.prev_last = Some((lat, lon));
            self.became_last = self.became_last && (hb.ts_ms, hb.received_ms) >= (ts, rcv);
        }
        self
    }
}

/// One shard's log and last-location table.
#[derive(Debug)]
pub struct ShardStore {
    /// The log's hash chain, extended on its own thread from the durable entries (first, so it
    /// stops before the log releases the shard directory's lock).
    chain: Option<ChainThread>,
    log: Log,
    table: LastLocationTable,
    /// Spatial index over the table's last locations (keys are table slots).
    grid: Grid,
    /// The last-location checkpoint: last entries of devices below its covered position, which
    /// retention may have deleted from the log (`None`: retention never deleted anything).
    ckpt: Option<Arc<Checkpoint>>,
}

/// A last-location checkpoint in the making (see [`ShardStore::retention_begin`]): the positions
/// of the last entries below its covered position are collected from the table on the store's
/// thread in slices ([`CheckpointJob::collect_slice`]); the file is then built from the sealed
/// segments and the previous checkpoint, written and reopened on any thread
/// ([`CheckpointJob::write`]), and handed back to [`ShardStore::retention_end`].
#[derive(Debug)]
pub struct CheckpointJob {
    /// The store's shard.
    shard: ShardId,
    /// The shard directory (where the file goes).
    dir: PathBuf,
    /// The position B the checkpoint covers: the log's start once retention is done.
    covered: LogPos,
    /// The checkpoint this one replaces (records below its covered position come from it).
    old: Option<Arc<Checkpoint>>,
    /// Sealed segments holding positions from the old covered position up to `covered`.
    segments: Vec<(LogPos, PathBuf)>,
    /// Sealed segment files wholly below `covered`: deleted by `write` once the checkpoint is
    /// durable (the store unmaps them in `retention_end`).
    delete: Vec<PathBuf>,
    /// `(last position, chain head)` of every device whose last entry lies below `covered`.
    below: Vec<(u64, u64)>,
    /// Next table chunk to collect.
    next_chunk: usize,
    /// The exactly-once snapshot (issue 18), taken with the first slice: written before the
    /// checkpoint, so the states of devices whose sequenced entries retention deletes survive.
    audits: Vec<u8>,
    /// The written file, reopened (set by `write`).
    written: Option<Checkpoint>,
    /// Records in the file (set by `write`).
    records: usize,
    /// Bytes of the file (set by `write`).
    file_bytes: usize,
    /// Time spent collecting on the store's thread, over all slices.
    pub collect_time: Duration,
    /// Longest single collection slice (what the store's thread is held for at most).
    pub collect_slice_max: Duration,
    /// Time spent building the file's bytes (on the writing thread).
    pub build_time: Duration,
    /// Time spent writing, syncing and reopening the file (on the writing thread).
    pub write_time: Duration,
    /// Time spent deleting the covered segment files (on the writing thread).
    pub delete_time: Duration,
}

impl CheckpointJob {
    /// Collects the next slice of the table (one arena chunk, about 1 MiB of records); returns
    /// true once the whole table was seen. Between slices the store may take appends: they only
    /// add entries above `covered`, so a device collected before moving on is merely a stale
    /// record (the log replay after the checkpoint supersedes it at open, and the next
    /// checkpoint drops it), and a device not yet collected is collected as it is then.
    pub fn collect_slice(&mut self, store: &ShardStore) -> bool {
        let started = Instant::now();
        let table = &store.table;
        if self.next_chunk == 0 {
            // At most one record per device: no reallocation (and copy) in a later slice.
            self.below.reserve(table.len());
            // A snapshot taken now is at least as new as the covered position: replaying the
            // log over it at open changes nothing it holds (`DeviceAudit::apply`).
            self.audits = checkpoint::encode_audits(table.audits());
        }
        if self.next_chunk < table.chunk_count() {
            let covered = self.covered;
            self.below.extend(
                table
                    .iter_chunk(self.next_chunk)
                    .filter(|(_, l)| l.pos < covered)
                    .map(|(_, l)| (l.pos.0, l.head.0)),
            );
            self.next_chunk += 1;
        }
        let took = started.elapsed();
        self.collect_time += took;
        self.collect_slice_max = self.collect_slice_max.max(took);
        self.next_chunk >= table.chunk_count()
    }

    /// Builds the file (records sorted by position, entry bytes copied from the previous
    /// checkpoint or the sealed segments), writes it atomically and durably (tmp, fsync, rename,
    /// directory fsync) and reopens it. Blocking; meant for a helper thread.
    pub fn write(&mut self) -> Result<(), checkpoint::Error> {
        let started = Instant::now();
        let bytes = self.build()?;
        self.build_time = started.elapsed();
        let started = Instant::now();
        checkpoint::write_audits_durable(self.shard, &self.dir, &self.audits)?;
        checkpoint::write_durable(self.shard, &self.dir, &bytes)?;
        self.file_bytes = bytes.len();
        drop(bytes);
        let ckpt =
            Checkpoint::open(self.shard, &self.dir)?.ok_or_else(|| checkpoint::Error::Io {
                shard: self.shard,
                op: "reopen",
                path: self.dir.join(checkpoint::CHECKPOINT_FILE),
                source: std::io::ErrorKind::NotFound.into(),
            })?;
        self.written = Some(ckpt);
        self.write_time = started.elapsed();
        // The checkpoint is durable: the segments it covers may go. Oldest first, the directory
        // synced after each (a gap at recovery would be damage).
        let started = Instant::now();
        for path in &self.delete {
            let io = |op| checkpoint::Error::io(self.shard, op, path);
            std::fs::remove_file(path).map_err(io("delete segment"))?;
            // Its hash-chain sidecar (absent for a log the chain never reached).
            match std::fs::remove_file(sidecar_path(path)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io("delete chain sidecar")(e))
                }
                _ => {}
            }
            std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io("fsync directory after deleting"))?;
        }
        self.delete_time = started.elapsed();
        Ok(())
    }

    fn build(&mut self) -> Result<Vec<u8>, checkpoint::Error> {
        self.below.sort_unstable();
        let mut b = Builder::new(self.shard, self.covered, self.below.len(), 128);
        let old_covered = self.old.as_ref().map_or(LogPos(0), |c| c.covered());
        let mut cursor = 0;
        let mut seg_index = 0;
        let mut map: Option<memmap2::Mmap> = None;
        let mut missing = 0usize;
        for &(pos, head) in &self.below {
            if let Some(old) = self.old.as_ref().filter(|_| pos < old_covered.0) {
                if let Some(bytes) = old.next_at(&mut cursor, LogPos(pos)) {
                    b.push(LogPos(pos), LogPos(head), bytes);
                    continue;
                }
            }
            while seg_index + 1 < self.segments.len() && self.segments[seg_index + 1].0 .0 <= pos {
                seg_index += 1;
                map = None;
            }
            let Some((base, path)) = self.segments.get(seg_index).filter(|(b, _)| b.0 <= pos)
            else {
                missing += 1;
                continue;
            };
            if map.is_none() {
                let io = |op| checkpoint::Error::io(self.shard, op, path);
                let file = std::fs::File::open(path).map_err(io("open sealed segment"))?;
                // SAFETY: a sealed segment is never written again, and retention deletes it only
                // after this job is done.
                map = Some(unsafe { memmap2::Mmap::map(&file) }.map_err(io("mmap"))?);
            }
            let data: &[u8] = map.as_ref().expect("mapped above");
            let off = (pos - base.0) as usize;
            let entry = (off < data.len() && off % crate::limits::ENTRY_ALIGN_BYTES == 0)
                .then(|| log::format::parse_entry(data, off).ok())
                .flatten();
            match entry {
                Some(e) => b.push(LogPos(pos), LogPos(head), &data[off..off + e.total_bytes]),
                None => missing += 1,
            }
        }
        if missing > 0 {
            // Only possible for devices whose entry was lost before this store opened (it never
            // keeps a device it cannot read): they cannot be saved, say so.
            tracing::warn!(
                shard = self.shard.0,
                devices = missing,
                "last entries neither in the log nor in the checkpoint; not checkpointed"
            );
        }
        self.records = b.len();
        Ok(b.finish())
    }

    /// The log position the checkpoint covers (segments wholly below it may go once written).
    pub fn covered(&self) -> LogPos {
        self.covered
    }

    /// Records in the checkpoint (once built).
    pub fn records(&self) -> usize {
        self.records
    }

    /// Bytes of the file (once written).
    pub fn file_bytes(&self) -> usize {
        self.file_bytes
    }
}

/// What one retention run replaced: the deleted segments and the previous checkpoint, still
/// mapped. Dropping it unmaps them (tens of milliseconds for big resident files: the server drops
/// it on a helper thread).
#[derive(Debug)]
pub struct Retired {
    segments: log::Retired,
    checkpoint: Option<Arc<Checkpoint>>,
}

impl Retired {
    /// Number of segments deleted.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Whether a previous checkpoint was replaced.
    pub fn replaced_checkpoint(&self) -> bool {
        self.checkpoint.is_some()
    }
}

/// What retention has to do next for one store (see [`ShardStore::retention_begin`]).
#[derive(Debug)]
pub enum RetentionStep {
    /// Nothing is expired.
    Nothing,
    /// The checkpoint already covers the expired segments: delete below this position
    /// ([`ShardStore::delete_below`]).
    Delete(LogPos),
    /// Collect, write, then hand this checkpoint to [`ShardStore::retention_end`], which deletes.
    Checkpoint(Box<CheckpointJob>),
}

impl ShardStore {
    /// Opens the shard, recovering the log and rebuilding the table from it.
    pub fn open(cfg: &StoreConfig) -> Result<(ShardStore, RecoveryReport), Error> {
        ShardStore::open_chained(cfg, true)
    }

    /// [`ShardStore::open`], with the log's hash chain thread only if `chain` (`--audit-chain`):
    /// without it no sidecar is written, and retention does not wait for seals.
    pub fn open_chained(
        cfg: &StoreConfig,
        chain: bool,
    ) -> Result<(ShardStore, RecoveryReport), Error> {
        let mut table = LastLocationTable::with_capacity(cfg.expected_devices, 24);
        let table_err_of = |source| Error::Table {
            shard: cfg.shard,
            source,
        };
        // The checkpoint first: the log replay after it may move devices on.
        let ckpt = Checkpoint::open(cfg.shard, &cfg.dir)?.map(Arc::new);
        if let Some(c) = &ckpt {
            let started = Instant::now();
            for rec in c.iter_checked() {
                let rec = rec?;
                let hb = rec.entry.hb;
                let slot = table
                    .observe(
                        hb.device_id.as_str(),
                        &Observation::of_archived(hb, rec.entry.pos),
                    )
                    .map_err(table_err_of)?;
                if rec.head > rec.entry.pos {
                    table.set_head_at(slot, rec.head).map_err(table_err_of)?;
                }
            }
            tracing::info!(shard = cfg.shard.0, path = %c.path().display(), records = c.len(), covered = c.covered().0, elapsed_ms = started.elapsed().as_millis() as u64, "last-location checkpoint loaded");
        }
        let covered = ckpt.as_ref().map_or(LogPos(0), |c| c.covered());
        let mut table_err = None;
        let log_cfg = LogConfig {
            dir: cfg.dir.clone(),
            shard: cfg.shard,
            segment_bytes: cfg.segment_bytes,
            write_mode: cfg.write_mode,
        };
        // Exactly-once state saved by retention (the log below its position may be gone); the
        // replay below re-applies what the log still holds, which changes nothing it had.
        for (id, audit) in checkpoint::open_audits(cfg.shard, &cfg.dir)? {
            *table.audit_mut(&id) = audit;
        }
        let (log, report) = Log::open(&log_cfg, |pos, e: &Entry<'_>| {
            if let Some(d) = e.dseq {
                table.audit_mut(e.hb.device_id.as_str()).apply(d, pos);
            }
            // Below the covered position the checkpoint holds what is still last.
            if table_err.is_some() || pos < covered {
                return;
            }
            if let Err(err) = table.observe(
                e.hb.device_id.as_str(),
                &Observation::of_archived(e.hb, pos),
            ) {
                table_err = Some(err);
            }
        })?;
        if let Some(source) = table_err {
            return Err(table_err_of(source));
        }
        if let Some(c) = &ckpt {
            let start = log.first_pos().0 - crate::limits::SEGMENT_HEADER_BYTES as u64;
            let what = if start > covered.0 {
                Some(format!("start at {start}"))
            } else if log.written() < covered {
                Some(format!("end at {}", log.written()))
            } else {
                None
            };
            if let Some(what) = what {
                return Err(Error::CheckpointGap {
                    shard: cfg.shard,
                    path: c.path().to_path_buf(),
                    covered,
                    what,
                });
            }
        }
        let mut grid = Grid::new();
        for (slot, _, loc) in table.iter_slots() {
            grid.update(slot.raw(), loc.lat, loc.lon);
        }
        // Recovery synced everything it kept: the chain may cover all of it.
        let chain = chain.then(|| ChainThread::spawn(&cfg.dir, cfg.shard, log.durable()));
        Ok((
            ShardStore {
                chain,
                log,
                table,
                grid,
                ckpt,
            },
            report,
        ))
    }

    /// Appends a heartbeat, linking it to the device's previous entry, and updates the table.
    /// Returns its position; it is durable once `durable()` passes it.
    pub fn append(&mut self, hb: &Heartbeat) -> Result<LogPos, Error> {
        self.append_tracked(hb).map(|a| a.pos)
    }

    /// Like [`ShardStore::append`], and also says where the device was before (its previous last
    /// location) and whether this heartbeat became its last location (a late one does not):
    /// what geofence transitions are computed from.
    pub fn append_tracked(&mut self, hb: &Heartbeat) -> Result<Appended, Error> {
        self.append_inner(hb, None)
    }

    /// Appends `hb` (sent with `seq`) unless `dedupe` finds it stored already. A sequenced
    /// heartbeat carries its `(epoch, seq)` into the log entry and moves the device's mark; a
    /// duplicate is counted in the device's audit counters.
    pub fn append_dedupe(
        &mut self,
        hb: &Heartbeat,
        seq: u64,
        dedupe: Dedupe,
    ) -> Result<Outcome, Error> {
        match dedupe {
            Dedupe::Off => self.append_inner(hb, None).map(Outcome::Stored),
            Dedupe::SeqFrom { epoch, first } => {
                // Resolved per item by the caller (`shard::core`); as a whole group it means
                // the first item.
                self.append_dedupe(hb, first, Dedupe::Seq(epoch))
            }
            Dedupe::Seq(epoch) => {
                let d = DeviceSeq { epoch, seq };
                if let Some(a) = self.table.audit(&hb.device_id) {
                    if a.check(d) == Verdict::Duplicate {
                        let wait = a.mark_pos;
                        self.table.audit_mut(&hb.device_id).duplicates += 1;
                        return Ok(Outcome::Duplicate(wait));
                    }
                }
                let appended = self.append_inner(hb, Some(d))?;
                self.table.audit_mut(&hb.device_id).apply(d, appended.pos);
                Ok(Outcome::Stored(appended))
            }
            Dedupe::DeviceTime => {
                let twin = self
                    .chain(&hb.device_id)
                    .take(DEDUPE_DEVICE_TIME_ENTRIES_MAX)
                    .find(|e| e.hb.ts_ms.to_native() == hb.ts_ms)
                    .map(|e| e.pos);
                if let Some(pos) = twin {
                    self.table.audit_mut(&hb.device_id).duplicates += 1;
                    return Ok(Outcome::Duplicate(pos));
                }
                self.append_inner(hb, None).map(Outcome::Stored)
            }
        }
    }

    /// Appends an entry copied from another log (reshard, migrate) with the device sequence it
    /// carried, rebuilding the device's exactly-once state as recovery would; never deduplicates.
    pub fn append_carried(
        &mut self,
        hb: &Heartbeat,
        dseq: Option<DeviceSeq>,
    ) -> Result<LogPos, Error> {
        let a = self.append_inner(hb, dseq)?;
        if let Some(d) = dseq {
            self.table.audit_mut(&hb.device_id).apply(d, a.pos);
        }
        Ok(a.pos)
    }

    fn append_inner(&mut self, hb: &Heartbeat, dseq: Option<DeviceSeq>) -> Result<Appended, Error> {
        let shard = self.log.shard();
        let slot = self.table.find(&hb.device_id);
        let prev = slot.map(|s| self.table.head_at(s));
        let prev_last = slot.map(|s| {
            let l = self.table.get_at(s);
            (l.lat, l.lon)
        });
        if slot.is_none() {
            self.table
                .check_room(&hb.device_id)
                .map_err(|source| Error::Table { shard, source })?;
        }
        // The entry may land at the start of a new segment: refuse before writing if even that
        // could exceed what the table can store.
        let worst_end = self.log.written().0 + crate::limits::SEGMENT_BYTES_MAX;
        if worst_end > TABLE_POS_MAX {
            return Err(Error::Table {
                shard,
                source: TableError::PositionTooLarge(worst_end),
            });
        }
        let pos = self.log.append_seq(hb, dseq, prev)?;
        // Chains point backwards: the table's head for this device is an earlier entry.
        debug_assert!(
            prev.is_none_or(|p| p < pos),
            "chain head {prev:?} not before {pos}"
        );
        let obs = Observation::of(hb, pos);
        let res = match slot {
            Some(s) => self.table.observe_at(s, &obs).map(|()| s),
            None => self.table.observe(&hb.device_id, &obs),
        };
        let slot = res.expect("table room and position were checked before appending");
        // Only a heartbeat that became the last location moves the device in the grid.
        let became_last = self.table.get_at(slot).pos == pos;
        if became_last {
            self.grid.update(slot.raw(), hb.lat, hb.lon);
        }
        Ok(Appended {
            pos,
            prev_last,
            became_last,
        })
    }

    /// The exactly-once state and audit counters of `device_id` (issue 18), if it has any.
    pub fn audit(&self, device_id: &str) -> Option<DeviceAudit> {
        self.table.audit(device_id).copied()
    }

    /// For a local append with subscriptions active on a cluster node: `device_id`'s entry in
    /// the shard's cluster `view` as `(lat, lon, ts_ms, received_ms)`, if it is newer than this
    /// store's table's (`None`: the table alone decides, as on a node without a cluster).
    pub fn view_before(
        &self,
        view: &crate::table::view::ViewTable,
        device_id: &str,
    ) -> Option<(f64, f64, i64, i64)> {
        if view.is_empty() {
            return None;
        }
        let v = view.get(device_id)?;
        crate::table::view::view_wins(self.last(device_id).as_ref(), v).then_some((
            v.lat,
            v.lon,
            v.ts_ms,
            v.received_ms,
        ))
    }

    /// The last location (newest by device time) of `device_id`.
    pub fn last(&self, device_id: &str) -> Option<LastLocation> {
        self.table.get(device_id)
    }

    /// The full record of `device_id`'s last location (`None` if unknown): from the log, or from
    /// the last-location checkpoint once retention deleted its segment.
    pub fn last_record(&self, device_id: &str) -> Option<Entry<'_>> {
        let pos = self.table.get(device_id)?.pos;
        self.log
            .read(pos)
            .or_else(|| Some(self.ckpt.as_ref()?.get(pos)?.entry))
    }

    /// The last-location checkpoint, if retention ever wrote one.
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.ckpt.as_deref()
    }

    /// Calls `f` with every record held only by the last-location checkpoint: the last entries
    /// (still last: no newer heartbeat superseded them) of devices whose entry the log no longer
    /// has, in log-position order. A tool that rewrites the log (reshard, migrate) must carry
    /// these as well as the log's entries, or those devices lose their last location. Each
    /// record's `entry` is validated; `entry_bytes` are the entry's bytes as the log stored them.
    pub fn for_each_checkpoint_record(&self, mut f: impl FnMut(&Record<'_>)) {
        let Some(c) = &self.ckpt else { return };
        let log_start = self.log.first_pos();
        for rec in c.iter() {
            let still_last = self
                .table
                .get(rec.entry.hb.device_id.as_str())
                .is_some_and(|l| l.pos == rec.entry.pos);
            if still_last && (rec.entry.pos < log_start || self.log.read(rec.entry.pos).is_none()) {
                f(&rec);
            }
        }
    }

    /// `device_id`'s entries, most recently appended first (empty if unknown).
    pub fn chain(&self, device_id: &str) -> Chain<'_> {
        match self.table.head(device_id) {
            Some(head) => self.log.chain(head),
            // A position that is never an entry: the chain is empty.
            None => self.log.chain(LogPos(u64::MAX)),
        }
    }

    /// The spatial index over last locations (keys: table slots, see [`ShardStore::slot_location`]).
    pub fn grid(&self) -> &Grid {
        &self.grid
    }

    /// The id and last location behind a grid key.
    pub fn slot_location(&self, key: u32) -> (&str, LastLocation) {
        let slot = crate::table::Slot::from_raw(key);
        (self.table.id_at(slot), self.table.get_at(slot))
    }

    /// See [`Log::write_staged`]: puts the entries appended so far into the page cache (where a
    /// process crash keeps them) without making them durable.
    pub fn write_staged(&mut self) -> Result<(), Error> {
        Ok(self.log.write_staged()?)
    }

    /// See [`Log::commit_begin`].
    pub fn commit_begin(&mut self) -> Result<Commit, Error> {
        let c = self.log.commit_begin()?;
        if let Commit::Done(pos) = c {
            self.publish_chain(pos);
        }
        Ok(c)
    }

    /// See [`Log::commit_end`].
    /// Publishes the new durable position to the hash chain's thread (one atomic store; the
    /// hashing happens there, off the ack's path).
    pub fn commit_end(&mut self, job: SyncJob, res: std::io::Result<()>) -> Result<LogPos, Error> {
        let pos = self.log.commit_end(job, res)?;
        self.publish_chain(pos);
        Ok(pos)
    }

    /// See [`Log::sync_blocking`].
    pub fn sync_blocking(&mut self) -> Result<LogPos, Error> {
        let pos = self.log.sync_blocking()?;
        self.publish_chain(pos);
        Ok(pos)
    }

    /// Position below which every segment is sealed in the log's hash chain (`u64::MAX` if the
    /// chain thread stopped on an error).
    pub fn chain_sealed_below(&self) -> LogPos {
        self.chain
            .as_ref()
            .map_or(LogPos(u64::MAX), ChainThread::sealed_below)
    }

    /// Tells the chain thread (if any) the new durable position.
    fn publish_chain(&self, pos: LogPos) {
        if let Some(c) = &self.chain {
            c.publish_durable(pos);
        }
    }

    /// See [`Log::durable`].
    pub fn durable(&self) -> LogPos {
        self.log.durable()
    }

    /// See [`Log::written`].
    pub fn written(&self) -> LogPos {
        self.log.written()
    }

    /// See [`Log::stats`].
    pub fn stats(&self) -> LogStats {
        self.log.stats()
    }

    /// The log (reads, scans, retention, consumers).
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// See [`Log::register_consumer`].
    pub fn register_consumer(&mut self, name: &str) -> Result<(), Error> {
        Ok(self.log.register_consumer(name)?)
    }

    /// See [`Log::set_consumed`].
    pub fn set_consumed(&mut self, name: &str, upto: LogPos) -> Result<(), Error> {
        Ok(self.log.set_consumed(name, upto)?)
    }

    /// Runs retention synchronously on this thread: [`ShardStore::retention_begin`], writing the
    /// checkpoint if one is needed, then deleting. Returns the number of segments deleted. The
    /// table keeps every device; last records stay readable (from the checkpoint), older chain
    /// links in deleted segments are gone.
    pub fn delete_expired(&mut self, now: SystemTime, retention: Duration) -> Result<usize, Error> {
        match self.retention_begin(now, retention) {
            RetentionStep::Nothing => Ok(0),
            RetentionStep::Delete(end) => self.delete_below(end),
            RetentionStep::Checkpoint(mut job) => {
                while !job.collect_slice(self) {}
                let res = job.write();
                Ok(self.retention_end(job, res)?.segments())
            }
        }
    }

    /// The first step of retention at `now`: what has to happen before expired segments may be
    /// deleted. A checkpoint job is returned empty: call [`CheckpointJob::collect_slice`] with
    /// this store until it returns true (the store may take appends between slices), then
    /// [`CheckpointJob::write`] (any thread), then [`ShardStore::retention_end`]. Only one job
    /// at a time per store.
    ///
    /// Only segments the hash chain has sealed are deleted (their successors' sidecars record
    /// the chain's start); the others wait for a later run.
    ///
    /// This form waits (blocking, at most [`crate::limits::CHAIN_RETENTION_WAIT_MS`]) for a
    /// chain that is behind: for tools and tests. An executor uses
    /// [`ShardStore::retention_begin_within`] with no wait.
    pub fn retention_begin(&self, now: SystemTime, retention: Duration) -> RetentionStep {
        let wait = Duration::from_millis(crate::limits::CHAIN_RETENTION_WAIT_MS);
        self.retention_begin_within(now, retention, wait)
    }

    /// [`ShardStore::retention_begin`], waiting at most `chain_wait` for the hash chain to seal
    /// the expired segments (zero: never blocks; the chain thread is nudged and what it has not
    /// sealed yet waits for a later run).
    pub fn retention_begin_within(
        &self,
        now: SystemTime,
        retention: Duration,
        chain_wait: Duration,
    ) -> RetentionStep {
        let Some(end) = self.log.expired_end(now, retention) else {
            return RetentionStep::Nothing;
        };
        // Expired segments were normally sealed in the chain long ago; it is behind only just
        // after an open over a long unchained log (then the rest waits for a later run).
        if let Some(chain) = self.chain.as_ref().filter(|c| c.sealed_below() < end) {
            chain.publish_durable(self.log.durable());
            chain.kick();
            if !chain_wait.is_zero() {
                chain.wait_sealed(end, chain_wait);
            }
        }
        let end = end.min(self.chain_sealed_below());
        if self.log.segment_end(end).is_none()
            || end.0 + SEGMENT_HEADER_BYTES as u64 <= self.log.first_pos().0
        {
            return RetentionStep::Nothing;
        }
        if self.ckpt.as_ref().is_some_and(|c| c.covered() >= end) {
            return RetentionStep::Delete(end);
        }
        RetentionStep::Checkpoint(Box::new(self.checkpoint_job(end)))
    }

    /// A job for the checkpoint covering positions below `covered` (a segment base at or below
    /// the log's end): every device whose last entry lies below it, that entry (from the log, or
    /// from the current checkpoint for entries already deleted), its position and chain head.
    pub fn checkpoint_job(&self, covered: LogPos) -> CheckpointJob {
        assert!(
            covered <= self.log.written(),
            "checkpoint covering {covered} past the log's end"
        );
        let old_covered = self.ckpt.as_ref().map_or(LogPos(0), |c| c.covered());
        CheckpointJob {
            shard: self.log.shard(),
            dir: self.log.dir().to_path_buf(),
            covered,
            old: self.ckpt.clone(),
            segments: self.log.sealed_files(old_covered, covered),
            delete: self
                .log
                .sealed_files(LogPos(0), covered)
                .into_iter()
                .filter(|(base, _)| self.log.segment_end(*base).is_some_and(|e| e <= covered))
                .map(|(_, path)| path)
                .collect(),
            below: Vec::new(),
            next_chunk: 0,
            audits: Vec::new(),
            written: None,
            records: 0,
            file_bytes: 0,
            collect_time: Duration::ZERO,
            collect_slice_max: Duration::ZERO,
            build_time: Duration::ZERO,
            write_time: Duration::ZERO,
            delete_time: Duration::ZERO,
        }
    }

    /// The last step of retention, once `job` was written with outcome `res`: takes the new
    /// checkpoint and takes the segments below its covered position out of the log (their
    /// files were deleted by `write`; any left are deleted here). What was replaced is returned
    /// still mapped: drop it where unmapping may take a while. On a failed checkpoint write
    /// nothing is deleted (the error is returned; the next retention run starts a new job).
    pub fn retention_end(
        &mut self,
        mut job: Box<CheckpointJob>,
        res: Result<(), checkpoint::Error>,
    ) -> Result<Retired, Error> {
        let Some(ckpt) = job.written.take() else {
            res?;
            unreachable!("a job written without error holds its file");
        };
        if let Err(e) = res {
            // The checkpoint is durable but deleting its segments failed: the store deletes what
            // is left below (and says so if that fails too).
            tracing::warn!(shard = job.shard.0, error = %e, "deleting covered segments on the checkpoint thread failed");
        }
        assert_eq!(ckpt.covered(), job.covered, "the checkpoint just written");
        tracing::info!(
            shard = job.shard.0,
            records = job.records,
            bytes = job.file_bytes,
            covered = job.covered.0,
            collect_ms = job.collect_time.as_millis() as u64,
            collect_slice_max_us = job.collect_slice_max.as_micros() as u64,
            build_ms = job.build_time.as_millis() as u64,
            write_ms = job.write_time.as_millis() as u64,
            delete_ms = job.delete_time.as_millis() as u64,
            "last-location checkpoint written"
        );
        let old = self.ckpt.replace(Arc::new(ckpt));
        Ok(Retired {
            segments: self.log.retire_below(job.covered)?,
            checkpoint: old,
        })
    }

    /// Deletes the segments wholly below `end`, which the checkpoint must cover.
    pub fn delete_below(&mut self, end: LogPos) -> Result<usize, Error> {
        assert!(
            self.ckpt.as_ref().is_some_and(|c| c.covered() >= end),
            "segments below {end} deleted without a checkpoint covering them"
        );
        Ok(self.log.delete_below(end)?)
    }

    /// The last-location table.
    pub fn table(&self) -> &LastLocationTable {
        &self.table
    }
}

// The server may build stores on one thread and move them to their executor's thread.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<ShardStore>();
};
