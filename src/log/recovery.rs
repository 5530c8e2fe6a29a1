//! Recovery of a shard log at open: lists the segment files, checks each header and the chain of
//! bases and sequence numbers, scans every entry (CRC, then rkyv validation, then the expected
//! sequence number) feeding each valid one to the caller's callback, and repairs the end. It owns
//! the damage policy (see `shards/README.md`): a torn tail is zeroed; damage in the middle is
//! reported, the damaged file copied to `quarantine/`, later segments moved there, and the valid
//! prefix kept. It does not append or commit (that is `Log`).
//!
//! Invariant: after recovery the log is exactly the longest valid prefix of what was on disk,
//! every byte past it in the last segment is zero and synced, and no segment follows a damaged
//! one, so a later crash can never resurrect stale bytes and sequence numbers stay contiguous.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::error::Error;
use super::format::{
    parse_entry, parse_segment_file_name, EntryFault, POS_NONE, SEGMENT_TMP_SUFFIX,
};
use super::segment::{sync_dir, Opened, Segment};
use super::storage::Disk;
use super::{Entry, LogPos, WriteMode};
use crate::limits::{ENTRY_ALIGN_BYTES, SEGMENT_HEADER_BYTES};
use crate::record;
use crate::route::ShardId;

/// Name of the directory (inside the shard directory) that receives damaged segment copies.
pub const QUARANTINE_DIR: &str = "quarantine";

/// One place where recovery found damage in the middle of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Segment file where the damage starts.
    pub path: PathBuf,
    /// Byte offset of the first bad byte within that file.
    pub offset: u64,
    /// The same place as a global log position.
    pub pos: LogPos,
    /// What was wrong.
    pub reason: String,
    /// Where the forensic copy of the damaged file went (if the copy succeeded).
    pub copy: Option<PathBuf>,
    /// Later segment files moved into quarantine because they follow the damage.
    pub moved_aside: Vec<PathBuf>,
}

/// What recovery found and did.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Segments kept.
    pub segments: usize,
    /// Valid entries recovered.
    pub entries: u64,
    /// Bytes of valid entries recovered (headers, payloads, padding).
    pub bytes: u64,
    /// Bytes zeroed past the last valid entry of the last segment (a torn write).
    pub torn_tail_bytes: u64,
    /// Damage in the middle of the log (empty on a clean or merely torn log).
    pub damaged: Vec<Damage>,
    /// Wall time of recovery.
    pub elapsed: Duration,
}

pub(crate) struct Recovered {
    pub segments: VecDeque<Segment>,
    pub next_seq: Option<u64>,
    pub report: RecoveryReport,
}

/// A block of zeros to compare against: slice equality on bytes is a `memcmp`, which is fast even
/// in unoptimised builds (tests reopen logs thousands of times).
static ZEROS: [u8; 4096] = [0; 4096];

/// Index just past the last non-zero byte of `b`, or 0 if all zero. Works backwards in 4 KiB
/// blocks so scanning the zero remainder of a fresh segment is a series of `memcmp`s.
fn nonzero_end(b: &[u8]) -> usize {
    let mut end = b.len();
    for block in b.rchunks(ZEROS.len()) {
        if block != &ZEROS[..block.len()] {
            let k = block
                .iter()
                .rposition(|&x| x != 0)
                .expect("block has a non-zero byte");
            return end - block.len() + k + 1;
        }
        end -= block.len();
    }
    0
}

/// The first offset in `(from, to)` (entry-aligned) holding a fully valid entry, if any.
fn find_valid_entry(data: &[u8], from: usize, to: usize) -> Option<usize> {
    let mut off = from + ENTRY_ALIGN_BYTES;
    while off < to {
        if let Ok(raw) = parse_entry(data, off) {
            if record::access_payload(raw.payload, raw.flags).is_some() {
                return Some(off);
            }
        }
        off += ENTRY_ALIGN_BYTES;
    }
    None
}

struct SegmentScan {
    end: usize,
    entries: u64,
    next_seq: u64,
    fault: Option<String>,
}

