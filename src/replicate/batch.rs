//! The payload of one replicated batch: the log entries of one subject (a vshard range of one
//! shard) from one replication round, each exactly as the shard log stores it (header with CRC,
//! rkyv heartbeat, padding: `log::format`), prefixed by its log position. It owns the byte
//! layout (docs/cluster.md, "Batch format") and its decoder; it does not choose which entries go
//! in a batch (`shard::replicate`) and does not send it.
//!
//! Layout (little-endian): `b"GBB1"`, `count: u32`, then `count` times `pos: u64` followed by
//! the entry's bytes (a multiple of 8 long, so every entry stays 8-byte aligned).
//!
//! Invariant: [`decode`] yields exactly the entries [`Builder::push`] was given, in order, each
//! re-validated (CRC, rkyv, record rules) — the same checks a log read makes.

use crate::log::format::parse_entry;
use crate::log::LogPos;

/// The batch format's magic and version.
pub const MAGIC: &[u8; 4] = b"GBB1";
/// Bytes before the first entry.
pub const HEADER_BYTES: usize = 8;

/// Builds one batch payload.
#[derive(Debug, Default)]
pub struct Builder {
    buf: Vec<u8>,
    count: u32,
    first: Option<LogPos>,
    last: Option<LogPos>,
    end: LogPos,
}

impl Builder {
    /// An empty batch.
    pub fn new() -> Builder {
        let mut b = Builder::default();
        b.reset();
        b
    }

    /// Empties the batch, keeping its allocation.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(MAGIC);
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.count = 0;
        self.first = None;
        self.last = None;
        self.end = LogPos(0);
    }

    /// Appends the entry at `pos` whose stored bytes are `raw` and which ends at `end`.
    pub fn push(&mut self, pos: LogPos, raw: &[u8], end: LogPos) {
        assert!(raw.len() % 8 == 0, "log entries are 8-byte aligned");
        assert!(self.count == 0 || pos >= self.end, "entries in log order");
        self.buf.extend_from_slice(&pos.0.to_le_bytes());
        self.buf.extend_from_slice(raw);
        self.count += 1;
        self.first.get_or_insert(pos);
        self.last = Some(pos);
        self.end = end;
        self.buf[4..8].copy_from_slice(&self.count.to_le_bytes());
    }

    /// Entries in the batch.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Payload bytes so far.
    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Position of the first entry.
    pub fn first(&self) -> Option<LogPos> {
        self.first
    }

    /// Position of the last entry (names the batch in its `Nats-Msg-Id`: a batch re-formed
    /// after a lost PubAck may hold more entries from the same first one, so only the last
    /// entry identifies the content).
    pub fn last(&self) -> Option<LogPos> {
        self.last
    }

    /// Position just past the last entry.
    pub fn end(&self) -> LogPos {
        self.end
    }

    /// The payload.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Why a batch payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Wrong magic or a truncated header.
    #[error("not a geobeat batch (magic or header)")]
    Header,
    /// An entry failed its framing, CRC or record checks.
    #[error("entry {index} of the batch is damaged")]
    Entry {
        /// Its index in the batch.
        index: u32,
    },
    /// Bytes left over, or fewer entries than the count says.
    #[error("batch length does not match its count")]
    Length,
}

/// One decoded entry: its log position and an owned copy of the heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Position in the origin shard's log.
    pub pos: LogPos,
    /// The entry's shard-wide sequence number.
    pub seq: u64,
    /// The heartbeat.
    pub hb: crate::record::Heartbeat,
}

/// Decodes and validates a whole batch payload.
pub fn decode(payload: &[u8]) -> Result<Vec<Decoded>, DecodeError> {
    if payload.len() < HEADER_BYTES || &payload[..4] != MAGIC {
        return Err(DecodeError::Header);
    }
    let count = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes"));
    // Entries need 8-byte alignment for rkyv: copy into an aligned buffer once.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    let b = &aligned[..];
    let mut off = HEADER_BYTES;
    let mut out = Vec::with_capacity(count as usize);
    for index in 0..count {
        if off + 8 > b.len() {
            return Err(DecodeError::Length);
        }
        let pos = LogPos(u64::from_le_bytes(
            b[off..off + 8].try_into().expect("8 bytes"),
        ));
        off += 8;
        let raw = parse_entry(b, off).map_err(|_| DecodeError::Entry { index })?;
        let hb = crate::record::access(raw.payload).ok_or(DecodeError::Entry { index })?;
        out.push(Decoded {
            pos,
            seq: raw.seq,
            hb: hb.to_owned_heartbeat(),
        });
        off += raw.total_bytes;
    }
    if off != b.len() {
        return Err(DecodeError::Length);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::{entry_bytes, write_entry};
    use crate::record::Heartbeat;

    fn raw_entry(hb: &Heartbeat, seq: u64) -> Vec<u8> {
        let mut payload = rkyv::util::AlignedVec::new();
        hb.encode_into(&mut payload);
        let mut out = vec![0u8; entry_bytes(payload.len())];
        write_entry(&mut out, seq, u64::MAX, 0, &payload);
        out
    }

    #[test]
    fn a_batch_decodes_to_the_entries_pushed_and_refuses_damage() {
        let hbs: Vec<Heartbeat> = (0..5)
            .map(|i| Heartbeat {
                device_id: format!("dev-{i}"),
                lat: 1.0 + i as f64,
                lon: 2.0,
                ts_ms: 1000 + i,
                received_ms: 2000,
                ..Heartbeat::default()
            })
            .collect();
        let mut b = Builder::new();
        let mut pos = 64u64;
        for (i, hb) in hbs.iter().enumerate() {
            let raw = raw_entry(hb, i as u64);
            b.push(LogPos(pos), &raw, LogPos(pos + raw.len() as u64));
            pos += 3 * raw.len() as u64;
        }
        assert_eq!((b.count(), b.first()), (5, Some(LogPos(64))));
        assert!(b.last() > b.first() && b.last().unwrap() < b.end());
        let got = decode(b.bytes()).unwrap();
        assert_eq!(
            got.iter().map(|d| &d.hb).collect::<Vec<_>>(),
            hbs.iter().collect::<Vec<_>>()
        );
        assert_eq!(got[0].pos, LogPos(64));
        let mut bad = b.bytes().to_vec();
        let n = bad.len();
        bad[n - 20] ^= 1;
        assert!(decode(&bad).is_err());
        assert_eq!(
            decode(&b.bytes()[..n - 8]),
            Err(DecodeError::Entry { index: 4 })
        );
        assert_eq!(decode(b"XXXX\0\0\0\0"), Err(DecodeError::Header));
    }
}
