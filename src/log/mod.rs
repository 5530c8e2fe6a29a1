//! The durable per-shard heartbeat log: an append-only sequence of CRC-checked rkyv entries in
//! fixed-size, preallocated, memory-mapped segment files, addressed by a global byte position
//! ([`LogPos`]). It owns appends, rollover, the two-phase commit (`commit_begin` / `commit_end`,
//! so a runtime can fdatasync asynchronously while appends go on), reads, per-device back-pointer
//! chains, ordered scans, recovery at open and retention. It does not decide when to acknowledge
//! (see [`Durability`], a caller policy), does not know the last location of devices (`table`),
//! and is used from one thread: one log belongs to one shard. Its only helper is a short-lived
//! thread per rollover that zero-fills the next segment file ahead of time (`spawn_spare`; it
//! touches no state of the log, only a `.seg.tmp` file). Other threads may read its durable
//! entries through [`tail::Tail`], a read-only reader of the segment files. Every file-system
//! operation goes through [`storage::Disk`]: the real file system, or the simulated disk of the
//! crash tests ([`sim`]; then the spare segment is prepared inline, not on a thread).
//!
//! Entries reach a segment file in one of three ways ([`WriteMode`]): encoded into the log's
//! in-memory *stage* and written to the file with one `pwrite` per commit (and before a rollover,
//! or when the stage is full), the file being mapped read-only for reads; staged the same way
//! and written by the commit's job with one write on an `O_DSYNC` descriptor (the job carries a
//! copy of the group; the stage keeps it until `commit_end`, and that write is the group's
//! durability point, no fdatasync); or (the default) written straight into a read-write
//! mapping. On DAX they always go through the `MAP_SYNC` mapping.
//!
//! Invariants: positions are contiguous across segments (a segment's base is its predecessor's
//! base plus its size) and data once written never moves; sequence numbers are contiguous; an
//! entry at position `p` is durable iff `p < durable()`; a segment that has a successor is
//! complete and durable (it is synced before the successor is created), so only the last segment
//! can have a torn tail. Staged bytes are the positions `[stage_pos, written)` of the active
//! segment, and `durable() <= stage_pos`: the log's own reads (`read`, `chain`, `scan_from`) take
//! staged entries from the stage, and every reader of the files (the tail reader, checkpoint
//! writer, recovery) reads only below `durable()` or in sealed segments, which hold no staged
//! bytes (a rollover writes the stage first), so no reader ever sees a byte not yet written.

pub mod chain;
pub mod dax;
pub mod error;
pub mod format;
pub mod policy;
pub mod recovery;
mod segment;
pub mod sim;
pub mod storage;
pub mod sync;
pub mod tail;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rkyv::ser::allocator::Arena;
use rkyv::util::AlignedVec;

pub use error::Error;
pub use policy::{Durability, GroupPolicy};
pub use recovery::{Damage, RecoveryReport};
pub use storage::Disk;
pub use sync::{Commit, DsyncTarget, DsyncWrite, SyncFile, SyncJob, UringSyncer};

use format::{entry_bytes, parse_entry, write_entry_flagged, FIRST_SEQ, POS_NONE};
use segment::Segment;

use crate::limits::{
    ENTRY_PAYLOAD_BYTES_MAX, LOG_CONSUMERS_MAX, LOG_CONSUMER_NAME_BYTES_MAX, LOG_SEGMENTS_MAX,
    LOG_STAGE_BYTES_MAX, PAGE_BYTES, SEGMENT_BYTES_DEFAULT, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN,
    SEGMENT_HEADER_BYTES,
};
use crate::record::{self, ArchivedHeartbeat, DeviceSeq, Heartbeat, ENTRY_FLAG_DEVICE_SEQ};
use crate::route::{self, ShardId};

/// A global byte position within one shard's log (segment base + offset in the segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogPos(pub u64);

impl std::fmt::Display for LogPos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How a segment is made durable, detected per segment at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// MAP_SYNC mapping on a DAX file system: commit = cache-line write-back + sfence, no syscall.
    Dax,
    /// Ordinary shared mapping: commit = fdatasync of the segment file.
    Fdatasync,
}

impl std::fmt::Display for SyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncMode::Dax => "dax",
            SyncMode::Fdatasync => "fdatasync",
        })
    }
}

/// How appended entries reach a segment file on an ordinary (non-DAX) file system. On a DAX file
/// system entries are always written through the `MAP_SYNC` mapping (commit = cache-line flushes).
///
/// See: issue 15 §3 and `perf/RESULTS.md`, "Commit path": writing through a shared mapping
/// makes every durable group pay write-protect faults and TLB shootdowns after each writeback.
/// The default stays [`WriteMode::Mmap`] for now: in the server A/B ("Commit path by pwrite")
/// `Pwrite` gave more throughput at saturation and lower ack latency at light load, but more
/// server CPU per heartbeat, so it did not win outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// Entries are encoded into the log's in-memory stage and written to the file with `pwrite`
    /// (one call per commit, rollover, full stage, or Relaxed group); the file is mapped
    /// read-only for reads.
    Pwrite,
    /// Entries are written straight into a shared read-write mapping of the file (the way
    /// before issue 15 §3).
    #[default]
    Mmap,
    /// Entries are staged as in [`WriteMode::Pwrite`], and a commit writes the group with one
    /// write on a descriptor opened with `O_DSYNC` (a [`SyncJob`] carrying the bytes, run
    /// through io_uring by the caller): the write completing is the durability point, with no
    /// separate fdatasync. Segments are preallocated and zero-filled (written extents), so such
    /// a write has no metadata to sync; the file is mapped read-only for reads, so there are no
    /// write-protect faults. See: issue 15 §3, `perf/RESULTS.md` "Commit path: dsync and
    /// adaptive linger".
    Dsync,
}

impl std::fmt::Display for WriteMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WriteMode::Pwrite => "pwrite",
            WriteMode::Mmap => "mmap",
            WriteMode::Dsync => "dsync",
        })
    }
}

/// Where a shard log lives and how big new segments are.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// The shard directory (created if missing).
    pub dir: PathBuf,
    /// The shard this log belongs to (recorded in every segment header and checked at open).
    pub shard: ShardId,
    /// Size of newly created segment files: a multiple of the page size within
    /// `SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX`. Existing segments keep the size in their header.
    pub segment_bytes: u64,
    /// How entries are written to segment files (ignored on DAX, where the mapping is written).
    pub write_mode: WriteMode,
}

impl LogConfig {
    /// A configuration with the default segment size and write mode.
    pub fn new(dir: impl Into<PathBuf>, shard: ShardId) -> LogConfig {
        LogConfig {
            dir: dir.into(),
            shard,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            write_mode: WriteMode::default(),
        }
    }

