//! The shard log's hash chain (issue 18 item 3): a `.chain` sidecar beside every segment file,
//! `<base>.chain` beside `<base>.seg`, holding SHA-256 digests of the segment's entries in groups
//! of up to [`CHAIN_GROUP_ENTRIES`]. Each group's digest is SHA-256(previous digest ‖ the group's
//! first position ‖ the group's entry bytes exactly as stored), so every digest commits to every
//! entry before it; a sealed segment ends its sidecar with a seal record holding its final
//! digest, and its successor's sidecar starts from that digest (the byte layout is in
//! `shards/README.md`, "Hash chain").
//!
//! It owns the sidecar format, the writer that extends the chain ([`ChainWriter`], run on a
//! helper thread per shard by [`ChainThread`]) and the read-only verifier ([`verify_shard`]).
//! It does not decide what durable means, never writes a segment and is never on the ack's path:
//! the writer reads entries from the segment files only below the durable position the shard
//! publishes after each commit (one atomic store), so the chain runs behind the log by about
//! [`crate::limits::CHAIN_POLL_INTERVAL_MS`]. If the chain is behind at a crash, the next open
//! extends it from the log (the entries there passed recovery's CRC checks).
//!
//! What it proves: an entry covered by the chain cannot be changed, removed or reordered, and a
//! covered segment cannot be removed from between two others, without `geobeat audit verify`
//! naming it, unless the sidecars from that point on are rewritten too (anchor the seal digests
//! elsewhere, e.g. in the audit files or a signed copy, to rule that out). What it does not
//! prove: anything about an entry before the chain covered it (up to the chain's lag, or a
//! crash's worth), nor that the oldest retained segment's start digest is genuine after
//! retention deleted its predecessors (it is recorded in its sidecar, not re-derived).
//!
//! Invariants: group records of a segment are contiguous from its first entry slot, each covers
//! 1..=`CHAIN_GROUP_ENTRIES` whole entries that were durable when hashed; a seal record is the
//! last record and covers exactly the segment's entries; a sidecar is created only after its
//! predecessor's seal record was written and synced. The writer holds at most one segment mapped
//! and one group's hash state (bounded memory).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::Mmap;
use sha2::{Digest as _, Sha256};

use super::format::{parse_entry, segment_file_name, EntryFault, SegmentHeader};
use super::tail::list_segments;
use super::LogPos;
use crate::limits::{
    CHAIN_GROUP_ENTRIES, CHAIN_GROUP_IDLE_MS, CHAIN_POLL_INTERVAL_MS, CHAIN_STEP_ENTRIES_MAX,
    ENTRY_HEADER_BYTES, ENTRY_PAYLOAD_BYTES_MAX, SEGMENT_HEADER_BYTES,
};
use crate::route::ShardId;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// File name suffix of a chain sidecar.
pub const CHAIN_SUFFIX: &str = ".chain";
/// First eight bytes of every chain sidecar.
pub const CHAIN_MAGIC: [u8; 8] = *b"GEOBCHN\0";
/// Version of the sidecar layout written by this build.
pub const CHAIN_VERSION: u32 = 1;
/// Bytes of the sidecar header.
pub const CHAIN_HEADER_BYTES: usize = 72;
/// Bytes of one sidecar record.
pub const CHAIN_RECORD_BYTES: usize = 72;
/// Header flag: the start digest is the predecessor segment's seal digest (else the chain
/// starts at this segment, from [`genesis`]).
pub const CHAIN_FLAG_ANCHORED: u32 = 1;
/// Record kind of a group record.
pub const RECORD_GROUP: u32 = 1;
/// Record kind of a seal record.
pub const RECORD_SEAL: u32 = 2;
/// Domain separation of the genesis digest.
const GENESIS_TAG: &[u8] = b"geobeat-chain-v1\0";

/// The sidecar file name of the segment whose base is `base`.
pub fn chain_file_name(base: u64) -> String {
    let seg = segment_file_name(base);
    let stem = seg
        .strip_suffix(super::format::SEGMENT_SUFFIX)
        .expect("suffix");
    format!("{stem}{CHAIN_SUFFIX}")
}

/// The sidecar path of the segment file at `segment` (`<base>.seg` → `<base>.chain`).
pub fn sidecar_path(segment: &Path) -> PathBuf {
    segment.with_extension(&CHAIN_SUFFIX[1..])
}

/// The digest a chain starts from at segment `base` of `shard` when nothing precedes it:
/// SHA-256("geobeat-chain-v1\0" ‖ shard u32 LE ‖ base u64 LE).
pub fn genesis(shard: ShardId, base: u64) -> Digest {
    let mut h = Sha256::new();
    h.update(GENESIS_TAG);
    h.update(shard.0.to_le_bytes());
    h.update(base.to_le_bytes());
    h.finalize().into()
}

/// Lower-case hex of a digest.
pub fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The decoded sidecar header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHeader {
    /// Shard of the segment.
    pub shard: u32,
    /// Base of the segment.
    pub base: u64,
    /// `CHAIN_GROUP_ENTRIES` of the writer (informational: records say what they cover).
    pub group_entries: u32,
    /// [`CHAIN_FLAG_ANCHORED`] or 0.
    pub flags: u32,
    /// The digest the segment's first group chains from.
    pub start: Digest,
}

