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
//! counts the newest, not yet chained entries apart. With `--postgres URL` it also recomputes the
//! digest chain of the sink's `history` rows ([`crate::flusher::rowdigest`]) shard by shard in
//! `pos` order and names the first row whose digest does not match; rows without a digest
//! (written by an older build) are counted as "unchained" if they precede every chained row of
//! their shard, and are a mismatch after one (a cleared digest or an inserted row). With a data
//! directory as well it compares every row with the log entry at its position (naming the
//! column that differs, a row with no entry: "inserted", an entry below the sink's cursor, or
//! below a later row, with no row: "deleted"), which also catches what a chain alone cannot: the
//! newest rows deleted, or every digest cleared.
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

pub use crate::config::{AuditArgs, AuditCommand, ReconcileArgs, VerifyArgs};
use crate::flusher::rowdigest::{row_digest, RowFields, GENESIS};

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
    /// Per shard of the PostgreSQL sink: what its rows' check found.
    pub postgres: Vec<PgVerify>,
}

/// What `geobeat audit verify --postgres` found in one shard's `history` rows.
#[derive(Debug, Clone, Default)]
pub struct PgVerify {
    /// The shard.
    pub shard: u32,
    /// Rows read.
    pub rows: u64,
    /// Rows with a digest, verified up to the first mismatch.
    pub chained: u64,
    /// Rows without a digest before the shard's first chained row (written by an older build).
    pub unchained: u64,
    /// Rows compared with the log entry at their position (`None`: no data directory given).
    pub compared: Option<u64>,
    /// The first row whose digest does not match.
    pub chain_mismatch: Option<String>,
    /// The first row that differs from the log (or is missing from or absent in it).
    pub log_mismatch: Option<String>,
}

impl VerifyReport {
    /// Whether anything did not match.
    pub fn failed(&self) -> bool {
        self.mismatches() > 0
    }

    /// How many shards (of logs, audit files, PostgreSQL rows) have a mismatch.
    fn mismatches(&self) -> usize {
        self.shards.iter().filter(|s| s.mismatch.is_some()).count()
            + self.audit.iter().filter(|a| a.mismatch.is_some()).count()
            + self
                .postgres
                .iter()
                .filter(|p| p.chain_mismatch.is_some() || p.log_mismatch.is_some())
                .count()
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
        for p in &self.postgres {
            s.push_str(&format!(
                "postgres shard {}: {} rows, {} chained, {} unchained (written before digests){}\n",
                p.shard,
                p.rows,
                p.chained,
                p.unchained,
                p.compared
                    .map_or(String::new(), |c| format!(", {c} compared with the log")),
            ));
            for m in [&p.chain_mismatch, &p.log_mismatch].into_iter().flatten() {
                s.push_str(&format!("MISMATCH: {m}\n"));
            }
        }
        let bad = self.mismatches();
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

/// Runs `geobeat audit verify` with its arguments: the logs (and the audit files) unless
/// `--postgres` is given without a data directory, then the PostgreSQL rows.
pub fn verify_args(args: &VerifyArgs) -> Result<VerifyReport, AuditError> {
    let data_given =
        args.data_dir.is_some() || std::env::var("GEOBEAT_DATA_DIR").is_ok_and(|v| !v.is_empty());
    let mut report = if args.postgres.is_none() || data_given || args.audit_dir.is_some() {
        verify(args.data_dir.as_ref(), args.audit_dir.as_deref())?
    } else {
        VerifyReport::default()
    };
    if let Some(url) = &args.postgres {
        check_schema(&args.schema)?;
        let root = data_given.then(|| crate::config::offline_data_dir(args.data_dir.as_ref()));
        report.postgres = verify_postgres(
            url,
            &args.schema,
            root.as_deref(),
            args.postgres_sink.as_deref(),
        )?;
    }
    Ok(report)
}

/// Refuses a schema name that is not a plain lower-case SQL identifier.
fn check_schema(schema: &str) -> Result<(), AuditError> {
    if schema.is_empty()
        || !schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(AuditError::Usage(
            "--schema must be a lower-case SQL identifier".into(),
        ));
    }
    Ok(())
}

/// The log side of a PostgreSQL check: where the shard logs are and the sink whose cursors say
/// which rows must exist.
struct PgLogs<'a> {
    root: &'a Path,
    shard_count: u32,
    sink: String,
}

/// One shard's log, walked in step with its rows.
struct LogWalk {
    tail: Tail,
    /// The oldest retained entry (rows below it are not compared).
    first: LogPos,
    /// The log's end when the walk started.
    end: LogPos,
    /// The sink's cursor: every entry below it must have a row.
    cursor: u64,
    /// The next entry not yet matched with a row.
    next: Option<RowFields>,
}

