//! The shard log's on-disk byte layout: the segment header, the entry header, padding, CRCs and
//! segment file names (described byte by byte in `shards/README.md`). It owns encoding and
//! decoding of those bytes and nothing else: it does not open files, map memory, validate the rkyv
//! payload or decide what a failed check means (that is `segment` and `recovery`).
//!
//! Invariant: an entry is accepted only if its length is in range, it fits in the segment, its
//! reserved field is zero and its CRC32C (over the length field and bytes 8..32+len) matches; every
//! multi-byte integer is little-endian.

use crate::limits::{
    ENTRY_ALIGN_BYTES, ENTRY_HEADER_BYTES, ENTRY_PAYLOAD_BYTES_MAX, SEGMENT_HEADER_BYTES,
};

/// First eight bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"GEOBLOG\0";
/// Version of the segment and entry layout written by this build. Version 2 (issue 18) gives the
/// entry header's formerly reserved word (bytes 28..32) a meaning: entry flags
/// (`record::ENTRY_FLAG_DEVICE_SEQ`: the payload ends with a device-sequence trailer).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest segment layout this build still reads (version 1: flags always zero).
pub const FORMAT_VERSION_MIN: u32 = 1;
/// `prev_pos` value meaning "this device has no earlier entry".
pub const POS_NONE: u64 = u64::MAX;
/// Sequence number of the first entry of a brand-new shard log. Starting at 1 means an all-zero
/// entry header can never carry an expected sequence number.
pub const FIRST_SEQ: u64 = 1;
/// Bytes of the segment header that carry fields (the CRC covers `0..SEGMENT_HEADER_CRC_OFFSET`;
/// the rest of the 4096-byte header is zero).
pub const SEGMENT_HEADER_CRC_OFFSET: usize = 48;
/// File name suffix of a segment.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// File name suffix of a segment being created (never valid; removed at open).
pub const SEGMENT_TMP_SUFFIX: &str = ".seg.tmp";
/// Digits of the zero-padded base position in a segment file name.
pub const SEGMENT_NAME_DIGITS: usize = 20;

/// The decoded fixed fields of a segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Shard that owns the segment.
    pub shard: u32,
    /// Global log position of the segment's first byte (the header's first byte).
    pub base: u64,
    /// Size of the segment file in bytes, header included.
    pub segment_bytes: u64,
    /// Sequence number of the first entry written (or to be written) in this segment.
    pub first_seq: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: i64,
}

/// Why a segment header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderFault {
    /// Fewer than [`SEGMENT_HEADER_BYTES`] bytes available.
    Short,
    /// Magic bytes differ.
    Magic,
    /// Unknown format version.
    Version(u32),
    /// Header CRC mismatch.
    Crc,
    /// Segment size not a page multiple, or too small to hold the header.
    Size(u64),
}

impl std::fmt::Display for HeaderFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderFault::Short => write!(f, "file shorter than the segment header"),
            HeaderFault::Magic => write!(f, "bad magic"),
            HeaderFault::Version(v) => write!(f, "unknown format version {v}"),
            HeaderFault::Crc => write!(f, "header CRC mismatch"),
            HeaderFault::Size(b) => write!(f, "invalid segment size {b}"),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl SegmentHeader {
    /// Writes the header into `out[..SEGMENT_HEADER_BYTES]` (the padding is zeroed).
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..SEGMENT_HEADER_BYTES];
        out.fill(0);
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.shard.to_le_bytes());
        out[16..24].copy_from_slice(&self.base.to_le_bytes());
        out[24..32].copy_from_slice(&self.segment_bytes.to_le_bytes());
        out[32..40].copy_from_slice(&self.first_seq.to_le_bytes());
        out[40..48].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32c::crc32c(&out[..SEGMENT_HEADER_CRC_OFFSET]);
        out[48..52].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and checks a header.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, HeaderFault> {
        if b.len() < SEGMENT_HEADER_BYTES {
            return Err(HeaderFault::Short);
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderFault::Magic);
        }
        let version = u32_at(b, 8);
        if crc32c::crc32c(&b[..SEGMENT_HEADER_CRC_OFFSET]) != u32_at(b, 48) {
            return Err(HeaderFault::Crc);
        }
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
            return Err(HeaderFault::Version(version));
        }
        let segment_bytes = u64_at(b, 24);
        if segment_bytes % crate::limits::PAGE_BYTES != 0
            || segment_bytes <= SEGMENT_HEADER_BYTES as u64
        {
            return Err(HeaderFault::Size(segment_bytes));
        }
        Ok(SegmentHeader {
            shard: u32_at(b, 12),
            base: u64_at(b, 16),
            segment_bytes,
            first_seq: u64_at(b, 32),
            created_ms: u64_at(b, 40) as i64,
        })
    }
}

