//! A read-only reader of one shard's log for another thread than the one that appends (the
//! storage flusher): it maps segment files read-only, one at a time, finds the next segment by
//! listing the shard directory when the reader moves past the one it has, and returns the entries
//! from a position up to an upper bound the caller gives (the shard's durable position), each
//! validated exactly as the log validates them (`log::decode_entry`: length, CRC, rkyv, record
//! rules) plus sequence continuity. It never writes, never takes the shard's lock, and never
//! decides what to do about a gap or damage: it reports them ([`TailError`]).
//!
//! Invariant: no byte at or beyond the bound is ever returned, and an entry is returned only if it
//! ends at or before the bound. Below the durable position the appender never changes a byte
//! (data once written never moves, recovery only touches bytes past it, retention deletes whole
//! files), so what the reader sees there is stable; a segment deleted while mapped stays readable
//! through the mapping, and one deleted before it was mapped is reported as
//! [`TailError::Deleted`] with the oldest position still on disk.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::format::{parse_segment_file_name, EntryFault, SegmentHeader};
use super::{decode_entry, DecodeFault, Entry, LogPos};
use crate::limits::{
    ENTRY_ALIGN_BYTES, ENTRY_HEADER_BYTES, SEGMENT_BYTES_MAX, SEGMENT_HEADER_BYTES,
};
use crate::route::ShardId;

/// Errors of the tail reader. None of them is fatal to the reader: after any of them the caller
/// may `seek` elsewhere or try again later.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// A file-system operation failed.
    #[error("shard {shard}: {op} {}: {source}", path.display())]
    Io {
        /// Shard being read.
        shard: ShardId,
        /// What was being done.
        op: &'static str,
        /// File or directory concerned.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The segment that held `pos` was deleted (retention) before the reader got there.
    #[error(
        "shard {shard}: log data at {pos} was deleted before it was read; the oldest retained \
         entry is at {resume}"
    )]
    Deleted {
        /// Shard being read.
        shard: ShardId,
        /// The position asked for.
        pos: LogPos,
        /// First entry position of the oldest segment still on disk.
        resume: LogPos,
    },
    /// No segment file covers `pos` (it is past the end of the log, or the directory is empty).
    #[error("shard {shard}: no segment file holds position {pos}")]
    Missing {
        /// Shard being read.
        shard: ShardId,
        /// The position asked for.
        pos: LogPos,
    },
    /// A segment file is unusable (bad header, wrong shard or base, shorter than its size).
    #[error("shard {shard}: segment {}: {reason}", path.display())]
    Segment {
        /// Shard being read.
        shard: ShardId,
        /// The segment file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Below the bound, the bytes at `pos` are not a valid entry.
    #[error("shard {shard}: no valid entry at {pos} (below the bound {bound}): {reason}")]
    Damaged {
        /// Shard being read.
        shard: ShardId,
        /// Where the reader stands.
        pos: LogPos,
        /// The bound given.
        bound: LogPos,
        /// What failed.
        reason: &'static str,
    },
    /// The entry at `pos` does not carry the sequence number that follows the previous one (the
    /// log was rewritten under the reader, e.g. recovery quarantined damaged data).
    #[error("shard {shard}: entry at {pos} has sequence number {found}, expected {expected}")]
    Sequence {
        /// Shard being read.
        shard: ShardId,
        /// The entry's position.
        pos: LogPos,
        /// The sequence number expected.
        expected: u64,
        /// The one found.
        found: u64,
    },
}

/// One read-only mapped segment.
struct ReadSegment {
    base: u64,
    bytes: u64,
    map: Mmap,
}

impl ReadSegment {
    fn end(&self) -> u64 {
        self.base + self.bytes
    }
}

