//! Asynchronous durability for the Fdatasync mode: the [`SyncJob`] a log hands out from
//! `commit_begin` (dup'ed descriptors of the segments with unsynced bytes plus the position that
//! becomes durable when they are synced), the [`Commit`] outcome, and [`UringSyncer`], a small
//! io_uring that runs the fdatasyncs while the caller keeps appending. It does not touch the log's
//! state: only `Log::commit_end` turns a finished job into a new durable position.
//!
//! Invariant: a job's target is the log's written position when the job was made, and every
//! segment holding bytes below it that were not yet durable has a descriptor in the job; syncing
//! all of them (whole files) therefore makes everything below the target durable.

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

/// A pending fdatasync of some segment files. Run it (fdatasync every file, whole file), then give
/// it back with the outcome to `Log::commit_end`.
#[derive(Debug)]
#[must_use = "a sync job must be run and handed back to commit_end"]
pub struct SyncJob {
    pub(crate) target: LogPos,
    pub(crate) files: Vec<SyncFile>,
}

impl SyncJob {
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
    /// Fdatasync mode: run this job, then call `commit_end`.
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
        })
    }

    /// Whether a job is in flight (submitted, outcome not yet collected).
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Submits one `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC` per file of `job`. The job must
    /// stay alive (its descriptors open) until `poll` or `wait` returns its outcome.
    /// Jobs of a simulated disk have no descriptors (run them with `SyncJob::run_blocking`).
    pub fn submit(&mut self, job: &SyncJob) -> io::Result<()> {
        assert!(!self.busy, "UringSyncer runs one job at a time");
        self.result = Ok(());
        self.pending = 0;
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