    fn check(&self) -> Result<(), Error> {
        let b = self.segment_bytes;
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&b) || b % PAGE_BYTES != 0 {
            return Err(Error::Config {
                shard: self.shard,
                reason: format!(
                    "segment_bytes {b} must be a multiple of {PAGE_BYTES} in {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_MAX}"
                ),
            });
        }
        Ok(())
    }
}

/// One validated log entry, borrowed from the mapping.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Where the entry starts.
    pub pos: LogPos,
    /// Shard-wide sequence number.
    pub seq: u64,
    /// The same device's previous entry, if any.
    pub prev: Option<LogPos>,
    /// The heartbeat (zero-copy, validated).
    pub hb: &'a ArchivedHeartbeat,
    /// The device-scoped sequence it was sent with, if the device declared one (issue 18).
    pub dseq: Option<DeviceSeq>,
    /// `route::device_hash` (CRC32C) of the device id (format-1 data directories: the low 32
    /// bits of their ahash).
    pub device_hash_low: u32,
    /// Bytes the entry occupies (header, payload, padding).
    pub len_bytes: u32,
}

impl Entry<'_> {
    /// Position just past this entry.
    pub fn end(&self) -> LogPos {
        LogPos(self.pos.0 + u64::from(self.len_bytes))
    }
}

/// Why [`decode_entry`] found no entry at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodeFault {
    /// The framing refused it, or the segment's data ends there (see [`format::EntryFault`]).
    Frame(format::EntryFault),
    /// The framing was fine but the payload failed rkyv validation or the record rules.
    Record,
}

/// Decodes and validates the entry at offset `off` of a mapped segment `data` whose first byte is
/// global position `base`: the framing (length, CRC) first, then the rkyv payload and the record
/// rules. Shared by the log and its read-only tail reader (`tail`), so both accept exactly the
/// same entries.
#[inline]
pub(crate) fn decode_entry(data: &[u8], base: u64, off: u64) -> Result<Entry<'_>, DecodeFault> {
    let raw = parse_entry(data, off as usize).map_err(DecodeFault::Frame)?;
    let (hb, dseq) = record::access_payload(raw.payload, raw.flags).ok_or(DecodeFault::Record)?;
    Ok(Entry {
        pos: LogPos(base + off),
        seq: raw.seq,
        prev: (raw.prev_pos != POS_NONE).then_some(LogPos(raw.prev_pos)),
        hb,
        dseq,
        device_hash_low: raw.device_hash_low,
        len_bytes: raw.total_bytes as u32,
    })
}

/// Where a [`Scan`] stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanEnd {
    /// At the end of everything appended (`written()`).
    Written,
    /// At `durable()` (entries not yet durable are not returned).
    Durable,
}

/// Counters describing a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStats {
    /// Bytes of segment files on disk.
    pub bytes: u64,
    /// Segment files.
    pub segments: usize,
    /// Entries in the retained segments.
    pub entries: u64,
    /// `written()`.
    pub written: LogPos,
    /// `durable()`.
    pub durable: LogPos,
    /// Sync mode of the active segment.
    pub sync_mode: SyncMode,
}

#[derive(Debug)]
struct Consumer {
    name: String,
    upto: LogPos,
}

/// One shard's log. Not shared between threads; several logs may live on one thread.
pub struct Log {
    shard: ShardId,
    dir: PathBuf,
    segment_bytes: u64,
    /// Oldest first; the last one is active (receives appends). Never empty.
    segments: VecDeque<Segment>,
    written: u64,
    durable: u64,
    next_seq: u64,
    poisoned: bool,
    job_in_flight: bool,
    /// Reused encoding buffer (no per-append allocation once warm).
    scratch: AlignedVec,
    /// How new segments are written (see [`WriteMode`]).
    write_mode: WriteMode,
    /// Entries appended to the active segment and not yet written to its file (only when the
    /// active segment is written with `pwrite`): the bytes of positions `[stage_pos, written)`.
    /// Allocated once with `LOG_STAGE_BYTES_MAX` and never grown (it is written out first).
    stage: AlignedVec,
    /// Position of the stage's first byte; equals `written` when the stage is empty. Always an
    /// entry boundary, and `durable <= stage_pos`.
    stage_pos: u64,
    /// Reused serializer scratch space (kept here, not in rkyv's thread-local arena: cheaper, and
    /// no thread-locals).
    arena: Arena,
    consumers: Vec<Consumer>,
    /// Where the segment files live (the real file system, or a simulated disk in crash tests).
    disk: Disk,
    /// Holds the shard directory's flock for the life of the log (none on a simulated disk).
    _lock: Option<File>,
    /// `(st_dev, st_ino)` of the lock file this log holds: if `<dir>/LOCK` stops naming this file,
    /// the directory was removed or replaced under us (checked at every commit; none on a
    /// simulated disk).
    lock_identity: Option<(u64, u64)>,
    /// The next segment, being zero-filled on a helper thread while the active one fills up.
    spare: Option<Spare>,
}

/// A segment file prepared ahead of its rollover by a helper thread (`segment::prepare_spare`).
struct Spare {
    /// Base position the file is prepared for (the active segment's end when it was started).
    base: u64,
    /// Its size.
    bytes: u64,
    /// The preparation; its result says whether `<base>.seg.tmp` is ready.
    thread: SpareWork,
}

/// Who prepares a spare: a helper thread on the real disk; on a simulated disk it is prepared
/// inline (the simulation is single-threaded and must be deterministic per seed).
enum SpareWork {
    Thread(std::thread::JoinHandle<std::io::Result<()>>),
    Done(std::io::Result<()>),
}

impl SpareWork {
    /// The preparation's outcome (`Err(())`: the thread panicked).
    fn join(self) -> Result<std::io::Result<()>, ()> {
        match self {
            SpareWork::Thread(t) => t.join().map_err(|_| ()),
            SpareWork::Done(r) => Ok(r),
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        // Staged entries go to the page cache, as entries written into a mapping would have:
        // not durable, but a reopen in this boot finds them (best effort: they were never
        // acknowledged, and a failure here changes nothing a caller was told).
        if !self.poisoned {
            let _ = self.write_stage();
        }
        // A spare still being written belongs to this directory: let it finish (a leftover
        // `.seg.tmp` is deleted at the next open anyway).
        if let Some(spare) = self.spare.take() {
            let _ = spare.thread.join();
        }
    }
}

/// Starts zero-filling `<dir>/<base>.seg.tmp` on a helper thread. The thread may run on any core
/// (the shard's executor is pinned to one; the copy of zeros should not compete with it there).
fn spawn_spare(disk: &Disk, shard: ShardId, dir: &Path, base: u64, bytes: u64) -> Option<Spare> {
    if let Disk::Sim(_) = disk {
        return Some(Spare {
            base,
            bytes,
            thread: SpareWork::Done(segment::prepare_spare(disk, dir, base, bytes)),
        });
    }
    let dir = dir.to_path_buf();
    let thread = std::thread::Builder::new()
        .name(format!("geobeat-spare-{}", shard.0))
        .spawn(move || {
            unpin_current_thread();
            segment::prepare_spare(&Disk::Real, &dir, base, bytes)
        });
    match thread {
        Ok(thread) => Some(Spare {
            base,
            bytes,
            thread: SpareWork::Thread(thread),
        }),
        Err(e) => {
            // No thread: the next rollover zero-fills inline instead.
            tracing::warn!(shard = shard.0, error = %e, "could not start the spare segment thread");
            None
        }
    }
}

/// Lets the calling thread run on every CPU (threads inherit their creator's affinity).
fn unpin_current_thread() {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: `cpu` is below CPU_SETSIZE and `set` is a valid cpu_set_t.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: a valid set for the calling thread (pid 0); failure just leaves the affinity as is.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("shard", &self.shard)
            .field("dir", &self.dir)
            .field("segments", &self.segments.len())
            .field("written", &self.written)
            .field("durable", &self.durable)
            .field("next_seq", &self.next_seq)
            .field("poisoned", &self.poisoned)
            .field("job_in_flight", &self.job_in_flight)
            .finish()
    }
}