impl LogWalk {
    fn open(logs: &PgLogs<'_>, shard: u32) -> Result<Option<LogWalk>, AuditError> {
        if shard >= logs.shard_count {
            return Ok(None);
        }
        let shard = ShardId(shard);
        let dir = logs.root.join(shard_dir_name(shard));
        let log_err = |e: crate::log::tail::TailError| AuditError::Log {
            shard,
            reason: e.to_string(),
        };
        let end = log_end(&dir, shard).map_err(log_err)?.unwrap_or(LogPos(0));
        let first = Tail::new(&dir, shard, LogPos(0), None)
            .oldest()
            .map_err(log_err)?
            .unwrap_or(end);
        let cursor = cursors(&dir)
            .into_iter()
            .find(|(n, _)| *n == logs.sink)
            .map_or(0, |(_, c)| c.pos);
        Ok(Some(LogWalk {
            tail: Tail::new(&dir, shard, first, None),
            first,
            end,
            cursor,
            next: None,
        }))
    }

    /// The next unmatched entry below `bound`, read if needed.
    fn peek(&mut self, bound: LogPos) -> Result<Option<&RowFields>, AuditError> {
        if self.next.is_none() {
            let shard = self.tail_shard();
            self.next = self
                .tail
                .next(bound)
                .map_err(|e| AuditError::Log {
                    shard,
                    reason: e.to_string(),
                })?
                .map(|e| RowFields::from_entry(shard, &e));
        }
        Ok(self.next.as_ref().filter(|e| e.pos < bound.0))
    }

    fn tail_shard(&self) -> ShardId {
        self.tail.shard()
    }
}

/// The check of one shard's rows, fed in `pos` order.
struct PgShardCheck {
    v: PgVerify,
    /// The digest the next row chains from, and the position of the row it belongs to.
    prev: (Vec<u8>, Option<u64>),
    /// Whether a chained row was seen.
    seen_chained: bool,
    /// The shard's log, with a data directory.
    log: Option<LogWalk>,
    /// Whether a data directory was given (a shard it does not have is then a mismatch).
    with_logs: bool,
    canon: Vec<u8>,
}

impl PgShardCheck {
    fn new(shard: u32, logs: Option<&PgLogs<'_>>) -> Result<PgShardCheck, AuditError> {
        let log = match logs {
            Some(l) => LogWalk::open(l, shard)?,
            None => None,
        };
        Ok(PgShardCheck {
            v: PgVerify {
                shard,
                compared: logs.map(|_| 0),
                ..PgVerify::default()
            },
            prev: (GENESIS.to_vec(), None),
            seen_chained: false,
            log,
            with_logs: logs.is_some(),
            canon: Vec::new(),
        })
    }

    fn name(f: &RowFields) -> String {
        format!("postgres shard {} pos {} device {:?}", f.shard, f.pos, f.id)
    }

    fn row(&mut self, f: &RowFields, digest: Option<&[u8]>) -> Result<(), AuditError> {
        self.v.rows += 1;
        if self.v.chain_mismatch.is_none() {
            match digest {
                None if self.seen_chained => {
                    self.v.chain_mismatch = Some(format!(
                        "{}: no digest after chained rows (an inserted row, or its digest was cleared)",
                        Self::name(f)
                    ));
                }
                None => {
                    self.v.unchained += 1;
                    self.prev = (GENESIS.to_vec(), Some(f.pos));
                }
                Some(d) => {
                    self.canon.clear();
                    f.canonical(&mut self.canon);
                    if row_digest(&self.prev.0, &self.canon)[..] == *d {
                        self.v.chained += 1;
                    } else {
                        let before = match self.prev.1 {
                            Some(p) => format!("the row before it, pos {p}"),
                            None => "none: it is the shard's first row".into(),
                        };
                        self.v.chain_mismatch = Some(format!(
                            "{}: the digest does not match the row and its predecessor ({before}): \
                             this row was edited, or rows right before it were deleted or inserted{}",
                            Self::name(f),
                            if self.with_logs {
                                ""
                            } else {
                                " (add --data-dir to compare with the log)"
                            }
                        ));
                    }
                    self.seen_chained = true;
                    self.prev = (d.to_vec(), Some(f.pos));
                }
            }
        }
        if self.v.log_mismatch.is_some() || !self.with_logs {
            return Ok(());
        }
        let Some(log) = &mut self.log else {
            self.v.log_mismatch = Some(format!(
                "{}: inserted (the data directory has no such shard)",
                Self::name(f)
            ));
            return Ok(());
        };
        if f.pos < log.first.0 {
            return Ok(()); // older than the retained log: the chain alone covers it
        }
        let end = log.end;
        if let Some(e) = log.peek(end)?.filter(|e| e.pos < f.pos) {
            self.v.log_mismatch = Some(format!(
                "{}: deleted (the log holds this entry, the table has no row for it; the next row is pos {})",
                Self::name(e),
                f.pos
            ));
            return Ok(());
        }
        match log.peek(end)? {
            Some(e) if e.pos == f.pos => {
                if let Some((column, row, entry)) = f.first_difference(e) {
                    self.v.log_mismatch = Some(format!(
                        "{}: edited: {column} is {row} in the row, {entry} in the log",
                        Self::name(f)
                    ));
                } else {
                    *self.v.compared.get_or_insert(0) += 1;
                }
                log.next = None;
            }
            _ => {
                self.v.log_mismatch = Some(format!(
                    "{}: inserted (no log entry at this position)",
                    Self::name(f)
                ));
            }
        }
        Ok(())
    }

