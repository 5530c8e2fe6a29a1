//! The audit-file sink: every heartbeat as one line of JSON (see `encode::write_json_line`) in
//! files per shard and rotation window, `<dir>/shard-NNNN/<YYYY-MM-DDTHH-MM-SS>.ndjson` (or
//! `.ndjson.zst`, a sequence of zstd frames, one per batch). It owns the files' life cycle and the
//! rule that makes them exact across crashes; batching and cursors are the driver's.
//!
//! Life cycle of a shard's files:
//! * The open file is written as `<name>.tmp`: each batch is appended (one zstd frame per batch
//!   when compressed) and fdatasync'ed, and only then is the cursor replaced, recording the file's
//!   name and its byte count alongside the log position.
//! * Windows: `received_at` (UTC) is cut into windows of `rotate` seconds aligned to the Unix
//!   epoch. A file is named for the second it starts: the start of its window, or, after a size
//!   rotation, the second of its first heartbeat; a name is always later than the shard's
//!   previous file's (bumped by a second if need be), so names are unique and sort in log order.
//!   A file takes heartbeats received before the end of the window its name falls in.
//! * A file is sealed (renamed to its final name, directory fsynced) when the first heartbeat of
//!   a later window arrives, when it holds `rotate_bytes` or more (plain files end within one
//!   line past it, compressed ones within one batch), or when the shard is caught up and the
//!   file's window ended more than [`AUDIT_SEAL_GRACE_MS`] ago. Sealing only ever happens with
//!   nothing written past the cursor (at the start of a batch or when caught up), so a sealed
//!   file is never cut back. A clean shutdown leaves the open file as `.tmp`; the next start goes
//!   on appending to it.
//! * Log order is nearly but not strictly `received_at` order (stamps are taken before appends),
//!   so a heartbeat from before the open file's window goes into the open file: a file holds its
//!   window's heartbeats plus, rarely, stragglers from just before; `received_at` in each line is
//!   always the truth.
//! * Hourly files (`YYYY-MM-DDTHH`) written before rotation windows existed are read back from
//!   their cursors: an open one takes heartbeats until its hour ends, and the next file is named
//!   after that hour, so names still sort in log order.
//!
//! Digests (issue 18 item 3): every committed batch also gets one line in the file's digest
//! sidecar, `<dir>.chain/shard-NNNN/<name>.chain` (beside the audit directory, not in it: readers
//! take every file of a shard directory for heartbeat lines), holding SHA-256(previous digest ‖
//! the batch's lines), the batch's first line number and one CRC32C per line; the first line of
//! a sidecar is the digest the file starts from (the previous file's last), so the files of a
//! shard form one chain. `geobeat audit verify --audit-dir` recomputes it and names the first
//! line that was deleted, edited or added. A sidecar is cut back with its file at a restart.
//!
//! Invariant (exactly once): the audit output of a shard is always exactly the lines of the log
//! entries before the cursor: the sealed files plus the first `bytes` bytes of the cursor's file.
//! At every (re)start the cursor's file is cut back to `bytes` and any other `.tmp` file (written
//! after the last cursor) is deleted, so lines past the cursor vanish and are written again, once.

use crate::limits::AUDIT_SEAL_GRACE_MS;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::config::{Compression, Rotation};
use crate::log::Entry;
use crate::route::ShardId;

use super::cursor::{
    create_dir_durable, parse_file_start, second_name, sync_dir, AuditFile, Cursor, FileStart,
    HOUR_MS,
};
use super::driver::{Push, Sink};
use super::encode::write_json_line;
use super::FlushError;

/// Suffix of a file that is still open.
pub const TMP_SUFFIX: &str = ".tmp";

fn audit_err(path: &Path, reason: String) -> FlushError {
    FlushError::Audit {
        path: path.to_path_buf(),
        reason,
    }
}

/// The directory of shard `shard`'s audit files under `root`.
pub fn shard_dir(root: &Path, shard: ShardId) -> PathBuf {
    root.join(format!("shard-{:04}", shard.0))
}

/// The file a shard's lines currently go to.
#[derive(Debug, Clone)]
struct Current {
    /// The time the file is named for, as in the cursor (`AuditFile::start`).
    start: String,
    /// Second the name stands for: every later file of the shard is named after it.
    order_s: i64,
    /// Heartbeats received at or after this (ms) go to a later file.
    end_ms: i64,
    name: String,
    bytes: u64,
    /// Renamed to its final name: no more lines go to it.
    sealed: bool,
}

/// Where the batch in hand goes.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// Appended to the current (open) file.
    Current,
    /// A new file named for second `start_s`, taking heartbeats received before `end_ms`.
    New { start_s: i64, end_ms: i64 },
}

/// One shard's audit state.
#[derive(Debug, Default)]
struct ShardAudit {
    dir: PathBuf,
    cur: Option<Current>,
    /// The open `.tmp` file of `cur` (when not sealed), opened lazily.
    file: Option<File>,
    /// Lines of the batch in hand.
    pending: Vec<u8>,
    /// File the batch in hand goes to.
    target: Option<Target>,
    /// The digest chain's last digest (`None` until `resume` set it).
    digest: Option<Digest>,
    /// Lines already in the current file (the next batch's first line number).
    lines: u64,
}

/// Writes NDJSON files per shard and rotation window (see the module docs).
pub struct AuditSink {
    name: String,
    root: PathBuf,
    compress: Compression,
    rotate: Rotation,
    shards: HashMap<u32, ShardAudit>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Whether digest sidecars are written (false when their directory cannot be made).
    chained: bool,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink")
            .field("name", &self.name)
            .field("root", &self.root)
            .field("compress", &self.compress)
            .field("rotate", &self.rotate)
            .finish()
    }
}

