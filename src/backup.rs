//! `geobeat backup` and `geobeat restore`: a consistent copy of a data directory taken while a
//! server runs on it, and its verified installation into a new directory. It owns the backup
//! procedure (which files, in which order, cut where), the manifest (`geobeat-backup.json`; see
//! README.md "Operations", "Backup and restore") and the checks `restore` runs before installing.
//! It does not talk to the server, write the live directory's files (it only fdatasyncs the
//! newest segment, and takes `geobeat.lock` shared as a server does, never a shard's `LOCK`), or
//! decide the log format (`log`) or the checkpoint's (`checkpoint`): it reads them with their
//! own parsers.
//!
//! Why a copy taken under a running server is consistent, per shard: cursor files are copied
//! first (a cursor only names durable entries, so it never points past the log the backup will
//! hold); a segment with a successor is complete, durable and never written again, so it is
//! hard-linked (copied across file systems); the newest listed segment is copied from the page
//! cache, then fdatasync'ed in the live directory, so every byte copied is durable there, and the
//! copy is cut where recovery would stop (length, CRC32C, sequence number, record validation):
//! every heartbeat acked before the backup started is in it. Retention writes the checkpoint
//! before it deletes segments, so if the checkpoint is byte-identical before and after the
//! segments were taken, the two agree; otherwise (or if a listed segment vanished) the shard is
//! taken again, up to `BACKUP_ATTEMPTS_MAX` times.
//!
//! Invariants: every file of a backup is named in its manifest with its length and CRC32C, and
//! the manifest is written last, so a backup without one is unfinished and refused; each shard
//! of a backup is a log the server's recovery accepts as it is (sealed segments whole, the last
//! one cut at an entry boundary and zero past it, so no torn tail and no damage) and every entry
//! in it was durable in the live directory when the backup finished; the checkpoint's covered
//! position lies within the backed-up segments; cursors never point past the backed-up log end;
//! `restore` installs nothing unless every file and every shard verifies, and never writes into
//! a non-empty directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use memmap2::{Mmap, MmapMut};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, CHECKPOINT_FILE};
use crate::datadir::{
    self, LockMode, FILE_MODE, LOCK_FILE, META_FILE, OLD_DIR, READY_DIR, STAGING_DIR,
};
use crate::limits::{BACKUP_ATTEMPTS_MAX, BACKUP_COPY_CHUNK_BYTES, BACKUP_MANIFEST_BYTES_MAX};
use crate::limits::{ENTRY_ALIGN_BYTES, SEGMENT_HEADER_BYTES};
use crate::log::chain::CHAIN_SUFFIX;
use crate::log::format::{parse_entry, parse_segment_file_name, segment_file_name, SegmentHeader};
use crate::record;
use crate::route::ShardId;

/// File name of a backup's manifest (written last: its presence marks a finished backup).
pub const MANIFEST_FILE: &str = "geobeat-backup.json";
/// Version of the manifest layout.
pub const MANIFEST_FORMAT: u32 = 1;
/// Name of a shard directory's lock file (held by the server; never copied).
const SHARD_LOCK_FILE: &str = crate::log::LOCK_FILE;
/// The quarantine directories (forensic copies; never part of a backup).
const QUARANTINE_DIR: &str = crate::log::recovery::QUARANTINE_DIR;

/// Why a backup or restore failed.
#[derive(Debug)]
pub enum Error {
    /// Bad input or a state the command will not work on; nothing was changed. The text names
    /// the problem and the fix.
    Refused(String),
    /// A file operation failed.
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Refused(msg) => f.write_str(msg),
            Error::Io { op, path, source } => write!(f, "{op} {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The process exit code: 2 when refused, 1 on an I/O failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Refused(_) => 2,
            Error::Io { .. } => 1,
        }
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The manifest: everything `restore` checks before it installs anything.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// When the backup finished, ms since the Unix epoch.
    pub created_ms: i64,
    /// The data directory it was taken from.
    pub source: String,
    /// Shard count of the source's meta file.
    pub shard_count: u32,
    /// Every file of the backup (paths relative to the backup, `/`-separated), in copy order.
    pub files: Vec<FileRecord>,
    /// Per shard: the log the backup holds.
    pub shards: Vec<ShardRecord>,
}

/// One file of a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileRecord {
    /// Relative path (`shard-0000/00000000000000000000.seg`).
    pub path: String,
    /// Length in bytes.
    pub bytes: u64,
    /// CRC32C of the whole file.
    pub crc32c: u32,
}

/// One shard's log in a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShardRecord {
    /// Shard number.
    pub shard: u32,
    /// Segments, in base order.
    pub segments: Vec<SegmentRecord>,
    /// Entries in all segments.
    pub entries: u64,
    /// Log end: the position just past the last entry (the backup's position for this shard).
    pub end_pos: u64,
    /// Sequence number the next entry would get (last entry's + 1).
    pub next_seq: u64,
    /// The checkpoint's covered position, if the shard has a checkpoint.
    pub checkpoint_covered: Option<u64>,
}

/// One segment file of a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SegmentRecord {
    /// Base position (the file name).
    pub base: u64,
    /// Sequence number of its first entry.
    pub first_seq: u64,
    /// Entries in it.
    pub entries: u64,
    /// Byte range of entries within the file: `[4096, data_end)`; zero from there on.
    pub data_end: u64,
    /// Whether the backup holds it as a hard link to the live file (sealed segment, same file
    /// system) rather than a copy.
    pub linked: bool,
}

/// What a backup did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The manifest written.
    pub manifest: Manifest,
    /// Shard attempts repeated because retention changed the shard while it was copied.
    pub retries: u32,
    /// Wall time.
    pub elapsed: std::time::Duration,
}

