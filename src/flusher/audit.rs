//! The audit-file sink: every heartbeat as one line of JSON (see `encode::write_json_line`) in
//! hourly files per shard, `<dir>/shard-NNNN/<YYYY-MM-DDTHH>.ndjson` (or `.ndjson.zst`, a
//! sequence of zstd frames, one per batch). It owns the files' life cycle and the rule that makes
//! them exact across crashes; batching and cursors are the driver's.
//!
//! Life cycle of a shard's files:
//! * The open hour's file is written as `<name>.tmp`: each batch is appended (one zstd frame per
//!   batch when compressed) and fdatasync'ed, and only then is the cursor replaced, recording the
//!   file's name and its byte count alongside the log position.
//! * A file is sealed (renamed to its final name, directory fsynced) when the first heartbeat of a
//!   later hour arrives, or when the shard is caught up and its hour ended more than
//!   [`SEAL_GRACE_MS`] ago. A clean shutdown leaves the open file as `.tmp`; the next start goes on
//!   appending to it.
//! * The hour of a heartbeat is that of its `received_at` (UTC). Log order is nearly but not
//!   strictly `received_at` order (stamps are taken before appends), so a heartbeat whose hour is
//!   earlier than the open file's goes into the open file, and one whose hour's file is already
//!   sealed goes into the next hour's file. A file thus holds its hour's heartbeats plus, rarely,
//!   stragglers from just before; `received_at` in each line is always the truth.
//!
//! Invariant (exactly once): the audit output of a shard is always exactly the lines of the log
//! entries before the cursor: the sealed files plus the first `bytes` bytes of the cursor's file.
//! At every (re)start the cursor's file is cut back to `bytes` and any other `.tmp` file (written
//! after the last cursor) is deleted, so lines past the cursor vanish and are written again, once.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::config::Compression;
use crate::log::Entry;
use crate::route::ShardId;

use super::cursor::{
    create_dir_durable, hour_name, hour_of_ms, sync_dir, AuditFile, Cursor, HOUR_MS,
};
use super::driver::{Push, Sink};
use super::encode::write_json_line;
use super::FlushError;

/// How long after its hour ends an open file of a caught-up shard is sealed, ms (room for
/// heartbeats stamped just before the hour ended but made durable just after).
pub const SEAL_GRACE_MS: i64 = 30_000;
/// Suffix of a file whose hour is still open.
pub const TMP_SUFFIX: &str = ".tmp";

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> FlushError {
    FlushError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

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
    hour: i64,
    name: String,
    bytes: u64,
    /// Renamed to its final name: no more lines go to it.
    sealed: bool,
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
    /// Hour of the file the batch in hand goes to.
    pending_hour: Option<i64>,
}

/// Writes hourly NDJSON files (see the module docs).
pub struct AuditSink {
    name: String,
    root: PathBuf,
    compress: Compression,
    shards: HashMap<u32, ShardAudit>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink")
            .field("name", &self.name)
            .field("root", &self.root)
            .field("compress", &self.compress)
            .finish()
    }
}

impl AuditSink {
    /// A sink writing under `root`.
    pub fn new(name: &str, root: PathBuf, compress: Compression) -> AuditSink {
        AuditSink {
            name: name.to_owned(),
            root,
            compress,
            shards: HashMap::new(),
            compressor: None,
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
    std::fs::rename(&tmp, &final_path).map_err(|e| io_err("seal audit file", &tmp, e))?;
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
        .map_err(|e| io_err("open audit file", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| io_err("stat audit file", path, e))?
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
            .map_err(|e| io_err("truncate audit file", path, e))?;
    }
    Ok(())
}

impl Sink for AuditSink {
    fn resume(&mut self, shard: ShardId, cursor: &Cursor) -> Result<(), FlushError> {
        let st = self.state(shard);
        st.pending.clear();
        st.pending_hour = None;
        st.file = None;
        st.cur = None;
        create_dir_durable(&st.dir)?;
        let keep_tmp = cursor
            .audit
            .as_ref()
            .map(|a| format!("{}{TMP_SUFFIX}", a.name));
        if let Some(a) = &cursor.audit {
            let hour = super::cursor::parse_hour_name(&a.hour)
                .ok_or_else(|| audit_err(&st.dir, format!("bad hour {:?} in cursor", a.hour)))?;
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
                hour,
                name: a.name.clone(),
                bytes: a.bytes,
                sealed,
            });
        }
        // Temporary files other than the cursor's hold only lines past the cursor.
        let mut removed = false;
        let listing =
            std::fs::read_dir(&st.dir).map_err(|e| io_err("list audit dir", &st.dir, e))?;
        for item in listing {
            let item = item.map_err(|e| io_err("list audit dir", &st.dir, e))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(TMP_SUFFIX) && Some(name) != keep_tmp.as_deref() {
                let path = item.path();
                tracing::info!(path = %path.display(), "removing audit file written past the cursor");
                std::fs::remove_file(&path)
                    .map_err(|e| io_err("remove stale audit file", &path, e))?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&st.dir)?;
        }
        Ok(())
    }

