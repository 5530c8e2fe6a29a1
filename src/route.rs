//! Device routing: which shard owns a device. A device id maps to one of [`VSHARDS`] virtual
//! shards by a specified, build-independent hash — CRC32C (Castagnoli, as in iSCSI/ext4 and
//! HAProxy's `crc32c` converter) of the id's UTF-8 bytes, modulo `VSHARDS` — and a [`Router`]
//! table maps each virtual shard to a logical shard. The table is stored in the data directory
//! (`datadir`); this module owns the hash, the table's rules and its default (contiguous ranges).
//! It does not know which executor runs a shard (`shard % executors`, in `server`), and it does not
//! read or write files.
//!
//! Invariant: `vshard_of(id)` depends on nothing but the id's bytes, forever (test vectors in
//! `shards/README.md`, pinned by the tests below), so any tool — a load balancer, a script — can
//! compute it; a device moves between shards only when the table changes, and then a whole
//! virtual shard moves with it. ahash is used only for in-memory hash tables, never here.

use std::sync::Arc;

use crate::limits::{SHARDS_MAX, VSHARDS};

/// Logical shard number (0-based) within a data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u32);

impl std::fmt::Display for ShardId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Virtual shard number, `0..VSHARDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VShard(pub u16);

/// Name of the routing hash as recorded in the data directory's meta file.
pub const HASH_NAME: &str = "crc32c";

/// The stable 32-bit hash of a device id: CRC32C of its UTF-8 bytes (initial value and final XOR
/// `0xFFFFFFFF`, reflected, polynomial 0x1EDC6F41 — the common "CRC-32C"; `crc32c("123456789")`
/// is `0xE3069283`). Also stored in every log entry header, where chain walks check it.
#[inline]
pub fn device_hash(device_id: &str) -> u32 {
    crc32c::crc32c(device_id.as_bytes())
}

/// The virtual shard of `device_id`: `device_hash(id) % VSHARDS`.
#[inline]
pub fn vshard_of(device_id: &str) -> VShard {
    VShard((device_hash(device_id) % VSHARDS as u32) as u16)
}

/// The shard of `device_id` under the default table of `shard_count` shards
/// ([`Router::contiguous`]): what every data directory created by `geobeat serve`, `reshard` or
/// `migrate` uses. Code serving a data directory routes with its stored table
/// (`DataDir::router`) instead; this is for tools and tests that know the directory is default.
pub fn shard_of(device_id: &str, shard_count: u32) -> ShardId {
    assert!(
        shard_count > 0 && shard_count as usize <= SHARDS_MAX,
        "shard_count {shard_count} outside 1..={SHARDS_MAX}"
    );
    ShardId((usize::from(vshard_of(device_id).0) * shard_count as usize / VSHARDS) as u32)
}

/// Why a routing table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The shard count is 0 or above `SHARDS_MAX`.
    #[error("shard count {0} outside 1..={SHARDS_MAX}")]
    ShardCount(u32),
    /// The table has no ranges, or the first does not start at virtual shard 0.
    #[error("the first range must start at virtual shard 0")]
    Start,
    /// Range starts are not strictly increasing or reach past the last virtual shard.
    #[error("range start {0} is not above the previous one or not below {VSHARDS}")]
    Order(u32),
    /// A range names a shard outside the shard count.
    #[error(
        "range at virtual shard {first} names shard {shard}, but there are {shard_count} shards"
    )]
    Shard {
        /// The range's first virtual shard.
        first: u32,
        /// The shard it names.
        shard: u32,
        /// The data directory's shard count.
        shard_count: u32,
    },
}

/// The virtual shard → shard table of one data directory. Cheap to clone (shared); lookups
/// allocate nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Router {
    /// `table[v]` is the shard of virtual shard `v`; `VSHARDS` entries.
    table: Arc<[u16]>,
    /// Number of logical shards (every entry is below it).
    shard_count: u32,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("shard_count", &self.shard_count)
            .field("ranges", &self.ranges())
            .finish()
    }
}

impl Router {
    /// The default table for `shard_count` shards: contiguous ranges, virtual shard `v` to shard
    /// `v * shard_count / VSHARDS`, so each shard owns one range and ranges move as units.
    pub fn contiguous(shard_count: u32) -> Result<Router, TableError> {
        if shard_count == 0 || shard_count as usize > SHARDS_MAX {
            return Err(TableError::ShardCount(shard_count));
        }
        let table: Arc<[u16]> = (0..VSHARDS)
            .map(|v| (v * shard_count as usize / VSHARDS) as u16)
            .collect();
        Ok(Router { table, shard_count })
    }

    /// A table from its ranges as stored: `(first virtual shard, shard)` pairs with strictly
    /// increasing starts, the first at 0; each range runs to the next one's start (the last to
    /// `VSHARDS`). Every error names what is wrong.
    pub fn from_ranges(shard_count: u32, ranges: &[(u32, u32)]) -> Result<Router, TableError> {
        if shard_count == 0 || shard_count as usize > SHARDS_MAX {
            return Err(TableError::ShardCount(shard_count));
        }
        if ranges.first().map(|r| r.0) != Some(0) {
            return Err(TableError::Start);
        }
        let mut table = vec![0u16; VSHARDS];
        for (i, &(first, shard)) in ranges.iter().enumerate() {
            if first as usize >= VSHARDS || (i > 0 && first <= ranges[i - 1].0) {
                return Err(TableError::Order(first));
            }
            if shard >= shard_count {
                return Err(TableError::Shard {
                    first,
                    shard,
                    shard_count,
                });
            }
            let end = ranges
                .get(i + 1)
                .map_or(VSHARDS, |r| (r.0 as usize).min(VSHARDS));
            table[first as usize..end.max(first as usize)].fill(shard as u16);
        }
        Ok(Router {
            table: table.into(),
            shard_count,
        })
    }

    /// The table as ranges (`(first virtual shard, shard)`, maximal runs), as stored.
    pub fn ranges(&self) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        for (v, &s) in self.table.iter().enumerate() {
            if out.last().map(|r| r.1) != Some(u32::from(s)) {
                out.push((v as u32, u32::from(s)));
            }
        }
        out
    }

    /// Number of logical shards.
    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    /// The shard that owns virtual shard `v`.
    #[inline]
    pub fn shard_of_vshard(&self, v: VShard) -> ShardId {
        ShardId(u32::from(self.table[usize::from(v.0)]))
    }

    /// The shard that owns `device_id`.
    #[inline]
    pub fn shard_of(&self, device_id: &str) -> ShardId {
        self.shard_of_vshard(vshard_of(device_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC32C written out bit by bit from its definition (reflected polynomial 0x82F63B78, initial
    /// value and final XOR all ones), independent of the crate the router uses.
    fn crc32c_reference(bytes: &[u8]) -> u32 {
        let mut crc = u32::MAX;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = (crc >> 1) ^ if crc & 1 == 1 { 0x82F6_3B78 } else { 0 };
            }
        }
        !crc
    }

    /// The test vectors of shards/README.md: (id, CRC32C, virtual shard).
    const VECTORS: [(&str, u32, u16); 8] = [
        ("123456789", 0xe306_9283, 643),
        ("truck-0001", 0x3dcc_c88c, 2188),
        ("truck-0002", 0x2e9c_3b78, 2936),
        ("sensor/a", 0xa606_0ea5, 3749),
        ("ü-device", 0x7253_f2a5, 677),
        ("x", 0xa93c_5f93, 3987),
        ("fx-000", 0xb552_2269, 617),
        ("ü-gerät/7", 0xda94_fbcc, 3020),
    ];

    #[test]
    fn hash_matches_the_documented_vectors() {
        // Pins the routing hash to the vectors published in shards/README.md (which other tools
        // reproduce): if this fails, devices would move between shards. Do not "fix" the values.
        // A bit-by-bit CRC32C agrees, so the vectors are CRC32C and not just what a crate says.
        for (id, crc, vshard) in VECTORS {
            assert_eq!(device_hash(id), crc, "{id}");
            assert_eq!(crc32c_reference(id.as_bytes()), crc, "{id}");
            assert_eq!(vshard_of(id), VShard(vshard), "{id}");
        }
        for i in 0..1000 {
            let id = format!("dev-{i}");
            assert_eq!(device_hash(&id), crc32c_reference(id.as_bytes()));
        }
    }

    #[test]
    fn contiguous_tables_are_ranges_that_spread_evenly() {
        // The default table gives shard s the virtual shards [ceil(s*4096/n), ceil((s+1)*4096/n)):
        // one range per shard, sizes differing by at most one; 100k ids over 8 shards land within
        // 5% of the mean, and ids of a shape common in fleets (sequential numbers) too.
        let r3 = Router::contiguous(3).unwrap();
        assert_eq!(r3.ranges(), vec![(0, 0), (1366, 1), (2731, 2)]);
        for (id, _, _) in VECTORS {
            assert_eq!(r3.shard_of(id), shard_of(id, 3), "{id}");
        }
        assert_eq!(r3.shard_of("truck-0001"), ShardId(1));
        assert_eq!(r3.shard_of("x"), ShardId(2));
        assert_eq!(Router::contiguous(1).unwrap().ranges(), vec![(0, 0)]);
        let r256 = Router::contiguous(256).unwrap();
        assert_eq!(r256.ranges().len(), 256);
        assert!(r256.ranges().iter().all(|&(v, s)| v == s * 16));
        for pattern in ["dev-{}", "truck-{:05}", "{}"] {
            let r = Router::contiguous(8).unwrap();
            let mut counts = [0u32; 8];
            for i in 0..100_000 {
                let id = pattern
                    .replace("{}", &i.to_string())
                    .replace("{:05}", &format!("{i:05}"));
                counts[r.shard_of(&id).0 as usize] += 1;
            }
            for c in counts {
                assert!((11_875..=13_125).contains(&c), "{pattern}: {counts:?}");
            }
        }
    }

    #[test]
    fn tables_round_trip_through_ranges_and_bad_ones_are_named() {
        // Any table survives ranges() -> from_ranges(); each malformed table is refused with the
        // error that says what is wrong.
        let r = Router::from_ranges(4, &[(0, 3), (10, 0), (11, 3), (4000, 1)]).unwrap();
        assert_eq!(r.shard_of_vshard(VShard(9)), ShardId(3));
        assert_eq!(r.shard_of_vshard(VShard(10)), ShardId(0));
        assert_eq!(r.shard_of_vshard(VShard(4095)), ShardId(1));
        assert_eq!(Router::from_ranges(4, &r.ranges()).unwrap(), r);
        for n in [1, 2, 3, 7, 256] {
            let c = Router::contiguous(n).unwrap();
            assert_eq!(Router::from_ranges(n, &c.ranges()).unwrap(), c);
        }
        assert_eq!(Router::from_ranges(2, &[]), Err(TableError::Start));
        assert_eq!(Router::from_ranges(2, &[(1, 0)]), Err(TableError::Start));
        assert_eq!(
            Router::from_ranges(2, &[(0, 0), (5, 1), (5, 0)]),
            Err(TableError::Order(5))
        );
        assert_eq!(
            Router::from_ranges(2, &[(0, 0), (4096, 1)]),
            Err(TableError::Order(4096))
        );
        assert_eq!(
            Router::from_ranges(2, &[(0, 0), (7, 2)]),
            Err(TableError::Shard {
                first: 7,
                shard: 2,
                shard_count: 2
            })
        );
        assert_eq!(Router::contiguous(0), Err(TableError::ShardCount(0)));
        assert_eq!(Router::contiguous(257), Err(TableError::ShardCount(257)));
        assert!(Router::from_ranges(2, &[(0, 0), (7, 2)])
            .unwrap_err()
            .to_string()
            .contains("names shard 2, but there are 2 shards"));
    }
}
