//! One segment file of a shard log: preparing it (preallocated with `fallocate`, then every byte
//! written with zeros and synced, possibly ahead of time on a helper thread), creating it (header
//! written and synced, then atomically renamed into place), opening an existing one, its shared
//! mapping (DAX; ordinary read-only, written with `pwrite`; or ordinary read-write, per
//! [`WriteMode`]), its second descriptor opened with `O_DSYNC` in [`WriteMode::Dsync`] (handed to
//! commit jobs, never written here), writing bytes into it ([`Segment::write_at`]) and making
//! byte ranges of it durable. It does not decide where entries go, stage them, roll over, or judge damage: that is
//! `Log` and `recovery`.
//!
//! Invariant: a file named `<base>.seg` always has a complete, synced header and is fully
//! allocated *and written* (no unwritten extents), so writing entries (with `pwrite` or through
//! a mapping) needs no allocation, a mapping can never fault for lack of space (a sparse file
//! would SIGBUS on ENOSPC), and an fdatasync of it never depends on converting unwritten extents
//! (which ext4 may fail after reporting success, losing acknowledged data; see issue 20 §2); a
//! segment being created lives under a `.seg.tmp` name until then.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut};

use super::dax::DaxMap;
use super::error::Error;
use super::format::{
    segment_file_name, HeaderFault, SegmentHeader, SEGMENT_SUFFIX, SEGMENT_TMP_SUFFIX,
};
use super::sim::SimMap;
use super::storage::{Disk, SegFile};
use super::sync::DsyncTarget;
use super::{SyncMode, WriteMode};
use crate::limits::{SEGMENT_HEADER_BYTES, SEGMENT_ZERO_FILL_CHUNK_BYTES};
use crate::route::ShardId;

/// The mapping of a segment: DAX (flush with cache-line write-backs) or ordinary (fdatasync).
#[derive(Debug)]
pub(crate) enum Mapping {
    /// Ordinary shared read-only mapping ([`WriteMode::Pwrite`]): bytes reach the file with
    /// `pwrite` (the page cache and a shared mapping are coherent, so reads through it see them
    /// at once), and it is made durable by `fdatasync` on the file.
    Read(Mmap),
    /// Ordinary shared read-write mapping ([`WriteMode::Mmap`]), written in place, made durable
    /// by `fdatasync` on the file.
    Plain(MmapMut),
    /// MAP_SYNC mapping on a DAX file system.
    Dax(DaxMap),
    /// A file of a simulated disk (crash tests), made durable by its simulated fdatasync.
    Sim(SimMap),
}

impl Mapping {
    /// Maps the whole file, DAX if the file system allows it, else as `write_mode` says.
    fn map(file: &SegFile, len: usize, write_mode: WriteMode) -> io::Result<Mapping> {
        let file = match file {
            SegFile::Real(f) => f,
            SegFile::Sim(f) => return f.map(len).map(Mapping::Sim),
        };
        if let Some(dax) = DaxMap::try_map(file, len)? {
            return Ok(Mapping::Dax(dax));
        }
        let map = match write_mode {
            // SAFETY: the segment file is never truncated while mapped (segments are only ever
            // deleted whole, after unmapping) and the shard's LOCK file keeps other processes
            // from writing it; this process writes it only with `pwrite` of bytes past every
            // position a reader was handed out (data once written never changes).
            // (Dsync: the same, the writes being made on the `O_DSYNC` descriptor.)
            WriteMode::Pwrite | WriteMode::Dsync => {
                Mapping::Read(unsafe { memmap2::MmapOptions::new().len(len).map(file)? })
            }
            // SAFETY: as above; every write goes through this mapping.
            WriteMode::Mmap => {
                Mapping::Plain(unsafe { memmap2::MmapOptions::new().len(len).map_mut(file)? })
            }
        };
        Ok(map)
    }