/// Reads one shard's log from a position up to a caller-given bound. See the module docs.
pub struct Tail {
    shard: ShardId,
    dir: PathBuf,
    /// The segment holding `pos` (mapped on demand; earlier ones are unmapped as the reader moves).
    seg: Option<ReadSegment>,
    /// Next position to read.
    pos: u64,
    /// Sequence number the next entry must carry, when known.
    next_seq: Option<u64>,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail")
            .field("shard", &self.shard)
            .field("dir", &self.dir)
            .field("segment", &self.seg.as_ref().map(|s| s.base))
            .field("pos", &self.pos)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

fn io_err(shard: ShardId, op: &'static str, path: &Path, source: io::Error) -> TailError {
    TailError::Io {
        shard,
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The segment files of a shard directory as `(base, path)`, in base order (temporary and other
/// files are ignored).
pub fn list_segments(dir: &Path, shard: ShardId) -> Result<Vec<(u64, PathBuf)>, TailError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| io_err(shard, "list shard dir", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err(shard, "list shard dir", dir, e))?;
        let name = entry.file_name();
        if let Some(base) = name.to_str().and_then(parse_segment_file_name) {
            out.push((base, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(base, _)| *base);
    Ok(out)
}

fn bad_segment(shard: ShardId, path: &Path, reason: String) -> TailError {
    TailError::Segment {
        shard,
        path: path.to_path_buf(),
        reason,
    }
}

/// Opens and maps one segment read-only after checking its header against the name and shard.
/// `Ok(None)` if the file no longer exists (deleted since it was listed).
fn map_segment(path: &Path, shard: ShardId, base: u64) -> Result<Option<ReadSegment>, TailError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(shard, "open segment", path, e)),
    };
    let file_len = file
        .metadata()
        .map_err(|e| io_err(shard, "stat segment", path, e))?
        .len();
    if file_len < SEGMENT_HEADER_BYTES as u64 {
        return Err(bad_segment(
            shard,
            path,
            "shorter than a segment header".into(),
        ));
    }
    let mut head = vec![0u8; SEGMENT_HEADER_BYTES];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| io_err(shard, "read segment header", path, e))?;
    let header =
        SegmentHeader::decode(&head).map_err(|f| bad_segment(shard, path, f.to_string()))?;
    if header.shard != shard.0 || header.base != base {
        return Err(bad_segment(
            shard,
            path,
            format!(
                "header says shard {} base {}, expected shard {shard} base {base}",
                header.shard, header.base
            ),
        ));
    }
    if header.segment_bytes > SEGMENT_BYTES_MAX || file_len < header.segment_bytes {
        // Mapping past the end of the file would fault (SIGBUS) on access: refuse instead.
        return Err(bad_segment(
            shard,
            path,
            format!(
                "file is {file_len} bytes, header says {} (at most {SEGMENT_BYTES_MAX})",
                header.segment_bytes
            ),
        ));
    }
    // SAFETY: the mapping is read-only and covers only bytes the file has (checked above). The
    // log never truncates a segment file (it is preallocated and only ever deleted whole; a
    // deleted file stays mapped until we unmap it), and the reader only interprets bytes below
    // the durable position, which the appender never modifies again.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .len(header.segment_bytes as usize)
            .map(&file)
    }
    .map_err(|e| io_err(shard, "mmap segment", path, e))?;
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(Some(ReadSegment {
        base,
        bytes: header.segment_bytes,
        map,
    }))
}

impl Tail {
    /// A reader of the shard log in `dir` that starts at `from` (an entry position, or any
    /// position inside a segment header meaning that segment's first entry). `next_seq`, when
    /// known, is the sequence number the entry at `from` must carry. No I/O happens until
    /// [`Tail::next`].
    pub fn new(
        dir: impl Into<PathBuf>,
        shard: ShardId,
        from: LogPos,
        next_seq: Option<u64>,
    ) -> Tail {
        Tail {
            shard,
            dir: dir.into(),
            seg: None,
            pos: from.0,
            next_seq,
        }
    }

    /// The shard read.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The shard directory read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the next entry is read (just past the last entry returned).
    pub fn pos(&self) -> LogPos {
        LogPos(self.pos)
    }

    /// The sequence number the next entry must carry, once known.
    pub fn next_seq(&self) -> Option<u64> {
        self.next_seq
    }

    /// Moves the reader to `pos` (see [`Tail::new`]).
    pub fn seek(&mut self, pos: LogPos, next_seq: Option<u64>) {
        self.pos = pos.0;
        self.next_seq = next_seq;
    }

    /// First entry position of the oldest segment on disk, if any.
    pub fn oldest(&self) -> Result<Option<LogPos>, TailError> {
        Ok(list_segments(&self.dir, self.shard)?
            .first()
            .map(|(base, _)| LogPos(base + SEGMENT_HEADER_BYTES as u64)))
    }

