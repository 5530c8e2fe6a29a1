//! `geobeat reshard` and `geobeat migrate`: the offline rewrite of a data directory into a new
//! shard layout (another shard count, or format 1 → 2). It owns the procedure: lock the
//! directory, check every sink has exported everything, read every entry of every old shard in
//! log order, append it to the shard the new table routes it to in a staging directory, give the
//! sinks cursors at the new logs' ends, make it all durable, and commit through
//! `datadir::commit_staging` / `datadir::finish_swap`. It does not serve, and it does not decide
//! routing (`route`) or the swap's steps (`datadir`).
//!
//! Invariants: nothing is lost or reordered per device (a device lives in one old shard, whose
//! entries are read in log order and appended in that order, records unchanged, `received_ms` and
//! optional fields included); a crash at any point leaves the old layout or the new one, never a
//! mix, and the command can simply be run again; no sink exports a heartbeat twice or misses
//! one (refused while a sink is behind; afterwards every sink's cursor sits at the new end); and
//! the new logs start past every position and sequence number any earlier layout used, so
//! `(shard, pos)` — the PostgreSQL sink's key — and `(shard, seq)` never repeat.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::datadir::{
    self, DataDirError, Layout, LockMode, LAYOUT_FILE, META_FILE, META_FORMAT_AHASH, READY_DIR,
    RETIRED_CURSORS_DIR, STAGING_DIR,
};
use crate::flusher::cursor::{
    cursor_path, read_cursor, write_cursor, Cursor, CURSORS_DIR, CURSOR_FORMAT, CURSOR_SUFFIX,
};
use crate::flusher::FlushError;
use crate::limits::{PAGE_BYTES, SEGMENT_BYTES_DEFAULT, SEGMENT_BYTES_MIN};
use crate::log::{self, Log, LogConfig, LogPos, ScanEnd};
use crate::record::Heartbeat;
use crate::route::{Router, ShardId};
use crate::rt::now_ms;
use crate::store::{self, ShardStore, StoreConfig};

/// What to do.
#[derive(Debug, Clone)]
pub struct Request {
    /// The data directory.
    pub root: PathBuf,
    /// The new shard count; `None` keeps the current one (`geobeat migrate`).
    pub shards: Option<u32>,
    /// Segment size of the new logs; `None`: the size of the old layout's newest segment file.
    pub segment_bytes: Option<u64>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Format of the directory before (1 or 2).
    pub from_format: u32,
    /// Shard count before.
    pub from_shards: u32,
    /// Shard count after.
    pub to_shards: u32,
    /// Entries rewritten.
    pub entries: u64,
    /// Bytes of rewritten entries (headers, payloads, padding).
    pub bytes: u64,
    /// Sinks whose cursors were carried over.
    pub sinks: Vec<String>,
    /// Wall time of the rewrite (reading, appending, syncing), without the checks and the swap.
    pub rewrite: Duration,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

/// How a run ended without an error.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The directory already was as asked; nothing changed.
    Unchanged(String),
    /// The directory was rewritten.
    Rewritten(Report),
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Refused before changing anything: the message names the problem and the fix.
    #[error("{0}")]
    Refused(String),
    /// The data directory could not be read or swapped.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// An old shard's log could not be opened or a new one written.
    #[error(transparent)]
    Log(#[from] log::Error),
    /// A new shard's store refused an entry.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A cursor could not be read or written.
    #[error(transparent)]
    Cursor(#[from] FlushError),
    /// An old shard's last-location checkpoint could not be read (damaged: named in the error).
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::Error),
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
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The cursor files (`<sink>.cursor`) in a directory, by sink name.
fn cursors_in(dir: &Path) -> Result<BTreeMap<String, Cursor>, Error> {
    let mut out = BTreeMap::new();
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("list cursors", dir, e)),
    };
    for item in listing {
        let item = item.map_err(|e| io_err("list cursors", dir, e))?;
        let name = item.file_name();
        let Some(sink) = name.to_str().and_then(|n| n.strip_suffix(CURSOR_SUFFIX)) else {
            continue;
        };
        if let Some(c) = read_cursor(&item.path())? {
            out.insert(sink.to_owned(), c);
        }
    }
    Ok(out)
}