    fn mode(&self) -> SyncMode {
        match self {
            Mapping::Read(_) | Mapping::Plain(_) | Mapping::Sim(_) => SyncMode::Fdatasync,
            Mapping::Dax(_) => SyncMode::Dax,
        }
    }
}

/// Zeros for `pwrite`s of zeros (preallocation, recovery's zeroing): a static buffer (zero pages
/// in .bss), so the spare thread allocates nothing and never shows in the hot path's allocation
/// counts while it runs beside appends.
static ZEROS: [u8; SEGMENT_ZERO_FILL_CHUNK_BYTES] = [0; SEGMENT_ZERO_FILL_CHUNK_BYTES];

/// One mapped segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Global position of the segment's first byte.
    pub base: u64,
    /// Size of the file and the mapping, header included.
    pub bytes: u64,
    /// Path of the file.
    pub path: PathBuf,
    /// Open file, kept while the segment may still need an fdatasync (the active segment); sealed
    /// segments drop it so a long log does not hold thousands of descriptors.
    pub file: Option<SegFile>,
    map: Mapping,
    /// Whether bytes are written to the file with `pwrite` ([`Segment::write_at`]) rather than
    /// into the mapping: a read-only mapping, or a simulated file in [`WriteMode::Pwrite`] or
    /// [`WriteMode::Dsync`].
    by_pwrite: bool,
    /// Whether commits make this segment's bytes durable by a write on an `O_DSYNC` descriptor
    /// ([`WriteMode::Dsync`] on an ordinary or simulated file; never on DAX). Implies `by_pwrite`.
    dsync: bool,
    /// The `O_DSYNC` descriptor of a real file in [`WriteMode::Dsync`] (none on a simulated
    /// disk, whose jobs write and sync the file itself); closed with `file`.
    dsync_file: Option<File>,
    /// Sequence number of the first entry in this segment.
    pub first_seq: u64,
    /// Creation time from the header, ms since the Unix epoch.
    pub created_ms: i64,
    /// Offset just past the last entry (the next entry's offset). Starts at the header size.
    pub data_end: u64,
    /// Offset below which a DAX segment has been flushed (unused in Fdatasync mode).
    pub flushed: u64,
}

/// Result of opening an existing segment file.
pub(crate) enum Opened {
    /// Header valid and consistent with the file name and shard.
    Ok(Segment),
    /// Header damaged or inconsistent: the reason, for the damage report.
    Bad(String),
}

/// fsyncs a directory, making creations, renames and deletions in it durable.
pub(crate) fn sync_dir(disk: &Disk, shard: ShardId, dir: &Path) -> Result<(), Error> {
    disk.sync_dir(dir)
        .map_err(|e| Error::io(shard, "fsync directory", dir, e))
}

/// Allocates `len` bytes of `file` for real and writes them: `fallocate` (mode 0) reserves the
/// blocks first (fails fast with ENOSPC, and gives the file system the whole extent at once; where
/// it has no fallocate this step is skipped), then every byte is written with zeros and the file is
/// fdatasync'ed, so no extent stays "unwritten". ext4 converts unwritten extents to written ones at
/// sync time, and a device error during that conversion was seen to lose data acknowledged by an
/// fdatasync that had returned success; written extents leave the later syncs of this file only
/// data to write. `ftruncate` is never used: it makes a sparse file. Only `from..len` is touched:
/// bytes before `from` (a short file's existing entries) are kept.
fn preallocate(file: &SegFile, from: u64, len: u64) -> io::Result<()> {
    assert!(from <= len, "preallocate {from}..{len}");
    let file = match file {
        SegFile::Real(f) => f,
        SegFile::Sim(f) => {
            f.write_zeros(from, len)?;
            return f.sync_data();
        }
    };
    // SAFETY: plain syscall on a valid fd.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            0,
            from as libc::off_t,
            (len - from) as libc::off_t,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(err);
        }
    }
    use std::os::unix::fs::FileExt;
    let zeros = &ZEROS[..];
    let mut at = from;
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_data()
}