impl AuditSink {
    /// A sink writing under `root`.
    pub fn new(name: &str, root: PathBuf, compress: Compression, rotate: Rotation) -> AuditSink {
        assert!(rotate.window_secs > 0 && rotate.bytes > 0, "{rotate:?}");
        AuditSink {
            name: name.to_owned(),
            root,
            compress,
            rotate,
            shards: HashMap::new(),
            compressor: None,
            chained: true,
        }
    }

    /// The file name extension for the configured compression.
    pub fn extension(&self) -> &'static str {
        match self.compress {
            Compression::None => ".ndjson",
            Compression::Zstd { .. } => ".ndjson.zst",
        }
    }

    fn state(&mut self, shard: ShardId) -> &mut ShardAudit {
        let root = &self.root;
        self.shards.entry(shard.0).or_insert_with(|| ShardAudit {
            dir: shard_dir(root, shard),
            ..ShardAudit::default()
        })
    }
}

/// A SHA-256 digest.
type Digest = [u8; 32];

/// Suffix of an audit file's digest sidecar.
pub const CHAIN_FILE_SUFFIX: &str = ".chain";

/// The directory of the digest sidecars of the audit files under `root`: `<root>.chain`,
/// beside `root`.
pub fn chain_root(root: &Path) -> PathBuf {
    let name = root
        .file_name()
        .map_or_else(|| "audit".into(), |n| n.to_string_lossy().into_owned());
    root.with_file_name(format!("{name}{CHAIN_FILE_SUFFIX}"))
}

/// The digest sidecar of audit file `name` (final name) of `shard` under `root`.
pub fn chain_file(root: &Path, shard: ShardId, name: &str) -> PathBuf {
    shard_dir(&chain_root(root), shard).join(format!("{name}{CHAIN_FILE_SUFFIX}"))
}

/// Where a shard's audit digest chain starts: SHA-256("geobeat-audit-chain-v1\0" ‖ shard LE).
fn audit_genesis(shard: ShardId) -> Digest {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"geobeat-audit-chain-v1\0");
    h.update(shard.0.to_le_bytes());
    h.finalize().into()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One line of a digest sidecar.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ChainLine {
    /// First line only: the digest the file's chain starts from (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start: Option<String>,
    /// A batch: its first line's number in the file (0-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    line: Option<u64>,
    /// A batch: its lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lines: Option<u64>,
    /// A batch: the file's size in bytes after it (what a restart cuts back to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    end: Option<u64>,
    /// A batch: SHA-256(previous digest ‖ its lines, each with its newline) (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    /// A batch: CRC32C of each line (newline included), 8 hex digits each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crcs: Option<String>,
}

/// The parsed lines of a digest sidecar (`Err`: a line that does not parse).
fn read_chain_file(path: &Path) -> Result<Option<Vec<ChainLine>>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        match serde_json::from_str::<ChainLine>(l) {
            Ok(c) => out.push(c),
            // A torn last line (a crash mid-write) is ignored.
            Err(_) if i + 1 == text.lines().count() && !text.ends_with('\n') => break,
            Err(e) => return Err(format!("{} line {}: {e}", path.display(), i + 1)),
        }
    }
    Ok(Some(out))
}

fn digest_of(hexed: Option<&String>) -> Option<Digest> {
    unhex(hexed?)?.try_into().ok()
}

/// Writes `lines` as the whole digest sidecar at `path` (tmp, fsync, rename).
fn rewrite_chain_file(path: &Path, lines: &[ChainLine]) -> Result<(), FlushError> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&serde_json::to_string(l).expect("serializes"));
        text.push('\n');
    }
    let tmp = path.with_extension("chain.tmp");
    std::fs::write(&tmp, text)
        .and_then(|_| File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| FlushError::io("rewrite audit digest file", path, e))
}

/// Appends `line` to the digest sidecar at `path` and syncs it.
fn append_chain_line(path: &Path, line: &ChainLine) -> Result<(), FlushError> {
    let mut text = serde_json::to_string(line).expect("serializes");
    text.push('\n');
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(crate::datadir::FILE_MODE)
        .open(path)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_data()
        })
        .map_err(|e| FlushError::io("write audit digest file", path, e))
}

/// Splits NDJSON bytes into lines, each with its newline (a last line without one included).
fn split_lines(text: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < text.len() {
        let end = text[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(text.len(), |p| at + p + 1);
        out.push(&text[at..end]);
        at = end;
    }
    out
}

/// What `verify_shard_files` checked of one shard's audit files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilesVerify {
    /// The shard.
    pub shard: u32,
    /// Audit files seen.
    pub files: usize,
    /// Lines matched against their digests.
    pub lines: u64,
    /// Batch digests matched.
    pub batches: u64,
    /// Lines no digest covers yet (an open file's last batch in flight, or files written
    /// before digests existed).
    pub uncovered: u64,
    /// The first line that does not match: file, line number, what.
    pub mismatch: Option<String>,
}

