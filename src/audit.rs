//! `geobeat audit reconcile` (issue 18 item 2): proof that nothing is missing between the shard
//! logs and the sinks. For every shard it counts, per device, the durable log entries a sink's
//! cursor says it has exported (positions from the oldest retained entry up to the cursor) and
//! the entries the sink actually holds in that range (NDJSON lines in the audit directory,
//! `history` rows in PostgreSQL), and prints every device whose counts differ, plus per sink and
//! shard the entries exported vs durable in the log. It owns the counting and the report; it
//! never writes (it reads segment files, cursors, audit files and runs `SELECT`s), so it works
//! while a server runs (a snapshot: the cursor is read before the sink, and only positions below
//! it are compared, so a sink that moves on meanwhile adds nothing to the comparison).
//!
//! `geobeat audit verify` (issue 18 item 3) recomputes every shard's hash chain from its segment
//! files (`log::chain::verify_shard`) and, with `--audit-dir`, every audit file's digests
//! (`flusher::audit::verify_shard_files`), and names the first entry or line that does not
//! match. It is read-only too: on a running server it checks what the chain already covers and
//! counts the newest, not yet chained entries apart.
//!
//! Invariant: a difference is reported whenever, for some device and shard, the number of log
//! entries below a sink's cursor differs from the number of sink records of that device with a
//! position in the same range (a duplicate in the sink counts twice, so it shows as a difference).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::datadir::shard_dir_name;
use crate::flusher::cursor::{read_cursor, Cursor, CURSORS_DIR, CURSOR_SUFFIX};
use crate::log::tail::{log_end, Tail};
use crate::log::LogPos;
use crate::route::ShardId;

pub use crate::config::{AuditArgs, AuditCommand, ReconcileArgs};

/// Why reconciling could not be done (as opposed to differences found).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Bad arguments or data directory.
    #[error("{0}")]
    Usage(String),
    /// A log could not be read.
    #[error("shard {shard}: reading the log: {reason}")]
    Log {
        /// The shard.
        shard: ShardId,
        /// What failed.
        reason: String,
    },
    /// A sink could not be read.
    #[error("sink {sink}: {reason}")]
    Sink {
        /// The sink's name.
        sink: String,
        /// What failed.
        reason: String,
    },
}

impl AuditError {
    /// The process exit code: 2 (1 is "differences found").
    pub fn exit_code(&self) -> u8 {
        2
    }
}

/// Per sink and shard: what the log holds and what the sink exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardTally {
    /// Sink name.
    pub sink: String,
    /// Shard.
    pub shard: u32,
    /// Durable entries in the retained log.
    pub log_entries: u64,
    /// Log entries below the sink's cursor (what it claims to have exported).
    pub below_cursor: u64,
    /// Sink records with a position in the retained log below the cursor.
    pub exported: u64,
    /// Sink records older than the oldest retained log entry (not comparable).
    pub before_log: u64,
}

/// A device whose counts differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Sink name.
    pub sink: String,
    /// Shard.
    pub shard: u32,
    /// Device id.
    pub device: String,
    /// Log entries below the cursor.
    pub log: u64,
    /// Sink records in the same range.
    pub sink_count: u64,
}

/// The result of a reconcile.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Per sink and shard.
    pub tallies: Vec<ShardTally>,
    /// Every difference.
    pub differences: Vec<Difference>,
}

impl Report {
    /// The human report: one line per sink and shard, then one per difference, then a verdict.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for t in &self.tallies {
            s.push_str(&format!(
                "sink {} shard {}: {} durable in the log, {} below the cursor, {} exported{}\n",
                t.sink,
                t.shard,
                t.log_entries,
                t.below_cursor,
                t.exported,
                if t.before_log > 0 {
                    format!(
                        " ({} older than the retained log, not compared)",
                        t.before_log
                    )
                } else {
                    String::new()
                }
            ));
        }
        for d in &self.differences {
            s.push_str(&format!(
                "difference: sink {} shard {} device {:?}: log {} sink {}\n",
                d.sink, d.shard, d.device, d.log, d.sink_count
            ));
        }
        s.push_str(&format!("{} differences\n", self.differences.len()));
        s
    }
}

/// The result of `geobeat audit verify`.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Per shard: what its log's chain check found.
    pub shards: Vec<crate::log::chain::ShardVerify>,
    /// Per shard of the audit directory: what its files' check found.
    pub audit: Vec<crate::flusher::audit::FilesVerify>,
}

impl VerifyReport {
    /// Whether anything did not match.
    pub fn failed(&self) -> bool {
        self.shards.iter().any(|s| s.mismatch.is_some())
            || self.audit.iter().any(|a| a.mismatch.is_some())
    }

