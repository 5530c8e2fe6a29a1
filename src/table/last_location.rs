//! The last-location table of one shard: device id → the newest heartbeat by DEVICE time (a late
//! heartbeat never moves "last" backwards, though it is still in the log's history) plus the
//! device's chain head (its most recently APPENDED entry, which back-pointers start from). It is
//! built for a million devices per shard: each device is one compact record (48-bit positions, the
//! id inline) in a chunked arena, found through a `hashbrown::HashTable<u32>` of record references;
//! no per-device allocation, and a lookup touches the index and one record (no separate id arena).
//! It does not read the log or decide what is valid: callers feed it observations in append order.
//!
//! Invariant: for every device, `last` is the observation with the greatest `ts_ms` (ties go to the
//! later append) and `head` is the position of the latest observation; records never move or get
//! removed, so a [`Slot`] stays valid for the life of the table.

use hashbrown::HashTable;

use crate::limits::{TABLE_CHUNKS_MAX, TABLE_CHUNK_BYTES, TABLE_DEVICES_MAX, TABLE_POS_MAX};
use crate::log::LogPos;
use crate::record::{ArchivedHeartbeat, Heartbeat};
use crate::table::device_seq::DeviceAudit;

/// A device's last location as the table keeps it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LastLocation {
    /// Latitude in degrees.
    pub lat: f64,
    /// Longitude in degrees.
    pub lon: f64,
    /// Device time of this heartbeat, ms since the Unix epoch (the greatest seen).
    pub ts_ms: i64,
    /// Server receive time of this heartbeat, ms since the Unix epoch.
    pub received_ms: i64,
    /// Log position of this heartbeat's entry (read it for the full record).
    pub pos: LogPos,
    /// Log position of the device's most recently appended entry (its chain head); differs from
    /// `pos` after a late heartbeat.
    pub head: LogPos,
}

/// One heartbeat as the table needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Latitude in degrees.
    pub lat: f64,
    /// Longitude in degrees.
    pub lon: f64,
    /// Device time, ms since the Unix epoch.
    pub ts_ms: i64,
    /// Server receive time, ms since the Unix epoch.
    pub received_ms: i64,
    /// Position of the heartbeat's log entry.
    pub pos: LogPos,
}

impl Observation {
    /// The observation of `hb` stored at `pos`.
    pub fn of(hb: &Heartbeat, pos: LogPos) -> Observation {
        Observation {
            lat: hb.lat,
            lon: hb.lon,
            ts_ms: hb.ts_ms,
            received_ms: hb.received_ms,
            pos,
        }
    }

    /// The observation of an archived heartbeat stored at `pos` (recovery).
    pub fn of_archived(hb: &ArchivedHeartbeat, pos: LogPos) -> Observation {
        Observation {
            lat: hb.lat.to_native(),
            lon: hb.lon.to_native(),
            ts_ms: hb.ts_ms.to_native(),
            received_ms: hb.received_ms.to_native(),
            pos,
        }
    }
}

/// Why the table refused a new device or position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// `limits::TABLE_DEVICES_MAX` devices already, or the record arena is full.
    #[error("last-location table full ({devices} devices)")]
    Full {
        /// Devices in the table.
        devices: usize,
    },
    /// A log position above `limits::TABLE_POS_MAX`.
    #[error("log position {0} above the table's 48-bit maximum")]
    PositionTooLarge(u64),
    /// Device id longer than 255 bytes (the arena's length prefix).
    #[error("device id of {0} bytes too long for the table")]
    IdTooLong(usize),
}

/// Handle to one device's record (valid for the life of the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(u32);

impl Slot {
    /// The slot as a plain key, for side indexes such as the spatial grid.
    pub(crate) fn raw(self) -> u32 {
        self.0
    }

    /// A slot back from [`Slot::raw`]; only keys this table handed out are valid.
    pub(crate) fn from_raw(raw: u32) -> Slot {
        Slot(raw)
    }
}