    /// Ends the shard: entries below the sink's cursor that no row matched are deleted rows.
    fn finish(mut self) -> Result<PgVerify, AuditError> {
        if let (None, Some(log)) = (&self.v.log_mismatch, &mut self.log) {
            let bound = LogPos(log.cursor.min(log.end.0));
            if let Some(e) = log.peek(bound)? {
                self.v.log_mismatch = Some(format!(
                    "{}: deleted (the log holds this entry below the sink's cursor {}, the table has no row for it)",
                    Self::name(e),
                    log.cursor
                ));
            }
        }
        Ok(self.v)
    }
}

/// Checks the `history` rows of the PostgreSQL sink at `url`: their digest chain, and with a
/// data directory `root`, their content against the logs (see the module docs).
fn verify_postgres(
    url: &str,
    schema: &str,
    root: Option<&Path>,
    sink: Option<&str>,
) -> Result<Vec<PgVerify>, AuditError> {
    use postgres::fallible_iterator::FallibleIterator as _;
    let logs = match root {
        Some(root) => {
            let layout = crate::datadir::inspect(root)
                .map_err(|e| AuditError::Usage(format!("{}: {e}", root.display())))?;
            let sink = pick_sink(root, layout.shard_count, sink, false)?;
            Some(PgLogs {
                root,
                shard_count: layout.shard_count,
                sink,
            })
        }
        None => None,
    };
    let label = logs
        .as_ref()
        .map_or_else(|| "postgres".to_string(), |l| l.sink.clone());
    let err = |e: postgres::Error| AuditError::Sink {
        sink: label.clone(),
        reason: crate::flusher::FlushError::Postgres {
            sink: label.clone(),
            op: "verify",
            source: e,
        }
        .to_string(),
    };
    let mut client = postgres::Client::connect(url, postgres::NoTls).map_err(&err)?;
    let sql = format!(
        "SELECT shard, pos, seq, id, lat, lon, ts, received_at, alt, speed, heading, acc, \
         attrs::text, digest FROM {schema}.history ORDER BY shard, pos"
    );
    let mut rows = client
        .query_raw(&sql, std::iter::empty::<i32>())
        .map_err(&err)?;
    let mut out = Vec::new();
    let mut check: Option<PgShardCheck> = None;
    while let Some(r) = rows.next().map_err(&err)? {
        let f = RowFields {
            shard: r.get::<_, i32>(0) as u32,
            pos: r.get::<_, i64>(1) as u64,
            seq: r.get::<_, i64>(2) as u64,
            id: r.get(3),
            lat: r.get(4),
            lon: r.get(5),
            ts: r.get(6),
            received_at: r.get(7),
            opt: [r.get(8), r.get(9), r.get(10), r.get(11)],
            attrs: r.get(12),
        };
        let digest: Option<Vec<u8>> = r.get(13);
        if check.as_ref().is_none_or(|c| c.v.shard != f.shard) {
            if let Some(c) = check.take() {
                out.push(c.finish()?);
            }
            check = Some(PgShardCheck::new(f.shard, logs.as_ref())?);
        }
        check
            .as_mut()
            .expect("set above")
            .row(&f, digest.as_deref())?;
    }
    if let Some(c) = check.take() {
        out.push(c.finish()?);
    }
    // A shard with no row at all: every entry below the cursor is a deleted row.
    if let Some(l) = &logs {
        for k in 0..l.shard_count {
            if !out.iter().any(|p| p.shard == k) {
                out.push(PgShardCheck::new(k, Some(l))?.finish()?);
            }
        }
        out.sort_by_key(|p| p.shard);
    }
    Ok(out)
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
        check_schema(&args.schema)?;
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