impl ChainHeader {
    /// The header's bytes (CRC32C over bytes 0..64 at 64..68; 68..72 zero).
    pub fn encode(&self) -> [u8; CHAIN_HEADER_BYTES] {
        let mut out = [0u8; CHAIN_HEADER_BYTES];
        out[0..8].copy_from_slice(&CHAIN_MAGIC);
        out[8..12].copy_from_slice(&CHAIN_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.shard.to_le_bytes());
        out[16..24].copy_from_slice(&self.base.to_le_bytes());
        out[24..28].copy_from_slice(&self.group_entries.to_le_bytes());
        out[28..32].copy_from_slice(&self.flags.to_le_bytes());
        out[32..64].copy_from_slice(&self.start);
        let crc = crc32c::crc32c(&out[..64]);
        out[64..68].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header; `None` if short, of another magic or version, or damaged.
    pub fn decode(b: &[u8]) -> Option<ChainHeader> {
        if b.len() < CHAIN_HEADER_BYTES
            || b[0..8] != CHAIN_MAGIC
            || u32_at(b, 8) != CHAIN_VERSION
            || crc32c::crc32c(&b[..64]) != u32_at(b, 64)
        {
            return None;
        }
        Some(ChainHeader {
            shard: u32_at(b, 12),
            base: u64_at(b, 16),
            group_entries: u32_at(b, 24),
            flags: u32_at(b, 28),
            start: b[32..64].try_into().expect("32 bytes"),
        })
    }
}

/// One sidecar record: a group of entries, or the segment's seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainRecord {
    /// [`RECORD_GROUP`] or [`RECORD_SEAL`].
    pub kind: u32,
    /// Entries in the group (seal: in the whole segment).
    pub entries: u32,
    /// Position of the group's first entry (seal: the segment's first entry slot).
    pub first_pos: u64,
    /// Position just past the group's last entry (seal: the segment's data end).
    pub end_pos: u64,
    /// Sequence number of the group's first entry (seal: the segment header's first_seq).
    pub first_seq: u64,
    /// The digest after this group (seal: the segment's final digest).
    pub digest: Digest,
}

impl ChainRecord {
    /// The record's bytes (CRC32C over bytes 0..64 at 64..68; 68..72 zero).
    pub fn encode(&self) -> [u8; CHAIN_RECORD_BYTES] {
        let mut out = [0u8; CHAIN_RECORD_BYTES];
        out[0..4].copy_from_slice(&self.kind.to_le_bytes());
        out[4..8].copy_from_slice(&self.entries.to_le_bytes());
        out[8..16].copy_from_slice(&self.first_pos.to_le_bytes());
        out[16..24].copy_from_slice(&self.end_pos.to_le_bytes());
        out[24..32].copy_from_slice(&self.first_seq.to_le_bytes());
        out[32..64].copy_from_slice(&self.digest);
        let crc = crc32c::crc32c(&out[..64]);
        out[64..68].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a record; `None` if short, damaged or of an unknown kind.
    pub fn decode(b: &[u8]) -> Option<ChainRecord> {
        if b.len() < CHAIN_RECORD_BYTES || crc32c::crc32c(&b[..64]) != u32_at(b, 64) {
            return None;
        }
        let kind = u32_at(b, 0);
        if kind != RECORD_GROUP && kind != RECORD_SEAL {
            return None;
        }
        Some(ChainRecord {
            kind,
            entries: u32_at(b, 4),
            first_pos: u64_at(b, 8),
            end_pos: u64_at(b, 16),
            first_seq: u64_at(b, 24),
            digest: b[32..64].try_into().expect("32 bytes"),
        })
    }
}

/// A group's hash state: SHA-256 seeded with the previous digest and the group's first position.
fn group_hasher(prev: &Digest, first_pos: u64) -> Sha256 {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(first_pos.to_le_bytes());
    h
}

/// A sidecar read whole: its header, its valid records, and the length they span.
struct Sidecar {
    header: ChainHeader,
    records: Vec<ChainRecord>,
    /// Header plus whole valid records; anything past it is torn or damaged.
    valid_len: usize,
    /// Bytes of the file.
    file_len: usize,
}

/// Reads a sidecar; `Ok(None)` if there is none, `Err` with a reason if its header is bad.
fn read_sidecar(path: &Path) -> io::Result<Option<Result<Sidecar, String>>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => f.read_to_end(&mut bytes)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(header) = ChainHeader::decode(&bytes) else {
        return Ok(Some(Err("chain sidecar header is damaged".into())));
    };
    let mut records = Vec::new();
    let mut at = CHAIN_HEADER_BYTES;
    while at + CHAIN_RECORD_BYTES <= bytes.len() {
        let Some(r) = ChainRecord::decode(&bytes[at..]) else {
            break;
        };
        records.push(r);
        at += CHAIN_RECORD_BYTES;
    }
    Ok(Some(Ok(Sidecar {
        header,
        records,
        valid_len: at,
        file_len: bytes.len(),
    })))
}

/// Maps a segment file read-only and checks its header; `Ok(None)` if it does not exist.
fn map_segment(path: &Path) -> io::Result<Option<(Mmap, SegmentHeader)>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // SAFETY: a read-only shared mapping of a segment file. Geobeat never truncates a segment
    // while it exists, and only bytes past the durable position (which the chain never reads in
    // the active segment) change while it is mapped; sealed segments never change.
    let map = unsafe { Mmap::map(&file)? };
    let header = SegmentHeader::decode(&map).map_err(|fault| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("segment header: {fault}"),
        )
    })?;
    if header.segment_bytes != map.len() as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "segment header says {} bytes, the file has {}",
                header.segment_bytes,
                map.len()
            ),
        ));
    }
    Ok(Some((map, header)))
}