/// Scans one segment's entries from the header on, feeding each valid one to `on_entry`.
fn scan_segment<F>(seg: &Segment, first_seq: u64, on_entry: &mut F) -> SegmentScan
where
    F: FnMut(LogPos, &Entry<'_>),
{
    debug_assert!(first_seq >= super::format::FIRST_SEQ);
    debug_assert_eq!(
        seg.data_end, SEGMENT_HEADER_BYTES as u64,
        "a segment is scanned once"
    );
    let data = seg.data();
    let mut off = SEGMENT_HEADER_BYTES;
    let mut seq = first_seq;
    let mut entries = 0u64;
    let fault = loop {
        match parse_entry(data, off) {
            Ok(raw) => {
                if raw.seq != seq {
                    break Some(format!("sequence {} where {seq} was expected", raw.seq));
                }
                let Some((hb, dseq)) = record::access_payload(raw.payload, raw.flags) else {
                    break Some("payload fails record validation".to_string());
                };
                let pos = LogPos(seg.base + off as u64);
                let entry = Entry {
                    pos,
                    seq,
                    prev: (raw.prev_pos != POS_NONE).then_some(LogPos(raw.prev_pos)),
                    hb,
                    dseq,
                    device_hash_low: raw.device_hash_low,
                    len_bytes: raw.total_bytes as u32,
                };
                on_entry(pos, &entry);
                off += raw.total_bytes;
                seq += 1;
                entries += 1;
            }
            Err(EntryFault::End) => break None,
            Err(EntryFault::Length) => break Some("entry length out of range".to_string()),
            Err(EntryFault::Crc) => break Some("entry CRC mismatch".to_string()),
        }
    };
    SegmentScan {
        end: off,
        entries,
        next_seq: seq,
        fault,
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn quarantine_dir(disk: &Disk, shard: ShardId, dir: &Path) -> Result<PathBuf, Error> {
    let q = dir.join(QUARANTINE_DIR);
    disk.create_dir(&q)
        .map_err(|e| Error::io(shard, "create quarantine dir", &q, e))?;
    Ok(q)
}

fn quarantine_name(q: &Path, path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    q.join(format!("{name}.{}", now_ms()))
}

/// Copies a damaged segment into quarantine (best effort: a failed copy is logged, recovery goes
/// on, since refusing to start would not protect the data any better).
fn quarantine_copy(disk: &Disk, shard: ShardId, dir: &Path, path: &Path) -> Option<PathBuf> {
    let result = quarantine_dir(disk, shard, dir).and_then(|q| {
        let dst = quarantine_name(&q, path);
        disk.copy(path, &dst)
            .map_err(|e| Error::io(shard, "copy to quarantine", path, e))?;
        sync_dir(disk, shard, &q)?;
        Ok(dst)
    });
    match result {
        Ok(dst) => Some(dst),
        Err(e) => {
            tracing::error!(shard = shard.0, error = %e, "could not copy damaged segment to quarantine");
            None
        }
    }
}

/// Moves segment files that follow damage into quarantine (they must leave the shard directory so
/// new segments can take their positions).
fn quarantine_move(
    disk: &Disk,
    shard: ShardId,
    dir: &Path,
    paths: &[PathBuf],
) -> Result<Vec<PathBuf>, Error> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let q = quarantine_dir(disk, shard, dir)?;
    let mut moved = Vec::with_capacity(paths.len());
    for p in paths {
        let dst = quarantine_name(&q, p);
        disk.rename(p, &dst)
            .map_err(|e| Error::io(shard, "move to quarantine", p, e))?;
        moved.push(dst);
    }
    sync_dir(disk, shard, &q)?;
    sync_dir(disk, shard, dir)?;
    Ok(moved)
}

/// Recovers the log in `dir` (which exists and is locked by the caller).
pub(crate) fn recover<F>(
    disk: &Disk,
    shard: ShardId,
    dir: &Path,
    write_mode: WriteMode,
    mut on_entry: F,
) -> Result<Recovered, Error>
where
    F: FnMut(LogPos, &Entry<'_>),
{
    let started = Instant::now();
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    let mut removed_tmp = false;
    let listing = disk
        .list(dir)
        .map_err(|e| Error::io(shard, "list shard dir", dir, e))?;
    for name in listing {
        let path = dir.join(&name);
        if name.ends_with(SEGMENT_TMP_SUFFIX) {
            // A segment whose creation never finished: it never held entries.
            disk.remove(&path)
                .map_err(|e| Error::io(shard, "remove unfinished segment", &path, e))?;
            removed_tmp = true;
        } else if let Some(base) = parse_segment_file_name(&name) {
            files.push((base, path));
        }
    }
    if removed_tmp {
        sync_dir(disk, shard, dir)?;
    }
    files.sort();

    let mut report = RecoveryReport::default();
    let mut segments: VecDeque<Segment> = VecDeque::with_capacity(files.len());
    let mut next_seq: Option<u64> = None;
    let mut i = 0;
    while i < files.len() {
        let (base, path) = &files[i];
        let is_last_file = i + 1 == files.len();
        let mut seg = match Segment::open(disk, path, shard, *base, write_mode)? {
            Opened::Ok(seg) => seg,
            Opened::Bad(reason) => {
                if segments.is_empty() {
                    return Err(Error::Corrupt {
                        shard,
                        path: path.clone(),
                        reason,
                    });
                }
                let copy = quarantine_copy(disk, shard, dir, path);
                let rest: Vec<PathBuf> = files[i..].iter().map(|(_, p)| p.clone()).collect();
                let moved = quarantine_move(disk, shard, dir, &rest)?;
                record_damage(&mut report, shard, path, 0, *base, reason, copy, moved);
                break;
            }
        };
        let mismatch = match (segments.back(), next_seq) {
            (Some(prev), _) if prev.end() != *base => Some(format!(
                "segment starts at {base}, previous segment ends at {}",
                prev.end()
            )),
            (_, Some(expected)) if seg.first_seq != expected => Some(format!(
                "segment's first sequence is {}, expected {expected}",
                seg.first_seq
            )),
            _ => None,
        };
        if let Some(reason) = mismatch {
            let rest: Vec<PathBuf> = files[i..].iter().map(|(_, p)| p.clone()).collect();
            drop(seg);
            let moved = quarantine_move(disk, shard, dir, &rest)?;
            record_damage(&mut report, shard, path, 0, *base, reason, None, moved);
            break;
        }

        seg.prefetch();
        if let Some((_, next_path)) = files.get(i + 1) {
            // Start reading the next segment while this one is scanned (cold starts overlap I/O
            // with CRC and validation work).
            disk.readahead(next_path);
        }
        let scan = scan_segment(&seg, seg.first_seq, &mut on_entry);
        // Paired with `parse_entry`'s bound check: the valid prefix ends inside the segment.
        assert!(scan.end as u64 <= seg.bytes && scan.end >= SEGMENT_HEADER_BYTES);
        seg.data_end = scan.end as u64;
        seg.flushed = seg.data_end;
        report.entries += scan.entries;
        report.bytes += (scan.end - SEGMENT_HEADER_BYTES) as u64;
        next_seq = Some(scan.next_seq);

        let dirty_end = scan.end + nonzero_end(&seg.data()[scan.end..]);
        let mut stop = false;
        if dirty_end > scan.end {
            let valid_after = find_valid_entry(seg.data(), scan.end, dirty_end);
            let reason = scan
                .fault
                .clone()
                .unwrap_or_else(|| "non-zero bytes after the end-of-data marker".to_string());
            if valid_after.is_some() || !is_last_file {
                let reason = match valid_after {
                    Some(off) => format!("{reason}; a valid entry follows at offset {off}"),
                    None => format!("{reason} in a sealed segment"),
                };
                let copy = quarantine_copy(disk, shard, dir, path);
                let rest: Vec<PathBuf> = files[i + 1..].iter().map(|(_, p)| p.clone()).collect();
                let moved = quarantine_move(disk, shard, dir, &rest)?;
                record_damage(
                    &mut report,
                    shard,
                    path,
                    scan.end as u64,
                    *base,
                    reason,
                    copy,
                    moved,
                );
                stop = true;
            } else {
                tracing::warn!(
                    shard = shard.0,
                    path = %path.display(),
                    offset = scan.end,
                    bytes = dirty_end - scan.end,
                    reason = %reason,
                    "zeroing torn tail of the shard log"
                );
                report.torn_tail_bytes += (dirty_end - scan.end) as u64;
            }
            // Zero the bad bytes and sync before anything is appended after them.
            seg.write_zeros(scan.end as u64, dirty_end as u64)
                .map_err(|e| Error::io(shard, "zero torn tail", path, e))?;
            seg.sync_range(scan.end as u64, dirty_end as u64)
                .map_err(|e| Error::io(shard, "sync zeroed tail", path, e))?;
        }
        segments.push_back(seg);
        if stop {
            break;
        }
        i += 1;
    }
    report.segments = segments.len();
    report.elapsed = started.elapsed();
    Ok(Recovered {
        segments,
        next_seq,
        report,
    })
}

#[allow(clippy::too_many_arguments)]
fn record_damage(
    report: &mut RecoveryReport,
    shard: ShardId,
    path: &Path,
    offset: u64,
    base: u64,
    reason: String,
    copy: Option<PathBuf>,
    moved_aside: Vec<PathBuf>,
) {
    tracing::error!(
        shard = shard.0,
        path = %path.display(),
        offset,
        reason = %reason,
        copy = ?copy,
        moved_aside = ?moved_aside,
        "DAMAGE in the middle of the shard log: keeping the valid prefix, later data quarantined"
    );
    report.damaged.push(Damage {
        path: path.to_path_buf(),
        offset,
        pos: LogPos(base + offset),
        reason,
        copy,
        moved_aside,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_end_finds_the_last_non_zero_byte() {
        // Checks the block-wise search against the obvious definition at block edges.
        for len in [0usize, 1, 63, 64, 4095, 4096, 4097, 10_000] {
            let mut b = vec![0u8; len];
            assert_eq!(nonzero_end(&b), 0);
            for at in [0usize, 1, 4095, 4096, 8191, 9_999] {
                if at < len {
                    b[at] = 7;
                    let want = b.iter().rposition(|&x| x != 0).map_or(0, |k| k + 1);
                    assert_eq!(nonzero_end(&b), want, "len {len} at {at}");
                }
            }
        }
    }
}