/// Size of the newest segment file in `dir`, if any.
fn newest_segment_bytes(dir: &Path) -> Option<u64> {
    let newest = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let base: u64 = name.strip_suffix(".seg")?.parse().ok()?;
            Some((base, e.path()))
        })
        .max()?;
    std::fs::metadata(newest.1).ok().map(|m| m.len())
}

/// One old shard, opened (its LOCK held) for reading.
struct OldShard {
    shard: ShardId,
    dir: PathBuf,
    log: Log,
    cursors: BTreeMap<String, Cursor>,
}

/// The new layout being written: one store per new shard, in the staging directory.
struct Rewriter {
    router: Router,
    stores: Vec<ShardStore>,
    entries: u64,
}

impl Rewriter {
    /// Appends one heartbeat to the shard the new table routes it to. Callers append each
    /// device's heartbeats in their original order.
    /// The device sequence an entry carried (issue 18) travels with it.
    fn append(
        &mut self,
        hb: &Heartbeat,
        dseq: Option<crate::record::DeviceSeq>,
    ) -> Result<(), Error> {
        let shard = self.router.shard_of(&hb.device_id);
        self.stores[shard.0 as usize].append_carried(hb, dseq)?;
        self.entries += 1;
        Ok(())
    }
}

/// Runs `geobeat reshard` (with `req.shards`) or `geobeat migrate` (without).
pub fn run(req: &Request) -> Result<Outcome, Error> {
    let started = Instant::now();
    let root = &req.root;
    let shown = root.display();
    if !root.join(META_FILE).is_file() {
        return Err(Error::Refused(format!(
            "{shown} is not a geobeat data directory (no {META_FILE}); check --data-dir"
        )));
    }
    let Some(_lock) = datadir::lock(root, LockMode::Exclusive)? else {
        return Err(Error::Refused(format!(
            "{shown} is in use by a running geobeat server ({} is held); stop the server, then \
             run this again",
            datadir::LOCK_FILE
        )));
    };
    // An earlier run that committed is finished first; one that did not is discarded.
    if datadir::finish_swap(root)? {
        tracing::warn!(dir = %shown, "finished an earlier reshard that was interrupted after it committed");
    }
    let staging = root.join(STAGING_DIR);
    if staging.exists() {
        tracing::warn!(path = %staging.display(), "removing the staging directory of an interrupted run");
        std::fs::remove_dir_all(&staging)
            .map_err(|e| io_err("remove staging directory", &staging, e))?;
    }
    let layout: Layout = datadir::inspect(root)?;
    let to_shards = req.shards.unwrap_or(layout.shard_count);
    let router = Router::contiguous(to_shards).map_err(|e| {
        Error::Refused(format!(
            "--shards {to_shards}: {e}; pass a count in that range"
        ))
    })?;
    // migrate: any format-2 directory is done; reshard: done if it has the default table for N.
    let done = match req.shards {
        None => layout.router.is_some(),
        Some(_) => layout.router.as_ref() == Some(&router),
    };
    if done {
        return Ok(Outcome::Unchanged(match req.shards {
            Some(n) => format!("{shown} already has {n} shards; nothing to do"),
            None => format!("{shown} is already format 2; nothing to do"),
        }));
    }
    let olds = open_old_shards(root, &layout)?;
    check_sinks(root, &layout, &olds)?;
    let retired = cursors_of_retired(root)?;

    // The new logs start past everything an earlier layout used (positions, sequence numbers,
    // also those recorded by cursors of a log that recovery later cut).
    let mut end = 0u64;
    let mut next_seq = 1u64;
    for old in &olds {
        end = end.max(old.log.written().0);
        next_seq = next_seq.max(old.log.next_seq());
        for c in old.cursors.values() {
            end = end.max(c.pos);
            next_seq = next_seq.max(c.seq.unwrap_or(0));
        }
    }
    for c in retired.values().flat_map(|m| m.values()) {
        end = end.max(c.pos);
        next_seq = next_seq.max(c.seq.unwrap_or(0));
    }
    let base = LogPos(end.div_ceil(PAGE_BYTES) * PAGE_BYTES);
    let segment_bytes = req
        .segment_bytes
        .or_else(|| {
            olds.iter()
                .filter_map(|o| newest_segment_bytes(&o.dir))
                .max()
        })
        .unwrap_or(SEGMENT_BYTES_DEFAULT);

    let rewrite_started = Instant::now();
    std::fs::create_dir(&staging).map_err(|e| io_err("create staging directory", &staging, e))?;
    datadir::sync_dir(root)?;
    let mut stores = Vec::with_capacity(to_shards as usize);
    for k in 0..to_shards {
        let shard = ShardId(k);
        let dir = staging.join(datadir::shard_dir_name(shard));
        let cfg = LogConfig {
            dir: dir.clone(),
            shard,
            segment_bytes,
            write_mode: crate::log::WriteMode::default(),
        };
        Log::init_at(&cfg, base, next_seq)?;
        let mut scfg = StoreConfig::new(dir, shard);
        scfg.segment_bytes = segment_bytes;
        stores.push(ShardStore::open(&scfg)?.0);
    }
    let mut rw = Rewriter {
        router: router.clone(),
        stores,
        entries: 0,
    };
    let mut bytes = 0u64;
    // The one loop over old shards. Per-device order is kept: a device lives in one old shard,
    // and its entries are appended in that shard's log order.
    for old in &olds {
        // First the last locations that only the shard's checkpoint still holds (their log
        // entries were deleted by retention): they precede every retained entry of their
        // device, so order is kept, and a newer log entry overrides them as it did before.
        if let Some(ckpt) = crate::checkpoint::Checkpoint::open(old.shard, &old.dir)? {
            let first = old.log.first_pos();
            for r in ckpt.iter_checked() {
                let r = r?;
                if r.entry.pos < first {
                    rw.append(&r.entry.hb.to_owned_heartbeat(), r.entry.dseq)?;
                    bytes += u64::from(r.entry.len_bytes);
                }
            }
        }
        let mut scan = old.log.scan_from(LogPos(0), ScanEnd::Written);
        for e in &mut scan {
            rw.append(&e.hb.to_owned_heartbeat(), e.dseq)?;
            bytes += u64::from(e.len_bytes);
        }
        if scan.hit_damage() {
            return Err(Error::Refused(format!(
                "shard {} of {shown}: an entry failed validation during the rewrite (at {}); \
                 nothing was changed — restart `geobeat serve` once so recovery quarantines the \
                 damage, then run this again",
                old.shard,
                scan.next_pos()
            )));
        }
    }
    for s in &mut rw.stores {
        s.sync_blocking()?;
    }
    let rewrite = rewrite_started.elapsed();

    // Sinks: every sink known in any old shard gets a cursor at each new shard's end. An audit
    // sink's open file is inherited from the old shard of the same number (or from a retired
    // cursor), so the sink goes on appending to it instead of deleting it as "written past the
    // cursor", and never creates a file name that already exists.
    let sinks: BTreeSet<String> = olds
        .iter()
        .flat_map(|o| o.cursors.keys().cloned())
        .collect();
    let updated_ms = now_ms();
    for (k, store) in rw.stores.iter().enumerate() {
        let dir = staging.join(datadir::shard_dir_name(ShardId(k as u32)));
        for sink in &sinks {
            let audit = olds
                .iter()
                .find(|o| o.shard.0 == k as u32)
                .map(|o| o.cursors.get(sink))
                .unwrap_or_else(|| retired.get(&(k as u32)).and_then(|m| m.get(sink)))
                .and_then(|c| c.audit.clone());
            let cursor = Cursor {
                format: CURSOR_FORMAT,
                pos: store.written().0,
                seq: Some(store.log().next_seq()),
                audit,
                updated_ms,
            };
            write_cursor(&cursor_path(&dir, sink), &cursor)?;
        }
    }
    let mut entries_in_layout: Vec<String> = (0..to_shards)
        .map(|k| datadir::shard_dir_name(ShardId(k)))
        .collect();
    // Cursors of shard numbers the new layout does not have: the old layout's, then older ones.
    let mut keep: BTreeMap<u32, BTreeMap<String, Cursor>> = retired
        .into_iter()
        .filter(|(k, _)| *k >= to_shards)
        .collect();
    for old in olds.iter().filter(|o| o.shard.0 >= to_shards) {
        keep.insert(old.shard.0, old.cursors.clone());
    }
    keep.retain(|_, m| !m.is_empty());
    if !keep.is_empty() {
        let dir = staging.join(RETIRED_CURSORS_DIR);
        for (k, cursors) in &keep {
            let sdir = dir.join(datadir::shard_dir_name(ShardId(*k)));
            for (sink, c) in cursors {
                write_cursor(&sdir.join(format!("{sink}{CURSOR_SUFFIX}")), c)?;
            }
            datadir::sync_dir(&sdir)?;
        }
        datadir::sync_dir(&dir)?;
        entries_in_layout.push(RETIRED_CURSORS_DIR.to_owned());
    }
    let report = Report {
        from_format: layout.format_version,
        from_shards: layout.shard_count,
        to_shards,
        entries: rw.entries,
        bytes,
        sinks: sinks.into_iter().collect(),
        rewrite,
        elapsed: Duration::ZERO,
    };
    drop(rw);
    datadir::write_meta(&staging, &router, layout.created_ms)?;
    let list = staging.join(LAYOUT_FILE);
    write_synced(&list, &(entries_in_layout.join("\n") + "\n"))?;
    datadir::sync_dir(&staging)?;
    // The commit point, then the swap. The old logs stay open (their shard LOCKs held) until the
    // swap is done.
    datadir::commit_staging(root)?;
    datadir::finish_swap(root)?;
    debug_assert!(!root.join(READY_DIR).exists());
    drop(olds);
    Ok(Outcome::Rewritten(Report {
        elapsed: started.elapsed(),
        ..report
    }))
}

