//! One shard's storage facade: its log plus its last-location table, kept consistent. Opening
//! replays the log into the table (last locations and chain heads); appending links the new entry
//! to the device's previous one and updates the table. It holds no globals or thread-locals, so a
//! thread may own several stores. It does not decide when to commit or acknowledge (the server's
//! commit loop drives `commit_begin`/`commit_end` with a `GroupPolicy` and a `Durability`).
//!
//! Invariant: the table always equals a replay of the log (every appended entry is in the table,
//! nothing else is): a heartbeat the table could not take is refused before the log is written.

use std::path::PathBuf;

use crate::limits::{SEGMENT_BYTES_DEFAULT, TABLE_POS_MAX};
use crate::log::{
    self, Chain, Commit, Entry, Log, LogConfig, LogPos, LogStats, RecoveryReport, SyncJob,
};
use crate::record::Heartbeat;
use crate::route::ShardId;
use crate::spatial::Grid;
use crate::table::{LastLocation, LastLocationTable, Observation, TableError};

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
}

impl StoreConfig {
    /// Defaults for everything but the directory and shard.
    pub fn new(dir: impl Into<PathBuf>, shard: ShardId) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            shard,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            expected_devices: 0,
        }
    }
}

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log failed or refused.
    #[error(transparent)]
    Log(#[from] log::Error),
    /// The table refused a new device (nothing was written).
    #[error("shard {shard}: {source}")]
    Table {
        /// Shard concerned.
        shard: ShardId,
        /// Why.
        source: TableError,
    },
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

/// One shard's log and last-location table.
#[derive(Debug)]
pub struct ShardStore {
    log: Log,
    table: LastLocationTable,
    /// Spatial index over the table's last locations (keys are table slots).
    grid: Grid,
}

impl ShardStore {
    /// Opens the shard, recovering the log and rebuilding the table from it.
    pub fn open(cfg: &StoreConfig) -> Result<(ShardStore, RecoveryReport), Error> {
        let mut table = LastLocationTable::with_capacity(cfg.expected_devices, 24);
        let mut table_err = None;
        let log_cfg = LogConfig {
            dir: cfg.dir.clone(),
            shard: cfg.shard,
            segment_bytes: cfg.segment_bytes,
        };
        let (log, report) = Log::open(&log_cfg, |pos, e: &Entry<'_>| {
            if table_err.is_some() {
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
            return Err(Error::Table {
                shard: cfg.shard,
                source,
            });
        }
        let mut grid = Grid::new();
        for (slot, _, loc) in table.iter_slots() {
            grid.update(slot.raw(), loc.lat, loc.lon);
        }
        Ok((ShardStore { log, table, grid }, report))
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
        let pos = self.log.append(hb, prev)?;
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

    /// The last location (newest by device time) of `device_id`.
    pub fn last(&self, device_id: &str) -> Option<LastLocation> {
        self.table.get(device_id)
    }

    /// The full record of `device_id`'s last location, from the log (`None` if unknown or its
    /// segment was deleted by retention).
    pub fn last_record(&self, device_id: &str) -> Option<Entry<'_>> {
        self.log.read(self.table.get(device_id)?.pos)
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

    /// See [`Log::commit_begin`].
    pub fn commit_begin(&mut self) -> Result<Commit, Error> {
        Ok(self.log.commit_begin()?)
    }

    /// See [`Log::commit_end`].
    pub fn commit_end(&mut self, job: SyncJob, res: std::io::Result<()>) -> Result<LogPos, Error> {
        Ok(self.log.commit_end(job, res)?)
    }

    /// See [`Log::sync_blocking`].
    pub fn sync_blocking(&mut self) -> Result<LogPos, Error> {
        Ok(self.log.sync_blocking()?)
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

    /// See [`Log::delete_expired`]. The table keeps devices whose entries were deleted (their
    /// `last` stays; `last_record` and older chain links return nothing).
    pub fn delete_expired(
        &mut self,
        now: std::time::SystemTime,
        retention: std::time::Duration,
    ) -> Result<usize, Error> {
        Ok(self.log.delete_expired(now, retention)?)
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