/// Rounds `n` up to the entry alignment.
#[inline]
pub const fn align_entry(n: usize) -> usize {
    (n + ENTRY_ALIGN_BYTES - 1) & !(ENTRY_ALIGN_BYTES - 1)
}

/// Total bytes (header, payload, padding) an entry with `payload_len` payload bytes occupies.
#[inline]
pub const fn entry_bytes(payload_len: usize) -> usize {
    align_entry(ENTRY_HEADER_BYTES + payload_len)
}

/// The CRC32C of an entry: its 4-byte length field, then `rest` = bytes 8..32+len of the entry
/// (the rest of the header followed by the payload, contiguous in the segment).
#[inline]
pub fn entry_crc(len_field: &[u8], rest: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(len_field), rest)
}

/// The fields of one entry header plus its payload, as found in a segment (CRC already checked).
#[derive(Debug, Clone, Copy)]
pub struct RawEntry<'a> {
    /// Shard-wide sequence number.
    pub seq: u64,
    /// Position of the same device's previous entry, or [`POS_NONE`].
    pub prev_pos: u64,
    /// `route::device_hash(device_id)` (CRC32C; format-1 data directories: low 32 bits of ahash).
    pub device_hash_low: u32,
    /// Entry flags (header bytes 28..32; zero in format-1 segments), see `record::ENTRY_FLAGS_KNOWN`.
    pub flags: u32,
    /// The payload: rkyv bytes, then the trailers the flags name (not yet validated).
    pub payload: &'a [u8],
    /// Total bytes the entry occupies, padding included.
    pub total_bytes: usize,
}

/// Why no entry could be read at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryFault {
    /// Length field is zero: the end of data in this segment.
    End,
    /// Length out of range, or the entry would run past the segment end.
    Length,
    /// Unknown flag bits or CRC mismatch.
    Crc,
}

/// Reads the entry at `off` of a mapped segment `seg` (offsets are within the segment). Checks the
/// length and CRC; the payload still needs `record::access`.
#[inline]
pub fn parse_entry(seg: &[u8], off: usize) -> Result<RawEntry<'_>, EntryFault> {
    debug_assert!(off % ENTRY_ALIGN_BYTES == 0);
    if off + ENTRY_HEADER_BYTES > seg.len() {
        return Err(EntryFault::End);
    }
    let h = &seg[off..off + ENTRY_HEADER_BYTES];
    let len = u32_at(h, 0) as usize;
    if len == 0 {
        return Err(EntryFault::End);
    }
    if len > ENTRY_PAYLOAD_BYTES_MAX {
        return Err(EntryFault::Length);
    }
    let total_bytes = entry_bytes(len);
    if off + total_bytes > seg.len() {
        return Err(EntryFault::Length);
    }
    let payload = &seg[off + ENTRY_HEADER_BYTES..off + ENTRY_HEADER_BYTES + len];
    let covered = &seg[off + 8..off + ENTRY_HEADER_BYTES + len];
    let flags = u32_at(h, 28);
    if flags & !crate::record::ENTRY_FLAGS_KNOWN != 0
        || entry_crc(&h[0..4], covered) != u32_at(h, 4)
    {
        return Err(EntryFault::Crc);
    }
    Ok(RawEntry {
        seq: u64_at(h, 8),
        prev_pos: u64_at(h, 16),
        device_hash_low: u32_at(h, 24),
        flags,
        payload,
        total_bytes,
    })
}

/// Writes one entry into `dst` (which must be at least `entry_bytes(payload.len())` long and is
/// expected to be zero past the payload, as fresh segment bytes are). The length and CRC are written
/// last so a torn write leaves either a zero length or a CRC mismatch. Returns the bytes used.
#[inline]
pub fn write_entry(
    dst: &mut [u8],
    seq: u64,
    prev_pos: u64,
    device_hash_low: u32,
    payload: &[u8],
) -> usize {
    write_entry_flagged(dst, seq, prev_pos, device_hash_low, 0, payload)
}