/// Checks the audit files of `shard` under `root` against their digest sidecars (in
/// [`chain_root`]): names the first line deleted, edited or added after its batch was digested,
/// and the first file whose chain does not continue its predecessor's. Read-only.
pub fn verify_shard_files(root: &Path, shard: ShardId) -> Result<FilesVerify, String> {
    use sha2::Digest as _;
    let dir = shard_dir(root, shard);
    let mut out = FilesVerify {
        shard: shard.0,
        ..FilesVerify::default()
    };
    let listing = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files: Vec<String> = listing
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            let b = n.strip_suffix(TMP_SUFFIX).unwrap_or(n);
            b.ends_with(".ndjson") || b.ends_with(".ndjson.zst")
        })
        .collect();
    files.sort();
    let has: Vec<bool> = files
        .iter()
        .map(|n| chain_file(root, shard, n.strip_suffix(TMP_SUFFIX).unwrap_or(n)).exists())
        .collect();
    let last_with = has.iter().rposition(|h| *h);
    let mut prev: Option<(String, Digest)> = None;
    for (i, name) in files.iter().enumerate() {
        out.files += 1;
        let open = name.ends_with(TMP_SUFFIX);
        let base = name.strip_suffix(TMP_SUFFIX).unwrap_or(name);
        let path = dir.join(name);
        let raw = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let text = if base.ends_with(".zst") {
            let mut t = Vec::new();
            let mut dec = zstd::stream::read::Decoder::new(&raw[..])
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if let Err(e) = std::io::Read::read_to_end(&mut dec, &mut t) {
                if !open {
                    out.mismatch = Some(format!("{}: does not decompress: {e}", path.display()));
                    return Ok(out);
                }
            }
            t
        } else {
            raw
        };
        let lines = split_lines(&text);
        let chain = read_chain_file(&chain_file(root, shard, base))?;
        let Some(chain) = chain else {
            if last_with.is_some_and(|l| i < l) {
                out.mismatch = Some(format!(
                    "{}: its digest file is missing, but a later file has one",
                    path.display()
                ));
                return Ok(out);
            }
            out.uncovered += lines.len() as u64;
            prev = None;
            continue;
        };
        let start = chain.first().and_then(|c| digest_of(c.start.as_ref()));
        let Some(mut digest) = start else {
            out.mismatch = Some(format!(
                "{}: its digest file has no start line",
                path.display()
            ));
            return Ok(out);
        };
        if let Some((pname, pd)) = &prev {
            if *pd != digest {
                out.mismatch = Some(format!(
                    "{} line 1: the file's chain does not continue from {pname} (a file between them was removed, or the end of {pname} was cut)",
                    path.display()
                ));
                return Ok(out);
            }
        }
        let mut next_line = chain
            .get(1)
            .and_then(|c| c.line)
            .unwrap_or(lines.len() as u64);
        out.uncovered += next_line;
        for (k, rec) in chain.iter().enumerate().skip(1) {
            let (Some(first), Some(n), Some(want), Some(crcs)) = (
                rec.line,
                rec.lines,
                digest_of(rec.digest.as_ref()),
                rec.crcs.as_ref().and_then(|c| unhex(c)),
            ) else {
                out.mismatch = Some(format!(
                    "{}: digest record {k} is malformed",
                    path.display()
                ));
                return Ok(out);
            };
            if first != next_line || crcs.len() as u64 != n * 4 {
                out.mismatch = Some(format!(
                    "{}: digest record {k} does not follow the previous one",
                    path.display()
                ));
                return Ok(out);
            }
            let mut h = sha2::Sha256::new();
            h.update(digest);
            for j in 0..n {
                let at = (first + j) as usize;
                let expect = u32::from_le_bytes(
                    crcs[j as usize * 4..j as usize * 4 + 4]
                        .try_into()
                        .expect("4"),
                );
                let Some(line) = lines.get(at) else {
                    out.mismatch = Some(format!(
                        "{} line {}: missing (the file ends; digested lines were deleted)",
                        path.display(),
                        at + 1
                    ));
                    return Ok(out);
                };
                if crc32c::crc32c(line) != expect {
                    out.mismatch = Some(format!(
                        "{} line {}: does not match its digest (this line was edited, or a line before it in its batch was deleted): {}",
                        path.display(),
                        at + 1,
                        String::from_utf8_lossy(line).trim_end()
                    ));
                    return Ok(out);
                }
                h.update(line);
            }
            let got: Digest = h.finalize().into();
            if got != want {
                out.mismatch = Some(format!(
                    "{} lines {}..={}: the batch does not match its digest",
                    path.display(),
                    first + 1,
                    first + n
                ));
                return Ok(out);
            }
            digest = got;
            next_line = first + n;
            out.lines += n;
            out.batches += 1;
        }
        let rest = (lines.len() as u64).saturating_sub(next_line);
        if rest > 0 && !open {
            out.mismatch = Some(format!(
                "{} line {}: no digest covers it (added after the file's last batch)",
                path.display(),
                next_line + 1
            ));
            return Ok(out);
        }
        out.uncovered += rest;
        prev = Some((path.display().to_string(), digest));
    }
    Ok(out)
}

/// Restores a shard's digest chain at `resume`: the cursor's file's sidecar is cut back to the
/// cursor's bytes (a file written before digests existed gets one starting at genesis), the
/// sidecars of files the resume removed go too, and the chain's last digest and the file's line
/// count are taken from what is left.
fn resume_chain(
    st: &mut ShardAudit,
    shard: ShardId,
    chain_dir: &Path,
    cursor: &Cursor,
) -> Result<(), FlushError> {
    create_dir_durable(chain_dir)?;
    st.digest = Some(audit_genesis(shard));
    st.lines = 0;
    if let Some(a) = &cursor.audit {
        let path = chain_dir.join(format!("{}{CHAIN_FILE_SUFFIX}", a.name));
        match read_chain_file(&path).map_err(|e| audit_err(&path, e))? {
            Some(mut ls) => {
                let keep = ls
                    .iter()
                    .take_while(|l| l.end.is_none_or(|e| e <= a.bytes))
                    .count();
                if keep < ls.len() {
                    ls.truncate(keep);
                    rewrite_chain_file(&path, &ls)?;
                }
                let last = ls.last();
                st.digest = last
                    .and_then(|l| digest_of(l.digest.as_ref()).or(digest_of(l.start.as_ref())))
                    .or(st.digest);
                st.lines = last.map_or(0, |l| l.line.unwrap_or(0) + l.lines.unwrap_or(0));
            }
            None => {
                // A file from before digests: its lines so far stay uncovered.
                let file = [format!("{}{TMP_SUFFIX}", a.name), a.name.clone()]
                    .iter()
                    .map(|n| st.dir.join(n))
                    .find(|p| p.exists());
                let raw = match &file {
                    Some(p) => {
                        std::fs::read(p).map_err(|e| FlushError::io("read audit file", p, e))?
                    }
                    None => Vec::new(),
                };
                let text = if a.name.ends_with(".zst") {
                    zstd::stream::decode_all(&raw[..]).unwrap_or_default()
                } else {
                    raw
                };
                let start = ChainLine {
                    start: st.digest.as_ref().map(|d| hex(d)),
                    line: None,
                    lines: None,
                    end: None,
                    digest: None,
                    crcs: None,
                };
                rewrite_chain_file(&path, &[start])?;
                st.lines = split_lines(&text).len() as u64;
            }
        }
    }
    // Sidecars of files that are gone (removed above as written past the cursor).
    if let Ok(listing) = std::fs::read_dir(chain_dir) {
        for item in listing.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            let Some(audit) = name.strip_suffix(CHAIN_FILE_SUFFIX) else {
                continue;
            };
            let live =
                st.dir.join(audit).exists() || st.dir.join(format!("{audit}{TMP_SUFFIX}")).exists();
            if !live {
                std::fs::remove_file(item.path()).map_err(|e| {
                    FlushError::io("remove stale audit digest file", &item.path(), e)
                })?;
            }
        }
    }
    Ok(())
}

