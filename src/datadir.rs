//! The data directory: its meta file (`geobeat.meta`: format version, shard count, the routing
//! table of virtual shards, creation time), the naming of shard directories (`shard-0003`), the
//! directory lock (`geobeat.lock`) and the crash-safe replacement of the whole shard layout that
//! `reshard`/`migrate` prepare in a staging directory (see [`commit_staging`], [`finish_swap`]).
//! It creates the meta file atomically on first use and checks it on every later open. It does
//! not open shard logs (that is `store`/`log`), does not rewrite data (`reshard`) and does not map
//! shards to executors (that is the server).
//!
//! Invariants: between two reshards a data directory's shard count and routing table never
//! change; the routing depends only on the meta file (never on the build: the hash is CRC32C, see
//! `route`); a format-1 directory (routing by ahash, which depended on the build) is never served,
//! only migrated. After any crash the directory holds either the old or the new layout: a layout
//! change becomes visible only through the rename of `reshard.staging` to `reshard.ready`, and
//! whoever next takes the directory lock finishes the swap before reading anything.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::limits::{META_BYTES_MAX, PRIVATE_CHECK_DEPTH_MAX, SHARDS_MAX, VSHARDS};
use crate::route::{self, Router, ShardId};

/// Name of the meta file at the root of a data directory.
pub const META_FILE: &str = "geobeat.meta";
/// Meta file format written by this build (2: CRC32C virtual-shard routing with a stored table).
pub const META_FORMAT_VERSION: u32 = 2;
/// The format before issue 13: devices routed by ahash; only `geobeat migrate` reads it.
pub const META_FORMAT_AHASH: u32 = 1;
/// The data directory's lock file (flock: shared by a server, exclusive by reshard/migrate).
pub const LOCK_FILE: &str = "geobeat.lock";
/// Where reshard/migrate build the new layout (removed if found without `reshard.ready`).
pub const STAGING_DIR: &str = "reshard.staging";
/// The staging directory once complete and durable: its existence commits the new layout.
pub const READY_DIR: &str = "reshard.ready";
/// Where the swap moves the old layout before deleting it.
pub const OLD_DIR: &str = "reshard.old";
/// In `reshard.ready`: the names of the new layout's entries, one per line.
pub const LAYOUT_FILE: &str = "LAYOUT";
/// Sink cursors of shards that a reshard removed, kept for when the shard number returns
/// (`retired-cursors/shard-NNNN/<sink>.cursor`; see `reshard`).
pub const RETIRED_CURSORS_DIR: &str = "retired-cursors";
/// Where the swap keeps old shards' `quarantine` directories (forensic copies).
pub const QUARANTINE_DIR: &str = "quarantine";

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
    /// The directory is in the format of builds before issue 13 (routing by ahash).
    #[error(
        "format 1 (devices routed by ahash, which depends on the build); rewrite it once, \
         offline, with `geobeat migrate --data-dir {}`",
        root.display()
    )]
    NeedsMigration {
        /// The data directory.
        root: PathBuf,
    },
    /// Another process holds the directory lock exclusively (a reshard or migrate is running).
    #[error(
        "{} is being resharded or migrated by another process ({LOCK_FILE} is held); wait for it \
         to finish",
        root.display()
    )]
    Busy {
        /// The data directory.
        root: PathBuf,
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

/// The meta file as read: only what every format has, then the rest per version.
#[derive(Debug, Deserialize)]
struct MetaProbe {
    format_version: u32,
}

#[derive(Debug, Deserialize)]
struct MetaV1 {
    shard_count: u32,
    created_ms: i64,
}

#[derive(Debug, Deserialize)]
struct MetaV2 {
    shard_count: u32,
    vshard_hash: String,
    vshards: u32,
    vshard_table: Vec<(u32, u32)>,
    created_ms: i64,
}

/// What a data directory's meta file says, in any format this build can read.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `format_version` (1 or 2).
    pub format_version: u32,
    /// Number of shards.
    pub shard_count: u32,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: i64,
    /// The routing table (format 2 only).
    pub router: Option<Router>,
}

