//! Asynchronous durability for the Fdatasync mode: the [`SyncJob`] a log hands out from
//! `commit_begin` (dup'ed descriptors of the segments with unsynced bytes plus the position that
//! becomes durable when they are synced; in `WriteMode::Dsync` instead one [`DsyncWrite`]: the
//! group's bytes, to be written on an `O_DSYNC` descriptor), the [`Commit`] outcome, and
//! [`UringSyncer`], a small io_uring that runs the fdatasyncs (or the `O_DSYNC` write) while the
//! caller keeps appending. It does not touch the log's state: only `Log::commit_end` turns a
//! finished job into a new durable position.
//!
//! Invariant: a job's target is the log's written position when the job was made, and either
//! every segment holding bytes below it that were not yet durable has a descriptor in the job
//! (syncing all of them, whole files, makes everything below the target durable), or the job's
//! [`DsyncWrite`] holds every byte from the durable position (or its segment's first entry) up
//! to the target, all in one segment, so writing them with `O_DSYNC` makes them durable.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};

use super::sim::SimFile;
use super::LogPos;
use crate::limits::SYNC_RING_ENTRIES;

/// One segment file a [`SyncJob`] must fdatasync.
#[derive(Debug)]
pub struct SyncFile {
    fd: Option<OwnedFd>,
    /// The file on a simulated disk (crash tests), synced by [`SyncJob::run_blocking`]; such a
    /// file has no descriptor.
    sim: Option<SimFile>,
    path: PathBuf,
    base: LogPos,
}

impl SyncFile {
    pub(crate) fn new(fd: OwnedFd, path: PathBuf, base: LogPos) -> SyncFile {
        SyncFile {
            fd: Some(fd),
            sim: None,
            path,
            base,
        }
    }

    pub(crate) fn sim(file: SimFile, path: PathBuf, base: LogPos) -> SyncFile {
        SyncFile {
            fd: None,
            sim: Some(file),
            path,
            base,
        }
    }

    /// The duplicated descriptor, unless it was taken with [`SyncFile::take_fd`].
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|fd| {
            use std::os::fd::AsFd;
            fd.as_fd()
        })
    }

    /// Takes ownership of the duplicated descriptor (e.g. to hand it to an async runtime's file
    /// type, which closes it). The job stays valid for `Log::commit_end`.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fd.take()
    }

    /// Path of the segment file (for error messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Base position of the segment.
    pub fn base(&self) -> LogPos {
        self.base
    }
}

/// Where a [`DsyncWrite`] goes: an `O_DSYNC` descriptor of the segment file, or a file of a
/// simulated disk (written, then synced: a crash between the two tears the write, as a crash
/// during a real `O_DSYNC` write may).
#[derive(Debug)]
pub enum DsyncTarget {
    /// A duplicate of the segment's `O_DSYNC` descriptor, owned by the job.
    Fd(OwnedFd),
    /// The file on a simulated disk.
    Sim(SimFile),
}

/// The group of a `WriteMode::Dsync` commit: bytes to write at an offset of one segment file on
/// an `O_DSYNC` descriptor. The write completing (all of it) is the durability point.
#[derive(Debug)]
pub struct DsyncWrite {
    target: DsyncTarget,
    path: PathBuf,
    base: LogPos,
    offset: u64,
    bytes: Vec<u8>,
}

impl DsyncWrite {
    pub(crate) fn new(
        target: DsyncTarget,
        path: PathBuf,
        base: LogPos,
        offset: u64,
        bytes: Vec<u8>,
    ) -> DsyncWrite {
        DsyncWrite {
            target,
            path,
            base,
            offset,
            bytes,
        }
    }