/// The end (ms, exclusive) of the rotation window of `window_ms` that contains `ms`.
fn window_end(ms: i64, window_ms: i64) -> i64 {
    (ms.div_euclid(window_ms) + 1) * window_ms
}

/// Renames the open file of `st` to its final name and fsyncs the directory.
fn seal(st: &mut ShardAudit) -> Result<(), FlushError> {
    let cur = st.cur.as_mut().expect("sealing needs a current file");
    debug_assert!(!cur.sealed);
    st.file = None;
    let final_path = st.dir.join(&cur.name);
    let tmp = st.dir.join(format!("{}{TMP_SUFFIX}", cur.name));
    if final_path.exists() {
        return Err(audit_err(
            &final_path,
            "exists already; refusing to overwrite a sealed audit file".into(),
        ));
    }
    std::fs::rename(&tmp, &final_path).map_err(|e| FlushError::io("seal audit file", &tmp, e))?;
    sync_dir(&st.dir)?;
    cur.sealed = true;
    tracing::debug!(path = %final_path.display(), bytes = cur.bytes, "audit file sealed");
    Ok(())
}

/// Cuts `path` back to `bytes` (refusing if it is shorter) and makes that durable.
fn cut_back(path: &Path, bytes: u64) -> Result<(), FlushError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| FlushError::io("open audit file", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| FlushError::io("stat audit file", path, e))?
        .len();
    if len < bytes {
        return Err(audit_err(
            path,
            format!("{len} bytes, but the cursor says {bytes} were written and synced"),
        ));
    }
    if len > bytes {
        tracing::info!(path = %path.display(), from = len, to = bytes, "cutting audit file back to its cursor");
        f.set_len(bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| FlushError::io("truncate audit file", path, e))?;
    }
    Ok(())
}

impl AuditSink {
    /// Creates the root directory if needed and proves it writable (creates and removes a probe
    /// file): the start-up check.
    pub fn check(&self) -> Result<(), FlushError> {
        create_dir_durable(&self.root)?;
        let probe = self.root.join(format!(".{}.probe{TMP_SUFFIX}", self.name));
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&probe)
            .map_err(|e| FlushError::io("create a file in the audit directory", &probe, e))?;
        std::fs::remove_file(&probe).map_err(|e| FlushError::io("remove probe file", &probe, e))
    }
}

impl Sink for AuditSink {
    fn check(&mut self) -> Result<(), FlushError> {
        AuditSink::check(self)?;
        let chain = chain_root(&self.root);
        if let Err(e) = create_dir_durable(&chain) {
            // The audit files still go on; `geobeat audit verify` reports them as uncovered.
            tracing::error!(dir = %chain.display(), error = %e, "cannot create the audit digest directory; audit files are written without digests");
            self.chained = false;
        }
        Ok(())
    }

    fn resume(&mut self, shard: ShardId, cursor: &Cursor) -> Result<(), FlushError> {
        let window_ms = self.rotate.window_secs as i64 * 1000;
        let mut chain_dir = self
            .chained
            .then(|| shard_dir(&chain_root(&self.root), shard));
        if let Some(cd) = &chain_dir {
            if let Err(e) = create_dir_durable(cd) {
                // As in `check`: the files go on without digests (verify reports them uncovered).
                tracing::error!(dir = %cd.display(), error = %e, "cannot create the audit digest directory; audit files are written without digests");
                self.chained = false;
                chain_dir = None;
            }
        }
        let st = self.state(shard);
        st.pending.clear();
        st.target = None;
        st.file = None;
        st.cur = None;
        create_dir_durable(&st.dir)?;
        let keep_tmp = cursor
            .audit
            .as_ref()
            .map(|a| format!("{}{TMP_SUFFIX}", a.name));
        if let Some(a) = &cursor.audit {
            let (order_s, end_ms) = match parse_file_start(&a.start) {
                Some(FileStart::Second(s)) => (s, window_end(s * 1000, window_ms)),
                // An hourly file: open until its hour ends; later files are named after it.
                Some(FileStart::Hour(h)) => (h * 3600 + 3599, (h + 1) * HOUR_MS),
                None => {
                    return Err(audit_err(
                        &st.dir,
                        format!("bad file start {:?} in cursor", a.start),
                    ))
                }
            };
            let tmp = st.dir.join(format!("{}{TMP_SUFFIX}", a.name));
            let final_path = st.dir.join(&a.name);
            let sealed = match (tmp.exists(), final_path.exists()) {
                (true, true) => {
                    return Err(audit_err(
                        &tmp,
                        format!("both {} and its temporary file exist", a.name),
                    ))
                }
                (true, false) => {
                    cut_back(&tmp, a.bytes)?;
                    false
                }
                // Sealed after the cursor was written: the sealed file is exactly the cursor's
                // bytes (sealing only follows a cursor write), but cut it back if not.
                (false, true) => {
                    cut_back(&final_path, a.bytes)?;
                    true
                }
                (false, false) => {
                    return Err(audit_err(
                        &final_path,
                        format!(
                            "missing (the cursor says {} bytes were written to it)",
                            a.bytes
                        ),
                    ))
                }
            };
            st.cur = Some(Current {
                start: a.start.clone(),
                order_s,
                end_ms,
                name: a.name.clone(),
                bytes: a.bytes,
                sealed,
            });
        }
        // Temporary files other than the cursor's hold only lines past the cursor.
        let mut removed = false;
        let listing =
            std::fs::read_dir(&st.dir).map_err(|e| FlushError::io("list audit dir", &st.dir, e))?;
        for item in listing {
            let item = item.map_err(|e| FlushError::io("list audit dir", &st.dir, e))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(TMP_SUFFIX) && Some(name) != keep_tmp.as_deref() {
                let path = item.path();
                tracing::info!(path = %path.display(), "removing audit file written past the cursor");
                std::fs::remove_file(&path)
                    .map_err(|e| FlushError::io("remove stale audit file", &path, e))?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&st.dir)?;
        }
        if let Some(chain_dir) = chain_dir {
            resume_chain(st, shard, &chain_dir, cursor)?;
        }
        Ok(())
    }

