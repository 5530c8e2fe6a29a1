//! The storage seam under the shard log: every file-system operation the log performs on its shard
//! directory and segment files (list, create/open, preallocate, read a header, map, write with
//! `pwrite`, fdatasync, rename, delete, copy, directory sync) goes through [`Disk`] and
//! [`SegFile`], so the same log code runs on the real file system or on the simulated disk of
//! crash tests ([`super::sim`]). It does not decide what to do with files (that is `segment`,
//! `recovery` and `Log`). On the append path it is one `match` per batch of staged entries
//! ([`SegFile::write_all_at`], static dispatch, no call through a pointer); in
//! [`super::WriteMode::Mmap`] appends write into the segment's mapping instead, whose simulated arm
//! is one more arm of the `match` the mapping already had.
//!
//! Invariant: on `Disk::Real` every operation is the same system call the log made before the
//! seam existed; `Disk::Sim` only ever touches its own in-memory disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use super::sim::{SimDisk, SimFile};
use super::sync::SyncFile;
use super::LogPos;

/// Where a log's files live: the real file system, or a simulated disk (crash tests).
#[derive(Debug, Clone, Default)]
pub enum Disk {
    /// The real file system (the default; what the server uses).
    #[default]
    Real,
    /// An in-memory simulated disk that tracks written vs durable bytes and can crash.
    Sim(SimDisk),
}

/// An open segment file.
#[derive(Debug)]
pub(crate) enum SegFile {
    Real(File),
    Sim(SimFile),
}

impl Disk {
    pub(crate) fn is_dir(&self, dir: &Path) -> bool {
        match self {
            Disk::Real => dir.is_dir(),
            Disk::Sim(d) => d.is_dir(dir),
        }
    }

    /// Creates a directory readable by the owner only.
    pub(crate) fn create_dir(&self, dir: &Path) -> io::Result<()> {
        match self {
            Disk::Real => crate::datadir::create_dir_private(dir),
            Disk::Sim(d) => d.create_dir(dir),
        }
    }

    /// fsyncs a directory (creations, renames and deletions in it become durable).
    pub(crate) fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        match self {
            Disk::Real => File::open(dir).and_then(|d| d.sync_all()),
            Disk::Sim(d) => d.sync_dir(dir),
        }
    }

    /// Names of the entries of `dir` (non-UTF-8 names skipped).
    pub(crate) fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        match self {
            Disk::Real => {
                let mut names = Vec::new();
                for item in std::fs::read_dir(dir)? {
                    if let Some(name) = item?.file_name().to_str() {
                        names.push(name.to_string());
                    }
                }
                Ok(names)
            }
            Disk::Sim(d) => d.list(dir),
        }
    }

    /// Opens a file read-write; `create` creates it (mode `datadir::FILE_MODE`) if missing,
    /// `truncate` empties it.
    pub(crate) fn open(&self, path: &Path, create: bool, truncate: bool) -> io::Result<SegFile> {
        match self {
            Disk::Real => OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(truncate)
                .mode(crate::datadir::FILE_MODE)
                .open(path)
                .map(SegFile::Real),
            Disk::Sim(d) => d.open(path, create, truncate).map(SegFile::Sim),
        }
    }

    pub(crate) fn remove(&self, path: &Path) -> io::Result<()> {
        match self {
            Disk::Real => std::fs::remove_file(path),
            Disk::Sim(d) => d.remove(path),
        }
    }

    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        match self {
            Disk::Real => std::fs::rename(from, to),
            Disk::Sim(d) => d.rename(from, to),
        }
    }

    pub(crate) fn copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        match self {
            Disk::Real => std::fs::copy(from, to).map(|_| ()),
            Disk::Sim(d) => d.copy(from, to),
        }
    }

    /// Asks the kernel to start reading a whole file into the page cache (advisory; errors
    /// ignored; nothing to do on a simulated disk).
    pub(crate) fn readahead(&self, path: &Path) {
        if let Disk::Real = self {
            use std::os::fd::AsRawFd;
            if let Ok(f) = File::open(path) {
                // SAFETY: plain syscall on a valid descriptor; the advice outlives the descriptor
                // because it applies to the file's page cache.
                unsafe {
                    libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
                }
            }
        }
    }
}

impl SegFile {
    pub(crate) fn len(&self) -> io::Result<u64> {
        match self {
            SegFile::Real(f) => Ok(f.metadata()?.len()),
            SegFile::Sim(f) => f.len(),
        }
    }

    pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
        match self {
            SegFile::Real(f) => f.set_len(len),
            SegFile::Sim(f) => f.set_len(len),
        }
    }

    pub(crate) fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        match self {
            SegFile::Real(f) => std::os::unix::fs::FileExt::read_exact_at(f, buf, off),
            SegFile::Sim(f) => f.read_exact_at(buf, off),
        }
    }

    /// `pwrite` of all of `buf` at `off` (continued after a short write; retried on EINTR).
    pub(crate) fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        match self {
            SegFile::Real(f) => std::os::unix::fs::FileExt::write_all_at(f, buf, off),
            SegFile::Sim(f) => f.write_at(buf, off),
        }
    }

    /// fdatasync.
    pub(crate) fn sync_data(&self) -> io::Result<()> {
        match self {
            SegFile::Real(f) => f.sync_data(),
            SegFile::Sim(f) => f.sync_data(),
        }
    }

    /// A handle a [`super::SyncJob`] can sync later (a duplicated descriptor on the real disk).
    pub(crate) fn sync_file(&self, path: &Path, base: LogPos) -> io::Result<SyncFile> {
        match self {
            SegFile::Real(f) => Ok(SyncFile::new(
                f.as_fd().try_clone_to_owned()?,
                path.to_path_buf(),
                base,
            )),
            SegFile::Sim(f) => Ok(SyncFile::sim(f.clone(), path.to_path_buf(), base)),
        }
    }

    /// The real file, if on the real disk.
    #[cfg(test)]
    pub(crate) fn real(&self) -> Option<&File> {
        match self {
            SegFile::Real(f) => Some(f),
            SegFile::Sim(_) => None,
        }
    }
}