impl Report {
    /// One line for the operator.
    pub fn summary(&self, from: &Path, to: &Path) -> String {
        let m = &self.manifest;
        let segments: usize = m.shards.iter().map(|s| s.segments.len()).sum();
        let linked: usize = m
            .shards
            .iter()
            .map(|s| s.segments.iter().filter(|g| g.linked).count())
            .sum();
        let entries: u64 = m.shards.iter().map(|s| s.entries).sum();
        let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
        let positions: Vec<String> = m
            .shards
            .iter()
            .map(|s| {
                format!(
                    "{} up to seq {}",
                    datadir::shard_dir_name(ShardId(s.shard)),
                    s.next_seq.saturating_sub(1)
                )
            })
            .collect();
        format!(
            "{} backed up to {}: {} shards, {entries} entries in {segments} segments ({linked} \
             hard-linked), {} files, {bytes} bytes, in {:.3} s{}; {}",
            from.display(),
            to.display(),
            m.shard_count,
            m.files.len(),
            self.elapsed.as_secs_f64(),
            if self.retries > 0 {
                format!(
                    " ({} shard copies repeated: retention ran meanwhile)",
                    self.retries
                )
            } else {
                String::new()
            },
            positions.join(", ")
        )
    }
}

// ----------------------------------------------------------------------------------------------
// Reading a segment the way recovery does.

/// What a scan of one segment found.
struct Scanned {
    header: SegmentHeader,
    entries: u64,
    next_seq: u64,
    /// Offset just past the last valid entry.
    data_end: usize,
    /// Whether every byte from `data_end` on is zero (a clean end).
    clean: bool,
}

/// Scans one segment's bytes with the log's own parsers (header, then entries: length, CRC,
/// expected sequence number, rkyv and record validation), stopping at the first entry that
/// fails, exactly where recovery would stop. `bytes` must be page aligned (a mapping).
fn scan_segment(bytes: &[u8], shard: ShardId, base: u64) -> Result<Scanned, String> {
    let header = SegmentHeader::decode(bytes).map_err(|f| format!("bad segment header ({f:?})"))?;
    if header.shard != shard.0 {
        return Err(format!("header names shard {}", header.shard));
    }
    if header.base != base {
        return Err(format!(
            "header base {} differs from the file name",
            header.base
        ));
    }
    if header.segment_bytes != bytes.len() as u64 {
        return Err(format!(
            "file is {} bytes, its header says {}",
            bytes.len(),
            header.segment_bytes
        ));
    }
    let mut off = SEGMENT_HEADER_BYTES;
    let mut seq = header.first_seq;
    let mut entries = 0;
    while let Ok(raw) = parse_entry(bytes, off) {
        if raw.seq != seq || record::access_payload(raw.payload, raw.flags).is_none() {
            break;
        }
        seq += 1;
        entries += 1;
        off += raw.total_bytes;
        debug_assert!(off % ENTRY_ALIGN_BYTES == 0);
    }
    Ok(Scanned {
        header,
        entries,
        next_seq: seq,
        data_end: off,
        clean: bytes[off..].iter().all(|&b| b == 0),
    })
}

fn map_read(path: &Path) -> Result<Mmap, Error> {
    let file = File::open(path).map_err(io("open", path))?;
    // SAFETY: backup files are only written by this process before they are mapped; a hard link
    // names a sealed segment, which the server never writes again (see `shards/README.md`).
    unsafe { Mmap::map(&file) }.map_err(io("mmap", path))
}

fn crc_of_file(path: &Path) -> Result<(u64, u32), Error> {
    let mut f = File::open(path).map_err(io("open", path))?;
    let mut buf = vec![0u8; BACKUP_COPY_CHUNK_BYTES];
    let (mut n, mut crc) = (0u64, 0u32);
    loop {
        let k = f.read(&mut buf).map_err(io("read", path))?;
        if k == 0 {
            return Ok((n, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..k]);
        n += k as u64;
    }
}

// ----------------------------------------------------------------------------------------------
// Backup.

fn rel(path: &Path, root: &Path) -> String {
    path.strip_prefix(root)
        .expect("backup paths lie under the backup")
        .to_string_lossy()
        .into_owned()
}

/// Copies `src` to `dst` (mode 0600, created new) with plain reads, so the bytes come from the
/// page cache as the server wrote them (no reflink or in-kernel copy), fsyncs it, and returns
/// its length.
fn copy_file(src: &Path, dst: &Path) -> Result<u64, Error> {
    let mut from = File::open(src).map_err(io("open", src))?;
    copy_from(&mut from, src, dst)
}

/// [`copy_file`] from an open file (`src` names it in errors).
fn copy_from(from: &mut File, src: &Path, dst: &Path) -> Result<u64, Error> {
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(dst)
        .map_err(io("create", dst))?;
    let mut buf = vec![0u8; BACKUP_COPY_CHUNK_BYTES];
    let mut n = 0u64;
    loop {
        let k = from.read(&mut buf).map_err(io("read", src))?;
        if k == 0 {
            break;
        }
        to.write_all(&buf[..k]).map_err(io("write", dst))?;
        n += k as u64;
    }
    to.sync_all().map_err(io("fsync", dst))?;
    Ok(n)
}

fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// Copies the plain files and directories under `src` into `dst` (created 0700), skipping
/// temporary files, lock files, segments, checkpoints and quarantine (handled elsewhere or
/// never backed up). Returns the copied files.
fn copy_tree(src: &Path, dst: &Path, top: bool) -> Result<Vec<PathBuf>, Error> {
    datadir::create_dir_private(dst).map_err(io("create directory", dst))?;
    let mut names: Vec<_> = std::fs::read_dir(src)
        .map_err(io("list", src))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io("list", src))?;
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let Some(n) = name.to_str() else { continue };
        let skip = n.ends_with(".tmp")
            || n == QUARANTINE_DIR
            || (top && (n == LOCK_FILE || n == STAGING_DIR || n == READY_DIR || n == OLD_DIR))
            || n == SHARD_LOCK_FILE
            || n == CHECKPOINT_FILE
            || parse_segment_file_name(n).is_some()
            || n.ends_with(CHAIN_SUFFIX)
            || (top && n.starts_with("shard-"));
        if skip {
            continue;
        }
        let (s, d) = (src.join(&name), dst.join(&name));
        // A file removed since the listing (an audit file rotated away, a directory emptied)
        // is simply not part of the backup; anything replaced by a rename is copied as one
        // whole version (the server replaces its files atomically).
        let meta = match std::fs::symlink_metadata(&s) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            r => r.map_err(io("stat", &s))?,
        };
        if meta.is_dir() {
            match copy_tree(&s, &d, false) {
                Err(e) if is_not_found(&e) && !s.exists() => {
                    let _ = std::fs::remove_dir_all(&d);
                }
                r => out.extend(r?),
            }
        } else if meta.is_file() {
            out.extend(copy_unless_gone(&s, &d)?);
        }
    }
    Ok(out)
}