    fn push(&mut self, shard: ShardId, e: &Entry<'_>) -> Result<Push, FlushError> {
        let recv = e.hb.received_ms.to_native();
        let ext = self.extension();
        let window_ms = self.rotate.window_secs as i64 * 1000;
        let rotate_bytes = self.rotate.bytes;
        // Plain files are cut within a line of `rotate_bytes`; compressed sizes are known only
        // after a batch is compressed, so those files are cut at the batch boundary.
        let plain = matches!(self.compress, Compression::None);
        let st = self.state(shard);
        let pending = st.pending.len() as u64;
        match st.target {
            Some(Target::Current) => {
                let c = st.cur.as_ref().expect("a current file");
                if recv >= c.end_ms || (plain && c.bytes + pending >= rotate_bytes) {
                    return Ok(Push::CutBefore);
                }
            }
            Some(Target::New { end_ms, .. }) => {
                if recv >= end_ms || (plain && pending >= rotate_bytes) {
                    return Ok(Push::CutBefore);
                }
            }
            None => {
                let fits = st.cur.as_ref().is_some_and(|c| {
                    !c.sealed && recv < c.end_ms && c.bytes < rotate_bytes && c.name.ends_with(ext)
                });
                st.target = Some(if fits {
                    Target::Current
                } else {
                    if st.cur.as_ref().is_some_and(|c| !c.sealed) {
                        seal(st)?;
                    }
                    // A new window starts at its aligned start; a file cut within its window
                    // (size, compression change, a straggler after sealing) at the heartbeat's
                    // own second. Either way after the previous file's name.
                    let natural = match &st.cur {
                        Some(c) if recv < c.end_ms => recv.div_euclid(1000),
                        _ => (window_end(recv, window_ms) - window_ms).div_euclid(1000),
                    };
                    let start_s = st
                        .cur
                        .as_ref()
                        .map_or(natural, |c| natural.max(c.order_s + 1));
                    Target::New {
                        start_s,
                        end_ms: window_end(start_s * 1000, window_ms),
                    }
                });
            }
        }
        write_json_line(&mut st.pending, shard, e);
        Ok(Push::Taken)
    }

    fn discard(&mut self) {
        for st in self.shards.values_mut() {
            st.pending.clear();
            st.target = None;
        }
    }

    fn pending_bytes(&self) -> usize {
        self.shards.values().map(|s| s.pending.len()).sum()
    }