    /// Makes `self.seg` the segment holding `pos`, mapping it if needed.
    fn locate(&mut self, pos: u64) -> Result<(), TailError> {
        if let Some(s) = &self.seg {
            if s.base <= pos && pos < s.end() {
                return Ok(());
            }
        }
        // Unmap the old segment first: the reader holds at most one mapping.
        self.seg = None;
        // Two attempts: a segment deleted between listing and opening is listed anew.
        for _ in 0..2 {
            let list = list_segments(&self.dir, self.shard)?;
            let i = list.partition_point(|(base, _)| *base <= pos);
            if i == 0 {
                return Err(match list.first() {
                    Some((base, _)) => TailError::Deleted {
                        shard: self.shard,
                        pos: LogPos(pos),
                        resume: LogPos(base + SEGMENT_HEADER_BYTES as u64),
                    },
                    None => TailError::Missing {
                        shard: self.shard,
                        pos: LogPos(pos),
                    },
                });
            }
            let (base, path) = &list[i - 1];
            let Some(seg) = map_segment(path, self.shard, *base)? else {
                continue;
            };
            if pos >= seg.end() {
                return Err(TailError::Missing {
                    shard: self.shard,
                    pos: LogPos(pos),
                });
            }
            self.seg = Some(seg);
            return Ok(());
        }
        Err(TailError::Missing {
            shard: self.shard,
            pos: LogPos(pos),
        })
    }

    /// The next entry before `bound` (the shard's durable position), or `None` when the reader has
    /// reached it. Moves across segments as needed. The entry borrows the reader's mapping.
    pub fn next(&mut self, bound: LogPos) -> Result<Option<Entry<'_>>, TailError> {
        let header = SEGMENT_HEADER_BYTES as u64;
        let off = loop {
            if self.pos >= bound.0 {
                return Ok(None);
            }
            self.locate(self.pos)?;
            let seg = self.seg.as_ref().expect("located");
            let (base, seg_end) = (seg.base, seg.end());
            let off = self.pos - base;
            if off < header {
                self.pos = base + header;
                continue;
            }
            if off % ENTRY_ALIGN_BYTES as u64 != 0 {
                return Err(self.damaged(bound, "not an entry boundary"));
            }
            let at = off as usize;
            // A zero length (or no room for a header) is the end of this segment's data: the
            // appender moved on to the next segment if and only if the bound lies beyond it.
            let end_of_data =
                at + ENTRY_HEADER_BYTES > seg.map.len() || seg.map[at..at + 4] == [0, 0, 0, 0];
            if end_of_data {
                if bound.0 > seg_end {
                    self.pos = seg_end + header;
                    continue;
                }
                return Err(self.damaged(bound, "end of segment data below the bound"));
            }
            break off;
        };
        let seg = self.seg.as_ref().expect("located");
        match decode_entry(&seg.map, seg.base, off) {
            Ok(e) => {
                let end = e.end().0;
                if end > bound.0 {
                    // The bound cuts an entry (it is not a durable position): wait for more.
                    return Ok(None);
                }
                if let Some(expected) = self.next_seq {
                    if e.seq != expected {
                        return Err(TailError::Sequence {
                            shard: self.shard,
                            pos: e.pos,
                            expected,
                            found: e.seq,
                        });
                    }
                }
                self.next_seq = Some(e.seq + 1);
                self.pos = end;
                Ok(Some(e))
            }
            Err(fault) => {
                let reason = match fault {
                    DecodeFault::Frame(EntryFault::End)
                    | DecodeFault::Frame(EntryFault::Length) => "entry length out of range",
                    DecodeFault::Frame(EntryFault::Crc) => "entry CRC mismatch",
                    DecodeFault::Record => "entry payload failed validation",
                };
                let pos = LogPos(seg.base + off);
                Err(TailError::Damaged {
                    shard: self.shard,
                    pos,
                    bound,
                    reason,
                })
            }
        }
    }

    fn damaged(&self, bound: LogPos, reason: &'static str) -> TailError {
        TailError::Damaged {
            shard: self.shard,
            pos: LogPos(self.pos),
            bound,
            reason,
        }
    }
}