    /// The `O_DSYNC` descriptor (none on a simulated disk).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.target {
            DsyncTarget::Fd(fd) => {
                use std::os::fd::AsFd;
                Some(fd.as_fd())
            }
            DsyncTarget::Sim(_) => None,
        }
    }

    /// Path of the segment file (for error messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Base position of the segment (a key for caching per-segment handles).
    pub fn base(&self) -> LogPos {
        self.base
    }

    /// Offset in the segment file where the bytes go.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The bytes to write.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Writes all the bytes on this thread: `pwrite(2)` on the `O_DSYNC` descriptor (continued
    /// after a short write, retried on EINTR), or the simulated write plus fdatasync.
    fn run_blocking(&self) -> io::Result<()> {
        match &self.target {
            DsyncTarget::Sim(f) => {
                f.write_at(&self.bytes, self.offset)?;
                f.sync_data()
            }
            DsyncTarget::Fd(fd) => {
                let mut done = 0;
                while done < self.bytes.len() {
                    let rest = &self.bytes[done..];
                    // SAFETY: plain syscall on a descriptor owned by the job, reading from a
                    // live slice of `rest.len()` bytes.
                    let n = unsafe {
                        libc::pwrite(
                            fd.as_raw_fd(),
                            rest.as_ptr().cast(),
                            rest.len(),
                            (self.offset + done as u64) as libc::off_t,
                        )
                    };
                    if n < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        return Err(e);
                    }
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    done += n as usize;
                }
                Ok(())
            }
        }
    }
}

/// A pending fdatasync of some segment files (or, in `WriteMode::Dsync`, one `O_DSYNC` write).
/// Run it (fdatasync every file, whole file; or write the bytes), then give it back with the
/// outcome to `Log::commit_end`.
#[derive(Debug)]
#[must_use = "a sync job must be run and handed back to commit_end"]
pub struct SyncJob {
    pub(crate) target: LogPos,
    pub(crate) files: Vec<SyncFile>,
    /// The `O_DSYNC` write of a `WriteMode::Dsync` group (then `files` is empty).
    pub(crate) write: Option<DsyncWrite>,
}

impl SyncJob {
    /// The `O_DSYNC` write of a `WriteMode::Dsync` commit (then there are no files to sync).
    pub fn dsync_write(&self) -> Option<&DsyncWrite> {
        self.write.as_ref()
    }

    /// Path of the job's (first) file, for error messages.
    pub(crate) fn first_path(&self) -> PathBuf {
        match (&self.write, self.files.first()) {
            (Some(w), _) => w.path.clone(),
            (None, Some(f)) => f.path.clone(),
            (None, None) => PathBuf::new(),
        }
    }

    /// The position that becomes `durable()` once every file is synced.
    pub fn target(&self) -> LogPos {
        self.target
    }

    /// The files to sync.
    pub fn files(&self) -> &[SyncFile] {
        &self.files
    }

    /// The files to sync, mutable (to take their descriptors).
    pub fn files_mut(&mut self) -> &mut [SyncFile] {
        &mut self.files
    }

    /// Runs the job on the calling thread with `fdatasync(2)` (the simulated fdatasync for files
    /// of a simulated disk), returning the first error.
    pub fn run_blocking(&self) -> io::Result<()> {
        if let Some(w) = &self.write {
            return w.run_blocking();
        }
        let mut result = Ok(());
        for f in &self.files {
            if let Some(sim) = &f.sim {
                if let Err(e) = sim.sync_data() {
                    result = result.and(Err(e));
                }
                continue;
            }
            let fd = f.fd.as_ref().ok_or_else(taken_fd_error)?;
            // SAFETY: plain syscall on a descriptor owned by the job.
            if unsafe { libc::fdatasync(fd.as_raw_fd()) } != 0 && result.is_ok() {
                result = Err(io::Error::last_os_error());
            }
        }
        result
    }
}

fn taken_fd_error() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "sync job descriptor was taken")
}

/// What `Log::commit_begin` asks the caller to do.
#[derive(Debug)]
#[must_use = "a Sync job must be run and handed back to commit_end"]
pub enum Commit {
    /// Nothing was appended since the last commit.
    Idle,
    /// DAX mode: everything written is already durable (flushed inline); the new durable position.
    Done(LogPos),
    /// Fdatasync mode: run this job (the fdatasyncs, or the `O_DSYNC` write in
    /// `WriteMode::Dsync`), then call `commit_end`.
    Sync(SyncJob),
}

/// A small io_uring that runs the fdatasyncs of one [`SyncJob`] at a time without blocking the
/// thread (for benchmarks, tools and the crash-test child; the server uses its own runtime's ring).
pub struct UringSyncer {
    ring: IoUring,
    /// fsyncs submitted and not yet completed.
    pending: u32,
    /// Outcome of the current job so far: the first error wins.
    result: io::Result<()>,
    /// Whether a job was submitted and its outcome not yet returned by `poll`/`wait`.
    busy: bool,
    /// Bytes of the `O_DSYNC` write in flight, if the job is one (to catch a short write).
    write_bytes: Option<usize>,
}