    fn commit(&mut self, shard: ShardId, next: &mut Cursor) -> Result<(), FlushError> {
        let level = match self.compress {
            Compression::None => None,
            Compression::Zstd { level } => Some(level),
        };
        if let (Some(level), None) = (level, &self.compressor) {
            let c = zstd::bulk::Compressor::new(level)
                .map_err(|e| FlushError::io("create zstd compressor", &self.root, e))?;
            self.compressor = Some(c);
        }
        let ext = self.extension();
        let chain_dir = self
            .chained
            .then(|| shard_dir(&chain_root(&self.root), shard));
        let st = self.shards.get_mut(&shard.0).expect("pushed before commit");
        let target = st.target.expect("a batch to commit");
        if let Target::New { start_s, end_ms } = target {
            let start = second_name(start_s);
            let name = format!("{start}{ext}");
            let final_path = st.dir.join(&name);
            if final_path.exists() {
                return Err(audit_err(
                    &final_path,
                    "exists already, but the cursor does not cover it (was a cursor file \
                     deleted?); move it aside to continue"
                        .into(),
                ));
            }
            let tmp = st.dir.join(format!("{name}{TMP_SUFFIX}"));
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(crate::datadir::FILE_MODE)
                .open(&tmp)
                .map_err(|e| FlushError::io("create audit file", &tmp, e))?;
            sync_dir(&st.dir)?;
            st.file = Some(file);
            if let Some(cd) = &chain_dir {
                let digest = *st.digest.get_or_insert_with(|| audit_genesis(shard));
                let start = ChainLine {
                    start: Some(hex(&digest)),
                    line: None,
                    lines: None,
                    end: None,
                    digest: None,
                    crcs: None,
                };
                rewrite_chain_file(&cd.join(format!("{name}{CHAIN_FILE_SUFFIX}")), &[start])?;
                st.lines = 0;
            }
            st.cur = Some(Current {
                start,
                order_s: start_s,
                end_ms,
                name,
                bytes: 0,
                sealed: false,
            });
            // From here on the batch goes to the new current file (also if it fails and is
            // retried: `resume` rebuilds the state from the cursor first).
            st.target = Some(Target::Current);
        }
        let cur = st.cur.as_mut().expect("current file");
        debug_assert!(!cur.sealed);
        let tmp = st.dir.join(format!("{}{TMP_SUFFIX}", cur.name));
        if st.file.is_none() {
            let f = OpenOptions::new()
                .append(true)
                .open(&tmp)
                .map_err(|e| FlushError::io("open audit file", &tmp, e))?;
            st.file = Some(f);
        }
        let file = st.file.as_mut().expect("opened");
        let compressed;
        let data: &[u8] = match &mut self.compressor {
            Some(c) if level.is_some() => {
                compressed = c
                    .compress(&st.pending)
                    .map_err(|e| FlushError::io("zstd compress", &tmp, e))?;
                &compressed
            }
            _ => &st.pending,
        };
        file.write_all(data)
            .and_then(|_| file.sync_data())
            .map_err(|e| FlushError::io("write audit file", &tmp, e))?;
        cur.bytes += data.len() as u64;
        if let Some(cd) = &chain_dir {
            // After the data is durable: a crash in between leaves lines past the cursor, cut
            // back at the restart; a digest line past the cursor is cut back with them.
            use sha2::Digest as _;
            let prev = *st.digest.get_or_insert_with(|| audit_genesis(shard));
            let mut h = sha2::Sha256::new();
            h.update(prev);
            h.update(&st.pending);
            let digest: Digest = h.finalize().into();
            let lines = split_lines(&st.pending);
            let mut crcs = String::with_capacity(lines.len() * 8);
            for l in &lines {
                crcs.push_str(&hex(&crc32c::crc32c(l).to_le_bytes()));
            }
            let rec = ChainLine {
                start: None,
                line: Some(st.lines),
                lines: Some(lines.len() as u64),
                end: Some(cur.bytes),
                digest: Some(hex(&digest)),
                crcs: Some(crcs),
            };
            append_chain_line(&cd.join(format!("{}{CHAIN_FILE_SUFFIX}", cur.name)), &rec)?;
            st.digest = Some(digest);
            st.lines += lines.len() as u64;
        }
        next.audit = Some(AuditFile {
            start: cur.start.clone(),
            name: cur.name.clone(),
            bytes: cur.bytes,
        });
        st.pending.clear();
        st.target = None;
        Ok(())
    }

    fn idle(&mut self, shard: ShardId, now_ms: i64) -> Result<(), FlushError> {
        let rotate_bytes = self.rotate.bytes;
        let Some(st) = self.shards.get_mut(&shard.0) else {
            return Ok(());
        };
        if let Some(c) = &st.cur {
            if !c.sealed && (now_ms >= c.end_ms + AUDIT_SEAL_GRACE_MS || c.bytes >= rotate_bytes) {
                seal(st)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flusher::cursor::hour_of_ms;
    use crate::log::{Log, LogConfig, LogPos};
    use crate::record::Heartbeat;

    const H: i64 = 1_732_197_600_000; // 2024-11-21T14:00:00Z

    fn rot(window_secs: u64, bytes: u64) -> Rotation {
        Rotation { window_secs, bytes }
    }

    /// Sequence numbers per file, in file-name order.
    fn seqs(files: &[(String, Vec<serde_json::Value>)]) -> Vec<Vec<u64>> {
        files
            .iter()
            .map(|f| f.1.iter().map(|l| l["seq"].as_u64().unwrap()).collect())
            .collect()
    }

    fn hb(i: u64, received_ms: i64) -> Heartbeat {
        Heartbeat {
            device_id: format!("dev-{}", i % 5),
            lat: 1.0,
            lon: 2.0,
            ts_ms: received_ms - 10,
            received_ms,
            ..Heartbeat::default()
        }
    }

    /// Appends heartbeats with the given receive times to a fresh log, returning it.
    fn log_with(dir: &Path, times: &[i64]) -> Log {
        let cfg = LogConfig {
            dir: dir.to_path_buf(),
            shard: ShardId(1),
            segment_bytes: crate::limits::SEGMENT_BYTES_MIN,
            write_mode: crate::log::WriteMode::default(),
        };
        let (mut log, _) = Log::open(&cfg, |_, _| {}).unwrap();
        for (i, t) in times.iter().enumerate() {
            log.append(&hb(i as u64, *t), None).unwrap();
        }
        log.sync_blocking().unwrap();
        log
    }

    /// Feeds entries `[from, to)` (by index) of `log` through `sink` as the driver would:
    /// batches cut where the sink asks; returns the cursor after the last commit.
    fn drain(sink: &mut AuditSink, log: &Log, mut cursor: Cursor, batch: usize) -> Cursor {
        sink.resume(ShardId(1), &cursor).unwrap();
        loop {
            let mut rows = 0;
            let mut next_pos = cursor.pos;
            for e in log.scan_from(LogPos(cursor.pos), crate::log::ScanEnd::Durable) {
                if rows == batch {
                    break;
                }
                match sink.push(ShardId(1), &e).unwrap() {
                    Push::Taken => {
                        rows += 1;
                        next_pos = e.end().0;
                    }
                    Push::CutBefore => break,
                }
            }
            if rows == 0 {
                return cursor;
            }
            let mut next = cursor.clone();
            next.pos = next_pos;
            sink.commit(ShardId(1), &mut next).unwrap();
            cursor = next;
        }
    }

    /// Every line of every file (sealed or temporary) of the shard, decompressed, by file name.
    fn read_all(dir: &Path) -> Vec<(String, Vec<serde_json::Value>)> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let raw = std::fs::read(dir.join(&n)).unwrap();
                let text = if n.contains(".zst") {
                    zstd::stream::decode_all(&raw[..]).unwrap()
                } else {
                    raw
                };
                let lines = text
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(|l| serde_json::from_slice(l).unwrap())
                    .collect();
                (n, lines)
            })
            .collect()
    }