/// Why the chain writer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A file-system operation failed.
    #[error("shard {shard}: hash chain: {op} {}: {source}", path.display())]
    Io {
        /// The shard.
        shard: ShardId,
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The log is not what the chain expects (an entry below the durable position that does not
    /// parse): recovery should have dealt with it.
    #[error("shard {shard}: hash chain: {} at {pos}: {reason}", path.display())]
    Log {
        /// The shard.
        shard: ShardId,
        /// The segment.
        path: PathBuf,
        /// Where.
        pos: LogPos,
        /// What is wrong.
        reason: String,
    },
}

/// The segment the writer is extending.
struct Cur {
    base: u64,
    path: PathBuf,
    map: Mmap,
    /// Segment size (its end is `base + bytes`).
    bytes: u64,
    first_seq: u64,
    /// Offset of the next entry to hash.
    off: u64,
    /// Entries hashed in this segment (closed groups and the open one).
    entries: u64,
    sidecar: File,
    sidecar_path: PathBuf,
}

/// The open group.
struct Group {
    hasher: Sha256,
    entries: u32,
    first_pos: u64,
    first_seq: u64,
    started: Instant,
}

/// What one [`ChainWriter::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Hashed this many entries (and sealed segments on the way); more may be waiting.
    Hashed(usize),
    /// Caught up with the bound: nothing to do until more entries are durable.
    Idle,
}

/// Extends one shard's chain from its segment files (see the module docs). Reads segments
/// read-only; writes only `.chain` sidecars.
pub struct ChainWriter {
    shard: ShardId,
    dir: PathBuf,
    /// Base of the segment to chain next (`None`: the shard has no segment yet).
    base: Option<u64>,
    cur: Option<Cur>,
    /// The digest after the last closed group (or the current segment's start).
    digest: Digest,
    /// Whether `digest` at the current segment's start continues a predecessor's seal.
    anchored: bool,
    group: Option<Group>,
}

impl std::fmt::Debug for ChainWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainWriter")
            .field("shard", &self.shard)
            .field("base", &self.base)
            .field("pos", &self.pos())
            .finish()
    }
}