// Record layout (little-endian, 4-byte aligned, never straddling a chunk):
//   0..8 lat f64 | 8..16 lon f64 | 16..24 ts_ms i64 | 24..32 received_ms i64
//   32..38 last_pos u48 | 38..44 head_pos u48 | 44 id_len u8 | 45.. id bytes | zero pad to 4
const REC_LAT: usize = 0;
const REC_LON: usize = 8;
const REC_TS: usize = 16;
const REC_RECEIVED: usize = 24;
const REC_LAST: usize = 32;
const REC_HEAD: usize = 38;
const REC_ID_LEN: usize = 44;
const REC_ID: usize = 45;
const REC_ALIGN: usize = 4;
const POS_MASK: u64 = (1 << 48) - 1;
/// A record reference is `chunk << REF_CHUNK_SHIFT | byte_offset / REC_ALIGN`.
const REF_CHUNK_SHIFT: u32 = 18;

/// Bytes of the record of an id of `id_len` bytes (at least 48, so 8-byte reads of the head
/// position stay inside the record).
const fn record_bytes(id_len: usize) -> usize {
    let b = (REC_ID + id_len + REC_ALIGN - 1) & !(REC_ALIGN - 1);
    if b < 48 {
        48
    } else {
        b
    }
}

#[inline]
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[inline]
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[inline]
fn put_u48(b: &mut [u8], at: usize, v: u64) {
    debug_assert!(v <= POS_MASK);
    b[at..at + 6].copy_from_slice(&v.to_le_bytes()[..6]);
}

#[inline]
fn rec_id(rec: &[u8]) -> &[u8] {
    let len = rec[REC_ID_LEN] as usize;
    &rec[REC_ID..REC_ID + len]
}

fn rec_location(rec: &[u8]) -> LastLocation {
    LastLocation {
        lat: f64::from_bits(u64_at(rec, REC_LAT)),
        lon: f64::from_bits(u64_at(rec, REC_LON)),
        ts_ms: u64_at(rec, REC_TS) as i64,
        received_ms: u64_at(rec, REC_RECEIVED) as i64,
        pos: LogPos(u64_at(rec, REC_LAST) & POS_MASK),
        head: LogPos(u64_at(rec, REC_HEAD) & POS_MASK),
    }
}

fn rec_str(rec: &[u8]) -> &str {
    std::str::from_utf8(rec_id(rec)).expect("ids are stored from &str")
}

/// One arena chunk: records back to back from offset 0 to `used`.
struct Chunk {
    bytes: Box<[u8]>,
    used: usize,
}

impl Chunk {
    fn new() -> Chunk {
        Chunk {
            // Zeroed allocation: fresh pages from the OS, touched only as records are written.
            bytes: vec![0u8; TABLE_CHUNK_BYTES].into_boxed_slice(),
            used: 0,
        }
    }

    fn records(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut off = 0;
        std::iter::from_fn(move || {
            if off >= self.used {
                return None;
            }
            let rec = &self.bytes[off..];
            off += record_bytes(rec[REC_ID_LEN] as usize);
            Some(rec)
        })
    }
}

#[inline]
fn rec_at(chunks: &[Chunk], r: u32) -> &[u8] {
    let chunk = &chunks[(r >> REF_CHUNK_SHIFT) as usize];
    &chunk.bytes[(r & ((1 << REF_CHUNK_SHIFT) - 1)) as usize * REC_ALIGN..]
}

#[inline]
fn rec_at_mut(chunks: &mut [Chunk], r: u32) -> &mut [u8] {
    let chunk = &mut chunks[(r >> REF_CHUNK_SHIFT) as usize];
    &mut chunk.bytes[(r & ((1 << REF_CHUNK_SHIFT) - 1)) as usize * REC_ALIGN..]
}

/// Device id → last location, for one shard.
pub struct LastLocationTable {
    /// Exactly-once state and audit counters of the devices that ever sent a device sequence or
    /// had a duplicate dropped (issue 18); kept beside the compact records so devices that never
    /// do pay nothing.
    audits: hashbrown::HashMap<Box<str>, DeviceAudit, ahash::RandomState>,
    index: HashTable<u32>,
    chunks: Vec<Chunk>,
    devices: usize,
    hasher: ahash::RandomState,
}

