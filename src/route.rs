//! Device-to-shard routing: which logical shard owns a device, forever. It owns the hash (ahash with
//! fixed seeds) and the routing fingerprint stored in each data directory. It does not know which
//! executor runs a shard: that mapping (`shard % executors`) lives in `server`.
//!
//! Invariant: `shard_of(id, n)` never changes for a given data directory. ahash's output depends on
//! the ahash version and on compile-time CPU features (AES), so the data directory records a
//! fingerprint of known ids ([`fingerprint`]); a build that would route differently refuses to open
//! it instead of silently misrouting devices.

/// Fixed seeds: changing them re-routes every device. Never change.
const SEEDS: [u64; 4] = [
    0x6765_6f62_6561_7401,
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
];

/// Logical shard number (0-based) within a data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u32);

impl std::fmt::Display for ShardId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The stable 64-bit hash of a device id.
pub fn device_hash(device_id: &str) -> u64 {
    ahash::RandomState::with_seeds(SEEDS[0], SEEDS[1], SEEDS[2], SEEDS[3])
        .hash_one(device_id.as_bytes())
}

/// The logical shard that owns `device_id` in a data directory of `shard_count` shards.
pub fn shard_of(device_id: &str, shard_count: u32) -> ShardId {
    assert!(shard_count > 0, "shard_count must be positive");
    // Multiply-shift instead of modulo: uniform for any count and cheaper than a division.
    ShardId(((u128::from(device_hash(device_id)) * u128::from(shard_count)) >> 64) as u32)
}

/// A fingerprint of this build's routing, recorded in the data directory at creation and checked
/// on every open.
pub fn fingerprint() -> u64 {
    (0..16).fold(0u64, |acc, i| {
        acc.rotate_left(5) ^ device_hash(&format!("fingerprint-{i}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids_route_to_known_shards() {
        // Pins the routing: if this test fails, a dependency or build flag changed the hash and
        // existing data directories would be misrouted. Do not "fix" the expected values.
        let got: Vec<u32> = ["truck-0001", "truck-0002", "sensor/a", "ü-device", "x"]
            .iter()
            .map(|id| shard_of(id, 16).0)
            .collect();
        assert_eq!(got, PINNED_16);
        assert_eq!(fingerprint(), PINNED_FINGERPRINT, "{:#x}", fingerprint());
    }

    #[test]
    fn spreads_evenly() {
        // 100k ids over 8 shards: every shard within 5% of the mean.
        let mut counts = [0u32; 8];
        for i in 0..100_000 {
            counts[shard_of(&format!("dev-{i}"), 8).0 as usize] += 1;
        }
        for c in counts {
            assert!((11_875..=13_125).contains(&c), "{counts:?}");
        }
    }

    const PINNED_16: [u32; 5] = [4, 8, 5, 2, 4];
    const PINNED_FINGERPRINT: u64 = 0x7210_dc3e_0f3e_7c45;
}