/// Copies the hash-chain sidecars (`log::chain`) of the shard directory `src` into `dst`, newest
/// first, before the segments are taken: a sidecar covers only entries durable when it was
/// written, so none covers more than the segments copied after it; and since a sidecar is
/// created only after its predecessor's seal record was synced, copying newest first never
/// pairs a sidecar with an unsealed predecessor (only the newest one can end in a record being
/// written, which the next open cuts back). Returns the copied files.
fn copy_chain_sidecars(src: &Path, dst: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut names: Vec<String> = std::fs::read_dir(src)
        .map_err(io("list", src))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(CHAIN_SUFFIX))
        .collect();
    names.sort_unstable_by(|a, b| b.cmp(a));
    let mut out = Vec::new();
    for n in names {
        // A sidecar deleted with its segment by retention since the listing is skipped.
        out.extend(copy_unless_gone(&src.join(&n), &dst.join(&n))?);
    }
    Ok(out)
}

/// Copies file `s` to `d` and returns `d`, or `None` (and no partial `d`) if `s` vanished
/// meanwhile (retention deleted it since the listing).
fn copy_unless_gone(s: &Path, d: &Path) -> Result<Option<PathBuf>, Error> {
    match copy_file(s, d) {
        Err(e) if is_not_found(&e) && !s.exists() => {
            let _ = std::fs::remove_file(d);
            Ok(None)
        }
        r => {
            r?;
            Ok(Some(d.to_path_buf()))
        }
    }
}

