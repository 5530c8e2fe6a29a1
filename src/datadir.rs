//! The data directory: its meta file (`geobeat.meta`: format version, shard count, routing
//! fingerprint, creation time) and the naming of shard directories (`shard-0003`). It creates the
//! meta file atomically on first use and checks it on every later open. It does not open shard
//! logs (that is `store`/`log`) and does not map shards to executors (that is the server).
//!
//! Invariant: a data directory's shard count and routing never change after creation. The shard
//! count is read from the meta file (the machine's core count may differ from the one that
//! created it, which is fine); a build whose routing fingerprint differs is refused, since it
//! would send devices to the wrong shard.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::limits::SHARDS_MAX;
use crate::route::{self, ShardId};

/// Name of the meta file at the root of a data directory.
pub const META_FILE: &str = "geobeat.meta";
/// Meta file format written by this build.
pub const META_FORMAT_VERSION: u32 = 1;
/// Largest meta file read (it is a few hundred bytes).
const META_BYTES_MAX: u64 = 64 << 10;

/// Errors opening a data directory.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// A file-system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The meta file is unreadable or inconsistent.
    #[error("{}: {reason}", path.display())]
    Meta {
        /// The meta file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The data directory was created by a build that routes devices differently.
    #[error(
        "{}: routing fingerprint {found:#018x} differs from this build's {expected:#018x}; \
         this build would send devices to the wrong shards, refusing to start",
        path.display()
    )]
    Fingerprint {
        /// The meta file.
        path: PathBuf,
        /// Fingerprint recorded in the data directory.
        found: u64,
        /// This build's fingerprint.
        expected: u64,
    },
    /// A new data directory was asked for an impossible shard count.
    #[error("shard count {0} outside 1..={SHARDS_MAX}")]
    ShardCount(u32),
    /// A file or directory in the data directory is open to group or others.
    #[error(
        "{} has mode {mode:04o}, which lets group or others read location history; run \
         `chmod -R go-rwx {}` (geobeat creates files 0600 and directories 0700)",
        path.display(),
        root.display()
    )]
    Permissions {
        /// The data directory.
        root: PathBuf,
        /// The first file or directory found open.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Permission bits of every file geobeat creates in a data directory (segments, meta, fences,
/// cursors, audit files, locks): location history is readable by the server's user only.
pub const FILE_MODE: u32 = 0o600;
/// Permission bits of every directory geobeat creates (data directory, shards, quarantine,
/// sinks).
pub const DIR_MODE: u32 = 0o700;
/// Deepest level below the data directory [`check_private`] looks at (the deepest geobeat
/// creates is `shard-NNNN/quarantine/<file>`, or a sink's cursor directory).
const PRIVATE_CHECK_DEPTH_MAX: usize = 6;

/// Creates `dir` and its missing parents with mode [`DIR_MODE`] (existing ones are left alone).
pub fn create_dir_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Refuses a data directory in which anything (the directory itself included) grants group or
/// others any access: the first such path is named with its mode and the `chmod` that fixes it.
/// Symbolic links are not followed. Checked at every start, like the secret file's mode.
/// See: issue 20 §3.
pub fn check_private(root: &Path) -> Result<(), DataDirError> {
    use std::os::unix::fs::MetadataExt as _;
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((path, depth)) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Removed meanwhile (a temp file renamed into place): nothing to check.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("stat", &path, e)),
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(DataDirError::Permissions {
                root: root.to_path_buf(),
                path,
                mode,
            });
        }
        if meta.is_dir() && depth < PRIVATE_CHECK_DEPTH_MAX {
            let entries = std::fs::read_dir(&path).map_err(|e| io_err("list", &path, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| io_err("list", &path, e))?;
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    format_version: u32,
    shard_count: u32,
    /// Hex string ("0x" + 16 digits): JSON numbers above 2^53 are lossy in many readers.
    routing_fingerprint: String,
    created_ms: i64,
}

/// An opened data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    shard_count: u32,
    created_ms: i64,
    created: bool,
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> DataDirError {
    DataDirError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none())
}

fn sync_dir(dir: &Path) -> Result<(), DataDirError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync directory", dir, e))
}

impl DataDir {
    /// Opens the data directory at `path`, creating it and its meta file (with
    /// `shard_count_if_new` shards) if there is no meta file yet. An existing directory keeps its
    /// own shard count whatever `shard_count_if_new` says.
    pub fn open_or_create(
        path: impl AsRef<Path>,
        shard_count_if_new: u32,
    ) -> Result<DataDir, DataDirError> {
        let root = path.as_ref().to_path_buf();
        let meta_path = root.join(META_FILE);
        match std::fs::metadata(&meta_path) {
            Ok(_) => Self::open_existing(root, &meta_path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Self::create(root, &meta_path, shard_count_if_new)
            }
            Err(e) => Err(io_err("stat meta file", &meta_path, e)),
        }
    }

