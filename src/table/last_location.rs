//! The last-location table of one shard: device id → the newest heartbeat by DEVICE time (a late
//! heartbeat never moves "last" backwards, though it is still in the log's history) plus the
//! device's chain head (its most recently APPENDED entry, which back-pointers start from). It is
//! built for a million devices per shard: 48-byte fixed rows in one slab, a `hashbrown::HashTable`
//! of u32 row indices, and every id's bytes in one arena (no per-device allocation). It does not
//! read the log or decide what is valid: callers feed it observations in append order.
//!
//! Invariant: for every device, `last` is the observation with the greatest `ts_ms` (ties go to the
//! later append) and `head` is the position of the latest observation; rows are never removed, so
//! a [`Slot`] stays valid for the life of the table.

use hashbrown::HashTable;

use crate::limits::{TABLE_DEVICES_MAX, TABLE_ID_ARENA_BYTES_MAX, TABLE_POS_MAX};
use crate::log::LogPos;
use crate::record::{ArchivedHeartbeat, Heartbeat};

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
    /// `limits::TABLE_DEVICES_MAX` devices already, or the id arena is full.
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

/// Handle to one device's row (valid for the life of the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(u32);

/// 48 bytes: four 8-byte fields, two 48-bit positions packed into 12 bytes, and the id's arena
/// offset. The id's length is the arena byte in front of it.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Row {
    lat: f64,
    lon: f64,
    ts_ms: i64,
    received_ms: i64,
    /// last_pos (bits 0..48) then head_pos (bits 48..96), little-endian across the three words.
    pos: [u32; 3],
    id_off: u32,
}

const _: () = assert!(std::mem::size_of::<Row>() == 48);

impl Row {
    fn last_pos(&self) -> u64 {
        u64::from(self.pos[0]) | (u64::from(self.pos[1] & 0xFFFF) << 32)
    }

    fn head_pos(&self) -> u64 {
        u64::from(self.pos[1] >> 16) | (u64::from(self.pos[2]) << 16)
    }

    fn set_positions(&mut self, last: u64, head: u64) {
        debug_assert!(last <= TABLE_POS_MAX && head <= TABLE_POS_MAX);
        self.pos[0] = last as u32;
        self.pos[1] = ((last >> 32) as u32 & 0xFFFF) | ((head as u32 & 0xFFFF) << 16);
        self.pos[2] = (head >> 16) as u32;
    }

    fn location(&self) -> LastLocation {
        LastLocation {
            lat: self.lat,
            lon: self.lon,
            ts_ms: self.ts_ms,
            received_ms: self.received_ms,
            pos: LogPos(self.last_pos()),
            head: LogPos(self.head_pos()),
        }
    }
}

/// Device id → last location, for one shard.
pub struct LastLocationTable {
    index: HashTable<u32>,
    rows: Vec<Row>,
    /// Every id as `[len: u8][bytes]`, back to back.
    ids: Vec<u8>,
    hasher: ahash::RandomState,
}

impl std::fmt::Debug for LastLocationTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastLocationTable")
            .field("devices", &self.rows.len())
            .field("heap_bytes", &self.heap_bytes())
            .finish()
    }
}

impl Default for LastLocationTable {
    fn default() -> Self {
        Self::new()
    }
}

fn id_at(ids: &[u8], off: u32) -> &[u8] {
    let off = off as usize;
    let len = ids[off] as usize;
    &ids[off + 1..off + 1 + len]
}