impl std::fmt::Debug for UringSyncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringSyncer")
            .field("pending", &self.pending)
            .field("busy", &self.busy)
            .finish()
    }
}

impl UringSyncer {
    /// Creates a ring of `limits::SYNC_RING_ENTRIES` entries.
    pub fn new() -> io::Result<UringSyncer> {
        Ok(UringSyncer {
            ring: IoUring::new(SYNC_RING_ENTRIES)?,
            pending: 0,
            result: Ok(()),
            busy: false,
            write_bytes: None,
        })
    }

    /// Whether a job is in flight (submitted, outcome not yet collected).
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Submits one `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC` per file of `job` (or, for a
    /// `WriteMode::Dsync` job, one `IORING_OP_WRITE` of its bytes on the `O_DSYNC` descriptor; a
    /// short write, which a regular file gives only when it cannot take more, is reported as
    /// `WriteZero`). The job must stay alive (its descriptors open, its bytes in place) until
    /// `poll` or `wait` returns its outcome. Jobs of a simulated disk have no descriptors (run
    /// them with `SyncJob::run_blocking`).
    pub fn submit(&mut self, job: &SyncJob) -> io::Result<()> {
        assert!(!self.busy, "UringSyncer runs one job at a time");
        self.result = Ok(());
        self.pending = 0;
        self.write_bytes = None;
        if let Some(w) = &job.write {
            let DsyncTarget::Fd(fd) = &w.target else {
                return Err(taken_fd_error());
            };
            let len = u32::try_from(w.bytes.len()).expect("a group is far below 4 GiB");
            let entry = opcode::Write::new(types::Fd(fd.as_raw_fd()), w.bytes.as_ptr(), len)
                .offset(w.offset)
                .build()
                .user_data(u64::MAX);
            // SAFETY: the buffer and the descriptor belong to the job, which the caller keeps
            // alive and unchanged until completion; the queue was empty (one job at a time).
            unsafe { self.ring.submission().push(&entry) }
                .expect("an empty submission queue has room for one entry");
            self.pending = 1;
            self.write_bytes = Some(w.bytes.len());
            self.ring.submit()?;
            self.busy = true;
            return Ok(());
        }
        for (i, f) in job.files.iter().enumerate() {
            let fd = f.fd.as_ref().ok_or_else(taken_fd_error)?;
            let entry = opcode::Fsync::new(types::Fd(fd.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(i as u64);
            loop {
                // SAFETY: an fsync references no user memory; the descriptor stays open because the
                // caller keeps the job alive until completion (and a closed descriptor would only
                // make the kernel answer EBADF).
                let pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
                if pushed {
                    break;
                }
                self.ring.submit()?;
            }
            self.pending += 1;
        }
        self.ring.submit()?;
        self.busy = true;
        Ok(())
    }

    fn reap(&mut self) {
        for cqe in self.ring.completion() {
            self.pending -= 1;
            if cqe.result() < 0 && self.result.is_ok() {
                self.result = Err(io::Error::from_raw_os_error(-cqe.result()));
            }
            let short = cqe.user_data() == u64::MAX
                && cqe.result() >= 0
                && Some(cqe.result() as usize) != self.write_bytes;
            if short && self.result.is_ok() {
                self.result = Err(io::ErrorKind::WriteZero.into());
            }
        }
    }

    /// Non-blocking: the job's outcome once every fsync completed, else `None`.
    pub fn poll(&mut self) -> Option<io::Result<()>> {
        if !self.busy {
            return None;
        }
        self.reap();
        if self.pending == 0 {
            self.busy = false;
            Some(std::mem::replace(&mut self.result, Ok(())))
        } else {
            None
        }
    }

    /// Blocks until the job completes and returns its outcome (`Ok` if no job is in flight).
    pub fn wait(&mut self) -> io::Result<()> {
        loop {
            if !self.busy {
                return Ok(());
            }
            if let Some(r) = self.poll() {
                return r;
            }
            self.ring.submit_and_wait(1)?;
        }
    }
}