    fn open_existing(root: PathBuf, meta_path: &Path) -> Result<DataDir, DataDirError> {
        let bad = |reason: String| DataDirError::Meta {
            path: meta_path.to_path_buf(),
            reason,
        };
        let len = std::fs::metadata(meta_path)
            .map_err(|e| io_err("stat meta file", meta_path, e))?
            .len();
        if len > META_BYTES_MAX {
            return Err(bad(format!("{len} bytes, larger than any meta file")));
        }
        let text = std::fs::read_to_string(meta_path)
            .map_err(|e| io_err("read meta file", meta_path, e))?;
        let meta: Meta =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid meta JSON: {e}")))?;
        if meta.format_version != META_FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} (this build reads {META_FORMAT_VERSION})",
                meta.format_version
            )));
        }
        if meta.shard_count == 0 || meta.shard_count as usize > SHARDS_MAX {
            return Err(bad(format!(
                "shard count {} out of range",
                meta.shard_count
            )));
        }
        let found = meta
            .routing_fingerprint
            .strip_prefix("0x")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .ok_or_else(|| {
                bad(format!(
                    "bad routing fingerprint {:?}",
                    meta.routing_fingerprint
                ))
            })?;
        let expected = route::fingerprint();
        if found != expected {
            return Err(DataDirError::Fingerprint {
                path: meta_path.to_path_buf(),
                found,
                expected,
            });
        }
        Ok(DataDir {
            root,
            shard_count: meta.shard_count,
            created_ms: meta.created_ms,
            created: false,
        })
    }

    fn create(root: PathBuf, meta_path: &Path, shard_count: u32) -> Result<DataDir, DataDirError> {
        if shard_count == 0 || shard_count as usize > SHARDS_MAX {
            return Err(DataDirError::ShardCount(shard_count));
        }
        let existed = root.is_dir();
        create_dir_private(&root).map_err(|e| io_err("create data dir", &root, e))?;
        if existed && is_empty_dir(&root) {
            // An empty directory made for geobeat (`mkdir data`, usually 0755) becomes private
            // with its first meta file; a non-empty one is left to `check_private`.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(DIR_MODE))
                .map_err(|e| io_err("chmod data dir", &root, e))?;
        }
        if !existed {
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let created_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let meta = Meta {
            format_version: META_FORMAT_VERSION,
            shard_count,
            routing_fingerprint: format!("{:#018x}", route::fingerprint()),
            created_ms,
        };
        let mut text = serde_json::to_string_pretty(&meta).expect("meta serializes");
        text.push('\n');
        let tmp = root.join(format!("{META_FILE}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)
            .map_err(|e| io_err("create meta file", &tmp, e))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| io_err("write meta file", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, meta_path).map_err(|e| io_err("rename meta file", &tmp, e))?;
        sync_dir(&root)?;
        tracing::info!(dir = %root.display(), shard_count, "created data directory");
        Ok(DataDir {
            root,
            shard_count,
            created_ms,
            created: true,
        })
    }

    /// The data directory's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Number of logical shards (fixed at creation).
    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    /// Creation time recorded in the meta file, ms since the Unix epoch.
    pub fn created_ms(&self) -> i64 {
        self.created_ms
    }

    /// Whether this call created the directory's meta file.
    pub fn was_created(&self) -> bool {
        self.created
    }

    /// The directory of `shard`: `<root>/shard-0003`. Panics for a shard outside the count.
    pub fn shard_dir(&self, shard: ShardId) -> PathBuf {
        assert!(
            shard.0 < self.shard_count,
            "shard {shard} outside 0..{}",
            self.shard_count
        );
        self.root.join(format!("shard-{:04}", shard.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reopens_with_the_stored_shard_count() {
        // The first open creates the meta file; a later open with another count keeps the stored
        // one (the core count may change between runs).
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        let d = DataDir::open_or_create(&root, 4).unwrap();
        assert!(d.was_created());
        assert_eq!(d.shard_count(), 4);
        assert_eq!(d.shard_dir(ShardId(3)), root.join("shard-0003"));
        let d2 = DataDir::open_or_create(&root, 16).unwrap();
        assert!(!d2.was_created());
        assert_eq!(d2.shard_count(), 4);
        assert_eq!(d2.created_ms(), d.created_ms());
        assert!(!root.join("geobeat.meta.tmp").exists());
    }

    #[test]
    fn refuses_a_foreign_routing_fingerprint() {
        // A meta file written by a build with another routing hash must be refused with the
        // fingerprint error, naming both values.
        let dir = tempfile::tempdir().unwrap();
        DataDir::open_or_create(dir.path(), 2).unwrap();
        let meta = dir.path().join(META_FILE);
        let text = std::fs::read_to_string(&meta).unwrap();
        let ours = format!("{:#018x}", route::fingerprint());
        std::fs::write(&meta, text.replace(&ours, "0x0123456789abcdef")).unwrap();
        let err = DataDir::open_or_create(dir.path(), 2).unwrap_err();
        assert!(
            matches!(
                err,
                DataDirError::Fingerprint {
                    found: 0x0123456789abcdef,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("wrong shards"));
    }

    #[test]
    fn refuses_bad_meta_and_bad_counts() {
        // Garbage meta, zero shards and too many shards are clear errors, not panics.
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            DataDir::open_or_create(dir.path().join("a"), 0),
            Err(DataDirError::ShardCount(0))
        ));
        assert!(DataDir::open_or_create(dir.path().join("b"), SHARDS_MAX as u32 + 1).is_err());
        std::fs::write(dir.path().join(META_FILE), b"{not json").unwrap();
        assert!(matches!(
            DataDir::open_or_create(dir.path(), 2),
            Err(DataDirError::Meta { .. })
        ));
    }
}
