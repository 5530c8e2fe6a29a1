//! The last-location checkpoint of one shard: a file holding, for every device whose last location
//! lies below a log position B (the "covered" position), that last entry in full, so retention may
//! delete the log segments below B without losing any device's last location (issue 13 §1). It
//! owns the file's byte layout (described in `shards/README.md`, "Last-location checkpoint"),
//! building it, writing it atomically (tmp + fsync + rename + directory fsync), opening and
//! validating it, and lookups by log position over the read-only mapping (no per-device memory).
//! It does not decide which devices go in (the store does, from its table) nor when to write one
//! (retention does, before deleting segments).
//!
//! Invariants: a checkpoint file in a shard directory is complete and durable (it only ever
//! appears by rename after an fsync); its records are sorted by strictly increasing original log
//! position, all below B; every record's entry bytes are exactly a log entry (header, rkyv
//! payload, padding) and pass the same validation as the log's (`log::decode_entry`); the file is
//! refused as a whole (never partly used) if any check fails.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::limits::{CHECKPOINT_RECORDS_MAX, ENTRY_ALIGN_BYTES};
use crate::log::{self, Entry, LogPos};
use crate::route::ShardId;
use crate::table::DeviceAudit;

/// Name of the checkpoint file inside a shard directory.
pub const CHECKPOINT_FILE: &str = "last-locations.ckpt";
/// Name of a checkpoint being written (never valid; replaced by the next write, ignored at open).
pub const CHECKPOINT_TMP_FILE: &str = "last-locations.ckpt.tmp";
/// First eight bytes of a checkpoint file.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"GEOBCKP\0";
/// Version of the checkpoint layout written by this build.
pub const CHECKPOINT_VERSION: u32 = 1;
/// Bytes of the file header (fields, then zeros).
pub const HEADER_BYTES: usize = 64;
/// Bytes before each record's entry: original position, chain head.
const RECORD_PREFIX_BYTES: usize = 16;
/// Bytes of one index slot: original position, record offset.
const INDEX_SLOT_BYTES: usize = 16;
/// The header CRC covers bytes `0..HEADER_CRC_OFFSET`.
const HEADER_CRC_OFFSET: usize = 44;

const _: () = assert!(HEADER_BYTES % ENTRY_ALIGN_BYTES == 0);
const _: () = assert!(RECORD_PREFIX_BYTES % ENTRY_ALIGN_BYTES == 0);

/// Why a checkpoint could not be written or opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("shard {shard}: {op} {}: {source}", path.display())]
    Io {
        /// Shard concerned.
        shard: ShardId,
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file failed a check: it is refused as a whole.
    #[error("shard {shard}: last-location checkpoint {} is damaged ({reason}); restore it from a backup (moving it aside opens the shard without the last locations of the devices only it holds)", path.display())]
    Corrupt {
        /// Shard concerned.
        shard: ShardId,
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

impl Error {
    /// A mapper from an OS error to [`Error::Io`] for `op` on `path` (for `map_err`).
    pub fn io(
        shard: ShardId,
        op: &'static str,
        path: &Path,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_path_buf();
        move |source| Error::Io {
            shard,
            op,
            path,
            source,
        }
    }
}

#[inline]
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

#[inline]
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// One record of a checkpoint: a device's last entry, as it was in the log.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// The entry (its `pos` is the original log position; `prev` may point at deleted data).
    pub entry: Entry<'a>,
    /// The device's chain head when the checkpoint was written.
    pub head: LogPos,
    /// The entry's bytes exactly as in the log (header, payload, padding).
    pub entry_bytes: &'a [u8],
}

/// An open, validated checkpoint file (read-only mapping).
pub struct Checkpoint {
    shard: ShardId,
    path: PathBuf,
    map: Mmap,
    covered: LogPos,
    count: usize,
    /// Byte offset of the index (count slots of `INDEX_SLOT_BYTES`).
    index_at: usize,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("shard", &self.shard)
            .field("path", &self.path)
            .field("covered", &self.covered)
            .field("count", &self.count)
            .finish()
    }
}