/// Opens the second, `O_DSYNC` descriptor of a segment file written in [`WriteMode::Dsync`]
/// (none in other modes, on DAX, or on a simulated disk). `path` is where the file is now (the
/// descriptor follows the file through its rename).
fn open_dsync(
    file: &SegFile,
    map: &Mapping,
    write_mode: WriteMode,
    path: &Path,
) -> io::Result<Option<File>> {
    if write_mode != WriteMode::Dsync || !matches!(map, Mapping::Read(_)) {
        return Ok(None);
    }
    match file {
        SegFile::Real(_) => {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DSYNC)
                .open(path)
                .map(Some)
        }
        SegFile::Sim(_) => Ok(None),
    }
}

/// Prepares `<dir>/<base>.seg.tmp` ahead of use: created, preallocated, zero-filled and synced
/// (see [`preallocate`]), without a header. Meant for a helper thread, so the shard's executor
/// never writes a whole segment of zeros on the ack path; [`Segment::create`] with
/// `prepared = true` then only writes the header and renames. On failure the file is removed.
pub(crate) fn prepare_spare(disk: &Disk, dir: &Path, base: u64, bytes: u64) -> io::Result<()> {
    let tmp = tmp_path(dir, base);
    let result = disk
        .open(&tmp, true, true)
        .and_then(|file| preallocate(&file, 0, bytes));
    if result.is_err() {
        let _ = disk.remove(&tmp);
    }
    result
}

/// `<dir>/<base>.seg.tmp`: where a segment lives until its header is synced.
pub(crate) fn tmp_path(dir: &Path, base: u64) -> PathBuf {
    let name = segment_file_name(base);
    let stem = name
        .strip_suffix(SEGMENT_SUFFIX)
        .expect("segment names end in .seg");
    dir.join(format!("{stem}{SEGMENT_TMP_SUFFIX}"))
}