/// An opened data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    router: Router,
    created_ms: i64,
    created: bool,
    /// The directory lock, when opened with one ([`DataDir::open_for_serve`]); held while any
    /// clone lives.
    _lock: Option<Arc<File>>,
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> DataDirError {
    DataDirError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `dir` is the repository's shipped data directory, untouched: it exists and holds
/// nothing but its `README.md` (the on-disk format). `geobeat serve` may initialise such a
/// directory without `--init` (the README's first command on a fresh clone); an absent or empty
/// directory needs `--init`, since that is also what a removed data directory looks like.
pub fn is_shipped_empty(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut names = entries.filter_map(|e| e.ok().map(|e| e.file_name()));
    matches!((names.next(), names.next()), (Some(n), None) if n == "README.md")
}

/// A directory about to become a data directory (no meta file yet: `mkdir data`, a test's
/// temporary directory, the repository's `shards/` holding only its README, usually 0755 / 0644)
/// becomes private before geobeat writes its first file into it: the directory 0700 and the
/// plain files directly in it 0600. An existing data directory is left to [`check_private`],
/// which refuses it if anything in it is open.
fn make_private_if_new(root: &Path) -> Result<(), DataDirError> {
    use std::os::unix::fs::PermissionsExt as _;
    if !root.is_dir() || root.join(META_FILE).exists() {
        return Ok(());
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(DIR_MODE))
        .map_err(|e| io_err("chmod data dir", root, e))?;
    let entries = std::fs::read_dir(root).map_err(|e| io_err("list", root, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err("list", root, e))?;
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let path = entry.path();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(FILE_MODE))
                .map_err(|e| io_err("chmod", &path, e))?;
        }
    }
    Ok(())
}

/// fsyncs a directory so creations, renames and removals in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), DataDirError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync directory", dir, e))
}

/// The name of shard `k`'s directory: `shard-0003`.
pub fn shard_dir_name(shard: ShardId) -> String {
    format!("shard-{:04}", shard.0)
}

/// The meta file text for `router` (format 2). Ranges are written on one line: `[[first vshard,
/// shard], ...]`.
fn meta_text(router: &Router, created_ms: i64) -> String {
    let table: Vec<String> = router
        .ranges()
        .iter()
        .map(|(v, s)| format!("[{v}, {s}]"))
        .collect();
    format!(
        "{{\n  \"format_version\": {META_FORMAT_VERSION},\n  \"shard_count\": {},\n  \
         \"vshard_hash\": \"{}\",\n  \"vshards\": {VSHARDS},\n  \"vshard_table\": [{}],\n  \
         \"created_ms\": {created_ms}\n}}\n",
        router.shard_count(),
        route::HASH_NAME,
        table.join(", ")
    )
}

/// Writes a format-2 meta file for `router` into `dir` atomically and durably (temp file, fsync,
/// rename, fsync of `dir`).
pub fn write_meta(dir: &Path, router: &Router, created_ms: i64) -> Result<(), DataDirError> {
    let text = meta_text(router, created_ms);
    let tmp = dir.join(format!("{META_FILE}.tmp"));
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
    std::fs::rename(&tmp, dir.join(META_FILE)).map_err(|e| io_err("rename meta file", &tmp, e))?;
    sync_dir(dir)
}