impl Checkpoint {
    /// Opens `dir`'s checkpoint, if there is one, checking the header, the CRC over the records
    /// and index, and the index's order and offsets. Each record's entry is validated (entry CRC,
    /// rkyv, record rules) when read: [`Checkpoint::iter_checked`] at load refuses the file on the
    /// first bad one.
    pub fn open(shard: ShardId, dir: &Path) -> Result<Option<Checkpoint>, Error> {
        let path = dir.join(CHECKPOINT_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    shard,
                    op: "open",
                    path,
                    source,
                })
            }
        };
        // SAFETY: the file is only ever replaced by rename, never written in place, so the mapped
        // bytes do not change while mapped (a rename leaves this inode intact).
        let map = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
            shard,
            op: "mmap",
            path: path.clone(),
            source,
        })?;
        let ckpt = Checkpoint::validate(shard, path, map)?;
        Ok(Some(ckpt))
    }

    fn validate(shard: ShardId, path: PathBuf, map: Mmap) -> Result<Checkpoint, Error> {
        let bad = |reason: String| Error::Corrupt {
            shard,
            path: path.clone(),
            reason,
        };
        let b: &[u8] = &map;
        if b.len() < HEADER_BYTES {
            return Err(bad(format!("{} bytes, shorter than the header", b.len())));
        }
        if b[0..8] != CHECKPOINT_MAGIC {
            return Err(bad("bad magic".into()));
        }
        if crc32c::crc32c(&b[..HEADER_CRC_OFFSET]) != u32_at(b, HEADER_CRC_OFFSET) {
            return Err(bad("header CRC mismatch".into()));
        }
        let version = u32_at(b, 8);
        if version != CHECKPOINT_VERSION {
            return Err(bad(format!("unknown checkpoint version {version}")));
        }
        if u32_at(b, 12) != shard.0 {
            return Err(bad(format!("written for shard {}", u32_at(b, 12))));
        }
        let covered = u64_at(b, 16);
        let count = u64_at(b, 24);
        let file_bytes = u64_at(b, 32);
        if file_bytes != b.len() as u64 {
            return Err(bad(format!(
                "file is {} bytes, header says {file_bytes} (truncated or extended)",
                b.len()
            )));
        }
        if count > CHECKPOINT_RECORDS_MAX as u64 {
            return Err(bad(format!("{count} records, more than the maximum")));
        }
        let count = count as usize;
        let index_bytes = count * INDEX_SLOT_BYTES;
        if HEADER_BYTES + index_bytes > b.len() {
            return Err(bad(format!("{count} records do not fit in the file")));
        }
        if crc32c::crc32c(&b[HEADER_BYTES..]) != u32_at(b, 40) {
            return Err(bad("CRC mismatch over the records".into()));
        }
        let ckpt = Checkpoint {
            shard,
            path: path.clone(),
            covered: LogPos(covered),
            count,
            index_at: b.len() - index_bytes,
            map,
        };
        // Structure: offsets inside the record area, positions strictly increasing and below B,
        // each record's prefix agreeing with its index slot.
        let mut prev: Option<u64> = None;
        for i in 0..count {
            let (pos, off) = ckpt.slot(i);
            let ok_off = off >= HEADER_BYTES as u64
                && off % ENTRY_ALIGN_BYTES as u64 == 0
                && off + RECORD_PREFIX_BYTES as u64 <= ckpt.index_at as u64;
            if !ok_off {
                return Err(bad(format!("record {i}: offset {off} out of range")));
            }
            if prev.is_some_and(|p| p >= pos) || pos >= covered {
                return Err(bad(format!("record {i}: position {pos} out of order")));
            }
            prev = Some(pos);
            if u64_at(&ckpt.map, off as usize) != pos {
                return Err(bad(format!("record {i}: position differs from the index")));
            }
        }
        Ok(ckpt)
    }

    /// Index slot `i`: (original position, record offset).
    #[inline]
    fn slot(&self, i: usize) -> (u64, u64) {
        let at = self.index_at + i * INDEX_SLOT_BYTES;
        (u64_at(&self.map, at), u64_at(&self.map, at + 8))
    }

    fn record_at(&self, off: usize) -> Option<Record<'_>> {
        let b: &[u8] = &self.map;
        let pos = u64_at(b, off);
        let head = u64_at(b, off + 8);
        let data = &b[off + RECORD_PREFIX_BYTES..self.index_at];
        let entry = log::decode_entry(data, pos, 0).ok()?;
        Some(Record {
            entry,
            head: LogPos(head),
            entry_bytes: &data[..entry.len_bytes as usize],
        })
    }

    /// The path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The covered position B: every device whose last entry lies below B has its record here.
    pub fn covered(&self) -> LogPos {
        self.covered
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there is no record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the file.
    pub fn file_bytes(&self) -> usize {
        self.map.len()
    }

    /// The record of the entry originally at `pos` (binary search over the index).
    pub fn get(&self, pos: LogPos) -> Option<Record<'_>> {
        if pos >= self.covered {
            return None;
        }
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.slot(mid).0 < pos.0 {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo >= self.count {
            return None;
        }
        let (p, off) = self.slot(lo);
        (p == pos.0).then(|| self.record_at(off as usize)).flatten()
    }

    /// The entry bytes of the record at `pos`, scanning the index forward from slot `*cursor`:
    /// for callers looking up increasing positions (linear over the file, not a binary search per
    /// lookup). The entry's framing and CRC are checked; its payload was validated when the file
    /// was loaded or built.
    pub fn next_at(&self, cursor: &mut usize, pos: LogPos) -> Option<&[u8]> {
        assert!(
            *cursor <= self.count,
            "cursor {} past {} records",
            *cursor,
            self.count
        );
        debug_assert!(
            *cursor == 0 || self.slot(*cursor - 1).0 < pos.0,
            "next_at positions must increase"
        );
        while *cursor < self.count && self.slot(*cursor).0 < pos.0 {
            *cursor += 1;
        }
        if *cursor >= self.count {
            return None;
        }
        let (p, off) = self.slot(*cursor);
        if p != pos.0 {
            return None;
        }
        let data = &self.map[off as usize + RECORD_PREFIX_BYTES..self.index_at];
        let raw = log::format::parse_entry(data, 0).ok()?;
        Some(&data[..raw.total_bytes])
    }

    /// Iterates the records in position order, validating each entry: a record that fails is
    /// an error naming the file (and ends the iteration's usefulness: the caller refuses the
    /// file).
    pub fn iter_checked(&self) -> impl Iterator<Item = Result<Record<'_>, Error>> + '_ {
        (0..self.count).map(move |i| {
            let (pos, off) = self.slot(i);
            self.record_at(off as usize).ok_or_else(|| Error::Corrupt {
                shard: self.shard,
                path: self.path.clone(),
                reason: format!("record {i} (log position {pos}): entry fails validation"),
            })
        })
    }

    /// Iterates the records in position order (a record failing validation is skipped; see
    /// [`Checkpoint::iter_checked`]).
    pub fn iter(&self) -> impl Iterator<Item = Record<'_>> + '_ {
        (0..self.count).filter_map(move |i| self.record_at(self.slot(i).1 as usize))
    }
}

