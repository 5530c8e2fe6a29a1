//! The shard log's error type: every operating condition the log reports (I/O failures with their
//! path and operation, no space, a poisoned log after a failed sync, refused input, exhausted
//! bounds). Programmer errors (two sync jobs in flight, a job from another log) are assertions,
//! not variants.
//!
//! Invariant: every variant names the shard, and every file-system variant names the path and the
//! operation, so a log line alone says what failed where.

use std::io;
use std::path::{Path, PathBuf};

use crate::record::Invalid;
use crate::route::ShardId;

/// Errors from the shard log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation failed.
    #[error("shard {shard}: {op} {}: {source}", path.display())]
    Io {
        /// Shard whose log failed.
        shard: ShardId,
        /// What was being done ("create segment", "fsync directory", ...).
        op: &'static str,
        /// File or directory concerned.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Preallocating a new segment failed for lack of space (`op` "preallocate"): nothing was
    /// written and the log position did not move; the next append tries again. Or writing staged
    /// entries into the active segment did (`op` "write entries to"; only a file system that
    /// allocates on overwrite, e.g. copy-on-write, can do that to a preallocated file): the
    /// entries stay staged, nothing became durable, the log is not poisoned, and the next commit
    /// or append writes them again.
    #[error("shard {shard}: no space to {op} segment {} ({bytes} bytes): {source}", path.display())]
    NoSpace {
        /// Shard whose log is full.
        shard: ShardId,
        /// What needed the space: "preallocate" or "write entries to".
        op: &'static str,
        /// Segment that could not be created or written.
        path: PathBuf,
        /// Bytes requested.
        bytes: u64,
        /// The OS error (ENOSPC).
        source: io::Error,
    },
    /// A sync of the log failed. The log is now poisoned: whether the data reached the disk is
    /// unknown, so nothing more is appended or acknowledged until the shard is reopened.
    #[error("shard {shard}: sync of {} failed, log poisoned: {source}", path.display())]
    SyncFailed {
        /// Shard whose log failed.
        shard: ShardId,
        /// Segment file whose sync failed (the first one of the job).
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Writing staged entries into the active segment failed with another error than ENOSPC.
    /// The log is now poisoned, like after a failed sync: what reached the page cache is unknown.
    #[error("shard {shard}: write of log entries to {} failed, log poisoned: {source}", path.display())]
    WriteFailed {
        /// Shard whose log failed.
        shard: ShardId,
        /// The segment file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The shard directory was removed or replaced while the log was open (its `LOCK` file is no
    /// longer the one this process holds): new data would go to files nobody can find after a
    /// restart. The log is now poisoned, like after a failed sync.
    #[error("shard {shard}: shard directory {} was removed or replaced while in use; log poisoned (restore the data directory and restart)", path.display())]
    DirectoryGone {
        /// Shard whose directory vanished.
        shard: ShardId,
        /// The shard directory.
        path: PathBuf,
    },
    /// An earlier sync or write failed (or the directory vanished); the log refuses all appends
    /// and commits until reopened.
    #[error("shard {shard}: log poisoned by an earlier failure (failed sync or write, or shard directory removed); reopen the shard to recover")]
    Poisoned {
        /// Shard whose log is poisoned.
        shard: ShardId,
    },
    /// The heartbeat failed validation and was not written.
    #[error("shard {shard}: heartbeat refused: {}", reason.reason())]
    Invalid {
        /// Shard asked to store it.
        shard: ShardId,
        /// Which rule it broke.
        reason: Invalid,
    },
    /// The encoded heartbeat is larger than `limits::ENTRY_PAYLOAD_BYTES_MAX`.
    #[error("shard {shard}: encoded heartbeat is {payload_bytes} bytes, above the entry maximum")]
    TooLarge {
        /// Shard asked to store it.
        shard: ShardId,
        /// Encoded size.
        payload_bytes: usize,
    },
    /// The configuration is unusable.
    #[error("shard {shard}: bad log configuration: {reason}")]
    Config {
        /// Shard being opened.
        shard: ShardId,
        /// What is wrong.
        reason: String,
    },
    /// Another process holds the shard directory's lock.
    #[error("shard {shard}: {} is locked by another process", path.display())]
    Locked {
        /// Shard being opened.
        shard: ShardId,
        /// The lock file.
        path: PathBuf,
    },
    /// The oldest retained segment is unreadable, so the log cannot say where it starts.
    #[error("shard {shard}: first segment {} is unusable ({reason}); move it aside to start the shard", path.display())]
    Corrupt {
        /// Shard being opened.
        shard: ShardId,
        /// The unusable segment.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// The shard already maps `limits::LOG_SEGMENTS_MAX` segments (retention is not keeping up).
    #[error("shard {shard}: {segments} segments mapped, the maximum; delete expired segments")]
    TooManySegments {
        /// Shard whose log is full.
        shard: ShardId,
        /// Segments currently mapped.
        segments: usize,
    },
    /// `set_consumed` named a consumer that was never registered.
    #[error("shard {shard}: unknown log consumer {name:?}")]
    UnknownConsumer {
        /// Shard asked.
        shard: ShardId,
        /// The name given.
        name: String,
    },
    /// A consumer name is empty, too long, or there are already `limits::LOG_CONSUMERS_MAX`.
    #[error("shard {shard}: cannot register log consumer {name:?}: {reason}")]
    Consumer {
        /// Shard asked.
        shard: ShardId,
        /// The name given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
}

impl Error {
    /// An [`Error::Io`]: `op` on `path` failed with `source` in `shard`'s log.
    pub(crate) fn io(shard: ShardId, op: &'static str, path: &Path, source: io::Error) -> Error {
        Error::Io {
            shard,
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}