impl LastLocationTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::with_capacity(0, 0)
    }

    /// An empty table with room for `devices` devices whose ids average `id_bytes` bytes.
    pub fn with_capacity(devices: usize, id_bytes: usize) -> Self {
        LastLocationTable {
            index: HashTable::with_capacity(devices),
            rows: Vec::with_capacity(devices),
            ids: Vec::with_capacity(devices * (id_bytes + 1)),
            // A per-table random hasher, independent of the routing hash: all ids of one shard share
            // the routing hash's top bits, which would starve hashbrown's control bytes.
            hasher: ahash::RandomState::new(),
        }
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the table has no device.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Heap bytes held (row slab, id arena and hash index, by capacity).
    pub fn heap_bytes(&self) -> usize {
        self.rows.capacity() * std::mem::size_of::<Row>()
            + self.ids.capacity()
            + self.index.allocation_size()
    }

    #[inline]
    fn hash(&self, id: &[u8]) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The slot of `device_id`, if known.
    #[inline]
    pub fn find(&self, device_id: &str) -> Option<Slot> {
        let id = device_id.as_bytes();
        let (rows, ids) = (&self.rows, &self.ids);
        self.index
            .find(self.hash(id), |&i| {
                id_at(ids, rows[i as usize].id_off) == id
            })
            .map(|&i| Slot(i))
    }

    /// The last location of `device_id`.
    pub fn get(&self, device_id: &str) -> Option<LastLocation> {
        self.find(device_id).map(|s| self.get_at(s))
    }

    /// The last location in `slot`.
    pub fn get_at(&self, slot: Slot) -> LastLocation {
        self.rows[slot.0 as usize].location()
    }

    /// The chain head (most recently appended entry) of `device_id`.
    pub fn head(&self, device_id: &str) -> Option<LogPos> {
        self.find(device_id).map(|s| self.head_at(s))
    }

    /// The chain head in `slot`.
    pub fn head_at(&self, slot: Slot) -> LogPos {
        LogPos(self.rows[slot.0 as usize].head_pos())
    }

    /// The device id in `slot`.
    pub fn id_at(&self, slot: Slot) -> &str {
        let bytes = id_at(&self.ids, self.rows[slot.0 as usize].id_off);
        std::str::from_utf8(bytes).expect("ids are stored from &str")
    }

    /// Checks that a NEW device with this id could be inserted (so a caller can refuse before
    /// writing the log, keeping log and table consistent).
    pub fn check_room(&self, device_id: &str) -> Result<(), TableError> {
        if device_id.len() > u8::MAX as usize {
            return Err(TableError::IdTooLong(device_id.len()));
        }
        if self.rows.len() >= TABLE_DEVICES_MAX
            || self.ids.len() + 1 + device_id.len() > TABLE_ID_ARENA_BYTES_MAX
        {
            return Err(TableError::Full {
                devices: self.rows.len(),
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
        let row = &mut self.rows[slot.0 as usize];
        let last = if obs.ts_ms >= row.ts_ms {
            row.lat = obs.lat;
            row.lon = obs.lon;
            row.ts_ms = obs.ts_ms;
            row.received_ms = obs.received_ms;
            obs.pos.0
        } else {
            row.last_pos()
        };
        row.set_positions(last, obs.pos.0);
        Ok(())
    }

    /// Records an appended heartbeat of `device_id`, inserting the device if new.
    pub fn observe(&mut self, device_id: &str, obs: &Observation) -> Result<Slot, TableError> {
        Self::check_pos(obs.pos)?;
        let id = device_id.as_bytes();
        let hash = self.hash(id);
        let (rows, ids) = (&self.rows, &self.ids);
        if let Some(&i) = self
            .index
            .find(hash, |&i| id_at(ids, rows[i as usize].id_off) == id)
        {
            self.observe_at(Slot(i), obs)?;
            return Ok(Slot(i));
        }
        self.check_room(device_id)?;
        let id_off = self.ids.len() as u32;
        self.ids.push(id.len() as u8);
        self.ids.extend_from_slice(id);
        let mut row = Row {
            lat: obs.lat,
            lon: obs.lon,
            ts_ms: obs.ts_ms,
            received_ms: obs.received_ms,
            pos: [0; 3],
            id_off,
        };
        row.set_positions(obs.pos.0, obs.pos.0);
        let index = self.rows.len() as u32;
        self.rows.push(row);
        let (rows, ids, hasher) = (&self.rows, &self.ids, &self.hasher);
        self.index.insert_unique(hash, index, |&i| {
            hasher.hash_one(id_at(ids, rows[i as usize].id_off))
        });
        Ok(Slot(index))
    }

    /// Calls `f` for every device (in insertion order).
    pub fn for_each(&self, mut f: impl FnMut(&str, &LastLocation)) {
        for row in &self.rows {
            let id = std::str::from_utf8(id_at(&self.ids, row.id_off)).expect("ids are &str");
            f(id, &row.location());
        }
    }

    /// Iterates every device (in insertion order).
    pub fn iter(&self) -> impl Iterator<Item = (&str, LastLocation)> + '_ {
        self.rows.iter().map(|row| {
            let id = std::str::from_utf8(id_at(&self.ids, row.id_off)).expect("ids are &str");
            (id, row.location())
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
    fn refuses_ids_the_arena_cannot_hold() {
        // The arena's length prefix is one byte: longer ids are refused, not truncated.
        let t = LastLocationTable::new();
        assert_eq!(
            t.check_room(&"x".repeat(256)),
            Err(TableError::IdTooLong(256))
        );
        assert!(t.check_room(&"x".repeat(255)).is_ok());
    }
}