/// [`write_entry`] with entry `flags` (the payload already carries the trailers they name).
#[inline]
pub fn write_entry_flagged(
    dst: &mut [u8],
    seq: u64,
    prev_pos: u64,
    device_hash_low: u32,
    flags: u32,
    payload: &[u8],
) -> usize {
    debug_assert_eq!(flags & !crate::record::ENTRY_FLAGS_KNOWN, 0);
    let len = payload.len();
    assert!(
        (1..=ENTRY_PAYLOAD_BYTES_MAX).contains(&len),
        "payload length {len} out of range"
    );
    let total = entry_bytes(len);
    let dst = &mut dst[..total];
    dst[ENTRY_HEADER_BYTES..ENTRY_HEADER_BYTES + len].copy_from_slice(payload);
    // Padding: zero it explicitly so the entry's bytes never depend on what was there before.
    dst[ENTRY_HEADER_BYTES + len..].fill(0);
    dst[8..16].copy_from_slice(&seq.to_le_bytes());
    dst[16..24].copy_from_slice(&prev_pos.to_le_bytes());
    dst[24..28].copy_from_slice(&device_hash_low.to_le_bytes());
    dst[28..32].copy_from_slice(&flags.to_le_bytes());
    let len_field = (len as u32).to_le_bytes();
    let crc = entry_crc(&len_field, &dst[8..ENTRY_HEADER_BYTES + len]);
    dst[4..8].copy_from_slice(&crc.to_le_bytes());
    dst[0..4].copy_from_slice(&len_field);
    total
}

/// The file name of the segment whose first byte is at global position `base`.
pub fn segment_file_name(base: u64) -> String {
    format!(
        "{base:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_NAME_DIGITS
    )
}

/// Parses a segment file name back into its base position; `None` for any other name.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_header_round_trips_and_detects_damage() {
        // Encodes a header, decodes it back, then flips one byte of each field and expects a CRC
        // (or magic) refusal.
        let h = SegmentHeader {
            shard: 7,
            base: 3 << 20,
            segment_bytes: 1 << 20,
            first_seq: 42,
            created_ms: 1_732_000_000_000,
        };
        let mut buf = vec![0xAAu8; SEGMENT_HEADER_BYTES];
        h.encode(&mut buf);
        assert_eq!(SegmentHeader::decode(&buf), Ok(h));
        assert!(buf[52..].iter().all(|&b| b == 0));
        for i in 0..52 {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(SegmentHeader::decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert_eq!(SegmentHeader::decode(&buf[..100]), Err(HeaderFault::Short));
    }

    #[test]
    fn entry_round_trips_with_padding() {
        // Writes entries of every payload length 1..=40 and reads each back: fields equal, total is
        // a multiple of 8 and covers header + payload, padding is zero.
        for len in 1..=40usize {
            let payload: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(31) | 1).collect();
            let mut seg = vec![0xFFu8; 256];
            let used = write_entry(&mut seg[8..], 9, 1234, 0xDEAD_BEEF, &payload);
            assert_eq!(used % ENTRY_ALIGN_BYTES, 0);
            assert!(used >= ENTRY_HEADER_BYTES + len && used < ENTRY_HEADER_BYTES + len + 8);
            assert!(seg[8 + ENTRY_HEADER_BYTES + len..8 + used]
                .iter()
                .all(|&b| b == 0));
            let e = parse_entry(&seg, 8).expect("valid entry");
            assert_eq!(
                (e.seq, e.prev_pos, e.device_hash_low),
                (9, 1234, 0xDEAD_BEEF)
            );
            assert_eq!(e.payload, &payload[..]);
            assert_eq!(e.total_bytes, used);
        }
    }

    #[test]
    fn entry_damage_is_detected() {
        // Every single-bit flip in header or payload of an entry is refused (CRC or length), and a
        // zero length reads as the end of data.
        let payload = b"some payload bytes, 8-aligned..!";
        let mut seg = vec![0u8; 128];
        let used = write_entry(&mut seg, 1, POS_NONE, 5, payload);
        for byte in 0..ENTRY_HEADER_BYTES + payload.len() {
            for bit in 0..8 {
                let mut bad = seg.clone();
                bad[byte] ^= 1 << bit;
                let r = parse_entry(&bad, 0);
                assert!(r.is_err(), "flip {byte}:{bit} accepted");
            }
        }
        assert_eq!(parse_entry(&seg, used).unwrap_err(), EntryFault::End);
        // Runs past the end of the segment.
        assert_eq!(
            parse_entry(&seg[..used - 8], 0).unwrap_err(),
            EntryFault::Length
        );
    }

    #[test]
    fn segment_names_round_trip() {
        // Names are 20 zero-padded digits plus ".seg"; anything else is not a segment.
        assert_eq!(segment_file_name(4096), "00000000000000004096.seg");
        assert_eq!(
            parse_segment_file_name("00000000000000004096.seg"),
            Some(4096)
        );
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(parse_segment_file_name("4096.seg"), None);
        assert_eq!(
            parse_segment_file_name("00000000000000004096.seg.tmp"),
            None
        );
        assert_eq!(parse_segment_file_name("0000000000000000409x.seg"), None);
    }
}