/// Reads and checks the meta file of the data directory at `root`, in either format.
pub fn inspect(root: &Path) -> Result<Layout, DataDirError> {
    let meta_path = root.join(META_FILE);
    let bad = |reason: String| DataDirError::Meta {
        path: meta_path.clone(),
        reason,
    };
    let len = std::fs::metadata(&meta_path)
        .map_err(|e| io_err("stat meta file", &meta_path, e))?
        .len();
    if len > META_BYTES_MAX {
        return Err(bad(format!("{len} bytes, larger than any meta file")));
    }
    let text =
        std::fs::read_to_string(&meta_path).map_err(|e| io_err("read meta file", &meta_path, e))?;
    let probe: MetaProbe =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid meta JSON: {e}")))?;
    let check_count = |n: u32| {
        if n == 0 || n as usize > SHARDS_MAX {
            Err(bad(format!(
                "shard count {n} out of range 1..={SHARDS_MAX}"
            )))
        } else {
            Ok(n)
        }
    };
    match probe.format_version {
        META_FORMAT_AHASH => {
            let m: MetaV1 = serde_json::from_str(&text)
                .map_err(|e| bad(format!("not a format-1 meta file: {e}")))?;
            Ok(Layout {
                format_version: META_FORMAT_AHASH,
                shard_count: check_count(m.shard_count)?,
                created_ms: m.created_ms,
                router: None,
            })
        }
        META_FORMAT_VERSION => {
            let m: MetaV2 = serde_json::from_str(&text)
                .map_err(|e| bad(format!("not a format-2 meta file: {e}")))?;
            if m.vshard_hash != route::HASH_NAME {
                return Err(bad(format!(
                    "routing hash {:?}; this build routes with {:?}",
                    m.vshard_hash,
                    route::HASH_NAME
                )));
            }
            if m.vshards as usize != VSHARDS {
                return Err(bad(format!(
                    "{} virtual shards; this build routes over {VSHARDS}",
                    m.vshards
                )));
            }
            let shard_count = check_count(m.shard_count)?;
            let router = Router::from_ranges(shard_count, &m.vshard_table).map_err(|e| {
                bad(format!(
                    "bad vshard_table ({e}); it must be [[first_vshard, shard], ...] ranges \
                     starting at 0 — restore the file from a backup"
                ))
            })?;
            Ok(Layout {
                format_version: META_FORMAT_VERSION,
                shard_count,
                created_ms: m.created_ms,
                router: Some(router),
            })
        }
        v => Err(bad(format!(
            "format version {v} (this build reads {META_FORMAT_VERSION}, and migrates \
             {META_FORMAT_AHASH})"
        ))),
    }
}

/// How [`lock`] takes the directory lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Servers (several may share it; each shard's own LOCK keeps them apart).
    Shared,
    /// Reshard and migrate: nobody else may use the directory.
    Exclusive,
}

/// Opens `<root>/geobeat.lock` and flocks it without waiting; `Ok(None)` if another process holds
/// a conflicting lock.
pub fn lock(root: &Path, mode: LockMode) -> Result<Option<File>, DataDirError> {
    let path = root.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(&path)
        .map_err(|e| io_err("open lock file", &path, e))?;
    Ok(flock(&file, mode, &path)?.then_some(file))
}

/// flock(LOCK_NB) in `mode` (also converts a lock the file already holds); false if busy.
fn flock(file: &File, mode: LockMode, path: &Path) -> Result<bool, DataDirError> {
    let op = match mode {
        LockMode::Shared => libc::LOCK_SH,
        LockMode::Exclusive => libc::LOCK_EX,
    };
    // SAFETY: plain syscall on a valid descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(io_err("flock", path, err))
    }
}