impl ChainWriter {
    /// Opens the chain of the shard log in `dir`: resumes after the newest sealed sidecar (a
    /// partial sidecar after it is continued, its torn last record cut off), or starts at the
    /// oldest segment from [`genesis`] when no sidecar is sealed (a log written before the
    /// chain existed gets one computed from its entries). Earlier sidecars are never rewritten,
    /// so a damaged or missing one stays for `geobeat audit verify` to name.
    pub fn open(dir: &Path, shard: ShardId) -> Result<ChainWriter, ChainError> {
        let io_err = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| ChainError::Io {
                shard,
                op,
                path,
                source,
            }
        };
        let segs = list_segments(dir, shard).map_err(|e| ChainError::Io {
            shard,
            op: "list",
            path: dir.to_path_buf(),
            source: io::Error::other(e.to_string()),
        })?;
        let mut w = ChainWriter {
            shard,
            dir: dir.to_path_buf(),
            base: None,
            cur: None,
            digest: [0; 32],
            anchored: false,
            group: None,
        };
        // The newest sealed sidecar, searched from the newest segment back.
        let mut resume_at = 0;
        let mut prev_seal = None;
        for (i, (base, _)) in segs.iter().enumerate().rev() {
            let path = dir.join(chain_file_name(*base));
            if let Some(Ok(sc)) = read_sidecar(&path).map_err(io_err("read", &path))? {
                if let Some(seal) = sc.records.last().filter(|r| r.kind == RECORD_SEAL) {
                    resume_at = i + 1;
                    prev_seal = Some(seal.digest);
                    break;
                }
            }
        }
        let Some(&(base, _)) = segs.get(resume_at) else {
            // Nothing to extend yet: the successor of the newest sealed segment (or the first
            // segment, once one exists).
            if let (Some(seal), Some((last, path))) = (prev_seal, segs.last()) {
                let (_, h) = map_segment(path)
                    .map_err(io_err("map", path))?
                    .ok_or_else(|| io_err("map", path)(io::ErrorKind::NotFound.into()))?;
                w.base = Some(last + h.segment_bytes);
                w.digest = seal;
                w.anchored = true;
            }
            return Ok(w);
        };
        w.base = Some(base);
        w.digest = prev_seal.unwrap_or_else(|| genesis(shard, base));
        w.anchored = prev_seal.is_some();
        // A partial sidecar continuing from the same start is continued.
        let path = dir.join(chain_file_name(base));
        if let Some(Ok(sc)) = read_sidecar(&path).map_err(io_err("read", &path))? {
            let continues = sc.header.shard == shard.0
                && sc.header.base == base
                && prev_seal.is_none_or(|s| s == sc.header.start)
                && sc.records.iter().all(|r| r.kind == RECORD_GROUP);
            if continues {
                if sc.valid_len < sc.file_len {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io_err("open", &path))?;
                    f.set_len(sc.valid_len as u64)
                        .map_err(io_err("cut back", &path))?;
                }
                w.digest = sc.records.last().map_or(sc.header.start, |r| r.digest);
                w.anchored = sc.header.flags & CHAIN_FLAG_ANCHORED != 0;
                let entries: u64 = sc.records.iter().map(|r| u64::from(r.entries)).sum();
                let off = sc
                    .records
                    .last()
                    .map_or(SEGMENT_HEADER_BYTES as u64, |r| r.end_pos - base);
                w.open_segment(Some((off, entries)))?;
            }
        }
        Ok(w)
    }

    /// Position up to which the chain's closed groups reach (the next entry to hash, minus the
    /// open group's).
    pub fn pos(&self) -> LogPos {
        match (&self.cur, &self.group) {
            (_, Some(g)) => LogPos(g.first_pos),
            (Some(c), None) => LogPos(c.base + c.off),
            (None, None) => LogPos(self.base.unwrap_or(0)),
        }
    }

    /// Every segment below this position is sealed in the chain.
    pub fn sealed_below(&self) -> LogPos {
        LogPos(self.base.unwrap_or(0))
    }

    /// Opens the segment at `self.base` (`resume`: continue its sidecar at that offset with that
    /// many entries already chained; else create the sidecar). `Ok(false)` if it does not exist
    /// yet.
    fn open_segment(&mut self, resume: Option<(u64, u64)>) -> Result<bool, ChainError> {
        let shard = self.shard;
        let base = self.base.expect("a base to open");
        let path = self.dir.join(segment_file_name(base));
        let Some((map, header)) = map_segment(&path).map_err(|source| ChainError::Io {
            shard,
            op: "map segment",
            path: path.clone(),
            source,
        })?
        else {
            return Ok(false);
        };
        let sidecar_path = self.dir.join(chain_file_name(base));
        let io_err = |op| {
            let p = sidecar_path.clone();
            move |source| ChainError::Io {
                shard,
                op,
                path: p,
                source,
            }
        };
        let (sidecar, off, entries) = match resume {
            Some((off, entries)) => (
                OpenOptions::new()
                    .append(true)
                    .open(&sidecar_path)
                    .map_err(io_err("open"))?,
                off,
                entries,
            ),
            None => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(crate::datadir::FILE_MODE)
                    .open(&sidecar_path)
                    .map_err(io_err("create"))?;
                let h = ChainHeader {
                    shard: shard.0,
                    base,
                    group_entries: CHAIN_GROUP_ENTRIES,
                    flags: if self.anchored {
                        CHAIN_FLAG_ANCHORED
                    } else {
                        0
                    },
                    start: self.digest,
                };
                f.write_all(&h.encode()).map_err(io_err("write"))?;
                (f, SEGMENT_HEADER_BYTES as u64, 0)
            }
        };
        self.cur = Some(Cur {
            base,
            path,
            bytes: header.segment_bytes,
            first_seq: header.first_seq,
            map,
            off,
            entries,
            sidecar,
            sidecar_path,
        });
        Ok(true)
    }

    fn write_record(&mut self, rec: &ChainRecord) -> Result<(), ChainError> {
        let cur = self.cur.as_mut().expect("a segment");
        cur.sidecar
            .write_all(&rec.encode())
            .map_err(|source| ChainError::Io {
                shard: self.shard,
                op: "write",
                path: cur.sidecar_path.clone(),
                source,
            })
    }

    /// Closes the open group, if any: its digest becomes the chain's and its record is written.
    pub fn close_group(&mut self) -> Result<(), ChainError> {
        let Some(g) = self.group.take() else {
            return Ok(());
        };
        let cur = self.cur.as_ref().expect("a group lives in a segment");
        let digest: Digest = g.hasher.finalize().into();
        let rec = ChainRecord {
            kind: RECORD_GROUP,
            entries: g.entries,
            first_pos: g.first_pos,
            end_pos: cur.base + cur.off,
            first_seq: g.first_seq,
            digest,
        };
        assert!(g.entries >= 1 && g.entries <= CHAIN_GROUP_ENTRIES);
        self.write_record(&rec)?;
        self.digest = digest;
        Ok(())
    }

    /// How long the open group has waited (zero if none).
    pub fn group_age(&self) -> Duration {
        self.group
            .as_ref()
            .map_or(Duration::ZERO, |g| g.started.elapsed())
    }

    /// Closes the open group and syncs the current sidecar (at a stop).
    pub fn finish(&mut self) -> Result<(), ChainError> {
        self.close_group()?;
        if let Some(cur) = &self.cur {
            cur.sidecar.sync_data().map_err(|source| ChainError::Io {
                shard: self.shard,
                op: "sync",
                path: cur.sidecar_path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Seals the current segment (its successor exists, so it is complete): closes the group,
    /// writes the seal record, syncs the sidecar and moves on to the successor.
    fn seal(&mut self) -> Result<(), ChainError> {
        self.close_group()?;
        let cur = self.cur.as_ref().expect("a segment to seal");
        let rec = ChainRecord {
            kind: RECORD_SEAL,
            entries: u32::try_from(cur.entries).expect("a segment holds < 2^32 entries"),
            first_pos: cur.base + SEGMENT_HEADER_BYTES as u64,
            end_pos: cur.base + cur.off,
            first_seq: cur.first_seq,
            digest: self.digest,
        };
        self.write_record(&rec)?;
        self.finish()?;
        let cur = self.cur.take().expect("a segment");
        self.base = Some(cur.base + cur.bytes);
        self.anchored = true;
        Ok(())
    }

    /// Whether the current segment's successor exists and nothing follows the chain's position in
    /// it (then it is complete: a log creates a successor only after its predecessor is).
    fn complete(&self) -> bool {
        let cur = self.cur.as_ref().expect("a segment");
        let next = self.dir.join(segment_file_name(cur.base + cur.bytes));
        // The successor first, then the bytes: an entry written before the successor was
        // created is seen by the re-read.
        next.exists() && parse_entry(&cur.map, cur.off as usize).err() == Some(EntryFault::End)
    }

    /// Hashes up to `budget` entries below `bound` (the shard's durable position), sealing
    /// segments on the way.
    pub fn step(&mut self, bound: LogPos, budget: usize) -> Result<Step, ChainError> {
        let mut hashed = 0;
        while hashed < budget {
            if self.cur.is_none() {
                if self.base.is_none() {
                    let segs =
                        list_segments(&self.dir, self.shard).map_err(|e| ChainError::Io {
                            shard: self.shard,
                            op: "list",
                            path: self.dir.clone(),
                            source: io::Error::other(e.to_string()),
                        })?;
                    let Some(&(base, _)) = segs.first() else {
                        break;
                    };
                    self.base = Some(base);
                    self.digest = genesis(self.shard, base);
                    self.anchored = false;
                }
                if !self.open_segment(None)? {
                    break;
                }
            }
            let cur = self.cur.as_ref().expect("opened above");
            let pos = cur.base + cur.off;
            if pos >= bound.0 {
                if self.complete() {
                    self.seal()?;
                    continue;
                }
                break;
            }
            let parsed = parse_entry(&cur.map, cur.off as usize).map(|r| (r.seq, r.total_bytes));
            match parsed {
                Ok((seq, total)) => {
                    let cur = self.cur.as_mut().expect("opened above");
                    let bytes = &cur.map[cur.off as usize..cur.off as usize + total];
                    let digest = &self.digest;
                    let g = self.group.get_or_insert_with(|| Group {
                        hasher: group_hasher(digest, pos),
                        entries: 0,
                        first_pos: pos,
                        first_seq: seq,
                        started: Instant::now(),
                    });
                    g.hasher.update(bytes);
                    g.entries += 1;
                    let full = g.entries == CHAIN_GROUP_ENTRIES;
                    cur.off += total as u64;
                    cur.entries += 1;
                    hashed += 1;
                    if full {
                        self.close_group()?;
                    }
                }
                Err(EntryFault::End) if self.complete() => self.seal()?,
                Err(fault) => {
                    return Err(ChainError::Log {
                        shard: self.shard,
                        path: self.cur.as_ref().expect("opened above").path.clone(),
                        pos: LogPos(pos),
                        reason: format!(
                            "no valid entry below the durable position {bound} ({fault:?})"
                        ),
                    })
                }
            }
        }
        Ok(if hashed == 0 {
            Step::Idle
        } else {
            Step::Hashed(hashed)
        })
    }
}

/// What the shard and its chain thread share.
#[derive(Debug)]
struct Shared {
    /// The log's durable position, published by the shard after each commit.
    durable: AtomicU64,
    /// Every segment below this is sealed in the chain (`u64::MAX` once the thread failed: it
    /// then holds nothing back).
    sealed_below: AtomicU64,
    stop: AtomicBool,
}

/// A shard's chain writer on its own thread (unpinned, like the spare-segment thread): it polls
/// the published durable position every [`CHAIN_POLL_INTERVAL_MS`] and extends the chain. Drop
/// stops it: it catches up for at most [`crate::limits::CHAIN_STOP_CATCH_UP_MS`], closes its
/// open group and syncs.
#[derive(Debug)]
pub struct ChainThread {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ChainThread {
    /// Starts the chain thread of the shard log in `dir`, durable up to `durable`.
    pub fn spawn(dir: &Path, shard: ShardId, durable: LogPos) -> ChainThread {
        let shared = Arc::new(Shared {
            durable: AtomicU64::new(durable.0),
            sealed_below: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let dir = dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name(format!("geobeat-chain-{}", shard.0))
            .spawn(move || {
                super::unpin_current_thread();
                if let Err(e) = run(&dir, shard, &s) {
                    tracing::error!(shard = shard.0, error = %e, "hash chain stopped; `geobeat audit verify` will report the log past it as unchained");
                }
                s.sealed_below.store(u64::MAX, Ordering::Release);
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(shard = shard.0, error = %e, "could not start the hash chain thread");
                shared.sealed_below.store(u64::MAX, Ordering::Release);
                None
            }
        };
        ChainThread { shared, thread }
    }

    /// Publishes the log's durable position (one atomic store: the ack path's whole cost).
    #[inline]
    pub fn publish_durable(&self, durable: LogPos) {
        self.shared.durable.fetch_max(durable.0, Ordering::Release);
    }

    /// Every segment below this position is sealed in the chain (retention deletes no segment
    /// the chain has not sealed). `u64::MAX` if the chain thread stopped.
    pub fn sealed_below(&self) -> LogPos {
        LogPos(self.shared.sealed_below.load(Ordering::Acquire))
    }

    /// Wakes the thread now (instead of at its next poll).
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }

    /// Waits up to `timeout` until [`ChainThread::sealed_below`] reaches `pos`; returns whether
    /// it did.
    pub fn wait_sealed(&self, pos: LogPos, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.sealed_below() >= pos {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.kick();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for ChainThread {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The chain thread's loop.
fn run(dir: &Path, shard: ShardId, s: &Shared) -> Result<(), ChainError> {
    let mut w = ChainWriter::open(dir, shard)?;
    let mut stop_deadline = None;
    loop {
        let stopping = s.stop.load(Ordering::Acquire);
        if stopping && stop_deadline.is_none() {
            stop_deadline =
                Some(Instant::now() + Duration::from_millis(crate::limits::CHAIN_STOP_CATCH_UP_MS));
        }
        let bound = LogPos(s.durable.load(Ordering::Acquire));
        let step = w.step(bound, CHAIN_STEP_ENTRIES_MAX)?;
        s.sealed_below.store(w.sealed_below().0, Ordering::Release);
        if let Some(deadline) = stop_deadline {
            if step == Step::Idle || Instant::now() >= deadline {
                return w.finish();
            }
            continue;
        }
        if step == Step::Idle {
            if w.group_age() >= Duration::from_millis(CHAIN_GROUP_IDLE_MS) {
                w.close_group()?;
            }
            std::thread::park_timeout(Duration::from_millis(CHAIN_POLL_INTERVAL_MS));
        }
    }
}

/// The first thing [`verify_shard`] found that does not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The shard.
    pub shard: ShardId,
    /// The segment file (or its sidecar's segment).
    pub segment: PathBuf,
    /// The first entry that does not match, when one can be named (else the group's first).
    pub pos: Option<LogPos>,
    /// That entry's device id, if its payload is still readable.
    pub device: Option<String>,
    /// What does not match.
    pub what: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shard {} segment {}", self.shard, self.segment.display())?;
        if let Some(p) = self.pos {
            write!(f, " position {p}")?;
        }
        if let Some(d) = &self.device {
            write!(f, " device {d:?}")?;
        }
        write!(f, ": {}", self.what)
    }
}

/// What [`verify_shard`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardVerify {
    /// Segment files seen.
    pub segments: usize,
    /// Segments whose seal record was checked.
    pub sealed: usize,
    /// Entries recomputed and matched.
    pub entries: u64,
    /// Group records matched.
    pub groups: u64,
    /// Entries past the chain (the newest segment's tail the chain has not covered yet).
    pub unchained: u64,
    /// Base of the oldest retained segment and whether its chain start continues a deleted
    /// predecessor's seal (recorded in its sidecar) rather than starting at genesis.
    pub start: Option<(LogPos, bool)>,
    /// The first mismatch, if any.
    pub mismatch: Option<Mismatch>,
}

/// The device id of the entry at `off`, if its payload still decodes (whatever its CRC says).
fn device_at(map: &[u8], off: usize) -> Option<String> {
    let h = map.get(off..off + ENTRY_HEADER_BYTES)?;
    let len = u32_at(h, 0) as usize;
    if len == 0 || len > ENTRY_PAYLOAD_BYTES_MAX {
        return None;
    }
    let payload = map.get(off + ENTRY_HEADER_BYTES..off + ENTRY_HEADER_BYTES + len)?;
    crate::record::access_payload(payload, u32_at(h, 28))
        .map(|(hb, _)| hb.device_id.as_str().to_owned())
}

/// Entries that parse from `off` on (the unchained tail of a segment).
fn count_entries(map: &[u8], mut off: usize) -> u64 {
    let mut n = 0;
    while let Ok(raw) = parse_entry(map, off) {
        off += raw.total_bytes;
        n += 1;
    }
    n
}

/// Recomputes the chain of the shard log in `dir` from its segment files and checks it against
/// the sidecars; stops at the first mismatch. Read-only (no lock is taken), so it works on a
/// running server's directory: the chain covers only durable entries, which never change, and
/// the entries past it in the newest segments are counted as unchained, not checked. A sidecar
/// whose last record is torn is accepted only for the newest chained segment (its writer may be
/// mid-record).
pub fn verify_shard(dir: &Path, shard: ShardId) -> io::Result<ShardVerify> {
    let segs = list_segments(dir, shard).map_err(|e| io::Error::other(e.to_string()))?;
    let mut out = ShardVerify::default();
    let has: Vec<bool> = segs
        .iter()
        .map(|(b, _)| dir.join(chain_file_name(*b)).exists())
        .collect();
    let last_with = has.iter().rposition(|h| *h);
    let mut prev_seal: Option<Digest> = None;
    for (i, (base, path)) in segs.iter().enumerate() {
        let base = *base;
        let fail = |pos: Option<LogPos>, device: Option<String>, what: String| Mismatch {
            shard,
            segment: path.clone(),
            pos,
            device,
            what,
        };
        out.segments += 1;
        let (map, header) = match map_segment(path) {
            Ok(Some(m)) => m,
            // Deleted by retention since it was listed: the rest is newer.
            Ok(None) => {
                out.segments -= 1;
                continue;
            }
            Err(e) => {
                out.mismatch = Some(fail(None, None, e.to_string()));
                return Ok(out);
            }
        };
        if header.shard != shard.0 || header.base != base {
            out.mismatch = Some(fail(
                None,
                None,
                "segment header names another shard or base".into(),
            ));
            return Ok(out);
        }
        if !has[i] {
            if last_with.is_some_and(|l| i < l) {
                out.mismatch = Some(fail(
                    None,
                    None,
                    "its chain sidecar is missing, but a later segment has one".into(),
                ));
                return Ok(out);
            }
            out.unchained += count_entries(&map, SEGMENT_HEADER_BYTES);
            continue;
        }
        let sc_path = dir.join(chain_file_name(base));
        let sc = match read_sidecar(&sc_path)? {
            Some(Ok(sc)) => sc,
            Some(Err(what)) => {
                out.mismatch = Some(fail(None, None, what));
                return Ok(out);
            }
            // Deleted since listed (retention): skip like its segment.
            None => continue,
        };
        let newest = Some(i) == last_with;
        if sc.valid_len < sc.file_len
            && !(newest && sc.file_len - sc.valid_len < CHAIN_RECORD_BYTES * 2)
        {
            out.mismatch = Some(fail(
                None,
                None,
                format!(
                    "chain sidecar record {} is damaged",
                    (sc.valid_len - CHAIN_HEADER_BYTES) / CHAIN_RECORD_BYTES
                ),
            ));
            return Ok(out);
        }
        if sc.header.shard != shard.0 || sc.header.base != base {
            out.mismatch = Some(fail(
                None,
                None,
                "chain sidecar names another shard or base".into(),
            ));
            return Ok(out);
        }
        match prev_seal {
            Some(p) if p != sc.header.start => {
                out.mismatch = Some(fail(
                    Some(LogPos(base + SEGMENT_HEADER_BYTES as u64)),
                    None,
                    "the chain does not continue from the previous segment's seal digest (a \
                     segment was removed or a sidecar rewritten)"
                        .into(),
                ));
                return Ok(out);
            }
            Some(_) => {}
            None => {
                if out.start.is_none() {
                    out.start = Some((LogPos(base), sc.header.flags & CHAIN_FLAG_ANCHORED != 0));
                }
            }
        }
        let mut digest = sc.header.start;
        let mut off = SEGMENT_HEADER_BYTES;
        let mut seg_entries = 0u64;
        let mut sealed = None;
        for (k, rec) in sc.records.iter().enumerate() {
            let at = |off: usize| LogPos(base + off as u64);
            if sealed.is_some() {
                out.mismatch = Some(fail(
                    None,
                    None,
                    format!("chain record {k} follows the seal"),
                ));
                return Ok(out);
            }
            if rec.kind == RECORD_SEAL {
                if rec.first_pos != base + SEGMENT_HEADER_BYTES as u64
                    || rec.end_pos != base + off as u64
                    || u64::from(rec.entries) != seg_entries
                    || rec.first_seq != header.first_seq
                    || rec.digest != digest
                {
                    out.mismatch = Some(fail(
                        Some(at(off)),
                        None,
                        "the seal record does not match the segment's chain".into(),
                    ));
                    return Ok(out);
                }
                match parse_entry(&map, off) {
                    Err(EntryFault::End) => {}
                    _ => {
                        out.mismatch = Some(fail(
                            Some(at(off)),
                            device_at(&map, off),
                            "bytes follow the sealed end of the segment (an entry was added \
                             after the chain sealed it)"
                                .into(),
                        ));
                        return Ok(out);
                    }
                }
                sealed = Some(digest);
                continue;
            }
            if rec.first_pos != base + off as u64 || rec.end_pos < rec.first_pos {
                out.mismatch = Some(fail(
                    Some(at(off)),
                    None,
                    format!("chain record {k} does not start where the previous one ended"),
                ));
                return Ok(out);
            }
            let group_start = off;
            let mut h = group_hasher(&digest, rec.first_pos);
            let mut n = 0u32;
            let mut first_seq = None;
            while base + (off as u64) < rec.end_pos {
                match parse_entry(&map, off) {
                    Ok(raw) => {
                        first_seq.get_or_insert(raw.seq);
                        h.update(&map[off..off + raw.total_bytes]);
                        off += raw.total_bytes;
                        n += 1;
                    }
                    Err(fault) => {
                        let what = match fault {
                            EntryFault::End => "the entry is gone (zeros)",
                            EntryFault::Length => "the entry's length field is wrong",
                            EntryFault::Crc => "the entry's CRC does not match its bytes",
                        };
                        out.mismatch = Some(fail(
                            Some(at(off)),
                            device_at(&map, off),
                            format!(
                                "{what}; the chain covered it (group {k}, positions {}..{})",
                                rec.first_pos, rec.end_pos
                            ),
                        ));
                        return Ok(out);
                    }
                }
            }
            let computed: Digest = h.finalize().into();
            if base + off as u64 != rec.end_pos
                || n != rec.entries
                || first_seq != Some(rec.first_seq)
                || computed != rec.digest
            {
                out.mismatch = Some(fail(
                    Some(at(group_start)),
                    device_at(&map, group_start),
                    format!(
                        "group {k} ({} entries at positions {}..{}) does not match its digest: \
                         one of its entries was changed after the chain covered it (CRCs \
                         recomputed), or the sidecar was",
                        rec.entries, rec.first_pos, rec.end_pos
                    ),
                ));
                return Ok(out);
            }
            digest = computed;
            seg_entries += u64::from(n);
            out.entries += u64::from(n);
            out.groups += 1;
        }
        match sealed {
            Some(d) => {
                out.sealed += 1;
                prev_seal = Some(d);
            }
            None => {
                if !newest {
                    out.mismatch = Some(fail(
                        None,
                        None,
                        "the segment has no seal record, but a later segment's chain exists".into(),
                    ));
                    return Ok(out);
                }
                out.unchained += count_entries(&map, off);
                prev_seal = None;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Log, LogConfig};
    use crate::record::Heartbeat;

    fn hb(id: &str, i: i64) -> Heartbeat {
        Heartbeat {
            device_id: id.to_string(),
            lat: 10.0 + (i % 70) as f64,
            lon: 20.0 - (i % 150) as f64,
            ts_ms: 1_700_000_000_000 + i,
            received_ms: 1_700_000_000_001 + i,
            ..Heartbeat::default()
        }
    }

    fn log_with(dir: &Path, n: i64) -> Log {
        let cfg = LogConfig {
            segment_bytes: crate::limits::SEGMENT_BYTES_MIN,
            ..LogConfig::new(dir, ShardId(1))
        };
        let (mut log, _) = Log::open(&cfg, |_, _| {}).unwrap();
        for i in 0..n {
            log.append(&hb(&format!("dev-{}", i % 7), i), None).unwrap();
        }
        log.sync_blocking().unwrap();
        log
    }

    fn chain_all(dir: &Path, log: &Log) -> ChainWriter {
        let mut w = ChainWriter::open(dir, ShardId(1)).unwrap();
        while w.step(log.durable(), 1000).unwrap() != Step::Idle {}
        w.finish().unwrap();
        w
    }

    #[test]
    fn a_chained_log_verifies_clean_across_segments_and_resumes() {
        // 20,000 entries over several 1 MiB segments: chained, every sealed segment verifies,
        // the open tail is fully covered after `finish`; then more entries and a new writer
        // (a restart) extend the same chain, and it still verifies.
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_with(dir.path(), 20_000);
        assert!(log.stats().segments >= 3);
        drop(chain_all(dir.path(), &log));
        let v = verify_shard(dir.path(), ShardId(1)).unwrap();
        assert_eq!(v.mismatch, None);
        assert_eq!(v.entries, 20_000);
        assert_eq!(v.unchained, 0);
        assert_eq!(v.sealed, log.stats().segments - 1);
        assert_eq!(v.start, Some((LogPos(0), false)));
        for i in 0..5_000 {
            log.append(&hb("late", i), None).unwrap();
        }
        log.sync_blocking().unwrap();
        let v = verify_shard(dir.path(), ShardId(1)).unwrap();
        assert_eq!((v.entries, v.unchained), (20_000, 5_000));
        drop(chain_all(dir.path(), &log));
        let v = verify_shard(dir.path(), ShardId(1)).unwrap();
        assert_eq!(v.mismatch, None);
        assert_eq!((v.entries, v.unchained), (25_000, 0));
    }

    #[test]
    fn a_torn_sidecar_record_is_cut_and_redone() {
        // A crash mid-record: the writer cuts the torn bytes and recomputes the group.
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 1_000);
        drop(chain_all(dir.path(), &log));
        let sc = dir.path().join(chain_file_name(0));
        let len = std::fs::metadata(&sc).unwrap().len();
        let f = OpenOptions::new().write(true).open(&sc).unwrap();
        f.set_len(len - 30).unwrap();
        drop(chain_all(dir.path(), &log));
        let v = verify_shard(dir.path(), ShardId(1)).unwrap();
        assert_eq!((v.mismatch, v.entries, v.unchained), (None, 1_000, 0));
    }

    #[test]
    fn a_removed_sealed_segment_breaks_the_chain() {
        // Deleting a middle segment (and its sidecar) is named at the next segment.
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 20_000);
        drop(chain_all(dir.path(), &log));
        drop(log);
        let segs = list_segments(dir.path(), ShardId(1)).unwrap();
        std::fs::remove_file(&segs[1].1).unwrap();
        std::fs::remove_file(dir.path().join(chain_file_name(segs[1].0))).unwrap();
        let m = verify_shard(dir.path(), ShardId(1))
            .unwrap()
            .mismatch
            .unwrap();
        assert_eq!(m.segment, segs[2].1);
        assert!(m.what.contains("does not continue"), "{m}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(24))]
            #[test]
            fn any_single_byte_flip_in_a_chained_entry_is_named(
                n in 1i64..400,
                pick in any::<u64>(),
                bit in 0u8..8,
            ) {
                // Random entries, chained; one bit of one entry's bytes (header, payload or
                // padding) flipped: verify names that entry or its group, never passes.
                let dir = tempfile::tempdir().unwrap();
                let log = log_with(dir.path(), n);
                let end = log.durable().0;
                drop(chain_all(dir.path(), &log));
                drop(log);
                let path = dir.path().join(segment_file_name(0));
                let mut bytes = std::fs::read(&path).unwrap();
                let span = end - SEGMENT_HEADER_BYTES as u64;
                let at = SEGMENT_HEADER_BYTES + (pick % span) as usize;
                bytes[at] ^= 1 << bit;
                std::fs::write(&path, &bytes).unwrap();
                let v = verify_shard(dir.path(), ShardId(1)).unwrap();
                let m = v.mismatch.expect("the flip is detected");
                let pos = m.pos.expect("a position is named").0 as usize;
                prop_assert!(pos <= at, "{m}");
                prop_assert!(at - pos < CHAIN_GROUP_ENTRIES as usize * 2048, "{m}");
            }
        }
    }
}