/// Builds a checkpoint file's bytes in memory: records are appended in strictly increasing
/// position order, then [`Builder::finish`] adds the index and the header.
#[derive(Debug)]
pub struct Builder {
    shard: ShardId,
    covered: LogPos,
    buf: Vec<u8>,
    index: Vec<(u64, u64)>,
}

impl Builder {
    /// A builder for `shard`'s checkpoint covering positions below `covered`, with room for
    /// about `records` records of `entry_bytes` bytes each.
    pub fn new(shard: ShardId, covered: LogPos, records: usize, entry_bytes: usize) -> Builder {
        let mut buf = Vec::with_capacity(
            HEADER_BYTES + records * (RECORD_PREFIX_BYTES + entry_bytes + INDEX_SLOT_BYTES),
        );
        buf.resize(HEADER_BYTES, 0);
        Builder {
            shard,
            covered,
            buf,
            index: Vec::with_capacity(records),
        }
    }

    /// Appends the record of the entry at `pos` (bytes exactly as in the log) with chain `head`.
    pub fn push(&mut self, pos: LogPos, head: LogPos, entry_bytes: &[u8]) {
        assert!(
            pos < self.covered,
            "record {pos} not below {}",
            self.covered
        );
        assert!(
            self.index.last().is_none_or(|&(p, _)| p < pos.0),
            "records must come in increasing position order"
        );
        assert!(entry_bytes.len() % ENTRY_ALIGN_BYTES == 0);
        self.index.push((pos.0, self.buf.len() as u64));
        self.buf.extend_from_slice(&pos.0.to_le_bytes());
        self.buf.extend_from_slice(&head.0.to_le_bytes());
        self.buf.extend_from_slice(entry_bytes);
    }