/// Copies the newest segment `src` to `dst` (0600, created new) from the start up to, not
/// including, the first all-zero chunk past the header, and gives the copy `src`'s length (the
/// rest a hole): entries are appended in order, so nothing after a zero chunk was there when it
/// was read, and the cut lands at or before it anyway. This spares writing the unused part of
/// the segment (most of 64 MiB); `restore` writes every byte, so the installed segment is fully
/// allocated as the server requires. Returns the bytes copied.
fn copy_segment_prefix(src: &Path, dst: &Path) -> Result<usize, Error> {
    let mut from = File::open(src).map_err(io("open", src))?;
    let len = from.metadata().map_err(io("stat", src))?.len();
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(dst)
        .map_err(io("create", dst))?;
    let mut buf = vec![0u8; BACKUP_COPY_CHUNK_BYTES];
    let mut copied = 0usize;
    loop {
        let k = read_full(&mut from, &mut buf).map_err(io("read", src))?;
        if k == 0 || (copied >= SEGMENT_HEADER_BYTES && buf[..k].iter().all(|&b| b == 0)) {
            break;
        }
        to.write_all(&buf[..k]).map_err(io("write", dst))?;
        copied += k;
    }
    to.set_len(len.max(copied as u64))
        .and_then(|()| to.sync_all())
        .map_err(io("fsync", dst))?;
    Ok(copied)
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Hard-links `src` at `dst`, or copies it when they are on different file systems (or the file
/// system has no hard links). Returns whether it linked.
fn link_or_copy(src: &Path, dst: &Path) -> Result<bool, Error> {
    match std::fs::hard_link(src, dst) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(io("link", src)(e)),
        Err(_) => copy_file(src, dst).map(|_| false),
    }
}

/// Extends a copied last segment shorter than its header's size with zeros, as recovery does
/// (a crash during a stopped server's preallocation can leave one). A file too short for a
/// header is left alone: the scan refuses it.
fn extend_to_recorded_size(file: &File, path: &Path) -> Result<(), Error> {
    let mut head = vec![0u8; SEGMENT_HEADER_BYTES];
    let len = file.metadata().map_err(io("stat", path))?.len();
    if len < SEGMENT_HEADER_BYTES as u64 {
        return Ok(());
    }
    std::os::unix::fs::FileExt::read_exact_at(file, &mut head, 0).map_err(io("read", path))?;
    if let Ok(h) = SegmentHeader::decode(&head) {
        if len < h.segment_bytes && h.segment_bytes <= crate::limits::SEGMENT_BYTES_MAX {
            file.set_len(h.segment_bytes)
                .and_then(|_| file.sync_all())
                .map_err(io("extend", path))?;
        }
    }
    Ok(())
}

/// The segment files of a shard directory, in base order.
fn list_segments(dir: &Path) -> Result<Vec<u64>, Error> {
    let mut bases = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let e = e.map_err(io("list", dir))?;
        if let Some(b) = e.file_name().to_str().and_then(parse_segment_file_name) {
            bases.push(b);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Which version of a file replaced only by rename (the checkpoint) a name or descriptor holds:
/// device, inode, and the inode's size and change times (an inode number freed by one rename
/// can be reused by a later version; its times cannot go back).
type FileVersion = (u64, u64, u64, i64, i64, i64, i64);

fn version_of(meta: &std::fs::Metadata) -> FileVersion {
    use std::os::unix::fs::MetadataExt as _;
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

fn version_at(path: &Path) -> Result<Option<FileVersion>, Error> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(version_of(&m))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("stat", path)(e)),
    }
}

/// One attempt at one shard: `Ok(None)` when retention changed the shard meanwhile (the caller
/// clears the directory and tries again).
fn backup_shard_once(
    shard: ShardId,
    src: &Path,
    dst: &Path,
    taken: &mut dyn FnMut(ShardId),
) -> Result<Option<(ShardRecord, Vec<PathBuf>)>, Error> {
    // Retention writes the checkpoint (a new file renamed over the old one), then deletes
    // segments below its position: if the checkpoint is the same version before and after the
    // segments were taken, they and it agree.
    let ckpt_path = src.join(CHECKPOINT_FILE);
    let ckpt_before = version_at(&ckpt_path)?;
    let bases = list_segments(src)?;
    let mut files = Vec::new();
    let mut segments = Vec::new();
    let last_index = bases.len().checked_sub(1);
    // Bytes of the last segment copied (the rest of the copy is a hole, reading as zeros).
    let mut last_copied = 0usize;
    for (i, &base) in bases.iter().enumerate() {
        let name = segment_file_name(base);
        let (s, d) = (src.join(&name), dst.join(&name));
        let linked = if Some(i) == last_index {
            // Only the written part is copied (see `copy_segment_prefix`).
            // The active segment (or one sealed since the listing): copy it, then make durable
            // everything the copy read. fdatasync writes back every dirty page of the file, so
            // each byte copied from the page cache is on disk in the live directory when it
            // returns: the backup holds only durable entries (also under `--durability relaxed`).
            let r = copy_segment_prefix(&s, &d).and_then(|copied| {
                File::open(&s)
                    .and_then(|f| f.sync_data())
                    .map_err(io("fdatasync", &s))
                    .map(|()| copied)
            });
            match r {
                Err(e) if is_not_found(&e) => return Ok(None),
                r => last_copied = r?,
            }
            false
        } else {
            match link_or_copy(&s, &d) {
                Err(e) if is_not_found(&e) => return Ok(None),
                r => r?,
            }
        };
        segments.push((base, linked));
        files.push(d);
    }
    taken(shard);
    if let Some(before) = ckpt_before {
        // Copied from the descriptor whose version is checked, so the bytes are that version's.
        let mut from = match File::open(&ckpt_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            r => r.map_err(io("open", &ckpt_path))?,
        };
        let meta = from.metadata().map_err(io("stat", &ckpt_path))?;
        if version_of(&meta) != before {
            return Ok(None);
        }
        let d = dst.join(CHECKPOINT_FILE);
        copy_from(&mut from, &ckpt_path, &d)?;
        files.push(d);
    } else if version_at(&ckpt_path)?.is_some() {
        return Ok(None);
    }
    // Cut the copied last segment at its last valid entry and check the sealed ones whole.
    let mut records = Vec::new();
    let mut next: Option<(u64, u64)> = None;
    for (i, &(base, linked)) in segments.iter().enumerate() {
        let path = dst.join(segment_file_name(base));
        let last = Some(i) == last_index;
        let scanned = if last {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io("open", &path))?;
            extend_to_recorded_size(&file, &path)?;
            // SAFETY: a private copy this process just wrote; nobody else maps it.
            let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(io("mmap", &path))?;
            let s = scan_segment(&map, shard, base).map_err(|why| {
                Error::Refused(format!(
                    "{}: {why}; the server's recovery quarantines (or, as the first segment, \
                     refuses) it at its next start, see shards/README.md \"Recovery and the \
                     damage policy\"; start the server once, then back up; nothing backed up",
                    src.join(segment_file_name(base)).display()
                ))
            })?;
            // Bytes past the last valid entry: an entry being written while copied, or written
            // after the commit the copy caught. Zero them so the copy ends cleanly.
            // Only up to what was copied: the hole after it is zero already, and writing zeros
            // there would allocate it.
            let copied_end = last_copied.min(map.len());
            if copied_end > s.data_end {
                map[s.data_end..copied_end].fill(0);
            }
            map.flush().map_err(io("msync", &path))?;
            Scanned { clean: true, ..s }
        } else {
            let map = map_read(&path)?;
            scan_segment(&map, shard, base)
                .and_then(|s| {
                    if s.clean {
                        Ok(s)
                    } else {
                        Err(format!("bad entry at offset {}", s.data_end))
                    }
                })
                .map_err(|why| {
                    Error::Refused(format!(
                        "sealed segment {} is damaged ({why}); the server quarantines it at its \
                         next start (see shards/README.md \"Recovery and the damage policy\"); \
                         nothing backed up",
                        src.join(segment_file_name(base)).display()
                    ))
                })?
        };
        if let Err(why) = continues(next, &scanned.header) {
            return Err(Error::Refused(format!(
                "segment {} {why}: the shard's log has a gap (a segment file removed by hand?); \
                 nothing backed up",
                src.join(segment_file_name(base)).display(),
            )));
        }
        next = Some((
            scanned.header.base + scanned.header.segment_bytes,
            scanned.next_seq,
        ));
        records.push(SegmentRecord {
            base,
            first_seq: scanned.header.first_seq,
            entries: scanned.entries,
            data_end: scanned.data_end as u64,
            linked,
        });
    }
    let record = shard_record(shard, records, dst)?;
    Ok(Some((record, files)))
}

/// Whether a segment with `header` may follow the segment before it, given as (its end position,
/// the sequence number after its last entry): positions and sequence numbers are contiguous
/// across segments, as recovery requires.
fn continues(prev: Option<(u64, u64)>, header: &SegmentHeader) -> Result<(), String> {
    match prev {
        Some((end, _)) if header.base != end => Err(format!(
            "starts at position {}, but the segment before it ends at {end}",
            header.base
        )),
        Some((_, seq)) if header.first_seq != seq => Err(format!(
            "starts at sequence number {}, but the segment before it ends before {seq}",
            header.first_seq
        )),
        _ => Ok(()),
    }
}

/// The shard record of a backed-up shard directory, checking its checkpoint against its segments.
fn shard_record(
    shard: ShardId,
    segments: Vec<SegmentRecord>,
    dir: &Path,
) -> Result<ShardRecord, Error> {
    let entries = segments.iter().map(|s| s.entries).sum();
    let (first_pos, end_pos, next_seq) = match (segments.first(), segments.last()) {
        (Some(f), Some(l)) => (f.base, l.base + l.data_end, l.first_seq + l.entries),
        _ => (0, 0, 1),
    };
    let ckpt = Checkpoint::open(shard, dir)
        .map_err(|e| Error::Refused(format!("checkpoint of shard {}: {e}", shard.0)))?;
    let checkpoint_covered = ckpt.map(|c| c.covered().0);
    if let Some(b) = checkpoint_covered {
        if !segments.is_empty() && (b < first_pos || b > end_pos) {
            return Err(Error::Refused(format!(
                "shard {}: the checkpoint covers up to position {b}, but the segments hold \
                 [{first_pos}, {end_pos})",
                shard.0
            )));
        }
    }
    Ok(ShardRecord {
        shard: shard.0,
        segments,
        entries,
        end_pos,
        next_seq,
        checkpoint_covered,
    })
}