impl std::fmt::Debug for LastLocationTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastLocationTable")
            .field("devices", &self.devices)
            .field("heap_bytes", &self.heap_bytes())
            .finish()
    }
}

impl Default for LastLocationTable {
    fn default() -> Self {
        Self::new()
    }
}

impl LastLocationTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::with_capacity(0, 0)
    }

    /// An empty table with index room for `devices` devices whose ids average `id_bytes` bytes.
    pub fn with_capacity(devices: usize, id_bytes: usize) -> Self {
        let arena = devices.saturating_mul(record_bytes(id_bytes));
        LastLocationTable {
            audits: hashbrown::HashMap::with_hasher(ahash::RandomState::new()),
            index: HashTable::with_capacity(devices),
            chunks: Vec::with_capacity(arena.div_ceil(TABLE_CHUNK_BYTES).min(TABLE_CHUNKS_MAX)),
            devices: 0,
            // A per-table random hasher, independent of the routing hash: all ids of one shard share
            // the routing hash's top bits, which would starve hashbrown's control bytes.
            hasher: ahash::RandomState::new(),
        }
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devices
    }

    /// Whether the table has no device.
    pub fn is_empty(&self) -> bool {
        self.devices == 0
    }

    /// Heap bytes held (arena chunks, chunk list and hash index, by capacity).
    pub fn heap_bytes(&self) -> usize {
        self.chunks.len() * TABLE_CHUNK_BYTES
            + self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + self.index.allocation_size()
            + self.audits.allocation_size()
            + self.audits.keys().map(|k| k.len()).sum::<usize>()
    }

    /// The exactly-once state of `device_id`, if it has any.
    pub fn audit(&self, device_id: &str) -> Option<&DeviceAudit> {
        self.audits.get(device_id)
    }

    /// The exactly-once state of `device_id`, created empty on first use.
    pub fn audit_mut(&mut self, device_id: &str) -> &mut DeviceAudit {
        if !self.audits.contains_key(device_id) {
            self.audits.insert(device_id.into(), DeviceAudit::default());
        }
        self.audits.get_mut(device_id).expect("just inserted")
    }

    /// Every device with exactly-once state.
    pub fn audits(&self) -> impl Iterator<Item = (&str, &DeviceAudit)> + '_ {
        self.audits.iter().map(|(k, v)| (&**k, v))
    }

    /// Sum of every device's gaps and duplicates (for metrics).
    pub fn audit_totals(&self) -> (u64, u64) {
        self.audits
            .values()
            .fold((0, 0), |(g, d), a| (g + a.gaps(), d + a.duplicates))
    }

    #[inline]
    fn hash(&self, id: &[u8]) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The slot of `device_id`, if known.
    #[inline]
    pub fn find(&self, device_id: &str) -> Option<Slot> {
        let id = device_id.as_bytes();
        let chunks = &self.chunks;
        self.index
            .find(self.hash(id), |&r| rec_id(rec_at(chunks, r)) == id)
            .map(|&r| Slot(r))
    }

    /// The last location of `device_id`.
    pub fn get(&self, device_id: &str) -> Option<LastLocation> {
        self.find(device_id).map(|s| self.get_at(s))
    }

    /// The last location in `slot`.
    pub fn get_at(&self, slot: Slot) -> LastLocation {
        rec_location(rec_at(&self.chunks, slot.0))
    }

    /// The chain head (most recently appended entry) of `device_id`.
    pub fn head(&self, device_id: &str) -> Option<LogPos> {
        self.find(device_id).map(|s| self.head_at(s))
    }

    /// The chain head in `slot`.
    pub fn head_at(&self, slot: Slot) -> LogPos {
        LogPos(u64_at(rec_at(&self.chunks, slot.0), REC_HEAD) & POS_MASK)
    }

    /// The device id in `slot`.
    pub fn id_at(&self, slot: Slot) -> &str {
        rec_str(rec_at(&self.chunks, slot.0))
    }

    /// Checks that a NEW device with this id could be inserted (so a caller can refuse before
    /// writing the log, keeping log and table consistent).
    pub fn check_room(&self, device_id: &str) -> Result<(), TableError> {
        if device_id.len() > u8::MAX as usize {
            return Err(TableError::IdTooLong(device_id.len()));
        }
        let fits_in_last = self
            .chunks
            .last()
            .is_some_and(|c| c.used + record_bytes(device_id.len()) <= TABLE_CHUNK_BYTES);
        if self.devices >= TABLE_DEVICES_MAX
            || (!fits_in_last && self.chunks.len() >= TABLE_CHUNKS_MAX)
        {
            return Err(TableError::Full {
                devices: self.devices,
            });
        }
        Ok(())
    }

    fn check_pos(pos: LogPos) -> Result<(), TableError> {
        if pos.0 > TABLE_POS_MAX {
            return Err(TableError::PositionTooLarge(pos.0));
        }
        Ok(())
    }

    /// Records an appended heartbeat of an existing device: the head always moves to it; "last"
    /// moves only if its device time is not older.
    pub fn observe_at(&mut self, slot: Slot, obs: &Observation) -> Result<(), TableError> {
        Self::check_pos(obs.pos)?;
        debug_assert!(
            ((slot.0 >> REF_CHUNK_SHIFT) as usize) < self.chunks.len(),
            "slot of another table"
        );
        let rec = rec_at_mut(&mut self.chunks, slot.0);
        debug_assert!(rec[REC_ID_LEN] > 0, "slot is not a record start");
        if obs.ts_ms >= u64_at(rec, REC_TS) as i64 {
            put_u64(rec, REC_LAT, obs.lat.to_bits());
            put_u64(rec, REC_LON, obs.lon.to_bits());
            put_u64(rec, REC_TS, obs.ts_ms as u64);
            put_u64(rec, REC_RECEIVED, obs.received_ms as u64);
            put_u48(rec, REC_LAST, obs.pos.0);
        }
        put_u48(rec, REC_HEAD, obs.pos.0);
        Ok(())
    }

    /// Sets the chain head in `slot` (restoring a device from the last-location checkpoint, whose
    /// head may be a later, late-arriving entry than its last location).
    pub fn set_head_at(&mut self, slot: Slot, head: LogPos) -> Result<(), TableError> {
        Self::check_pos(head)?;
        put_u48(rec_at_mut(&mut self.chunks, slot.0), REC_HEAD, head.0);
        Ok(())
    }

    /// Records an appended heartbeat of `device_id`, inserting the device if new.
    pub fn observe(&mut self, device_id: &str, obs: &Observation) -> Result<Slot, TableError> {
        Self::check_pos(obs.pos)?;
        let id = device_id.as_bytes();
        let hash = self.hash(id);
        let chunks = &self.chunks;
        if let Some(&r) = self.index.find(hash, |&r| rec_id(rec_at(chunks, r)) == id) {
            self.observe_at(Slot(r), obs)?;
            return Ok(Slot(r));
        }
        self.check_room(device_id)?;
        let size = record_bytes(id.len());
        if self
            .chunks
            .last()
            .is_none_or(|c| c.used + size > TABLE_CHUNK_BYTES)
        {
            self.chunks.push(Chunk::new());
        }
        let chunk_index = self.chunks.len() - 1;
        let chunk = self.chunks.last_mut().expect("a chunk was just ensured");
        let off = chunk.used;
        let rec = &mut chunk.bytes[off..off + size];
        put_u64(rec, REC_LAT, obs.lat.to_bits());
        put_u64(rec, REC_LON, obs.lon.to_bits());
        put_u64(rec, REC_TS, obs.ts_ms as u64);
        put_u64(rec, REC_RECEIVED, obs.received_ms as u64);
        put_u48(rec, REC_LAST, obs.pos.0);
        put_u48(rec, REC_HEAD, obs.pos.0);
        rec[REC_ID_LEN] = id.len() as u8;
        rec[REC_ID..REC_ID + id.len()].copy_from_slice(id);
        chunk.used += size;
        let r = ((chunk_index as u32) << REF_CHUNK_SHIFT) | (off / REC_ALIGN) as u32;
        self.devices += 1;
        let (chunks, hasher) = (&self.chunks, &self.hasher);
        self.index
            .insert_unique(hash, r, |&r| hasher.hash_one(rec_id(rec_at(chunks, r))));
        Ok(Slot(r))
    }

    /// Calls `f` for every device (in insertion order).
    pub fn for_each(&self, mut f: impl FnMut(&str, &LastLocation)) {
        for rec in self.chunks.iter().flat_map(Chunk::records) {
            f(rec_str(rec), &rec_location(rec));
        }
    }

    /// Iterates every device (in insertion order).
    pub fn iter(&self) -> impl Iterator<Item = (&str, LastLocation)> + '_ {
        self.chunks
            .iter()
            .flat_map(Chunk::records)
            .map(|rec| (rec_str(rec), rec_location(rec)))
    }

    /// Number of arena chunks (see [`LastLocationTable::iter_chunk`]).
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Iterates the devices of arena chunk `index` (about 1 MiB of records): lets a caller walk
    /// the table in slices, yielding between them. Devices inserted later land in later chunks.
    pub fn iter_chunk(&self, index: usize) -> impl Iterator<Item = (&str, LastLocation)> + '_ {
        self.chunks[index]
            .records()
            .map(|rec| (rec_str(rec), rec_location(rec)))
    }

    /// Iterates every device with its slot (in insertion order), e.g. to build side indexes keyed
    /// by slot without a lookup per device.
    pub fn iter_slots(&self) -> impl Iterator<Item = (Slot, &str, LastLocation)> + '_ {
        self.chunks.iter().enumerate().flat_map(|(ci, chunk)| {
            let mut off = 0;
            std::iter::from_fn(move || {
                if off >= chunk.used {
                    return None;
                }
                let rec = &chunk.bytes[off..];
                let slot = Slot(((ci as u32) << REF_CHUNK_SHIFT) | (off / REC_ALIGN) as u32);
                off += record_bytes(rec[REC_ID_LEN] as usize);
                Some((slot, rec_str(rec), rec_location(rec)))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(ts_ms: i64, pos: u64) -> Observation {
        Observation {
            lat: ts_ms as f64 / 1e6,
            lon: -(ts_ms as f64) / 1e6,
            ts_ms,
            received_ms: ts_ms + 5,
            pos: LogPos(pos),
        }
    }

    #[test]
    fn newest_by_device_time_wins_and_late_heartbeats_do_not_move_last() {
        // A device reports t=100, t=300, then a late t=200: last stays at t=300 (its position), the
        // head moves to the late entry; a tie (t=300 again) takes the later append.
        let mut t = LastLocationTable::new();
        t.observe("dev-a", &obs(100, 4096)).unwrap();
        t.observe("dev-a", &obs(300, 4200)).unwrap();
        t.observe("dev-a", &obs(200, 4300)).unwrap();
        let l = t.get("dev-a").unwrap();
        assert_eq!((l.ts_ms, l.pos, l.head), (300, LogPos(4200), LogPos(4300)));
        assert_eq!(l.lat, 300.0 / 1e6);
        assert_eq!(l.received_ms, 305);
        t.observe("dev-a", &obs(300, 4400)).unwrap();
        let l = t.get("dev-a").unwrap();
        assert_eq!((l.pos, l.head), (LogPos(4400), LogPos(4400)));
        assert_eq!(t.head("dev-a"), Some(LogPos(4400)));
        assert_eq!(t.get("dev-b"), None);
    }

    #[test]
    fn positions_pack_into_48_bits_exactly() {
        // Round-trips last/head positions at the bit boundaries of the packed representation and
        // refuses a position above the maximum.
        let mut t = LastLocationTable::new();
        for (i, (a, b)) in [
            (0u64, 0u64),
            (TABLE_POS_MAX, 0),
            (0, TABLE_POS_MAX),
            (0xFFFF_FFFF, 0x1_0000_0000),
            (0x1234_5678_9ABC, 0xCBA9_8765_4321),
        ]
        .into_iter()
        .enumerate()
        {
            let id = format!("d{i}");
            t.observe(&id, &obs(1, a)).unwrap();
            let s = t.find(&id).unwrap();
            t.observe_at(s, &obs(0, b)).unwrap(); // late: last stays at a
            let l = t.get_at(s);
            assert_eq!((l.pos.0, l.head.0), (a, b), "case {i}");
        }
        assert_eq!(
            t.observe("x", &obs(1, TABLE_POS_MAX + 1)),
            Err(TableError::PositionTooLarge(TABLE_POS_MAX + 1))
        );
        assert!(t.find("x").is_none());
    }

    #[test]
    fn many_devices_iterate_and_resize_correctly() {
        // Inserts 50k devices (forcing several index and slab resizes), then checks lookups, ids and
        // for_each against the inserted values.
        let mut t = LastLocationTable::new();
        for i in 0..50_000u64 {
            t.observe(&format!("device-{i:06}"), &obs(i as i64, 4096 + i * 8))
                .unwrap();
        }
        assert_eq!(t.len(), 50_000);
        for i in (0..50_000u64).step_by(997) {
            let s = t.find(&format!("device-{i:06}")).unwrap();
            assert_eq!(t.id_at(s), format!("device-{i:06}"));
            assert_eq!(t.get_at(s).pos, LogPos(4096 + i * 8));
        }
        let mut n = 0;
        t.for_each(|id, l| {
            assert_eq!(id, format!("device-{:06}", l.ts_ms));
            n += 1;
        });
        assert_eq!(n, 50_000);
        assert_eq!(t.iter().count(), 50_000);
        assert!(t.heap_bytes() >= 50_000 * (48 + 14));
    }

    #[test]
    fn long_ids_fill_several_chunks_without_straddling() {
        // 10k devices with ids of 200..=255 bytes need several 1 MiB chunks: every record stays
        // findable with its exact id and values, and iteration (with and without slots) visits
        // each once, in order, handing out the slots lookups return.
        let mut t = LastLocationTable::new();
        let id = |i: usize| format!("{i:08}{}", "z".repeat(192 + i % 56));
        for i in 0..10_000usize {
            t.observe(&id(i), &obs(i as i64, 4096 + i as u64)).unwrap();
        }
        assert!(t.chunks.len() >= 2);
        assert!(t.chunks.iter().all(|c| c.used <= TABLE_CHUNK_BYTES));
        for i in (0..10_000usize).step_by(7) {
            let s = t.find(&id(i)).unwrap();
            assert_eq!(t.id_at(s), id(i));
            assert_eq!(t.get_at(s).pos, LogPos(4096 + i as u64));
        }
        let mut n = 0usize;
        for (got, l) in t.iter() {
            assert_eq!(got, id(n));
            assert_eq!(l.ts_ms, n as i64);
            n += 1;
        }
        assert_eq!(n, 10_000);
        // iter_slots hands out the same slots lookups do.
        for (k, (slot, got, l)) in t.iter_slots().enumerate() {
            assert_eq!(got, id(k));
            assert_eq!(Some(slot), t.find(got));
            assert_eq!(t.get_at(slot), l);
        }
        assert_eq!(t.iter_slots().count(), 10_000);
        assert_eq!(record_bytes(1), 48);
        assert_eq!(record_bytes(20), 68);
        assert_eq!(record_bytes(255), 300);
    }

    #[test]
    fn refuses_ids_the_arena_cannot_hold() {
        // A record's id length is one byte: longer ids are refused, not truncated.
        let t = LastLocationTable::new();
        assert_eq!(
            t.check_room(&"x".repeat(256)),
            Err(TableError::IdTooLong(256))
        );
        assert!(t.check_room(&"x".repeat(255)).is_ok());
    }
}