/// Serializes `hb` into `out` (cleared first) with rkyv's low-level API: the same bytes as
/// `Heartbeat::encode_into`, without its thread-local arena lookup.
fn encode(arena: &mut Arena, out: &mut AlignedVec, hb: &Heartbeat) {
    out.clear();
    let buf = std::mem::take(out);
    *out = rkyv::api::low::to_bytes_in_with_alloc::<_, _, rkyv::rancor::Failure>(
        hb,
        buf,
        arena.acquire(),
    )
    .expect("serializing a heartbeat into memory cannot fail");
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Name of the lock file inside a shard directory.
pub const LOCK_FILE: &str = "LOCK";

/// `(st_dev, st_ino)` of an open file.
fn file_identity(file: &File) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

fn lock_dir(shard: ShardId, dir: &Path) -> Result<File, Error> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(crate::datadir::FILE_MODE)
        .open(&path)
        .map_err(|e| Error::io(shard, "open lock file", &path, e))?;
    // A conflict is retried for a bounded moment: a process that just released the directory
    // (a server stopping, a log dropped in this process) may still have its lock held by a child
    // forked from another thread that has not yet reached exec (where close-on-exec drops it).
    let deadline =
        std::time::Instant::now() + Duration::from_millis(crate::limits::DIR_LOCK_WAIT_MS);
    loop {
        // SAFETY: plain syscall on a valid fd.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(Error::io(shard, "flock", &path, err));
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Locked { shard, path });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Log {
    /// Opens (or creates) the log in `cfg.dir`, recovering it: `on_entry` sees every valid entry in
    /// log order (use it to rebuild indexes). Torn tails are zeroed and damage quarantined as
    /// described in `shards/README.md`; everything recovered is synced before this returns, so
    /// `durable() == written()` afterwards.
    pub fn open<F>(cfg: &LogConfig, on_entry: F) -> Result<(Log, RecoveryReport), Error>
    where
        F: FnMut(LogPos, &Entry<'_>),
    {
        Log::open_on(cfg, Disk::Real, on_entry)
    }

    /// [`Log::open`] on a given disk: the real file system, or a simulated one (crash tests; no
    /// directory lock is taken there).
    pub fn open_on<F>(
        cfg: &LogConfig,
        disk: Disk,
        on_entry: F,
    ) -> Result<(Log, RecoveryReport), Error>
    where
        F: FnMut(LogPos, &Entry<'_>),
    {
        cfg.check()?;
        let shard = cfg.shard;
        let dir = cfg.dir.clone();
        if !disk.is_dir(&dir) {
            disk.create_dir(&dir)
                .map_err(|e| Error::io(shard, "create shard dir", &dir, e))?;
            if let Some(parent) = dir.parent() {
                segment::sync_dir(&disk, shard, parent)?;
            }
        }
        let (lock, lock_identity) = match disk {
            Disk::Real => {
                let lock = lock_dir(shard, &dir)?;
                let identity = file_identity(&lock)
                    .map_err(|e| Error::io(shard, "stat lock file", &dir.join(LOCK_FILE), e))?;
                (Some(lock), Some(identity))
            }
            Disk::Sim(_) => (None, None),
        };
        let recovered = recovery::recover(&disk, shard, &dir, cfg.write_mode, on_entry)?;
        let mut segments = recovered.segments;
        let report = recovered.report;
        let next_seq = recovered.next_seq.unwrap_or(FIRST_SEQ);
        assert!(
            next_seq >= FIRST_SEQ,
            "sequence numbers start at {FIRST_SEQ}"
        );
        // Paired with recovery's checks of the chain of bases: what it kept is contiguous.
        debug_assert!(
            segments
                .iter()
                .zip(segments.iter().skip(1))
                .all(|(a, b)| a.end() == b.base && a.data_end <= a.bytes),
            "recovered segments are contiguous"
        );
        if segments.is_empty() {
            segments.push_back(Segment::create(
                &disk,
                &dir,
                shard,
                0,
                cfg.segment_bytes,
                next_seq,
                now_ms(),
                false,
                cfg.write_mode,
            )?);
        }
        let last_index = segments.len() - 1;
        for seg in segments.iter_mut().take(last_index) {
            seg.close_files();
        }
        let last = segments.back_mut().expect("at least one segment");
        // Entries recovered from the page cache after a process crash may not be on disk yet:
        // sync them so `durable()` can start at `written()`.
        let last_path = last.path.clone();
        last.sync_range(SEGMENT_HEADER_BYTES as u64, last.data_end)
            .map_err(|e| Error::io(shard, "sync recovered segment", &last_path, e))?;
        let written = last.base + last.data_end;
        let mode = last.mode();
        tracing::info!(
            shard = shard.0,
            dir = %dir.display(),
            sync_mode = %mode,
            segments = report.segments,
            entries = report.entries,
            bytes = report.bytes,
            torn_tail_bytes = report.torn_tail_bytes,
            damaged = report.damaged.len(),
            elapsed_ms = report.elapsed.as_millis() as u64,
            "shard log opened"
        );
        let log = Log {
            shard,
            dir,
            segment_bytes: cfg.segment_bytes,
            segments,
            written,
            durable: written,
            next_seq,
            poisoned: false,
            job_in_flight: false,
            scratch: AlignedVec::with_capacity(ENTRY_PAYLOAD_BYTES_MAX),
            write_mode: cfg.write_mode,
            stage: AlignedVec::with_capacity(LOG_STAGE_BYTES_MAX),
            stage_pos: written,
            arena: Arena::new(),
            consumers: Vec::new(),
            disk,
            _lock: lock,
            lock_identity,
            spare: None,
        };
        let mut log = log;
        log.spare = spawn_spare(
            &log.disk,
            shard,
            &log.dir,
            log.active().end(),
            log.segment_bytes,
        );
        Ok((log, report))
    }

    /// Prepares an empty log in `cfg.dir` whose first entry will be at `base` + the segment header
    /// with sequence number `first_seq`: creates the directory and the first segment file. Refuses
    /// (`Error::Config`) if the directory already holds a segment. Used by `reshard`, which starts
    /// each rewritten shard past every position and sequence number an earlier layout used, so
    /// `(shard, pos)` and `(shard, seq)` stay unique in sinks across layouts. Open it with
    /// [`Log::open`] afterwards.
    pub fn init_at(cfg: &LogConfig, base: LogPos, first_seq: u64) -> Result<(), Error> {
        cfg.check()?;
        let shard = cfg.shard;
        let dir = &cfg.dir;
        if base.0 % PAGE_BYTES != 0 || first_seq < FIRST_SEQ {
            return Err(Error::Config {
                shard,
                reason: format!("log start {base} / seq {first_seq} not page aligned / positive"),
            });
        }
        crate::datadir::create_dir_private(dir)
            .map_err(|e| Error::io(shard, "create shard dir", dir, e))?;
        if let Some(parent) = dir.parent() {
            segment::sync_dir(&Disk::Real, shard, parent)?;
        }
        let listing =
            std::fs::read_dir(dir).map_err(|e| Error::io(shard, "list shard dir", dir, e))?;
        for item in listing {
            let item = item.map_err(|e| Error::io(shard, "list shard dir", dir, e))?;
            if item.file_name().to_string_lossy().ends_with(".seg") {
                return Err(Error::Config {
                    shard,
                    reason: format!("{} already holds a log", dir.display()),
                });
            }
        }
        Segment::create(
            &Disk::Real,
            dir,
            shard,
            base.0,
            cfg.segment_bytes,
            first_seq,
            now_ms(),
            false,
            cfg.write_mode,
        )?;
        Ok(())
    }

    /// The shard this log belongs to.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The shard directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sync mode of the active segment.
    pub fn sync_mode(&self) -> SyncMode {
        self.active().mode()
    }

    /// How entries reach the active segment's file: [`WriteMode::Pwrite`],
    /// [`WriteMode::Dsync`] or [`WriteMode::Mmap`] as configured, except that a DAX segment is
    /// always written through its mapping ([`WriteMode::Mmap`]).
    pub fn write_mode(&self) -> WriteMode {
        if self.active().dsync() {
            WriteMode::Dsync
        } else if self.active().by_pwrite() {
            WriteMode::Pwrite
        } else {
            WriteMode::Mmap
        }
    }

    /// Bytes of appended entries not yet written to the segment file (see [`WriteMode::Pwrite`]).
    pub fn staged_bytes(&self) -> usize {
        self.stage.len()
    }

    /// Sequence number the next append will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether a failed sync poisoned the log.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// End of all appended bytes.
    pub fn written(&self) -> LogPos {
        LogPos(self.written)
    }

    /// An entry at position `p` is durable iff `p < durable()`.
    pub fn durable(&self) -> LogPos {
        LogPos(self.durable)
    }

    /// Position of the oldest retained entry slot (the first segment's first entry offset).
    pub fn first_pos(&self) -> LogPos {
        LogPos(self.segments[0].base + SEGMENT_HEADER_BYTES as u64)
    }

    fn active(&self) -> &Segment {
        self.segments.back().expect("a log always has a segment")
    }

    fn poisoned_err(&self) -> Error {
        Error::Poisoned { shard: self.shard }
    }

    /// Appends one heartbeat whose device's previous entry is `prev` (from the caller's index), and
    /// returns the new entry's position. The heartbeat is validated first; nothing is written on
    /// any error. Not durable until a commit covers it.
    pub fn append(&mut self, hb: &Heartbeat, prev: Option<LogPos>) -> Result<LogPos, Error> {
        self.append_seq(hb, None, prev)
    }

    /// [`Log::append`] of a heartbeat sent with a device-scoped sequence `dseq`, stored in the
    /// entry's trailer (flag `record::ENTRY_FLAG_DEVICE_SEQ`) so recovery can rebuild the device's
    /// high-water mark.
    pub fn append_seq(
        &mut self,
        hb: &Heartbeat,
        dseq: Option<DeviceSeq>,
        prev: Option<LogPos>,
    ) -> Result<LogPos, Error> {
        debug_assert!(self.durable <= self.written, "durable past written");
        debug_assert_eq!(
            self.written,
            self.active().base + self.active().data_end,
            "written is the active segment's data end"
        );
        if self.poisoned {
            return Err(self.poisoned_err());
        }
        hb.validate().map_err(|reason| Error::Invalid {
            shard: self.shard,
            reason,
        })?;
        let prev_raw = match prev {
            Some(p) => {
                assert!(p.0 < self.written, "prev {p} is not an earlier entry");
                p.0
            }
            None => POS_NONE,
        };
        encode(&mut self.arena, &mut self.scratch, hb);
        let flags = match dseq {
            Some(d) => {
                self.scratch.extend_from_slice(&d.trailer());
                ENTRY_FLAG_DEVICE_SEQ
            }
            None => 0,
        };
        let len = self.scratch.len();
        if len > ENTRY_PAYLOAD_BYTES_MAX {
            return Err(Error::TooLarge {
                shard: self.shard,
                payload_bytes: len,
            });
        }
        let total = entry_bytes(len) as u64;
        {
            let seg = self.active();
            if seg.data_end + total > seg.bytes {
                self.roll_over()?;
            }
        }
        if self.active().by_pwrite() && self.stage.len() + total as usize > LOG_STAGE_BYTES_MAX {
            // The stage never grows past its allocation: write it out first (an error leaves
            // this entry unwritten and the position where it was).
            self.write_stage()?;
        }
        let hash_low = route::device_hash(&hb.device_id);
        let seg = self
            .segments
            .back_mut()
            .expect("a log always has a segment");
        let off = seg.data_end;
        // Paired with `parse_entry`'s bound check at recovery: an entry never crosses its
        // segment's end (the rollover above made room).
        assert!(
            off + total <= seg.bytes,
            "entry {off}+{total} past segment end"
        );
        debug_assert_eq!(off % crate::limits::ENTRY_ALIGN_BYTES as u64, 0);
        if seg.by_pwrite() {
            debug_assert_eq!(
                self.stage_pos + self.stage.len() as u64,
                seg.base + off,
                "the stage ends where the next entry goes"
            );
            let at = self.stage.len();
            // Within the stage's capacity (checked above): no allocation.
            self.stage.resize(at + total as usize, 0);
            write_entry_flagged(
                &mut self.stage[at..],
                self.next_seq,
                prev_raw,
                hash_low,
                flags,
                &self.scratch,
            );
        } else {
            write_entry_flagged(
                &mut seg.data_mut()[off as usize..],
                self.next_seq,
                prev_raw,
                hash_low,
                flags,
                &self.scratch,
            );
        }
        seg.data_end += total;
        self.written = seg.base + seg.data_end;
        if self.stage.is_empty() {
            self.stage_pos = self.written;
        }
        self.next_seq += 1;
        Ok(LogPos(seg.base + off))
    }

    /// Writes the entries appended so far to the segment file now, without making them durable
    /// (a commit does this itself; nothing to do in [`WriteMode::Mmap`] or on DAX). For tools and
    /// tests that look at the files of a log still open, and for a caller that wants the page
    /// cache to hold its appends before it waits. Errors as [`Log::commit_begin`]'s.
    pub fn write_staged(&mut self) -> Result<(), Error> {
        if self.poisoned {
            return Err(self.poisoned_err());
        }
        self.write_stage()
    }

    /// Writes the staged entries to the active segment's file with one `pwrite` (see
    /// [`WriteMode::Pwrite`]). ENOSPC is [`Error::NoSpace`] and keeps them staged (the log is not
    /// poisoned; the next call writes them again); any other failure poisons the log
    /// ([`Error::WriteFailed`]).
    fn write_stage(&mut self) -> Result<(), Error> {
        if self.stage.is_empty() {
            return Ok(());
        }
        let shard = self.shard;
        let seg = self
            .segments
            .back_mut()
            .expect("a log always has a segment");
        // The stage's invariant: it holds exactly the active segment's last, unwritten bytes.
        assert!(
            seg.by_pwrite(),
            "only a segment written with pwrite is staged"
        );
        assert_eq!(
            self.stage_pos + self.stage.len() as u64,
            self.written,
            "the stage ends at written"
        );
        assert!(
            self.stage_pos >= seg.base + SEGMENT_HEADER_BYTES as u64
                && self.durable <= self.stage_pos
        );
        match seg.write_at(self.stage_pos - seg.base, &self.stage) {
            Ok(()) => {
                self.stage.clear();
                self.stage_pos = self.written;
                Ok(())
            }
            Err(source) if source.raw_os_error() == Some(libc::ENOSPC) => Err(Error::NoSpace {
                op: "write entries to",
                shard,
                path: seg.path.clone(),
                bytes: self.stage.len() as u64,
                source,
            }),
            Err(source) => {
                self.poisoned = true;
                tracing::error!(shard = shard.0, path = %seg.path.display(), error = %source, "write of log entries failed; log poisoned");
                Err(Error::WriteFailed {
                    shard,
                    path: seg.path.clone(),
                    source,
                })
            }
        }
    }

    /// Seals the active segment (makes it durable) and creates its successor. On failure nothing
    /// changes except that the old segment is durable; a failed sync poisons the log.
    fn roll_over(&mut self) -> Result<(), Error> {
        if self.segments.len() >= LOG_SEGMENTS_MAX {
            return Err(Error::TooManySegments {
                shard: self.shard,
                segments: self.segments.len(),
            });
        }
        // The sealed segment must hold every byte appended to it (readers of sealed files, and
        // recovery's "a segment with a successor is complete", depend on it).
        self.write_stage()?;
        let shard = self.shard;
        let old = self
            .segments
            .back_mut()
            .expect("a log always has a segment");
        if old.base + old.data_end > self.durable {
            let (start, end) = (old.flushed, old.data_end);
            if let Err(source) = old.sync_range(start, end) {
                self.poisoned = true;
                tracing::error!(shard = shard.0, path = %old.path.display(), error = %source, "sync at rollover failed; log poisoned");
                return Err(Error::SyncFailed {
                    shard,
                    path: old.path.clone(),
                    source,
                });
            }
            self.durable = self.durable.max(old.base + old.data_end);
        }
        let base = old.end();
        let prepared = self.take_spare(base)?;
        let new = Segment::create(
            &self.disk,
            &self.dir,
            shard,
            base,
            self.segment_bytes,
            self.next_seq,
            now_ms(),
            prepared,
            self.write_mode,
        )?;
        tracing::debug!(shard = shard.0, base, mode = %new.mode(), "new log segment");
        let old = self
            .segments
            .back_mut()
            .expect("a log always has a segment");
        // The log's invariants: positions are contiguous across segments, and a segment that
        // gets a successor is complete and durable.
        assert_eq!(new.base, old.end(), "segments are contiguous");
        assert!(
            self.durable >= old.base + old.data_end,
            "a sealed segment is durable"
        );
        assert_eq!(
            new.first_seq, self.next_seq,
            "sequence numbers are contiguous"
        );
        old.close_files();
        self.segments.push_back(new);
        debug_assert!(self.stage.is_empty(), "written out above");
        // The new segment's first entry (the append that rolled over sets `written` there).
        self.stage_pos = self.active().base + SEGMENT_HEADER_BYTES as u64;
        self.spare = spawn_spare(
            &self.disk,
            shard,
            &self.dir,
            self.active().end(),
            self.segment_bytes,
        );
        Ok(())
    }

    /// Waits for the spare segment (normally long finished: it had a whole segment's worth of
    /// appends to get ready) and says whether `<base>.seg.tmp` is prepared for this rollover.
    /// A spare that ran out of space is [`Error::NoSpace`], like an inline preallocation.
    fn take_spare(&mut self, base: u64) -> Result<bool, Error> {
        let Some(spare) = self.spare.take() else {
            return Ok(false);
        };
        let fits = spare.base == base && spare.bytes == self.segment_bytes;
        match spare.thread.join() {
            Ok(Ok(())) if fits => Ok(true),
            Ok(Ok(())) => Ok(false),
            Ok(Err(source)) if source.raw_os_error() == Some(libc::ENOSPC) => Err(Error::NoSpace {
                op: "preallocate",
                shard: self.shard,
                path: self.dir.join(format::segment_file_name(spare.base)),
                bytes: spare.bytes,
                source,
            }),
            Ok(Err(e)) => {
                tracing::warn!(shard = self.shard.0, error = %e, "preparing the spare segment failed; zero-filling inline");
                Ok(false)
            }
            Err(_) => Ok(false),
        }
    }

    /// Starts a commit of everything written so far. DAX segments are flushed inline; for the
    /// others a [`SyncJob`] is returned to be run (possibly asynchronously) and handed back to
    /// [`Log::commit_end`]. Appends may continue meanwhile. Panics if a job is already in flight.
    pub fn commit_begin(&mut self) -> Result<Commit, Error> {
        assert!(!self.job_in_flight, "only one sync job may be in flight");
        debug_assert!(self.durable <= self.written, "durable past written");
        if self.poisoned {
            return Err(self.poisoned_err());
        }
        if self.written == self.durable {
            return Ok(Commit::Idle);
        }
        if self.active().dsync() {
            return self.dsync_job();
        }
        // One pwrite for the whole group, then the job's fdatasync covers it.
        self.write_stage()?;
        let mut files = Vec::new();
        for seg in self.segments.iter_mut().rev() {
            if seg.base + seg.data_end <= self.durable {
                break;
            }
            if !seg.dax_flush_dirty() {
                let file = seg
                    .file
                    .as_ref()
                    .expect("a segment with unsynced bytes keeps its file open");
                let sync_file = file
                    .sync_file(&seg.path, LogPos(seg.base))
                    .map_err(|e| Error::io(self.shard, "dup segment fd", &seg.path, e))?;
                files.push(sync_file);
            }
        }
        if files.is_empty() {
            self.check_directory()?;
            self.durable = self.written;
            return Ok(Commit::Done(LogPos(self.durable)));
        }
        self.job_in_flight = true;
        Ok(Commit::Sync(SyncJob {
            target: LogPos(self.written),
            files,
            write: None,
        }))
    }

    /// [`WriteMode::Dsync`]'s commit: a job carrying a copy of every byte from the durable
    /// position (or the active segment's first entry) to `written`, to be written on the
    /// segment's `O_DSYNC` descriptor. The bytes are copied, not moved: the stage keeps them
    /// (the log's own reads take them from there) until `commit_end` knows they are in the file.
    /// Bytes a full stage already wrote to the page cache (not durable) come from the mapping,
    /// which shows them; writing them again is what makes them durable.
    fn dsync_job(&mut self) -> Result<Commit, Error> {
        let seg = self.active();
        let first = seg.base + SEGMENT_HEADER_BYTES as u64;
        // A rollover made its segment durable, so everything not yet durable is in the active
        // segment; the stage holds its last bytes and starts at or after the durable position.
        // (Retention may have deleted the sealed segments since: then there is nothing to check.)
        assert!(
            self.durable >= seg.base
                || self.sealed_data_end().is_none_or(|end| end <= self.durable),
            "bytes of a sealed segment are not durable"
        );
        let from = self.durable.max(first);
        assert!(
            from <= self.stage_pos && self.stage_pos <= self.written,
            "durable {from} / stage {} / written {}",
            self.stage_pos,
            self.written
        );
        let mut bytes = Vec::with_capacity((self.written - from) as usize);
        bytes.extend_from_slice(
            &seg.data()[(from - seg.base) as usize..(self.stage_pos - seg.base) as usize],
        );
        bytes.extend_from_slice(&self.stage);
        debug_assert_eq!(bytes.len() as u64, self.written - from);
        let target = seg
            .dsync_target()
            .map_err(|e| Error::io(self.shard, "dup segment fd", &seg.path, e))?;
        let write = DsyncWrite::new(
            target,
            seg.path.clone(),
            LogPos(seg.base),
            from - seg.base,
            bytes,
        );
        self.job_in_flight = true;
        Ok(Commit::Sync(SyncJob {
            target: LogPos(self.written),
            files: Vec::new(),
            write: Some(write),
        }))
    }

    /// The end of the data of the newest sealed segment (the durable position its rollover
    /// left), if one is retained.
    fn sealed_data_end(&self) -> Option<u64> {
        let n = self.segments.len();
        (n >= 2).then(|| {
            let prev = &self.segments[n - 2];
            prev.base + prev.data_end
        })
    }

    /// Finishes a commit with the outcome of running `job`. On success the durable position moves
    /// to the job's target and is returned. On failure the log is poisoned: every later append or
    /// commit returns [`Error::Poisoned`] (a failed fdatasync may have dropped the dirty pages, so
    /// retrying could report data durable that is not).
    pub fn commit_end(&mut self, job: SyncJob, res: std::io::Result<()>) -> Result<LogPos, Error> {
        assert!(self.job_in_flight, "commit_end without a job in flight");
        assert!(
            job.target.0 <= self.written,
            "sync job does not belong to this log"
        );
        self.job_in_flight = false;
        if self.poisoned {
            return Err(self.poisoned_err());
        }
        if let Err(source) = res {
            let path = job.first_path();
            if job.write.is_some() && source.raw_os_error() == Some(libc::ENOSPC) {
                // An `O_DSYNC` write of the group found no space (a copy-on-write file system):
                // nothing of it is reported durable, the stage still holds it, and the next
                // commit writes the same bytes again (as `write_stage` keeps them on ENOSPC).
                return Err(Error::NoSpace {
                    op: "write entries to",
                    shard: self.shard,
                    path,
                    bytes: job.target.0.saturating_sub(self.durable),
                    source,
                });
            }
            self.poisoned = true;
            tracing::error!(shard = self.shard.0, path = %path.display(), error = %source, "log sync failed; log poisoned");
            return Err(Error::SyncFailed {
                shard: self.shard,
                path,
                source,
            });
        }
        self.check_directory()?;
        self.durable = self.durable.max(job.target.0);
        if job.write.is_some() && self.durable > self.stage_pos {
            // The `O_DSYNC` write put the stage's first bytes in the file: drop them from the
            // stage (a rollover since the job began wrote the whole stage out already, and then
            // `stage_pos` is past the target).
            let n = (self.durable - self.stage_pos) as usize;
            assert!(
                n <= self.stage.len(),
                "a dsync job writes only staged or written bytes"
            );
            let len = self.stage.len();
            self.stage.as_mut_slice().copy_within(n..len, 0);
            // Shrinks, never reallocates.
            self.stage.resize(len - n, 0);
            self.stage_pos = self.durable;
        }
        debug_assert!(self.durable <= self.written, "durable past written");
        debug_assert!(
            self.durable <= self.stage_pos,
            "durable past the written-out bytes"
        );
        Ok(LogPos(self.durable))
    }

    /// Checks that the shard directory is still the one this log opened (its `LOCK` file is the
    /// one this process holds). A synced file in a removed directory is durable nowhere a restart
    /// would look, so if the directory was removed or replaced the log is poisoned and nothing
    /// more is reported durable: one `stat` per commit.
    /// See: issue 20 §1 (`rm -rf` of the data directory while serving).
    fn check_directory(&mut self) -> Result<(), Error> {
        use std::os::unix::fs::MetadataExt;
        let Some(identity) = self.lock_identity else {
            // A simulated disk: no lock file, nothing can remove the directory.
            return Ok(());
        };
        let path = self.dir.join(LOCK_FILE);
        let same = match std::fs::metadata(&path) {
            Ok(m) => (m.dev(), m.ino()) == identity,
            Err(_) => false,
        };
        if same {
            return Ok(());
        }
        self.poisoned = true;
        tracing::error!(shard = self.shard.0, dir = %self.dir.display(), "shard directory removed or replaced while in use; log poisoned, no more acknowledgements");
        Err(Error::DirectoryGone {
            shard: self.shard,
            path: self.dir.clone(),
        })
    }

    /// Commits synchronously on this thread (`commit_begin`, `fdatasync`, `commit_end`): for tests
    /// and tools. Panics if a job is in flight.
    pub fn sync_blocking(&mut self) -> Result<LogPos, Error> {
        match self.commit_begin()? {
            Commit::Idle => Ok(LogPos(self.durable)),
            Commit::Done(pos) => Ok(pos),
            Commit::Sync(job) => {
                let res = job.run_blocking();
                self.commit_end(job, res)
            }
        }
    }

    fn segment_index(&self, pos: u64) -> Option<usize> {
        let i = self.segments.partition_point(|s| s.base <= pos);
        if i == 0 || pos >= self.segments[i - 1].end() {
            None
        } else {
            Some(i - 1)
        }
    }

    /// The bytes holding offset `off` of segment `index` onward, and the position of their first
    /// byte: the stage for staged positions of the active segment, else the mapping.
    #[inline]
    fn bytes_at(&self, index: usize, off: u64) -> (&[u8], u64) {
        let seg = &self.segments[index];
        if seg.base + off >= self.stage_pos
            && !self.stage.is_empty()
            && index + 1 == self.segments.len()
        {
            (&self.stage[..], self.stage_pos)
        } else {
            (seg.data(), seg.base)
        }
    }

    /// The entry at offset `off` of segment `index`, validated (from the stage if staged).
    fn entry_in(&self, index: usize, off: u64) -> Option<Entry<'_>> {
        let (data, base) = self.bytes_at(index, off);
        let pos = self.segments[index].base + off;
        decode_entry(data, base, pos - base).ok()
    }

    /// The entry at `pos`, validated (CRC, then rkyv + record rules); `None` if `pos` is not an
    /// entry of a retained segment.
    pub fn read(&self, pos: LogPos) -> Option<Entry<'_>> {
        let index = self.segment_index(pos.0)?;
        let seg = &self.segments[index];
        let off = pos.0 - seg.base;
        if off < SEGMENT_HEADER_BYTES as u64
            || off % crate::limits::ENTRY_ALIGN_BYTES as u64 != 0
            || off >= seg.data_end
        {
            return None;
        }
        self.entry_in(index, off)
    }

    /// Like [`Log::read`], also returning the entry's bytes exactly as stored (header, payload,
    /// padding), e.g. to copy them into the last-location checkpoint.
    pub fn read_raw(&self, pos: LogPos) -> Option<(Entry<'_>, &[u8])> {
        let e = self.read(pos)?;
        let index = self.segment_index(pos.0)?;
        let (data, base) = self.bytes_at(index, pos.0 - self.segments[index].base);
        let off = (pos.0 - base) as usize;
        Some((e, &data[off..off + e.len_bytes as usize]))
    }

    /// Walks one device's entries newest first, starting at `head` and following back-pointers
    /// across segments. Stops cleanly at a deleted segment, a damaged entry, or an entry of another
    /// device.
    pub fn chain(&self, head: LogPos) -> Chain<'_> {
        Chain {
            log: self,
            next: Some(head),
            device_hash_low: None,
        }
    }

    /// Iterates entries in log order from `pos` (an entry position, or any position inside a
    /// segment header, meaning that segment's first entry; positions before the oldest retained
    /// segment start at the oldest entry) up to `end`.
    pub fn scan_from(&self, pos: LogPos, end: ScanEnd) -> Scan<'_> {
        let limit = match end {
            ScanEnd::Written => self.written,
            ScanEnd::Durable => self.durable,
        };
        let header = SEGMENT_HEADER_BYTES as u64;
        let (seg_index, off) = if pos.0 < self.segments[0].base {
            (0, header)
        } else {
            match self.segment_index(pos.0) {
                Some(i) => (i, (pos.0 - self.segments[i].base).max(header)),
                // Past the last segment: nothing to read yet.
                None => (self.segments.len() - 1, self.active().bytes),
            }
        };
        Scan {
            log: self,
            seg_index,
            off,
            limit,
            damaged: false,
        }
    }

    /// Registers a consumer (e.g. the storage flusher) that must have consumed a segment before
    /// retention may delete it. It starts at position 0 (nothing consumed). Registering an existing
    /// name keeps its position.
    pub fn register_consumer(&mut self, name: &str) -> Result<(), Error> {
        if self.consumers.iter().any(|c| c.name == name) {
            return Ok(());
        }
        let reason = if name.is_empty() {
            Some("empty name")
        } else if name.len() > LOG_CONSUMER_NAME_BYTES_MAX {
            Some("name too long")
        } else if self.consumers.len() >= LOG_CONSUMERS_MAX {
            Some("too many consumers")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(Error::Consumer {
                shard: self.shard,
                name: name.to_string(),
                reason,
            });
        }
        self.consumers.push(Consumer {
            name: name.to_string(),
            upto: LogPos(0),
        });
        Ok(())
    }

    /// Removes a consumer; returns whether it existed.
    pub fn unregister_consumer(&mut self, name: &str) -> bool {
        let before = self.consumers.len();
        self.consumers.retain(|c| c.name != name);
        before != self.consumers.len()
    }

    /// Records that consumer `name` has consumed everything before `upto`. Positions only move
    /// forward (a smaller value is ignored). Persisting it is the caller's business.
    pub fn set_consumed(&mut self, name: &str, upto: LogPos) -> Result<(), Error> {
        match self.consumers.iter_mut().find(|c| c.name == name) {
            Some(c) => {
                c.upto = c.upto.max(upto);
                Ok(())
            }
            None => Err(Error::UnknownConsumer {
                shard: self.shard,
                name: name.to_string(),
            }),
        }
    }

    /// Consumer `name`'s position, if registered.
    pub fn consumed(&self, name: &str) -> Option<LogPos> {
        self.consumers
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.upto)
    }

    /// Deletes sealed segments, oldest first, that were sealed more than `retention` before `now`
    /// (a segment counts as sealed when its successor was created) and that every registered
    /// consumer has consumed completely. Returns the number deleted. The active segment is never
    /// deleted. (`expired_end` then `delete_below`.)
    pub fn delete_expired(&mut self, now: SystemTime, retention: Duration) -> Result<usize, Error> {
        match self.expired_end(now, retention) {
            Some(end) => self.delete_below(end),
            None => Ok(0),
        }
    }

    /// Where the log would start after retention at `now`: the base of the oldest segment
    /// `delete_expired` would keep, or `None` if it would delete nothing. Deletes nothing.
    pub fn expired_end(&self, now: SystemTime, retention: Duration) -> Option<LogPos> {
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let retention_ms = retention.as_millis().min(i64::MAX as u128) as i64;
        let mut keep = 0;
        while keep + 1 < self.segments.len() {
            let (old, next) = (&self.segments[keep], &self.segments[keep + 1]);
            if now_ms.saturating_sub(next.created_ms) < retention_ms {
                break;
            }
            let data_end = LogPos(old.base + old.data_end);
            if self.consumers.iter().any(|c| c.upto < data_end) {
                break;
            }
            keep += 1;
        }
        (keep > 0).then(|| LogPos(self.segments[keep].base))
    }

    /// The files of the sealed segments holding positions in `from..end`: `(base, path)`, oldest
    /// first. Sealed segments never change, so another thread may map and read them until they
    /// are deleted.
    pub fn sealed_files(&self, from: LogPos, end: LogPos) -> Vec<(LogPos, PathBuf)> {
        let sealed = self.segments.len() - 1;
        self.segments
            .iter()
            .take(sealed)
            .filter(|s| s.end() > from.0 && s.base < end.0)
            .map(|s| (LogPos(s.base), s.path.clone()))
            .collect()
    }

    /// End position of the segment whose base is `base`, if retained.
    pub fn segment_end(&self, base: LogPos) -> Option<LogPos> {
        let s = &self.segments[self.segment_index(base.0)?];
        (s.base == base.0).then(|| LogPos(s.end()))
    }

    /// Deletes the sealed segments that lie wholly below `end` (a segment base), oldest first,
    /// and unmaps them; returns the number deleted. See [`Log::retire_below`].
    pub fn delete_below(&mut self, end: LogPos) -> Result<usize, Error> {
        Ok(self.retire_below(end)?.len())
    }

    /// Deletes the files of the sealed segments that lie wholly below `end` (a segment base),
    /// oldest first, and takes them out of the log; they stay mapped until the returned
    /// [`Retired`] is dropped (unmapping a big resident segment takes milliseconds: a caller
    /// may drop it on another thread). The active segment is never deleted. A file already gone
    /// was deleted (and its directory synced) by another thread that owned the deletion, e.g.
    /// the last-location checkpoint writer: it is only taken out.
    pub fn retire_below(&mut self, end: LogPos) -> Result<Retired, Error> {
        let mut retired = Retired {
            segments: Vec::new(),
        };
        while self.segments.len() > 1 && self.segments[0].end() <= end.0 {
            let path = self.segments[0].path.clone();
            let removed = match self.disk.remove(&path) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(Error::io(self.shard, "delete segment", &path, e)),
            };
            // Its hash-chain sidecar goes with it (the next sidecar records its chain start).
            let sidecar = chain::sidecar_path(&path);
            match self.disk.remove(&sidecar) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(self.shard, "delete chain sidecar", &sidecar, e)),
            }
            retired
                .segments
                .push(self.segments.pop_front().expect("checked above"));
            // Sync after each deletion: if a crash made a later deletion durable but not an
            // earlier one, recovery would see a gap between segments and treat it as damage.
            if removed {
                segment::sync_dir(&self.disk, self.shard, &self.dir)?;
            }
            tracing::info!(shard = self.shard.0, path = %path.display(), "deleted expired log segment");
        }
        assert!(
            !self.segments.is_empty(),
            "the active segment is never retired"
        );
        Ok(retired)
    }

    /// Current counters.
    pub fn stats(&self) -> LogStats {
        LogStats {
            bytes: self.segments.iter().map(|s| s.bytes).sum(),
            segments: self.segments.len(),
            entries: self.next_seq - self.segments[0].first_seq,
            written: LogPos(self.written),
            durable: LogPos(self.durable),
            sync_mode: self.sync_mode(),
        }
    }

    /// Unit tests only: makes the segments that still have an open file use the DAX commit path on
    /// an ordinary mapping (new segments are ordinary again).
    #[cfg(test)]
    fn force_dax_for_test(&mut self) {
        self.write_stage().expect("stage written");
        for seg in self.segments.iter_mut() {
            if seg.file.is_some() {
                seg.force_dax_for_test();
            }
        }
    }
}