    /// The human report: one line per shard (and audit shard), each mismatch, then a verdict.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (k, v) in self.shards.iter().enumerate() {
            let start = match v.start {
                Some((base, true)) => format!(
                    ", chain starts at {base} from a sealed digest recorded there (earlier segments deleted)"
                ),
                Some((base, false)) => format!(", chain starts at {base} (genesis)"),
                None => String::new(),
            };
            s.push_str(&format!(
                "log shard {k}: {} segments ({} sealed), {} entries in {} groups verified, {} newest entries not yet chained{start}\n",
                v.segments, v.sealed, v.entries, v.groups, v.unchained
            ));
            if let Some(m) = &v.mismatch {
                s.push_str(&format!("MISMATCH: {m}\n"));
            }
        }
        for a in &self.audit {
            s.push_str(&format!(
                "audit shard {}: {} files, {} lines in {} batches verified, {} lines not yet covered\n",
                a.shard, a.files, a.lines, a.batches, a.uncovered
            ));
            if let Some(m) = &a.mismatch {
                s.push_str(&format!("MISMATCH: {m}\n"));
            }
        }
        let bad = self.shards.iter().filter(|s| s.mismatch.is_some()).count()
            + self.audit.iter().filter(|a| a.mismatch.is_some()).count();
        s.push_str(&if bad == 0 {
            "verified: no mismatch\n".to_string()
        } else {
            format!("{bad} mismatches\n")
        });
        s
    }
}

/// Runs `geobeat audit verify` over the data directory `data_dir` and, if given, the audit
/// directory `audit_dir`.
pub fn verify(
    data_dir: Option<&PathBuf>,
    audit_dir: Option<&Path>,
) -> Result<VerifyReport, AuditError> {
    let root = crate::config::offline_data_dir(data_dir);
    let layout = crate::datadir::inspect(&root)
        .map_err(|e| AuditError::Usage(format!("{}: {e}", root.display())))?;
    let mut report = VerifyReport::default();
    for k in 0..layout.shard_count {
        let shard = ShardId(k);
        let dir = root.join(shard_dir_name(shard));
        let v = crate::log::chain::verify_shard(&dir, shard).map_err(|e| AuditError::Log {
            shard,
            reason: e.to_string(),
        })?;
        report.shards.push(v);
    }
    if let Some(d) = audit_dir {
        if !d.is_dir() {
            return Err(AuditError::Usage(format!(
                "{}: not a directory",
                d.display()
            )));
        }
        for k in 0..layout.shard_count {
            let shard = ShardId(k);
            if !crate::flusher::audit::shard_dir(d, shard).is_dir() {
                continue;
            }
            let v = crate::flusher::audit::verify_shard_files(d, shard).map_err(|reason| {
                AuditError::Sink {
                    sink: d.display().to_string(),
                    reason,
                }
            })?;
            report.audit.push(v);
        }
    }
    Ok(report)
}

/// Per device counts of one shard.
type Counts = BTreeMap<String, u64>;

/// One sink to check: its name and how to count its records of a shard in `[from, to)`.
enum SinkReader {
    Audit {
        name: String,
        dir: PathBuf,
    },
    Postgres {
        name: String,
        client: Box<postgres::Client>,
        schema: String,
    },
}

impl SinkReader {
    fn name(&self) -> &str {
        match self {
            SinkReader::Audit { name, .. } | SinkReader::Postgres { name, .. } => name,
        }
    }

    /// Per device records with a position in `[from, to)`, and records below `from`.
    fn count(&mut self, shard: ShardId, from: u64, to: u64) -> Result<(Counts, u64), AuditError> {
        match self {
            SinkReader::Audit { name, dir } => {
                count_audit_dir(&dir.join(shard_dir_name(shard)), from, to).map_err(|reason| {
                    AuditError::Sink {
                        sink: name.clone(),
                        reason,
                    }
                })
            }
            SinkReader::Postgres {
                name,
                client,
                schema,
            } => {
                let err = |e: postgres::Error| AuditError::Sink {
                    sink: name.clone(),
                    reason: e.to_string(),
                };
                let rows = client
                    .query(
                        &format!(
                            "SELECT id, count(*) FROM {schema}.history \
                             WHERE shard = $1 AND pos >= $2 AND pos < $3 GROUP BY id"
                        ),
                        &[&(shard.0 as i32), &(from as i64), &(to as i64)],
                    )
                    .map_err(err)?;
                let mut counts = Counts::new();
                for r in rows {
                    counts.insert(r.get::<_, String>(0), r.get::<_, i64>(1) as u64);
                }
                let before: i64 = client
                    .query_one(
                        &format!(
                            "SELECT count(*) FROM {schema}.history WHERE shard = $1 AND pos < $2"
                        ),
                        &[&(shard.0 as i32), &(from as i64)],
                    )
                    .map_err(err)?
                    .get(0);
                Ok((counts, before as u64))
            }
        }
    }
}