    /// Records pushed so far.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The file's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        debug_assert!(
            self.index
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
            "records in increasing position and file order"
        );
        for &(pos, off) in &self.index {
            self.buf.extend_from_slice(&pos.to_le_bytes());
            self.buf.extend_from_slice(&off.to_le_bytes());
        }
        let len = self.buf.len() as u64;
        let body_crc = crc32c::crc32c(&self.buf[HEADER_BYTES..]);
        let h = &mut self.buf[..HEADER_BYTES];
        h.fill(0);
        h[0..8].copy_from_slice(&CHECKPOINT_MAGIC);
        h[8..12].copy_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.shard.0.to_le_bytes());
        h[16..24].copy_from_slice(&self.covered.0.to_le_bytes());
        h[24..32].copy_from_slice(&(self.index.len() as u64).to_le_bytes());
        h[32..40].copy_from_slice(&len.to_le_bytes());
        h[40..44].copy_from_slice(&body_crc.to_le_bytes());
        let crc = crc32c::crc32c(&h[..HEADER_CRC_OFFSET]);
        h[44..48].copy_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

/// Writes `bytes` as `dir`'s checkpoint, atomically and durably: a temporary file is written and
/// fsynced, renamed over the checkpoint, and the directory fsynced. Blocking; any thread.
pub fn write_durable(shard: ShardId, dir: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_file_durable(shard, dir, CHECKPOINT_TMP_FILE, CHECKPOINT_FILE, bytes)
}

fn write_file_durable(
    shard: ShardId,
    dir: &Path,
    tmp: &str,
    name: &str,
    bytes: &[u8],
) -> Result<(), Error> {
    let tmp = dir.join(tmp);
    let path = dir.join(name);
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io {
            shard,
            op,
            path,
            source,
        }
    };
    let written = File::create(&tmp)
        .map_err(io("create", &tmp))
        .and_then(|mut f| {
            f.write_all(bytes).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("fsync", &tmp))
        });
    if let Err(e) = written {
        // Do not leave a partial file taking the space (a full disk is the likely cause).
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &path).map_err(io("rename into place", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))?;
    Ok(())
}

/// Name of the exactly-once snapshot beside the checkpoint (issue 18).
pub const AUDITS_FILE: &str = "device-seqs.ckpt";
/// Name of an exactly-once snapshot being written.
pub const AUDITS_TMP_FILE: &str = "device-seqs.ckpt.tmp";
/// First eight bytes of an exactly-once snapshot.
pub const AUDITS_MAGIC: [u8; 8] = *b"GEOBSEQ\0";
/// Version of the snapshot layout.
pub const AUDITS_VERSION: u32 = 1;
/// Bytes of one snapshot record after its id: epoch u32, has-mark u32, seq, mark position,
/// missing bitmap, gaps out, duplicates (u64 each).
const AUDIT_RECORD_BYTES: usize = 8 + 5 * 8;