/// Segments retention took out of a log, still mapped (see [`Log::retire_below`]); dropping this
/// unmaps them.
pub struct Retired {
    segments: Vec<Segment>,
}

impl Retired {
    /// Number of segments.
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }
}

impl std::fmt::Debug for Retired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retired")
            .field("segments", &self.segments.len())
            .finish()
    }
}

/// Iterator over one device's entries, newest first (see [`Log::chain`]).
#[derive(Debug)]
pub struct Chain<'a> {
    log: &'a Log,
    next: Option<LogPos>,
    device_hash_low: Option<u32>,
}

impl<'a> Iterator for Chain<'a> {
    type Item = Entry<'a>;

    fn next(&mut self) -> Option<Entry<'a>> {
        let pos = self.next.take()?;
        let entry = self.log.read(pos)?;
        match self.device_hash_low {
            Some(h) if h != entry.device_hash_low => return None,
            _ => self.device_hash_low = Some(entry.device_hash_low),
        }
        // Back-pointers always point backwards; anything else is damage and ends the walk.
        self.next = entry.prev.filter(|p| p.0 < pos.0);
        Some(entry)
    }
}

/// Iterator over entries in log order (see [`Log::scan_from`]).
#[derive(Debug)]
pub struct Scan<'a> {
    log: &'a Log,
    seg_index: usize,
    off: u64,
    limit: u64,
    damaged: bool,
}