/// Counts the lines of a shard's audit files (sealed, compressed, and open `.tmp` ones) by device,
/// for positions in `[from, to)`. An open file may end in a torn line or frame (a crash mid
/// batch): what follows its last complete line is ignored (it lies past the cursor).
fn count_audit_dir(dir: &Path, from: u64, to: u64) -> Result<(Counts, u64), String> {
    let mut counts = Counts::new();
    let mut before = 0u64;
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((counts, 0)),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    let mut files: Vec<PathBuf> = listing.flatten().map(|e| e.path()).collect();
    files.sort();
    for path in files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let open = name.ends_with(".tmp");
        let base = name.strip_suffix(".tmp").unwrap_or(name);
        let zst = base.ends_with(".ndjson.zst");
        if !zst && !base.ends_with(".ndjson") {
            continue;
        }
        let raw = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let text = if zst {
            let mut out = Vec::new();
            let mut dec = zstd::stream::read::Decoder::new(&raw[..])
                .map_err(|e| format!("{}: {e}", path.display()))?;
            match dec.read_to_end(&mut out) {
                Ok(_) => {}
                Err(_) if open => {} // a torn last frame of an open file
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
            out
        } else {
            raw
        };
        let mut lines = text.split(|&b| b == b'\n').peekable();
        while let Some(line) = lines.next() {
            if line.is_empty() {
                continue;
            }
            let last = lines.peek().is_none();
            #[derive(serde::Deserialize)]
            struct Line {
                id: String,
                pos: u64,
            }
            let l: Line = match serde_json::from_slice(line) {
                Ok(l) => l,
                // A torn line at the end of an open file lies past the cursor.
                Err(_) if open && last => break,
                Err(e) => return Err(format!("{}: bad line: {e}", path.display())),
            };
            if l.pos < from {
                before += 1;
            } else if l.pos < to {
                *counts.entry(l.id).or_default() += 1;
            }
        }
    }
    Ok((counts, before))
}