/// The end of the valid entries of a shard log on disk (the position just past the last valid
/// entry of the last segment), read without the shard's lock: for tools such as `geobeat sinks`.
/// While the shard is being appended to, the answer is a snapshot that may include entries not yet
/// durable. `None` if the directory holds no segment.
pub fn log_end(dir: &Path, shard: ShardId) -> Result<Option<LogPos>, TailError> {
    let list = list_segments(dir, shard)?;
    let Some((base, path)) = list.last() else {
        return Ok(None);
    };
    let Some(seg) = map_segment(path, shard, *base)? else {
        return Ok(None);
    };
    let mut off = SEGMENT_HEADER_BYTES as u64;
    while let Ok(e) = decode_entry(&seg.map, seg.base, off) {
        off += u64::from(e.len_bytes);
    }
    Ok(Some(LogPos(seg.base + off)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Log, LogConfig};
    use crate::record::Heartbeat;
    use std::time::{Duration, SystemTime};

    const SEG: u64 = crate::limits::SEGMENT_BYTES_MIN;

    fn hb(i: u64) -> Heartbeat {
        Heartbeat {
            device_id: format!("tail-{}", i % 7),
            lat: (i % 90) as f64,
            lon: (i % 180) as f64,
            ts_ms: 1_700_000_000_000 + i as i64,
            received_ms: 1_700_000_000_000 + i as i64,
            attrs: vec![b'a'; (i % 100) as usize],
            ..Heartbeat::default()
        }
    }

    fn open(dir: &Path) -> Log {
        let cfg = LogConfig {
            dir: dir.to_path_buf(),
            shard: ShardId(3),
            segment_bytes: SEG,
            write_mode: crate::log::WriteMode::default(),
        };
        Log::open(&cfg, |_, _| {}).expect("open").0
    }

    #[test]
    fn reads_exactly_up_to_the_bound_across_segments() {
        // Appends enough heartbeats to fill several segments, then reads them back through the
        // tail reader in steps whose bounds are the positions after random entries: every entry
        // comes back once, in order, with its content, and nothing at or past a bound is returned.
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        let mut ends = Vec::new();
        let mut i = 0u64;
        while log.stats().segments < 4 {
            log.append(&hb(i), None).unwrap();
            ends.push(log.written());
            i += 1;
        }
        log.sync_blocking().unwrap();
        let mut tail = Tail::new(dir.path(), ShardId(3), LogPos(0), None);
        let mut seen = 0u64;
        for step in [1usize, 17, 500, 3000, usize::MAX] {
            let k = (seen as usize).saturating_add(step).min(ends.len());
            let bound = ends[k - 1];
            while let Some(e) = tail.next(bound).unwrap() {
                assert!(e.end() <= bound);
                assert_eq!(e.seq, seen + 1);
                assert_eq!(e.hb.to_owned_heartbeat(), hb(seen));
                seen += 1;
            }
            assert_eq!(seen as usize, k, "stopped exactly at the bound");
            assert_eq!(tail.pos(), bound);
        }
        assert_eq!(seen, i);
    }

    #[test]
    fn reads_while_another_thread_appends() {
        // One thread appends and publishes its durable position after each commit; this thread
        // tails with that bound. Every entry arrives once, in order, and never beyond the bound.
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let durable = Arc::new(AtomicU64::new(0));
        let total = 30_000u64;
        let writer = {
            let durable = durable.clone();
            let path = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let mut log = open(&path);
                durable.store(log.durable().0, Ordering::Release);
                for i in 0..total {
                    log.append(&hb(i), None).unwrap();
                    if i % 997 == 0 {
                        let d = log.sync_blocking().unwrap();
                        durable.store(d.0, Ordering::Release);
                    }
                }
                let d = log.sync_blocking().unwrap();
                durable.store(d.0, Ordering::Release);
                d
            })
        };
        let mut tail = Tail::new(dir.path(), ShardId(3), LogPos(0), None);
        let mut seen = 0u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while seen < total {
            assert!(
                std::time::Instant::now() < deadline,
                "tail stalled at {seen}"
            );
            let bound = LogPos(durable.load(Ordering::Acquire));
            if bound.0 == 0 {
                std::thread::yield_now();
                continue;
            }
            while let Some(e) = tail.next(bound).unwrap() {
                assert_eq!(e.hb.device_id.as_str(), hb(seen).device_id);
                assert!(e.end() <= bound);
                seen += 1;
            }
        }
        let end = writer.join().unwrap();
        assert_eq!(tail.pos(), end);
        assert!(tail.next(LogPos(u64::MAX)).is_err() || tail.pos() == end);
    }

    #[test]
    fn deleted_segments_are_reported_with_the_resume_point() {
        // Retention deletes the oldest segments (all consumed); a reader still positioned in them
        // gets `Deleted` naming the oldest retained entry, and reading from there works. A segment
        // deleted while mapped keeps serving the reader.
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        let mut i = 0u64;
        while log.stats().segments < 4 {
            log.append(&hb(i), None).unwrap();
            i += 1;
        }
        log.sync_blocking().unwrap();
        let bound = log.durable();
        let mut mapped = Tail::new(dir.path(), ShardId(3), LogPos(0), None);
        assert!(mapped.next(bound).unwrap().is_some());
        let far = SystemTime::now() + Duration::from_secs(3600);
        assert_eq!(log.delete_expired(far, Duration::ZERO).unwrap(), 3);
        // Still mapped: the rest of the first segment reads fine.
        let mut n = 1;
        let first_end = SEG;
        loop {
            match mapped.next(bound) {
                Ok(Some(e)) => {
                    assert!(e.pos.0 < first_end);
                    n += 1;
                }
                Err(TailError::Deleted { resume, .. }) => {
                    assert_eq!(resume, LogPos(3 * SEG + SEGMENT_HEADER_BYTES as u64));
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(n > 1);
        let mut fresh = Tail::new(dir.path(), ShardId(3), LogPos(0), None);
        let err = fresh.next(bound).unwrap_err();
        let TailError::Deleted { resume, .. } = err else {
            panic!("expected Deleted, got {err}")
        };
        assert_eq!(fresh.oldest().unwrap(), Some(resume));
        fresh.seek(resume, None);
        let mut rest = 0;
        while fresh.next(bound).unwrap().is_some() {
            rest += 1;
        }
        assert!(rest > 0);
        assert_eq!(fresh.pos(), bound);
        assert_eq!(log_end(dir.path(), ShardId(3)).unwrap(), Some(bound));
    }

    #[test]
    fn damage_and_sequence_breaks_are_errors_not_panics() {
        // A flipped payload byte below the bound is `Damaged`; a wrong expected sequence number is
        // `Sequence`; a position that is not an entry boundary is `Damaged`; a bound past the log
        // with no more data is `Damaged` (end of data below the bound), and none of them panics.
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        let mut positions = Vec::new();
        for i in 0..10 {
            positions.push(log.append(&hb(i), None).unwrap());
        }
        let end = log.sync_blocking().unwrap();
        drop(log);
        let mut t = Tail::new(dir.path(), ShardId(3), positions[2], Some(99));
        assert!(matches!(
            t.next(end),
            Err(TailError::Sequence {
                expected: 99,
                found: 3,
                ..
            })
        ));
        let mut t = Tail::new(dir.path(), ShardId(3), LogPos(positions[2].0 + 8), None);
        assert!(matches!(t.next(end), Err(TailError::Damaged { .. })));
        let mut t = Tail::new(dir.path(), ShardId(3), end, None);
        assert!(matches!(
            t.next(LogPos(end.0 + 64)),
            Err(TailError::Damaged { .. })
        ));
        // Flip a byte inside entry 5's payload.
        let seg = dir.path().join(crate::log::format::segment_file_name(0));
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[0xFF], positions[5].0 + 40).unwrap();
        let mut t = Tail::new(dir.path(), ShardId(3), LogPos(0), None);
        for _ in 0..5 {
            t.next(end).unwrap().unwrap();
        }
        let err = t.next(end).unwrap_err();
        assert!(
            matches!(err, TailError::Damaged { pos, .. } if pos == positions[5]),
            "{err}"
        );
        let mut empty = Tail::new(dir.path().join("nope"), ShardId(3), LogPos(0), None);
        assert!(matches!(empty.next(end), Err(TailError::Io { .. })));
    }
}