    fn push(&mut self, shard: ShardId, e: &Entry<'_>) -> Result<Push, FlushError> {
        let hour = hour_of_ms(e.hb.received_ms.to_native());
        let ext = self.extension();
        let st = self.state(shard);
        let target = match st.pending_hour {
            Some(ph) if hour <= ph => ph,
            Some(_) => return Ok(Push::CutBefore),
            None => match &st.cur {
                None => hour,
                Some(c) if !c.sealed && hour <= c.hour && c.name.ends_with(ext) => c.hour,
                Some(c) => {
                    if !c.sealed {
                        seal(st)?;
                    }
                    let c = st.cur.as_ref().expect("current file");
                    hour.max(c.hour + 1)
                }
            },
        };
        st.pending_hour = Some(target);
        write_json_line(&mut st.pending, shard, e);
        Ok(Push::Taken)
    }

    fn discard(&mut self) {
        for st in self.shards.values_mut() {
            st.pending.clear();
            st.pending_hour = None;
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
                .map_err(|e| io_err("create zstd compressor", &self.root, e))?;
            self.compressor = Some(c);
        }
        let ext = self.extension();
        let st = self.shards.get_mut(&shard.0).expect("pushed before commit");
        let target = st.pending_hour.expect("a batch to commit");
        let continuing = matches!(&st.cur, Some(c) if c.hour == target && !c.sealed);
        if !continuing {
            let name = format!("{}{ext}", hour_name(target));
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
                .map_err(|e| io_err("create audit file", &tmp, e))?;
            sync_dir(&st.dir)?;
            st.file = Some(file);
            st.cur = Some(Current {
                hour: target,
                name,
                bytes: 0,
                sealed: false,
            });
        }
        let cur = st.cur.as_mut().expect("current file");
        let tmp = st.dir.join(format!("{}{TMP_SUFFIX}", cur.name));
        if st.file.is_none() {
            let f = OpenOptions::new()
                .append(true)
                .open(&tmp)
                .map_err(|e| io_err("open audit file", &tmp, e))?;
            st.file = Some(f);
        }
        let file = st.file.as_mut().expect("opened");
        let compressed;
        let data: &[u8] = match &mut self.compressor {
            Some(c) if level.is_some() => {
                compressed = c
                    .compress(&st.pending)
                    .map_err(|e| io_err("zstd compress", &tmp, e))?;
                &compressed
            }
            _ => &st.pending,
        };
        file.write_all(data)
            .and_then(|_| file.sync_data())
            .map_err(|e| io_err("write audit file", &tmp, e))?;
        cur.bytes += data.len() as u64;
        next.audit = Some(AuditFile {
            hour: hour_name(cur.hour),
            name: cur.name.clone(),
            bytes: cur.bytes,
        });
        st.pending.clear();
        st.pending_hour = None;
        Ok(())
    }