fn clear_dir(dir: &Path) -> Result<(), Error> {
    std::fs::remove_dir_all(dir).map_err(io("remove", dir))
}

/// Whether `dir` is absent or an empty directory.
fn absent_or_empty(dir: &Path) -> Result<bool, Error> {
    match std::fs::read_dir(dir) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(false),
        Err(e) => Err(io("list", dir)(e)),
    }
}

fn write_manifest(to: &Path, manifest: &Manifest) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(manifest).expect("the manifest serialises");
    let tmp = to.join(format!("{MANIFEST_FILE}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io("write", &tmp))?;
    let path = to.join(MANIFEST_FILE);
    std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
    sync_dir(to)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))
}

/// `path` made absolute with its symbolic links resolved, also when its last components do not
/// exist yet (they are appended to the nearest existing ancestor).
fn resolved(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut p = path;
    loop {
        if let Ok(c) = p.canonicalize() {
            return rest.iter().rev().fold(c, |acc, name| acc.join(name));
        }
        match (p.parent(), p.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                p = if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                };
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Refuses a backup directory inside the data directory (it would copy itself and be deleted
/// with the data) or containing it.
fn refuse_nested(root: &Path, to: &Path) -> Result<(), Error> {
    let (r, t) = (resolved(root), resolved(to));
    if t.starts_with(&r) || r.starts_with(&t) {
        return Err(Error::Refused(format!(
            "{} lies inside the data directory {} (or contains it); name a directory outside \
             it with --to (nothing was written)",
            to.display(),
            root.display()
        )));
    }
    Ok(())
}

/// Backs up the data directory `root` into the new directory `to` (absent or empty), while a
/// server may be running on `root`. See the module doc and `shards/README.md`.
pub fn backup(root: &Path, to: &Path) -> Result<Report, Error> {
    backup_observed(root, to, &mut |_| {})
}

/// [`backup`], calling `taken(shard)` each time a shard's segments have been taken, before its
/// checkpoint is read again: the seam where a test runs retention at the worst moment.
fn backup_observed(
    root: &Path,
    to: &Path,
    taken: &mut dyn FnMut(ShardId),
) -> Result<Report, Error> {
    let started = Instant::now();
    if !root.join(META_FILE).is_file() {
        return Err(Error::Refused(format!(
            "{} is not a geobeat data directory (it has no {META_FILE}); pass the directory \
             the server runs on with --data-dir",
            root.display()
        )));
    }
    if !absent_or_empty(to)? {
        return Err(Error::Refused(format!(
            "{} already exists and is not an empty directory; name a new directory with --to \
             (nothing was written)",
            to.display()
        )));
    }
    refuse_nested(root, to)?;
    // Shared, like a server: a reshard or migrate (exclusive) cannot start while the backup runs,
    // and a running one refuses the backup.
    let _lock = datadir::lock(root, LockMode::Shared)
        .map_err(|e| Error::Refused(e.to_string()))?
        .ok_or_else(|| {
            Error::Refused(format!(
                "{} is being rewritten by `geobeat reshard` or `migrate` (geobeat.lock is held \
                 exclusively); run the backup after it finishes",
                root.display()
            ))
        })?;
    if root.join(READY_DIR).exists() {
        return Err(Error::Refused(format!(
            "{} has an unfinished layout change ({READY_DIR}); start the server once (it finishes \
             the change), then back up",
            root.display()
        )));
    }
    let layout = datadir::inspect(root).map_err(|e| Error::Refused(e.to_string()))?;
    if layout.router.is_none() {
        return Err(Error::Refused(format!(
            "{} is format {}; migrate it first (`geobeat migrate --data-dir {}`)",
            root.display(),
            layout.format_version,
            root.display()
        )));
    }
    let created_here = !to.exists();
    let result = backup_into(root, to, layout.shard_count, taken);
    match result {
        Ok((manifest, retries)) => Ok(Report {
            manifest,
            retries,
            elapsed: started.elapsed(),
        }),
        Err(e) => {
            // Leave no half backup behind (it has no manifest, so restore would refuse it).
            if created_here {
                let _ = std::fs::remove_dir_all(to);
            } else if let Ok(entries) = std::fs::read_dir(to) {
                for e in entries.flatten() {
                    let p = e.path();
                    let _ = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
            }
            Err(e)
        }
    }
}

fn backup_into(
    root: &Path,
    to: &Path,
    shard_count: u32,
    taken: &mut dyn FnMut(ShardId),
) -> Result<(Manifest, u32), Error> {
    // Root files first (meta, secret, geofences, retired cursors); then per shard its cursors
    // (before its segments, so no cursor points past the backed-up log end), segments and
    // checkpoint.
    let mut paths = copy_tree(root, to, true)?;
    // An existing empty target keeps whatever mode it had: make it as private as the data.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(datadir::DIR_MODE))
            .map_err(io("chmod", to))?;
    }
    let mut shards = Vec::new();
    let mut retries = 0;
    for k in 0..shard_count {
        let shard = ShardId(k);
        let name = datadir::shard_dir_name(shard);
        let (src, dst) = (root.join(&name), to.join(&name));
        if !src.is_dir() {
            // A shard that never opened has no directory; the server creates it.
            continue;
        }
        let mut attempt = 0;
        loop {
            let mut files = copy_tree(&src, &dst, false)?;
            files.extend(copy_chain_sidecars(&src, &dst)?);
            if let Some((record, more)) = backup_shard_once(shard, &src, &dst, taken)? {
                files.extend(more);
                paths.extend(files);
                shards.push(record);
                break;
            }
            attempt += 1;
            retries += 1;
            if attempt >= BACKUP_ATTEMPTS_MAX {
                return Err(Error::Refused(format!(
                    "shard {k} changed under the backup {attempt} times in a row (retention \
                     deleting segments); try again"
                )));
            }
            clear_dir(&dst)?;
        }
        sync_dir(&dst)?;
    }
    sync_dir(to)?;
    let mut files = Vec::with_capacity(paths.len());
    for p in &paths {
        let (bytes, crc32c) = crc_of_file(p)?;
        files.push(FileRecord {
            path: rel(p, to),
            bytes,
            crc32c,
        });
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        created_ms: crate::rt::now_ms(),
        source: resolved(root).display().to_string(),
        shard_count,
        files,
        shards,
    };
    write_manifest(to, &manifest)?;
    Ok((manifest, retries))
}

// ----------------------------------------------------------------------------------------------
// Restore.

/// Reads and checks a backup's manifest.
fn read_manifest(from: &Path) -> Result<Manifest, Error> {
    let path = from.join(MANIFEST_FILE);
    let refused = |why: String| {
        Error::Refused(format!(
            "{} is not a usable geobeat backup: {why}",
            from.display()
        ))
    };
    let len = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(_) if !from.is_dir() => {
            return Err(Error::Refused(format!(
                "{} is not a directory; name the directory `geobeat backup --to` wrote with \
                 --from (nothing was restored)",
                from.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refused(format!(
                "it has no {MANIFEST_FILE} (an unfinished backup, or not a backup); name the \
                 directory `geobeat backup --to` wrote with --from (nothing was restored)"
            )))
        }
        Err(e) => return Err(io("stat", &path)(e)),
    };
    if len > BACKUP_MANIFEST_BYTES_MAX {
        return Err(refused(format!(
            "{MANIFEST_FILE} is {len} bytes, larger than any manifest"
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(io("read", &path))?;
    let m: Manifest = serde_json::from_str(&text)
        .map_err(|e| refused(format!("{MANIFEST_FILE} is not a valid manifest: {e}")))?;
    if m.format != MANIFEST_FORMAT {
        return Err(refused(format!(
            "manifest format {} (this build reads {MANIFEST_FORMAT})",
            m.format
        )));
    }
    for f in &m.files {
        let p = Path::new(&f.path);
        let plain = p
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain || f.path.is_empty() {
            return Err(refused(format!("manifest names the path {:?}", f.path)));
        }
    }
    Ok(m)
}

/// Checks every file (length, CRC32C) and every shard (segments scanned as recovery would,
/// counts and positions as recorded, checkpoint valid and covered by the segments).
/// `dir` holds the files (the installed copy); `backup` names the backup in errors.
fn verify(dir: &Path, backup: &Path, m: &Manifest) -> Result<(), Error> {
    let bad = |why: String| {
        Error::Refused(format!(
            "backup {} failed verification: {why}; nothing restored",
            backup.display()
        ))
    };
    for f in &m.files {
        let p = dir.join(&f.path);
        let (bytes, crc) = match crc_of_file(&p) {
            Err(e) if is_not_found(&e) => return Err(bad(format!("{} is missing", f.path))),
            r => r?,
        };
        if bytes != f.bytes || crc != f.crc32c {
            return Err(bad(format!(
                "{} is {bytes} bytes with CRC32C {crc:08x}, the manifest says {} bytes with \
                 {:08x}",
                f.path, f.bytes, f.crc32c
            )));
        }
    }
    let layout = datadir::inspect(dir).map_err(|e| bad(e.to_string()))?;
    if layout.shard_count != m.shard_count {
        return Err(bad(format!(
            "{META_FILE} has {} shards, the manifest {}",
            layout.shard_count, m.shard_count
        )));
    }
    // Every segment file installed is one the shard checks below scan (sets: a manifest can
    // name millions of files).
    let file_paths: std::collections::HashSet<&str> =
        m.files.iter().map(|f| f.path.as_str()).collect();
    let dir_names: Vec<String> = m
        .shards
        .iter()
        .map(|s| datadir::shard_dir_name(ShardId(s.shard)))
        .collect();
    let segment_paths: std::collections::HashSet<(&str, u64)> = m
        .shards
        .iter()
        .zip(&dir_names)
        .flat_map(|(s, d)| s.segments.iter().map(move |g| (d.as_str(), g.base)))
        .collect();
    let mut shards_seen = std::collections::BTreeSet::new();
    for s in &m.shards {
        if s.shard >= m.shard_count || !shards_seen.insert(s.shard) {
            return Err(bad(format!(
                "the manifest lists shard {} twice or beyond the shard count {}",
                s.shard, m.shard_count
            )));
        }
    }
    for f in &m.files {
        let mut parts = f.path.split('/');
        let (Some(dir), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Some(base) = parse_segment_file_name(name) else {
            continue;
        };
        if !segment_paths.contains(&(dir, base)) {
            return Err(bad(format!(
                "{} is not among the manifest's shard segments",
                f.path
            )));
        }
    }
    for s in &m.shards {
        let shard = ShardId(s.shard);
        let dir = dir.join(datadir::shard_dir_name(shard));
        let mut records = Vec::new();
        let mut next: Option<(u64, u64)> = None;
        for g in &s.segments {
            let name = segment_file_name(g.base);
            let listed = format!("{}/{name}", datadir::shard_dir_name(shard));
            if !file_paths.contains(listed.as_str()) {
                return Err(bad(format!("{listed} is not among the manifest's files")));
            }
            let map = map_read(&dir.join(&name))?;
            let sc =
                scan_segment(&map, shard, g.base).map_err(|why| bad(format!("{listed}: {why}")))?;
            if !sc.clean {
                return Err(bad(format!(
                    "{listed}: bad entry at offset {}",
                    sc.data_end
                )));
            }
            continues(next, &sc.header).map_err(|why| bad(format!("{listed} {why}")))?;
            next = Some((sc.header.base + sc.header.segment_bytes, sc.next_seq));
            records.push(SegmentRecord {
                base: g.base,
                first_seq: sc.header.first_seq,
                entries: sc.entries,
                data_end: sc.data_end as u64,
                linked: g.linked,
            });
        }
        let found = shard_record(shard, records, &dir).map_err(|e| bad(e.to_string()))?;
        if &found != s {
            return Err(bad(format!(
                "shard {} holds {} entries up to position {} (next seq {}), the manifest says {} \
                 up to {} (next seq {})",
                s.shard,
                found.entries,
                found.end_pos,
                found.next_seq,
                s.entries,
                s.end_pos,
                s.next_seq
            )));
        }
    }
    Ok(())
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The verified manifest.
    pub manifest: Manifest,
    /// Wall time.
    pub elapsed: std::time::Duration,
}

impl Restored {
    /// One line for the operator.
    pub fn summary(&self, from: &Path, to: &Path) -> String {
        let m = &self.manifest;
        let entries: u64 = m.shards.iter().map(|s| s.entries).sum();
        format!(
            "{} verified and restored into {}: {} shards, {entries} entries, {} files, in {:.3} s \
             (backup taken at {} ms since the epoch from {})",
            from.display(),
            to.display(),
            m.shard_count,
            m.files.len(),
            self.elapsed.as_secs_f64(),
            m.created_ms,
            m.source
        )
    }
}

/// Installs the backup in `from` as the data directory `to`, which must be absent or empty:
/// copied into a sibling staging directory, verified there (so exactly the bytes installed are
/// the ones checked), made durable, then renamed into place, so `to` is either untouched or
/// complete.
pub fn restore(from: &Path, to: &Path) -> Result<Restored, Error> {
    let started = Instant::now();
    if !absent_or_empty(to)? {
        return Err(Error::Refused(format!(
            "{} exists and is not empty; restore only into a new or empty directory (nothing \
             was changed)",
            to.display()
        )));
    }
    let manifest = read_manifest(from)?;
    let name = to
        .file_name()
        .ok_or_else(|| Error::Refused(format!("{} names no directory", to.display())))?;
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let staging = parent.join(format!(".{}.restoring", name.to_string_lossy()));
    if staging.exists() {
        clear_dir(&staging)?;
    }
    datadir::create_dir_private(&staging).map_err(io("create directory", &staging))?;
    let installed = install(from, &staging, to, &parent, &manifest);
    if installed.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    installed.map(|()| Restored {
        manifest,
        elapsed: started.elapsed(),
    })
}

/// Copies the manifest's files from `from` into `staging`, verifies them there, syncs the tree
/// and renames it to `to` (in `parent`).
fn install(
    from: &Path,
    staging: &Path,
    to: &Path,
    parent: &Path,
    manifest: &Manifest,
) -> Result<(), Error> {
    for f in &manifest.files {
        let (s, d) = (from.join(&f.path), staging.join(&f.path));
        if let Some(dir) = d.parent() {
            datadir::create_dir_private(dir).map_err(io("create directory", dir))?;
        }
        match copy_file(&s, &d) {
            Err(e) if is_not_found(&e) && !s.exists() => {
                return Err(Error::Refused(format!(
                    "backup {} failed verification: {} is missing; nothing restored",
                    from.display(),
                    f.path
                )))
            }
            r => r?,
        };
    }
    verify(staging, from, manifest)?;
    // Every directory of the staging tree, deepest first, then the rename.
    let mut dirs: Vec<PathBuf> = manifest
        .files
        .iter()
        .filter_map(|f| staging.join(&f.path).parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs.iter().rev() {
        sync_dir(d)?;
    }
    sync_dir(staging)?;
    if to.exists() {
        std::fs::remove_dir(to).map_err(io("remove empty directory", to))?;
    }
    std::fs::rename(staging, to).map_err(io("rename", staging))?;
    sync_dir(parent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Log, LogConfig};

    fn heartbeat(i: u64) -> crate::record::Heartbeat {
        crate::record::Heartbeat {
            device_id: format!("d{}", i % 7),
            lat: 10.0,
            lon: 20.0,
            ts_ms: i as i64 + 1,
            received_ms: i as i64 + 2,
            ..crate::record::Heartbeat::default()
        }
    }

    /// Every entry of a shard log, as (position, seq, ts), and the recovery report.
    fn entries_of(dir: &Path) -> (Vec<(u64, u64, i64)>, crate::log::RecoveryReport) {
        let cfg = LogConfig {
            segment_bytes: crate::limits::SEGMENT_BYTES_MIN,
            ..LogConfig::new(dir, ShardId(0))
        };
        let mut out = Vec::new();
        let (_, report) = Log::open(&cfg, |pos, e| {
            out.push((pos.0, e.seq, e.hb.ts_ms.to_native()))
        })
        .unwrap();
        (out, report)
    }

    #[test]
    fn an_offline_backup_cuts_a_torn_tail_and_restores_the_same_log() {
        // A stopped shard of three segments whose last one ends in garbage (a torn write) is
        // backed up: the sealed segments are linked, the last one copied and cut at its last
        // valid entry; the restored log recovers exactly the original valid entries with no torn
        // tail and no damage, and a second restore into the now non-empty directory is refused.
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        crate::datadir::DataDir::open_or_create(&root, 1).unwrap();
        let shard_dir = root.join(datadir::shard_dir_name(ShardId(0)));
        let cfg = LogConfig {
            segment_bytes: crate::limits::SEGMENT_BYTES_MIN,
            ..LogConfig::new(&shard_dir, ShardId(0))
        };
        {
            let (mut log, _) = Log::open(&cfg, |_, _| {}).unwrap();
            let mut i = 0;
            while list_segments(&shard_dir).unwrap().len() < 3 {
                log.append(&heartbeat(i), None).unwrap();
                i += 1;
            }
            for _ in 0..10 {
                log.append(&heartbeat(i), None).unwrap();
                i += 1;
            }
            log.sync_blocking().unwrap();
        }
        let (original, _) = entries_of(&shard_dir);
        let last = *list_segments(&shard_dir).unwrap().last().unwrap();
        let last_path = shard_dir.join(segment_file_name(last));
        let end = original.last().unwrap().0 - last;
        let tail_off = end
            + parse_entry(&std::fs::read(&last_path).unwrap(), end as usize)
                .unwrap()
                .total_bytes as u64;
        // Garbage where the next entry would start: a torn write.
        let f = OpenOptions::new().write(true).open(&last_path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x55; 100], tail_off).unwrap();
        drop(f);

        let to = tmp.path().join("backup");
        let report = backup(&root, &to).unwrap();
        let m = &report.manifest;
        assert_eq!(m.shards.len(), 1);
        let segs = &m.shards[0].segments;
        assert_eq!(segs.len(), 3);
        assert!(
            segs[..2].iter().all(|g| g.linked) && !segs[2].linked,
            "{segs:?}"
        );
        assert_eq!(m.shards[0].entries, original.len() as u64);
        assert_eq!(m.shards[0].end_pos, last + tail_off);
        // The live file keeps its garbage (the backup never writes the source).
        let live = std::fs::read(&last_path).unwrap();
        assert_eq!(live[tail_off as usize], 0x55);

        let restored = tmp.path().join("restored");
        restore(&to, &restored).unwrap();
        let (got, rep) = entries_of(&restored.join(datadir::shard_dir_name(ShardId(0))));
        assert_eq!(got, original);
        assert_eq!((rep.torn_tail_bytes, rep.damaged.len()), (0, 0));
        assert!(restored.join(META_FILE).is_file());
        crate::datadir::check_private(&restored).unwrap();
        let again = restore(&to, &restored).unwrap_err();
        assert!(again.to_string().contains("not empty"), "{again}");
        assert_eq!(again.exit_code(), 2);
    }

    #[test]
    fn a_shard_is_taken_again_when_retention_replaces_its_checkpoint_meanwhile() {
        // Retention (checkpoint written, segments below it deleted) runs right after the
        // backup took a shard's segments and before it reads the checkpoint again: the shard is
        // taken again, and the restored shard opens with the new checkpoint, the remaining
        // segments and every device's last location.
        use crate::store::{ShardStore, StoreConfig};
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        crate::datadir::DataDir::open_or_create(&root, 1).unwrap();
        let shard_dir = root.join(datadir::shard_dir_name(ShardId(0)));
        let cfg = StoreConfig {
            segment_bytes: crate::limits::SEGMENT_BYTES_MIN,
            ..StoreConfig::new(&shard_dir, ShardId(0))
        };
        let (mut store, _) = ShardStore::open(&cfg).unwrap();
        let mut i = 0;
        while list_segments(&shard_dir).unwrap().len() < 4 {
            store.append(&heartbeat(i)).unwrap();
            i += 1;
        }
        store.sync_blocking().unwrap();
        let lasts: Vec<_> = (0..7)
            .map(|d| store.last(&format!("d{d}")).unwrap().ts_ms)
            .collect();
        let to = tmp.path().join("backup");
        let mut calls = 0;
        let report = backup_observed(&root, &to, &mut |_| {
            calls += 1;
            if calls == 1 {
                let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
                let deleted = store
                    .delete_expired(later, std::time::Duration::from_secs(1))
                    .unwrap();
                assert!(deleted > 0);
            }
        })
        .unwrap();
        assert_eq!((calls, report.retries), (2, 1));
        let shard = &report.manifest.shards[0];
        let covered = shard.checkpoint_covered.expect("the new checkpoint");
        assert_eq!(shard.segments[0].base, covered);
        drop(store);

        let restored = tmp.path().join("restored");
        restore(&to, &restored).unwrap();
        let (store, report) = ShardStore::open(&StoreConfig {
            dir: restored.join(datadir::shard_dir_name(ShardId(0))),
            ..cfg
        })
        .unwrap();
        assert!(report.damaged.is_empty());
        for (d, ts) in lasts.iter().enumerate() {
            assert_eq!(store.last(&format!("d{d}")).unwrap().ts_ms, *ts, "d{d}");
        }
    }

    #[test]
    fn a_target_inside_the_data_directory_is_refused() {
        // Inside, through a link, or containing the data directory: refused; a sibling is fine.
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        std::fs::create_dir(&root).unwrap();
        assert!(refuse_nested(&root, &root.join("a/b")).is_err());
        // Through a symbolic link to the data directory, too.
        std::os::unix::fs::symlink(&root, tmp.path().join("link")).unwrap();
        assert!(refuse_nested(&root, &tmp.path().join("link/snap")).is_err());
        assert!(refuse_nested(&root, tmp.path()).is_err());
        assert!(refuse_nested(&root, &tmp.path().join("data2")).is_ok());
    }

    #[test]
    fn scan_refuses_a_header_of_another_shard_and_stops_at_a_bad_entry() {
        use crate::log::{Log, LogConfig};
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            segment_bytes: crate::limits::SEGMENT_BYTES_MIN,
            ..LogConfig::new(dir.path().join("s"), ShardId(0))
        };
        {
            let (mut log, _) = Log::open(&cfg, |_, _| {}).unwrap();
            for i in 0..10 {
                let hb = crate::record::Heartbeat {
                    device_id: format!("d{i}"),
                    lat: 10.0,
                    lon: 20.0,
                    ts_ms: i as i64 + 1,
                    received_ms: i as i64 + 2,
                    ..crate::record::Heartbeat::default()
                };
                log.append(&hb, None).unwrap();
            }
            log.sync_blocking().unwrap();
        }
        let path = dir.path().join("s").join(segment_file_name(0));
        let map = map_read(&path).unwrap();
        let s = scan_segment(&map, ShardId(0), 0).unwrap();
        assert_eq!((s.entries, s.next_seq, s.clean), (10, 11, true));
        assert!(scan_segment(&map, ShardId(1), 0).is_err());
        let end = s.data_end;
        drop(map);
        // Corrupt the fifth entry's CRC byte: the scan stops there, the tail is not clean.
        let bytes = std::fs::read(&path).unwrap();
        let mut off = SEGMENT_HEADER_BYTES;
        for _ in 0..4 {
            off += parse_entry(&bytes, off).unwrap().total_bytes;
        }
        let mut f = OpenOptions::new().write(true).open(&path).unwrap();
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(off as u64 + 4)).unwrap();
        f.write_all(&[bytes[off + 4] ^ 0xff]).unwrap();
        drop(f);
        let map = map_read(&path).unwrap();
        let s = scan_segment(&map, ShardId(0), 0).unwrap();
        assert_eq!((s.entries, s.data_end, s.clean), (4, off, false));
        assert!(off < end);
    }
}