/// Whether `name` is an entry of the shard layout (what a reshard replaces as a whole).
fn is_layout_entry(name: &str) -> bool {
    name == RETIRED_CURSORS_DIR
        || name
            .strip_prefix("shard-")
            .is_some_and(|d| d.len() >= 4 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Commits a complete, durable staging directory (`<root>/reshard.staging`, holding the new
/// `geobeat.meta`, the layout entries and a `LAYOUT` file naming them): renames it to
/// `reshard.ready` and fsyncs the root. From here on the new layout wins: [`finish_swap`] (run by
/// the committing process, or after a crash by whoever next takes the lock) moves it into place.
pub fn commit_staging(root: &Path) -> Result<(), DataDirError> {
    let staging = root.join(STAGING_DIR);
    std::fs::rename(&staging, root.join(READY_DIR))
        .map_err(|e| io_err("commit staging directory", &staging, e))?;
    sync_dir(root)
}

/// Finishes a committed layout change, if `<root>/reshard.ready` exists; returns whether there was
/// one. Every step is idempotent, so a crash anywhere is repaired by running it again:
/// 1. every layout entry of the root that is not already the new one moves into `reshard.old`;
/// 2. every entry named in `LAYOUT` moves from `reshard.ready` to the root;
/// 3. `reshard.ready/geobeat.meta` replaces `geobeat.meta` (atomic rename);
/// 4. old shards' non-empty `quarantine` directories move to `quarantine/`, then `reshard.old`
///    and `reshard.ready` are deleted.
///
/// Each step is made durable (directory fsyncs) before the next starts. The caller must hold the
/// directory lock exclusively.
pub fn finish_swap(root: &Path) -> Result<bool, DataDirError> {
    finish_swap_steps(root, &mut None)
}

/// [`finish_swap`] that, in tests, stops (as a crash would) after `budget` file-system changes.
fn finish_swap_steps(root: &Path, budget: &mut Option<u32>) -> Result<bool, DataDirError> {
    // Returns from the function when the test budget is spent.
    macro_rules! step {
        () => {
            if let Some(n) = budget {
                if *n == 0 {
                    return Ok(true);
                }
                *n -= 1;
            }
        };
    }
    let ready = root.join(READY_DIR);
    if !ready.is_dir() {
        return Ok(false);
    }
    let old = root.join(OLD_DIR);
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|e| io_err("move layout entry", from, e))
    };
    if ready.join(META_FILE).exists() {
        let layout_path = ready.join(LAYOUT_FILE);
        let layout_text = std::fs::read_to_string(&layout_path)
            .map_err(|e| io_err("read layout list", &layout_path, e))?;
        let layout: Vec<&str> = layout_text.lines().filter(|l| !l.is_empty()).collect();
        if !old.is_dir() {
            step!();
            std::fs::create_dir(&old).map_err(|e| io_err("create directory", &old, e))?;
            sync_dir(root)?;
        }
        // 1. Old entries out. An entry named in LAYOUT that is no longer in reshard.ready is the
        // new one, moved in by an interrupted earlier run.
        let mut names = Vec::new();
        for item in std::fs::read_dir(root).map_err(|e| io_err("list data dir", root, e))? {
            let item = item.map_err(|e| io_err("list data dir", root, e))?;
            if let Some(name) = item.file_name().to_str().filter(|n| is_layout_entry(n)) {
                names.push(name.to_owned());
            }
        }
        names.sort();
        for name in names {
            if layout.contains(&name.as_str()) && !ready.join(&name).exists() {
                continue;
            }
            step!();
            rename(&root.join(&name), &old.join(&name))?;
        }
        sync_dir(&old)?;
        sync_dir(root)?;
        // 2. New entries in.
        for name in &layout {
            let from = ready.join(name);
            if from.exists() {
                step!();
                rename(&from, &root.join(name))?;
            }
        }
        sync_dir(root)?;
        sync_dir(&ready)?;
        // 3. The new meta file: from here on the directory is in its new layout.
        step!();
        rename(&ready.join(META_FILE), &root.join(META_FILE))?;
        sync_dir(root)?;
    }
    // 4. Clean up, keeping forensic copies.
    if old.is_dir() {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        for item in std::fs::read_dir(&old).map_err(|e| io_err("list directory", &old, e))? {
            let item = item.map_err(|e| io_err("list directory", &old, e))?;
            let q = item.path().join(QUARANTINE_DIR);
            let nonempty = std::fs::read_dir(&q).is_ok_and(|mut d| d.next().is_some());
            if nonempty {
                let keep = root.join(QUARANTINE_DIR);
                create_dir_private(&keep).map_err(|e| io_err("create directory", &keep, e))?;
                let name = format!("{}.{stamp}", item.file_name().to_string_lossy());
                step!();
                rename(&q, &keep.join(name))?;
                sync_dir(&keep)?;
            }
        }
        step!();
        std::fs::remove_dir_all(&old).map_err(|e| io_err("remove old layout", &old, e))?;
        sync_dir(root)?;
    }
    step!();
    std::fs::remove_dir_all(&ready).map_err(|e| io_err("remove directory", &ready, e))?;
    sync_dir(root)?;
    Ok(true)
}

impl DataDir {
    /// Opens the data directory at `path`, creating it and its meta file (with
    /// `shard_count_if_new` shards, contiguous routing) if there is no meta file yet. An existing
    /// directory keeps its own shard count and table whatever `shard_count_if_new` says. Takes no
    /// lock (read-only tools use it while a server runs); a server uses
    /// [`DataDir::open_for_serve`].
    pub fn open_or_create(
        path: impl AsRef<Path>,
        shard_count_if_new: u32,
    ) -> Result<DataDir, DataDirError> {
        let root = path.as_ref().to_path_buf();
        let meta_path = root.join(META_FILE);
        match std::fs::metadata(&meta_path) {
            Ok(_) => Self::open_existing(root),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Self::create(root, shard_count_if_new)
            }
            Err(e) => Err(io_err("stat meta file", &meta_path, e)),
        }
    }

    /// Like [`DataDir::open_or_create`], for the server: first takes the directory lock (shared
    /// for as long as the returned value or a clone lives), finishing a committed but
    /// interrupted reshard and removing an uncommitted staging directory if nobody else holds
    /// it. Refuses while a reshard or migrate runs ([`DataDirError::Busy`]) and on a format-1
    /// directory ([`DataDirError::NeedsMigration`]).
    pub fn open_for_serve(
        path: impl AsRef<Path>,
        shard_count_if_new: u32,
    ) -> Result<DataDir, DataDirError> {
        let root = path.as_ref().to_path_buf();
        if !root.is_dir() {
            create_dir_private(&root).map_err(|e| io_err("create data dir", &root, e))?;
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        // Before the lock file makes it non-empty.
        make_private_if_new(&root)?;
        let lock_path = root.join(LOCK_FILE);
        let file = match lock(&root, LockMode::Exclusive)? {
            Some(file) => {
                if finish_swap(&root)? {
                    tracing::warn!(dir = %root.display(), "finished a reshard that was interrupted after it committed");
                }
                let staging = root.join(STAGING_DIR);
                if staging.exists() {
                    tracing::warn!(path = %staging.display(), "removing the staging directory of an interrupted reshard (it never committed; the data directory is unchanged)");
                    std::fs::remove_dir_all(&staging)
                        .map_err(|e| io_err("remove staging directory", &staging, e))?;
                    sync_dir(&root)?;
                }
                if !flock(&file, LockMode::Shared, &lock_path)? {
                    return Err(DataDirError::Busy { root });
                }
                file
            }
            // Another server holds it shared (its shards' locks will refuse us), or a reshard
            // holds it exclusively (then the shared lock fails too).
            None => {
                lock(&root, LockMode::Shared)?.ok_or(DataDirError::Busy { root: root.clone() })?
            }
        };
        let mut dd = Self::open_or_create(&root, shard_count_if_new)?;
        dd._lock = Some(Arc::new(file));
        Ok(dd)
    }

    fn open_existing(root: PathBuf) -> Result<DataDir, DataDirError> {
        let layout = inspect(&root)?;
        let Some(router) = layout.router else {
            return Err(DataDirError::NeedsMigration { root });
        };
        Ok(DataDir {
            root,
            router,
            created_ms: layout.created_ms,
            created: false,
            _lock: None,
        })
    }

    fn create(root: PathBuf, shard_count: u32) -> Result<DataDir, DataDirError> {
        let router =
            Router::contiguous(shard_count).map_err(|_| DataDirError::ShardCount(shard_count))?;
        let existed = root.is_dir();
        create_dir_private(&root).map_err(|e| io_err("create data dir", &root, e))?;
        make_private_if_new(&root)?;
        if !existed {
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let created_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        write_meta(&root, &router, created_ms)?;
        tracing::info!(dir = %root.display(), shard_count, "created data directory");
        Ok(DataDir {
            root,
            router,
            created_ms,
            created: true,
            _lock: None,
        })
    }

    /// The data directory's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Number of logical shards.
    pub fn shard_count(&self) -> u32 {
        self.router.shard_count()
    }

    /// The routing table (virtual shard → shard) stored in the meta file.
    pub fn router(&self) -> &Router {
        &self.router
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
            shard.0 < self.shard_count(),
            "shard {shard} outside 0..{}",
            self.shard_count()
        );
        self.root.join(shard_dir_name(shard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reopens_with_the_stored_shard_count() {
        // The first open creates the meta file (format 2, contiguous table); a later open with
        // another count keeps the stored one (the core count may change between runs).
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        let d = DataDir::open_or_create(&root, 4).unwrap();
        assert!(d.was_created());
        assert_eq!(d.shard_count(), 4);
        assert_eq!(d.shard_dir(ShardId(3)), root.join("shard-0003"));
        let d2 = DataDir::open_or_create(&root, 16).unwrap();
        assert!(!d2.was_created());
        assert_eq!(d2.shard_count(), 4);
        assert_eq!(d2.router(), &Router::contiguous(4).unwrap());
        assert_eq!(d2.created_ms(), d.created_ms());
        assert!(!root.join("geobeat.meta.tmp").exists());
        let text = std::fs::read_to_string(root.join(META_FILE)).unwrap();
        assert!(
            text.contains("\"vshard_table\": [[0, 0], [1024, 1], [2048, 2], [3072, 3]]"),
            "{text}"
        );
    }

    #[test]
    fn a_stored_table_is_what_routes() {
        // A table written to the meta file (not the default for its count) is the one the
        // opened directory routes with.
        let dir = tempfile::tempdir().unwrap();
        let r = Router::from_ranges(2, &[(0, 1), (100, 0)]).unwrap();
        write_meta(dir.path(), &r, 5).unwrap();
        let d = DataDir::open_or_create(dir.path(), 7).unwrap();
        assert_eq!(d.router(), &r);
        assert_eq!(d.created_ms(), 5);
        assert_eq!(d.router().shard_of("123456789"), ShardId(0)); // vshard 643
        assert_eq!(d.router().shard_of("x"), ShardId(0)); // vshard 3987
    }

    #[test]
    fn refuses_bad_tables_with_a_clear_error() {
        // Each broken meta file is refused naming what is wrong: a bad table, another hash,
        // another virtual shard count, an unknown format, garbage.
        let dir = tempfile::tempdir().unwrap();
        DataDir::open_or_create(dir.path(), 2).unwrap();
        let meta = dir.path().join(META_FILE);
        let good = std::fs::read_to_string(&meta).unwrap();
        let cases = [
            (
                "[[0, 0], [2048, 1]]",
                "[[0, 0], [2048, 2]]",
                "names shard 2",
            ),
            (
                "[[0, 0], [2048, 1]]",
                "[[5, 0], [2048, 1]]",
                "start at virtual shard 0",
            ),
            (
                "[[0, 0], [2048, 1]]",
                "[[0, 0], [2048, 1], [9, 0]]",
                "range start 9",
            ),
            ("[[0, 0], [2048, 1]]", "[]", "start at virtual shard 0"),
            (
                "[[0, 0], [2048, 1]]",
                "[[0, 0, 1]]",
                "not a format-2 meta file",
            ),
            ("\"crc32c\"", "\"xxh3\"", "routing hash \"xxh3\""),
            (
                "\"vshards\": 4096",
                "\"vshards\": 1024",
                "1024 virtual shards",
            ),
            (
                "\"format_version\": 2",
                "\"format_version\": 3",
                "format version 3",
            ),
            ("\"shard_count\": 2", "\"shard_count\": 0", "shard count 0"),
        ];
        for (from, to, expect) in cases {
            assert!(good.contains(from), "{good}");
            std::fs::write(&meta, good.replace(from, to)).unwrap();
            let err = DataDir::open_or_create(dir.path(), 2).unwrap_err();
            assert!(matches!(err, DataDirError::Meta { .. }), "{to}: {err}");
            assert!(err.to_string().contains(expect), "{to}: {err}");
        }
        std::fs::write(&meta, good).unwrap();
        DataDir::open_or_create(dir.path(), 2).unwrap();
    }

    #[test]
    fn format_1_is_refused_with_the_migrate_command() {
        // A format-1 meta file (ahash routing) is not opened; the error names the command that
        // migrates it. `inspect` still reads it (for migrate and `geobeat sinks`).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(META_FILE),
            r#"{"format_version":1,"shard_count":3,"routing_fingerprint":"0x7210dc3e0f3e7c45","created_ms":9}"#,
        )
        .unwrap();
        let err = DataDir::open_or_create(dir.path(), 2).unwrap_err();
        assert!(matches!(err, DataDirError::NeedsMigration { .. }), "{err}");
        let want = format!("`geobeat migrate --data-dir {}`", dir.path().display());
        assert!(err.to_string().contains(&want), "{err}");
        let l = inspect(dir.path()).unwrap();
        assert_eq!((l.format_version, l.shard_count, l.created_ms), (1, 3, 9));
        assert!(l.router.is_none());
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

    #[test]
    fn the_lock_keeps_reshard_and_servers_apart() {
        // Servers share the directory lock; while one holds it an exclusive lock is refused, and
        // while an exclusive lock is held a server is refused with Busy.
        let dir = tempfile::tempdir().unwrap();
        let s1 = DataDir::open_for_serve(dir.path(), 2).unwrap();
        let s2 = DataDir::open_for_serve(dir.path(), 2).unwrap();
        assert!(lock(dir.path(), LockMode::Exclusive).unwrap().is_none());
        drop((s1, s2));
        let ex = lock(dir.path(), LockMode::Exclusive).unwrap().unwrap();
        let err = DataDir::open_for_serve(dir.path(), 2).unwrap_err();
        assert!(matches!(err, DataDirError::Busy { .. }), "{err}");
        drop(ex);
        DataDir::open_for_serve(dir.path(), 2).unwrap();
    }

    /// A data directory whose layout is `old` shard dirs (each holding a file naming it "old"),
    /// with a committed `reshard.ready` holding `new` shard dirs ("new"), a format-2 meta for
    /// them and a retired-cursors dir.
    fn committed_swap(root: &Path, old: u32, new: u32) {
        write_meta(root, &Router::contiguous(old).unwrap(), 1).unwrap();
        for k in 0..old {
            let d = root.join(shard_dir_name(ShardId(k)));
            std::fs::create_dir_all(d.join(QUARANTINE_DIR)).unwrap();
            std::fs::write(d.join("who"), "old").unwrap();
        }
        std::fs::write(root.join("shard-0000/quarantine/x.seg.1"), "damaged").unwrap();
        std::fs::write(root.join("secret"), "s").unwrap();
        let staging = root.join(STAGING_DIR);
        std::fs::create_dir_all(&staging).unwrap();
        let mut names = Vec::new();
        for k in 0..new {
            let name = shard_dir_name(ShardId(k));
            std::fs::create_dir_all(staging.join(&name)).unwrap();
            std::fs::write(staging.join(&name).join("who"), "new").unwrap();
            names.push(name);
        }
        std::fs::create_dir_all(staging.join(RETIRED_CURSORS_DIR)).unwrap();
        names.push(RETIRED_CURSORS_DIR.into());
        std::fs::write(staging.join(LAYOUT_FILE), names.join("\n")).unwrap();
        write_meta(&staging, &Router::contiguous(new).unwrap(), 1).unwrap();
        commit_staging(root).unwrap();
    }

    /// Asserts `root` is exactly the new layout of `committed_swap(root, _, new)`.
    fn assert_new_layout(root: &Path, new: u32) {
        let mut names: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want: Vec<String> = (0..new).map(|k| shard_dir_name(ShardId(k))).collect();
        want.extend([META_FILE, QUARANTINE_DIR, RETIRED_CURSORS_DIR, "secret"].map(String::from));
        want.sort();
        assert_eq!(names, want);
        for k in 0..new {
            let who = root.join(shard_dir_name(ShardId(k))).join("who");
            assert_eq!(std::fs::read_to_string(who).unwrap(), "new");
        }
        assert_eq!(inspect(root).unwrap().shard_count, new);
        let kept: Vec<_> = std::fs::read_dir(root.join(QUARANTINE_DIR))
            .unwrap()
            .collect();
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn a_swap_interrupted_anywhere_finishes_on_the_next_run() {
        // For 3 -> 2 and 2 -> 3 shards, crash the swap after every possible number of file-system
        // steps (0 = right after the commit): before step 3 the meta file still describes the old
        // layout, and one more finish_swap always ends in exactly the new layout, with the
        // damaged-segment copy kept and the other root files untouched.
        for (old, new) in [(3, 2), (2, 3)] {
            let mut total = None;
            for budget in 0.. {
                let dir = tempfile::tempdir().unwrap();
                committed_swap(dir.path(), old, new);
                let mut b = Some(budget);
                assert!(finish_swap_steps(dir.path(), &mut b).unwrap());
                if !dir.path().join(READY_DIR).exists() {
                    total = Some(budget);
                    assert_new_layout(dir.path(), new);
                    break;
                }
                if dir.path().join(READY_DIR).join(META_FILE).exists() {
                    assert_eq!(inspect(dir.path()).unwrap().shard_count, old);
                }
                assert!(finish_swap(dir.path()).unwrap());
                assert_new_layout(dir.path(), new);
                assert!(!finish_swap(dir.path()).unwrap());
            }
            assert!(total.unwrap() >= old + new + 3, "{total:?}");
        }
    }
}