impl Segment {
    /// Creates `<dir>/<base>.seg`: a `.seg.tmp` file is preallocated and zero-filled (unless
    /// `prepared`: [`prepare_spare`] already did that for this base and size), mapped, given its
    /// header and synced, then renamed into place and the directory synced. On any failure the
    /// temporary file is removed and nothing else changed; ENOSPC is reported as
    /// [`Error::NoSpace`].
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        disk: &Disk,
        dir: &Path,
        shard: ShardId,
        base: u64,
        bytes: u64,
        first_seq: u64,
        created_ms: i64,
        prepared: bool,
        write_mode: WriteMode,
    ) -> Result<Segment, Error> {
        let path = dir.join(segment_file_name(base));
        let tmp = tmp_path(dir, base);
        let result = Self::create_at(
            disk, &tmp, &path, dir, shard, base, bytes, first_seq, created_ms, prepared, write_mode,
        );
        match result {
            Ok(seg) => Ok(seg),
            Err(err) => {
                let _ = disk.remove(&tmp);
                // Running out of space anywhere in creation (e.g. a new directory block for the
                // rename) is the same operating condition as failing to preallocate.
                Err(match err {
                    Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                        Error::NoSpace {
                            op: "preallocate",
                            shard,
                            path,
                            bytes,
                            source,
                        }
                    }
                    other => other,
                })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create_at(
        disk: &Disk,
        tmp: &Path,
        path: &Path,
        dir: &Path,
        shard: ShardId,
        base: u64,
        bytes: u64,
        first_seq: u64,
        created_ms: i64,
        prepared: bool,
        write_mode: WriteMode,
    ) -> Result<Segment, Error> {
        let file = disk
            .open(tmp, true, !prepared)
            .map_err(|e| Error::io(shard, "create segment", tmp, e))?;
        let ready = prepared
            && file
                .len()
                .map_err(|e| Error::io(shard, "stat prepared segment", tmp, e))?
                == bytes;
        if !ready {
            // Not prepared, or not as prepared (something else touched it): start over.
            file.set_len(0)
                .map_err(|e| Error::io(shard, "truncate segment", tmp, e))?;
        }
        if ready {
            // Zero-filled and synced ahead of time by `prepare_spare`.
        } else if let Err(source) = preallocate(&file, 0, bytes) {
            return Err(if source.raw_os_error() == Some(libc::ENOSPC) {
                Error::NoSpace {
                    op: "preallocate",
                    shard,
                    path: path.to_path_buf(),
                    bytes,
                    source,
                }
            } else {
                Error::io(shard, "fallocate segment", tmp, source)
            });
        }
        let map = Mapping::map(&file, bytes as usize, write_mode)
            .map_err(|e| Error::io(shard, "mmap segment", tmp, e))?;
        let header = SegmentHeader {
            shard: shard.0,
            base,
            segment_bytes: bytes,
            first_seq,
            created_ms,
        };
        let dsync_file = open_dsync(&file, &map, write_mode, tmp)
            .map_err(|e| Error::io(shard, "open segment O_DSYNC", tmp, e))?;
        let mut seg = Segment::new(
            base, bytes, path, file, dsync_file, map, write_mode, first_seq, created_ms,
        );
        let mut head = [0u8; SEGMENT_HEADER_BYTES];
        header.encode(&mut head);
        seg.write_at(0, &head)
            .map_err(|e| Error::io(shard, "write segment header", tmp, e))?;
        seg.sync_range(0, SEGMENT_HEADER_BYTES as u64)
            .map_err(|e| Error::io(shard, "sync segment header", tmp, e))?;
        disk.rename(tmp, path)
            .map_err(|e| Error::io(shard, "rename segment", tmp, e))?;
        sync_dir(disk, shard, dir)?;
        Ok(seg)
    }

    /// Opens and maps an existing segment whose name says it starts at `base`. A short file (which
    /// only outside interference can produce) is extended with zeros to its recorded size so the
    /// mapping never reaches past the end of the file.
    pub fn open(
        disk: &Disk,
        path: &Path,
        shard: ShardId,
        base: u64,
        write_mode: WriteMode,
    ) -> Result<Opened, Error> {
        let file = disk
            .open(path, false, false)
            .map_err(|e| Error::io(shard, "open segment", path, e))?;
        let file_len = file
            .len()
            .map_err(|e| Error::io(shard, "stat segment", path, e))?;
        let mut head = vec![0u8; SEGMENT_HEADER_BYTES];
        {
            if file_len < SEGMENT_HEADER_BYTES as u64 {
                return Ok(Opened::Bad(HeaderFault::Short.to_string()));
            }
            file.read_exact_at(&mut head, 0)
                .map_err(|e| Error::io(shard, "read segment header", path, e))?;
        }
        let header = match SegmentHeader::decode(&head) {
            Ok(h) => h,
            Err(fault) => return Ok(Opened::Bad(fault.to_string())),
        };
        if header.shard != shard.0 {
            return Ok(Opened::Bad(format!(
                "header says shard {}, expected {shard}",
                header.shard
            )));
        }
        if header.base != base {
            return Ok(Opened::Bad(format!(
                "header says base {}, file name says {base}",
                header.base
            )));
        }
        if header.segment_bytes > crate::limits::SEGMENT_BYTES_MAX {
            return Ok(Opened::Bad(format!(
                "segment size {} above the maximum",
                header.segment_bytes
            )));
        }
        if file_len < header.segment_bytes {
            tracing::warn!(
                shard = shard.0,
                path = %path.display(),
                file_len,
                segment_bytes = header.segment_bytes,
                "segment file shorter than its header says; extending with zeros"
            );
            preallocate(&file, file_len, header.segment_bytes)
                .map_err(|e| Error::io(shard, "extend short segment", path, e))?;
        }
        let map = Mapping::map(&file, header.segment_bytes as usize, write_mode)
            .map_err(|e| Error::io(shard, "mmap segment", path, e))?;
        let dsync_file = open_dsync(&file, &map, write_mode, path)
            .map_err(|e| Error::io(shard, "open segment O_DSYNC", path, e))?;
        Ok(Opened::Ok(Segment::new(
            base,
            header.segment_bytes,
            path,
            file,
            dsync_file,
            map,
            write_mode,
            header.first_seq,
            header.created_ms,
        )))
    }

    /// A segment with no entries yet (`data_end` at the header's end).
    #[allow(clippy::too_many_arguments)]
    fn new(
        base: u64,
        bytes: u64,
        path: &Path,
        file: SegFile,
        dsync_file: Option<File>,
        map: Mapping,
        write_mode: WriteMode,
        first_seq: u64,
        created_ms: i64,
    ) -> Segment {
        let by_pwrite = match map {
            Mapping::Read(_) => true,
            Mapping::Sim(_) => matches!(write_mode, WriteMode::Pwrite | WriteMode::Dsync),
            Mapping::Plain(_) | Mapping::Dax(_) => false,
        };
        let dsync = by_pwrite && write_mode == WriteMode::Dsync;
        Segment {
            base,
            bytes,
            path: path.to_path_buf(),
            file: Some(file),
            map,
            by_pwrite,
            dsync,
            dsync_file,
            first_seq,
            created_ms,
            data_end: SEGMENT_HEADER_BYTES as u64,
            flushed: SEGMENT_HEADER_BYTES as u64,
        }
    }

    /// Whether bytes reach this segment's file with `pwrite` (then the log stages entries and
    /// writes them in batches), rather than by writing into the mapping.
    #[inline]
    pub fn by_pwrite(&self) -> bool {
        self.by_pwrite
    }

    /// Whether commits write this segment's groups on an `O_DSYNC` descriptor
    /// ([`WriteMode::Dsync`]) instead of syncing the file.
    #[inline]
    pub fn dsync(&self) -> bool {
        self.dsync
    }

    /// Where a commit job writes this segment's group durably: a duplicate of the `O_DSYNC`
    /// descriptor (real disk) or the simulated file (written, then synced). Only for a segment
    /// in [`WriteMode::Dsync`] that still has its files open.
    pub fn dsync_target(&self) -> io::Result<DsyncTarget> {
        assert!(self.dsync, "only a dsync segment has an O_DSYNC target");
        if let Some(f) = &self.dsync_file {
            use std::os::fd::AsFd;
            return Ok(DsyncTarget::Fd(f.as_fd().try_clone_to_owned()?));
        }
        match self.file.as_ref() {
            Some(SegFile::Sim(f)) => Ok(DsyncTarget::Sim(f.clone())),
            _ => unreachable!("a dsync segment being committed keeps its files open"),
        }
    }

    /// Closes the descriptors of a sealed segment (its mapping stays): a long log does not hold
    /// thousands of them.
    pub fn close_files(&mut self) {
        self.file = None;
        self.dsync_file = None;
    }

    /// Writes `bytes` at offset `off`: with `pwrite` on the file (a short write is continued; an
    /// error leaves an unknown prefix written, which a retry of the same bytes overwrites), or
    /// into the mapping. Not durable until [`Segment::sync_range`] or a commit covers it.
    pub fn write_at(&mut self, off: u64, bytes: &[u8]) -> io::Result<()> {
        let end = off + bytes.len() as u64;
        assert!(
            end <= self.bytes,
            "write of {off}..{end} past the segment's end"
        );
        if self.by_pwrite {
            return self
                .file
                .as_ref()
                .expect("a segment being written keeps its file open")
                .write_all_at(bytes, off);
        }
        self.data_mut()[off as usize..end as usize].copy_from_slice(bytes);
        Ok(())
    }

    /// Writes zeros over `[start, end)` (recovery's repair of a torn or damaged tail).
    pub fn write_zeros(&mut self, start: u64, end: u64) -> io::Result<()> {
        assert!(start <= end && end <= self.bytes, "zeroing {start}..{end}");
        if !self.by_pwrite {
            self.data_mut()[start as usize..end as usize].fill(0);
            return Ok(());
        }
        let mut at = start;
        while at < end {
            let n = (end - at).min(ZEROS.len() as u64) as usize;
            self.write_at(at, &ZEROS[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// How this segment is made durable.
    pub fn mode(&self) -> SyncMode {
        self.map.mode()
    }

    /// Global position one past the segment's last byte (the next segment's base).
    pub fn end(&self) -> u64 {
        self.base + self.bytes
    }

    /// The mapped segment bytes.
    #[inline]
    pub fn data(&self) -> &[u8] {
        match &self.map {
            Mapping::Read(m) => &m[..],
            Mapping::Plain(m) => &m[..],
            Mapping::Dax(d) => d.as_slice(),
            Mapping::Sim(m) => m.as_slice(),
        }
    }

    /// The mapped segment bytes, writable (not for a segment written with `pwrite`).
    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        match &mut self.map {
            Mapping::Read(_) => unreachable!("a read-only mapping is written with pwrite"),
            Mapping::Plain(m) => &mut m[..],
            Mapping::Dax(d) => d.as_mut_slice(),
            Mapping::Sim(m) => m.as_mut_slice(),
        }
    }

    /// Asks the kernel to read the whole segment ahead (recovery is about to scan it): turns the
    /// 4 KiB page faults of a cold scan into large sequential reads. Advisory; failures ignored.
    pub fn prefetch(&self) {
        match &self.map {
            Mapping::Read(m) => {
                let _ = m.advise(memmap2::Advice::WillNeed);
            }
            Mapping::Plain(m) => {
                let _ = m.advise(memmap2::Advice::WillNeed);
            }
            Mapping::Dax(_) | Mapping::Sim(_) => {}
        }
    }

    /// Makes bytes `[start, end)` durable: a cache-line flush in DAX mode, else an fdatasync of the
    /// whole file (the kernel writes back the mapping's dirty pages).
    pub fn sync_range(&mut self, start: u64, end: u64) -> io::Result<()> {
        debug_assert!(start <= end && end <= self.bytes, "sync of {start}..{end}");
        match &self.map {
            Mapping::Dax(d) => {
                d.flush(start as usize, end as usize);
                self.flushed = self.flushed.max(end);
                Ok(())
            }
            Mapping::Read(_) | Mapping::Plain(_) | Mapping::Sim(_) => {
                let file = self
                    .file
                    .as_ref()
                    .expect("a segment that may need a sync keeps its file open");
                file.sync_data()
            }
        }
    }

    /// DAX only: flushes everything written since the last flush. Returns false in Fdatasync mode
    /// (the caller must fdatasync instead).
    pub fn dax_flush_dirty(&mut self) -> bool {
        match &self.map {
            Mapping::Dax(d) => {
                if self.flushed < self.data_end {
                    d.flush(self.flushed as usize, self.data_end as usize);
                    self.flushed = self.data_end;
                }
                true
            }
            Mapping::Read(_) | Mapping::Plain(_) | Mapping::Sim(_) => false,
        }
    }

    /// Pretends this segment is on a DAX device (tests of the commit state machine only): commits
    /// become cache-line flushes of an ordinary mapping, which run but are not durable.
    #[cfg(test)]
    pub fn force_dax_for_test(&mut self) {
        let file = self
            .file
            .as_ref()
            .and_then(SegFile::real)
            .expect("real file open");
        // SAFETY: see `Mapping::map`; this only runs in unit tests on private temp files.
        let len = self.bytes as usize;
        let fake = unsafe { DaxMap::fake_from_file(file, len) };
        self.map = Mapping::Dax(fake);
        self.by_pwrite = false;
        self.dsync = false;
        self.dsync_file = None;
    }
}