    #[test]
    fn windows_rotate_and_stragglers_stay_in_order() {
        // Heartbeats spanning three windows (hourly, then one-minute windows), one straggler from
        // the first window after the second began, written in small batches: the first two
        // files are sealed, the third is still open (.tmp), each named for its window's start;
        // every entry appears once, in log order, and the straggler sits in the second file.
        for (window_secs, unit) in [(3600u64, HOUR_MS), (60, 60_000)] {
            for compress in [Compression::None, Compression::Zstd { level: 3 }] {
                let dir = tempfile::tempdir().unwrap();
                let times = [
                    H + 1,
                    H + 2,
                    H + unit + 5,
                    H + 3,
                    H + unit + 9,
                    H + 2 * unit,
                ];
                let log = log_with(&dir.path().join("log"), &times);
                let root = dir.path().join("audit");
                let mut sink =
                    AuditSink::new("a", root.clone(), compress, rot(window_secs, 1 << 30));
                let c = drain(&mut sink, &log, Cursor::start(), 2);
                assert_eq!(c.pos, log.durable().0);
                let files = read_all(&shard_dir(&root, ShardId(1)));
                let ext = sink.extension();
                let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
                let name = |ms: i64| second_name(ms / 1000);
                assert_eq!(
                    names,
                    vec![
                        format!("{}{ext}", name(H)),
                        format!("{}{ext}", name(H + unit)),
                        format!("{}{ext}.tmp", name(H + 2 * unit))
                    ]
                );
                assert_eq!(seqs(&files), vec![vec![1, 2], vec![3, 4, 5], vec![6]]);
                // Before the window's end + grace an idle shard's file stays open; after, it is
                // sealed.
                sink.idle(ShardId(1), H + 3 * unit + AUDIT_SEAL_GRACE_MS - 1)
                    .unwrap();
                assert!(read_all(&shard_dir(&root, ShardId(1)))[2]
                    .0
                    .ends_with(".tmp"));
                sink.idle(ShardId(1), H + 3 * unit + AUDIT_SEAL_GRACE_MS)
                    .unwrap();
                let files = read_all(&shard_dir(&root, ShardId(1)));
                assert_eq!(files[2].0, format!("{}{ext}", name(H + 2 * unit)));
            }
        }
    }

    #[test]
    fn size_rotation_gives_unique_later_names() {
        // 40 heartbeats received within one second and a window of a minute, with files limited
        // to 1000 bytes (200 compressed): plain files end within one line past the limit, compressed ones after
        // the batch that reached it (and an idle shard seals a full file at once); names are
        // unique, increase by a second per file and sort in log order; every entry appears once.
        for compress in [Compression::None, Compression::Zstd { level: 1 }] {
            let dir = tempfile::tempdir().unwrap();
            let times: Vec<i64> = (0..40).map(|i| H + 100 + i).collect();
            let log = log_with(&dir.path().join("log"), &times);
            let root = dir.path().join("audit");
            // Batches of 7 lines compress to about 150 bytes.
            let limit = if compress == Compression::None {
                1000
            } else {
                200
            };
            let mut sink = AuditSink::new("a", root.clone(), compress, rot(60, limit));
            drain(&mut sink, &log, Cursor::start(), 7);
            sink.idle(ShardId(1), H + 1000).unwrap();
            let sd = shard_dir(&root, ShardId(1));
            let files = read_all(&sd);
            assert!(
                files.len() >= 3,
                "{:?}",
                files.iter().map(|f| &f.0).collect::<Vec<_>>()
            );
            let ext = sink.extension();
            for (k, f) in files.iter().enumerate() {
                // Full files are sealed; the last one only if it is full.
                let name = f.0.strip_suffix(TMP_SUFFIX).unwrap_or(&f.0);
                assert_eq!(name, format!("{}{ext}", second_name(H / 1000 + k as i64)));
                assert!(k + 1 == files.len() || name == f.0, "{} is sealed", f.0);
                let size = std::fs::metadata(sd.join(&f.0)).unwrap().len();
                if k + 1 < files.len() {
                    assert!(size >= limit, "{} has {size} bytes", f.0);
                }
                if compress == Compression::None {
                    let line = size / f.1.len() as u64 + 1;
                    assert!(size < limit + line, "{} has {size} bytes", f.0);
                }
            }
            let all: Vec<u64> = seqs(&files).concat();
            assert_eq!(all, (1..=40).collect::<Vec<_>>());
        }
    }