/// Writes `text` to a new file at `path` and fsyncs it.
fn write_synced(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| io_err("create file", path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err("write file", path, e))
}

/// Opens every old shard's log (recovering it as a server would), holding its LOCK.
fn open_old_shards(root: &Path, layout: &Layout) -> Result<Vec<OldShard>, Error> {
    let mut olds = Vec::new();
    for k in 0..layout.shard_count {
        let shard = ShardId(k);
        let dir = root.join(datadir::shard_dir_name(shard));
        if !dir.is_dir() {
            continue; // never opened by a server: no entries, no cursors
        }
        let cfg = LogConfig {
            dir: dir.clone(),
            shard,
            // Only used if the shard has no segment at all; keep that one small.
            segment_bytes: SEGMENT_BYTES_MIN,
            write_mode: crate::log::WriteMode::default(),
        };
        let log = match Log::open(&cfg, |_, _| {}) {
            Ok((log, _)) => log,
            Err(log::Error::Locked { .. }) => {
                return Err(Error::Refused(format!(
                    "shard {k} of {} is locked by another process (a geobeat server of another \
                     build?); stop it, then run this again",
                    root.display()
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let cursors = cursors_in(&dir.join(CURSORS_DIR))?;
        olds.push(OldShard {
            shard,
            dir,
            log,
            cursors,
        });
    }
    Ok(olds)
}

/// Refuses unless every sink that has a cursor in any shard has exported every shard to its end
/// (positions change in the rewrite, so a cursor cannot be carried over mid-log).
fn check_sinks(root: &Path, layout: &Layout, olds: &[OldShard]) -> Result<(), Error> {
    let sinks: BTreeSet<&String> = olds.iter().flat_map(|o| o.cursors.keys()).collect();
    for sink in sinks {
        for old in olds {
            let pos = old.cursors.get(sink).map_or(0, |c| c.pos);
            if old
                .log
                .scan_from(LogPos(pos), ScanEnd::Written)
                .next()
                .is_none()
            {
                continue;
            }
            let serve = if layout.format_version == META_FORMAT_AHASH {
                "the geobeat build that wrote this format-1 directory"
            } else {
                "`geobeat serve`"
            };
            return Err(Error::Refused(format!(
                "sink {sink:?} has not exported shard {} to its end (cursor {pos}, log end {}); \
                 run {serve} with that sink until `geobeat sinks --data-dir {}` shows lag 0 for \
                 it (or, if the sink is retired, delete {}), then run this again",
                old.shard,
                old.log.written(),
                root.display(),
                cursor_path(&old.dir, sink).display()
            )));
        }
    }
    Ok(())
}

/// The retired cursors (`retired-cursors/shard-NNNN/<sink>.cursor`), by shard number.
fn cursors_of_retired(root: &Path) -> Result<BTreeMap<u32, BTreeMap<String, Cursor>>, Error> {
    let dir = root.join(RETIRED_CURSORS_DIR);
    let mut out = BTreeMap::new();
    let listing = match std::fs::read_dir(&dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("list retired cursors", &dir, e)),
    };
    for item in listing {
        let item = item.map_err(|e| io_err("list retired cursors", &dir, e))?;
        let name = item.file_name();
        let Some(k) = name
            .to_str()
            .and_then(|n| n.strip_prefix("shard-"))
            .and_then(|d| d.parse::<u32>().ok())
        else {
            continue;
        };
        out.insert(k, cursors_in(&item.path())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datadir::DataDir;
    use crate::route::shard_of;

    fn hb(id: &str, n: i64) -> Heartbeat {
        Heartbeat {
            device_id: id.to_owned(),
            lat: 1.0 + n as f64 * 1e-3,
            lon: 2.0,
            ts_ms: 1_000 + n,
            received_ms: 2_000 + n,
            speed_mps: (n % 2 == 0).then_some(1.5),
            attrs: if n % 3 == 0 {
                b"{\"a\":1}".to_vec()
            } else {
                Vec::new()
            },
            ..Heartbeat::default()
        }
    }

    /// A format-2 directory of `shards` shards holding `devices` × `rounds` heartbeats.
    fn fill(root: &Path, shards: u32, devices: usize, rounds: i64) -> Vec<Heartbeat> {
        let dd = DataDir::open_or_create(root, shards).unwrap();
        let mut stores: Vec<ShardStore> = (0..shards)
            .map(|k| {
                let mut c = StoreConfig::new(dd.shard_dir(ShardId(k)), ShardId(k));
                c.segment_bytes = SEGMENT_BYTES_MIN;
                ShardStore::open(&c).unwrap().0
            })
            .collect();
        let mut all = Vec::new();
        for n in 0..rounds {
            for d in 0..devices {
                let h = hb(&format!("d-{d}"), n * devices as i64 + d as i64);
                stores[dd.router().shard_of(&h.device_id).0 as usize]
                    .append(&h)
                    .unwrap();
                all.push(h);
            }
        }
        for s in &mut stores {
            s.sync_blocking().unwrap();
        }
        all
    }

    /// Every device's heartbeats in append order, read back from the directory's shards.
    fn read_back(root: &Path) -> BTreeMap<String, Vec<Heartbeat>> {
        let dd = DataDir::open_or_create(root, 1).unwrap();
        let mut out: BTreeMap<String, Vec<Heartbeat>> = BTreeMap::new();
        for k in 0..dd.shard_count() {
            let (s, _) =
                ShardStore::open(&StoreConfig::new(dd.shard_dir(ShardId(k)), ShardId(k))).unwrap();
            for e in s.log().scan_from(LogPos(0), ScanEnd::Written) {
                let h = e.hb.to_owned_heartbeat();
                assert_eq!(dd.router().shard_of(&h.device_id), ShardId(k));
                assert_eq!(e.device_hash_low, crate::route::device_hash(&h.device_id));
                out.entry(h.device_id.clone()).or_default().push(h);
            }
        }
        out
    }

    #[test]
    fn reshard_keeps_every_record_in_order_and_moves_positions_past_the_old_ones() {
        // 2 -> 3 -> 1 shards: afterwards every device's records are exactly the original ones in
        // the original order (optional fields and received_ms included), every entry carries the
        // CRC32C of its id, and each new log starts past every position the old layout used.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let all = fill(root, 2, 50, 6);
        let mut want: BTreeMap<String, Vec<Heartbeat>> = BTreeMap::new();
        for h in &all {
            want.entry(h.device_id.clone()).or_default().push(h.clone());
        }
        let old_end = {
            let dd = DataDir::open_or_create(root, 1).unwrap();
            (0..2)
                .map(|k| {
                    let c = StoreConfig::new(dd.shard_dir(ShardId(k)), ShardId(k));
                    ShardStore::open(&c).unwrap().0.written().0
                })
                .max()
                .unwrap()
        };
        for n in [3, 1] {
            let req = Request {
                root: root.to_path_buf(),
                shards: Some(n),
                segment_bytes: None,
            };
            let Outcome::Rewritten(r) = run(&req).unwrap() else {
                panic!("rewrite expected")
            };
            assert_eq!(r.entries, 300);
            assert_eq!(DataDir::open_or_create(root, 9).unwrap().shard_count(), n);
            assert_eq!(read_back(root), want);
            let dd = DataDir::open_or_create(root, 1).unwrap();
            let (s, _) =
                ShardStore::open(&StoreConfig::new(dd.shard_dir(ShardId(0)), ShardId(0))).unwrap();
            assert!(s.log().first_pos().0 > old_end, "{}", s.log().first_pos());
            for name in [READY_DIR, STAGING_DIR, datadir::OLD_DIR] {
                assert!(!root.join(name).exists(), "{name}");
            }
        }
        let again = Request {
            root: root.to_path_buf(),
            shards: Some(1),
            segment_bytes: None,
        };
        assert!(matches!(run(&again).unwrap(), Outcome::Unchanged(_)));
    }

    #[test]
    fn sinks_behind_are_refused_and_caught_up_ones_carried_over() {
        // A sink whose cursor is behind a shard's end refuses the run (naming the sink, the shard
        // and the cursor file) and changes nothing; once caught up, every new shard gets the
        // sink's cursor at its new end, an audit sink's open file goes to the shard of the same
        // number, and the cursors of a shard that goes away are kept for when it comes back.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fill(root, 3, 30, 2);
        let dd = DataDir::open_or_create(root, 1).unwrap();
        let audit = |k: u32| crate::flusher::cursor::AuditFile {
            start: "2026-12-04T17-00-00".into(),
            name: format!("2026-12-04T17-00-00.ndjson#{k}"),
            bytes: 10 + u64::from(k),
        };
        let mut ends = Vec::new();
        for k in 0..3 {
            let sdir = dd.shard_dir(ShardId(k));
            let (s, _) = ShardStore::open(&StoreConfig::new(&sdir, ShardId(k))).unwrap();
            ends.push((s.written().0, s.log().next_seq()));
        }
        for k in 0..3 {
            let sdir = dd.shard_dir(ShardId(k));
            let behind = k == 1;
            let c = Cursor {
                format: CURSOR_FORMAT,
                pos: if behind { 4096 } else { ends[k as usize].0 },
                seq: Some(ends[k as usize].1),
                audit: Some(audit(k)),
                updated_ms: 1,
            };
            write_cursor(&cursor_path(&sdir, "arch"), &c).unwrap();
        }
        let req = Request {
            root: root.to_path_buf(),
            shards: Some(2),
            segment_bytes: None,
        };
        let err = run(&req).unwrap_err().to_string();
        assert!(
            err.contains("sink \"arch\" has not exported shard 1"),
            "{err}"
        );
        assert!(err.contains("shard-0001/cursors/arch.cursor"), "{err}");
        assert_eq!(DataDir::open_or_create(root, 1).unwrap().shard_count(), 3);
        let sdir = dd.shard_dir(ShardId(1));
        let mut c = read_cursor(&cursor_path(&sdir, "arch")).unwrap().unwrap();
        c.pos = ends[1].0;
        write_cursor(&cursor_path(&sdir, "arch"), &c).unwrap();
        let Outcome::Rewritten(r) = run(&req).unwrap() else {
            panic!()
        };
        assert_eq!(r.sinks, vec!["arch".to_string()]);
        let dd = DataDir::open_or_create(root, 1).unwrap();
        for k in 0..2 {
            let sdir = dd.shard_dir(ShardId(k));
            let (s, _) = ShardStore::open(&StoreConfig::new(&sdir, ShardId(k))).unwrap();
            let c = read_cursor(&cursor_path(&sdir, "arch")).unwrap().unwrap();
            assert_eq!(c.pos, s.written().0);
            assert_eq!(c.seq, Some(s.log().next_seq()));
            assert_eq!(c.audit, Some(audit(k)));
        }
        let retired = root.join("retired-cursors/shard-0002/arch.cursor");
        assert_eq!(
            read_cursor(&retired).unwrap().unwrap().audit,
            Some(audit(2))
        );
        // Back to 3: shard 2's audit file comes back from the retired cursor.
        let req3 = Request {
            shards: Some(3),
            ..req
        };
        run(&req3).unwrap();
        let dd = DataDir::open_or_create(root, 1).unwrap();
        let c = read_cursor(&cursor_path(&dd.shard_dir(ShardId(2)), "arch"))
            .unwrap()
            .unwrap();
        assert_eq!(c.audit, Some(audit(2)));
        assert!(!root.join(RETIRED_CURSORS_DIR).exists());
    }

    #[test]
    fn migrate_leaves_any_format_2_directory_alone() {
        // migrate on a format-2 directory changes nothing, even one whose table is not the
        // default (only reshard replaces a table).
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fill(root, 2, 4, 1);
        let table = Router::from_ranges(2, &[(0, 1), (7, 0)]).unwrap();
        datadir::write_meta(root, &table, 3).unwrap();
        let meta = std::fs::read(root.join(META_FILE)).unwrap();
        let req = Request {
            root: root.to_path_buf(),
            shards: None,
            segment_bytes: None,
        };
        assert!(
            matches!(run(&req).unwrap(), Outcome::Unchanged(m) if m.contains("already format 2"))
        );
        assert_eq!(std::fs::read(root.join(META_FILE)).unwrap(), meta);
    }

    #[test]
    fn a_crash_before_the_commit_leaves_the_old_layout() {
        // A staging directory left by a run that never committed is ignored by readers and
        // removed by the next run, which then succeeds.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fill(root, 2, 10, 3);
        let staging = root.join(STAGING_DIR).join("shard-0000");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("junk"), "x").unwrap();
        assert_eq!(DataDir::open_or_create(root, 1).unwrap().shard_count(), 2);
        let req = Request {
            root: root.to_path_buf(),
            shards: Some(4),
            segment_bytes: None,
        };
        run(&req).unwrap();
        assert!(!root.join(STAGING_DIR).exists());
        assert_eq!(read_back(root).values().map(Vec::len).sum::<usize>(), 30);
        assert_eq!(
            shard_of("d-1", 4),
            DataDir::open_or_create(root, 1)
                .unwrap()
                .router()
                .shard_of("d-1")
        );
    }
}