    fn idle(&mut self, shard: ShardId, now_ms: i64) -> Result<(), FlushError> {
        let Some(st) = self.shards.get_mut(&shard.0) else {
            return Ok(());
        };
        if let Some(c) = &st.cur {
            if !c.sealed && now_ms >= (c.hour + 1) * HOUR_MS + SEAL_GRACE_MS {
                seal(st)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Log, LogConfig, LogPos};
    use crate::record::Heartbeat;

    const H: i64 = 1_732_197_600_000; // 2024-11-21T14:00:00Z

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
    fn hours_rotate_and_stragglers_stay_in_order() {
        // Heartbeats spanning three hours, one straggler from hour 0 after hour 1 began, are
        // written in small batches: hour 0 and 1 are sealed, hour 2 is still open (.tmp); every
        // entry appears once, in log order, and the straggler sits in hour 1's file.
        for compress in [Compression::None, Compression::Zstd { level: 3 }] {
            let dir = tempfile::tempdir().unwrap();
            let times = [
                H + 1,
                H + 2,
                H + HOUR_MS + 5,
                H + 3,
                H + HOUR_MS + 9,
                H + 2 * HOUR_MS,
            ];
            let log = log_with(&dir.path().join("log"), &times);
            let root = dir.path().join("audit");
            let mut sink = AuditSink::new("a", root.clone(), compress);
            let c = drain(&mut sink, &log, Cursor::start(), 2);
            assert_eq!(c.pos, log.durable().0);
            let files = read_all(&shard_dir(&root, ShardId(1)));
            let ext = sink.extension();
            let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
            assert_eq!(
                names,
                vec![
                    format!("2024-11-21T14{ext}"),
                    format!("2024-11-21T15{ext}"),
                    format!("2024-11-21T16{ext}.tmp")
                ]
            );
            let seqs: Vec<Vec<u64>> = files
                .iter()
                .map(|f| f.1.iter().map(|l| l["seq"].as_u64().unwrap()).collect())
                .collect();
            assert_eq!(seqs, vec![vec![1, 2], vec![3, 4, 5], vec![6]]);
            // Past the hour + grace, an idle shard's file is sealed.
            sink.idle(ShardId(1), H + 3 * HOUR_MS + SEAL_GRACE_MS)
                .unwrap();
            let files = read_all(&shard_dir(&root, ShardId(1)));
            assert_eq!(files[2].0, format!("2024-11-21T16{ext}"));
        }
    }

    #[test]
    fn restart_cuts_back_to_the_cursor_exactly_once() {
        // A crash after a batch was written (possibly sealing the hour's file and starting the
        // next hour's) but before its cursor was replaced: resuming from the previous cursor cuts
        // the file back, removes the stale new file, and re-draining leaves every entry exactly
        // once. Checked plain and compressed, with the crash after each batch in turn.
        for compress in [Compression::None, Compression::Zstd { level: 1 }] {
            for crash_after in 1..6 {
                let dir = tempfile::tempdir().unwrap();
                let times: Vec<i64> = (0..12).map(|i| H + i * HOUR_MS / 5 + 7).collect();
                let log = log_with(&dir.path().join("log"), &times);
                let root = dir.path().join("audit");
                let mut sink = AuditSink::new("a", root.clone(), compress);
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
                    // The batch after the kept cursor was written (and may have sealed a file
                    // and started another) but its cursor never reached the disk.
                    if batches == crash_after + 1 {
                        break;
                    }
                }
                // "Crash": a new sink resumes from the kept cursor and drains the rest.
                let kept = kept.expect("enough batches");
                let mut again = AuditSink::new("a", root.clone(), compress);
                let end = drain(&mut again, &log, kept, 3);
                assert_eq!(end.pos, log.durable().0);
                let files = read_all(&shard_dir(&root, ShardId(1)));
                let seqs: Vec<u64> = files
                    .iter()
                    .flat_map(|f| f.1.iter().map(|l| l["seq"].as_u64().unwrap()))
                    .collect();
                assert_eq!(
                    seqs,
                    (1..=12).collect::<Vec<_>>(),
                    "crash after {crash_after}"
                );
            }
        }
    }

    #[test]
    fn inconsistent_directories_are_errors() {
        // A cursor naming a file that is gone, or a temporary file shorter than the cursor says,
        // is a clear error, not a panic and not silent loss.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("audit");
        let mut sink = AuditSink::new("a", root.clone(), Compression::None);
        let mut c = Cursor::start();
        c.pos = 9999;
        c.audit = Some(AuditFile {
            hour: "2024-11-21T14".into(),
            name: "2024-11-21T14.ndjson".into(),
            bytes: 10,
        });
        let err = sink.resume(ShardId(1), &c).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
        let sd = shard_dir(&root, ShardId(1));
        std::fs::write(sd.join("2024-11-21T14.ndjson.tmp"), b"short").unwrap();
        let err = sink.resume(ShardId(1), &c).unwrap_err().to_string();
        assert!(err.contains("cursor says 10"), "{err}");
    }
}