    #[test]
    fn restart_cuts_back_to_the_cursor_exactly_once() {
        // A crash after a batch was written (possibly sealing a file and starting the next one,
        // by time or by size) but before its cursor was replaced: resuming from the previous
        // cursor cuts the file back, removes the stale new file, and re-draining leaves every
        // entry exactly once. Checked plain and compressed, hourly and one-minute windows and a
        // size limit, with the crash after each batch in turn.
        let cases = [
            (rot(3600, 1 << 30), HOUR_MS / 5),
            (rot(60, 1 << 30), 12_000),
            (rot(3600, 600), 100),
        ];
        for (rotate, step) in cases {
            for compress in [Compression::None, Compression::Zstd { level: 1 }] {
                for crash_after in 1..6 {
                    let dir = tempfile::tempdir().unwrap();
                    let times: Vec<i64> = (0..12).map(|i| H + i * step + 7).collect();
                    let log = log_with(&dir.path().join("log"), &times);
                    let root = dir.path().join("audit");
                    let mut sink = AuditSink::new("a", root.clone(), compress, rotate);
                    // Drain a prefix, keeping the cursor after `crash_after` batches of 2.
                    sink.resume(ShardId(1), &Cursor::start()).unwrap();
                    let mut cursor = Cursor::start();
                    let mut kept = None;
                    let mut batches = 0;
                    let entries: Vec<_> = log
                        .scan_from(LogPos(0), crate::log::ScanEnd::Durable)
                        .map(|e| (e.pos, e.end()))
                        .collect();
                    let mut i = 0;
                    while i < entries.len() {
                        let mut rows = 0;
                        while i < entries.len() && rows < 2 {
                            let e = log.read(entries[i].0).unwrap();
                            if sink.push(ShardId(1), &e).unwrap() == Push::CutBefore {
                                break;
                            }
                            rows += 1;
                            i += 1;
                        }
                        let mut next = cursor.clone();
                        next.pos = entries[i - 1].1 .0;
                        sink.commit(ShardId(1), &mut next).unwrap();
                        cursor = next;
                        batches += 1;
                        if batches == crash_after {
                            kept = Some(cursor.clone());
                        }
                        // The batch after the kept cursor was written (and may have sealed a
                        // file and started another) but its cursor never reached the disk.
                        if batches == crash_after + 1 {
                            break;
                        }
                    }
                    // "Crash": a new sink resumes from the kept cursor and drains the rest.
                    let kept = kept.expect("enough batches");
                    let mut again = AuditSink::new("a", root.clone(), compress, rotate);
                    let end = drain(&mut again, &log, kept, 3);
                    assert_eq!(end.pos, log.durable().0);
                    let files = read_all(&shard_dir(&root, ShardId(1)));
                    assert!(files.len() >= 2, "{rotate:?}: rotated");
                    assert_eq!(
                        seqs(&files).concat(),
                        (1..=12).collect::<Vec<_>>(),
                        "{rotate:?} {compress:?} crash after {crash_after}"
                    );
                    // The digest sidecars were cut back with their files: every line is
                    // covered once and verifies.
                    let v = verify_shard_files(&root, ShardId(1)).unwrap();
                    assert_eq!(
                        (v.mismatch, v.lines, v.uncovered),
                        (None, 12, 0),
                        "{rotate:?} {compress:?} crash after {crash_after}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_open_hourly_file_from_before_rotation_windows_continues_then_rotates() {
        // A shard directory as an older build left it: a sealed hourly file, an open hourly
        // `.tmp` file with a line past the cursor, and a cursor in the old format (`hour`).
        // After the restart the open file is cut back and takes heartbeats until its hour ends;
        // the next file is named for the following hour's first window, so names still sort in
        // log order; nothing is lost or doubled.
        let dir = tempfile::tempdir().unwrap();
        let times: Vec<i64> = vec![
            H + 1,
            H + 2,
            H + 600_000,
            H + HOUR_MS + 5,
            H + HOUR_MS + 61_000,
        ];
        let log = log_with(&dir.path().join("log"), &times);
        let root = dir.path().join("audit");
        let sd = shard_dir(&root, ShardId(1));
        std::fs::create_dir_all(&sd).unwrap();
        let hour13 = crate::flusher::cursor::hour_name(hour_of_ms(H) - 1);
        let hour14 = crate::flusher::cursor::hour_name(hour_of_ms(H));
        std::fs::write(sd.join(format!("{hour13}.ndjson")), b"{\"old\":1}\n").unwrap();
        // The first entry, as the old build wrote it, plus a partial line past its cursor.
        let first = log
            .scan_from(LogPos(0), crate::log::ScanEnd::Durable)
            .next()
            .unwrap();
        let mut line = Vec::new();
        write_json_line(&mut line, ShardId(1), &first);
        let bytes = line.len() as u64;
        line.extend_from_slice(b"{\"torn\":");
        std::fs::write(sd.join(format!("{hour14}.ndjson.tmp")), &line).unwrap();
        let text = format!(
            r#"{{"format":1,"pos":{},"seq":2,"audit":{{"hour":"{hour14}","name":"{hour14}.ndjson","bytes":{bytes}}},"updated_ms":1}}"#,
            first.end().0
        );
        let cursor: Cursor = serde_json::from_str(&text).unwrap();
        let mut sink = AuditSink::new("a", root.clone(), Compression::None, rot(60, 1 << 30));
        drain(&mut sink, &log, cursor, 10);
        let files = read_all(&sd);
        let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
        let minute = |ms: i64| second_name(ms / 1000);
        assert_eq!(
            names,
            vec![
                format!("{hour13}.ndjson"),
                format!("{hour14}.ndjson"),
                format!("{}.ndjson", minute(H + HOUR_MS)),
                format!("{}.ndjson.tmp", minute(H + HOUR_MS + 60_000)),
            ]
        );
        assert_eq!(seqs(&files[1..]), vec![vec![1, 2, 3], vec![4], vec![5]]);
    }

    #[test]
    fn inconsistent_directories_are_errors() {
        // A cursor naming a file that is gone, or a temporary file shorter than the cursor says,
        // is a clear error, not a panic and not silent loss.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("audit");
        let mut sink = AuditSink::new("a", root.clone(), Compression::None, Rotation::default());
        let mut c = Cursor::start();
        c.pos = 9999;
        c.audit = Some(AuditFile {
            start: "2024-11-21T14-00-00".into(),
            name: "2024-11-21T14-00-00.ndjson".into(),
            bytes: 10,
        });
        let err = sink.resume(ShardId(1), &c).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
        let sd = shard_dir(&root, ShardId(1));
        std::fs::write(sd.join("2024-11-21T14-00-00.ndjson.tmp"), b"short").unwrap();
        let err = sink.resume(ShardId(1), &c).unwrap_err().to_string();
        assert!(err.contains("cursor says 10"), "{err}");
    }

    #[test]
    fn the_start_check_needs_a_writable_directory() {
        // The check creates a missing directory and leaves nothing behind; a path below a plain
        // file cannot be a directory and fails with the path named.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("a").join("b");
        AuditSink::new("x", root.clone(), Compression::None, Rotation::default())
            .check()
            .unwrap();
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let bad = dir.path().join("file").join("audit");
        let err = AuditSink::new("x", bad, Compression::None, Rotation::default())
            .check()
            .unwrap_err()
            .to_string();
        assert!(err.contains("file/audit"), "{err}");
    }
}