/// The cursors of a shard directory: `(sink name, cursor)`.
fn cursors(shard_dir: &Path) -> Vec<(String, Cursor)> {
    let mut out = Vec::new();
    let Ok(listing) = std::fs::read_dir(shard_dir.join(CURSORS_DIR)) else {
        return out;
    };
    for item in listing.flatten() {
        let name = item.file_name();
        let Some(sink) = name.to_str().and_then(|n| n.strip_suffix(CURSOR_SUFFIX)) else {
            continue;
        };
        if let Ok(Some(c)) = read_cursor(&item.path()) {
            out.push((sink.to_owned(), c));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Picks the sink name: the given one, else the only one of the wanted kind.
fn pick_sink(
    root: &Path,
    shards: u32,
    given: Option<&str>,
    audit_kind: bool,
) -> Result<String, AuditError> {
    if let Some(g) = given {
        return Ok(g.to_owned());
    }
    let mut names: Vec<String> = Vec::new();
    for k in 0..shards {
        for (name, c) in cursors(&root.join(shard_dir_name(ShardId(k)))) {
            if c.audit.is_some() == audit_kind && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    let kind = if audit_kind { "audit" } else { "postgres" };
    match names.len() {
        1 => Ok(names.remove(0)),
        0 => Err(AuditError::Usage(format!(
            "no {kind} sink has a cursor in {} yet (nothing exported)",
            root.display()
        ))),
        _ => Err(AuditError::Usage(format!(
            "several {kind} sinks ({}): name one with --{kind}-sink",
            names.join(", ")
        ))),
    }
}

/// Per device durable entries of a shard log in `[from, to)`, and the total in `[from, end)`.
fn count_log(dir: &Path, shard: ShardId, from: LogPos, to: LogPos) -> Result<Counts, AuditError> {
    let mut counts = Counts::new();
    let mut tail = Tail::new(dir, shard, from, None);
    loop {
        match tail.next(to) {
            Ok(Some(e)) => {
                *counts
                    .entry(e.hb.device_id.as_str().to_owned())
                    .or_default() += 1
            }
            Ok(None) => return Ok(counts),
            Err(e) => {
                return Err(AuditError::Log {
                    shard,
                    reason: e.to_string(),
                })
            }
        }
    }
}

/// Runs `geobeat audit reconcile`.
pub fn reconcile(args: &ReconcileArgs) -> Result<Report, AuditError> {
    let root = crate::config::offline_data_dir(args.data_dir.as_ref());
    let layout = crate::datadir::inspect(&root)
        .map_err(|e| AuditError::Usage(format!("{}: {e}", root.display())))?;
    if args.audit_dir.is_none() && args.postgres.is_none() {
        return Err(AuditError::Usage(
            "name at least one sink: --audit-dir D and/or --postgres URL".into(),
        ));
    }
    let mut sinks = Vec::new();
    if let Some(dir) = &args.audit_dir {
        let name = pick_sink(&root, layout.shard_count, args.audit_sink.as_deref(), true)?;
        sinks.push(SinkReader::Audit {
            name,
            dir: dir.clone(),
        });
    }
    if let Some(url) = &args.postgres {
        let name = pick_sink(
            &root,
            layout.shard_count,
            args.postgres_sink.as_deref(),
            false,
        )?;
        let client =
            postgres::Client::connect(url, postgres::NoTls).map_err(|e| AuditError::Sink {
                sink: name.clone(),
                reason: format!("connecting: {e}"),
            })?;
        if !args
            .schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(AuditError::Usage(
                "--schema must be a lower-case SQL identifier".into(),
            ));
        }
        sinks.push(SinkReader::Postgres {
            name,
            client: Box::new(client),
            schema: args.schema.clone(),
        });
    }
    let mut report = Report::default();
    for k in 0..layout.shard_count {
        let shard = ShardId(k);
        let dir = root.join(shard_dir_name(shard));
        let log_err = |e: crate::log::tail::TailError| AuditError::Log {
            shard,
            reason: e.to_string(),
        };
        let Some(end) = log_end(&dir, shard).map_err(log_err)? else {
            continue;
        };
        let first = Tail::new(&dir, shard, LogPos(0), None)
            .oldest()
            .map_err(log_err)?
            .unwrap_or(end);
        let all = count_log(&dir, shard, first, end)?;
        let log_entries: u64 = all.values().sum();
        let shard_cursors = cursors(&dir);
        for sink in &mut sinks {
            // The cursor first: the sink holds at least what it covers.
            let cursor = shard_cursors
                .iter()
                .find(|(n, _)| n == sink.name())
                .map_or(0, |(_, c)| c.pos);
            let to = LogPos(cursor.clamp(first.0, end.0));
            let want = if to == end {
                all.clone()
            } else {
                count_log(&dir, shard, first, to)?
            };
            let (have, before_log) = sink.count(shard, first.0, to.0)?;
            let mut devices: Vec<&String> = want.keys().chain(have.keys()).collect();
            devices.sort();
            devices.dedup();
            for d in devices {
                let (l, s) = (
                    want.get(d).copied().unwrap_or(0),
                    have.get(d).copied().unwrap_or(0),
                );
                if l != s {
                    report.differences.push(Difference {
                        sink: sink.name().to_owned(),
                        shard: k,
                        device: d.clone(),
                        log: l,
                        sink_count: s,
                    });
                }
            }
            report.tallies.push(ShardTally {
                sink: sink.name().to_owned(),
                shard: k,
                log_entries,
                below_cursor: want.values().sum(),
                exported: have.values().sum(),
                before_log,
            });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_files_are_counted_by_device_and_range_with_torn_open_tails() {
        // Sealed and open files: lines are counted per device for positions in [from, to);
        // older lines are counted apart; a torn last line of an open file is ignored, a bad line
        // in a sealed file is an error.
        let dir = tempfile::tempdir().unwrap();
        let line = |id: &str, pos: u64| format!("{{\"id\":\"{id}\",\"pos\":{pos},\"lat\":1}}\n");
        std::fs::write(
            dir.path().join("2026-01-01T00-00-00.ndjson"),
            [line("a", 10), line("a", 5000), line("b", 5100)].concat(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("2026-01-01T00-01-00.ndjson.tmp"),
            [
                line("a", 5200),
                line("b", 9000),
                "{\"id\":\"b\",\"po".into(),
            ]
            .concat(),
        )
        .unwrap();
        let (counts, before) = count_audit_dir(dir.path(), 4096, 9000).unwrap();
        assert_eq!(counts, Counts::from([("a".into(), 2), ("b".into(), 1)]));
        assert_eq!(before, 1);
        std::fs::write(dir.path().join("2026-01-01T00-02-00.ndjson"), "{\"id\":").unwrap();
        assert!(count_audit_dir(dir.path(), 4096, 9000).is_err());
    }
}