/// The bytes of an exactly-once snapshot of `audits` (see `shards/README.md`, "Exactly-once
/// snapshot"): magic, version u32, count u32, then per device `id_len u8, id, record`, then the
/// CRC32C of everything before it.
pub fn encode_audits<'a>(audits: impl Iterator<Item = (&'a str, &'a DeviceAudit)>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&AUDITS_MAGIC);
    out.extend_from_slice(&AUDITS_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut count = 0u32;
    for (id, a) in audits {
        debug_assert!(id.len() <= u8::MAX as usize);
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        let mark = a.mark.unwrap_or_default();
        out.extend_from_slice(&mark.epoch.to_le_bytes());
        out.extend_from_slice(&u32::from(a.mark.is_some()).to_le_bytes());
        for v in [mark.seq, a.mark_pos.0, a.missing, a.gaps_out, a.duplicates] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        count += 1;
    }
    out[12..16].copy_from_slice(&count.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Writes an exactly-once snapshot atomically and durably (as [`write_durable`]).
pub fn write_audits_durable(shard: ShardId, dir: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_file_durable(shard, dir, AUDITS_TMP_FILE, AUDITS_FILE, bytes)
}

/// Reads `dir`'s exactly-once snapshot (empty if there is none); a damaged file is refused as a
/// whole, like the checkpoint.
pub fn open_audits(shard: ShardId, dir: &Path) -> Result<Vec<(String, DeviceAudit)>, Error> {
    let path = dir.join(AUDITS_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(shard, "read", &path)(e)),
    };
    decode_audits(&bytes).map_err(|reason| Error::Corrupt {
        shard,
        path,
        reason: reason.to_string(),
    })
}

/// Decodes snapshot bytes (see [`encode_audits`]).
pub fn decode_audits(bytes: &[u8]) -> Result<Vec<(String, DeviceAudit)>, &'static str> {
    if bytes.len() < 20 || bytes[..8] != AUDITS_MAGIC {
        return Err("bad magic or too short");
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32_at(crc, 0) {
        return Err("CRC mismatch");
    }
    if u32_at(body, 8) != AUDITS_VERSION {
        return Err("unknown version");
    }
    let count = u32_at(body, 12) as usize;
    let mut out = Vec::with_capacity(count.min(body.len() / AUDIT_RECORD_BYTES));
    let mut at = 16;
    for _ in 0..count {
        let len = *body.get(at).ok_or("truncated")? as usize;
        let end = at + 1 + len + AUDIT_RECORD_BYTES;
        if end > body.len() {
            return Err("truncated");
        }
        let id = std::str::from_utf8(&body[at + 1..at + 1 + len]).map_err(|_| "id not UTF-8")?;
        crate::record::validate_device_id(id).map_err(|_| "invalid device id")?;
        let r = &body[at + 1 + len..end];
        let has_mark = u32_at(r, 4);
        if has_mark > 1 {
            return Err("bad mark flag");
        }
        let audit = DeviceAudit {
            mark: (has_mark == 1).then(|| crate::record::DeviceSeq {
                epoch: u32_at(r, 0),
                seq: u64_at(r, 8),
            }),
            mark_pos: LogPos(u64_at(r, 16)),
            missing: u64_at(r, 24),
            gaps_out: u64_at(r, 32),
            duplicates: u64_at(r, 40),
        };
        out.push((id.to_string(), audit));
        at = end;
    }
    if at != body.len() {
        return Err("trailing bytes");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Heartbeat;

    #[test]
    fn audit_snapshots_round_trip_and_damage_is_refused() {
        // A snapshot of two devices decodes to the same states; any flipped byte is refused.
        let mut a = DeviceAudit::default();
        a.apply(crate::record::DeviceSeq { epoch: 3, seq: 10 }, LogPos(4096));
        a.duplicates = 5;
        let b = DeviceAudit {
            duplicates: 2,
            ..DeviceAudit::default()
        };
        let bytes = encode_audits([("dev-a", &a), ("ü-b", &b)].into_iter());
        let got = decode_audits(&bytes).unwrap();
        assert_eq!(got, vec![("dev-a".to_string(), a), ("ü-b".to_string(), b)]);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(decode_audits(&bad).is_err(), "flip at {i} accepted");
        }
        assert_eq!(
            decode_audits(&encode_audits(std::iter::empty())).unwrap(),
            vec![]
        );
    }

    /// The bytes of a log entry holding a heartbeat of `id`.
    fn entry(id: &str, seq: u64) -> Vec<u8> {
        let hb = Heartbeat {
            device_id: id.into(),
            lat: 1.5,
            lon: -2.5,
            ts_ms: 1_800_000_000_000,
            received_ms: 1_800_000_000_001,
            speed_mps: Some(3.0),
            ..Default::default()
        };
        let mut payload = rkyv::util::AlignedVec::new();
        hb.encode_into(&mut payload);
        let mut out = vec![0u8; log::format::entry_bytes(payload.len())];
        let n = log::format::write_entry(&mut out, seq, u64::MAX, 7, &payload);
        out.truncate(n);
        out
    }

    #[test]
    fn lookups_by_position_find_exactly_the_records_written() {
        // Three records at scattered positions: `get` finds each (with its head and id) and
        // nothing between, before, after or at/above the covered position; `next_at` walks
        // increasing positions with one cursor; `iter_checked` sees all three in order.
        let dir = tempfile::tempdir().unwrap();
        let shard = ShardId(3);
        let positions = [4096u64, 4200, 90_000];
        let mut b = Builder::new(shard, LogPos(100_000), 3, 64);
        for (i, &p) in positions.iter().enumerate() {
            b.push(
                LogPos(p),
                LogPos(p + 8),
                &entry(&format!("d{i}"), i as u64 + 1),
            );
        }
        write_durable(shard, dir.path(), &b.finish()).unwrap();
        assert!(!dir.path().join(CHECKPOINT_TMP_FILE).exists());
        let c = Checkpoint::open(shard, dir.path()).unwrap().unwrap();
        assert_eq!((c.len(), c.covered()), (3, LogPos(100_000)));
        for (i, &p) in positions.iter().enumerate() {
            let r = c.get(LogPos(p)).unwrap();
            assert_eq!(r.entry.pos, LogPos(p));
            assert_eq!(r.head, LogPos(p + 8));
            assert_eq!(r.entry.hb.device_id.as_str(), format!("d{i}"));
            assert_eq!(
                r.entry.hb.speed_mps.as_ref().map(|v| v.to_native()),
                Some(3.0)
            );
        }
        for absent in [0u64, 4095, 4097, 4199, 50_000, 90_008, 100_000, u64::MAX] {
            assert!(c.get(LogPos(absent)).is_none(), "{absent}");
        }
        let mut cursor = 0;
        assert!(c.next_at(&mut cursor, LogPos(4096)).is_some());
        assert!(c.next_at(&mut cursor, LogPos(4100)).is_none());
        assert!(c.next_at(&mut cursor, LogPos(90_000)).is_some());
        assert_eq!(cursor, 2);
        let seen: Vec<u64> = c.iter_checked().map(|r| r.unwrap().entry.pos.0).collect();
        assert_eq!(seen, positions);
        // Another shard's directory must not accept it.
        let err = Checkpoint::open(ShardId(4), dir.path()).unwrap_err();
        assert!(err.to_string().contains("written for shard 3"), "{err}");
        // No file: no checkpoint.
        let empty = tempfile::tempdir().unwrap();
        assert!(Checkpoint::open(shard, empty.path()).unwrap().is_none());
    }
}