impl Scan<'_> {
    /// Where to resume a later scan: the position after the last entry returned (normalised to the
    /// next segment's first entry when a sealed segment is exhausted).
    pub fn next_pos(&self) -> LogPos {
        let segs = &self.log.segments;
        let seg = &segs[self.seg_index];
        if self.off >= seg.data_end && self.seg_index + 1 < segs.len() {
            return LogPos(segs[self.seg_index + 1].base + SEGMENT_HEADER_BYTES as u64);
        }
        LogPos(seg.base + self.off)
    }

    /// Whether the scan stopped at an entry that failed validation (or at a position that is not
    /// an entry boundary).
    pub fn hit_damage(&self) -> bool {
        self.damaged
    }
}

impl<'a> Iterator for Scan<'a> {
    type Item = Entry<'a>;

    fn next(&mut self) -> Option<Entry<'a>> {
        let log: &'a Log = self.log;
        let segs = &log.segments;
        loop {
            if self.damaged {
                return None;
            }
            let seg = &segs[self.seg_index];
            if seg.base + self.off >= self.limit {
                return None;
            }
            if self.off >= seg.data_end {
                if self.seg_index + 1 < segs.len() {
                    self.seg_index += 1;
                    self.off = SEGMENT_HEADER_BYTES as u64;
                    continue;
                }
                return None;
            }
            if self.off % crate::limits::ENTRY_ALIGN_BYTES as u64 != 0 {
                self.damaged = true;
                return None;
            }
            return match log.entry_in(self.seg_index, self.off) {
                Some(e) => {
                    self.off += u64::from(e.len_bytes);
                    Some(e)
                }
                None => {
                    self.damaged = true;
                    None
                }
            };
        }
    }
}

#[cfg(test)]
mod tests;
